"""Text that arrives in pieces over a WebSocket (issue 12), against the real server with a real client
(the `websockets` package): the native /api/tts/ws protocol, its key, its limits, malformed messages, a
client that vanishes; the ElevenLabs-compatible stream-input in tests/test_websocket_elevenlabs.py."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from helpers import ServerProcess, make_clip, wait_for

RATE = 24_000
LONG_SENTENCE = ("Esta es una frase larguísima que el modelo tiene que decir de principio a fin sin parar, "
                 "hablando del mar y de las montañas y de los ríos y de las ciudades y de la gente que pasa")


def started(srv: ServerProcess, timeout: float = 600) -> ServerProcess:
    """Start a private server (a loaded machine may take minutes); never leave it running if that fails."""
    try:
        return srv.start(timeout=timeout)
    except BaseException:
        srv.stop()
        raise


def ws_url(srv: ServerProcess, path: str = "/api/tts/ws") -> str:
    return srv.url.replace("http", "ws", 1) + path


class Conn:
    """A client connection that records what it received, in order: ("event", dict) or ("audio", bytes)."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.log: list[tuple[str, object]] = []

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def next(self, timeout: float = 120):
        message = await asyncio.wait_for(self.ws.recv(), timeout)
        item = ("audio", message) if isinstance(message, bytes) else ("event", json.loads(message))
        self.log.append(item)
        return item

    async def until(self, predicate, timeout: float = 120):
        while True:
            item = await self.next(timeout)
            if predicate(*item):
                return item[1]

    async def until_event(self, kind: str, timeout: float = 120) -> dict:
        return await self.until(lambda what, value: what == "event" and value["type"] == kind, timeout)

    async def rest(self, timeout: float = 120) -> tuple[int, str]:
        """Read to the end: the close code and reason."""
        try:
            while True:
                await self.next(timeout)
        except websockets.ConnectionClosed:
            return self.ws.close_code, self.ws.close_reason

    @property
    def events(self) -> list[dict]:
        return [value for what, value in self.log if what == "event"]

    @property
    def audio(self) -> bytes:
        return b"".join(value for what, value in self.log if what == "audio")


def start(voice: str = "ana", **fields) -> dict:
    return {"type": "start", "voice": voice, "language": "en", **fields}


async def opened(url: str, first: dict | None = None, **kwargs) -> Conn:
    conn = Conn(await connect(url, proxy=None, **kwargs))
    if first is not None:
        await conn.send(**first)
        ready = await conn.next()
        assert ready[0] == "event" and ready[1]["type"] == "ready", ready
    return conn


def run(coro):
    return asyncio.run(coro)


def metric(srv: ServerProcess, name: str, labels: str = "") -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def assert_error_close(conn: Conn, code: str, close_code: int) -> dict:
    """The last event is an error in the service's envelope, and the server closed with `close_code`."""
    errors = [e for e in conn.events if e["type"] == "error"]
    assert errors, conn.events
    error = errors[-1]["error"]
    assert error["code"] == code, error
    assert error["message"].strip() and error["hint"].strip(), error
    assert conn.ws.close_code == close_code, (conn.ws.close_code, conn.ws.close_reason)
    assert conn.ws.close_reason.strip(), "the close frame says why"
    return error


def assert_still_serving(srv: ServerProcess) -> None:
    assert srv.proc.poll() is None, srv.log()[-3000:]
    assert httpx.get(srv.url + "/", timeout=10).status_code == 200
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


# -- the protocol -------------------------------------------------------------------------------------
def test_one_token_pieces(server: ServerProcess) -> None:
    tokens = ["Hel", "lo", " there", ".", " How", " are", " you", "?", " I", " am", " fine"]

    async def go() -> Conn:
        conn = await opened(ws_url(server), start())
        for token in tokens:
            await conn.send(type="text", text=token)
        await conn.send(type="close")
        assert await conn.rest() == (1000, "")
        return conn

    conn = run(go())
    starts = [e for e in conn.events if e["type"] == "sentence_start"]
    ends = [e for e in conn.events if e["type"] == "sentence_end"]
    assert [e["text"] for e in starts] == ["Hello there.", "How are you?", "I am fine"]
    assert [e["index"] for e in ends] == [0, 1, 2]
    done = conn.events[-1]
    assert done["type"] == "done" and done["sentences"] == 3 and done["characters"] == len("".join(tokens))
    # Every sample of every sentence arrived, as raw 24 kHz s16le.
    assert len(conn.audio) > 0 and len(conn.audio) % 2 == 0
    assert abs(len(conn.audio) / 2 / RATE - done["audio_seconds"]) < 0.01
    # In order: each sentence's audio between its start and its end.
    kinds = [(what, value["type"] if what == "event" else None) for what, value in conn.log]
    first_start = kinds.index(("event", "sentence_start"))
    assert kinds[first_start + 1] == ("audio", None)
    assert all(e["first_audio_seconds"] is not None and e["first_audio_seconds"] >= 0 for e in ends)
    log = server.log()
    assert re.search(r"method=WS path=/api/tts/ws route=/api/tts/ws status=101 voice=ana language=en "
                     rf"characters={len(''.join(tokens))} .*sentences=3 close_code=1000", log), log[-2000:]
    assert metric(server, "tts_websocket_closes_total", '{code="1000",route="/api/tts/ws"}') >= 1


