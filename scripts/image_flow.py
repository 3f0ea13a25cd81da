"""The seed's flow against the container that docker-compose.yml's `tts-cpu` service runs (called by
scripts/image-test.sh once the image is built; podman and podman-compose are set up by it).

A clip in ./voices, a tiny random model in the model volume, then: GET /, POST /api/config, batch,
stream, /v1/audio/speech, an unknown voice, an upload, the HEALTHCHECK, a restart that keeps the
config and the cache volume, and SIGTERM ending the service within the grace period. On the way,
the two first-day mistakes of issue 14 are made on purpose and must give clear messages: a model
folder the container's user cannot read, and a ./voices folder created by root.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import make_clip  # noqa: E402  (the test suite's voice-like clip)

SRC = Path(os.environ["IMAGE_TEST_SRC"])
PORT = int(os.environ["IMAGE_TEST_PORT"])
PROJECT = os.environ["IMAGE_TEST_PROJECT"]
SERVICE = os.environ["IMAGE_TEST_SERVICE"]
COMPOSE = shlex.split(os.environ["IMAGE_TEST_COMPOSE"])
BUILD_ARGS = os.environ["IMAGE_TEST_BUILD_ARGS"]
IMAGE = "offline-tts:latest"
MODEL_VOLUME = f"{PROJECT}_tts-model"
CACHE_VOLUME = f"{PROJECT}_tts-cache"
APP_UID = 1000
URL = f"http://127.0.0.1:{PORT}"
T0 = time.monotonic()


def info(text: str) -> None:
    print(f"    {text}", flush=True)


def step(text: str) -> None:
    print(f"\n  -> [{time.monotonic() - T0:4.0f}s] {text}", flush=True)


def fail(text: str) -> None:
    print(f"\nFAIL: {text}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(*cmd: str, timeout: float = 120, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        fail(f"timed out after {timeout:.0f} s: {shlex.join(cmd)}")
    if check and done.returncode != 0:
        fail(f"exit {done.returncode}: {shlex.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run(*COMPOSE, f"--podman-build-args={BUILD_ARGS}", "--profile", "cpu", *args, timeout=timeout, cwd=SRC)


def container() -> str:
    names = run("podman", "ps", "-a", "--filter", f"label=com.docker.compose.service={SERVICE}",
                "--format", "{{.Names}}").stdout.split()
    if len(names) != 1:
        fail(f"expected one {SERVICE} container, found {names}")
    return names[0]


def inspect(name: str, fmt: str) -> str:
    return run("podman", "inspect", "--format", fmt, name).stdout.strip()


def logs(name: str) -> str:
    done = run("podman", "logs", name, check=False)
    return done.stdout + done.stderr


def expect(cond: bool, what: str, detail: object = "") -> None:
    if not cond:
        fail(f"{what}\n{str(detail)[-4000:]}")


def wait_ready(name: str, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if inspect(name, "{{.State.Status}}") not in ("running", "created", "configured"):
            fail(f"the container stopped ({inspect(name, '{{.State.Status}}')}):\n{logs(name)[-4000:]}")
        try:
            if httpx.get(URL + "/", timeout=3).json().get("model") == "ready":
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    fail(f"not ready after {timeout:.0f} s:\n{logs(name)[-4000:]}")


def in_model_volume(script: str) -> subprocess.CompletedProcess:
    """A shell command as root in a throwaway container with the model volume at /models."""
    return run("podman", "run", "--rm", "--user", "0", "--entrypoint", "sh", "-v", f"{MODEL_VOLUME}:/models",
               "-v", f"{MODEL_SRC}:/src:ro", IMAGE, "-c", script)


def metric(name: str) -> float:
    for line in httpx.get(URL + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    fail(f"metric {name} not found")


# ----------------------------------------------------------------------------------------------------
with socket.socket() as s:
    if s.connect_ex(("127.0.0.1", PORT)) == 0:
        fail(f"port {PORT} is in use: docker-compose.yml publishes it; stop what listens there and retry")

step("A clip in ./voices; a tiny random-weight model (`offline-tts random-model`)")
voices = SRC / "voices"
make_clip(voices / "imagetest.wav", seconds=6)
os.chown(voices, 0, 0)  # as Docker makes a missing ./voices: root's, not the container user's
MODEL_SRC = SRC.parent / "model"
run(str(ROOT / ".venv/bin/offline-tts"), "random-model", str(MODEL_SRC), "--size", "tiny", timeout=300)
info(f"voices/imagetest.wav (6 s); model {sum(f.stat().st_size for f in MODEL_SRC.iterdir()) / 1e6:.0f} MB")

step("Mistake 1: a model folder the container's user cannot read (root's, mode 0700) -> clear startup error")
run("podman", "volume", "rm", "-f", MODEL_VOLUME, check=False)  # left by an interrupted run
run("podman", "volume", "create", MODEL_VOLUME)
in_model_volume("cp -a /src /models/xtts_v2 && chown -R 0:0 /models/xtts_v2 && chmod 0700 /models/xtts_v2")
done = run("podman", "run", "--rm", "-e", "TTS_DEVICE=cpu", "-v", f"{MODEL_VOLUME}:/models", IMAGE, check=False, timeout=120)
out = done.stdout + done.stderr
expect(done.returncode == 2, f"expected exit 2 for an unreadable model folder, got {done.returncode}", out)
expect("Traceback" not in out and "cannot be read by the service, which runs as uid 1000 (app)" in out,
       "no clear message for an unreadable model folder", out)
info("exit 2: " + next(line for line in out.splitlines() if "cannot be read" in line).split(": ", 1)[-1][:160] + "...")
in_model_volume(f"chown -R {APP_UID}:{APP_UID} /models/xtts_v2")

step("docker-compose.yml: `--profile cpu up --build tts-cpu` (podman-compose; the build is cached)")
compose("up", "-d", "--build", SERVICE)
name = container()
mounts = inspect(name, "{{range .Mounts}}{{.Name}}{{.Source}}->{{.Destination}} {{end}}")
expect(MODEL_VOLUME in mounts and CACHE_VOLUME in mounts and "/app/voices" in mounts, "unexpected mounts", mounts)
info(f"container {name}; mounts: {mounts}")
info(f"ready after {wait_ready(name):.0f} s")

step("Mistake 2: ./voices created by root -> a startup warning, and uploads answer a clear 503")
log = logs(name)
expect("The voices directory /app/voices is not writable by the service, which runs as uid 1000 (app)" in log,
       "no startup warning for an unwritable ./voices", log)
info(next(line for line in log.splitlines() if "voices directory /app/voices is not writable" in line)[:200] + "...")
clip_bytes = (voices / "imagetest.wav").read_bytes()


def upload(http: httpx.Client, voice: str) -> httpx.Response:
    return http.post("/api/voices", data={"name": voice}, files={"files": ("clip.wav", clip_bytes, "audio/wav")})


with httpx.Client(base_url=URL, timeout=300) as http:
    r = upload(http, "uploaded")
    expect(r.status_code == 503 and r.json()["error"]["code"] == "voices_not_writable", "upload to a root-owned ./voices", r.text)
    info(f"POST /api/voices -> 503 {r.json()['error']['code']}: {r.json()['error']['hint'][:110]}...")
    os.chown(voices, APP_UID, APP_UID)  # what `mkdir voices` as uid 1000 would have given
    info(f"chown {APP_UID} ./voices (no restart needed)")

    step("The seed's flow")
    r = http.get("/")
    expect(r.status_code == 200 and r.json()["status"] == "online", "GET /", r.text)
    info(f"GET / -> 200 {json.dumps(r.json()['config'])}")
    r = http.post("/api/config", json={"voice_sample": "imagetest", "language": "en"})
    expect(r.status_code == 200 and r.json()["config"]["voice_sample"] == "imagetest", "POST /api/config", r.text)
    info(f"POST /api/config -> 200 {r.json()['message']}")
    r = http.post("/api/tts/batch", json={"text": "Hello from the container. This is a batch request."})
    expect(r.status_code == 200 and r.content[:4] == b"RIFF" and len(r.content) > 1000, "batch", r.text[:500])
    info(f"POST /api/tts/batch -> 200 audio/wav, {len(r.content)} bytes")
    chunks = 0
    with http.stream("POST", "/api/tts/stream", json={"text": "Streaming now. One sentence after another. And a third."}) as s:
        expect(s.status_code == 200, "stream status", s.status_code)
        body = b""
        for part in s.iter_bytes():
            chunks += 1
            body += part
    expect(body[:4] == b"RIFF" and len(body) > 1000, "stream body", body[:100])
    info(f"POST /api/tts/stream -> 200, {len(body)} bytes in {chunks} reads")
    r = http.post("/v1/audio/speech", json={"model": "tts-1", "input": "OpenAI style.", "voice": "imagetest",
                                            "response_format": "mp3"})
    expect(r.status_code == 200 and r.headers["content-type"].startswith("audio/mpeg"), "/v1/audio/speech", r.text[:500])
    info(f"POST /v1/audio/speech (mp3) -> 200, {len(r.content)} bytes")
    r = http.post("/api/tts/batch", json={"text": "Hi.", "voice_sample": "nobody"})
    expect(r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found", "unknown voice", r.text)
    info("unknown voice -> 404 voice_not_found")
    r = upload(http, "uploaded")
    expect(r.status_code == 201, "upload", r.text)
    expect((voices / "uploaded.wav").is_file() and (voices / "uploaded.wav").stat().st_uid == APP_UID,
           "the upload is not in ./voices on the host")
    info("POST /api/voices -> 201; ./voices/uploaded.wav on the host, owned by uid 1000")
    config_before = http.get("/").json()["config"]

step("HEALTHCHECK (the image's, as compose sets it)")
done = run("podman", "healthcheck", "run", name, check=False)
status = json.loads(inspect(name, "{{json .State}}"))
status = (status.get("Health") or status.get("Healthcheck") or {}).get("Status")  # the key differs by podman version
expect(done.returncode == 0 and status == "healthy", f"healthcheck rc {done.returncode}, status {status!r}", done.stdout + done.stderr)
info(f"podman healthcheck run -> {status}")

step("Restart (compose down, up): the config and the cache volume are kept")
compose("down", timeout=120)
expect(not run("podman", "ps", "-a", "--filter", f"label=com.docker.compose.service={SERVICE}", "--format", "{{.Names}}").stdout.strip(),
       "the container was not removed by down")
compose("up", "-d", SERVICE)
name = container()
info(f"ready after {wait_ready(name):.0f} s")
with httpx.Client(base_url=URL, timeout=300) as http:
    config_after = http.get("/").json()["config"]
    expect(config_after == config_before, "the config was not kept", (config_before, config_after))
    info(f"GET / -> {json.dumps(config_after)} (kept)")
    r = http.post("/api/tts/batch", json={"text": "After the restart."})
    expect(r.status_code == 200, "batch after restart", r.text)
    # The default voice is loaded right after startup (or by this request): from the disk, not computed.
    hits, misses = metric("tts_voice_cache_disk_hits"), metric("tts_voice_cache_misses")
    expect(hits >= 1 and misses == 0, f"the voice was conditioned again ({hits} disk hits, {misses} misses): "
           "the cache volume was not kept", logs(name)[-3000:])
    info(f"batch after restart -> 200; voice conditioning loaded from the cache volume ({hits:.0f} disk hit, 0 computed)")

step("SIGTERM (compose stop) during a stream: the service drains and exits within the grace period")
grace_text = str(yaml.safe_load((SRC / "docker-compose.yml").read_text())["x-tts-service"]["stop_grace_period"])
grace = int(grace_text.removesuffix("s"))  # compose stop sends SIGTERM, then SIGKILL after this
stream_result: dict = {}


def long_stream() -> None:
    try:
        with httpx.stream("POST", URL + "/api/tts/stream", timeout=120,
                          json={"text": "This stream is running when the stop comes. It must end complete."}) as s:
            stream_result["status"] = s.status_code
            stream_result["bytes"] = sum(len(p) for p in s.iter_bytes())
    except httpx.HTTPError as exc:
        stream_result["error"] = repr(exc)


worker = threading.Thread(target=long_stream)
worker.start()
time.sleep(1)  # the request is in
started = time.monotonic()
compose("stop", SERVICE, timeout=grace + 60)
took = time.monotonic() - started
worker.join(60)
code = inspect(name, "{{.State.ExitCode}}")
log = logs(name)
# 143: ended by the SIGTERM it was sent (uvicorn re-raises it once shut down); 137 would be SIGKILL.
expect(code in ("0", "143"), f"exit code {code} (137 is SIGKILL: the grace period ran out)", log[-3000:])
expect(stream_result.get("status") == 200 and stream_result.get("bytes", 0) > 1000 and "error" not in stream_result,
       "the stream running at SIGTERM did not end complete", (stream_result, log[-3000:]))
expect("timeout graceful shutdown exceeded" not in log, "the service's own drain time ran out", log[-3000:])
expect(took < grace, f"stop took {took:.1f} s, not under the {grace} s grace period")
expect("Traceback" not in log, "a traceback in the log", log[-4000:])
info(f"stopped in {took:.1f} s (grace {grace} s), exit code {code}; the stream got "
     f"{stream_result.get('status')} with {stream_result.get('bytes', 0)} bytes {stream_result.get('error', '')}")
print(f"\n  flow passed in {time.monotonic() - T0:.0f} s", flush=True)
