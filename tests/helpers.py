"""Test helpers, one home for tests/ (and bench/, which may import them): make audio with ffmpeg, decode
what the server sends, run the real server as a subprocess, read its /metrics, check its error envelope."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WAV_HEADER = 44  # bytes of the server's WAV header (streamed or whole)
RATE = 24_000  # the XTTS output sample rate


def make_clip(path: Path, seconds: float = 6.0, freq: int = 180, rate: int = 44100, channels: int = 2,
              extra: list[str] | None = None) -> Path:
    """A voice-like test clip (a buzzy tone with vibrato + a little noise) in the format of `path`'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    src = (f"aevalsrc='0.3*sin(2*PI*{freq}*t+3*sin(2*PI*5*t))*(0.6+0.4*sin(2*PI*3*t))"
           f"+0.02*(random(0)-0.5)':s={rate}:d={seconds}")
    cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src, "-ac", str(channels)]
    if path.suffix == ".mp4":
        cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src, "-f", "lavfi", "-i",
               f"color=c=black:s=64x64:d={seconds}", "-ac", str(channels), "-shortest", "-pix_fmt", "yuv420p"]
    subprocess.run(cmd + (extra or []) + [str(path)], check=True)
    return path


def wav_info(data: bytes) -> tuple[int, int, int]:
    """(sample rate, channels, frames) of a complete WAV file."""
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getnchannels(), w.getnframes()


def ffmpeg_decode(data: bytes, fmt: str | None = None) -> tuple[int, float]:
    """Decode audio bytes completely with ffmpeg: (sample rate, duration in seconds). Fails on any error."""
    args = ["ffmpeg", "-v", "error", "-xerror"]
    if fmt:
        args += ["-f", fmt]
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=sample_rate", "-of", "csv=p=0", "-"],
                           input=data, capture_output=True, check=True)
    pcm = subprocess.run(args + ["-i", "-", "-f", "s16le", "-ac", "1", "-"], input=data, capture_output=True, check=True)
    assert not pcm.stderr.strip(), pcm.stderr.decode()
    rate = int(probe.stdout.decode().strip().splitlines()[0])
    return rate, len(pcm.stdout) / 2 / rate


def ffmpeg_decode_file(path: Path) -> int:
    """Decode a saved file completely with ffmpeg (any warning fails); returns the samples decoded."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "s16le", "-ac", "1", "-"],
                         capture_output=True, check=True)
    assert not out.stderr.strip(), out.stderr.decode()
    return len(out.stdout) // 2


def wav_stream_info(data: bytes) -> tuple[int, int, float]:
    """(sample rate, channels, seconds) of a WAV written as a stream (header sizes unknown), checked by hand:
    ffmpeg's -xerror flags the short last packet of such a file, so it is decoded leniently too."""
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt ", data[:16]
    fmt_tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[20:36])
    assert (fmt_tag, bits) == (1, 16) and data[36:40] == b"data"
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", "-", "-f", "s16le", "-"], input=data, capture_output=True,
                         check=True)
    assert len(out.stdout) == len(data) - WAV_HEADER
    return rate, channels, (len(data) - WAV_HEADER) / 2 / channels / rate


def decoded_seconds(data: bytes, rate: int = RATE) -> float:
    """How much audio a (possibly unfinished) stream already holds: decoded leniently, errors ignored."""
    out = subprocess.run(["ffmpeg", "-v", "quiet", "-i", "-", "-f", "s16le", "-ac", "1", "-ar", str(rate), "-"],
                         input=data, capture_output=True)
    return len(out.stdout) / 2 / rate


def pcm_seconds(wav: bytes, rate: int = RATE) -> float:
    """Seconds of 16-bit mono audio in a server WAV (header included)."""
    return (len(wav) - WAV_HEADER) / 2 / rate


def assert_error(response, status: int, code: str | None = None) -> dict:
    """A refusal (httpx or TestClient response): the right status and the JSON envelope saying what is wrong
    and how to fix it, never a traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["message"].strip() and error["hint"].strip(), error
    assert "Traceback" not in response.text
    if code:
        assert error["code"] == code, error
    return error


def metrics(target) -> dict[str, float]:
    """Every /metrics sample of a ServerProcess or an HTTP client (httpx.Client, TestClient):
    {"name": value} for unlabelled samples, {'name{"label": "v"}': value} for labelled ones."""
    if isinstance(target, ServerProcess):
        text = httpx.get(target.url + "/metrics", timeout=10).text
    else:
        text = target.get("/metrics").text
    return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def cache_counts(target) -> dict[str, float]:
    """The voice cache's counters: conditioning computed (misses), found (hits), of them loaded from disk."""
    m = metrics(target)
    return {k: m[f"tts_voice_cache_{k}_total"] for k in ("hits", "misses", "disk_hits")}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), inclusive method with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    if len(values) == 1 or q <= 0 or q >= 100:
        return values[0] if len(values) == 1 else (min(values) if q <= 0 else max(values))
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def dir_snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`, hidden ones included, with a hash of its content ("dir" for a folder)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def upload_voice(client, name: str | None, *paths: Path, replace: str | None = None):
    """POST /api/voices as a form: `name`, the clips as `files`, and `replace` if given (any HTTP client)."""
    data = {} if name is None else {"name": name}
    if replace is not None:
        data["replace"] = replace
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return client.post("/api/voices", data=data, files=files)


def wait_for(predicate, what: str, timeout: float = 60):
    """Poll `predicate` until it returns something truthy (returned), or fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The real service (`offline-tts serve`) in a subprocess, on a free loopback port."""

    def __init__(self, workdir: Path, model_dir: Path, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.voices_dir = workdir / "voices"
        self.cache_dir = workdir / "cache"
        self.voices_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "TTS_MODEL_DIR": str(model_dir),
            "TTS_VOICES_DIR": str(self.voices_dir),
            "TTS_CACHE_DIR": str(self.cache_dir),
            "TTS_HOST": "127.0.0.1",
            "TTS_PORT": str(self.port),
            "TTS_MAX_AUDIO_TOKENS": "24",
            "TTS_GREEDY": "true",
            "TTS_TORCH_THREADS": "1",
            "TTS_DOWNLOAD": "false",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True, timeout: float = 300) -> ServerProcess:  # ends once ready; a busy machine loads slowly
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([str(BIN / "offline-tts"), "serve"], cwd=self.workdir, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                key = self.env.get("TTS_API_KEY")
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                if httpx.get(self.url + "/", headers=headers, timeout=2).json().get("model") == "ready":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()
        return self.proc.returncode if self.proc else None

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)
