"""The HTTP edge (issue 9): bounded request headers (431), the API key read from a file, HEAD wherever GET
works, public model/voice lists, OpenAI's model names and voice names from real clients."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from pydantic import ValidationError

from helpers import BIN, WAV_HEADER, ffmpeg_decode, make_clip
from offline_tts.config import Settings

KEY = "edge-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
SPEECH = {"model": "tts-1", "input": "Hola.", "response_format": "pcm"}
# The request Home Assistant's openai_tts integration sends to check a key (and on re-authentication).
HOME_ASSISTANT_PROBES = [{"model": "tts-1", "input": "...", "voice": "alloy", "response_format": "mp3"},
                         {"model": "gpt-4o-mini-tts", "input": ".", "voice": "alloy", "response_format": "mp3"}]



@pytest.fixture(scope="module")
def secured(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server whose key was read from a secrets file (trailing newline, leading space), with two voices."""
    from helpers import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("secured"), tiny_model_dir, {"TTS_API_KEY": f" {KEY}\n"})
    make_clip(srv.voices_dir / "bob.mp3", seconds=6, freq=140)
    make_clip(srv.voices_dir / "ana.wav", seconds=6, freq=220, rate=16000, channels=1)
    srv.start(wait_ready=False)
    deadline = time.monotonic() + 180
    while True:  # ServerProcess.wait_ready sends the unstripped key; wait with the real one
        assert srv.proc.poll() is None, srv.log()
        try:
            if httpx.get(srv.url + "/ready", headers=AUTH, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.2)
    yield srv
    srv.stop()


# -- 6: request headers are bounded ------------------------------------------------------------------
def test_a_huge_header_gets_431_for_anyone(server, secured):
    for srv in (server, secured):  # open, and with a key: refused before the key check
        r = httpx.get(srv.url + "/health", headers={"X-Big": "a" * 2**20}, timeout=30)
        assert r.status_code == 431, r.text
        err = r.json()["error"]
        assert err["code"] == "headers_too_large" and "16384" in err["message"]
        assert "TTS_MAX_HEADER_BYTES" in err["hint"]
        assert r.headers["connection"] == "close"
    too_many = {f"X-H{i}": "1" for i in range(150)}
    r = httpx.get(server.url + "/health", headers=too_many, timeout=30)
    assert r.status_code == 431 and "TTS_MAX_HEADERS" in r.json()["error"]["hint"]
    long_url = httpx.get(server.url + "/health?" + "q" * 20_000, timeout=30)
    assert long_url.status_code == 431


def test_headers_under_the_limit_still_work(server):
    with server.client() as client:  # one keep-alive connection: many requests, some near the limit
        for _ in range(3):
            assert client.get("/health", headers={"X-Fill": "b" * 15_000}).status_code == 200
            assert client.get("/health", headers={f"X-H{i}": "1" for i in range(90)}).status_code == 200
        # A streamed response still streams.
        with client.stream("POST", "/api/tts/stream", json={"text": "Hola. Adiós.", "voice_sample": "ana"},
                           headers={"X-Fill": "c" * 10_000}) as r:
            assert r.status_code == 200 and r.headers["transfer-encoding"] == "chunked"
            assert len(b"".join(r.iter_bytes())) > WAV_HEADER


