"""Which language a request is spoken in: codes in any common spelling ("zh", "zh-CN", "es-ES"), "auto"
(detected from the text), a voice's own language, and the order between them (issue 9, items 15 and 23).

The tiny random model speaks noise, so the tests read the language the service chose from the
`Content-Language` response header."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from helpers import ServerProcess, make_clip
from offline_tts import language
from offline_tts.engine.random_model import LANGUAGES
from offline_tts.errors import UnsupportedLanguage

ENGLISH = "The weather is really nice this morning, so we are going to the beach."
SPANISH = "El tiempo está muy agradable esta mañana, así que vamos a la playa."


def spoken_language(client: httpx.Client, path: str, body: dict) -> str:
    """The Content-Language of a streamed answer; the stream is closed after its headers (no synthesis wasted)."""
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            raise AssertionError(f"{r.status_code}: {r.text}")
        return r.headers["content-language"]


def error_of(r: httpx.Response) -> dict:
    return r.json()["error"]


# -- normalizing codes (item 15) -------------------------------------------------------------------
@pytest.mark.parametrize(("code", "expected"), [
    ("zh", "zh-cn"), ("zh-CN", "zh-cn"), ("zh_cn", "zh-cn"), ("ZH-Hans", "zh-cn"), ("zh-Hant-TW", "zh-cn"),
    ("es-ES", "es"), ("es_419", "es"), ("pt-BR", "pt"), ("EN", "en"), (" ja ", "ja"), ("auto", "auto"),
])
def test_codes_normalize_to_the_model_code(code: str, expected: str) -> None:
    assert language.normalize(code, LANGUAGES) == expected


@pytest.mark.parametrize("code", ["xx", "", "zh-", "-cn", "zh--cn", "english", "auto-en"])
def test_unknown_codes_are_refused(code: str) -> None:
    with pytest.raises(UnsupportedLanguage) as info:
        language.normalize(code, LANGUAGES)
    assert "zh-cn" in info.value.hint and "auto" in info.value.hint


def test_auto_is_not_a_fallback_language() -> None:
    with pytest.raises(UnsupportedLanguage):
        language.normalize("auto", LANGUAGES, allow_auto=False)


# -- detection (item 23) ---------------------------------------------------------------------------
SENTENCES = {
    "en": "Can you tell me where the station is?", "es": "¿Puedes decirme dónde está la estación?",
    "fr": "Pouvez-vous me dire où se trouve la gare ?", "de": "Kannst du mir sagen, wo der Bahnhof ist?",
    "it": "Puoi dirmi dov'è la stazione?", "pt": "Pode dizer-me onde fica a estação?",
    "pl": "Czy możesz mi powiedzieć, gdzie jest dworzec?", "tr": "Bana istasyonun nerede olduğunu söyler misin?",
    "ru": "Вы можете сказать мне, где вокзал?", "nl": "Kun je me vertellen waar het station is?",
    "cs": "Můžete mi říct, kde je nádraží?", "ar": "هل يمكنك أن تخبرني أين المحطة؟", "zh-cn": "你能告诉我火车站在哪里吗？",
    "ja": "駅がどこにあるか教えてもらえますか？", "hu": "Meg tudnád mondani, hol van az állomás?",
    "ko": "역이 어디에 있는지 알려 주시겠어요?", "hi": "क्या आप मुझे बता सकते हैं कि स्टेशन कहाँ है?",
}


def test_detection_knows_every_model_language() -> None:
    assert set(SENTENCES) == set(LANGUAGES)
    detected = {lang: language.detect(text, LANGUAGES, "fallback") for lang, text in SENTENCES.items()}
    assert detected == {lang: lang for lang in SENTENCES}


@pytest.mark.parametrize("text", ["OK.", "Hello.", "123", "!!!", "Maria."])
def test_text_too_short_to_tell_gets_the_fallback(text: str) -> None:
    assert language.detect(text, LANGUAGES, "de") == "de"


# -- over HTTP, the shared server (TTS_LANGUAGE=es, voices without a language) ---------------------
def test_plain_and_regional_codes_are_accepted(server: ServerProcess) -> None:
    with server.client() as c:
        r = c.post("/api/tts/batch", json={"text": "你好，世界。", "voice_sample": "ana", "language": "zh"})
        assert r.status_code == 200, r.text
        assert r.headers["content-language"] == "zh-cn"
        for code, expected in [("zh-CN", "zh-cn"), ("zh_cn", "zh-cn"), ("es-ES", "es"), ("pt-BR", "pt")]:
            body = {"text": "你好，世界。", "voice_sample": "ana", "language": code}
            assert spoken_language(c, "/api/tts/stream", body) == expected


@pytest.mark.parametrize(("path", "field"), [("/api/tts/stream", "text"), ("/v1/audio/speech", "input")])
def test_auto_detects_the_text_language(server: ServerProcess, path: str, field: str) -> None:
    with server.client() as c:
        for text, expected in [(ENGLISH, "en"), (SPANISH, "es")]:
            body = {field: text, "voice_sample": "ana", "voice": "ana", "model": "tts-1", "language": "auto"}
            assert spoken_language(c, path, body) == expected


def test_auto_falls_back_to_the_default_language_on_short_text(server: ServerProcess) -> None:
    with server.client() as c:
        assert spoken_language(c, "/api/tts/stream", {"text": "OK.", "voice_sample": "ana", "language": "auto"}) == "es"


def test_an_unknown_code_is_a_clear_400(server: ServerProcess) -> None:
    with server.client() as c:
        r = c.post("/api/tts/stream", json={"text": "Hola.", "voice_sample": "ana", "language": "xx"})
        assert r.status_code == 400
        assert error_of(r)["code"] == "unsupported_language"


# -- a private server: TTS_LANGUAGE=auto, voices with their own language ----------------------------
@pytest.fixture(scope="module")
def auto_srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    server = ServerProcess(tmp_path_factory.mktemp("lang-auto"), tiny_model_dir,
                           {"TTS_LANGUAGE": "auto", "TTS_LANGUAGE_FALLBACK": "fr"})
    for name in ("plain", "english", "chinese", "broken"):
        make_clip(server.voices_dir / f"{name}.wav", seconds=4, freq=200, rate=16000, channels=1)
    (server.voices_dir / "english.json").write_text('{"language": "en"}')  # written by hand for a dropped clip
    (server.voices_dir / "chinese.json").write_text('{"language": "zh"}')
    (server.voices_dir / "broken.json").write_text('{"language": ')
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upload_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("lang-clips") / "up.wav", seconds=4, freq=240, rate=16000, channels=1)


def test_an_openai_client_gets_the_voice_language_without_sending_one(auto_srv: ServerProcess) -> None:
    with auto_srv.client() as c:
        body = {"model": "tts-1", "input": SPANISH, "voice": "english"}  # the voice's language wins over auto
        assert spoken_language(c, "/v1/audio/speech", body) == "en"
        body = {"text": ENGLISH, "voice_sample": "chinese"}
        assert spoken_language(c, "/api/tts/stream", body) == "zh-cn"


def test_the_request_language_wins_over_the_voice_language(auto_srv: ServerProcess) -> None:
    with auto_srv.client() as c:
        assert spoken_language(c, "/api/tts/stream", {"text": SPANISH, "voice_sample": "english", "language": "es"}) == "es"
        body = {"text": SPANISH, "voice_sample": "english", "language": "auto"}
        assert spoken_language(c, "/api/tts/stream", body) == "es"


def test_language_auto_setting_detects_for_voices_without_a_language(auto_srv: ServerProcess) -> None:
    with auto_srv.client() as c:
        assert c.get("/").json()["config"]["language"] == "auto"
        for text, expected in [(ENGLISH, "en"), (SPANISH, "es"), ("OK.", "fr")]:  # fr: TTS_LANGUAGE_FALLBACK
            assert spoken_language(c, "/v1/audio/speech", {"model": "tts-1", "input": text, "voice": "plain"}) == expected


def test_short_text_falls_back_to_the_voice_language(auto_srv: ServerProcess) -> None:
    with auto_srv.client() as c:
        assert spoken_language(c, "/api/tts/stream", {"text": "OK.", "voice_sample": "english", "language": "auto"}) == "en"


def test_config_language_normalizes_and_accepts_auto(auto_srv: ServerProcess) -> None:
    with auto_srv.client() as c:
        try:
            r = c.post("/api/config", json={"language": "zh"})
            assert r.status_code == 200, r.text
            assert r.json()["config"]["language"] == "zh-cn"
            assert spoken_language(c, "/api/tts/stream", {"text": ENGLISH, "voice_sample": "plain"}) == "zh-cn"
            assert spoken_language(c, "/api/tts/stream", {"text": ENGLISH, "voice_sample": "english"}) == "en"
        finally:
            r = c.post("/api/config", json={"language": "auto"})
        assert r.status_code == 200 and r.json()["config"]["language"] == "auto"
        assert spoken_language(c, "/api/tts/stream", {"text": ENGLISH, "voice_sample": "plain"}) == "en"


def test_voices_list_their_language(auto_srv: ServerProcess) -> None:
    with auto_srv.client() as c:
        voices = {v["name"]: v for v in c.get("/api/voices").json()["voices"]}
    assert voices["english"]["language"] == "en"
    assert voices["chinese"]["language"] == "zh-cn"
    assert voices["plain"]["language"] is None and "error" not in voices["plain"]
    assert voices["broken"]["language"] is None and "settings file" in voices["broken"]["error"]


def test_a_broken_voice_settings_file_is_a_clear_error(auto_srv: ServerProcess) -> None:
    with auto_srv.client() as c:
        r = c.post("/api/tts/stream", json={"text": ENGLISH, "voice_sample": "broken"})
        assert r.status_code == 400
        error = error_of(r)
        assert error["code"] == "unsupported_language" and "broken.json" in error["message"]
        assert str(auto_srv.voices_dir) not in r.text  # no server path in the message or hint
        # a request that names its language does not need the voice's
        assert spoken_language(c, "/api/tts/stream", {"text": ENGLISH, "voice_sample": "broken", "language": "en"}) == "en"


def test_upload_with_a_language(auto_srv: ServerProcess, upload_clip: Path) -> None:
    with auto_srv.client() as c:
        r = c.post("/api/voices", data={"name": "uploaded", "language": "en-US"},
                   files={"files": ("up.wav", upload_clip.read_bytes(), "audio/wav")})
        assert r.status_code == 201, r.text
        assert r.json()["voice"]["language"] == "en"
        assert json.loads((auto_srv.voices_dir / "uploaded.json").read_text()) == {"language": "en"}
        body = {"model": "tts-1", "input": SPANISH, "voice": "uploaded"}
        assert spoken_language(c, "/v1/audio/speech", body) == "en"

        assert c.delete("/api/voices/uploaded").status_code == 200  # the settings go with the voice
        assert not (auto_srv.voices_dir / "uploaded.json").exists()


@pytest.mark.parametrize("code", ["xx", "klingon", "zh-"])
def test_upload_with_an_unknown_language_is_refused(auto_srv: ServerProcess, upload_clip: Path, code: str) -> None:
    before = sorted(p.name for p in auto_srv.voices_dir.iterdir())
    with auto_srv.client() as c:
        r = c.post("/api/voices", data={"name": "refused", "language": code},
                   files={"files": ("up.wav", upload_clip.read_bytes(), "audio/wav")})
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "unsupported_language"
    assert sorted(p.name for p in auto_srv.voices_dir.iterdir()) == before
