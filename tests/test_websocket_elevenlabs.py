"""The ElevenLabs-compatible `/v1/text-to-speech/{voice_id}/stream-input`, driven by the real `elevenlabs` SDK
(its realtime helper, which speaks only wss://: the server runs with TLS here, TTS_SSL_CERTFILE), and the API
key on WebSocket routes (checked before the upgrade, or from the first message)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from elevenlabs.client import ElevenLabs
from websockets.asyncio.client import connect

from helpers import ServerProcess, ffmpeg_decode, make_clip, wait_for

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server with an API key, over TLS (a self-signed certificate for 127.0.0.1)."""
    workdir = tmp_path_factory.mktemp("wstls")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = ServerProcess(workdir, tiny_model_dir, {"TTS_API_KEY": KEY, "TTS_SSL_CERTFILE": str(cert),
                                                  "TTS_SSL_KEYFILE": str(key), "TTS_LANGUAGE": "en"})
    srv.url = srv.url.replace("http://", "https://")
    srv.cert = cert
    make_clip(srv.voices_dir / "ana.wav", seconds=5, rate=24000, channels=1)
    srv.start(wait_ready=False)

    def ready() -> bool:
        assert srv.proc.poll() is None, srv.log()
        try:
            return httpx.get(srv.url + "/ready", verify=ssl.create_default_context(cafile=str(cert)), timeout=5,
                             headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, "the TLS server to be ready", 600)
    except BaseException:
        srv.stop()
        raise
    yield srv
    srv.stop()


def wss(srv: ServerProcess, path: str) -> str:
    return srv.url.replace("https://", "wss://") + path


def tls(srv: ServerProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(srv.cert))


def access_lines(srv: ServerProcess, route: str) -> list[str]:
    return [line for line in srv.log().splitlines() if "method=WS" in line and f"route={route}" in line]


def audio_seconds(line: str) -> float:
    return float(re.search(r"audio_seconds=(\S+)", line).group(1))


STREAM_INPUT = "/v1/text-to-speech/{voice_id}/stream-input"


def sdk_speak(srv: ServerProcess, monkeypatch: pytest.MonkeyPatch, output_format: str, key: str = KEY) -> bytes:
    """What the elevenlabs SDK's realtime helper gets, fed word by word like an LLM's answer."""
    monkeypatch.setenv("SSL_CERT_FILE", str(srv.cert))  # the SDK verifies with the default context
    client = ElevenLabs(api_key=key, base_url=srv.url)

    def words() -> Iterator[str]:
        yield from "Hello there, this is an agent. It speaks as the text comes.".split(" ")

    return b"".join(client.text_to_speech.convert_realtime(voice_id="ana", text=words(), output_format=output_format,
                                                           model_id="eleven_flash_v2_5"))


@pytest.mark.parametrize("output_format, rate", [("pcm_16000", 16000), ("pcm_24000", 24000), ("ulaw_8000", 8000)])
def test_sdk_raw_formats(tls_server: ServerProcess, monkeypatch: pytest.MonkeyPatch, output_format: str,
                         rate: int) -> None:
    data = sdk_speak(tls_server, monkeypatch, output_format)
    line = access_lines(tls_server, STREAM_INPUT)[-1]
    assert "status=101" in line and "close_code=1000" in line and "voice=ana" in line, line
    width = 1 if output_format.startswith("ulaw") else 2
    # All of it, resampled to the asked rate (ffmpeg's resampler may add or drop a few ms).
    assert abs(len(data) / width / rate - audio_seconds(line)) < 0.05, (len(data), line)


