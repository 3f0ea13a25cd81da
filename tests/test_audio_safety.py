"""Untrusted clips are decoded on a leash (issue 9, items 1 and 5).

1. A clip can be a playlist or manifest (DASH, HLS, ffconcat...) that points ffmpeg at another file on
   the server. Uploaded or dropped into voices/, each is refused with a clear 422, the same whether the
   file it points at exists or not, and nothing outside voices/ is even opened: an inotify watch on the
   outside folder (checked to be working) sees every open there.
2. A clip can declare a short length and hold a long one (FLAC STREAMINFO, Ogg granule positions, MP3
   without a Xing header, WebM without a duration...). Uploaded, it is refused as too long; dropped into
   voices/, only its first TTS_MAX_CLIP_SECONDS are decoded (the decoded copy in the cache proves it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import resource
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import ServerProcess, assert_error, make_clip

from offline_tts import audio

MAX_CLIP_SECONDS = 10
CONDITIONING_RATE = 22_050  # XTTS decodes reference clips at this rate


# -- watching a folder for opens -------------------------------------------------------------------
class OpenWatch:
    """Every open of a file in `folder`, by any process (Linux inotify through libc)."""

    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, folder: Path):
        self.folder = folder
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self._libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self._libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_OPEN) >= 0

    def opened(self) -> list[str]:
        """Names of the files opened since the last call."""
        names = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode()
                if mask & self.IN_OPEN:
                    names.append(name)
                offset += 16 + length

    def assert_sees(self, path: Path) -> None:
        """The watch works: opening a file ourselves is seen (so 'no opens' means something)."""
        self.opened()
        path.read_bytes()
        assert path.name in self.opened()

    def close(self) -> None:
        os.close(self.fd)


# -- playlists and manifests that point elsewhere --------------------------------------------------
def dash(url: str) -> str:
    return f"""<?xml version="1.0"?>
<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" mediaPresentationDuration="PT6S" minBufferTime="PT1S"
     profiles="urn:mpeg:dash:profile:isoff-on-demand:2011">
 <Period><AdaptationSet mimeType="audio/mp4"><Representation id="1" bandwidth="64000">
  <BaseURL>{url}</BaseURL>
 </Representation></AdaptationSet></Period>
