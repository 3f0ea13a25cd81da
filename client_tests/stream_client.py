#!/usr/bin/env python3
"""Stream speech from the offline TTS service: save it as a WAV file and play it while it arrives.

Interactive (asks for a voice file name and a text; Enter keeps the default):
    python client_tests/stream_client.py
Scripted (never asks):
    python client_tests/stream_client.py --voice my_voice_sample.mp3 --text "Hola." --no-play
    printf '\n\n' | python client_tests/stream_client.py        # answers from stdin: defaults

Needs: pip install -r client_tests/requirements.txt (playback is optional: without sounddevice,
PortAudio or an audio device the audio is only saved). Exit status: 0 done, 1 the server refused or
failed, 2 the server could not be reached or answered something that is not audio, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import struct
import sys
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

SAMPLE_TEXT = (
    "Hola, esta es una prueba del servicio de síntesis de voz sin conexión. "
    "El audio se genera frase a frase y empieza a sonar mientras el resto todavía se está generando. "
    "Si oyes esta voz, la clonación funciona."
)


@dataclass(frozen=True)
class WavFormat:
    sample_rate: int
    channels: int
    sample_width: int  # bytes per sample
    header_len: int  # bytes before the PCM data

    @property
    def frame_bytes(self) -> int:
        return self.channels * self.sample_width


def parse_wav_header(buf: bytes) -> WavFormat | None:
    """The PCM format and header length of a streamed WAV, or None while more bytes are needed.

    The server does not know the length of a stream in advance, so the sizes in its header are
    placeholders: only the format is read here, and the saved file gets its own correct header.
    """
    if len(buf) < 12:
        return None
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise ValueError("the answer is not a WAV stream")
    pos, fmt = 12, None
    while len(buf) >= pos + 8:
        chunk_id, size = buf[pos : pos + 4], struct.unpack("<I", buf[pos + 4 : pos + 8])[0]
        if chunk_id == b"data":
            if fmt is None:
                raise ValueError("WAV stream without a 'fmt ' chunk before its data")
            return WavFormat(fmt[0], fmt[1], fmt[2], pos + 8)
        if len(buf) < pos + 8 + size:
            return None
        if chunk_id == b"fmt ":
            audio_format, channels, rate, _, _, bits = struct.unpack("<HHIIHH", buf[pos + 8 : pos + 24])
            if audio_format != 1 or bits != 16:
                raise ValueError(f"unsupported WAV encoding (format {audio_format}, {bits} bits); expected PCM16")
            fmt = (rate, channels, bits // 8)
        pos += 8 + size + (size & 1)
    return None


class Player:
    """Plays PCM16 as it arrives, from a background thread, so network reads never wait for the sound card."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stream = None

    def start(self, fmt: WavFormat) -> bool:
        try:
            import sounddevice as sd  # optional; needs the PortAudio library

            sd.query_devices(kind="output")  # raises when there is no output device
            self._stream = sd.RawOutputStream(samplerate=fmt.sample_rate, channels=fmt.channels, dtype="int16")
            self._stream.start()
        except Exception as exc:  # ImportError, OSError (no PortAudio), PortAudioError (no device)
            self.problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._stream = None
            return False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self._stream.write(data)
            except Exception as exc:  # a device that goes away must not break saving
                self.problem = str(exc)
                return

    def write(self, data: bytes) -> None:
        if self._thread is not None:
            self._queue.put(data)

    def finish(self, wait: bool = True) -> None:
        """Play what is queued (wait=True) or stop at once, then close the device."""
        if self._thread is None:
            return
        if not wait:
            while not self._queue.empty():
                self._queue.get_nowait()
        self._queue.put(None)
        self._thread.join()
        try:
            self._stream.stop() if wait else self._stream.abort()
            self._stream.close()
        except Exception:
            pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("TTS_URL", "http://localhost:8000"), help="service URL (env TTS_URL)")
    p.add_argument("--voice", help="voice clip file name in the server's voices/ (empty: the server's default voice)")
    p.add_argument("--text", help="text to speak (empty: a built-in Spanish sample)")
    p.add_argument("--language", help="language code, e.g. es, en (default: the server's default)")
    p.add_argument("--output", default="stream_output.wav", help="WAV file to write (default: %(default)s)")
    p.add_argument("--no-play", action="store_true", help="only save the audio, do not play it")
    p.add_argument("--api-key", default=os.environ.get("TTS_API_KEY"),
                   help="API key, when the server needs one (env TTS_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server (default: %(default)s)")
    return p.parse_args(argv)


def ask_inputs(args: argparse.Namespace) -> tuple[str, str]:
    """Voice and text: from the arguments, else asked on a terminal, else read from stdin lines (never blocks on a prompt)."""
    if args.voice is not None or args.text is not None:
        return (args.voice or "").strip(), (args.text or "").strip() or SAMPLE_TEXT
    if sys.stdin.isatty():
        try:
            voice = input("Voice file name in voices/ (Enter = the server's default): ")
            text = input("Text to speak (Enter = a sample text): ")
        except EOFError:
            voice = text = ""
    else:  # piped answers, one per line; missing lines keep the defaults
        voice, text = sys.stdin.readline(), sys.stdin.readline()
    return voice.strip(), text.strip() or SAMPLE_TEXT


