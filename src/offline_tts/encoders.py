"""Response encoders: one per request, turning generated audio chunks into bytes of the asked format
as they come, so every format streams.

`wav` and `pcm` are written here (a WAV header of unknown length, then PCM16). The compressed formats
go through one ffmpeg subprocess per request (PCM16 on stdin, the container on stdout) in variants
that need nothing at the end of the file: MP3 without a Xing header, Ogg Opus with short pages, AAC in
ADTS frames, FLAC with an open-ended STREAMINFO. The subprocess is always killed and reaped, whether
the stream ends, fails or the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import numpy as np

from . import audio
from .errors import UnsupportedFormat

log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
_REAP_TIMEOUT = 5.0


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    ffmpeg_args: tuple[str, ...] = ()  # output options; empty = written without ffmpeg


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        # No Xing header: ffmpeg cannot go back to fill it in on a pipe, and a blank one misleads players.
        AudioFormat("mp3", "audio/mpeg", ("-c:a", "libmp3lame", "-b:a", "64k", "-write_xing", "0",
                                          "-id3v2_version", "0", "-f", "mp3")),
        # libopus keeps the 24 kHz input rate in its header, but Opus always decodes at 48 kHz.
        AudioFormat("opus", "audio/ogg", ("-c:a", "libopus", "-b:a", "32k", "-frame_duration", "20",
                                          "-page_duration", "100000", "-f", "ogg")),
        AudioFormat("aac", "audio/aac", ("-c:a", "aac", "-b:a", "64k", "-f", "adts")),
        AudioFormat("flac", "audio/flac", ("-c:a", "flac", "-frame_size", "2400", "-f", "flac")),
        AudioFormat("wav", "audio/wav"),
        AudioFormat("pcm", "audio/pcm"),  # raw s16le, mono, at the engine's rate (24 kHz)
    )
}


class EncoderError(RuntimeError):
    """ffmpeg failed while encoding a response (the response has started: it can only end early)."""


def check_format(name: str | None, default: str, param: str = "response_format") -> AudioFormat:
    key = (name or default).strip().lower()
    if key not in FORMATS:
        raise UnsupportedFormat(f"Unsupported audio format {key[:40]!r}.",
                                f"Use one of: {', '.join(FORMATS)}.", param=param)
    return FORMATS[key]


def encode(chunks: AsyncIterator[np.ndarray], fmt: AudioFormat, sample_rate: int,
           stop: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    """Bytes of `fmt` for float32 mono `chunks`, yielded as soon as the encoder produces them.

    An error of the source is re-raised after the bytes produced so far have been given out (for the
    ffmpeg formats: after the container has been ended properly, so what was sent stays decodable).
    `stop` is called first thing when the stream ends early (e.g. to cancel the synthesis).
    """
    if fmt.name == "wav":
        return _wav(chunks, sample_rate)
    if fmt.name == "pcm":
        return _pcm(chunks)
    return _ffmpeg(chunks, fmt, sample_rate, stop)


async def encode_all(samples: np.ndarray, fmt: AudioFormat, sample_rate: int) -> bytes:
    """A complete file of `fmt` (WAV with exact sizes in its header)."""
    if fmt.name == "wav":
        return audio.encode_wav(samples, sample_rate)
    if fmt.name == "pcm":
        return audio.to_pcm16(samples)
    return b"".join([part async for part in _ffmpeg(_once(samples), fmt, sample_rate)])


async def _once(samples: np.ndarray) -> AsyncIterator[np.ndarray]:
    yield samples


async def _pcm(chunks: AsyncIterator[np.ndarray]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield audio.to_pcm16(chunk)


async def _wav(chunks: AsyncIterator[np.ndarray], sample_rate: int) -> AsyncIterator[bytes]:
    yield audio.wav_header(sample_rate)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield audio.to_pcm16(chunk)


def ffmpeg_command(fmt: AudioFormat, sample_rate: int) -> list[str]:
    return [
        audio.ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error",
        # Raw PCM needs no probing: without these ffmpeg waits for ~1.5 s of input before any output.
        # (Not `-fflags +nobuffer`: it makes ffmpeg drop the first packets.)
        "-probesize", "32", "-analyzeduration", "0",
        "-f", "s16le", "-ar", str(sample_rate), "-ac", "1", "-i", "pipe:0",
        *fmt.ffmpeg_args, "-flush_packets", "1", "pipe:1",
    ]


async def _ffmpeg(chunks: AsyncIterator[np.ndarray], fmt: AudioFormat, sample_rate: int,
                  stop: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    proc = await asyncio.create_subprocess_exec(
        *ffmpeg_command(fmt, sample_rate),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    source_error: list[BaseException] = []

    async def feed() -> None:
        """Write the PCM to ffmpeg's stdin (a task of its own, so stdout is read meanwhile: no deadlock)."""
        try:
            async for chunk in chunks:
                proc.stdin.write(audio.to_pcm16(chunk))
                await proc.stdin.drain()  # back-pressure: a slow client slows the feed down
        except (BrokenPipeError, ConnectionResetError):
            pass  # ffmpeg died; its exit status tells why
        except Exception as exc:  # the synthesis failed: end the container cleanly, then report it
            source_error.append(exc)
        finally:
            with contextlib.suppress(Exception):
                proc.stdin.close()
            with contextlib.suppress(Exception):
                await _aclose(chunks)

    feeder = asyncio.create_task(feed(), name=f"ffmpeg-feed-{fmt.name}")
    try:
        while data := await proc.stdout.read(_READ_SIZE):
            yield data
        await feeder
        returncode = await proc.wait()
        if returncode != 0:
            stderr = (await proc.stderr.read()).decode(errors="replace").strip()
            raise EncoderError(f"ffmpeg ({fmt.name}) exited with {returncode}: {stderr[-500:]}")
        if source_error:
            raise source_error[0]
    finally:
        # Runs on success, on errors and when the client leaves (the task is then being cancelled,
        # hence the shield: the cleanup must not be interrupted half-way).
        with anyio.CancelScope(shield=True):
            if not feeder.done():
                if stop is not None:
                    stop()
                feeder.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with anyio.move_on_after(_REAP_TIMEOUT):
                await proc.wait()
            _close_pipes(proc)
            await asyncio.gather(feeder, return_exceptions=True)  # the source's own cleanup


async def _aclose(chunks: AsyncIterator[np.ndarray]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _close_pipes(proc: asyncio.subprocess.Process) -> None:
    """Close our ends of the pipes now rather than at garbage collection (no leaked fds)."""
    if proc.stdin is not None:
        with contextlib.suppress(Exception):
            proc.stdin.close()
    transport = getattr(proc, "_transport", None)  # asyncio has no public way to close it
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()
