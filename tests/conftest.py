"""Shared fixtures: a tiny random-weight XTTS checkpoint (built once, cached between runs) and the real
server running on it as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one torch thread each (set before torch is imported), else their
    # OpenMP threads wait on each other. The servers they start already use one (TTS_TORCH_THREADS=1).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import BIN, ROOT, ServerProcess, make_clip, wait_for
from offline_tts.engine.model_files import missing_model_files
from offline_tts.fileio import file_lock

_REAL_MODEL_FIXTURES = {"tiny_model_dir", "tiny_checkpoint", "server", "start_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test is `unit`, `e2e` (it needs the real tiny model) or `browser`, so `pytest -m unit` runs the fast
    layer alone. A test module may also mark itself (`pytestmark`)."""
    for item in items:
        if item.get_closest_marker("browser") or item.get_closest_marker("e2e") or item.get_closest_marker("unit"):
            continue
        real = _REAL_MODEL_FIXTURES & set(item.fixturenames)
        item.add_marker(pytest.mark.e2e if real else pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """`offline-tts random-model DIR --size tiny`, kept in .cache/ between runs (rebuilt if incomplete)."""
    path = Path(os.environ.get("TTS_TEST_MODEL_DIR", ROOT / ".cache" / "test-models" / "tiny"))
    with file_lock(path.parent / f".{path.name}.lock"):  # parallel test workers build it once
        if missing_model_files(path):
            subprocess.run([str(BIN / "offline-tts"), "random-model", str(path), "--size", "tiny"], check=True)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint written in-process with seed 0, in the session's temporary folder
    (test_model_files.py and test_download.py). Read-only."""
    from offline_tts.engine.random_model import write_random_checkpoint

    path = tmp_path_factory.getbasetemp() / "tiny-xtts-checkpoint"
    if missing_model_files(path):
        write_random_checkpoint(path, "tiny", seed=0, overwrite=True)
    return path


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real server for the session, with a few voices in several formats."""
    workdir = tmp_path_factory.mktemp("server")
    srv = ServerProcess(workdir, tiny_model_dir)
    make_clip(srv.voices_dir / "my_voice_sample.mp3", seconds=6)
    make_clip(srv.voices_dir / "ana.wav", seconds=6, freq=220, rate=16000, channels=1)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def start_server(tiny_model_dir: Path, tmp_path: Path):
    """Factory for a private server (tests that restart it or change its settings)."""
    started: list[ServerProcess] = []

    def start(env: dict[str, str] | None = None, *, run: bool = True, wait_ready: bool = True) -> ServerProcess:
        """A new server in its own directory; with run=False it is returned unstarted (add voices, then .start())."""
        srv = ServerProcess(tmp_path / f"srv{len(started)}", tiny_model_dir, env)
        started.append(srv)
        return srv.start(wait_ready=wait_ready) if run else srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def make_client(tmp_path: Path):
    """The app in-process, without a model (for what answers before the engine): make_client(**settings)."""
    from fastapi.testclient import TestClient

    from offline_tts.app import create_app
    from offline_tts.config import Settings

    def make(**settings) -> TestClient:
        s = Settings(voices_dir=tmp_path / "voices", cache_dir=tmp_path / "cache", model_dir=tmp_path / "model", **settings)
        return TestClient(create_app(s, engine_factory=lambda: None), raise_server_exceptions=False)

    return make


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Clips to upload, good and bad (made once): test_voices_api.py and the unit refusals."""
    d = tmp_path_factory.mktemp("clips")
    silent = d / "silent.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "5", str(silent)],
                   check=True)
    (d / "not_audio.wav").write_bytes(b"this is not audio at all\n" * 400)
    (d / "empty.mp3").write_bytes(b"")
    return {
        "mp3": make_clip(d / "bob.mp3", seconds=6, freq=150),
        "mp3b": make_clip(d / "fay.mp3", seconds=6, freq=160),
        "wav": make_clip(d / "carl.wav", seconds=5, freq=190, rate=16000, channels=1),
        "ogg": make_clip(d / "carl2.ogg", seconds=4, freq=170),
        "m4a": make_clip(d / "dee.m4a", seconds=5, freq=260),
        "noext": make_clip(d / "clip.flac", seconds=5, freq=210, rate=16000, channels=1).rename(d / "clip_without_extension"),
        "short": make_clip(d / "short.mp3", seconds=1),
        "long": make_clip(d / "long.mp3", seconds=25, freq=120, extra=["-b:a", "32k"]),
        "big": make_clip(d / "big.wav", seconds=6, rate=44100, channels=2),  # ~1 MB: over the tests' 300 kB upload limit
        "silent": silent,
        "not_audio": d / "not_audio.wav",
        "empty": d / "empty.mp3",
    }


@pytest.fixture(scope="session")
def voice_clip(tmp_path_factory: pytest.TempPathFactory):
    """voice_clip(freq) -> a 6 s test clip (WAV) made once per session per frequency (ffmpeg runs once)."""
    made: dict[float, Path] = {}
    folder = tmp_path_factory.mktemp("clips")

    def clip(freq: float) -> Path:
        if freq not in made:
            made[freq] = make_clip(folder / f"{freq}.wav", seconds=6, freq=freq)
        return made[freq]

    return clip


@pytest.fixture
def fake_app(tmp_path: Path, voice_clip):
    """The real app in-process on the fake engine (tests/fake_engine.py), started and ready:
    fake_app(engine=FakeEngine(...), **settings) -> (TestClient, engine). With `engines=[...]` (and
    workers=len(engines)) each replica gets its own engine; the first is returned. Closed at the end of the test."""
    from fastapi.testclient import TestClient

    from fake_engine import FakeEngine
    from offline_tts.app import create_app
    from offline_tts.config import Settings

    opened = []

    def make(engine: FakeEngine | None = None, voices: dict[str, float] | None = None,
             engines: list[FakeEngine] | None = None, **settings):
        replicas = iter(engines) if engines else None
        engine = engines[0] if engines else engine or FakeEngine()
        s = Settings(voices_dir=tmp_path / "voices", cache_dir=tmp_path / "cache", model_dir=tmp_path / "model",
                     **settings)
        s.voices_dir.mkdir(parents=True, exist_ok=True)
        for name, freq in (voices if voices is not None else {"ana": 220.0}).items():
            shutil.copyfile(voice_clip(freq), s.voices_dir / f"{name}.wav")
        factory = (lambda: next(replicas)) if replicas else (lambda: engine)
        client = TestClient(create_app(s, engine_factory=factory), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        wait_for(lambda: client.get("/ready").status_code == 200, "the fake engine to be ready", timeout=30)
        return client, engine

    yield make
    for client in opened:
        client.__exit__(None, None, None)
