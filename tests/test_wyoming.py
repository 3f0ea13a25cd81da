"""The Wyoming protocol server (Home Assistant), against the real server, driven by the wyoming package's own
async TCP client the way Home Assistant's wyoming integration does it (one connection per request, the
streaming text written by one task while another reads the audio): describe, synthesize with each kind of
voice, streaming text input, two clients at once, a client that leaves mid-audio, and every error case,
after which the connection and the server keep working."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.ping import Ping
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStop, SynthesizeVoice

from helpers import ServerProcess, free_port, make_clip, wait_for

READ_TIMEOUT = 120  # seconds for one event: a hang fails the test instead of blocking it
# One sentence with no stop: its audio cap is proportional to its length, i.e. tens of seconds of work
# on the tiny CPU model (see test_streaming.py).
LONG_SENTENCE = ("Esta es una frase larguísima que el modelo tiene que decir de principio a fin sin parar, "
                 "hablando del mar y de las montañas y de los ríos y de las ciudades y de la gente que pasa")
MODEL_LANGUAGES = {"en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja", "hi"}


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Wyoming on; two slots and no queue (so "busy" is reachable); a default voice and a voice with its
    own language; no small audio cap (the long sentence takes long)."""
    env = {"TTS_WYOMING_URI": f"tcp://127.0.0.1:{free_port()}", "TTS_MAX_BATCH": "2", "TTS_MAX_QUEUE": "0",
           "TTS_MAX_AUDIO_TOKENS": "100000"}
    server = ServerProcess(tmp_path_factory.mktemp("wyoming"), tiny_model_dir, env)
    make_clip(server.voices_dir / "my_voice_sample.wav", seconds=5, rate=24000, channels=1)
    make_clip(server.voices_dir / "ana.wav", seconds=5, freq=220, rate=16000, channels=1)
    (server.voices_dir / "ana.json").write_text(json.dumps({"language": "en"}))
    try:
        server.start(timeout=600)  # generous: the model loads slowly on a busy 2-core machine
    except Exception:
        server.stop()  # not left running when it never got ready
        raise
    r = httpx.post(server.url + "/api/config", json={"voice_sample": "my_voice_sample", "language": "es"}, timeout=120)
    assert r.status_code == 200, r.text
    yield server
    server.stop()


def wyoming_port(server: ServerProcess) -> int:
    return int(server.env["TTS_WYOMING_URI"].rsplit(":", 1)[1])


def client(server: ServerProcess) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", wyoming_port(server))


async def read(c: AsyncTcpClient) -> Event | None:
    return await asyncio.wait_for(c.read_event(), READ_TIMEOUT)


async def read_until(c: AsyncTcpClient, *types: str) -> list[Event]:
    """Events up to and including the first of `types` (fails if the connection ends before)."""
    events = []
    while True:
        event = await read(c)
        assert event is not None, f"connection closed after {[e.type for e in events]}"
        events.append(event)
        if event.type in types:
            return events


async def ask(server: ServerProcess, *events: Event, until: tuple[str, ...] = ("audio-stop", "error")) -> list[Event]:
    """One request on a new connection, as Home Assistant makes it."""
    async with client(server) as c:
        for event in events:
            await c.write_event(event)
        return await read_until(c, *until)


def run(coro):
    return asyncio.run(coro)


def pcm_of(events: list[Event]) -> bytes:
    return b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))


def assert_audio(events: list[Event]) -> bytes:
    """audio-start, audio-chunk..., audio-stop at the engine's rate, s16le mono; the PCM."""
    types = [e.type for e in events]
    assert types[0] == "audio-start" and types[-1] == "audio-stop", types
    assert set(types[1:-1]) == {"audio-chunk"}, types
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    for e in events[1:-1]:
        chunk = AudioChunk.from_event(e)
        assert (chunk.rate, chunk.width, chunk.channels) == (24000, 2, 1)
    pcm = pcm_of(events)
    assert len(pcm) > 24000 * 2 * 0.2 and len(pcm) % 2 == 0
    return pcm