def test_a_sentence_is_spoken_before_the_next_arrives(server: ServerProcess) -> None:
    async def go() -> Conn:
        conn = await opened(ws_url(server), start())
        for token in ["Good", " morning", "."]:
            await conn.send(type="text", text=token)
        # The period may end an abbreviation: the sentence is certain once the next word begins.
        await conn.send(type="text", text=" Is")
        await conn.until(lambda what, value: what == "audio")  # sentence 1's audio, before sentence 2 is sent
        assert [e["text"] for e in conn.events if e["type"] == "sentence_start"] == ["Good morning."]
        sent_at = len(conn.log)
        for token in [" it", " raining", "?"]:
            await conn.send(type="text", text=token)
        await conn.send(type="close")
        await conn.rest()
        return conn, sent_at

    conn, sent_at = run(go())
    later = [value for what, value in conn.log[sent_at:] if what == "event" and value["type"] == "sentence_start"]
    assert [e["text"] for e in later] == ["Is it raining?"]
    assert conn.events[-1]["type"] == "done" and conn.events[-1]["sentences"] == 2


def test_flush_speaks_what_is_buffered(server: ServerProcess) -> None:
    async def go() -> Conn:
        conn = await opened(ws_url(server), start())
        await conn.send(type="text", text="no sentence end here")
        await conn.send(type="flush")
        end = await conn.until_event("sentence_end")  # spoken while the connection stays open
        assert end["index"] == 0 and end["audio_seconds"] > 0
        await conn.send(type="text", text="and this one", flush=True)  # flush inside a text message
        end = await conn.until_event("sentence_end")
        assert end["index"] == 1
        await conn.send(type="close")
        assert await conn.rest() == (1000, "")
        return conn

    conn = run(go())
    assert [e["text"] for e in conn.events if e["type"] == "sentence_start"] == ["no sentence end here", "and this one"]


def test_two_connections_with_different_voices_at_once(server: ServerProcess) -> None:
    async def one(voice: str) -> Conn:
        conn = await opened(ws_url(server), start(voice))
        await conn.send(type="text", text="Hello there, this is my voice.")
        await conn.send(type="close")
        assert await conn.rest() == (1000, "")
        return conn

    async def both():
        return await asyncio.gather(one("ana"), one("my_voice_sample"))

    a, b = run(both())
    assert a.log[0][1]["voice"] == "ana" and b.log[0][1]["voice"] == "my_voice_sample"
    assert a.audio and b.audio and a.audio != b.audio  # each spoke with its own voice


def test_other_formats_stream_through_one_encoder(server: ServerProcess) -> None:
    from helpers import ffmpeg_decode

    async def go() -> Conn:
        conn = await opened(ws_url(server), start(format="mp3"))
        await conn.send(type="text", text="One sentence. And another one.")
        await conn.send(type="close")
        assert await conn.rest() == (1000, "")
        return conn

    conn = run(go())
    assert conn.log[0][1]["format"] == "mp3" and conn.log[0][1]["media_type"] == "audio/mpeg"
    rate, seconds = ffmpeg_decode(conn.audio, "mp3")  # both sentences in one valid mp3 stream
    assert rate == RATE
    assert abs(seconds - conn.events[-1]["audio_seconds"]) < 0.2, (seconds, conn.events[-1])


