"""`make cluster-test`: 3 replicas of the service on one shared voices/cache folder behind HAProxy.

Loopback only, bounded in time (--deadline), on the tiny random-weight model. It checks what issue 15
asks of a scaled-out deployment:

  1. the balancer spreads requests round-robin and health-checks /ready (with the API key);
  2. a voice uploaded through the balancer is synthesized by every replica, addressed directly;
  3. the defaults set through the balancer are those of every replica;
  4. a voice deleted through the balancer is gone for every replica;
  5. distinct voices uploaded concurrently through the balancer are all present on every replica;
  6. a replica killed with SIGKILL in the middle of requests: only the requests it held fail, the
     others finish whole, the health checks take it out and new requests all succeed;
  7. restarted, it passes the health checks again and gets requests.

Exit status 0 when every check passed. Usage: python deploy/cluster_test.py [--replicas 3] [--keep]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL_FILES = ("config.json", "model.pth", "vocab.json", "speakers_xtts.pth")
API_KEY = "cluster-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Many sentences: a stream lasts long enough on the tiny model to be cut in the middle.
LONG_TEXT = " ".join(f"Esta es la frase numero {i} de una prueba larga." for i in range(1, 7))
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_clip(path: Path, freq: int, seconds: float = 6.0) -> bytes:
    """A synthetic voice-like clip (a buzzy tone with vibrato and a little noise), made by ffmpeg."""
    src = (f"aevalsrc='0.3*sin(2*PI*{freq}*t+3*sin(2*PI*5*t))*(0.6+0.4*sin(2*PI*3*t))"
           f"+0.02*(random(0)-0.5)':s=24000:d={seconds}")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src, "-ac", "1", str(path)], check=True)
    return path.read_bytes()


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


class Replica:
    def __init__(self, name: str, workdir: Path, model_dir: Path, shared: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        self.env = {
            **os.environ,
            "TTS_MODEL_DIR": str(model_dir), "TTS_VOICES_DIR": str(shared / "voices"), "TTS_CACHE_DIR": str(shared / "cache"),
            "TTS_HOST": "127.0.0.1", "TTS_PORT": str(self.port), "TTS_API_KEY": API_KEY, "TTS_DOWNLOAD": "false",
            "TTS_TORCH_THREADS": "1", "TTS_MAX_AUDIO_TOKENS": "24", "TTS_GREEDY": "true", "TTS_SHUTDOWN_GRACE_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([str(BIN / "offline-tts"), "serve"], cwd=self.workdir, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"replica {self.name} exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/ready", headers=AUTH, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


HAPROXY_CFG = """\
global
    stats socket {sock} mode 600 level admin

defaults
    mode http
    option httplog
    timeout connect 2s
    # Whole syntheses and streams: the server may think for a while between chunks.
    timeout client 300s
    timeout server 300s
    # WebSockets (and any upgraded connection) once established.
    timeout tunnel 1h
    # A request refused at connect (its server just died) goes to another server.
    option redispatch
    retries 2

