"""Voice management over HTTP on the real model: list, upload (single clip and folder), replace, delete.
(Every rejection leaving the voices directory exactly as it was: test_refusals_unit.py.)"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from helpers import ServerProcess, make_clip
from helpers import dir_snapshot as snapshot
from helpers import upload_voice as upload

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


# -- rejections: test_refusals_unit.py (the fake engine; nothing there needs the model)


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
