"""Every refusal of the speech routes (native and OpenAI), in-process on the fake engine (tests/fake_engine.py): the right
status, a stable code, a message saying what is wrong and a hint saying how to fix it, and nothing spoken.
None of these needs the real model (they are decided before the engine runs); they used to boot real servers
in test_streaming.py and test_openai.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import openai
import pytest

from fake_engine import FakeEngine
from helpers import assert_error, make_clip
from helpers import dir_snapshot as snapshot
from helpers import upload_voice as upload
from test_voices_api import MAX_UPLOAD

pytestmark = pytest.mark.unit

VOICES = {"ana": 220.0, "my_voice_sample": 180.0}


@pytest.fixture
def app(fake_app):
    return fake_app(voices=VOICES)


def still_serving(client, engine: FakeEngine) -> None:
    before = len(engine.spoken)
    r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"})
    assert r.status_code == 200 and r.content[:4] == b"RIFF"
    assert len(engine.spoken) == before + 1


@pytest.mark.parametrize("endpoint", ["batch", "stream"])
@pytest.mark.parametrize(("body", "status", "code", "says"), [
    ({"text": "", "voice_sample": "ana"}, 400, "invalid_text", "empty"),
    ({"text": "   \n\t  ", "voice_sample": "ana"}, 400, "invalid_text", "empty"),
    ({"text": "a" * 5001, "voice_sample": "ana"}, 413, "text_too_long", "5000"),
    ({"voice_sample": "ana"}, 422, "invalid_request", "text"),
    ({"text": "Hola.", "voice_sample": "ana", "language": "xx"}, 400, "unsupported_language", "xx"),
    ({"text": "Hola.", "voice_sample": "nobody"}, 404, "voice_not_found", "nobody"),
])
def test_request_errors(app, endpoint: str, body: dict, status: int, code: str, says: str) -> None:
    client, engine = app
    spoken = len(engine.spoken)
    error = assert_error(client.post(f"/api/tts/{endpoint}", json=body), status, code)
    assert says in error["message"]
    assert len(engine.spoken) == spoken
    still_serving(client, engine)


def test_error_messages_list_what_is_available(app) -> None:
    client, _ = app
    r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana", "language": "klingon"})
    hint = assert_error(r, 400, "unsupported_language")["hint"]
    assert all(code in hint for code in FakeEngine.languages)
    r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "nobody.wav"})
    message = assert_error(r, 404, "voice_not_found")["message"]
    assert "ana" in message and "my_voice_sample" in message
    r = client.post("/api/tts/batch", json={"text": "x" * 6000, "voice_sample": "ana"})
    assert "TTS_MAX_TEXT_CHARS" in assert_error(r, 413, "text_too_long")["hint"]


@pytest.mark.parametrize("name", [
    "../ana.wav", "../../etc/passwd", "/etc/passwd", "..", "voices/../ana.wav", "..\\ana.wav", "ana.wav\x00.mp3",
    ".hidden.wav",
])
def test_voice_names_that_leave_the_directory(app, name: str) -> None:
    client, engine = app
    assert_error(client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": name}), 400, "invalid_voice_name")
    still_serving(client, engine)


def test_symlinks_pointing_out_are_refused(app, tmp_path: Path) -> None:
    client, engine = app
    voices = client.app.state.settings.voices_dir
    conditioned = engine.conditioned  # the warm-up conditions a noise clip
    outside = tmp_path / "outside"
    make_clip(outside / "secret.wav", seconds=4)
    (voices / "escape.wav").symlink_to(outside / "secret.wav")
    (voices / "escape_dir").symlink_to(outside, target_is_directory=True)
    for name in ("escape.wav", "escape_dir"):
        r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": name})
        assert_error(r, 400, "invalid_voice_name")
    # not listed either, so its stem is just unknown
    r = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "escape"})
    assert_error(r, 404, "voice_not_found")
    assert engine.conditioned == conditioned  # the clip outside was never read
    still_serving(client, engine)


def _not_audio(path: Path) -> None:
    path.write_text("This is a text file with an audio extension.\n" * 40)


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _truncated(path: Path) -> None:  # an M4A cut in half: its index (moov atom) is gone
    make_clip(path, seconds=6)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _short(path: Path) -> None:
    make_clip(path, seconds=1.5)


def _silent(path: Path) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo", "-t", "6",
                    str(path)], check=True)


@pytest.mark.parametrize(("filename", "make", "says"), [
    ("bad_text.wav", _not_audio, "not an audio file"),
    ("bad_random.mp3", _random_bytes, "not an audio file"),
    ("bad_truncated.m4a", _truncated, "corrupt"),
    ("bad_empty.flac", _empty, "empty"),
    ("bad_short.wav", _short, "2 s"),
    ("bad_silent.ogg", _silent, "silent"),
])
def test_unusable_clips(app, filename: str, make, says: str) -> None:
    client, engine = app
    conditioned = engine.conditioned
    make(client.app.state.settings.voices_dir / filename)
    for endpoint in ("batch", "stream"):
        r = client.post(f"/api/tts/{endpoint}", json={"text": "Hola.", "voice_sample": filename})
        error = assert_error(r, 422, "invalid_audio")
        assert says in error["message"], error
        assert "5-15 s" in error["hint"], error
    assert engine.conditioned == conditioned
    still_serving(client, engine)


def test_no_voice_and_no_default(fake_app) -> None:
    client, engine = fake_app(voices={"long_voice": 200.0})
    spoken = len(engine.spoken)
    assert client.get("/").json()["config"]["voice_sample"] is None
    for endpoint in ("batch", "stream"):
        error = assert_error(client.post(f"/api/tts/{endpoint}", json={"text": "Hola."}), 400, "no_voice")
        assert "/api/config" in error["hint"] and "long_voice" in error["hint"]
    assert len(engine.spoken) == spoken


# -- the OpenAI route: OpenAI's error envelope, as the official SDK reads it ------------------------------
@pytest.mark.parametrize(("kwargs", "exc", "param", "code"), [
    ({"model": "gpt-4o-tts"}, openai.BadRequestError, "model", "invalid_parameter"),
    ({"response_format": "ogg"}, openai.BadRequestError, "response_format", "unsupported_format"),
    ({"speed": 4.5}, openai.BadRequestError, "speed", "invalid_parameter"),
    ({"speed": 0.1}, openai.BadRequestError, "speed", "invalid_parameter"),
    ({"input": "   "}, openai.BadRequestError, "input", "invalid_text"),
    ({"voice": "nobody"}, openai.NotFoundError, "voice", "voice_not_found"),
    ({"voice": "../ana"}, openai.BadRequestError, "voice", "invalid_voice_name"),
    ({"stream_format": "chunks"}, openai.BadRequestError, "stream_format", "invalid_parameter"),
])
def test_openai_errors(app, kwargs, exc, param, code):
    client, engine = app
    sdk = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="not-needed", max_retries=0, http_client=client)
    spoken = len(engine.spoken)
    with pytest.raises(exc) as err:
        sdk.audio.speech.create(**{"model": "tts-1", "voice": "ana", "input": "Hola.", **kwargs})
    body = err.value.body  # the SDK unwraps {"error": {...}}
    assert body["param"] == param and body["code"] == code
    assert body["type"] == "invalid_request_error" and body["message"]
    assert len(engine.spoken) == spoken


def test_openai_error_envelope_shape(app):
    client, _ = app
    r = client.post("/v1/audio/speech", json={"model": "nope", "input": "x", "voice": "ana"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"error"}
    assert {"message", "type", "param", "code"} <= set(r.json()["error"])


# -- POST /api/config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "status", "code"), [
    ({"voice_sample": "nobody.wav"}, 404, "voice_not_found"),
    ({"voice_sample": "broken.wav"}, 422, "invalid_audio"),
    ({"voice_sample": "../bob.wav"}, 400, "invalid_voice_name"),
    ({"language": "xx"}, 400, "unsupported_language"),
    ({"voice_sample": "carla.wav", "language": "xx"}, 400, "unsupported_language"),
])
def test_a_refused_default_keeps_the_old_one(fake_app, body: dict, status: int, code: str) -> None:
    client, engine = fake_app(voices={"bob": 140.0, "carla": 260.0})
    (client.app.state.settings.voices_dir / "broken.wav").write_bytes(b"this is not audio, just text\n" * 50)
    assert client.post("/api/config", json={"voice_sample": "bob.wav", "language": "es"}).status_code == 200
    assert_error(client.post("/api/config", json=body), status, code)
    assert client.get("/").json()["config"] == {"voice_sample": "bob.wav", "language": "es"}
    still = client.post("/api/tts/batch", json={"text": "Hola."})  # still serving, with the old defaults
    assert still.status_code == 200 and still.headers["content-language"] == "es"


# -- POST /api/voices, DELETE /api/voices/{name} -----------------------------------------------------------
@pytest.fixture
def uploads(fake_app):
    """The app with test_voices_api.py's small limits: (client, engine, voices directory)."""
    client, engine = fake_app(max_upload_bytes=MAX_UPLOAD, max_clip_seconds=20)
    return client, engine, client.app.state.settings.voices_dir


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", "", "x" * 65, "ñame", "a b", "-dash", "semi;colon"])
def test_bad_names_are_refused(uploads, clips, name):
    client, _, voices_dir = uploads
    before = snapshot(voices_dir)
    error = assert_error(upload(client, name, clips["mp3"]), 400, "invalid_voice_name")
    assert error["param"] == "name"
    assert snapshot(voices_dir) == before


