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
