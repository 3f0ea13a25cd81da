"""Measurements through HTTP on the real server (`offline-tts serve` in a subprocess, loopback only).

Time to first audio is taken at the first byte *after* the WAV header (the header is sent at once).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from offline_tts.audio import wav_header
from tests.helpers import ServerProcess, percentile

from .common import (
    LANGUAGE,
    TOKENS_PER_SECOND,
    Timer,
    log,
    median,
    multi_sentence_text,
    text_for_tokens,
)

HEADER_BYTES = len(wav_header(24_000))
BYTES_PER_SECOND = 24_000 * 2  # PCM16 mono at 24 kHz


class Server(ServerProcess):
    """The tests' server process (tests/helpers.py) with the bench's settings: the caller's whole environment
    (model, voices, cache, tokens), quiet logs, a count of the synthesis requests sent, its RSS."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        super().__init__(workdir, Path(env["TTS_MODEL_DIR"]), {"TTS_LOG_LEVEL": "warning", **env})
        self.log_path = workdir / "server.log"
        self.requests = 0  # synthesis requests sent to this process

    def start(self, timeout: float = 900) -> float:
        """Start and wait until the model is loaded and warmed up; returns the seconds that took."""
        timer = Timer()
        super().start(timeout=timeout)
        self.requests = 0
        return timer()

    def rss_mb(self) -> float:
        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def stop(self, timeout: float = 60) -> int | None:
        return super().stop(timeout)

    def client(self, **kwargs) -> httpx.Client:
        return super().client(timeout=httpx.Timeout(900, connect=10), **kwargs)


@dataclass
class Result:
    status: int = 0
    ttfa_s: float | None = None  # first audio byte (after the WAV header)
    total_s: float = 0.0
    audio_s: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def stream(server: Server, client: httpx.Client, text: str, voice: str, *, first_audio_only: bool = False) -> Result:
    """POST /api/tts/stream; with `first_audio_only` the client hangs up at the first audio byte
    (the server then stops generating at its next token)."""
    server.requests += 1
    result, received = Result(), 0
    timer = Timer()
    try:
        with client.stream("POST", "/api/tts/stream", json={"text": text, "voice_sample": voice, "language": LANGUAGE}) as r:
            result.status = r.status_code
            if r.status_code != 200:
                result.error = r.read().decode(errors="replace")[:200]
                return result
            for data in r.iter_raw():
                received += len(data)
                if result.ttfa_s is None and received > HEADER_BYTES:
                    result.ttfa_s = timer()
                    if first_audio_only:
                        break
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.total_s = timer()
    result.audio_s = max(0, received - HEADER_BYTES) / BYTES_PER_SECOND
    return result


def batch(server: Server, client: httpx.Client, text: str, voice: str) -> Result:
    server.requests += 1
    result = Result()
    timer = Timer()
    try:
        r = client.post("/api/tts/batch", json={"text": text, "voice_sample": voice, "language": LANGUAGE})
        result.status = r.status_code
        if r.status_code == 200:
            result.audio_s = (len(r.content) - HEADER_BYTES) / BYTES_PER_SECOND
        else:
            result.error = r.text[:200]
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.total_s = result.ttfa_s = timer()
    return result


def settle() -> None:
    """Let a cancelled generation stop (the worker notices at its next token) before timing the next request."""
    time.sleep(0.25)


def ttfa(server: Server, voice: str, tokens: int, sentences: int, repeats: int) -> dict:
    """Time to first audio of a 1-sentence and an N-sentence text, interleaved; median of `repeats`."""
    one, many = text_for_tokens(tokens), multi_sentence_text(sentences, tokens)
    values: dict[str, list[float]] = {"1": [], str(sentences): []}
    with server.client() as client:
        for _ in range(repeats):
            for key, text in (("1", one), (str(sentences), many)):
                r = stream(server, client, text, voice, first_audio_only=True)
                if not r.ok:
                    raise RuntimeError(f"stream request failed: {r.status} {r.error}")
                values[key].append(r.ttfa_s)
                settle()
    return {"sentences": sentences, "text_chars": {"1": len(one), str(sentences): len(many)},
            "ttfa_s": {k: round(median(v), 3) for k, v in values.items()},
            "ttfa_runs_s": {k: [round(x, 3) for x in v] for k, v in values.items()}}