</MPD>
"""


def hls(url: str) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:6,\n{url}\n#EXT-X-ENDLIST\n"


# kind -> (file name sent, content for a target path): each one names the target in its own way.
POINTERS = {
    "dash_file_url": ("playlist.mpd", lambda p: dash(f"file://{p}")),
    "dash_path": ("playlist.mpd", lambda p: dash(p)),
    "dash_as_m4a": ("clip.m4a", lambda p: dash(f"file://{p}")),  # the extension does not choose the demuxer
    "hls_file_url": ("list.m3u8", lambda p: hls(f"file://{p}")),
    "hls_path": ("list.m3u8", lambda p: hls(p)),
    "hls_subfile": ("list.m3u8", lambda p: hls(f"subfile,,start,0,end,0,,:{p}")),
    "ffconcat": ("list.ffconcat", lambda p: f"ffconcat version 1.0\nfile '{p}'\n"),
    "ffconcat_protocol": ("list.txt", lambda p: f"ffconcat version 1.0\nfile 'concat:{p}|{p}'\n"),
    "ffmetadata": ("meta.ffmeta", lambda p: f";FFMETADATA1\ntitle=x\n[CHAPTER]\nTIMEBASE=1/1\nSTART=0\nEND=6\ntitle={p}\n"),
}


@pytest.fixture(scope="module")
def target(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("audio-safety")
    srv = ServerProcess(work, tiny_model_dir, {"TTS_MAX_CLIP_SECONDS": str(MAX_CLIP_SECONDS)})
    srv.outside = work / "outside"
    make_clip(srv.outside / "private.m4a", seconds=6)  # the secret: a perfectly good clip, outside voices/
    make_clip(srv.voices_dir / "ana.wav", seconds=6, rate=16000, channels=1)
    srv.start()
    srv.watch = OpenWatch(srv.outside)
    yield srv
    srv.watch.close()
    srv.stop()


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def decoded_copies(srv: ServerProcess) -> set[Path]:
    return set((srv.cache_dir / "clips").glob("*.npy"))


def refusal(r, what: str) -> dict:
    error = assert_error(r, 422, "invalid_audio")
    assert "outside" not in r.text, (what, r.text)
    return error


@pytest.mark.parametrize("kind", POINTERS)
def test_uploaded_playlists_and_manifests_are_refused_without_reading_outside(target, kind):
    filename, content = POINTERS[kind]
    before, copies = snapshot(target.voices_dir), decoded_copies(target)
    errors = []
    target.watch.opened()
    with target.client() as client:
        for secret in (target.outside / "private.m4a", target.outside / "missing.m4a"):
            r = client.post("/api/voices", data={"name": f"leak_{kind}"},
                            files={"files": (filename, content(str(secret)).encode(), "application/octet-stream")})
            errors.append(refusal(r, kind))
        assert f"leak_{kind}" not in [v["name"] for v in client.get("/api/voices").json()["voices"]]
    assert target.watch.opened() == []  # nothing outside voices/ was opened...
    assert errors[0] == errors[1]  # ...and the answer does not tell whether the file exists
    assert snapshot(target.voices_dir) == before and decoded_copies(target) == copies
    target.watch.assert_sees(target.outside / "private.m4a")


@pytest.mark.parametrize("kind", POINTERS)
def test_playlists_and_manifests_dropped_into_voices_are_refused_without_reading_outside(target, kind):
    _, content = POINTERS[kind]
    copies = decoded_copies(target)
    target.watch.opened()
    answers = []
    with target.client() as client:
        for secret in ("private.m4a", "missing.m4a"):
            name = f"dropped_{kind}_{secret[:-4]}"
            # Relative to the clip (voices/ and outside/ are siblings), and absolute: both must fail.
            for i, path in enumerate((f"../outside/{secret}", str(target.outside / secret))):
                (target.voices_dir / f"{name}{i}.m4a").write_text(content(path))
                for route, body in (("/api/tts/batch", {"text": "Hola.", "voice_sample": f"{name}{i}"}),
                                    ("/v1/audio/speech", {"model": "tts-1", "input": "Hola.", "voice": f"{name}{i}",
                                                          "response_format": "wav"})):
                    error = refusal(client.post(route, json=body), (kind, route, path))
                    answers.append(json.dumps(error).replace(secret[:-4], "X"))
                listed = {v["name"]: v for v in client.get("/api/voices").json()["voices"]}
                assert "error" in listed[f"{name}{i}"] and not listed[f"{name}{i}"]["duration_s"]
                (target.voices_dir / f"{name}{i}.m4a").unlink()
    assert target.watch.opened() == []
    assert answers[:4] == answers[4:]  # the same answers, existing target or not
    assert decoded_copies(target) == copies
    target.watch.assert_sees(target.outside / "private.m4a")


def test_every_kind_of_clip_still_decodes(tmp_path):
    """The demuxer whitelist keeps every container a voice clip comes in (and a video's audio track)."""
    for suffix, extra in [(".wav", []), (".mp3", []), (".ogg", []), (".opus", ["-c:a", "libopus"]), (".flac", []),
                          (".m4a", []), (".mp4", []), (".aac", []), (".webm", []), (".mka", []), (".mov", []),
                          (".3gp", ["-c:a", "aac"]), (".wma", []), (".aiff", []), (".wv", []), (".caf", []),
                          (".ac3", []), (".au", []), (".avi", []), (".ts", []), (".mpg", [])]:
        clip = make_clip(tmp_path / f"clip{suffix}", seconds=1, rate=16000, channels=1, extra=extra)
        assert 0.9 < audio.probe(clip).duration_s < 1.15, suffix
        assert 0.9 < audio.decode(clip, 16000).size / 16000 < 1.15, suffix


# -- clips that lie about their length -------------------------------------------------------------
def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


TONE = "aevalsrc='0.3*sin(2*PI*180*t+3*sin(2*PI*5*t))*(0.6+0.4*sin(2*PI*3*t))':s=16000"


def flac_lying_in_streaminfo(path: Path, seconds: float) -> Path:
    """A FLAC that holds `seconds` of a (loud, very compressible) square wave but says 5 s in STREAMINFO."""
    ffmpeg("-f", "lavfi", "-i", f"aevalsrc='0.3*gte(mod(t,1),0.5)-0.15':s=8000:d={seconds}", "-sample_fmt", "s16",
           "-frame_size", "4000", str(path))
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    word = int.from_bytes(data[18:26], "big")  # ... rate(20) channels(3) bits(5) total samples(36)
    data[18:26] = ((word & ~((1 << 36) - 1)) | 5 * 8000).to_bytes(8, "big")
    path.write_bytes(data)
    return path


def _ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        crc &= 0xFFFFFFFF
    return crc


def ogg_lying_in_granules(path: Path, seconds: float) -> Path:
    """An Ogg Opus of `seconds` whose every page's granule position is scaled to end at 5 s (CRCs fixed)."""
    ffmpeg("-f", "lavfi", "-i", f"{TONE}:d={seconds}", "-c:a", "libopus", "-b:a", "6k", str(path))
    data, out, offset = path.read_bytes(), bytearray(), 0
    while offset < len(data):
        segments = data[offset + 26]
        size = 27 + segments + sum(data[offset + 27: offset + 27 + segments])
        page = bytearray(data[offset: offset + size])
        granule = struct.unpack_from("<q", page, 6)[0]
        if granule > 0:
            struct.pack_into("<q", page, 6, int(granule * 5 / seconds))
        struct.pack_into("<I", page, 22, 0)
        struct.pack_into("<I", page, 22, _ogg_crc(page))
        out += page
        offset += size
    path.write_bytes(out)
    return path


def mp3_without_xing(path: Path, seconds: float) -> Path:
    """1 s at 160 kb/s then the rest at 8 kb/s, no Xing/VBRI header: the length is guessed from the first frames."""
    first, rest = path.with_suffix(".1.mp3"), path.with_suffix(".2.mp3")
    for out, bitrate, length in ((first, "160k", 1), (rest, "8k", seconds - 1)):
        ffmpeg("-f", "lavfi", "-i", f"{TONE}:d={length}", "-c:a", "libmp3lame", "-b:a", bitrate,
               "-write_xing", "0", "-id3v2_version", "0", str(out))
    path.write_bytes(first.read_bytes() + rest.read_bytes())
    return path


def webm_without_duration(path: Path, seconds: float) -> Path:
    """What a browser's MediaRecorder makes: a WebM that declares no length (written to a pipe)."""
    data = subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"{TONE}:d={seconds}", "-c:a", "libopus",
                           "-b:a", "6k", "-f", "webm", "-"], capture_output=True, check=True).stdout
    path.write_bytes(data)
    return path


