"""Hostile names and files: each gets a clean 4xx (JSON error, no stack trace) and nothing on disk changes.

The server runs with a secret clip *outside* its voices directory, reachable by `../` and by symlinks
placed in the voices directory: if any trick worked, synthesis would succeed (200) or the secret
would be deleted, and the test would see it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import struct
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from helpers import ServerProcess, make_clip

MAX_UPLOAD = 600_000


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Everything under `roots` (hidden files and symlinks included): type, size, content hash, link target."""
    out: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = ("missing",)
            continue
        for path in sorted([root, *root.rglob("*")]):
            key = str(path)
            if path.is_symlink():
                out[key] = ("link", os.readlink(path))
            elif path.is_dir():
                out[key] = ("dir",)
            else:
                out[key] = ("file", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def wav_header(sample_rate: int, channels: int = 1, bits: int = 16, data_bytes: int = 0) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
            + b"data" + struct.pack("<I", data_bytes))


def hostile_files(tmp: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (file name sent, bytes): none of them is a usable voice clip."""
    tmp.mkdir(parents=True, exist_ok=True)
    good_mp3 = make_clip(tmp / "good.mp3", seconds=6).read_bytes()
    good_wav = make_clip(tmp / "good.wav", seconds=6, rate=16000, channels=1).read_bytes()
    video = tmp / "silent-film.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=black:s=64x64:d=6", "-pix_fmt", "yuv420p",
                    str(video)], check=True)
    silence = tmp / "silence.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "6", str(silence)],
                   check=True)
    pcm = good_wav[44:]
    return {
        "zero_bytes": ("empty.wav", b""),
        "truncated_mp3": ("cut.mp3", good_mp3[:1500]),
        "truncated_wav": ("cut.wav", good_wav[:44 + 3200]),
        "corrupt_header": ("corrupt.wav", b"RIFF\xff\xff\xff\xffWAVEfmt \x10\x00\x00\x00" + bytes(range(64)) * 4),
        "random_bytes": ("noise.mp3", np.random.default_rng(7).integers(0, 256, 40_000, dtype=np.uint8).tobytes()),
        "text_as_wav": ("notes.wav", b"These are my notes, not audio.\n" * 200),
        "huge_sample_rate": ("fast.wav", wav_header(2_000_000_000, data_bytes=len(pcm)) + pcm),
        "zero_sample_rate": ("zero.wav", wav_header(0, data_bytes=len(pcm)) + pcm),
        "many_channels": ("wide.wav", wav_header(16000, channels=0, data_bytes=len(pcm)) + pcm),
        "video_without_audio": ("film.mp4", video.read_bytes()),
        "silence": ("quiet.wav", silence.read_bytes()),
        "too_short": ("short.wav", make_clip(tmp / "short.wav", seconds=1, rate=16000, channels=1).read_bytes()),
        "too_long": ("long.mp3", make_clip(tmp / "long.mp3", seconds=25, rate=16000, channels=1).read_bytes()),
        "too_large": ("big.wav", good_wav + os.urandom(MAX_UPLOAD)),
    }


HOSTILE_NAMES = [
    "../secret.wav", "../secret", "../../etc/passwd", "/etc/passwd", "/tmp", "..", ".", "   ",
    "..%2Fsecret.wav", "..%252Fsecret.wav", "%2e%2e%2fsecret.wav", "%252e%252e%252fsecret.wav",
    "..\\secret.wav", "ana.wav/../../secret.wav", "ana\x00.wav", "\x00", "ana\n.wav", "ana\u202e.wav",
    "a" * 300, "b" * 5000, "\u00e9" * 200,  # 200 characters but 400 bytes: too long for the filesystem
    "T\u0330\u033a\u033a\u0315o\u035e " * 40,  # combining marks ("Zalgo"), over 255 bytes
    "..\uff0fsecret.wav",  # fullwidth solidus
    "\u2024\u2024/secret.wav",  # one-dot leaders
    "\u2025/secret.wav",  # two-dot leader
    "..\u2215secret.wav",  # division slash
    "..\u2044secret.wav",  # fraction slash
    "\uff0e\uff0e\uff0fsecret.wav",  # fullwidth full stops + solidus
    ".hidden", "link_out", "link_out.wav", "link_dir", "link_dir/secret.wav",
    "empty", "notes", "hugerate", "film",  # hostile files sitting in the voices directory
]


@pytest.fixture(scope="module")
def target(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("hostile")
    srv = ServerProcess(work, tiny_model_dir, {"TTS_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "TTS_MAX_CLIP_SECONDS": "20"})
    outside = work / "outside"
    make_clip(outside / "secret.wav", seconds=6)
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    (srv.voices_dir / "link_out.wav").symlink_to(outside / "secret.wav")
    (srv.voices_dir / "link_dir").symlink_to(outside)
    files = hostile_files(work / "files")
    for name, source in [("empty.wav", "zero_bytes"), ("notes.wav", "text_as_wav"), ("hugerate.wav", "huge_sample_rate"),
                         ("film.mp4", "video_without_audio")]:
        (srv.voices_dir / name).write_bytes(files[source][1])
    srv.start()
    with srv.client() as client:  # a default voice, so a refused name can never fall back to something that works
        assert client.post("/api/config", json={"voice_sample": "ana", "language": "es"}).status_code == 200
    srv.files = files
    srv.outside = outside
    yield srv
    srv.stop()


@pytest.fixture
def unchanged(target):
    """Fails the test if anything under the voices, cache or outside directories changed."""
    roots = (target.voices_dir, target.cache_dir, target.outside, Path("/tmp/secret.wav"), Path("/etc/passwd"))
    before = snapshot(*roots)
    yield
    assert snapshot(*roots) == before


def assert_clean_4xx(r, what) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    body = r.json()
    assert body["error"]["code"] and body["error"]["message"], what
    assert "Traceback" not in r.text and "File \"/" not in r.text, what


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: repr(n)[:40])
def test_hostile_voice_names_in_json(target, unchanged, name):
    with target.client() as client:
        for path in ("/api/tts/batch", "/api/tts/stream"):
            assert_clean_4xx(client.post(path, json={"text": "Hola.", "voice_sample": name}), (path, name))
        assert_clean_4xx(client.post("/api/config", json={"voice_sample": name}), ("config", name))
        assert_clean_4xx(client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hola.", "voice": name,
                                                               "response_format": "wav"}), ("openai", name))
        assert client.get("/").json()["config"]["voice_sample"] == "ana"  # the old default kept


def raw_request(srv: ServerProcess, method: str, path: str) -> tuple[int, bytes]:
    """Send the path exactly as given (httpx would normalize dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


DELETE_PATHS = [
    "/api/voices/../outside/secret.wav", "/api/voices/..%2Foutside%2Fsecret.wav", "/api/voices/..%252Foutside%252Fsecret.wav",
    "/api/voices/%2e%2e%2foutside%2fsecret.wav", "/api/voices/%252e%252e%252foutside", "/api/voices/%2e%2e",
    "/api/voices/..", "/api/voices/.", "/api/voices/%2Fetc%2Fpasswd", "/api/voices//etc/passwd", "/api/voices/ana%00",
    "/api/voices/ana%00.wav", "/api/voices/%00", "/api/voices/..%5Coutside%5Csecret.wav",
    "/api/voices/" + quote("..\uff0foutside\uff0fsecret.wav"), "/api/voices/" + quote("\u2024\u2024/outside"),
    "/api/voices/" + quote("\uff0e\uff0e"), "/api/voices/" + "c" * 5000, "/api/voices/" + quote("\u00e9" * 200),
    "/api/voices/x%0Arequest_id=forged%20status=200", "/api/voices/link_out", "/api/voices/link_out.wav",
    "/api/voices/link_dir", "/api/voices/link_dir%2Fsecret.wav", "/api/voices/.hidden", "/api/voices/nobody",
    "/api/voices/ana/../../outside", "/api/voices/%2e%2e/outside/secret.wav",
]


@pytest.mark.parametrize("path", DELETE_PATHS, ids=lambda p: p[12:52])
def test_hostile_delete_paths(target, unchanged, path):
    status, body = raw_request(target, "DELETE", path)
    assert 400 <= status < 500, (path, status, body[:300])
    assert b'"error"' in body and b"Traceback" not in body
    # A decoded %0A must not start a forged line in the access log.
    assert not [line for line in target.log().splitlines() if line.startswith("request_id=forged")]


def test_symlinks_out_of_the_voices_dir_are_not_listed_or_used(target, unchanged):
    with target.client() as client:
        names = [v["name"] for v in client.get("/api/voices").json()["voices"]]
        assert "link_out" not in names and "link_dir" not in names and "ana" in names
        r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "link_out.wav"})
        assert_clean_4xx(r, "symlink")
        assert "outside" in r.json()["error"]["message"]


