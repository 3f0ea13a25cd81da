"""`python -m bench.wyoming_bench [--model-dir DIR] [--repeats N]`: time to first audio over Wyoming (Home
Assistant's protocol) against the HTTP stream's, for the same sentence, on one server.

Both clients hang up at the first audio (the server stops that generation at its next token) and the two
protocols alternate, so both see the same machine state. Wyoming's first audio is the first `audio-chunk`
event; HTTP's is the first byte after the WAV header (as in http_bench). Goal (issue 13): Wyoming <= 1.10x HTTP.
Default model: the full-size random-weight one (bench/common.py); `--model-dir` takes another (e.g. the tests'
tiny model for a quick check). A dev tool: never run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize, SynthesizeVoice

from . import http_bench as h
from .common import LANGUAGE, MODEL_DIR, ensure_model, log, median, prepare_voices, text_for_tokens
from .report import Row, fmt, render, verdict

MAX_TOKENS = 600  # per sentence on the server: the text's length sets the token count (as in bench/__main__.py)
GOAL = 1.10


async def wyoming_ttfa(port: int, text: str, voice: str) -> float:
    """Seconds from writing `synthesize` to the first audio-chunk; the connection is then closed."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        started = time.perf_counter()
        await client.write_event(synthesize_event(text, voice))
        while True:
            event = await asyncio.wait_for(client.read_event(), 900)
            if event is None:
                raise RuntimeError("the Wyoming server closed the connection before any audio")
            if event.type == "error":
                raise RuntimeError(f"Wyoming error: {event.data}")
            if AudioChunk.is_type(event.type):
                return time.perf_counter() - started


def synthesize_event(text: str, voice: str):
    # The raw event carries the language too (SynthesizeVoice keeps either the name or the language).
    event = Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event()
    event.data["voice"]["language"] = LANGUAGE
    return event


def measure(model_dir: Path, tokens: int, repeats: int, workdir: Path) -> dict:
    voices = prepare_voices(workdir)
    port = h.free_port()
    env = {"TTS_MODEL_DIR": str(model_dir), "TTS_VOICES_DIR": str(voices.dir),
           "TTS_CACHE_DIR": str(workdir / "server-cache"), "TTS_MAX_AUDIO_TOKENS": str(MAX_TOKENS),
           "TTS_GREEDY": "true", "TTS_WORKERS": "1", "TTS_WYOMING_URI": f"tcp://127.0.0.1:{port}"}
    server = h.Server(workdir, env)
    text = text_for_tokens(tokens)
    voice = Path(voices.speaker).stem
    runs: dict[str, list[float]] = {"http": [], "wyoming": []}
    log.info("[wyoming] starting the server...")
    load_s = server.start()
    try:
        with server.client() as client:
            warm = h.stream(server, client, "Hola.", voices.speaker, first_audio_only=True)  # conditions the voice
            if not warm.ok:
                raise RuntimeError(f"warm-up failed: {warm.status} {warm.error}")
            asyncio.run(wyoming_ttfa(port, "Hola.", voice))
            h.settle()
            for i in range(repeats):
                order = ("http", "wyoming") if i % 2 == 0 else ("wyoming", "http")
                for protocol in order:
                    if protocol == "http":
                        r = h.stream(server, client, text, voices.speaker, first_audio_only=True)
                        if not r.ok:
                            raise RuntimeError(f"stream request failed: {r.status} {r.error}")
                        runs["http"].append(r.ttfa_s)
                    else:
                        runs["wyoming"].append(asyncio.run(wyoming_ttfa(port, text, voice)))
                    h.settle()
    finally:
        server.stop()
    http_s, wyoming_s = median(runs["http"]), median(runs["wyoming"])
    return {"model_dir": str(model_dir), "load_s": round(load_s, 1), "text_chars": len(text), "tokens": tokens,
            "repeats": repeats, "ttfa_s": {"http": round(http_s, 3), "wyoming": round(wyoming_s, 3)},
            "ratio": round(wyoming_s / http_s, 3),
            "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()}}


def row(result: dict) -> Row:
    ratio = result["ratio"]
    return Row(f"time to first audio, Wyoming vs HTTP stream ({result['text_chars']}-char sentence)",
               before=fmt(result["ttfa_s"]["http"], " s", 3) + " (HTTP)",
               after=fmt(result["ttfa_s"]["wyoming"], " s", 3) + f" (Wyoming, {ratio:.2f}x)",
               goal=f"<= {GOAL:.2f}x", verdict=verdict(ratio <= GOAL))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wyoming_bench", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the full-size random-weight model")
    parser.add_argument("--tokens", type=int, default=390, help="the sentence's audio tokens (as the HTTP TTFA bench)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or ensure_model(MODEL_DIR)
    with tempfile.TemporaryDirectory(prefix="wyoming-bench-") as tmp:
        result = measure(model_dir, args.tokens, args.repeats, Path(tmp))
    print(render([("Wyoming (Home Assistant)", [row(result)])]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ratio"] <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
