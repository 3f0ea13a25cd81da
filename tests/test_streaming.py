"""Streaming under stress against the real server: a client that leaves stops its generation, parallel
requests all succeed, `GET /` stays fast during a long synthesis; a model still loading or missing is a clear
error. (The validation refusals are in test_refusals_unit.py, on the fake engine.)"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from helpers import WAV_HEADER as HEADER
from helpers import BIN, ServerProcess, assert_error, ffmpeg_decode, make_clip, metrics, wait_for, wav_info

# One sentence with no stop: the server caps its audio in proportion to its length (~3 tokens per
# character), i.e. hundreds of tokens: tens of seconds of work on the tiny CPU model.
LONG_SENTENCE = ("Esta es una frase larguísima que el modelo tiene que decir de principio a fin sin parar, "
                 "hablando del mar y de las montañas y de los ríos y de las ciudades y de la gente que pasa")


def assert_still_serving(srv: ServerProcess) -> None:
    assert srv.proc.poll() is None, srv.log()[-3000:]
    r = httpx.get(srv.url + "/", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "online"


@pytest.fixture(scope="module")
def long_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A private server without the tests' small audio cap (long generations) and without a default voice."""
    srv = ServerProcess(tmp_path_factory.mktemp("long"), tiny_model_dir, {"TTS_MAX_AUDIO_TOKENS": "100000"})
    make_clip(srv.voices_dir / "long_voice.wav", seconds=5, rate=24000, channels=1)
    srv.start()
    yield srv
    srv.stop()


# -- disconnect -----------------------------------------------------------------------------------------
def test_disconnect_stops_generation(long_server: ServerProcess) -> None:
    """Counted in decode steps, not CPU rates or seconds (a busy machine is slow, not wrong)."""
    body = {"text": LONG_SENTENCE, "voice_sample": "long_voice"}
    with long_server.client() as c:
        assert c.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "long_voice"}).status_code == 200
        assert metrics(long_server)["tts_batch_slots_busy"] == 0, "the server is not idle before the test"
        steps_before = metrics(long_server)["tts_batch_steps_total"]
        received = chunks = 0
        with c.stream("POST", "/api/tts/stream", json=body) as r:
            assert r.status_code == 200, r.read()
            for piece in r.iter_raw():
                received += len(piece)
                chunks += received > HEADER
                if chunks >= 3:  # a few chunks in: the model is generating this sentence
                    break
            steps_at_leave = metrics(long_server)["tts_batch_steps_total"]
        # the connection is closed here, long before the sentence is done
    assert steps_at_leave > steps_before, "the server was not generating while streaming"
    # Generation stops within a chunk (the engine checks its cancel flag after every audio token): the sentence
    # leaves its slot instead of being worked through (hundreds of audio tokens: one step each).
    wait_for(lambda: metrics(long_server)["tts_requests_in_progress"] == 0
             and metrics(long_server)["tts_batch_slots_busy"] == 0, "the stream's slot freed", timeout=120)
    steps_after = metrics(long_server)["tts_batch_steps_total"] - steps_at_leave
    spoken_tokens = (received - HEADER) / 2 / 24_000 * 22_050 / 1024
    assert steps_after <= 96, f"{steps_after:.0f} decode steps after the client left ({spoken_tokens:.0f} streamed)"
    # Its worker is free again: a new request is served, and nothing failed on the way.
    r = httpx.post(long_server.url + "/api/tts/batch", json={"text": "Hola.", "voice_sample": "long_voice"}, timeout=120)
    assert r.status_code == 200, r.text
    assert "Traceback" not in long_server.log()