# ("link_dir" is a valid new name: the symlink of that name is not a voice, so the upload may create link_dir.wav.)
@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n != "link_dir"] + ["", "ana", "link_out", "Ana!", "-x", "_x", "a b"],
                         ids=lambda n: repr(n)[:40])
def test_hostile_upload_names(target, unchanged, name):
    _, clip = target.files["too_short"]  # never reached: the name is refused (or the voice exists) first
    good = (target.workdir / "files" / "good.wav").read_bytes()
    with target.client() as client:
        for data in (clip, good):
            r = client.post("/api/voices", data={"name": name}, files={"files": ("clip.wav", data, "audio/wav")})
            assert_clean_4xx(r, name)
            assert r.json()["error"]["param"] in ("name", "voice", "files"), r.text


@pytest.mark.parametrize("kind", ["zero_bytes", "truncated_mp3", "truncated_wav", "corrupt_header", "random_bytes",
                                  "text_as_wav", "huge_sample_rate", "zero_sample_rate", "many_channels",
                                  "video_without_audio", "silence", "too_short", "too_long", "too_large"])
def test_hostile_upload_files(target, unchanged, kind):
    filename, data = target.files[kind]
    with target.client() as client:
        r = client.post("/api/voices", data={"name": f"hostile_{kind}"}, files={"files": (filename, data, "audio/wav")})
        assert_clean_4xx(r, kind)
        assert r.status_code == (413 if kind == "too_large" else 422), (kind, r.status_code, r.text)
        # Several clips, one of them hostile: the whole upload is refused.
        good = (target.workdir / "files" / "good.wav").read_bytes()
        r = client.post("/api/voices", data={"name": f"hostile2_{kind}"},
                        files=[("files", ("good.wav", good, "audio/wav")), ("files", (filename, data, "audio/wav"))])
        assert_clean_4xx(r, kind)