# -- malformed messages -----------------------------------------------------------------------------
MALFORMED = {
    "not json": ("{nope", None, "invalid_message", 1008),
    "an array": ("[1, 2]", None, "invalid_message", 1008),
    "binary": (b"\x00\x01", None, "invalid_message", 1003),
    "text before start": (json.dumps({"type": "text", "text": "hi"}), None, "invalid_message", 1008),
    "speed out of range": (json.dumps(start(speed=9)), None, "invalid_message", 1008),
    "unknown field": (json.dumps(start(voise="ana")), None, "invalid_message", 1008),
    "unknown voice": (json.dumps(start("nobody")), None, "voice_not_found", 1008),
    "bad format": (json.dumps(start(format="xyz")), None, "unsupported_format", 1008),
    "bad language": (json.dumps(start(language="xx")), None, "unsupported_language", 1008),
    "unknown type": (json.dumps(start()), json.dumps({"type": "speak"}), "invalid_message", 1008),
    "text not a string": (json.dumps(start()), json.dumps({"type": "text", "text": 5}), "invalid_message", 1008),
    "start twice": (json.dumps(start()), json.dumps(start()), "invalid_message", 1008),
    "flush with fields": (json.dumps(start()), json.dumps({"type": "flush", "now": True}), "invalid_message", 1008),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_messages_get_an_error_and_a_clean_close(server: ServerProcess, case: str) -> None:
    first, second, code, close_code = MALFORMED[case]

    async def go() -> Conn:
        conn = Conn(await connect(ws_url(server), proxy=None))
        await conn.ws.send(first)
        if second is not None:
            assert (await conn.next())[1]["type"] == "ready"
            await conn.ws.send(second)
        await conn.rest(timeout=30)
        return conn

    conn = run(go())
    assert_error_close(conn, code, close_code)
    assert_still_serving(server)


# -- a long sentence: cancel, a vanished client ----------------------------------------------------
@pytest.fixture(scope="module")
def long_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No small audio cap here: a sentence takes tens of seconds to speak on the tiny CPU model."""
    srv = ServerProcess(tmp_path_factory.mktemp("wslong"), tiny_model_dir, {"TTS_MAX_AUDIO_TOKENS": "100000"})
    make_clip(srv.voices_dir / "ana.wav", seconds=5, rate=24000, channels=1)
    started(srv)
    yield srv
    srv.stop()


def idle_pool(srv: ServerProcess) -> bool:
    return (metric(srv, "tts_batch_slots_busy") == 0 and metric(srv, "tts_requests_in_progress") == 0
            and metric(srv, "tts_websocket_connections", '{route="/api/tts/ws"}') == 0)


def test_cancel_mid_sentence(long_server: ServerProcess) -> None:
    async def go() -> tuple[Conn, int]:
        conn = await opened(ws_url(long_server), start())
        await conn.send(type="text", text=LONG_SENTENCE + ". And then more. And more", flush=False)
        await conn.until(lambda what, value: what == "audio")  # speaking the long sentence
        assert metric(long_server, "tts_batch_slots_busy") == 1
        await conn.send(type="cancel")
        cancelled_at = len(conn.log)
        cancelled = await conn.until_event("cancelled")
        after_cancel = sum(1 for what, _ in conn.log[cancelled_at:] if what == "audio")
        assert cancelled["dropped_sentences"] >= 1  # at least "And then more." was queued
        # The slot is free again while the connection stays open...
        await asyncio.to_thread(wait_for, lambda: metric(long_server, "tts_batch_slots_busy") == 0, "a free slot", 30)
        # ...and the connection speaks new text.
        await conn.send(type="text", text="Short.", flush=True)
        end = await conn.until_event("sentence_end")
        await conn.send(type="close")
        assert await conn.rest() == (1000, "")
        return conn, after_cancel, end

    conn, after_cancel, end = run(go())
    # At most the chunk being sent when the cancel arrived, and one on its way meanwhile.
    assert after_cancel <= 2, f"{after_cancel} audio frames came after the cancel was sent"
    starts = [e for e in conn.events if e["type"] == "sentence_start"]
    assert [e["index"] for e in starts] == [0, end["index"]] and starts[-1]["text"] == "Short."
    assert not any(e["text"].startswith("And") for e in starts)
    assert not any(e["type"] == "sentence_end" and e["index"] == 0 for e in conn.events), "the cut sentence never ends"
    # No audio between the cancelled event and the next sentence's start.
    kinds = [(w, v["type"] if w == "event" else None) for w, v in conn.log]
    i = kinds.index(("event", "cancelled"))
    assert kinds[i + 1] == ("event", "sentence_start"), kinds[i:i + 3]


def test_a_client_that_vanishes_frees_its_slot(long_server: ServerProcess) -> None:
    async def go() -> None:
        conn = await opened(ws_url(long_server), start())
        await conn.send(type="text", text=LONG_SENTENCE + ".", flush=True)
        await conn.until(lambda what, value: what == "audio")
        assert metric(long_server, "tts_batch_slots_busy") == 1 and metric(long_server, "tts_requests_in_progress") == 1
        conn.ws.transport.abort()  # no close frame: the TCP connection is simply gone

    run(go())
    wait_for(lambda: idle_pool(long_server), "the vanished client's slot, place and connection to be freed", 30)
    gone = sum(metric(long_server, "tts_websocket_closes_total", f'{{code="{code}",route="/api/tts/ws"}}')
               for code in (1005, 1006))  # as the server saw it: no close frame / no close code
    assert gone >= 1
    assert_still_serving(long_server)


# -- limits -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("wslimits"), tiny_model_dir, {
        "TTS_WS_MAX_MESSAGE_BYTES": "1024", "TTS_WS_MAX_BUFFERED_CHARS": "60", "TTS_WS_MAX_CHARACTERS": "100",
        "TTS_WS_IDLE_SECONDS": "1.5", "TTS_WS_CLAUSE_CHARS": "0"})
    make_clip(srv.voices_dir / "ana.wav", seconds=5, rate=24000, channels=1)
    started(srv)
    yield srv
    srv.stop()


def test_limit_message_size(limited_server: ServerProcess) -> None:
    async def go() -> Conn:
        conn = await opened(ws_url(limited_server), start())
        await conn.send(type="text", text="a" * 1100)
        await conn.rest(30)
        return conn

    assert "1024 bytes" in assert_error_close(run(go()), "message_too_large", 1009)["message"]


def test_limit_buffered_text(limited_server: ServerProcess) -> None:
    async def go() -> Conn:
        conn = await opened(ws_url(limited_server), start())
        for _ in range(7):  # no sentence end: it all waits in the buffer
            await conn.send(type="text", text="word word ")
        await conn.rest(30)
        return conn

    error = assert_error_close(run(go()), "buffer_full", 1008)
    assert "TTS_WS_MAX_BUFFERED_CHARS" in error["hint"]


def test_limit_total_characters(limited_server: ServerProcess) -> None:
    async def go() -> Conn:
        conn = await opened(ws_url(limited_server), start())
        for i in range(3):  # 45 characters each, spoken before the next: the buffer stays under its limit
            await conn.send(type="text", text="This is a sentence of forty five characters.", flush=True)
            if i < 2:
                await conn.until_event("sentence_end")
        await conn.rest(30)
        return conn

    conn = run(go())
    assert_error_close(conn, "too_many_characters", 1008)
    assert len([e for e in conn.events if e["type"] == "sentence_end"]) == 2


def test_limit_idle(limited_server: ServerProcess) -> None:
    async def go(first: dict | None) -> Conn:
        conn = await opened(ws_url(limited_server), first)
        await conn.rest(30)  # the client sends nothing more
        return conn

    assert_error_close(run(go(start())), "idle_timeout", 1008)
    assert_error_close(run(go(None)), "idle_timeout", 1008)  # not even the first message
    assert_still_serving(limited_server)


def test_a_long_speech_is_not_idle(limited_server: ServerProcess) -> None:
    """The idle limit counts only while nothing is being spoken: a client that listens is not idle."""
    async def go() -> tuple[Conn, float]:
        conn = await opened(ws_url(limited_server), start())
        began = asyncio.get_running_loop().time()
        await conn.send(type="text", text="One, two. Three, four. Five, six. Seven", flush=True)
        for _ in range(4):
            await conn.until_event("sentence_end")
        took = asyncio.get_running_loop().time() - began
        await conn.send(type="close")
        assert await conn.rest() == (1000, "")
        return conn, took

    conn, took = run(go())
    assert took > 1.5, f"the speech took only {took:.1f} s: it did not outlast the idle limit, nothing was tested"
    assert conn.events[-1]["sentences"] == 4


def test_readme_example(server: ServerProcess, tmp_path: Path) -> None:
    """The README's Python example, as written (only the server URL changed), speaks and ends with done."""
    import subprocess
    import sys

    from helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M) if "/api/tts/ws" in b]
    assert len(blocks) == 1
    code = blocks[0].replace("ws://localhost:8000", ws_url(server, ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert '"type": "ready"' in out.stdout and '"type": "done"' in out.stdout, out.stdout
    assert (tmp_path / "out.pcm").stat().st_size > 0