def wav_of_unknown_length(path: Path, seconds: float) -> Path:
    """A streamed WAV (sizes 0xFFFFFFFF: 'until the end'). ffprobe reads its length from the file size, so
    a WAV cannot declare less than it holds (ffmpeg 5.1 stops at the declared data size), but it must be
    bounded all the same."""
    rate = 8000
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 180 * t) * 9000).astype("<i2").tobytes()
    header = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))
    path.write_bytes(header + pcm)
    return path


BOMBS = {  # kind -> (suffix, maker); each holds 60 s, 6x the limit, in a few KB
    "flac_streaminfo": (".flac", flac_lying_in_streaminfo),
    "ogg_granules": (".ogg", ogg_lying_in_granules),
    "mp3_no_xing": (".mp3", mp3_without_xing),
    "webm_no_duration": (".webm", webm_without_duration),
    "wav_unknown_size": (".wav", wav_of_unknown_length),
}
LYING = ("flac_streaminfo", "ogg_granules", "mp3_no_xing")  # these claim to be short enough


def declared_seconds(path: Path) -> float | None:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout.strip()
    return None if out in ("", "N/A") else float(out)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    made = {kind: maker(folder / f"bomb_{kind}{suffix}", 60) for kind, (suffix, maker) in BOMBS.items()}
    for kind in LYING:  # the test is only worth something if the lie works
        assert 2 < declared_seconds(made[kind]) < MAX_CLIP_SECONDS, kind
    assert declared_seconds(made["webm_no_duration"]) is None
    return made