frontend tts
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    # Readiness, not liveness: a replica loading its model (or dead) gets no traffic.
    option httpchk
    http-check send meth GET uri /ready hdr Authorization "Bearer {key}"
    http-check expect status 200
    # A dead replica refuses the connection: out after 2 checks. A busy one may answer slowly (its CPU
    # is decoding): a short check timeout would take healthy replicas out under load.
    timeout check 5s
    default-server inter 500ms fall 2 rise 2
    # For the test only: which replica answered.
    http-response set-header X-Served-By %s
{servers}
"""


class Balancer:
    def __init__(self, workdir: Path, replicas: list[Replica]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sock = workdir / "haproxy.sock"
        self.cfg = workdir / "haproxy.cfg"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
        self.cfg.write_text(HAPROXY_CFG.format(sock=self.sock, port=self.port, key=API_KEY, servers=servers))
        self.log_path = workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        subprocess.run(["haproxy", "-c", "-q", "-f", str(self.cfg)], check=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it (UP, DOWN, ...), from its stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"].split()[0] for r in rows if r.get("pxname") == "replicas"
                and r["svname"] not in ("BACKEND", "FRONTEND")}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def wait(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Checks:
    def __init__(self):
        self.results: list[tuple[str, bool, str]] = []

    def run(self, name: str, fn) -> None:
        say(f"CHECK {name} ...")
        started = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Exception as exc:  # a failed check is reported, the next ones still run
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        took = time.monotonic() - started
        self.results.append((name, ok, f"{detail} ({took:.1f} s)"))
        say(f"  {'PASS' if ok else 'FAIL'}: {detail}")


def model_dir(cache: Path) -> Path:
    """The tests' tiny random model if it is there, else one built now (seconds)."""
    for path in (Path(os.environ.get("TTS_TEST_MODEL_DIR", ROOT / ".cache" / "test-models" / "tiny")),
                 cache / "cluster-model"):
        if all((path / f).is_file() for f in MODEL_FILES):
            return path
    path = cache / "cluster-model"
    say(f"Building a tiny random-weight model in {path} ...")
    subprocess.run([str(BIN / "offline-tts"), "random-model", str(path), "--size", "tiny"], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=1200, help="give up (and fail) after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, shared folder)")
    args = parser.parse_args(argv)
    if not shutil.which("haproxy"):
        print("haproxy is not installed: `make cluster-test` installs it (apt-get install haproxy).", file=sys.stderr)
        return 2
    # Bounded in time: past the deadline everything started here is stopped and the run fails.
    watchdog = threading.Timer(args.deadline, lambda: (say(f"DEADLINE of {args.deadline:g} s passed: giving up"),
                                                       os.kill(os.getpid(), signal.SIGTERM)))
    watchdog.daemon = True
    def deadline_passed(*_):
        raise TimeoutError(f"the deadline of {args.deadline:g} s passed (or SIGTERM)")

    signal.signal(signal.SIGTERM, deadline_passed)
    workdir = Path(tempfile.mkdtemp(prefix="tts-cluster-"))
    shared = workdir / "shared"
    (shared / "voices").mkdir(parents=True)
    replicas = [Replica(f"r{i + 1}", workdir / f"r{i + 1}", model_dir(ROOT / ".cache"), shared) for i in range(args.replicas)]
    balancer = Balancer(workdir, replicas)
    checks = Checks()
    watchdog.start()
    try:
        say(f"Working folder {workdir}; shared voices/cache in {shared}")
        for r in replicas:
            r.start()
        say(f"Started {len(replicas)} replicas: " + ", ".join(f"{r.name}={r.url}" for r in replicas))
        balancer.start()
        say(f"HAProxy {balancer.url} (round-robin, health check GET /ready every 500 ms)")
        for r in replicas:
            wait(r.ready, f"replica {r.name} to be ready", 600)
        wait(lambda: set(balancer.states().values()) == {"UP"}, "HAProxy to see every replica UP", 30)
        say(f"All ready; HAProxy: {balancer.states()}")
        run_checks(checks, balancer, replicas, workdir)
    except BaseException as exc:  # setup failed (or the deadline): say so in the summary
        checks.results.append(("setup / run", False, f"{type(exc).__name__}: {exc}"))
        say(f"ABORTED: {type(exc).__name__}: {exc}")
    finally:
        watchdog.cancel()
        balancer.stop()
        for r in replicas:
            r.stop()
    print("\n=== cluster-test summary " + "=" * 52)
    for name, ok, detail in checks.results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}\n      {detail}")
    failed = [name for name, ok, _ in checks.results if not ok]
    # Every state change HAProxy logged (a busy replica failing its check shows here too).
    changes = [line.split(": ", 1)[-1].split(", reason")[0] + ": " + line.split("reason: ")[-1].split(",")[0]
               for line in balancer.log_path.read_text(errors="replace").splitlines() if " is DOWN" in line or " is UP" in line] \
        if balancer.log_path.exists() else []
    print(f"HAProxy server state changes ({len(changes)}):" + "".join(f"\n      {c}" for c in changes))
    print(f"{len(checks.results) - len(failed)}/{len(checks.results)} checks passed in {time.monotonic() - STARTED:.0f} s")
    if failed or args.keep:
        print(f"Logs and shared folder kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def run_checks(checks: Checks, lb: Balancer, replicas: list[Replica], workdir: Path) -> None:
    client = httpx.Client(headers=AUTH, timeout=120)
    names = [r.name for r in replicas]

    def voices_of(url: str) -> set[str]:
        r = client.get(url + "/api/voices")
        r.raise_for_status()
        return {v["name"] for v in r.json()["voices"]}

    def speak(url: str, voice: str | None = None) -> httpx.Response:
        body = {"text": "Hola mundo.", "language": "es"} | ({"voice_sample": voice} if voice else {})
        return client.post(url + "/api/tts/batch", json=body)

    def upload(name: str, clip: bytes) -> httpx.Response:
        return client.post(lb.url + "/api/voices", data={"name": name}, files={"files": (f"{name}.wav", clip, "audio/wav")})

    def round_robin():
        served = [client.get(lb.url + "/api/voices").headers["x-served-by"] for _ in range(3 * len(replicas))]
        counts = Counter(served)
        assert counts == {n: 3 for n in names}, f"not round-robin: {served}"
        return f"{len(served)} requests through HAProxy: {dict(counts)}"

    def upload_then_speak_everywhere():
        r = upload("alma", make_clip(workdir / "alma.wav", 150))
        assert r.status_code == 201, r.text
        out = []
        for rep in replicas:
            s = speak(rep.url, "alma")
            assert s.status_code == 200, f"{rep.name}: {s.status_code} {s.text[:200]}"
            out.append(f"{rep.name} {wav_seconds(s.content):.2f} s")
        return f"uploaded via HAProxy (on {r.headers['x-served-by']}); synthesized directly on " + ", ".join(out)

    def config_seen_by_all():
        r = client.post(lb.url + "/api/config", json={"voice_sample": "alma", "language": "fr"})
        assert r.status_code == 200, r.text
        for rep in replicas:
            config = client.get(rep.url + "/").json()["config"]
            assert config == {"voice_sample": "alma", "language": "fr"}, f"{rep.name}: {config}"
            s = speak(rep.url)  # no voice given: the shared default one
            assert s.status_code == 200, f"{rep.name}: {s.text[:200]}"
        return f"set via HAProxy (on {r.headers['x-served-by']}); every replica reports and uses alma/fr"

    def delete_seen_by_all():
        r = client.delete(lb.url + "/api/voices/alma")
        assert r.status_code == 200, r.text
        for rep in replicas:
            assert "alma" not in voices_of(rep.url), rep.name
            s = speak(rep.url, "alma")
            assert s.status_code == 404, f"{rep.name}: {s.status_code}"
            assert client.get(rep.url + "/").json()["config"]["voice_sample"] is None, rep.name
        return f"deleted via HAProxy (on {r.headers['x-served-by']}); 404 and default cleared on every replica"

    def concurrent_uploads():
        clips = {f"v{i}": make_clip(workdir / f"v{i}.wav", 120 + 15 * i) for i in range(2 * len(replicas))}
        with concurrent.futures.ThreadPoolExecutor(len(clips)) as pool:
            responses = dict(zip(clips, pool.map(lambda kv: upload(*kv), clips.items()), strict=True))
        bad = {n: r.status_code for n, r in responses.items() if r.status_code != 201}
        assert not bad, f"refused: {bad}"
        for rep in replicas:
            missing = set(clips) - voices_of(rep.url)
            assert not missing, f"{rep.name} misses {missing}"
        spread = Counter(r.headers["x-served-by"] for r in responses.values())
        return f"{len(clips)} uploads at once via HAProxy (handled by {dict(spread)}); all {len(clips)} listed by every replica"

    def sigkill_mid_request():
        victim = replicas[1]
        n = 2 * len(replicas)
        first_bytes = threading.Barrier(n + 1, timeout=120)
        outcome: dict[int, tuple[str, str]] = {}

        def stream(i: int) -> None:
            served = "?"
            try:
                with client.stream("POST", lb.url + "/api/tts/stream",
                                   json={"text": LONG_TEXT, "voice_sample": "v0", "language": "es"}) as r:
                    served = r.headers.get("x-served-by", "?")
                    chunks = r.iter_bytes()
                    next(chunks)  # the WAV header: the request is in flight on its replica
                    first_bytes.wait()
                    total = sum(len(c) for c in chunks)
                    outcome[i] = (served, "ok" if r.status_code == 200 and total > 0 else f"status {r.status_code}")
            except threading.BrokenBarrierError:
                outcome[i] = (served, "never started")
            except httpx.HTTPError as exc:
                outcome[i] = (served, f"failed: {type(exc).__name__}")

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        first_bytes.wait()
        victim.kill()
        killed_at = time.monotonic()
        say(f"  SIGKILLed {victim.name} with {n} streams in flight through HAProxy")
        wait(lambda: lb.states().get(victim.name) == "DOWN", f"HAProxy to mark {victim.name} DOWN", 10)
        down_after = time.monotonic() - killed_at
        finish_by = time.monotonic() + 420
        for t in threads:
            t.join(max(0.0, finish_by - time.monotonic()))
        by_server = Counter(outcome[i][0] for i in outcome)
        failed = [s for s, result in outcome.values() if result != "ok"]
        ok_others = [s for s, result in outcome.values() if result == "ok" and s != victim.name]
        assert len(outcome) == n, f"{n - len(outcome)} streams still running 420 s after the kill (a very slow machine?)"
        assert all(s == victim.name for s in failed), f"requests on other replicas failed: {outcome}"
        assert len(ok_others) == n - by_server[victim.name], f"{outcome}"
        assert by_server[victim.name] > 0 and failed, f"the victim held no request, nothing was tested: {outcome}"
        # New requests while it is down: all answered, none sent to it.
        after = [speak(lb.url, "v0") for _ in range(2 * len(replicas))]
        assert all(r.status_code == 200 for r in after), [r.status_code for r in after]
        assert victim.name not in {r.headers["x-served-by"] for r in after}
        return (f"{victim.name} held {by_server[victim.name]} of {n} streams: {len(failed)} failed, "
                f"{len(ok_others)} on the others finished whole; DOWN in HAProxy {down_after:.1f} s after the kill; "
                f"then {len(after)}/{len(after)} new requests answered by {sorted({r.headers['x-served-by'] for r in after})}")

    def restart_rejoins():
        victim = replicas[1]
        victim.start()
        started = time.monotonic()
        wait(victim.ready, f"{victim.name} to be ready again", 600)
        wait(lambda: lb.states().get(victim.name) == "UP", f"HAProxy to mark {victim.name} UP", 30)
        up_after = time.monotonic() - started
        served = Counter(speak(lb.url, "v0").headers["x-served-by"] for _ in range(3 * len(replicas)))
        assert served[victim.name] > 0, f"no request reached {victim.name}: {dict(served)}"
        assert {"v0", "v1"} <= voices_of(victim.url)
        return (f"restarted, UP in HAProxy after {up_after:.1f} s; next {sum(served.values())} requests: {dict(served)}; "
                f"HAProxy now: {lb.states()}")

    checks.run("round-robin through HAProxy", round_robin)
    checks.run("upload via the balancer, synthesize on every replica", upload_then_speak_everywhere)
    checks.run("config set through one, seen by all", config_seen_by_all)
    checks.run("delete seen by all", delete_seen_by_all)
    checks.run("concurrent uploads of distinct voices all present", concurrent_uploads)
    checks.run("SIGKILL a replica mid-request", sigkill_mid_request)
    checks.run("restarted replica rejoins", restart_rejoins)


if __name__ == "__main__":
    sys.exit(main())