def stream_vs_batch(server: Server, voice: str, tokens: int) -> dict:
    text = text_for_tokens(tokens)
    with server.client() as client:
        s = stream(server, client, text, voice)
        b = batch(server, client, text, voice)
    for r in (s, b):
        if not r.ok:
            raise RuntimeError(f"request failed: {r.status} {r.error}")
        if abs(r.audio_s - tokens / TOKENS_PER_SECOND) > 0.1:
            log.warning("asked for %d tokens (%.2f s), got %.2f s of audio", tokens, tokens / TOKENS_PER_SECOND, r.audio_s)
    return {"tokens": tokens, "audio_s": round(s.audio_s, 2), "batch_audio_s": round(b.audio_s, 2),
            "stream_ttfa_s": round(s.ttfa_s, 3), "stream_total_s": round(s.total_s, 2), "batch_total_s": round(b.total_s, 2),
            "stream_over_batch": round(s.total_s / b.total_s, 3)}


def concurrency(server: Server, voice: str, clients: int, requests_each: int, tokens: int) -> dict:
    """`clients` threads, each sending `requests_each` streaming requests back to back."""
    text = text_for_tokens(tokens)
    results: list[Result] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_loop():
        with server.client() as client:
            start.wait()
            for _ in range(requests_each):
                r = stream(server, client, text, voice)
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    before = batch_metrics(server)
    start.wait()
    timer = Timer()
    for t in threads:
        t.join()
    wall = timer()
    after = batch_metrics(server)
    spent = {k: round(after[k] - before.get(k, 0), 2) if k != "join_stall_max_s" else after[k] for k in after}
    ok = [r for r in results if r.ok]
    ttfas = [r.ttfa_s for r in ok if r.ttfa_s is not None]
    audio = sum(r.audio_s for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_samples": sorted({f"{r.status} {r.error}" for r in results if not r.ok})[:3],
            "ttfa_p50_s": round(percentile(ttfas, 50), 3) if ttfas else None,
            "ttfa_p95_s": round(percentile(ttfas, 95), 3) if ttfas else None,
            "stream_rtf_p50": round(percentile([r.total_s / r.audio_s for r in ok if r.audio_s], 50), 3) if ok else None,
            "wall_s": round(wall, 2), "audio_s": round(audio, 2), "replica": spent,
            "throughput_audio_s_per_s": round(audio / wall, 3)}


BATCH_METRICS = {"tts_batch_steps_total": "steps", "tts_batch_rows_total": "rows",
                 "tts_batch_step_seconds_total": "gpt_step_s", "tts_batch_vocoder_seconds_total": "vocoder_s",
                 "tts_batch_join_stall_seconds_total": "join_stall_s", "tts_batch_join_stall_max_seconds": "join_stall_max_s"}


def batch_metrics(server: Server) -> dict[str, float]:
    """The replica's counters from /metrics: steps, rows, and where its thread's time went."""
    try:
        text = httpx.get(server.url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in BATCH_METRICS:
            out[BATCH_METRICS[name]] = float(value)
    return out


def set_default_voice(server: Server, voice: str) -> float:
    """POST /api/config with a voice: the server conditions it (or finds it cached) before answering; ms."""
    with server.client() as client:
        timer = Timer()
        r = client.post("/api/config", json={"voice_sample": voice})
        elapsed = 1000 * timer()
    if r.status_code != 200:
        raise RuntimeError(f"/api/config failed: {r.status_code} {r.text[:200]}")
    return round(elapsed, 1)


def top_up(server: Server, voice: str, target: int) -> int:
    """Short streaming requests, hung up at the first audio byte, until the server has had `target`."""
    sent = 0
    with server.client() as client:
        while server.requests < target:
            r = stream(server, client, "Hola.", voice, first_audio_only=True)
            if not r.ok:
                raise RuntimeError(f"request failed: {r.status} {r.error}")
            sent += 1
            settle()
    return sent


def metrics_snapshot(server: Server) -> dict:
    """A few lines of /metrics, if the server exposes them (for the record; optional)."""
    try:
        text = httpx.get(server.url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    keep = ("tts_first_audio_seconds_sum", "tts_first_audio_seconds_count", "tts_voice_cache")
    return {line.split(" ")[0]: line.split(" ")[-1] for line in text.splitlines()
            if line and not line.startswith("#") and line.startswith(keep)}


__all__ = ["Server", "batch", "concurrency", "metrics_snapshot", "set_default_voice", "settle", "stream", "stream_vs_batch",
           "top_up", "ttfa"]
