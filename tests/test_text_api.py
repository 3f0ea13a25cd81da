"""Text over HTTP: a hostile text cannot freeze the server (issue 9 #2), and text that the model's number
expansion cannot take is spoken, or refused with a clear 4xx before a stream promises audio (issue 9 #8)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from helpers import WAV_HEADER, ffmpeg_decode

VOICE = "ana"
REDOS = "..[" + " ".join(["111"] * 12) + "]"  # 51 characters: hours of backtracking for pysbd
LONG_ADVERSARIAL = "..[" + " ".join(["111"] * 120) + "]"  # 483 characters of it: several pieces


def post(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST JSON as JSON escapes (a lone surrogate is legal there, "\\ud800", but not in UTF-8)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def test_a_hostile_text_does_not_block_health(server) -> None:
    latencies: list[float] = []
    stop = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started if ok else float("inf"))
                time.sleep(0.05)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        with server.client(timeout=60) as client:
            for text in (REDOS, LONG_ADVERSARIAL):
                r = post(client, "/api/tts/batch", {"text": text, "voice_sample": VOICE, "language": "es"})
                assert r.status_code == 200, r.text
                assert ffmpeg_decode(r.content)[1] > 0
    finally:
        stop.set()
        poller.join()
    # Events, not a latency threshold (a busy machine is slow, not frozen): /health kept answering while the
    # hostile texts were split and spoken, every poll within the client's 5 s timeout (pysbd froze it for minutes).
    assert len(latencies) >= 3
    assert all(t != float("inf") for t in latencies), sorted(latencies)[-5:]


# Ordinary text whose numbers coqui's tokenizer (num2words) cannot expand: it raised, and the service
# answered 500 on batch and 200 with no audio on the streams.
NUMBER_TEXTS = {
    "hindi digit": ("मेरे पास 5 सेब हैं।", "hi"),  # num2words has no Hindi
    "czech ordinal": ("Dne 5. května jsem přišel.", "cs"),  # num2words cannot say Czech ordinals
    "huge spanish number": ("Tengo 1" + "0" * 27 + " euros.", "es"),  # >= 10**27: OverflowError
    "400 digits": ("1" * 400, "es"),
    "lone surrogate": ("hola \ud800 mundo", "es"),  # JSON "\ud800": the tokenizer cannot take it
}
ROUTES = {
    "batch": ("/api/tts/batch", lambda text, lang: {"text": text, "voice_sample": VOICE, "language": lang}),
    "stream wav": ("/api/tts/stream", lambda text, lang: {"text": text, "voice_sample": VOICE, "language": lang}),
    "stream mp3": ("/api/tts/stream", lambda text, lang: {"text": text, "voice_sample": VOICE, "language": lang,
                                                         "format": "mp3"}),
    "openai speech": ("/v1/audio/speech", lambda text, lang: {"model": "tts-1", "input": text, "voice": VOICE,
                                                              "language": lang, "response_format": "mp3"}),
}


def speak(server, route: str, text: str, language: str) -> httpx.Response:
    path, body = ROUTES[route]
    with server.client(timeout=120) as client:
        return post(client, path, body(text, language))


def assert_refused(r: httpx.Response, status: int, code: str) -> None:
    """A clear JSON error, not audio: what a stream must answer when the text fails."""
    assert r.status_code == status, (r.status_code, r.headers.get("content-type"), r.content[:200])
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["hint"], error


# Every case on every route, but the slow 400 digits (9 pieces) only on one batch and one stream route.
NUMBER_CASES = [(case, route) for case in NUMBER_TEXTS for route in ROUTES
                if case != "400 digits" or route in ("batch", "stream wav")]


@pytest.mark.parametrize(("case", "route"), NUMBER_CASES)
def test_numbers_the_tokenizer_cannot_expand_are_spoken(server, route: str, case: str) -> None:
    text, language = NUMBER_TEXTS[case]
    r = speak(server, route, text, language)
    assert r.status_code == 200, r.text[:500]
    assert ffmpeg_decode(r.content)[1] > 0, "200 with real, decodable audio"
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("route", ROUTES)
def test_text_the_model_cannot_speak_is_refused_before_any_audio(server, route: str) -> None:
    # 239 characters at most, but "por ciento" 200 times is too many tokens for one piece
    r = speak(server, route, "%" * 200, "es")
    assert_refused(r, 400, "invalid_text")
    assert "too long for the model" in r.json()["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("text", ["... ¡¿!? «»", ".", "..."])
def test_text_with_nothing_to_speak_is_a_short_pause(server, route: str, text: str) -> None:
    """Only punctuation: a quarter second of silence, not babble and not an error (Home Assistant checks a
    server's key by asking it to speak "." or "...")."""
    r = speak(server, route, text, "es")
    assert r.status_code == 200, r.text[:300]
    if route == "stream wav":  # a streamed WAV's header has no length: count the PCM after it
        seconds = (len(r.content) - WAV_HEADER) / 2 / 24_000
    else:
        seconds = ffmpeg_decode(r.content)[1]
    assert 0.2 <= seconds <= 0.45, seconds  # 0.25 s, plus the encoder's padding for mp3
