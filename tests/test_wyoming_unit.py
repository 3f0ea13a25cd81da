"""The Wyoming server's parsing, in-process: what a client's bytes become (an event, the end, or a clear error)."""

from __future__ import annotations

import asyncio
import json

import pytest

from offline_tts.wyoming_server import EventTooLarge, ProtocolError, read_event, voice_fields


def parse(raw: bytes, max_bytes: int = 1000):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_event(reader, max_bytes)

    return asyncio.run(go())


def test_an_event_as_the_library_writes_it() -> None:
    data = json.dumps({"text": "Hola.", "voice": {"name": "ana"}}).encode()
    header = json.dumps({"type": "synthesize", "data_length": len(data), "version": "1.10.2"}).encode()
    event = parse(header + b"\n" + data)
    assert event.type == "synthesize" and event.data == {"text": "Hola.", "voice": {"name": "ana"}}
    assert event.payload is None


def test_payload_and_inline_data() -> None:
    event = parse(json.dumps({"type": "audio-chunk", "data": {"rate": 24000}, "payload_length": 4}).encode() + b"\nabcd")
    assert event.data == {"rate": 24000} and event.payload == b"abcd"


@pytest.mark.parametrize("raw", [b"", b'{"type": "synthesize", "data_length": 10}\n{"te'])
def test_the_end_of_the_connection_is_none(raw: bytes) -> None:
    assert parse(raw) is None


@pytest.mark.parametrize(("raw", "error"), [
    (b"not json\n", ProtocolError),
    (b"[1]\n", ProtocolError),
    (b'{"data": {}}\n', ProtocolError),
    (b'{"type": "x", "data_length": -1}\n', ProtocolError),
    (b'{"type": "x", "data_length": "5"}\n', ProtocolError),
    (b'{"type": "x", "data_length": 3}\n[1]', ProtocolError),
    (b'{"type": "x", "data": [1]}\n', ProtocolError),
    (b'{"type": "x", "data_length": 600, "payload_length": 600}\n', EventTooLarge),
    (b'{"type": "x", "pad": "' + b"x" * 70_000 + b'"}\n', EventTooLarge),
])
def test_malformed_or_oversized_events_are_clear_errors(raw: bytes, error: type[ProtocolError]) -> None:
    with pytest.raises(error) as exc:
        parse(raw)
    assert exc.value.message and exc.value.hint and exc.value.code in ("invalid_event", "event_too_large")


def test_voice_fields() -> None:
    assert voice_fields({}) == (None, None)
    assert voice_fields({"voice": {"name": "ana"}}) == ("ana", None)
    assert voice_fields({"voice": {"name": "ana", "language": "en", "speaker": "x"}}) == ("ana", "en")
    assert voice_fields({"voice": {"language": "de"}}) == (None, "de")
    assert voice_fields({"voice": {"name": ""}}) == (None, None)
    for bad in ({"voice": "ana"}, {"voice": {"name": 1}}, {"voice": {"language": ["en"]}}):
        with pytest.raises(ProtocolError):
            voice_fields(bad)


@pytest.mark.parametrize(("uri", "without_key", "allowed"), [
    ("tcp://0.0.0.0:10200", False, False),
    ("tcp://192.168.1.5:10200", False, False),
    ("tcp://127.0.0.1:10200", False, True),
    ("unix:///run/tts.sock", False, True),
    ("tcp://0.0.0.0:10200", True, True),
])
def test_with_an_api_key_wyoming_listens_only_where_the_key_is_not_needed(uri: str, without_key: bool, allowed: bool) -> None:
    from pydantic import ValidationError

    from offline_tts.config import Settings

    def make() -> Settings:
        return Settings(api_key="secret-key", wyoming_uri=uri, wyoming_without_key=without_key)

    if allowed:
        assert make().wyoming_uri == uri
    else:
        with pytest.raises(ValidationError, match="TTS_WYOMING_WITHOUT_KEY"):
            make()
    assert Settings(wyoming_uri=uri).wyoming_uri == uri  # no key: nothing to protect