@pytest.mark.parametrize(("clip", "status", "code", "words"), [
    ("big", 413, "upload_too_large", "limit"),
    ("not_audio", 422, "invalid_audio", "not an audio file"),
    ("empty", 422, "invalid_audio", "empty"),
    ("short", 422, "invalid_audio", "at least 2 s"),
    ("long", 422, "invalid_audio", "the limit is 20 s"),
    ("silent", 422, "invalid_audio", "silent"),
])
def test_bad_clips_are_refused_and_nothing_is_stored(uploads, clips, clip, status, code, words):
    client, engine, voices_dir = uploads
    before, conditioned = snapshot(voices_dir), engine.conditioned
    error = assert_error(upload(client, "newvoice", clips[clip]), status, code)
    assert words in error["message"], error
    if status == 422:
        assert clips[clip].name in error["message"]  # names the uploaded file, not a temporary one
    assert snapshot(voices_dir) == before
    assert "newvoice" not in {v["name"] for v in client.get("/api/voices").json()["voices"]}
    assert engine.conditioned == conditioned


def test_one_bad_clip_refuses_the_whole_folder(uploads, clips):
    client, _, voices_dir = uploads
    before = snapshot(voices_dir)
    assert_error(upload(client, "mixed", clips["wav"], clips["short"]), 422, "invalid_audio")
    assert snapshot(voices_dir) == before


@pytest.mark.parametrize("case", ["no_files", "no_name", "not_multipart", "too_many_files", "bad_replace"])
def test_malformed_uploads_are_refused(uploads, clips, case):
    client, _, voices_dir = uploads
    before = snapshot(voices_dir)
    if case == "no_files":
        r = client.post("/api/voices", data={"name": "x1"}, files={"other": ("a.txt", b"hi")})
    elif case == "no_name":
        r = upload(client, None, clips["mp3"])
    elif case == "not_multipart":
        r = client.post("/api/voices", json={"name": "x1"})
    elif case == "too_many_files":
        r = upload(client, "x1", *[clips["short"]] * 11)
    else:
        r = upload(client, "x1", clips["mp3"], replace="maybe")
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"] and "Traceback" not in r.text
    assert snapshot(voices_dir) == before


@pytest.mark.parametrize("name", ["..", "..%2F..%2Fetc", ".hidden"])
def test_delete_refuses_names_outside_the_directory(uploads, name):
    client, _, voices_dir = uploads
    before = snapshot(voices_dir)
    r = client.delete(f"/api/voices/{name}")
    assert r.status_code in (400, 404), r.text
    assert snapshot(voices_dir) == before
