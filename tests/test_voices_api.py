"""Voice management over HTTP: list, upload (single clip and folder), replace, delete, and every
rejection leaving the voices directory exactly as it was."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import httpx
import pytest

from helpers import ServerProcess, make_clip

MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A private server (these tests change its voices), with small limits so the rejections are cheap."""
    server = ServerProcess(tmp_path_factory.mktemp("voices-api"), tiny_model_dir, {
        "TTS_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "TTS_MAX_CLIP_SECONDS": "20"})
    make_clip(server.voices_dir / "ana.wav", seconds=6, freq=220, rate=16000, channels=1)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(srv):
    with srv.client() as client:
        yield client


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    silent = d / "silent.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "5", str(silent)],
                   check=True)
    (d / "not_audio.wav").write_bytes(b"this is not audio at all\n" * 400)
    (d / "empty.mp3").write_bytes(b"")
    return {
        "mp3": make_clip(d / "bob.mp3", seconds=6, freq=150),
        "mp3b": make_clip(d / "fay.mp3", seconds=6, freq=160),
        "wav": make_clip(d / "carl.wav", seconds=5, freq=190, rate=16000, channels=1),
        "ogg": make_clip(d / "carl2.ogg", seconds=4, freq=170),
        "m4a": make_clip(d / "dee.m4a", seconds=5, freq=260),
        "noext": make_clip(d / "clip.flac", seconds=5, freq=210, rate=16000, channels=1).rename(d / "clip_without_extension"),
        "short": make_clip(d / "short.mp3", seconds=1),
        "long": make_clip(d / "long.mp3", seconds=25, freq=120, extra=["-b:a", "32k"]),
        "big": make_clip(d / "big.wav", seconds=6, rate=44100, channels=2),  # ~1 MB > MAX_UPLOAD
        "silent": silent,
        "not_audio": d / "not_audio.wav",
        "empty": d / "empty.mp3",
    }


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under the voices directory, hidden ones included, with a hash of its content."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def upload(http: httpx.Client, name: str | None, *paths: Path, replace: str | None = None) -> httpx.Response:
    data = {} if name is None else {"name": name}
    if replace is not None:
        data["replace"] = replace
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return http.post("/api/voices", data=data, files=files)


def voices(http: httpx.Client) -> dict[str, dict]:
    r = http.get("/api/voices")
    assert r.status_code == 200
    return {v["name"]: v for v in r.json()["voices"]}


def latents(srv) -> set[Path]:
    return set((srv.cache_dir / "latents").rglob("*.pt")) if (srv.cache_dir / "latents").is_dir() else set()


def speak(http: httpx.Client, voice: str) -> httpx.Response:
    return http.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": voice})


# -- listing ---------------------------------------------------------------------------------------
def test_list_describes_each_voice(http):
    ana = voices(http)["ana"]
    assert ana["files"] == ["ana.wav"]
    assert abs(ana["duration_s"] - 6.0) < 0.05
    assert (ana["sample_rate"], ana["channels"]) == (16000, 1)
    assert isinstance(ana["cached"], bool)
    assert speak(http, "ana").status_code == 200
    assert voices(http)["ana"]["cached"] is True


# -- upload ----------------------------------------------------------------------------------------
def test_upload_one_clip_is_stored_conditioned_and_usable(srv, http, clips):
    before = latents(srv)
    r = upload(http, "bob", clips["mp3"])
    assert r.status_code == 201, r.text
    voice = r.json()["voice"]
    assert voice["name"] == "bob" and voice["files"] == ["bob.mp3"] and voice["cached"] is True
    assert abs(voice["duration_s"] - 6.0) < 0.1 and voice["sample_rate"] == 44100 and voice["channels"] == 2
    assert (srv.voices_dir / "bob.mp3").read_bytes() == clips["mp3"].read_bytes()
    assert len(latents(srv) - before) == 1  # conditioning computed at upload
    assert voices(http)["bob"] == voice
    assert speak(http, "bob").status_code == 200
    assert "bob" in {v["id"] for v in http.get("/v1/audio/voices").json()["voices"]}


def test_upload_several_clips_makes_a_folder_voice(srv, http, clips):
    r = upload(http, "carl", clips["wav"], clips["ogg"])
    assert r.status_code == 201, r.text
    voice = r.json()["voice"]
    assert len(voice["files"]) == 2 and all(f.startswith("carl/") for f in voice["files"])
    assert abs(voice["duration_s"] - 9.0) < 0.1
    assert sorted(p.suffix for p in (srv.voices_dir / "carl").iterdir()) == [".ogg", ".wav"]
    assert speak(http, "carl").status_code == 200


def test_upload_m4a_and_a_file_without_extension(srv, http, clips):
    assert upload(http, "dee", clips["m4a"]).status_code == 201
    r = upload(http, "eve", clips["noext"])
    assert r.status_code == 201, r.text
    assert r.json()["voice"]["files"] == ["eve.wav"]  # converted, so the store can recognise it
    assert speak(http, "eve").status_code == 200


def test_duplicate_is_refused_unless_replace(srv, http, clips):
    assert upload(http, "fay", clips["mp3b"]).status_code == 201
    assert speak(http, "fay").status_code == 200
    before = snapshot(srv.voices_dir)
    old_latents = latents(srv)
    r = upload(http, "fay", clips["wav"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "voice_exists"
    assert "replace" in r.json()["error"]["hint"]
    assert snapshot(srv.voices_dir) == before
    r = upload(http, "fay", clips["wav"], replace="true")
    assert r.status_code == 201, r.text
    assert r.json()["voice"]["files"] == ["fay.wav"]
    assert not (srv.voices_dir / "fay.mp3").exists()
    assert (srv.voices_dir / "fay.wav").read_bytes() == clips["wav"].read_bytes()
    assert len(latents(srv)) == len(old_latents)  # the old clip's latents went, the new one's came
    assert speak(http, "fay").status_code == 200


# -- rejections ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", "", "x" * 65, "ñame", "a b", "-dash", "semi;colon"])
def test_bad_names_are_refused(srv, http, clips, name):
    before = snapshot(srv.voices_dir)
    r = upload(http, name, clips["mp3"])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_voice_name" and r.json()["error"]["param"] == "name"
    assert snapshot(srv.voices_dir) == before


@pytest.mark.parametrize(("clip", "status", "code", "words"), [
    ("big", 413, "upload_too_large", "limit"),
    ("not_audio", 422, "invalid_audio", "not an audio file"),
    ("empty", 422, "invalid_audio", "empty"),
    ("short", 422, "invalid_audio", "at least 2 s"),
    ("long", 422, "invalid_audio", "the limit is 20 s"),
    ("silent", 422, "invalid_audio", "silent"),  # passes the checks, fails at conditioning: nothing kept
])
def test_bad_clips_are_refused_and_nothing_is_stored(srv, http, clips, clip, status, code, words):
    before = snapshot(srv.voices_dir)
    r = upload(http, "newvoice", clips[clip])
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"], error
    if status == 422:
        assert clips[clip].name in error["message"]  # names the uploaded file, not a temporary one
    assert snapshot(srv.voices_dir) == before
    assert "newvoice" not in voices(http)


def test_one_bad_clip_refuses_the_whole_folder(srv, http, clips):
    before = snapshot(srv.voices_dir)
    r = upload(http, "mixed", clips["wav"], clips["short"])
    assert r.status_code == 422
    assert snapshot(srv.voices_dir) == before


@pytest.mark.parametrize("case", ["no_files", "no_name", "not_multipart", "too_many_files", "bad_replace"])
def test_malformed_uploads_are_refused(srv, http, clips, case):
    before = snapshot(srv.voices_dir)
    if case == "no_files":
        r = http.post("/api/voices", data={"name": "x1"}, files={"other": ("a.txt", b"hi")})
    elif case == "no_name":
        r = upload(http, None, clips["mp3"])
    elif case == "not_multipart":
        r = http.post("/api/voices", json={"name": "x1"})
    elif case == "too_many_files":
        r = upload(http, "x1", *[clips["short"]] * 11)
    else:
        r = upload(http, "x1", clips["mp3"], replace="maybe")
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]
    assert snapshot(srv.voices_dir) == before


# -- delete ----------------------------------------------------------------------------------------
def test_delete_removes_clips_and_cached_conditioning(srv, http, clips):
    assert upload(http, "gus", clips["m4a"], clips["ogg"]).status_code == 201
    with_gus = latents(srv)
    assert (srv.voices_dir / "gus").is_dir()
    r = http.delete("/api/voices/gus")
    assert r.status_code == 200 and r.json()["deleted"] == "gus"
    assert not (srv.voices_dir / "gus").exists()
    assert "gus" not in voices(http)
    assert len(with_gus - latents(srv)) == 1
    assert speak(http, "gus").status_code == 404
    assert http.delete("/api/voices/gus").status_code == 404
    assert upload(http, "gus", clips["mp3"]).status_code == 201  # the name is free again


def test_deleting_the_default_voice_clears_the_default(srv, http, clips):
    assert upload(http, "hal", clips["mp3"]).status_code == 201
    assert http.post("/api/config", json={"voice_sample": "hal"}).status_code == 200
    assert http.get("/").json()["config"]["voice_sample"] == "hal"
    assert http.delete("/api/voices/hal").status_code == 200
    assert http.get("/").json()["config"]["voice_sample"] is None
    r = http.post("/api/tts/batch", json={"text": "Hola."})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_voice"


@pytest.mark.parametrize("name", ["..", "..%2F..%2Fetc", ".hidden"])
def test_delete_refuses_names_outside_the_directory(srv, http, name):
    before = snapshot(srv.voices_dir)
    r = http.delete(f"/api/voices/{name}")
    assert r.status_code in (400, 404), r.text
    assert snapshot(srv.voices_dir) == before