def http_pcm(server: ServerProcess, **body) -> bytes:
    r = httpx.post(server.url + "/api/tts/stream", json={**body, "format": "pcm"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


def assert_error(events: list[Event], code: str, *words: str) -> Error:
    assert events[-1].type == "error", [e.type for e in events]
    error = Error.from_event(events[-1])
    assert error.code == code, error
    for word in words:
        assert word in error.text, error
    return error


def wyoming_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if "protocol=wyoming" in line]


def log_line(server: ServerProcess, before: int) -> dict[str, str]:
    """The access-log line of the request made after `before` lines (written just after its last event)."""
    lines = wait_for(lambda: wyoming_lines(server)[before:], "the request's log line", 30)
    assert len(lines) == 1, lines
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', lines[0].split("request ", 1)[1]))


def metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def assert_still_works(server: ServerProcess) -> None:
    pcm = assert_audio(run(ask(server, Synthesize(text="Hola.").event())))
    assert pcm


# -- describe ------------------------------------------------------------------------------------------
def test_describe_lists_every_voice_in_every_language_and_follows_uploads(srv: ServerProcess, tmp_path: Path) -> None:
    def describe() -> Info:
        events = run(ask(srv, Describe().event(), until=("info", "error")))
        assert events[-1].type == "info", events
        return Info.from_event(events[-1])

    info = describe()
    assert len(info.tts) == 1 and not info.asr
    program = info.tts[0]
    assert program.name == "offline-tts" and program.installed and program.version
    assert program.supports_synthesize_streaming is True
    assert {v.name for v in program.voices} == {"ana", "my_voice_sample"}
    for voice in program.voices:
        assert voice.installed and set(voice.languages) == MODEL_LANGUAGES

    clip = make_clip(tmp_path / "bob.wav", seconds=5)
    with clip.open("rb") as f:
        r = httpx.post(srv.url + "/api/voices", data={"name": "bob"}, files={"files": ("bob.wav", f)}, timeout=120)
    assert r.status_code == 201, r.text
    assert "bob" in {v.name for v in describe().tts[0].voices}
    assert httpx.delete(srv.url + "/api/voices/bob", timeout=30).status_code == 200
    assert {v.name for v in describe().tts[0].voices} == {"ana", "my_voice_sample"}


def test_ping_answers_pong(srv: ServerProcess) -> None:
    events = run(ask(srv, Ping(text="x").event(), until=("pong",)))
    assert events[-1].data.get("text") == "x"


# -- synthesize ----------------------------------------------------------------------------------------
def test_synthesize_without_a_voice_speaks_the_default_voice(srv: ServerProcess) -> None:
    before = len(wyoming_lines(srv))
    pcm = assert_audio(run(ask(srv, Synthesize(text="Hola. ¿Qué tal?").event())))
    line = log_line(srv, before)
    assert (line["voice"], line["language"], line["outcome"], line["kind"]) == ("my_voice_sample", "es", "ok", "synthesize")
    # The same audio as the HTTP stream of the same text and voice (greedy decoding: deterministic).
    assert pcm == http_pcm(srv, text="Hola. ¿Qué tal?", voice_sample="my_voice_sample", language="es")


def test_synthesize_with_a_named_voice_speaks_it_in_its_own_language(srv: ServerProcess) -> None:
    before = len(wyoming_lines(srv))
    pcm = assert_audio(run(ask(srv, Synthesize(text="Hello there.", voice=SynthesizeVoice(name="ana")).event())))
    line = log_line(srv, before)
    assert (line["voice"], line["language"]) == ("ana", "en")
    assert pcm == http_pcm(srv, text="Hello there.", voice_sample="ana")


def test_synthesize_with_a_voice_and_a_language(srv: ServerProcess) -> None:
    # Home Assistant sends the name only; other clients may add a language (wyoming's own SynthesizeVoice
    # keeps one of the two, so this is the raw event a client writes).
    event = Event(type="synthesize", data={"text": "Bonjour à tous.", "voice": {"name": "ana", "language": "fr-FR"}})
    before = len(wyoming_lines(srv))
    pcm = assert_audio(run(ask(srv, event)))
    line = log_line(srv, before)
    assert (line["voice"], line["language"]) == ("ana", "fr")
    assert pcm == http_pcm(srv, text="Bonjour à tous.", voice_sample="ana", language="fr")


def test_synthesize_with_a_language_only_speaks_the_default_voice_in_it(srv: ServerProcess) -> None:
    before = len(wyoming_lines(srv))
    assert_audio(run(ask(srv, Synthesize(text="Guten Tag.", voice=SynthesizeVoice(language="de")).event())))
    line = log_line(srv, before)
    assert (line["voice"], line["language"]) == ("my_voice_sample", "de")


def test_each_sentence_streams_as_it_is_generated(srv: ServerProcess) -> None:
    """Three sentences: audio arrives in several events, and the access log's first audio came well before
    the whole synthesis was done."""
    before = len(wyoming_lines(srv))
    events = run(ask(srv, Synthesize(text="Uno. Dos. Tres.").event()))
    assert_audio(events)
    assert sum(AudioChunk.is_type(e.type) for e in events) >= 3
    line = log_line(srv, before)
    assert float(line["ttfa_seconds"]) < float(line["duration_seconds"]) / 2, line


def test_metrics_count_wyoming_requests(srv: ServerProcess) -> None:
    key = 'tts_wyoming_requests_total{"kind": "synthesize", "outcome": "ok"}'
    before = metrics(srv).get(key, 0)
    assert_audio(run(ask(srv, Synthesize(text="Hola.").event())))
    # Counted just after the last event went out.
    after = wait_for(lambda: m if (m := metrics(srv)).get(key, 0) > before else None, "the request to be counted", 30)
    assert after[key] == before + 1
    assert after.get('tts_time_to_first_audio_seconds_count{"route": "wyoming synthesize"}', 0) >= 1


# -- streaming text input ------------------------------------------------------------------------------
async def stream_text(server: ServerProcess, voice: dict[str, str] | None, pieces: list[str],
                      wait_first_audio: bool = True) -> tuple[list[Event], int]:
    """What Home Assistant does with a language model's answer: synthesize-start, the text in pieces, the whole
    text again as `synthesize` (for old servers), synthesize-stop; audio read meanwhile. With `wait_first_audio`
    the last piece is held back until the first sentence's audio arrived. Returns the events and how many had
    arrived when the last piece was sent."""
    async with client(server) as c:
        voice_data = {"voice": voice} if voice else {}  # raw: SynthesizeVoice keeps the name or the language
        await c.write_event(Event(type="synthesize-start", data=voice_data))
        for piece in pieces[:-1]:
            await c.write_event(SynthesizeChunk(text=piece).event())
        events = await read_until(c, "audio-chunk", "error") if wait_first_audio else []
        arrived = len(events)
        await c.write_event(SynthesizeChunk(text=pieces[-1]).event())
        await c.write_event(Event(type="synthesize", data={"text": "".join(pieces), **voice_data}))
        await c.write_event(SynthesizeStop().event())
        events += await read_until(c, "synthesize-stopped")
        return events, arrived


def split_sentences(events: list[Event]) -> list[list[Event]]:
    """audio-start ... audio-stop groups (one per sentence); asserts nothing else but synthesize-stopped."""
    groups, current = [], None
    for e in events:
        if e.type == "audio-start":
            assert current is None, "audio-start inside a sentence"
            current = [e]
        elif e.type in ("audio-chunk", "audio-stop"):
            assert current is not None, f"{e.type} outside a sentence"
            current.append(e)
            if e.type == "audio-stop":
                groups.append(current)
                current = None
        else:
            assert e.type == "synthesize-stopped" and e is events[-1], [x.type for x in events]
    return groups


def test_streaming_text_speaks_each_sentence_before_the_text_ends(srv: ServerProcess) -> None:
    pieces = ["Hola, ", "¿qué tal", " estás? Hoy", " hace sol", ". Adiós."]
    before = len(wyoming_lines(srv))
    events, arrived = run(stream_text(srv, {"name": "ana", "language": "es"}, pieces))
    assert arrived >= 2  # audio-start and a chunk of the first sentence, before the last piece was even sent
    sentences = split_sentences(events)
    assert len(sentences) == 3  # the trailing `synthesize` (the whole text again) is not spoken twice
    for sentence in sentences:
        assert_audio(sentence)
    line = log_line(srv, before)
    assert (line["kind"], line["outcome"], line["voice"], line["language"]) == ("stream", "ok", "ana", "es")
    assert int(line["characters"]) == len("".join(pieces))
    # Same audio as the one-shot request of the same sentences.
    first = pcm_of(sentences[0])
    assert first == http_pcm(srv, text="Hola, ¿qué tal estás?", voice_sample="ana", language="es")


def test_streaming_text_without_a_voice_uses_the_default(srv: ServerProcess) -> None:
    before = len(wyoming_lines(srv))
    events, _ = run(stream_text(srv, None, ["Buenos", " días."], wait_first_audio=False))
    assert len(split_sentences(events)) == 1
    assert log_line(srv, before)["voice"] == "my_voice_sample"


def test_streaming_errors_end_with_synthesize_stopped(srv: ServerProcess) -> None:
    """An unknown voice at synthesize-start: an error, then the stream still ends as the protocol says
    (Home Assistant reads until synthesize-stopped). An empty stream: an error too."""
    events, _ = run(stream_text(srv, {"name": "nobody"}, ["Hola."], wait_first_audio=False))
    assert [e.type for e in events] == ["error", "synthesize-stopped"]
    assert_error(events[:1], "voice_not_found", "nobody", "my_voice_sample")
    events, _ = run(stream_text(srv, None, [" "], wait_first_audio=False))
    assert [e.type for e in events] == ["error", "synthesize-stopped"]
    assert_error(events[:1], "invalid_text", "empty")
    assert_still_works(srv)


# -- concurrency and disconnects -----------------------------------------------------------------------
def test_two_clients_at_once(srv: ServerProcess) -> None:
    async def one(text: str, voice: str) -> list[tuple[float, Event]]:
        async with client(srv) as c:
            await c.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
            timed = []
            while True:
                event = await read(c)
                assert event is not None
                timed.append((time.monotonic(), event))
                if event.type in ("audio-stop", "error"):
                    return timed

    async def both():
        return await asyncio.gather(one("Uno. Dos.", "ana"), one("Tres. Cuatro.", "my_voice_sample"))

    a, b = run(both())
    pcm_a, pcm_b = assert_audio([e for _, e in a]), assert_audio([e for _, e in b])
    assert pcm_a != pcm_b
    # Served together, not one after the other: each got audio before the other's ended.
    assert a[1][0] < b[-1][0] and b[1][0] < a[-1][0]


def test_busy_and_a_client_that_leaves_mid_audio(srv: ServerProcess) -> None:
    """Two long syntheses fill both slots (no queue): a third request gets a `busy` error on a connection that
    stays usable. The two clients hang up mid-audio: their generation stops and their places are free, so
    the same third connection is then served."""
    async def scenario() -> tuple[list[Event], list[Event], dict[str, float], dict[str, float]]:
        long_clients = [client(srv), client(srv)]
        for c in long_clients:
            await c.connect()
            await c.write_event(Synthesize(text=LONG_SENTENCE, voice=SynthesizeVoice(name="ana")).event())
        for c in long_clients:
            await read_until(c, "audio-chunk")  # both are generating
        during = await asyncio.to_thread(metrics, srv)
        async with client(srv) as third:
            await third.write_event(Synthesize(text="Hola.").event())
            refused = await read_until(third, "audio-stop", "error")
            for c in long_clients:
                await c.disconnect()
            # The places are given back at once, the slots at the scheduler's next step.
            await asyncio.to_thread(wait_for, lambda: (m := metrics(srv))["tts_requests_in_progress"] == 0
                                    and m["tts_batch_slots_busy"] == 0, "the clients that left to be freed", 60)
            after = await asyncio.to_thread(metrics, srv)
            await third.write_event(Synthesize(text="Hola.").event())
            served = await read_until(third, "audio-stop", "error")
        return refused, served, during, after

    refused, served, during, after = run(scenario())
    assert during["tts_requests_in_progress"] == 2 and during["tts_batch_slots_busy"] >= 1
    assert_error(refused, "busy", "busy", "TTS_MAX_QUEUE")
    assert_audio(served)
    assert after["tts_batch_slots_busy"] == 0
    # Generation stopped: far fewer decode steps than the two sentences would take (hundreds of tokens each).
    steps = after["tts_batch_steps_total"] - during["tts_batch_steps_total"]
    assert steps < 100, steps
    lines = [line for line in srv.log().splitlines() if "protocol=wyoming" in line and "client_closed_request" in line]
    assert len(lines) >= 2, srv.log()[-3000:]
    assert "Traceback" not in srv.log()


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("event", "code", "words"), [
    (Synthesize(text="Hola.", voice=SynthesizeVoice(name="nobody")).event(), "voice_not_found", ("nobody", "ana")),
    (Event(type="synthesize", data={"text": "Hola.", "voice": {"name": "ana", "language": "xx"}}),
     "unsupported_language", ("xx", "Supported languages")),
    (Synthesize(text="Hola.", voice=SynthesizeVoice(language="klingon")).event(), "unsupported_language", ("klingon",)),
    (Synthesize(text="").event(), "invalid_text", ("empty",)),
    (Synthesize(text="   \n ").event(), "invalid_text", ("empty",)),
    (Event(type="synthesize", data={}), "invalid_text", ("text",)),
    (Event(type="synthesize", data={"text": 5}), "invalid_text", ("text",)),
    (Event(type="synthesize", data={"text": "Hola.", "voice": "ana"}), "invalid_event", ("voice",)),
    (Event(type="synthesize", data={"text": "Hola.", "voice": {"name": 3}}), "invalid_event", ("voice.name",)),
    (Synthesize(text="x" * 6000).event(), "text_too_long", ("5000",)),
    (SynthesizeChunk(text="Hola.").event(), "invalid_event", ("synthesize-start",)),
    (SynthesizeStop().event(), "invalid_event", ("synthesize-start",)),
])
def test_errors_are_error_events_and_the_connection_keeps_working(srv: ServerProcess, event: Event, code: str,
                                                                   words: tuple[str, ...]) -> None:
    async def scenario() -> tuple[list[Event], list[Event]]:
        async with client(srv) as c:
            await c.write_event(event)
            error = await read_until(c, "error", "audio-stop")
            await c.write_event(Synthesize(text="Hola.").event())  # the same connection, next request
            return error, await read_until(c, "audio-stop", "error")

    error, after = run(scenario())
    assert len(error) == 1
    assert_error(error, code, *words)
    assert_audio(after)


