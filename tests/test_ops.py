"""Operations: liveness/readiness, Prometheus metrics, API key, CORS, body limit, request ids, access logs
(plain and JSON) and graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ROOT, ServerProcess, ffmpeg_decode, make_clip, wait_for, wav_info

KEY = "s3cret-key-for-tests"
FAULT_PLUGIN = str(ROOT / "tests" / "fault_plugin")


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- in-process app (no model: everything here answers before the engine) ---------------------------

def test_api_key_needed_everywhere_but_health(make_client):
    client = make_client(api_key=KEY, public_lists=False)  # the public model/voice lists: test_http_edge.py
    assert client.get("/health").status_code == 200
    for method, path in [("GET", "/"), ("GET", "/ready"), ("GET", "/metrics"), ("GET", "/api/voices"),
                         ("POST", "/api/tts/batch"), ("POST", "/api/tts/stream"), ("POST", "/api/config"),
                         ("DELETE", "/api/voices/ana"), ("GET", "/docs"), ("GET", "/openapi.json"),
                         ("POST", "/v1/audio/speech"), ("GET", "/v1/models"), ("GET", "/no/such/route")]:
        r = client.request(method, path, json={"text": "hola"} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.status_code)
        err = r.json()["error"]
        assert err["code"] == "unauthorized" and "Authorization: Bearer" in err["hint"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["x-request-id"]


@pytest.mark.parametrize("header", [f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", KEY, "Bearer ", "Bearer",
                                    f"Token {KEY}"])
def test_wrong_api_keys_are_refused(make_client, header):
    r = make_client(api_key=KEY).get("/", headers={"Authorization": header})
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "Invalid API key."


def test_right_api_key_is_accepted(make_client):
    client = make_client(api_key=KEY)
    for header in (f"Bearer {KEY}", f"bearer {KEY}"):
        r = client.get("/", headers={"Authorization": header})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "online"
    # The web page's static shell is public (it is where the user types the key); its API calls are not.
    assert client.get("/ui").status_code == 200
    assert client.post("/ui").status_code == 401


def test_no_api_key_configured_means_open(make_client):
    assert make_client().get("/").status_code == 200


def test_cors_closed_by_default(make_client):
    client = make_client()
    r = client.get("/", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = client.options("/api/tts/batch", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_allows_configured_origins_only(make_client):
    client = make_client(cors_origins=["https://app.example"], api_key=KEY)
    pre = client.options("/api/tts/batch", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200  # preflight needs no key (browsers never send one with it)
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = client.get("/", headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    bad = client.options("/api/tts/batch", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert bad.status_code == 400
    assert "access-control-allow-origin" not in bad.headers


def test_body_limit_by_content_length_and_by_chunks(make_client):
    client = make_client(max_body_bytes=2048)
    big = json.dumps({"text": "a" * 3000}).encode()
    r = client.post("/api/tts/batch", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert "TTS_MAX_BODY_BYTES" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must count what arrives
        for i in range(0, len(big), 512):
            yield big[i:i + 512]

    r = client.post("/api/tts/batch", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    # Under the limit the body reaches the route (which answers 503: this app has no model).
    r = client.post("/api/tts/batch", json={"text": "hola"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"


def test_request_id_is_kept_or_made(make_client):
    client = make_client()
    assert client.get("/health", headers={"X-Request-ID": "abc-123.x"}).headers["x-request-id"] == "abc-123.x"
    made = client.get("/health").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/health").headers["x-request-id"]
    # An id that could forge log lines is replaced, not echoed.
    forged = client.get("/health", headers={"X-Request-ID": "x status=200 voice=admin"}).headers["x-request-id"]
    assert forged != "x status=200 voice=admin" and " " not in forged


def test_ready_is_503_without_model_and_health_is_200(make_client):
    client = make_client()
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_not_ready"
    assert r.headers["retry-after"]


def test_two_apps_in_one_process_keep_their_own_metrics(make_client):
    first, second = make_client(), make_client()
    first.get("/health")
    first.get("/health")
    second.get("/health")
    a = metric_samples(first.get("/metrics").text)
    b = metric_samples(second.get("/metrics").text)
    assert sample(a, "tts_http_requests_total", method="GET", route="/health", status="200") == 2
    assert sample(b, "tts_http_requests_total", method="GET", route="/health", status="200") == 1


def test_unhandled_error_is_a_json_500_with_request_id(make_client):
    client = make_client()

    @client.app.get("/boom")
    async def boom():
        raise ValueError("secret internals")

    r = client.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "boom-1"
    assert r.json()["error"]["code"] == "internal_error"
    assert "secret internals" not in r.text


# -- the real server ----------------------------------------------------------------------------------
def test_health_ready_and_metrics_on_the_real_server(server):
    with server.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        before = metric_samples(client.get("/metrics").text)
        r = client.post("/api/tts/batch", json={"text": "Hola mundo.", "voice_sample": "ana"})
        assert r.status_code == 200
        with client.stream("POST", "/api/tts/stream", json={"text": "Hola otra vez.", "voice_sample": "ana"}) as s:
            assert s.status_code == 200
            s.read()
        client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "nobody"})
        scrape = client.get("/metrics")
    assert scrape.headers["content-type"].startswith("text/plain")
    after = metric_samples(scrape.text)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("tts_http_requests_total", method="POST", route="/api/tts/batch", status="200") == 1
    assert delta("tts_http_requests_total", method="POST", route="/api/tts/stream", status="200") == 1
    assert delta("tts_http_requests_total", method="POST", route="/api/tts/batch", status="404") == 1
    for route in ("/api/tts/batch", "/api/tts/stream"):
        assert delta("tts_time_to_first_audio_seconds_count", route=route) == 1
        assert delta("tts_synthesis_seconds_count", route=route) == 1
        assert delta("tts_real_time_factor_count", route=route) == 1
    assert delta("tts_audio_seconds_total") > 0
    assert delta("tts_characters_total") == len("Hola mundo.") + len("Hola otra vez.")
    assert sample(after, "tts_model_ready") == 1
    assert sample(after, "tts_model_load_seconds") > 0
    assert sample(after, "tts_workers") == 1
    assert sample(after, "tts_workers_busy") == 0 and sample(after, "tts_queue_depth") == 0
    assert sample(after, "tts_voice_cache_hits_total") + sample(after, "tts_voice_cache_misses_total") >= 2
    # OpenMetrics for scrapers that ask for it
    with server.client() as client:
        om = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


def test_one_log_line_per_request_with_its_facts(server):
    with server.client() as client:
        r = client.post("/api/tts/batch", json={"text": "Una frase corta.", "voice_sample": "ana", "language": "es"},
                        headers={"X-Request-ID": "log-line-test-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "log-line-test-1"
        assert client.post("/api/tts/batch", json={"text": ""}, headers={"X-Request-ID": "log-line-test-2"}).status_code == 400
    audio_s = wav_info(r.content)[2] / wav_info(r.content)[0]

    def lines(rid: str) -> list[str]:
        return [line for line in server.log().splitlines() if f"request_id={rid} " in line]

    line = wait_for(lambda: lines("log-line-test-1"), "the access log line")
    assert len(line) == 1
    for part in ("method=POST", "route=/api/tts/batch", "status=200", "voice=ana", "language=es",
                 f"characters={len('Una frase corta.')}", f"audio_seconds={round(audio_s, 3)}", "ttfa_seconds="):
        assert part in line[0], (part, line[0])
    failed = wait_for(lambda: lines("log-line-test-2"), "the log line of a failed request")
    assert "status=400" in failed[0] and "voice=" not in failed[0]


@pytest.fixture(scope="module")
def secured(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real server with an API key, CORS for one origin, JSON logs and small limits."""
    srv = ServerProcess(tmp_path_factory.mktemp("secured"), tiny_model_dir, {
        "TTS_API_KEY": KEY, "TTS_CORS_ORIGINS": "https://app.example", "TTS_LOG_JSON": "true",
        "TTS_MAX_BODY_BYTES": "4096", "TTS_MAX_TEXT_CHARS": "300"})
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.start(wait_ready=False)
    auth = {"Authorization": f"Bearer {KEY}"}
    wait_for(lambda: _ready(srv, auth), "the secured server", timeout=180)
    yield srv
    srv.stop()


