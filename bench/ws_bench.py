"""Text in pieces over the WebSocket (issue 12) against /api/tts/stream, on the real server (loopback).

For the same sentence, interleaved, median of --repeats:
- stream: POST /api/tts/stream, time to the first audio byte after the WAV header;
- ws: the sentence sent word by word over /api/tts/ws, then the first word of the next sentence (the moment
  its end is certain, i.e. its text is complete): time from that message to the first audio frame; the
  server's own figure (`first_audio_seconds` of the sentence) is reported too.
Goal: ws <= 1.10 x stream. Then a `cancel` while the sentence is spoken: audio frames after it, time to
the `cancelled` event, and whether the slot is free right after.

    python -m bench.ws_bench                                  # the full-size random model (built once)
    python -m bench.ws_bench --model-dir .cache/test-models/tiny --tokens 24 --repeats 3   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from websockets.sync.client import connect

from . import http_bench as h
from .common import MODEL_DIR, Timer, ensure_model, median, prepare_voices, text_for_tokens

log = logging.getLogger("bench")


@contextlib.contextmanager
def _open(server: h.Server, voice: str, sentence: str) -> Iterator:
    """A connection that has sent `sentence` word by word (not yet known to be complete)."""
    with connect(server.url.replace("http", "ws", 1) + "/api/tts/ws", proxy=None, max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "voice": voice, "language": h.LANGUAGE}))
        assert json.loads(ws.recv())["type"] == "ready"
        for i, word in enumerate(sentence.split(" ")):
            ws.send(json.dumps({"type": "text", "text": word if i == 0 else " " + word}))
        yield ws


def _first_frame(ws) -> None:
    while isinstance(message := ws.recv(), str):
        if json.loads(message)["type"] == "error":
            raise RuntimeError(f"ws error: {message}")


def ws_first_audio(server: h.Server, voice: str, sentence: str) -> tuple[float, float | None]:
    """(client seconds from the completing message to the first audio frame, the server's own figure)."""
    with _open(server, voice, sentence) as ws:
        timer = Timer()
        ws.send(json.dumps({"type": "text", "text": " Y"}))  # the next sentence begins: this one is complete
        _first_frame(ws)
        client_s = timer()
        while True:
            message = ws.recv()
            if isinstance(message, str) and (event := json.loads(message))["type"] == "sentence_end":
                break
        ws.send(json.dumps({"type": "cancel"}))  # drop the " Y" still buffered
        ws.send(json.dumps({"type": "close"}))
        for _ in ws:
            pass
    return client_s, event["first_audio_seconds"]


def ws_cancel(server: h.Server, voice: str, sentence: str) -> tuple[int, float, bool]:
    """Barge-in at the first audio frame: (frames after the cancel, seconds to the `cancelled` event,
    whether the slot is free right after)."""
    with _open(server, voice, sentence) as ws:
        ws.send(json.dumps({"type": "flush"}))
        _first_frame(ws)
        timer, frames = Timer(), 0
        ws.send(json.dumps({"type": "cancel"}))
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                frames += 1
            elif json.loads(message)["type"] == "cancelled":
                break
        seconds = timer()
        time.sleep(0.1)  # the scheduler frees the slot at its next step
        free = busy_slots(server) == 0
        ws.send(json.dumps({"type": "close"}))
        for _ in ws:
            pass
    return frames, seconds, free


def busy_slots(server: h.Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(r"^tts_batch_slots_busy (\S+)$", text, re.M).group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="default: the full-size random model")
    parser.add_argument("--tokens", type=int, default=120, help="audio tokens of the sentence (a multiple of 3)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="TTS_DEVICE for the server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_dir = ensure_model(args.model_dir.resolve()) if args.model_dir.resolve() == MODEL_DIR.resolve() \
        else args.model_dir.resolve()
    workdir = Path(tempfile.mkdtemp(prefix="tts-ws-bench-"))
    voices = prepare_voices(workdir)
    env = {"TTS_MODEL_DIR": str(model_dir), "TTS_VOICES_DIR": str(voices.dir), "TTS_CACHE_DIR": str(workdir / "cache"),
           "TTS_MAX_AUDIO_TOKENS": "600", "TTS_GREEDY": "true", "TTS_WORKERS": "1"}
    if args.device:
        env["TTS_DEVICE"] = args.device
    server = h.Server(workdir, env)
    sentence = text_for_tokens(args.tokens)
    stream_s, ws_s, ws_server_s, after_cancel, cancel_times, freed = [], [], [], [], [], []
    try:
        log.info("starting the server (%s)...", model_dir)
        server.start()
        with server.client() as client:
            h.stream(server, client, "Hola.", voices.speaker, first_audio_only=True)  # conditioning, not timed
            h.settle()
            for i in range(args.repeats):
                r = h.stream(server, client, sentence, voices.speaker, first_audio_only=True)
                if not r.ok:
                    raise RuntimeError(f"stream failed: {r.status} {r.error}")
                stream_s.append(r.ttfa_s)
                h.settle()
                client_s, server_s = ws_first_audio(server, voices.speaker, sentence)
                ws_s.append(client_s)
                ws_server_s.append(server_s)
                h.settle()
                frames, cancel_s, free = ws_cancel(server, voices.speaker, sentence)
                after_cancel.append(frames)
                cancel_times.append(cancel_s)
                freed.append(free)
                h.settle()
                log.info("run %d: stream %.3f s, ws %.3f s (server %s s); cancel: %d frame(s) after it, %.3f s, "
                         "slot free %s", i + 1, r.ttfa_s, client_s, server_s, frames, cancel_s, free)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    s, w = median(stream_s), median(ws_s)
    result = {"model_dir": str(model_dir), "sentence_chars": len(sentence), "tokens": args.tokens,
              "stream_ttfa_s": round(s, 3), "ws_first_audio_s": round(w, 3),
              "ws_server_first_audio_s": median([x for x in ws_server_s if x is not None]),
              "ratio": round(w / s, 3), "goal_ratio": 1.10, "frames_after_cancel_max": max(after_cancel),
              "cancel_to_event_s": round(median(cancel_times), 3), "slot_free_after_cancel": all(freed), "runs": {"stream": stream_s, "ws": ws_s}}
    print(f"| WS first audio after the sentence is complete | {w:.3f} s | /api/tts/stream TTFA {s:.3f} s | "
          f"ratio {w / s:.2f} (goal <= 1.10) |")
    print(f"| WS cancel | at most {max(after_cancel)} audio frame(s) after it | slot free after: {all(freed)} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
