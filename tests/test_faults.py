"""Faults survived: failures inside the engine, a corrupt or unwritable disk cache, SIGKILL in the middle
of writes. Faults are injected from outside the production code by tests/fault_plugin/sitecustomize.py
(loaded by the server subprocess through PYTHONPATH)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from helpers import WAV_HEADER, ROOT, ServerProcess, ffmpeg_decode, make_clip, metrics, wait_for, wav_info

FAULT_PLUGIN = str(ROOT / "tests" / "fault_plugin")


def visible_tree(root: Path) -> dict[str, bytes]:
    """Every file a reader could pick up: hidden (dot) entries excluded, contents included."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        out[rel.as_posix()] = path.read_bytes()
    return out


# -- exceptions inside the engine -----------------------------------------------------------------
@pytest.fixture(scope="module")
def faulty(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server whose engine fails when a sentence holds a marker word (see the fault plugin)."""
    srv = ServerProcess(tmp_path_factory.mktemp("faulty"), tiny_model_dir,
                        {"PYTHONPATH": FAULT_PLUGIN, "FAULT_TEXT": "1", "TTS_WORKERS": "1", "TTS_MAX_QUEUE": "8"})
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("marker, kind", [("faultruntime", "RuntimeError"), ("faultoom", "OutOfMemoryError")])
def test_engine_exception_fails_one_batch_request_and_the_next_succeeds(faulty, marker, kind):
    with faulty.client() as client:
        r = client.post("/api/tts/batch", json={"text": f"Hola {marker}.", "voice_sample": "ana"})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "synthesis_failed" and kind in err["message"] and err["hint"]
        ok = client.post("/api/tts/batch", json={"text": "Hola mundo.", "voice_sample": "ana"})
        assert ok.status_code == 200 and wav_info(ok.content)[2] > 0
        g = metrics(client)
    assert g["tts_workers_busy"] == 0 and g["tts_requests_in_progress"] == 0
    assert "Synthesis failed" in faulty.log()


def _stream(client: httpx.Client, text: str) -> tuple[int, bytes, bool]:
    """(status, bytes received, whether the body ended cleanly)."""
    data = b""
    with client.stream("POST", "/api/tts/stream", json={"text": text, "voice_sample": "ana"}) as r:
        try:
            for chunk in r.iter_bytes():
                data += chunk
        except httpx.HTTPError:
            return r.status_code, data, False
    return r.status_code, data, True


def _stream_own_client(srv: ServerProcess, text: str) -> tuple[int, bytes, bool]:
    with srv.client() as client:
        return _stream(client, text)


@pytest.mark.parametrize("text", ["Hola faultlate.", "Hola faultruntime.", "Primera frase. Segunda faultlate."])
def test_engine_exception_ends_a_stream_and_the_next_succeeds(faulty, text):
    same_size = text.replace("fault", "fauxt")  # same length, no marker
    with faulty.client() as client:
        status, broken, _clean = _stream(client, text)
        assert status == 200  # the header had gone out: the stream ends early instead
        status, full, clean = _stream(client, same_size)
        assert status == 200 and clean
        g = metrics(client)
    assert WAV_HEADER <= len(broken) < len(full)
    assert ffmpeg_decode(full)[1] > 0
    assert g["tts_workers_busy"] == 0 and g["tts_requests_in_progress"] == 0


def test_a_fault_in_one_batched_sentence_fails_only_its_request(faulty):
    """Two streams in one batch: the one whose decoding fails ends early, the other is untouched."""
    long_text = " ".join(f"Frase número {n} sin problemas." for n in range(1, 9))
    with faulty.client() as client:
        _, expected, clean = _stream(client, long_text)
        assert clean
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            beside = pool.submit(_stream_own_client, faulty, long_text)
            wait_for(lambda: metrics(client)["tts_batch_slots_busy"] >= 1, "the long stream running")
            status, broken, _ = _stream(client, "Hola faultlate.")
            assert status == 200 and WAV_HEADER <= len(broken) < len(expected)
            status, data, clean = beside.result()
        assert status == 200 and clean and len(data) == len(expected), "a fault in another sentence cut this stream"
        same = np.frombuffer(expected[WAV_HEADER:], np.int16).astype(float)
        noise = same - np.frombuffer(data[WAV_HEADER:], np.int16)
        assert not noise.any() or 10 * np.log10(np.sum(same**2) / np.sum(noise**2)) > 60, "the stream beside changed"
        wait_for(lambda: metrics(client)["tts_requests_in_progress"] == 0, "all requests released", 30)
        assert metrics(client)["tts_batch_slots_busy"] == 0


def test_a_fault_in_the_batched_step_fails_its_requests_and_the_replica_goes_on(faulty):
    long_text = " ".join(f"Frase número {n} sin problemas." for n in range(1, 9))
    with faulty.client() as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            beside = pool.submit(_stream_own_client, faulty, long_text)
            wait_for(lambda: metrics(client)["tts_batch_slots_busy"] >= 1, "the long stream running")
            status, broken, _ = _stream(client, "Hola faultstep.")
            assert beside.result()[0] == 200  # in the failed step or not, it ended and let go of its slot
        status_full, full, clean = _stream(client, "Hola fauxtstep.")  # same size, no marker
        assert status == 200 and status_full == 200 and clean and len(broken) < len(full)  # ended early
        assert "simulated failure in the batched step" in faulty.log()
        wait_for(lambda: metrics(client)["tts_requests_in_progress"] == 0, "all requests released", 30)
        assert metrics(client)["tts_batch_slots_busy"] == 0
        for _ in range(2):  # the replica keeps serving
            ok = client.post("/api/tts/batch", json={"text": "Todo bien. Sigue.", "voice_sample": "ana"})
            assert ok.status_code == 200 and wav_info(ok.content)[2] > 0


def test_many_failing_requests_at_once_leave_no_worker_locked(faulty):
    """Twelve failing requests, six at a time (the line holds 8 + the slots: none is refused). Each gets exactly
    its own failure: a batch answers 500, a stream has sent its 200 header and ends early."""
    def one(i: int) -> int:
        with faulty.client() as client:
            text = "Hola faultruntime." if i % 2 else "Hola faultlate."
            if i % 3 == 0:
                return _stream(client, text)[0]
            return client.post("/api/tts/batch", json={"text": text, "voice_sample": "ana"}).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(one, range(12)))
    assert statuses == [200 if i % 3 == 0 else 500 for i in range(12)], statuses
    with faulty.client() as client:
        wait_for(lambda: metrics(client)["tts_requests_in_progress"] == 0, "all requests to be released", 120)
        g = metrics(client)
        assert g["tts_workers_busy"] == 0 and g["tts_queue_depth"] == 0
        ok = client.post("/api/tts/batch", json={"text": "Todo bien.", "voice_sample": "ana"})
        assert ok.status_code == 200
    # The line refusing when full (503 busy + Retry-After) is proven deterministically in test_service_unit.py.


# -- the disk cache -------------------------------------------------------------------------------
def test_corrupt_cache_entries_are_discarded_and_recomputed(start_server):
    srv = start_server(run=False)
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    make_clip(srv.voices_dir / "bob.mp3", seconds=6, freq=140)
    srv.start()
    body = {"text": "Hola mundo.", "voice_sample": "ana"}
    with srv.client() as client:
        first = {v: client.post("/api/tts/batch", json={**body, "voice_sample": v}).content for v in ("ana", "bob")}
    srv.stop()
    latents = sorted((srv.cache_dir / "latents").rglob("*.pt"))
    clips = sorted((srv.cache_dir / "clips").glob("*.npy"))
    assert len(latents) == 2 and len(clips) == 2
    # ana's latents truncated, bob's empty; one decoded clip garbage, the other truncated
    latents[0].write_bytes(latents[0].read_bytes()[: latents[0].stat().st_size // 2])
    latents[1].write_bytes(b"")
    clips[0].write_bytes(b"\x93NUMPY garbage" * 10)
    clips[1].write_bytes(clips[1].read_bytes()[:100])
    srv.start()
    with srv.client() as client:
        again = {v: client.post("/api/tts/batch", json={**body, "voice_sample": v}) for v in ("ana", "bob")}
    for v, r in again.items():
        assert r.status_code == 200, r.text
        assert r.content == first[v]  # recomputed: the same conditioning, so the same (greedy) audio
    log = srv.log()
    assert log.count("Discarding unreadable cache entry") == 2
    assert log.count("Discarding unreadable decoded clip") == 2
    for path in latents:  # rewritten whole
        data = torch.load(path, map_location="cpu", weights_only=True)
        assert {"gpt_cond_latent", "speaker_embedding"} <= set(data)
    for path in clips:
        assert np.load(path, allow_pickle=False).size > 16000


def _deny_env(kind: str, cache_dir: Path) -> dict[str, str]:
    return {"PYTHONPATH": FAULT_PLUGIN, "FAULT_DENY_DIR": str(cache_dir), "FAULT_DENY_ERRNO": kind}


@pytest.mark.parametrize("kind", ["EROFS", "ENOSPC", "not-a-directory", "chmod"])
def test_unwritable_cache_does_not_stop_synthesis(start_server, kind, tmp_path):
    srv = start_server(run=False)
    if kind == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions (EROFS covers a read-only cache as root)")
        srv.cache_dir.mkdir(parents=True)
        srv.cache_dir.chmod(0o555)
    elif kind == "not-a-directory":
        srv.cache_dir.write_text("not a directory")
    else:
        srv.cache_dir.mkdir(parents=True)
        srv.env.update(_deny_env(kind, srv.cache_dir))
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    upload = make_clip(tmp_path / "bob.wav", seconds=6, freq=140)
    try:
        srv.start()
        with srv.client() as client:
            for _ in range(2):
                r = client.post("/api/tts/batch", json={"text": "Hola mundo.", "voice_sample": "ana"})
                assert r.status_code == 200, r.text
            s = client.post("/api/tts/stream", json={"text": "Hola.", "voice_sample": "ana"})
            assert s.status_code == 200 and ffmpeg_decode(s.content)[1] > 0
            c = client.post("/api/config", json={"voice_sample": "ana", "language": "es"})
            assert c.status_code == 200, c.text
            with upload.open("rb") as f:
                u = client.post("/api/voices", data={"name": "bob"}, files={"files": ("bob.wav", f, "audio/wav")})
            assert u.status_code == 201, u.text
            assert client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "bob"}).status_code == 200
    finally:
        if kind == "chmod":
            srv.cache_dir.chmod(0o755)
    if kind == "not-a-directory":
        assert srv.cache_dir.read_text() == "not a directory"
    else:
        assert visible_tree(srv.cache_dir) == {}
    assert "Voice cache not written" in srv.log()


# -- SIGKILL in the middle of writes ----------------------------------------------------------------
def _kill(srv: ServerProcess) -> None:
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(30)
    srv.stop()


def _restart_clean(srv: ServerProcess) -> None:
    for key in [k for k in srv.env if k.startswith("FAULT_")] + ["PYTHONPATH"]:
        srv.env.pop(key, None)
    srv.start()


def _slow_multipart(name: str, clip: bytes, half_sent: threading.Event, release: threading.Event):
    boundary = "faultboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head + clip[: len(clip) // 2]
        half_sent.set()
        release.wait(60)  # never released: the server is killed first
        yield clip[len(clip) // 2:] + tail

    return body(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _post_in_background(url: str, **kwargs) -> threading.Thread:
    def run():
        try:
            httpx.post(url, timeout=120, **kwargs)
        except httpx.HTTPError:
            pass  # the server dies under it

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigkill_during_uploads_leaves_no_half_voice(start_server, tmp_path):
    """One upload killed while its body arrives, one killed at the moment it moves into place."""
    srv = start_server(run=False)
    mark = tmp_path / "paused"
    srv.env.update({"PYTHONPATH": FAULT_PLUGIN, "FAULT_PAUSE": str(srv.voices_dir / "*"), "FAULT_PAUSE_MARK": str(mark)})
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.start()
    before = visible_tree(srv.voices_dir)
    half_sent, release = threading.Event(), threading.Event()
    slow = make_clip(tmp_path / "carla.wav", seconds=8, freq=200).read_bytes()
    content, headers = _slow_multipart("carla", slow, half_sent, release)
    threads = [_post_in_background(srv.url + "/api/voices", content=content, headers=headers)]
    assert half_sent.wait(60)
    wait_for(lambda: any(p.stat().st_size for p in srv.voices_dir.glob(".upload-*/clips/*")), "the upload to be staged")
    bob = make_clip(tmp_path / "bob.wav", seconds=6, freq=140).read_bytes()
    threads.append(_post_in_background(srv.url + "/api/voices", data={"name": "bob"},
                                       files={"files": ("bob.wav", bob, "audio/wav")}))
    wait_for(lambda: mark.exists() and "bob" in mark.read_text(), "the upload to reach its final move", 120)
    _kill(srv)
    release.set()
    assert visible_tree(srv.voices_dir) == before  # nothing new a reader could pick up
    _restart_clean(srv)
    with srv.client() as client:
        assert [v["name"] for v in client.get("/api/voices").json()["voices"]] == ["ana"]
        for name in ("bob", "carla"):
            r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": name})
            assert r.status_code == 404, r.text
        # The same uploads now go through whole.
        r = client.post("/api/voices", data={"name": "bob"}, files={"files": ("bob.wav", bob, "audio/wav")})
        assert r.status_code == 201, r.text
        assert client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "bob"}).status_code == 200


def test_sigkill_during_cache_and_config_writes_leaves_no_half_file(start_server, tmp_path):
    srv = start_server(run=False)
    mark = tmp_path / "paused"
    cache = srv.cache_dir
    patterns = [str(cache / "latents" / "*"), str(cache / ".tmp-*.json"), str(cache / "defaults.json")]
    srv.env.update({"PYTHONPATH": FAULT_PLUGIN, "FAULT_PAUSE": os.pathsep.join(patterns), "FAULT_PAUSE_MARK": str(mark)})
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    cache.mkdir(parents=True)
    (cache / "defaults.json").write_text(json.dumps({"voice_sample": None, "language": "fr"}))
    srv.start()
    # A synthesis that has to condition 'ana': the latents are written to a temp file, then it hangs.
    _post_in_background(srv.url + "/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"})
    wait_for(lambda: mark.exists() and "latents" in mark.read_text(), "the cache write", 120)
    # A config change: its temp file is written, then it hangs (on the event loop: the server freezes).
    _post_in_background(srv.url + "/api/config", json={"language": "en"})
    wait_for(lambda: ".json" in mark.read_text(), "the config write")
    _kill(srv)
    assert json.loads((cache / "defaults.json").read_text()) == {"voice_sample": None, "language": "fr"}
    assert not [p for p in (cache / "latents").rglob("*.pt") if not p.name.startswith(".")]  # only the temp file
    leftovers = [p.name for p in cache.rglob(".tmp-*")]
    assert any(n.endswith(".json") for n in leftovers) and any(n.endswith(".pt") for n in leftovers)
    _restart_clean(srv)
    with srv.client() as client:
        assert client.get("/").json()["config"]["language"] == "fr"  # the old defaults, whole
        r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"})
        assert r.status_code == 200
    assert "Discarding" not in srv.log()  # no half file was ever read
    assert len([p for p in (cache / "latents").rglob("*.pt") if not p.name.startswith(".")]) == 1
