"""The OpenAI-compatible API, driven with the official `openai` package against the real server."""

from __future__ import annotations

import base64
import json
import math
import time

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from helpers import RATE, ffmpeg_decode, make_clip, wav_stream_info
from test_formats import DECODED_RATE, MEDIA_TYPES

TEXT = "Hola mundo. Esto es una prueba."  # two sentences


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference_seconds(client) -> float:
    """Length of TEXT in voice 'ana' (raw PCM): every format must decode to about this."""
    pcm = client.audio.speech.create(model="tts-1", voice="ana", input=TEXT, response_format="pcm").content
    assert pcm and len(pcm) % 2 == 0
    return len(pcm) / 2 / RATE


def decode(data: bytes, fmt: str) -> tuple[int, float]:
    if fmt == "pcm":
        assert len(data) % 2 == 0
        return RATE, len(data) / 2 / RATE
    if fmt == "wav":
        rate, channels, seconds = wav_stream_info(data)
        assert channels == 1
        return rate, seconds
    return ffmpeg_decode(data)


def sse_events(lines) -> list[dict]:
    """Parse a server-sent event stream event by event (blank line = end of an event)."""
    events, data = [], []
    for line in lines:
        if line == "":
            if data:
                events.append(json.loads("\n".join(data)))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        else:
            assert line.startswith((":", "event:", "id:", "retry:")), line
    assert not data, "stream ended in the middle of an event"
    return events


# -- listing ---------------------------------------------------------------------------------------
def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert {"tts-1", "tts-1-hd", "xtts-v2"} <= set(ids)


def test_voices_list(server):
    body = httpx.get(server.url + "/v1/audio/voices").json()
    ids = {v["id"] for v in body["voices"]}
    assert {"ana", "my_voice_sample"} <= ids
    assert all(v["name"] == v["id"] for v in body["voices"])
    assert body["data"] == body["voices"]
    models = httpx.get(server.url + "/v1/audio/models").json()  # what Open WebUI asks for
    assert {"tts-1", "tts-1-hd"} <= {m["id"] for m in models["models"]}


# -- speech ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format(client, reference_seconds, fmt):
    response = client.audio.speech.create(model="tts-1", voice="ana", input=TEXT, response_format=fmt)
    assert response.response.headers["content-type"] == MEDIA_TYPES[fmt]
    rate, seconds = decode(response.content, fmt)
    assert rate == DECODED_RATE.get(fmt, RATE)
    assert abs(seconds - reference_seconds) < 0.15, (seconds, reference_seconds)


def test_every_sentence_is_spoken_within_the_audio_cap(client, reference_seconds):
    """TEXT's two sentences are both spoken (longer than its first alone), each within the test server's
    TTS_MAX_AUDIO_TOKENS=24 (24 tokens of 1024 samples at 22.05 kHz)."""
    first = client.audio.speech.create(model="tts-1", voice="ana", input=TEXT.split(". ")[0] + ".",
                                       response_format="pcm").content
    first_seconds = len(first) / 2 / RATE
    assert 0 < first_seconds < reference_seconds <= 2 * 24 * 1024 / 22_050 + 0.05, (first_seconds, reference_seconds)


def test_mp3_is_the_default_and_models_are_accepted(client):
    for model in ("tts-1", "tts-1-hd", "xtts-v2"):
        response = client.audio.speech.create(model=model, voice="my_voice_sample", input="Hola.")
        assert response.response.headers["content-type"] == "audio/mpeg"
        assert ffmpeg_decode(response.content)[0] == RATE


@pytest.mark.parametrize("fmt", ["mp3", "opus", "pcm"])
def test_streaming_response(client, reference_seconds, fmt):
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="ana", input=TEXT, response_format=fmt
    ) as response:
        assert response.headers["content-type"] == MEDIA_TYPES[fmt]
        assert response.headers.get("transfer-encoding") == "chunked"
        parts = [part for part in response.iter_bytes() if part]
    assert len(parts) > 1  # arrived piece by piece, as generated
    rate, seconds = decode(b"".join(parts), fmt)
    assert rate == DECODED_RATE.get(fmt, RATE)
    assert abs(seconds - reference_seconds) < 0.15


@pytest.mark.parametrize("fmt", ["pcm", "mp3"])
def test_sse(client, reference_seconds, fmt):
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="ana", input=TEXT, response_format=fmt, stream_format="sse"
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    *deltas, done = events
    assert deltas and all(e["type"] == "speech.audio.delta" and set(e) == {"type", "audio"} for e in deltas)
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    audio = b"".join(base64.b64decode(e["audio"], validate=True) for e in deltas)
    rate, seconds = decode(audio, fmt)
    assert rate == RATE and abs(seconds - reference_seconds) < 0.15
    if fmt == "pcm":  # one XTTS audio token is 1024 samples at 22.05 kHz (not 1024 output samples at 24 kHz)
        assert usage["output_tokens"] == math.ceil(len(audio) / 2 / RATE * 22_050 / 1024)


