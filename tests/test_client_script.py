"""client_tests/stream_client.py, run non-interactively against the real server: it saves a WAV file
with a correct header, reports the time to first audio, and fails clearly on server errors."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import ROOT, WAV_HEADER, ServerProcess, ffmpeg_decode

CLIENT = ROOT / "client_tests" / "stream_client.py"


def run_client(server: ServerProcess, cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENT), "--url", server.url, *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL if stdin is None else None)


def check_wav(path: Path) -> float:
    """The file's header matches its data (sizes rewritten after the stream) and ffmpeg decodes it all."""
    data = path.read_bytes()
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
        frames = w.getnframes()
    assert frames * 2 == len(data) - WAV_HEADER, "the header's data size does not match the file"
    assert int.from_bytes(data[4:8], "little") == len(data) - 8, "the RIFF size does not match the file"
    rate, seconds = ffmpeg_decode(data)
    assert rate == 24_000 and seconds == pytest.approx(frames / 24_000, abs=1e-3)
    assert seconds > 0.5
    return seconds


@pytest.fixture
def default_voice(server: ServerProcess) -> Iterator[str]:
    """The session server with a default voice, restored to none afterwards."""
    r = httpx.post(server.url + "/api/config", json={"voice_sample": "ana.wav"}, timeout=120)
    assert r.status_code == 200, r.text
    yield "ana.wav"
    httpx.post(server.url + "/api/config", json={"voice_sample": None}, timeout=30)


def test_arguments(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "out" / "speech.wav"
    run = run_client(server, tmp_path, "--voice", "my_voice_sample.mp3", "--text", "Hola. Esta es una prueba.",
                     "--language", "es", "--output", str(out), "--no-play")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "First audio after" in run.stdout
    assert f"Saved to {out}" in run.stdout
    assert "s of audio" in run.stderr  # the progress indicator
    check_wav(out)


def test_stdin_answers_use_the_defaults(server: ServerProcess, tmp_path: Path, default_voice: str) -> None:
    """Empty answers: the server's default voice and the built-in sample text; saved to stream_output.wav.
    No audio device here: it says so instead of failing."""
    run = run_client(server, tmp_path, stdin="\n\n")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "(server default)" in run.stdout
    assert "no audio device available; saved to stream_output.wav" in run.stdout
    seconds = check_wav(tmp_path / "stream_output.wav")
    assert seconds > 2  # the sample text has several sentences


def test_answers_from_stdin(server: ServerProcess, tmp_path: Path) -> None:
    run = run_client(server, tmp_path, "--no-play", stdin="ana\nUna frase corta.\n")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Voice: ana | 16 characters" in run.stdout
    check_wav(tmp_path / "stream_output.wav")


def test_interactive_prompts(server: ServerProcess, tmp_path: Path) -> None:
    """On a terminal it asks for the voice and the text."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(CLIENT), "--url", server.url, "--no-play"], cwd=tmp_path,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(token: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while token not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            seen += os.read(master, 4096)

    try:
        read_until(b"Voice file name")
        os.write(master, b"my_voice_sample.mp3\n")
        read_until(b"Text to speak")
        os.write(master, b"Hola desde una terminal.\n")
        read_until(b"Saved to stream_output.wav")
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    assert b"First audio after" in seen
    check_wav(tmp_path / "stream_output.wav")


def test_server_error_is_clear(server: ServerProcess, tmp_path: Path) -> None:
    run = run_client(server, tmp_path, "--voice", "nobody.wav", "--text", "Hola.", "--no-play")
    assert run.returncode == 1
    assert "Server error 404 (voice_not_found): Unknown voice 'nobody.wav'" in run.stderr
    assert "Hint: " in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "stream_output.wav").exists()


def test_unreachable_server(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(CLIENT), "--url", "http://127.0.0.1:9", "--text", "Hola.", "--no-play"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "Could not stream from http://127.0.0.1:9" in run.stderr and "Traceback" not in run.stderr