@pytest.mark.parametrize("kind", BOMBS)
def test_uploaded_clip_longer_than_the_limit_is_refused_whatever_it_declares(target, bombs, kind):
    before, copies = snapshot(target.voices_dir), decoded_copies(target)
    clip = bombs[kind]
    with target.client() as client:
        r = client.post("/api/voices", data={"name": f"bomb_{kind}"},
                        files={"files": (clip.name, clip.read_bytes(), "application/octet-stream")})
    error = refusal(r, kind)
    assert f"the limit is {MAX_CLIP_SECONDS} s" in error["message"] and clip.name in error["message"], error
    assert snapshot(target.voices_dir) == before and decoded_copies(target) == copies


@pytest.mark.parametrize("kind", BOMBS)
def test_long_clip_dropped_into_voices_is_used_up_to_the_limit_only(target, bombs, kind):
    clip = bombs[kind]
    dropped = target.voices_dir / f"dropped_bomb_{kind}{clip.suffix}"
    dropped.write_bytes(clip.read_bytes())
    digest = hashlib.sha256(clip.read_bytes()).hexdigest()
    with target.client() as client:
        r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": dropped.stem})
    assert r.status_code == 200, r.text
    copy = target.cache_dir / "clips" / f"{digest}-{CONDITIONING_RATE}.npy"
    decoded = np.load(copy)
    assert MAX_CLIP_SECONDS - 0.1 < decoded.size / CONDITIONING_RATE <= MAX_CLIP_SECONDS, decoded.size
    assert f"Clip '{dropped.name}' is longer than TTS_MAX_CLIP_SECONDS" in target.log()


def ffmpeg_cpu(run):
    """(CPU seconds of the child processes `run()` waited for, what it returned)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), result


def test_decoding_stops_at_the_limit_not_at_the_end(tmp_path):
    """An hour of FLAC saying 5 s (about 100 KB): decoded with a limit, it costs what the limit allows."""
    bomb = flac_lying_in_streaminfo(tmp_path / "hour.flac", 3600)
    limited_cpu, decoded = ffmpeg_cpu(lambda: audio.decode(bomb, CONDITIONING_RATE, MAX_CLIP_SECONDS))
    assert decoded.size <= (MAX_CLIP_SECONDS + 0.5) * CONDITIONING_RATE
    assert audio.longer_than(decoded, CONDITIONING_RATE, MAX_CLIP_SECONDS)
    # ffmpeg's CPU time, against decoding the whole hour in the same run (~0.6 s of CPU and 317 MB): a ratio of
    # CPU times, so a busy machine does not matter
    whole_cpu, _ = ffmpeg_cpu(lambda: audio.decode(bomb, CONDITIONING_RATE))
    assert limited_cpu < whole_cpu / 4, f"{limited_cpu:.2f} s of CPU at the limit, {whole_cpu:.2f} s for it all"
    assert audio.probe(bomb).duration_s == 5.0  # what it declares: only decoding tells the truth