def test_speed_is_applied(client):
    def seconds(speed: float) -> float:
        pcm = client.audio.speech.create(model="tts-1", voice="ana", input="Hola mundo.", response_format="pcm",
                                         speed=speed).content
        return len(pcm) / 2 / RATE

    normal, fast, slow = seconds(1.0), seconds(2.0), seconds(0.5)
    assert fast < normal * 0.75 and slow > normal * 1.5


def test_language_extension_and_ignored_instructions(client):
    response = client.audio.speech.create(model="tts-1", voice="ana", input="Hello there.", response_format="pcm",
                                          instructions="Speak cheerfully.", extra_body={"language": "en"})
    assert len(response.content) > 0
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts-1", voice="ana", input="Hola.", extra_body={"language": "xx"})
    assert err.value.body["code"] == "unsupported_language" and err.value.body["param"] == "language"


def test_voice_as_an_object_with_an_id(server):
    r = httpx.post(server.url + "/v1/audio/speech", timeout=120,
                   json={"model": "tts-1", "input": "Hola.", "voice": {"id": "ana"}, "response_format": "pcm"})
    assert r.status_code == 200 and len(r.content) > 0


# -- errors: OpenAI's envelope for every refusal is in test_refusals_unit.py (the fake engine)
def test_client_disconnect_stops_ffmpeg_and_generation(start_server):
    """Leaving in the middle of a long stream: the encoder subprocess is killed and reaped at once.

    A private server: the process listing must show this test's encoder and no other request's."""
    server = start_server(run=False)
    make_clip(server.voices_dir / "ana.wav", seconds=6, freq=220, rate=16000, channels=1)
    server.start()
    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)
    proc = psutil.Process(server.proc.pid)
    text = " ".join(f"Frase número {i}." for i in range(30))
    for fmt in ("mp3", "flac"):
        with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="ana", input=text, response_format=fmt
        ) as response:
            chunks = response.iter_bytes()  # kept: a discarded generator is closed at once, and the connection with it
            next(chunks)
            seen = time.monotonic() + 10  # the encoder runs while the stream is open (poll: process listing is racy)
            while not any(c.name() == "ffmpeg" for c in proc.children()) and time.monotonic() < seen:
                time.sleep(0.05)
            assert any(c.name() == "ffmpeg" for c in proc.children()), (
                [(c.name(), c.cmdline()[:3]) for c in proc.children()], server.log()[-1500:])
        deadline = time.monotonic() + 60
        while any(c.name() == "ffmpeg" for c in proc.children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [c for c in proc.children() if c.name() == "ffmpeg"]
    # and the service is free for the next request
    assert client.audio.speech.create(model="tts-1", voice="ana", input="Hola.", response_format="pcm").content


# -- OpenAI voice names ----------------------------------------------------------------------------
def test_openai_voice_names_map_or_fall_back_to_the_default_or_the_first_voice(start_server):
    srv = start_server({"TTS_OPENAI_VOICE_MAP": json.dumps({"alloy": "ana", "shimmer": "missing"})}, run=False)
    make_clip(srv.voices_dir / "ana.wav", seconds=6, freq=220, rate=16000, channels=1)
    make_clip(srv.voices_dir / "bob.mp3", seconds=6, freq=140)
    make_clip(srv.voices_dir / "echo.wav", seconds=6, freq=300, rate=22050, channels=1)
    srv.start()
    client = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def speak(voice: str) -> bytes:
        return client.audio.speech.create(model="tts-1", voice=voice, input="Hola.", response_format="pcm").content

    ana, bob, echo = speak("ana"), speak("bob"), speak("echo")
    assert len({ana, bob, echo}) == 3  # greedy decoding: each voice has its own, repeatable output
    assert speak("alloy") == ana  # mapped by TTS_OPENAI_VOICE_MAP
    assert speak("echo") == echo  # a voice of the service wins over the OpenAI name
    with pytest.raises(openai.NotFoundError) as err:  # mapped to a voice that does not exist
        speak("shimmer")
    assert "TTS_OPENAI_VOICE_MAP" in err.value.body["hint"]
    assert speak("nova") == ana  # unmapped, and no default voice yet: the first voice by name
    httpx.post(srv.url + "/api/config", json={"voice_sample": "bob"}, timeout=120).raise_for_status()
    assert speak("nova") == bob  # unmapped OpenAI names speak in the default voice
    assert speak("Nova") == bob
