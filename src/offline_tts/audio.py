"""Audio I/O: probing and decoding any clip with ffmpeg, and PCM16/WAV output.

ffmpeg/ffprobe run as subprocesses: they read every container and codec users throw at us
(WAV, MP3, OGG, FLAC, M4A, MP4 video...), and a crash in a decoder cannot take the server down.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
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


def probe(path: Path) -> AudioInfo:
    """Describe the first audio stream of `path`, or raise InvalidAudio saying why it is unusable."""
    name = path.name
    if path.stat().st_size == 0:
        raise InvalidAudio(f"'{name}' is empty (0 bytes).", IDEAL_CLIP)
    cmd = [ffmpeg_binary("ffprobe"), "-v", "error", "-print_format", "json", "-show_streams", "-show_format", str(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=_PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise InvalidAudio(f"'{name}' could not be read in time (is it a valid audio file?).", IDEAL_CLIP) from None
    if out.returncode != 0:
        raise InvalidAudio(f"'{name}' is not an audio file ffmpeg can read (corrupt or wrong format).",
                           "Use a WAV, MP3, OGG, FLAC, M4A or MP4 file. " + IDEAL_CLIP)
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
        duration = decode(path, 8000).size / 8000
    return AudioInfo(float(duration), sample_rate, channels, s.get("codec_name", "?"))


def decode(path: Path, sample_rate: int) -> np.ndarray:
    """Decode the first audio stream of `path` to mono float32 at `sample_rate`."""
    cmd = [ffmpeg_binary(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
           "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=_DECODE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise InvalidAudio(f"Decoding '{path.name}' took too long.", IDEAL_CLIP) from None
    audio = np.frombuffer(out.stdout, dtype=np.float32)
    if out.returncode != 0 or audio.size == 0:
        raise InvalidAudio(f"'{path.name}' could not be decoded (corrupt or truncated audio).", IDEAL_CLIP)
    return audio


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
