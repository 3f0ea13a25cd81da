"""The unit layer: the real app, service, pool and sessions in-process on the fake engine (tests/fake_engine.py).

Milliseconds per test: what the service decides (validation, admission, order of sentences, faults, defaults,
sessions) is tested here; what needs the real model stays in the end-to-end files."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading
import wave
from concurrent.futures import ThreadPoolExecutor

import pytest

from fake_engine import SAMPLE_RATE, SECONDS_PER_CHAR, FakeEngine
from helpers import metrics, wait_for
from offline_tts.errors import Busy, UnsupportedLanguage, VoiceNotFound
from offline_tts.speech_session import Cancelled, SentenceDone, SentenceFailed, SentenceStarted

pytestmark = pytest.mark.unit


def samples_of(*sentences: str, speed: float = 1.0) -> int:
    return sum(int(len(s) * SECONDS_PER_CHAR * SAMPLE_RATE / speed) for s in sentences)


def error_of(r) -> str:
    return r.json()["error"]["code"]


def test_batch_speaks_each_sentence_in_order_in_the_asked_language(fake_app):
    client, engine = fake_app()
    r = client.post("/api/tts/batch", json={"text": "Hola mundo.  Adiós,\n amigo.", "voice_sample": "ana",
                                            "language": "es-ES"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert r.headers["content-language"] == "es"
    with wave.open(io.BytesIO(r.content)) as w:
        assert w.getframerate() == SAMPLE_RATE and w.getnchannels() == 1
        assert w.getnframes() == samples_of("Hola mundo.", "Adiós, amigo.")
    assert engine.spoken[-2:] == [("Hola mundo.", "es"), ("Adiós, amigo.", "es")]


@pytest.mark.parametrize("route", ["/api/tts/stream", "/api/tts/batch"])
def test_pcm_has_exactly_the_generated_samples_and_speed_shortens_it(fake_app, route):
    client, _ = fake_app()
    body = {"text": "Uno dos tres.", "voice_sample": "ana", "format": "pcm"}
    normal = client.post(route, json=body).content
    fast = client.post(route, json=body | {"speed": 2.0}).content
    assert len(normal) == 2 * samples_of("Uno dos tres.")
    assert len(fast) == 2 * samples_of("Uno dos tres.", speed=2.0)


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"text": "   "}, 400, "invalid_text"),
    ({"text": "x" * 101}, 413, "text_too_long"),
    ({"text": "Hola.", "voice_sample": "nadie"}, 404, "voice_not_found"),
    ({"text": "Hola.", "voice_sample": "../etc/passwd"}, 400, "invalid_voice_name"),
    ({"text": "Hola.", "language": "xx"}, 400, "unsupported_language"),
    ({"text": "Hola.", "format": "ogg"}, 400, "unsupported_format"),
    ({"text": "Hola.", "speed": 9}, 422, "invalid_request"),
    ({"text": "Hola.\x00"}, 400, "invalid_text"),
])
def test_bad_requests_get_a_clear_error_and_nothing_is_spoken(fake_app, body, status, code):
    client, engine = fake_app(max_text_chars=100)
    spoken = len(engine.spoken)
    for route in ("/api/tts/batch", "/api/tts/stream"):
        r = client.post(route, json={"voice_sample": "ana"} | body)
        assert (r.status_code, error_of(r)) == (status, code), r.text
        assert r.json()["error"]["message"] and "Traceback" not in r.text
    assert len(engine.spoken) == spoken


def test_a_full_line_refuses_at_once_with_retry_after_and_frees_on_release(fake_app):
    client, _ = fake_app(max_queue=0, workers=1)  # one slot (the fake engine does not batch), no queue
    service = client.app.state.service
    job = client.portal.call(service.prepare, "Hola.", "ana", "es")  # holds the only place
    r = client.post("/api/tts/batch", json={"text": "Otra.", "voice_sample": "ana"})
    assert r.status_code == 503 and error_of(r) == "busy" and r.headers["retry-after"] == "2"
    with pytest.raises(Busy):
        client.portal.call(service.prepare, "Otra.", "ana", "es")
    job.release()
    assert client.post("/api/tts/batch", json={"text": "Otra.", "voice_sample": "ana"}).status_code == 200
    assert service.figures().requests_in_progress == 0


def test_a_model_fault_fails_that_request_only(fake_app):
    client, _ = fake_app(engine=FakeEngine(fail_on="BOOM"))
    r = client.post("/api/tts/batch", json={"text": "Hola. BOOM ahora.", "voice_sample": "ana"})
    assert r.status_code == 500 and error_of(r) == "synthesis_failed" and "BOOM" in r.json()["error"]["message"]
    assert client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"}).status_code == 200
    assert client.app.state.service.figures().requests_in_progress == 0


def test_the_default_voice_is_used_and_cleared_when_the_voice_is_deleted(fake_app):
    client, _ = fake_app(voices={"ana": 220.0, "bea": 330.0})
    assert client.post("/api/tts/batch", json={"text": "Hola."}).status_code == 400  # no voice, no default
    assert client.post("/api/config", json={"voice_sample": "bea"}).json()["config"]["voice_sample"] == "bea"
    assert client.post("/api/tts/batch", json={"text": "Hola."}).status_code == 200
    assert client.delete("/api/voices/bea").status_code in (200, 204)
    assert client.get("/").json()["config"]["voice_sample"] is None
    r = client.post("/api/tts/batch", json={"text": "Hola."})
    assert r.status_code == 400 and error_of(r) == "no_voice"


def test_openai_names_map_to_a_real_voice_and_usage_counts_audio_tokens(fake_app):
    client, _ = fake_app(voices={"zoe": 300.0, "ana": 220.0})
    r = client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hola mundo.",
                                              "response_format": "pcm"})
    assert r.status_code == 200 and len(r.content) == 2 * samples_of("Hola mundo.")
    service = client.app.state.service
    assert service.voice_for_openai_name("alloy").name == "ana"  # no default: the first voice by name
    assert service.voice_for_openai_name("zoe").name == "zoe"
    with pytest.raises(VoiceNotFound):
        service.voice_for_openai_name("nadie")
    r = client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "ana", "input": "Hola mundo.",
                                              "response_format": "pcm", "stream_format": "sse"})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    samples = len(audio) // 2
    assert samples == samples_of("Hola mundo.")
    assert events[-1]["usage"]["output_tokens"] == math.ceil(samples / SAMPLE_RATE * 22_050 / 1024)


# -- sessions: text that arrives in pieces -----------------------------------------------------------
async def collect(session, until=None) -> list:
    events = []
    async for event in session.events():
        events.append(event)
        if until is not None and until(event):
            break
    return events


def kinds(events: list) -> list:
    return [e.__class__.__name__ if not hasattr(e, "dtype") else "audio" for e in events]


def test_a_session_speaks_each_sentence_as_soon_as_it_is_complete(fake_app):
    client, engine = fake_app()
    service = client.app.state.service

    async def scenario():
        session = await service.open_session("ana", "es")
        consumer = asyncio.create_task(collect(session))
        before = len(engine.spoken)
        for token in "Hola, Sr. Pérez. El valor es 3.14 hoy".split(" "):
            session.feed(token + " ")
            await asyncio.sleep(0)
        async with asyncio.timeout(10):  # the first sentence is spoken before the input ends
            while len(engine.spoken) == before:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        spoken_before_close = [t for t, _ in engine.spoken[before:]]
        session.close()
        return spoken_before_close, await consumer

    spoken_before_close, events = client.portal.call(scenario)
    assert spoken_before_close == ["Hola, Sr. Pérez."]
    started = [e for e in events if isinstance(e, SentenceStarted)]
    done = [e for e in events if isinstance(e, SentenceDone)]
    assert [e.text for e in started] == ["Hola, Sr. Pérez.", "El valor es 3.14 hoy"]
    assert [e.audio_samples for e in done] == [samples_of("Hola, Sr. Pérez."), samples_of("El valor es 3.14 hoy")]
    assert kinds(events)[0] == "SentenceStarted" and kinds(events)[-1] == "SentenceDone"
    assert service.figures().requests_in_progress == 0


def test_cancel_stops_the_sentence_drops_the_queue_and_the_session_goes_on(fake_app):
    client, _ = fake_app(engine=FakeEngine(delay_per_chunk=0.05))
    service = client.app.state.service

    async def scenario():
        session = await service.open_session("ana", "es")
        session.feed("Una frase bastante larga para que dure un rato en el altavoz. Otra frase en cola. Y")
        first = await collect(session, until=lambda e: hasattr(e, "dtype"))  # its first audio
        session.cancel()
        session.feed("Después.")
        session.close()
        return first, await collect(session)

    first, rest = client.portal.call(scenario)
    assert kinds(first) == ["SentenceStarted", "audio"]
    assert isinstance(rest[0], Cancelled) and rest[0].dropped_sentences == 1
    assert [e.text for e in rest if isinstance(e, SentenceStarted)] == ["Después."]
    assert not any(isinstance(e, SentenceDone) and e.index == 0 for e in rest)
    pool = service.pool
    # the runner thread clears its slot just after delivering the last event: wait for that event, not a time
    wait_for(lambda: pool.busy_slots == 0 and pool.admitted == 0, "the slot and the place given back", timeout=30)


def test_a_session_sentence_is_refused_when_the_line_is_full_and_errors_are_per_sentence(fake_app):
    client, _ = fake_app(max_queue=0, workers=1)
    service = client.app.state.service
    with pytest.raises(UnsupportedLanguage):
        client.portal.call(service.open_session, "ana", "xx")

    async def scenario():
        session = await service.open_session("ana", "es")
        job = await service.prepare("Ocupado.", "ana", "es")  # the only place
        session.feed("Hola.")
        session.flush()
        refused = await collect(session, until=lambda e: isinstance(e, SentenceFailed))
        job.release()
        session.feed("Ahora sí.")
        session.close()
        return refused, await collect(session)

    refused, after = client.portal.call(scenario)
    assert isinstance(refused[-1].error, Busy)
    assert [e.text for e in after if isinstance(e, SentenceDone)] == ["Ahora sí."]


def test_clips_are_read_to_find_their_cache_key_only_when_they_change(fake_app, monkeypatch):
    from helpers import make_clip
    from offline_tts import voice_cache

    client, engine = fake_app()
    hashed = []
    real_digest = voice_cache.file_digest
    monkeypatch.setattr(voice_cache, "file_digest", lambda path: hashed.append(path.name) or real_digest(path))
    body = {"text": "Hola.", "voice_sample": "ana", "format": "pcm"}
    assert client.post("/api/tts/batch", json=body).status_code == 200
    conditioned, hashed_before = engine.conditioned, len(hashed)
    for _ in range(3):
        assert client.post("/api/tts/batch", json=body).status_code == 200
    assert len(hashed) == hashed_before and engine.conditioned == conditioned  # memo + cache: nothing read again
    settings = client.app.state.settings
    make_clip(settings.voices_dir / "ana.wav", seconds=7, freq=440)  # the clip rewritten in place
    assert client.post("/api/tts/batch", json=body).status_code == 200
    assert hashed[hashed_before:] == ["ana.wav"] and engine.conditioned == conditioned + 1


# -- replicas (TTS_WORKERS > 1) ------------------------------------------------------------------------
class GatedEngine(FakeEngine):
    """Holds every sentence at its start until `gate` is set (it is set during start-up's warm-up)."""

    def __init__(self, gate: threading.Event):
        super().__init__()
        self.gate = gate

    def _hold(self, text: str, language: str) -> None:
        self.spoken.append((text, language))
        self.gate.wait(30)
        self.spoken.pop()  # FakeEngine records it again

    def stream(self, text, language, conditioning, **kwargs):
        self._hold(text, language)
        yield from super().stream(text, language, conditioning, **kwargs)

    def synthesize(self, text, language, conditioning, **kwargs):
        self._hold(text, language)
        return super().synthesize(text, language, conditioning, **kwargs)


def test_two_replicas_each_take_a_sentence_and_the_line_grows_with_them(fake_app):
    gate = threading.Event()
    gate.set()
    engines = [GatedEngine(gate), GatedEngine(gate)]
    client, _ = fake_app(engines=engines, workers=2, max_queue=0)
    assert client.get("/ready").json()["workers"] == 2
    assert metrics(client)["tts_workers"] == 2
    before = [len(e.spoken) for e in engines]  # the warm-up ran on each replica
    gate.clear()
    with ThreadPoolExecutor(2) as pool:
        first, second = (pool.submit(client.post, "/api/tts/batch", json={"text": text, "voice_sample": "ana"})
                         for text in ("Primera.", "Segunda."))
        # Both run at once, one on each replica: neither waits for the other.
        wait_for(lambda: all(len(e.spoken) == n + 1 for e, n in zip(engines, before)), "a sentence on each replica",
                 timeout=30)
        assert client.get("/ready").json()["workers"] == 2
        assert metrics(client)["tts_workers_busy"] == 2
        # Two slots, no queue: a third request is refused at once, with a delay to retry after.
        refused = client.post("/api/tts/batch", json={"text": "Tercera.", "voice_sample": "ana"})
        assert refused.status_code == 503 and error_of(refused) == "busy" and int(refused.headers["retry-after"]) > 0
        gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    spoken = [[t for t, _ in e.spoken[n:]] for e, n in zip(engines, before)]
    assert sorted(spoken) == [["Primera."], ["Segunda."]]
    assert client.app.state.service.figures().requests_in_progress == 0


def test_max_queue_requests_wait_for_the_slot_and_the_next_is_refused(fake_app):
    """TTS_MAX_QUEUE=1 on one slot: one request runs, one waits, the third gets 503 busy + Retry-After at once;
    the waiting one is served when the slot frees."""
    gate = threading.Event()
    gate.set()
    engine = GatedEngine(gate)
    client, _ = fake_app(engine=engine, workers=1, max_queue=1)
    before = len(engine.spoken)
    gate.clear()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/api/tts/batch", json={"text": "Primera.", "voice_sample": "ana"})
        wait_for(lambda: len(engine.spoken) == before + 1, "the first request on the slot", timeout=30)
        waiting = pool.submit(client.post, "/api/tts/batch", json={"text": "Segunda.", "voice_sample": "ana"})
        wait_for(lambda: metrics(client)["tts_queue_depth"] == 1, "the second request waiting", timeout=30)
        refused = client.post("/api/tts/batch", json={"text": "Tercera.", "voice_sample": "ana"})
        assert refused.status_code == 503 and error_of(refused) == "busy"
        assert int(refused.headers["retry-after"]) > 0 and "TTS_MAX_QUEUE" in refused.json()["error"]["hint"]
        assert len(engine.spoken) == before + 1  # the second still waits: one slot
        gate.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert [t for t, _ in engine.spoken[before:]] == ["Primera.", "Segunda."]