# -- responsiveness and concurrency ---------------------------------------------------------------------
def test_root_answers_fast_during_a_long_synthesis(long_server: ServerProcess) -> None:
    streaming, first_audio, stop = threading.Event(), threading.Event(), threading.Event()
    errors: list[str] = []

    def listen() -> None:
        try:
            with httpx.stream("POST", long_server.url + "/api/tts/stream", timeout=120,
                              json={"text": LONG_SENTENCE, "voice_sample": "long_voice"}) as r:
                if r.status_code != 200:
                    errors.append(r.read().decode())
                    return
                streaming.set()
                received = 0
                for piece in r.iter_raw():
                    received += len(piece)
                    if received > HEADER:
                        first_audio.set()
                    if stop.is_set():
                        return
                errors.append("the stream ended before the probes were done")
        except Exception as exc:  # reported by the test below
            errors.append(repr(exc))
        finally:
            first_audio.set()

    def probe_root(c: httpx.Client) -> list[float]:
        timings = []
        for _ in range(10):
            time.sleep(0.1)
            started = time.perf_counter()
            r = c.get("/")
            timings.append(time.perf_counter() - started)
            assert r.status_code == 200
        return sorted(timings)

    with httpx.Client(base_url=long_server.url, timeout=10) as c:
        idle = probe_root(c)  # the same probes with nothing running: this machine's own latency, now
        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        assert first_audio.wait(120)
        busy = probe_root(c)
    still_running = thread.is_alive()
    stop.set()
    thread.join(60)
    assert not errors, errors
    assert still_running, "the synthesis ended before the probes: nothing was measured"
    # The event loop is never blocked by the synthesis (a blocked loop answers after the sentence, seconds
    # later): probes take about what they take idle. Compared with the idle probes of this same moment,
    # so a busy machine (parallel test workers) slows both; one probe may be unlucky with the OS scheduler.
    allowed = max(0.05, 5 * statistics.median(idle))
    assert statistics.median(busy) < allowed, (busy, idle)
    assert busy[-2] < 2 * allowed, (busy, idle)


def test_parallel_requests_all_succeed(server: ServerProcess) -> None:
    requests = [
        ("batch", {"text": "Hola mundo. ¿Qué tal?", "voice_sample": "ana.wav"}),
        ("stream", {"text": "Buenos días a todos.", "voice_sample": "my_voice_sample.mp3"}),
        ("batch", {"text": "Good morning.", "voice_sample": "my_voice_sample", "language": "en"}),
        ("stream", {"text": "Una frase. Y otra frase.", "voice_sample": "ana"}),
        ("batch", {"text": "Adiós.", "voice_sample": "ana", "language": "es"}),
    ]

    def call(endpoint: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server.url}/api/tts/{endpoint}", json=body, timeout=180)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda args: call(*args), requests))
    for (endpoint, _), r in zip(requests, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.content[:4] == b"RIFF"
        assert ffmpeg_decode(r.content)[0] == 24_000
        if endpoint == "batch":
            assert wav_info(r.content)[:2] == (24_000, 1)
    assert_still_serving(server)


# -- refusals: every validation case is in test_refusals_unit.py (the fake engine); here only what needs a real
# server process: a model still loading, and no model at all.
def test_model_not_ready_yet(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server(wait_ready=False)
    deadline = time.monotonic() + 120
    while True:  # the port opens at once; the model loads in the background
        assert srv.proc.poll() is None, srv.log()
        assert time.monotonic() < deadline, srv.log()
        try:
            status = httpx.get(srv.url + "/", timeout=2).json()
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    assert status["status"] == "online" and status["model"] != "ready", status
    r = httpx.post(srv.url + "/api/tts/batch", json={"text": "Hola.", "voice_sample": "x"}, timeout=10)
    assert_error(r, 503, "model_not_ready")
    assert int(r.headers["retry-after"]) > 0
    assert srv.proc.poll() is None
    srv.proc.kill()  # no need to wait for the load to finish
    srv.stop()


def test_missing_model_is_a_clear_startup_error(tmp_path: Path) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    env = {**os.environ, "TTS_MODEL_DIR": str(empty), "TTS_VOICES_DIR": str(tmp_path / "voices"),
           "TTS_CACHE_DIR": str(tmp_path / "cache"), "TTS_PORT": "1", "TTS_DOWNLOAD": "false"}
    for extra in ({}, {"TTS_DOWNLOAD": "true", "TTS_ACCEPT_LICENSE": "false"}):
        run = subprocess.run([str(BIN / "offline-tts"), "serve"], env={**env, **extra}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stdout + run.stderr
        output = run.stdout + run.stderr
        assert str(empty) in output
        for name in ("config.json", "model.pth", "vocab.json", "speakers_xtts.pth"):
            assert name in output
        assert "Traceback" not in output
    assert not any(empty.iterdir()), "nothing may be written (or downloaded) without the license"
    shutil.rmtree(tmp_path / "voices", ignore_errors=True)
