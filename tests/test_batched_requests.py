"""Concurrent requests batched in one model replica (issue 10): each request's audio is what it would be
alone, whatever else runs in the batch, a client that leaves frees its slot at once, and a seed is
reproducible with concurrency. Real server, real HTTP clients; the tiny model decodes greedily (the
tests' default) unless a test says otherwise."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from helpers import ServerProcess, make_clip, metrics, wait_for

# Four requests: different voices, texts and lengths (several sentences each, so they overlap in the batch).
REQUESTS = [
    {"text": "Hola, esto es una prueba. Y una segunda frase.", "voice_sample": "ana"},
    {"text": "Otra voz, otro texto, bastante más largo que el primero. Con dos frases. Y tres.",
     "voice_sample": "my_voice_sample"},
    {"text": "Corta. Muy corta. Otra.", "voice_sample": "ana", "speed": 1.5},
    {"text": "La cuarta petición habla despacio y dice cosas distintas.", "voice_sample": "my_voice_sample",
     "speed": 0.8},
]


def stream_pcm(srv: ServerProcess, body: dict, started: threading.Event | None = None) -> bytes:
    """The stream's raw PCM; `started` is set once its first audio arrived."""
    data = b""
    with httpx.stream("POST", srv.url + "/api/tts/stream", json={**body, "format": "pcm"}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_bytes():
            data += chunk
            if started is not None:
                started.set()
    return data


def snr_db(reference: bytes, other: bytes) -> float:
    """How close `other` is to `reference` (16-bit PCM of the same length), in dB. A batched matrix product
    may round differently from a single row's (fp32), so equal audio can differ in the last bit."""
    assert len(reference) == len(other), "not the same length"
    ref = np.frombuffer(reference, dtype=np.int16).astype(np.float64)
    noise = ref - np.frombuffer(other, dtype=np.int16)
    return float("inf") if not noise.any() else 10 * np.log10(np.sum(ref**2) / np.sum(noise**2))


def test_concurrent_streams_are_batched_and_sound_as_each_alone(server: ServerProcess) -> None:
    alone = [stream_pcm(server, body) for body in REQUESTS]
    assert all(alone) and len(set(alone)) == len(alone)
    before = metrics(server)
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda body: stream_pcm(server, body), REQUESTS))
    after = metrics(server)
    steps = after["tts_batch_steps_total"] - before["tts_batch_steps_total"]
    rows = after["tts_batch_rows_total"] - before["tts_batch_rows_total"]
    assert rows > steps > 0, f"no step decoded two sentences at once ({rows:.0f} rows in {steps:.0f} steps)"
    for body, a, b in zip(REQUESTS, alone, together, strict=True):
        assert snr_db(a, b) > 60, f"{body['text'][:30]!r}: the audio changed when batched with others"


def test_a_stream_that_leaves_frees_its_slot_and_the_others_go_on(server: ServerProcess) -> None:
    long_body = {"text": " ".join(f"Frase número {n} de un texto largo." for n in range(1, 21)), "voice_sample": "ana"}
    other = REQUESTS[1]
    expected = stream_pcm(server, other)
    wait_for(lambda: metrics(server)["tts_batch_slots_busy"] == 0, "an idle server")
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=120) as client:
        with client.stream("POST", server.url + "/api/tts/stream", json={**long_body, "format": "pcm"}) as r:
            chunks = r.iter_bytes()
            assert next(chunks)  # the long stream is running
            beside = pool.submit(stream_pcm, server, other, started)
            assert started.wait(60)  # both are running
            assert next(chunks)
            at_leave = metrics(server)
        # the long stream's client hung up
        freed = wait_for(lambda: (m := metrics(server))["tts_batch_slots_busy"] <= 1 and m,
                         "the slot of the stream that left freed", timeout=120)
        assert snr_db(expected, beside.result()) > 60, "the stream beside changed when the other one left the batch"
    # Counted in decode steps, not seconds: the steps after the client left that decoded more than one sentence
    # (rows - steps) are those the leaving stream stayed for; its 20 sentences would need up to 20 x 24.
    steps = freed["tts_batch_steps_total"] - at_leave["tts_batch_steps_total"]
    shared = freed["tts_batch_rows_total"] - at_leave["tts_batch_rows_total"] - steps
    assert shared <= 24, f"the slot was held {shared:.0f} decode steps after its client left"
    wait_for(lambda: metrics(server)["tts_requests_in_progress"] == 0, "every place given back", timeout=10)
    wait_for(lambda: metrics(server)["tts_batch_slots_busy"] == 0, "every slot free", timeout=10)


def test_a_seed_reproduces_each_request_in_a_batch(start_server) -> None:
    srv = start_server({"TTS_WORKERS": "1", "TTS_SEED": "77", "TTS_GREEDY": "false"}, run=False)
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    make_clip(srv.voices_dir / "bea.wav", seconds=5, freq=260)
    srv.start()
    bodies = [REQUESTS[0], REQUESTS[1] | {"voice_sample": "bea"}, REQUESTS[2] | {"voice_sample": "bea"}]
    alone = [stream_pcm(srv, body) for body in bodies]
    assert stream_pcm(srv, bodies[0]) == alone[0]
    before = metrics(srv)
    with ThreadPoolExecutor(len(bodies)) as pool:
        for _ in range(2):
            together = list(pool.map(lambda body: stream_pcm(srv, body), bodies))
            for a, b in zip(alone, together, strict=True):  # another token drawn would be another sound
                assert snr_db(a, b) > 60, "a seeded request's audio changed with others in its batch"
    after = metrics(srv)
    assert (after["tts_batch_rows_total"] - before["tts_batch_rows_total"]
            > after["tts_batch_steps_total"] - before["tts_batch_steps_total"]), "the requests never shared a step"