def _ready(srv: ServerProcess, headers: dict) -> bool:
    if srv.proc.poll() is not None:
        raise RuntimeError(srv.log())
    try:
        return httpx.get(srv.url + "/ready", headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_real_server_with_api_key_cors_and_limits(secured):
    auth = {"Authorization": f"Bearer {KEY}"}
    with secured.client() as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"}).status_code == 401
        ok = client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"},
                         headers={**auth, "Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        long_text = client.post("/api/tts/batch", json={"text": "a" * 301, "voice_sample": "ana"}, headers=auth)
        assert long_text.status_code == 413 and long_text.json()["error"]["code"] == "text_too_long"
        big = client.post("/api/tts/batch", json={"text": "a" * 5000, "voice_sample": "ana"}, headers=auth)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        # The server keeps serving after all of that.
        assert client.post("/api/tts/stream", json={"text": "Hola.", "voice_sample": "ana"}, headers=auth).status_code == 200


def test_json_logs(secured):
    with secured.client() as client:
        r = client.post("/api/tts/batch", json={"text": "Hola mundo.", "voice_sample": "ana"},
                        headers={"Authorization": f"Bearer {KEY}", "X-Request-ID": "json-log-1"})
        assert r.status_code == 200

    def record():
        for line in secured.log().splitlines():
            if line.startswith("{") and '"json-log-1"' in line:
                return json.loads(line)
        return None

    entry = wait_for(record, "the JSON access log line")
    assert entry["logger"] == "offline_tts.access" and entry["level"] == "INFO"
    assert entry["request_id"] == "json-log-1" and entry["status"] == 200
    assert entry["route"] == "/api/tts/batch" and entry["voice"] == "ana" and entry["language"] == "es"
    assert entry["characters"] == len("Hola mundo.") and entry["audio_seconds"] > 0 and entry["ttfa_seconds"] > 0
    # Everything that goes through logging is JSON, uvicorn's lines and Python warnings included
    # (only third-party libraries that print by themselves are not: transformers' own handler).
    lines = secured.log().splitlines()
    assert not [line for line in lines if re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", line)]
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    assert {"uvicorn.error", "offline_tts.service", "py.warnings"} <= {entry["logger"] for entry in parsed}


def test_ready_only_once_the_model_is_loaded(start_server, tmp_path: Path):
    gate = tmp_path / "let-the-model-load"
    srv = start_server({"PYTHONPATH": FAULT_PLUGIN, "FAULT_LOAD_GATE": str(gate)}, run=False)
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.start(wait_ready=False)
    wait_for(lambda: _answers(srv, "/health"), "liveness", timeout=120)
    for _ in range(3):  # held at the gate: alive but not ready, and synthesis says why
        r = httpx.get(srv.url + "/ready", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
    synth = httpx.post(srv.url + "/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"}, timeout=5)
    assert synth.status_code == 503 and synth.headers["retry-after"]
    gate.touch()
    wait_for(lambda: _answers(srv, "/ready"), "readiness", timeout=120)
    assert httpx.post(srv.url + "/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"}, timeout=60).status_code == 200


def _answers(srv: ServerProcess, path: str) -> bool:
    if srv.proc.poll() is not None:
        raise RuntimeError(srv.log())
    try:
        return httpx.get(srv.url + path, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


LONG_TEXT = " ".join(f"Esta es la frase número {n} del texto largo." for n in range(1, 13))


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_connections(start_server):
    srv = start_server({"TTS_SHUTDOWN_GRACE_SECONDS": "300"}, run=False)
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.start()
    body = {"text": LONG_TEXT, "voice_sample": "ana"}
    with srv.client() as client:
        reference = client.post("/api/tts/stream", json=body)  # the same (greedy) stream, undisturbed
        assert reference.status_code == 200
        with client.stream("POST", "/api/tts/stream", json=body, headers={"X-Request-ID": "drain-1"}) as r:
            chunks = r.iter_bytes()
            received = next(chunks)  # generation is under way
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _refused(srv.url), "the listening socket to close")
            assert srv.proc.poll() is None  # still draining the stream
            for chunk in chunks:
                received += chunk
    assert len(received) == len(reference.content)  # every sample of the stream arrived
    assert ffmpeg_decode(received)[1] > 1.0
    assert srv.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained (exit 143 in Docker)
    log = srv.log()
    assert "request_id=drain-1 " in log and "status=200" in log.split("request_id=drain-1 ")[1].splitlines()[0]
    assert "Shutting down" in log


def test_sigterm_deadline_ends_a_stream_that_runs_too_long(start_server):
    srv = start_server({"TTS_SHUTDOWN_GRACE_SECONDS": "1", "TTS_MAX_AUDIO_TOKENS": "200"}, run=False)
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.start()
    text = " ".join(["Una frase que no termina nunca."] * 40)
    with srv.client() as client:
        with client.stream("POST", "/api/tts/stream", json={"text": text, "voice_sample": "ana"}) as r:
            chunks = r.iter_bytes()
            next(chunks)
            srv.proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):  # cut off at the deadline: the chunked body never completes
                for _ in chunks:
                    pass
    assert srv.proc.wait(120) is not None
    assert "timeout graceful shutdown exceeded" in srv.log()
