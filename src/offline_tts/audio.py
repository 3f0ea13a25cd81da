"""Audio I/O: probing and decoding any clip with ffmpeg, and PCM16/WAV output.

ffmpeg/ffprobe run as subprocesses: they read every container and codec users throw at us
(WAV, MP3, OGG, FLAC, M4A, MP4 video...), and a crash in a decoder cannot take the server down.

Clips are untrusted (uploads, or files someone dropped into voices/), so ffmpeg reads them on a leash:
- only plain container demuxers may open them (SAFE_DEMUXERS): ffmpeg picks a demuxer by content, and
  playlist/manifest/concat/image-sequence demuxers (hls, dash, concat, image2...) follow URLs inside the
  file to other files on this machine;
- only the `file` protocol, for the clip itself (no data:, subfile:, concat:, network...); the mov
  demuxer's external data references (`enable_drefs`) stay at their default, off;
- decoding stops just past the length the caller allows, whatever the container declares: a FLAC, Ogg
  or MP3 can claim 5 s and hold an hour (a "decode bomb").
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidAudio
from .fileio import atomic_write

OUTPUT_SAMPLE_RATE = 24_000  # XTTS-v2 speaks at 24 kHz
IDEAL_CLIP = "The ideal reference clip is 5-15 s of one speaker talking clearly, without music or noise."
_PROBE_TIMEOUT = 20
_DECODE_TIMEOUT = 120
_MAX_SAMPLE_RATE = 384_000
MEASURE_RATE = 8000  # measuring a length by decoding: a low rate is as exact and costs little memory
MEASURE_LIMIT_S = 600.0  # a clip that does not declare its length is measured up to this much
_OVERRUN_S = 0.5  # decoded past a limit, so that "longer than the limit" can be told from "exactly at it"
_LENGTH_TOLERANCE_S = 0.05  # resampling rounds lengths by a few samples: not "too long"

# Demuxers (ffmpeg's names) of plain audio/video containers, which read only the bytes they are given.
# Everything else is refused, above all what opens other files or URLs: hls, dash, concat, image2,
# ffmetadata, imf, sdp, ... ("mov" is mov/mp4/m4a/3gp, "matroska" is mkv/mka/webm, "asf" is wma.)
SAFE_DEMUXERS = (
    "wav", "w64", "mp3", "ogg", "flac", "mov", "matroska", "aac", "asf", "aiff", "amr", "amrnb", "amrwb",
    "wv", "caf", "ac3", "eac3", "dts", "au", "avi", "mpeg", "mpegts", "tta", "ape", "mpc", "mpc8",
)


def ffmpeg_binary(name: str = "ffmpeg") -> str:
    path = shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} is not installed; install it (Debian/Ubuntu: apt-get install ffmpeg)")
    return path


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    sample_rate: int
    channels: int
    codec: str


def _untrusted_input(path: Path) -> list[str]:
    """ffmpeg/ffprobe input options that let it read `path` and nothing else (see the module docstring)."""
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(SAFE_DEMUXERS),
            "-i", f"file:{path.resolve()}"]  # "file:": a name with a colon is never taken for a protocol


def probe(path: Path, max_seconds: float = MEASURE_LIMIT_S) -> AudioInfo:
    """Describe the first audio stream of `path`, or raise InvalidAudio saying why it is unusable.

    `duration_s` is what the container declares (it may lie: only decoding tells); a container that
    declares none is measured by decoding, up to `max_seconds` (a longer clip reads as slightly longer)."""
    name = path.name
    if path.stat().st_size == 0:
        raise InvalidAudio(f"'{name}' is empty (0 bytes).", IDEAL_CLIP)
    cmd = [ffmpeg_binary("ffprobe"), "-v", "error", "-print_format", "json", "-show_streams", "-show_format",
           *_untrusted_input(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=_PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise InvalidAudio(f"'{name}' could not be read in time (is it a valid audio file?).", IDEAL_CLIP) from None
    if out.returncode != 0:
        raise InvalidAudio(f"'{name}' is not an audio file this server reads (corrupt, or not a plain audio/video file).",
                           "Use a WAV, MP3, OGG, FLAC, M4A or MP4 file (playlists and manifests are not clips). "
                           + IDEAL_CLIP)
    info = json.loads(out.stdout or b"{}")
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise InvalidAudio(f"'{name}' has no audio track.", "Use a file with a recorded voice. " + IDEAL_CLIP)
    s = streams[0]
    sample_rate = int(s.get("sample_rate") or 0)
    channels = int(s.get("channels") or 0)
    if not 1000 <= sample_rate <= _MAX_SAMPLE_RATE or channels < 1:
        raise InvalidAudio(f"'{name}' declares an impossible format ({sample_rate} Hz, {channels} channels).", IDEAL_CLIP)
    duration = s.get("duration") or info.get("format", {}).get("duration")
    if duration in (None, "N/A"):  # e.g. a browser's MediaRecorder WebM: the length is only known by decoding
        duration = measure(path, max_seconds)
    return AudioInfo(float(duration), sample_rate, channels, s.get("codec_name", "?"))


def decode(path: Path, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream of `path` to mono float32 at `sample_rate`.

    With `max_seconds`, decoding stops just past it, however long the container says it is: the result
    holds at most max_seconds + _OVERRUN_S, so `longer_than(result, ...)` tells a clip over the limit."""
    cmd = [ffmpeg_binary(), "-nostdin", "-v", "error", *_untrusted_input(path), "-map", "0:a:0", "-vn",
           "-ac", "1", "-ar", str(sample_rate)]
    max_bytes = None
    if max_seconds is not None:
        limit = max_seconds + _OVERRUN_S
        cmd += ["-t", f"{limit:.3f}"]  # ffmpeg stops by itself...
        max_bytes = 4 * round(limit * sample_rate)  # ...and if timestamps lie, we stop reading anyway
    pcm, ok = _run_capped(cmd + ["-f", "f32le", "-"], max_bytes, _DECODE_TIMEOUT, path.name)
    audio = np.frombuffer(pcm[: len(pcm) // 4 * 4], dtype=np.float32)
    if not ok or audio.size == 0:
        raise InvalidAudio(f"'{path.name}' could not be decoded (corrupt or truncated audio).", IDEAL_CLIP)
    return audio


def _run_capped(cmd: list[str], max_bytes: int | None, timeout: float, name: str) -> tuple[bytes, bool]:
    """Run `cmd` and read at most `max_bytes` of its stdout (then stop it): (what was read, whether it
    ended well, or was stopped at the cap). stderr is dropped: a hostile file can make it endless."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    timed_out = threading.Event()

    def kill_when_late() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, kill_when_late)
    timer.start()
    try:
        data = proc.stdout.read(max_bytes if max_bytes is not None else -1)
        capped = max_bytes is not None and len(data) >= max_bytes
        if capped:
            proc.kill()  # the rest is not wanted: don't let ffmpeg decode it
        returncode = proc.wait()
    finally:
        timer.cancel()
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        raise InvalidAudio(f"Decoding '{name}' took too long.", IDEAL_CLIP)
    return data, capped or returncode == 0


def measure(path: Path, max_seconds: float) -> float:
    """The length of `path` in seconds found by decoding it (not what it declares), up to just past `max_seconds`."""
    return decode(path, MEASURE_RATE, max_seconds).size / MEASURE_RATE


def longer_than(audio: np.ndarray, sample_rate: int, max_seconds: float) -> bool:
    return audio.size / sample_rate > max_seconds + _LENGTH_TOLERANCE_S


def check_clip(audio: np.ndarray, sample_rate: int, name: str, min_seconds: float) -> None:
    """Refuse clips too short or silent to clone a voice from."""
    seconds = audio.size / sample_rate
    if seconds < min_seconds:
        raise InvalidAudio(f"'{name}' is {seconds:.1f} s long; at least {min_seconds:g} s of speech is needed.", IDEAL_CLIP)
    if float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < 1e-3:
        raise InvalidAudio(f"'{name}' is silent.", IDEAL_CLIP)


def write_wav_atomic(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono PCM16 WAV atomically, so readers never see half a file."""
    pcm = to_pcm16(audio)
    with atomic_write(path) as f:
        f.write(wav_header(sample_rate, len(pcm)))
        f.write(pcm)


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_header(sample_rate: int = OUTPUT_SAMPLE_RATE, data_bytes: int | None = None, channels: int = 1) -> bytes:
    """RIFF/WAVE header for PCM16. With `data_bytes=None` (a stream of unknown length) the sizes are
    set to the maximum, which ffmpeg, browsers and most players read as 'until the end of the file'."""
    block_align = channels * 2
    data_size = 0xFFFFFFFF - 36 if data_bytes is None else data_bytes
    riff_size = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, 16)
        + b"data" + struct.pack("<I", data_size)
    )


def encode_wav(audio: np.ndarray, sample_rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    pcm = to_pcm16(audio)
    return wav_header(sample_rate, len(pcm)) + pcm