def test_malformed_bytes_get_an_error_and_the_connection_is_closed(srv: ServerProcess) -> None:
    """A stream of bytes that is not Wyoming (cannot be resynchronized): an error event, then the server
    closes that connection; the server itself keeps serving."""
    port = wyoming_port(srv)
    cases = [b"this is not json\n", b'{"type": "synthesize", "data_length": 999999999}\n', b"[1, 2]\n",
             b'{"type": "synthesize", "data_length": 3}\n[1]']
    for raw in cases:
        with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as s:
            s.sendall(raw)
            received = b""
            while chunk := s.recv(65536):
                received += chunk
        header = json.loads(received.split(b"\n", 1)[0])
        assert header["type"] == "error", received
        data = json.loads(received.split(b"\n", 1)[1][:header["data_length"]])
        assert data["code"] in ("invalid_event", "event_too_large") and data["text"], data
    assert_still_works(srv)


# -- startup ---------------------------------------------------------------------------------------------
def test_before_the_model_is_ready_requests_get_an_error(start_server: Callable[..., ServerProcess]) -> None:
    port = free_port()
    server = start_server({"TTS_WYOMING_URI": f"tcp://127.0.0.1:{port}"}, wait_ready=False)

    async def describe() -> list[Event] | None:
        try:
            async with AsyncTcpClient("127.0.0.1", port) as c:
                await c.write_event(Describe().event())
                return await read_until(c, "info", "error")
        except OSError:
            return None

    events = wait_for(lambda: run(describe()), "the Wyoming port to open", 60)
    assert_error(events, "model_not_ready", "not loaded yet")
    assert server.proc.poll() is None
    server.proc.kill()


