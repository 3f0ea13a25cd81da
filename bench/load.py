"""Load test (`make load`): N concurrent clients against a real server on the tiny random model.

Loopback only, bounded in time and requests, stops by itself. The server gets a small queue on purpose,
so backpressure (503 + Retry-After) happens and is counted apart from errors. Reports requests,
statuses, p50/p95 latency per kind of call, and the server's resident memory at start, after warm-up
and at the end. Exit status 1 when the goal is missed: any error other than 503, or memory after
warm-up growing more than 5 %.

    python -m bench.load [--duration 180] [--clients 8] [--requests 20000] [--warmup 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, make_clip, percentile

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_MODEL = ROOT / ".cache" / "test-models" / "tiny"
TEXTS = [
    "Hola, ¿qué tal?",
    "El servicio responde mientras genera el audio.",
    "Una frase corta. Y otra un poco más larga, para que haya dos.",
    "Los números como 42 también se leen.",
    "Buenos días a todos.",
]
MEMORY_GOAL = 0.05  # growth after warm-up


@dataclass
class Result:
    kind: str
    status: int | str  # an HTTP status, or the name of a transport error
    seconds: float
    at: float  # when it finished (monotonic)


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, bytes)


# -- the server ---------------------------------------------------------------------------------------
def ensure_model(model_dir: Path) -> None:
    if not (model_dir / "model.pth").is_file():
        print(f"Building the tiny random-weight model in {model_dir} ...", flush=True)
        subprocess.run([str(BIN / "offline-tts"), "random-model", str(model_dir), "--size", "tiny"], check=True)


def start_server(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str]:
    voices = work / "voices"
    voices.mkdir()
    make_clip(voices / "ana.wav", 6, 180)
    make_clip(voices / "bob.mp3", 6, 130)
    port = free_port()
    env = {
        **os.environ,
        "TTS_MODEL_DIR": str(args.model_dir), "TTS_VOICES_DIR": str(voices), "TTS_CACHE_DIR": str(work / "cache"),
        "TTS_HOST": "127.0.0.1", "TTS_PORT": str(port), "TTS_DOWNLOAD": "false",
        "TTS_WORKERS": str(args.workers), "TTS_MAX_QUEUE": str(args.max_queue),
        "TTS_MAX_AUDIO_TOKENS": str(args.max_audio_tokens), "TTS_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1",
    }
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen([str(BIN / "offline-tts"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"The server exited ({proc.returncode}):\n{(work / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("The server did not become ready within 300 s.")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the clients ----------------------------------------------------------------------------------------
async def call(client: httpx.AsyncClient, kind: str, rng: random.Random, openai: bool) -> int:
    text = rng.choice(TEXTS)
    voice = rng.choice(["ana", "bob.mp3"])
    if kind == "batch":
        r = await client.post("/api/tts/batch", json={"text": text, "voice_sample": voice})
        return r.status_code
    if kind == "stream":
        async with client.stream("POST", "/api/tts/stream", json={"text": text, "voice_sample": voice}) as r:
            async for _ in r.aiter_bytes():
                pass
            return r.status_code
    if kind == "openai":
        body = {"model": "tts-1", "input": text, "voice": voice, "response_format": rng.choice(["wav", "mp3"])}
        async with client.stream("POST", "/v1/audio/speech", json=body) as r:
            async for _ in r.aiter_bytes():
                pass
            return r.status_code
    r = await client.get(rng.choice(["/api/voices", "/v1/audio/voices"] if openai else ["/api/voices"]))
    return r.status_code


async def client_loop(n: int, url: str, kinds: list[str], weights: list[int], stop_at: float, budget: list[int],
                      run: Run, openai: bool) -> None:
    rng = random.Random(n)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            kind = rng.choices(kinds, weights)[0]
            started = time.monotonic()
            try:
                status: int | str = await call(client, kind, rng, openai)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            run.results.append(Result(kind, status, time.monotonic() - started, time.monotonic()))
            if status == 503:  # deliberate backpressure: back off a little, as a polite client does
                await asyncio.sleep(rng.uniform(0.2, 0.6))


async def sample_memory(pid: int, stop_at: float, run: Run, every: float = 2.0) -> None:
    proc = psutil.Process(pid)
    while time.monotonic() < stop_at:
        run.rss.append((time.monotonic(), proc.memory_info().rss))
        await asyncio.sleep(every)


async def drive(args: argparse.Namespace, url: str, pid: int, openai: bool) -> tuple[Run, float, float]:
    run = Run()
    kinds, weights = ["batch", "stream", "openai", "voices"], [3, 3, 2 if openai else 0, 2]
    started = time.monotonic()
    stop_at = started + args.duration
    budget = [args.requests]
    tasks = [asyncio.create_task(client_loop(i, url, kinds, weights, stop_at, budget, run, openai))
             for i in range(args.clients)]
    sampler = asyncio.create_task(sample_memory(pid, stop_at + 3600, run))
    await asyncio.gather(*tasks)
    ended = time.monotonic()
    sampler.cancel()
    return run, started, ended


# -- the report -----------------------------------------------------------------------------------------
def server_figures(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")) and family.name in (
                    "tts_time_to_first_audio_seconds", "tts_real_time_factor"):
                out[s.name] += s.value
            elif s.name in ("tts_voice_cache_hits_total", "tts_voice_cache_misses_total"):
                out[s.name] = s.value
    return out


def report(args: argparse.Namespace, run: Run, started: float, ended: float, rss_start: int, rss_end: int,
           url: str) -> bool:
    mb = 1024 * 1024
    warm_at = started + args.warmup
    after_warmup = next((rss for t, rss in run.rss if t >= warm_at), rss_end)
    later = [rss for t, rss in run.rss if t >= warm_at] + [rss_end]
    growth = (rss_end - after_warmup) / after_warmup
    statuses = Counter(r.status for r in run.results)
    errors = {s: n for s, n in statuses.items() if s not in (200, 201, 503)}
    lines = [
        f"Load test: {args.clients} clients for {ended - started:.0f} s (cap {args.requests} requests), "
        f"workers={args.workers}, max_queue={args.max_queue}, tiny random model, {url}",
        f"Requests: {len(run.results)} ({len(run.results) / max(ended - started, 1e-9):.1f}/s)",
        "Statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=lambda kv: str(kv[0]))),
        f"  503 (deliberate backpressure): {statuses.get(503, 0)}",
        f"  errors (anything else but 2xx): {sum(errors.values())}" + (f" {errors}" if errors else ""),
        "",
        f"{'call':<8} {'ok':>6} {'503':>6} {'err':>5} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}",
    ]
    for kind in ("batch", "stream", "openai", "voices", "all"):
        rs = [r for r in run.results if kind in ("all", r.kind)]
        if not rs:
            continue
        ok = [r.seconds * 1000 for r in rs if r.status in (200, 201)]
        lines.append(f"{kind:<8} {len(ok):>6} {sum(r.status == 503 for r in rs):>6} "
                     f"{sum(r.status not in (200, 201, 503) for r in rs):>5} {percentile(ok, 50):>9.0f} "
                     f"{percentile(ok, 95):>9.0f} {max(ok, default=float('nan')):>9.0f}")
    try:
        figures = server_figures(url)
        ttfa = figures["tts_time_to_first_audio_seconds_sum"] / max(figures["tts_time_to_first_audio_seconds_count"], 1)
        rtf = figures["tts_real_time_factor_sum"] / max(figures["tts_real_time_factor_count"], 1)
        lines += ["", f"Server (/metrics): mean time to first audio {ttfa * 1000:.0f} ms, mean real-time factor {rtf:.2f}, "
                      f"voice cache hits {figures['tts_voice_cache_hits_total']:.0f} / misses "
                      f"{figures['tts_voice_cache_misses_total']:.0f}"]
    except (httpx.HTTPError, KeyError) as exc:
        lines += ["", f"Server metrics unavailable: {exc}"]
    lines += [
        "",
        f"Server RSS: start {rss_start / mb:.1f} MiB, after warm-up ({args.warmup:.0f} s) {after_warmup / mb:.1f} MiB, "
        f"end {rss_end / mb:.1f} MiB (min/max after warm-up {min(later) / mb:.1f}/{max(later) / mb:.1f} MiB)",
        f"Memory growth after warm-up: {growth * 100:+.2f} % (goal: within {MEMORY_GOAL * 100:.0f} %)",
    ]
    passed = not errors and abs(growth) <= MEMORY_GOAL and len(run.results) > 0
    lines.append("RESULT: " + ("PASS" if passed else "FAIL") + " (zero errors other than 503, memory flat after warm-up)")
    print("\n".join(lines), flush=True)
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of load (default 180)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=20_000, help="stop after this many requests in all")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the memory baseline (default: a quarter, at most 30)")
    parser.add_argument("--workers", type=int, default=1, help="model replicas (TTS_WORKERS)")
    parser.add_argument("--max-queue", type=int, default=2, help="TTS_MAX_QUEUE: small, so 503 backpressure happens")
    parser.add_argument("--max-audio-tokens", type=int, default=24, help="audio tokens per sentence (random models never stop)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL, help="tiny random model (built if missing)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server log) for inspection")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else min(30.0, args.duration / 4)
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is needed (make setup installs it).")
    ensure_model(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="tts-load-"))
    proc = None
    try:
        proc, url = start_server(args, work)
        openai = "/v1/audio/speech" in httpx.get(url + "/openapi.json", timeout=10).json().get("paths", {})
        rss_start = psutil.Process(proc.pid).memory_info().rss
        print(f"Server ready at {url} (pid {proc.pid}); {args.clients} clients for {args.duration:.0f} s ...", flush=True)
        run, started, ended = asyncio.run(drive(args, url, proc.pid, openai))
        rss_end = psutil.Process(proc.pid).memory_info().rss
        passed = report(args, run, started, ended, rss_start, rss_end, url)
    finally:
        if proc is not None:
            stop_server(proc)
        if args.keep:
            print(f"Work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