def test_a_header_that_never_ends_is_refused_without_reading_it_all(server):
    """A client trickling one endless header: answered 431 after about the limit, /health answers meanwhile."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        s.setblocking(False)
        while sent < 4 * 2**20:  # stop as soon as the server answers
            try:
                answer = s.recv(65536)
                break
            except BlockingIOError:
                pass
            try:
                sent += s.send(b"z" * 8192)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            # answered while the endless header is still open (an event, not a time): the reader does not block
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        else:
            pytest.fail("no answer after 4 MB of one header")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in answer
    assert sent < 2**20  # refused long before the header could end


# -- 17: the API key from a secrets file --------------------------------------------------------------
def test_api_key_is_stripped_and_empty_means_none():
    assert Settings(api_key=f"  {KEY}\n").api_key == KEY
    assert Settings(api_key="").api_key is None
    with pytest.raises(ValidationError, match="only whitespace"):
        Settings(api_key=" \n\t")


def test_whitespace_only_key_stops_the_server_with_a_clear_line(tmp_path: Path):
    env = {"PATH": "/usr/bin:/bin", "TTS_API_KEY": "  \n", "TTS_MODEL_DIR": str(tmp_path / "m"),
           "TTS_VOICES_DIR": str(tmp_path / "v"), "TTS_CACHE_DIR": str(tmp_path / "c"), "TTS_DOWNLOAD": "false"}
    proc = subprocess.run([str(BIN / "offline-tts"), "serve"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Invalid setting TTS_API_KEY: the key is only whitespace" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_key_with_a_trailing_newline_works(secured):
    with secured.client() as client:
        assert client.get("/", headers=AUTH).status_code == 200
        assert client.get("/api/voices", headers={"Authorization": f"bearer   {KEY}"}).status_code == 200
        assert client.get("/api/voices").status_code == 401
        assert client.get("/api/voices", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401


# -- 18: HEAD wherever GET works ----------------------------------------------------------------------
NOT_IN_SCHEMA = ["/ui", "/ui/", "/ui/app.js", "/ui/style.css", "/ui/favicon.svg", "/docs", "/redoc", "/openapi.json",
                 "/docs/oauth2-redirect"]


def get_routes(client: TestClient) -> list[str]:
    """Every GET route: those in the schema, and the page and docs routes kept out of it."""
    paths = [p for p, ops in client.get("/openapi.json", headers=AUTH).json()["paths"].items() if "get" in ops]
    assert {"/health", "/ready", "/", "/api/voices", "/v1/models", "/v1/audio/voices", "/v1/audio/models",
            "/metrics"} <= set(paths)
    assert not [p for p in paths if "{" in p]  # a GET route with a path parameter: add an example here
    return paths + NOT_IN_SCHEMA


@pytest.mark.parametrize("api_key", [None, KEY])
def test_head_on_every_get_route_in_process(make_client, api_key):
    client = make_client(api_key=api_key)
    auth = AUTH if api_key else {}
    for path in get_routes(client):
        get, head = client.get(path, headers=auth), client.head(path, headers=auth)
        assert head.status_code == get.status_code != 405, (path, head.status_code, get.status_code)
        assert head.content == b"", path
        assert head.headers.get("content-type") == get.headers.get("content-type"), path
        if path != "/metrics":  # its body changes from one scrape to the next
            assert head.headers.get("content-length") == get.headers.get("content-length"), path
        if api_key:  # the same key rule as GET
            no_key_get, no_key_head = client.get(path), client.head(path)
            assert no_key_head.status_code == no_key_get.status_code, path
            assert no_key_head.content == b""
    assert client.head("/api/tts/batch", headers=auth).status_code == 405  # no GET there, no HEAD either
    assert client.head("/no/such/route", headers=auth).status_code == 404


def test_head_on_the_real_server(server, secured):
    paths = ["/health", "/ready", "/", "/api/voices", "/v1/models", "/v1/audio/voices", "/v1/audio/models",
             "/metrics", "/ui", "/ui/app.js", "/docs", "/openapi.json"]
    for srv, auth in ((server, {}), (secured, AUTH)):
        with srv.client() as client:
            for path in paths:
                get, head = client.get(path, headers=auth), client.head(path, headers=auth)
                assert head.status_code == get.status_code == 200, (path, head.status_code)
                assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
                if path != "/metrics":
                    assert head.headers["content-length"] == get.headers["content-length"], path
            # The connection is still in step after the HEAD answers (no body left to read).
            assert client.get("/health").json() == {"status": "ok"}
    with secured.client() as client:
        assert client.head("/api/voices").status_code == 401 and client.head("/ready").status_code == 401
        assert client.head("/health").status_code == 200 and client.head("/ui").status_code == 200


# -- 20: OpenAI's model names -------------------------------------------------------------------------
OPENAI_MODEL_NAMES = ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "tts-1-1106", "tts-1-hd-1106",
                      "gpt-4o-mini-tts-2025-03-20", "gpt-4o-mini-tts-2025-12-15"]


def test_every_openai_model_name_is_accepted_and_listed(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    listed = {m.id for m in client.models.list()}
    assert {*OPENAI_MODEL_NAMES, "xtts-v2"} <= listed
    assert {m["id"] for m in httpx.get(server.url + "/v1/audio/models").json()["models"]} == listed
    for model in [*OPENAI_MODEL_NAMES, "gpt-4o-mini-tts-2026-06-01", "tts-1-hd-2024-01-31", "xtts-v2"]:
        audio = client.audio.speech.create(model=model, voice="ana", input="Hola.", response_format="pcm").content
        assert len(audio) > 0, model
    for model in ["gpt-4o-tts", "tts-2", "tts-1-2025-1-1", "gpt-4o-mini-tts-1106", "gpt-4o-mini", "TTS-1x", ""]:
        with pytest.raises(openai.BadRequestError) as err:
            client.audio.speech.create(model=model, voice="ana", input="Hola.")
        assert err.value.body["code"] == "invalid_parameter" and err.value.body["param"] == "model", model
        assert "gpt-4o-mini-tts" in err.value.body["hint"]


# -- 21: the model and voice lists are public (Open WebUI asks without the key) -----------------------
def test_lists_are_public_and_everything_else_needs_the_key(secured):
    with secured.client() as client:
        voices = client.get("/v1/audio/voices")  # exactly what Open WebUI sends: no Authorization header
        assert voices.status_code == 200 and {v["id"] for v in voices.json()["voices"]} == {"ana", "bob"}
        assert client.get("/v1/audio/models").status_code == 200
        assert client.get("/v1/models").status_code == 200
        for method, path in [("POST", "/v1/audio/speech"), ("GET", "/api/voices"), ("GET", "/ready"),
                             ("GET", "/metrics"), ("POST", "/api/tts/batch"), ("POST", "/v1/models"),
                             ("GET", "/v1/models/extra")]:
            r = client.request(method, path, json={"model": "tts-1", "input": "Hola.", "voice": "ana"})
            assert r.status_code == 401, (method, path, r.status_code)
        assert client.post("/v1/audio/speech", json={**SPEECH, "voice": "ana"}, headers=AUTH).status_code == 200


def test_public_lists_can_be_closed(make_client):
    client = make_client(api_key=KEY, public_lists=False)
    for path in ("/v1/models", "/v1/audio/voices", "/v1/audio/models"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=AUTH).status_code == 200, path
    open_client = make_client(api_key=KEY)
    assert open_client.get("/v1/audio/voices").status_code == 200
    assert open_client.get("/api/voices").status_code == 401


# -- 22: OpenAI voice names speak in a real voice ----------------------------------------------------
def test_unmapped_openai_voice_speaks_in_the_first_voice_by_name(secured):
    client = OpenAI(base_url=secured.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def speak(voice: str) -> bytes:
        return client.audio.speech.create(model="tts-1", voice=voice, input="Hola.", response_format="pcm").content

    ana, bob = speak("ana"), speak("bob")
    assert ana != bob  # greedy decoding: each voice has its own, repeatable output
    for name in ("alloy", "shimmer", "Nova", "coral"):  # no map, no default voice: "ana" comes first by name
        assert speak(name) == ana, name
    for probe in HOME_ASSISTANT_PROBES:
        r = httpx.post(secured.url + "/v1/audio/speech", json=probe, timeout=120,
                       headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "audio/mpeg" and ffmpeg_decode(r.content)[1] > 0


def test_openai_voice_without_any_voice_is_a_clear_400(make_client):
    r = make_client().post("/v1/audio/speech", json={**SPEECH, "voice": "alloy"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "no_voice" and err["param"] == "voice" and "POST /api/voices" in err["hint"]