def test_a_taken_wyoming_address_stops_the_server_with_a_clear_message(start_server: Callable[..., ServerProcess]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server({"TTS_WYOMING_URI": f"tcp://127.0.0.1:{port}"}, run=False)
        server.start(wait_ready=False)
        assert server.proc.wait(120) == 1
    assert f"Cannot listen for Wyoming on tcp://127.0.0.1:{port}" in server.log()


@pytest.mark.parametrize("uri", ["tcp://127.0.0.1", "http://127.0.0.1:10200", "tcp://:10200"])
def test_a_bad_wyoming_uri_is_a_startup_error(start_server: Callable[..., ServerProcess], uri: str) -> None:
    server = start_server({"TTS_WYOMING_URI": uri}, run=False)
    server.start(wait_ready=False)
    assert server.proc.wait(60) == 2
    assert "TTS_WYOMING_URI" in server.log()


def test_with_an_api_key_wyoming_is_refused_on_a_network_address(start_server: Callable[..., ServerProcess]) -> None:
    """Wyoming cannot carry the key: with one set, a network address is a startup error saying what to do."""
    server = start_server({"TTS_API_KEY": "k" * 20, "TTS_WYOMING_URI": "tcp://0.0.0.0:10299"}, run=False)
    server.start(wait_ready=False)
    assert server.proc.wait(60) == 2
    log = server.log()
    assert "Invalid settings: TTS_API_KEY is set" in log and "TTS_WYOMING_WITHOUT_KEY=true" in log
    assert "k" * 20 not in log