@pytest.mark.parametrize("name", ["empty", "notes", "hugerate", "film"])
def test_hostile_files_in_the_voices_dir(target, unchanged, name):
    with target.client() as client:
        r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": name})
        assert_clean_4xx(r, name)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_audio"
        listed = {v["name"]: v for v in client.get("/api/voices").json()["voices"]}
        assert "error" in listed[name]  # listed, with what is wrong with it


@pytest.mark.parametrize("filename", ["../../outside/evil.wav", "/tmp/evil.wav", "..\\..\\evil.wav", ".hidden.wav",
                                      "a" * 500 + ".wav", "\u2024\u2024\uff0fevil.wav", "evil.wav\x00.txt", "../link_out.wav"])
def test_client_file_names_never_choose_a_path(target, filename):
    """The stored clip is named after the voice, whatever file name the client sends."""
    roots = (target.outside, target.workdir)
    before = {str(p) for root in roots for p in root.iterdir()}
    voices_before = snapshot(target.voices_dir)
    good = (target.workdir / "files" / "good.wav").read_bytes()
    with target.client() as client:
        r = client.post("/api/voices", data={"name": "named_by_server"}, files={"files": (filename, good, "audio/wav")})
        assert r.status_code in (201, 400, 422), r.text
        after_upload = snapshot(target.voices_dir)
        if r.status_code == 201:
            assert client.delete("/api/voices/named_by_server").status_code == 200
    new = {k for k in after_upload if k not in voices_before}
    assert new <= {str(target.voices_dir / "named_by_server.wav")}, new
    assert {str(p) for root in roots for p in root.iterdir()} == before
    assert not Path("/tmp/evil.wav").exists()
    assert snapshot(target.voices_dir) == voices_before
