"""Shared fixtures: a tiny random-weight XTTS checkpoint (built once, cached between runs) and the real
server running on it as a subprocess."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import BIN, ROOT, ServerProcess, make_clip

REQUIRED = ("config.json", "model.pth", "vocab.json", "speakers_xtts.pth")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """`offline-tts random-model DIR --size tiny`, kept in .cache/ between runs (rebuilt if incomplete)."""
    path = Path(os.environ.get("TTS_TEST_MODEL_DIR", ROOT / ".cache" / "test-models" / "tiny"))
    if not all((path / f).is_file() for f in REQUIRED):
        subprocess.run([str(BIN / "offline-tts"), "random-model", str(path), "--size", "tiny"], check=True)
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