def test_sdk_mp3_default(tls_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    data = sdk_speak(tls_server, monkeypatch, "mp3_44100_128")
    rate, seconds = ffmpeg_decode(data, "mp3")
    assert rate == 44100
    assert abs(seconds - audio_seconds(access_lines(tls_server, STREAM_INPUT)[-1])) < 0.2


def test_sdk_wrong_key_is_refused_before_the_upgrade(tls_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        sdk_speak(tls_server, monkeypatch, "pcm_16000", key="wrong")
    response = info.value.response
    assert response.status_code == 401
    assert json.loads(response.body)["error"]["code"] == "unauthorized"


# -- the message shapes, with a plain WebSocket client ----------------------------------------------------
async def el_session(srv: ServerProcess, messages: list[dict], query: str = "output_format=pcm_24000",
                     voice: str = "ana", headers: dict | None = None) -> tuple[list[dict], int, str]:
    url = wss(srv, f"/v1/text-to-speech/{voice}/stream-input?{query}")
    received = []
    async with connect(url, ssl=tls(srv), proxy=None, additional_headers=headers) as ws:
        for message in messages:
            await ws.send(json.dumps(message))
        try:
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
        except websockets.ConnectionClosed:
            pass
        return received, ws.close_code, ws.close_reason


def test_message_shapes(tls_server: ServerProcess) -> None:
    """Key in the first message (browsers), ignored fields, flush, the empty text ending the input."""
    messages = [
        {"text": " ", "xi_api_key": KEY, "voice_settings": {"stability": 0.5, "similarity_boost": 0.8, "speed": 1.1},
         "generation_config": {"chunk_length_schedule": [120, 160]}},
        {"text": "Hello there ", "try_trigger_generation": True},
        {"text": "my friend", "flush": True},
        {"text": ""},
    ]
    received, code, _ = asyncio.run(el_session(tls_server, messages, "model_id=eleven_turbo_v2&output_format=pcm_24000"
                                               "&inactivity_timeout=30&auto_mode=true&sync_alignment=false"))
    assert code == 1000
    assert received[-1] == {"isFinal": True}
    chunks = received[:-1]
    assert chunks and all(set(m) >= {"audio", "isFinal"} and m["isFinal"] is None for m in chunks)
    pcm = b"".join(base64.b64decode(m["audio"]) for m in chunks)
    assert abs(len(pcm) / 2 / 24000 - audio_seconds(access_lines(tls_server, STREAM_INPUT)[-1])) < 0.01


@pytest.mark.parametrize("voice, query, first, code", [
    ("nobody", "", {"text": " "}, "voice_not_found"),
    ("ana", "output_format=wav_99", {"text": " "}, "unsupported_format"),
    ("ana", "", {"voice_settings": {}}, "invalid_message"),
])
def test_errors(tls_server: ServerProcess, voice: str, query: str, first: dict, code: str) -> None:
    received, close_code, reason = asyncio.run(el_session(tls_server, [first], query, voice,
                                                          headers={"xi-api-key": KEY}))
    assert received[-1]["error"] == code and received[-1]["message"] and close_code == 1008 and reason, received


# -- the key on the WebSocket routes ----------------------------------------------------------------------
async def native(srv: ServerProcess, start: dict, query: str = "", headers: dict | None = None) -> tuple[dict, int | None]:
    async with connect(wss(srv, "/api/tts/ws" + query), ssl=tls(srv), proxy=None, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "start", "voice": "ana", **start}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if first["type"] == "error":
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 30)
        return first, ws.close_code


@pytest.mark.parametrize("start, query, headers", [
    ({}, "", {"Authorization": f"Bearer {KEY}"}),
    ({}, "", {"xi-api-key": KEY}),
    ({}, f"?api_key={KEY}", None),
    ({"api_key": KEY}, "", None),
])
def test_native_key_accepted(tls_server: ServerProcess, start: dict, query: str, headers: dict | None) -> None:
    first, _ = asyncio.run(native(tls_server, start, query, headers))
    assert first["type"] == "ready", first


def test_native_key_missing_or_wrong(tls_server: ServerProcess) -> None:
    first, code = asyncio.run(native(tls_server, {}))  # no key anywhere: the first message is the last chance
    assert first["type"] == "error" and first["error"]["code"] == "unauthorized" and code == 1008
    first, code = asyncio.run(native(tls_server, {"api_key": "wrong"}))
    assert first["error"]["code"] == "unauthorized" and first["error"]["message"] == "Invalid API key." and code == 1008
    for query, headers in (("", {"Authorization": "Bearer wrong"}), ("?api_key=wrong", None)):
        with pytest.raises(websockets.InvalidStatus) as info:  # refused before the upgrade
            asyncio.run(native(tls_server, {}, query, headers))
        assert info.value.response.status_code == 401
    lines = [line for line in tls_server.log().splitlines() if "method=WS path=/api/tts/ws" in line]
    assert any("status=401" in line for line in lines), lines
    assert "wrong" not in tls_server.log() and KEY not in tls_server.log()  # keys never reach the log


def test_multi_stream_input_contexts(tls_server: ServerProcess) -> None:
    """multi-stream-input: a context per turn, the old one closed on barge-in, close_socket at the end."""
    url = wss(tls_server, "/v1/text-to-speech/ana/multi-stream-input?output_format=pcm_24000")

    async def go() -> tuple[list[dict], int, int]:
        received: list[dict] = []

        async def recv() -> dict:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
            return received[-1]

        async with connect(url, ssl=tls(tls_server), proxy=None, additional_headers={"xi-api-key": KEY}) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "turn1", "voice_settings": {"stability": 0.4}}))
            await ws.send(json.dumps({"text": "Hello there, my friend, how are you", "context_id": "turn1",
                                      "flush": True}))
            while "audio" not in await recv():
                pass
            await ws.send(json.dumps({"context_id": "turn1", "close_context": True}))  # the user speaks: barge-in
            closed_at = len(received)
            await ws.send(json.dumps({"text": "A new turn.", "context_id": "turn2"}))
            await ws.send(json.dumps({"text": "", "context_id": "turn2"}))  # keep-alive: nothing to say
            await ws.send(json.dumps({"close_socket": True}))
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await recv()
            return received, closed_at, ws.close_code

    received, closed_at, code = asyncio.run(go())
    assert code == 1000
    assert all(m.get("contextId") in ("turn1", "turn2") for m in received), received
    finals = [m["contextId"] for m in received if m.get("isFinal")]
    assert finals == ["turn1", "turn2"], finals
    final1 = next(i for i, m in enumerate(received) if m.get("isFinal") and m["contextId"] == "turn1")
    # After its close, turn1 sends nothing more (at most a chunk already on its way before the close arrived).
    assert sum(1 for m in received[final1:] if m.get("contextId") == "turn1" and m.get("audio")) == 0
    assert sum(1 for m in received[closed_at:final1] if m.get("audio")) <= 2
    turn2 = b"".join(base64.b64decode(m["audio"]) for m in received if m.get("contextId") == "turn2" and m.get("audio"))
    assert len(turn2) > 0 and len(turn2) % 2 == 0