def describe_error(response: httpx.Response) -> str:
    """The server's JSON error envelope, as a human would want to read it."""
    try:
        body = json.loads(response.read() or b"{}")
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:500]}"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code = f" ({err['code']})" if err.get("code") else ""
        lines = [f"Server error {response.status_code}{code}: {err.get('message') or 'no message'}"]
        if err.get("hint"):
            lines.append(f"Hint: {err['hint']}")
        return "\n".join(lines)
    detail = body.get("detail") if isinstance(body, dict) else body
    return f"Server error {response.status_code}: {detail}"


def stream(args: argparse.Namespace, voice: str, text: str) -> int:
    body: dict[str, str] = {"text": text}
    if voice:
        body["voice_sample"] = voice
    if args.language:
        body["language"] = args.language
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/") + "/api/tts/stream"
    output = Path(args.output)
    player = Player()
    playing = False
    print(f"Voice: {voice or '(server default)'} | {len(text)} characters | {url}")

    started = time.perf_counter()
    first_audio: float | None = None
    fmt: WavFormat | None = None
    pending = b""  # header bytes, then the part of a frame split across two network reads
    wav: wave.Wave_write | None = None
    frames = 0
    progress = tqdm(desc="audio received", unit="s", bar_format="{desc}: {n:.1f} s of audio [{elapsed}]",
                    file=sys.stderr, mininterval=0.2, delay=0.05)  # shown once audio flows
    try:
        with httpx.Client(timeout=httpx.Timeout(args.timeout, connect=10.0)) as client, \
                client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                progress.close()
                print(describe_error(response), file=sys.stderr)
                if response.status_code == 401:
                    print("This client sends the key given with --api-key or the TTS_API_KEY environment variable.",
                          file=sys.stderr)
                return 1
            for data in response.iter_bytes():
                pending += data
                if fmt is None:
                    fmt = parse_wav_header(pending)
                    if fmt is None:
                        continue
                    pending = pending[fmt.header_len :]
                    output.parent.mkdir(parents=True, exist_ok=True)
                    wav = wave.open(str(output), "wb")  # writes a correct header when closed
                    wav.setnchannels(fmt.channels)
                    wav.setsampwidth(fmt.sample_width)
                    wav.setframerate(fmt.sample_rate)
                    playing = not args.no_play and player.start(fmt)
                usable = len(pending) - len(pending) % fmt.frame_bytes
                if not usable:
                    continue
                chunk, pending = pending[:usable], pending[usable:]
                if first_audio is None:
                    first_audio = time.perf_counter() - started
                    progress.write(f"First audio after {first_audio:.2f} s", file=sys.stdout)
                wav.writeframes(chunk)
                player.write(chunk)
                frames += len(chunk) // fmt.frame_bytes
                progress.update(len(chunk) / fmt.frame_bytes / fmt.sample_rate)
    except KeyboardInterrupt:
        progress.close()
        player.finish(wait=False)
        if wav is not None:
            wav.close()
        print(f"\nInterrupted; the audio received so far is in {output}", file=sys.stderr)
        return 130
    except httpx.HTTPError as exc:
        progress.close()
        player.finish(wait=False)
        if wav is not None:
            wav.close()
        print(f"Could not stream from {url}: {type(exc).__name__}: {exc}\n"
              "Hint: is the service running (make run) and is --url right?", file=sys.stderr)
        return 2
    except ValueError as exc:  # not a WAV stream
        progress.close()
        player.finish(wait=False)
        print(f"Unexpected answer from {url}: {exc}", file=sys.stderr)
        return 2
    progress.close()
    total = time.perf_counter() - started
    if wav is None:
        print(f"The server answered no audio (the stream ended after {len(pending)} bytes).", file=sys.stderr)
        return 2
    wav.close()
    seconds = frames / fmt.sample_rate
    print(f"Received {seconds:.2f} s of audio in {total:.2f} s"
          + (f" (first audio after {first_audio:.2f} s)" if first_audio is not None else " (no audio)"))
    if playing:
        print("Playing... (Ctrl+C stops)")
        try:
            player.finish(wait=True)
        except KeyboardInterrupt:
            player.finish(wait=False)
        played = "Played" if player.problem is None else f"Playback failed ({player.problem})"
        print(f"{played}; saved to {output}")
    elif args.no_play:
        print(f"Saved to {output}")
    else:
        reason = f" ({player.problem})" if player.problem else ""
        print(f"no audio device available; saved to {output}{reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    voice, text = ask_inputs(args)
    return stream(args, voice, text)


if __name__ == "__main__":
    sys.exit(main())
