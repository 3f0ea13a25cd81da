"""`python -m bench.memory [--requests N] [--env K=V ...]`: where the server's memory goes, and whether it stays.

Starts the real server on the full-size random model (as `make bench` does), then records its RSS and a
breakdown of its anonymous memory (from /proc/PID/smaps) after load, after concurrent streaming rounds of
1, 2, 4 and 8 clients, and after N requests in all. The breakdown names the holders: `heap` (the main glibc
arena), `arenas` (the 64 MB-aligned heaps glibc gives other threads), `large` (mmap'ed blocks: torch
tensors >= the mmap threshold, the model's weights) and `other`. A dev tool: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from . import http_bench as h
from .common import ensure_model, log, prepare_voices

ARENA = 64 << 20


def breakdown(pid: int) -> dict[str, float]:
    """RSS (MB) of the process's mappings, grouped by what holds them."""
    out = {"heap": 0.0, "arenas": 0.0, "large": 0.0, "files": 0.0, "other": 0.0}
    name, size = "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            size, name = hi - lo, fields[5] if len(fields) > 5 else ""
            start = lo
        elif fields[0] == "Rss:":
            rss = int(fields[1]) / 1024
            if name == "[heap]":
                out["heap"] += rss
            elif name.startswith("/"):
                out["files"] += rss
            elif name == "" and start % ARENA == 0 and size <= ARENA:
                out["arenas"] += rss
            elif name == "" and size >= 1 << 20:
                out["large"] += rss
            else:
                out["other"] += rss
    return {k: round(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=42)
    parser.add_argument("--env", action="append", default=[], help="extra server setting, K=V (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model = ensure_model()
    workdir = Path(tempfile.mkdtemp(prefix="tts-memory-"))
    voices = prepare_voices(workdir)
    env = {"TTS_MODEL_DIR": str(model), "TTS_VOICES_DIR": str(voices.dir), "TTS_CACHE_DIR": str(workdir / "cache"),
           "TTS_MAX_AUDIO_TOKENS": "600", "TTS_GREEDY": "true", "TTS_WORKERS": "1", "TTS_TORCH_THREADS": "2",
           **dict(kv.split("=", 1) for kv in args.env)}
    server = h.Server(workdir, env)
    trace = []

    def record(stage: str) -> None:
        row = {"stage": stage, "requests": server.requests, "rss_mb": server.rss_mb(), **breakdown(server.proc.pid)}
        log.info("%s", row)
        trace.append(row)

    try:
        server.start()
        record("after load")
        for clients in map(int, args.clients.split(",")):
            c = h.concurrency(server, voices.speaker, clients, 1, args.tokens)
            log.info("%d clients: %.3f audio s/s, TTFA p50 %.2f s p95 %.2f s, stream RTF p50 %.2f, errors %d", clients,
                     c["throughput_audio_s_per_s"], c["ttfa_p50_s"] or -1, c["ttfa_p95_s"] or -1, c["stream_rtf_p50"] or -1,
                     c["errors"])
            log.info("  replica thread: %s", c["replica"])
            trace.append(c)
            record(f"after {clients} clients")
        h.top_up(server, voices.speaker, args.requests)
        record(f"after {args.requests} requests")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(trace, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
