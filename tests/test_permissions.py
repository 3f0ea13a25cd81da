"""Folders the service's user cannot read or write (issue 14): the real server, as a non-root user meets them.

In a container the service runs as uid 1000, and the folders it is given often belong to someone else:
Docker creates a missing `./voices` bind mount as root, `offline-tts random-model` made its folder for
its owner only, a cache volume may be read-only. Sessions and CI run as root, which file modes do not
stop; root without the DAC capabilities (`capsh --drop=cap_dac_override,cap_dac_read_search`, Debian's
libcap2-bin, installed by `make test`) meets the same errors as that user on a folder owned by
another uid. As a non-root user the server runs as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from helpers import BIN, ServerProcess, make_clip

OTHER_UID = 54321  # owns the folders the service may not use (no such user needed)
DROP = "--drop=cap_dac_override,cap_dac_read_search"


def _capsh() -> str | None:
    return shutil.which("capsh") or next((p for p in ("/usr/sbin/capsh", "/sbin/capsh") if os.path.exists(p)), None)


@pytest.fixture(scope="module")
def as_service_user(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The command prefix that runs a process with a non-root user's file access ([] when not root)."""
    if os.geteuid() != 0:
        return []
    capsh = _capsh()
    if capsh is None:
        pytest.skip("capsh is missing (Debian package libcap2-bin; `make test` installs it)")
    # Check that dropping the capabilities really takes root's file access away here.
    locked = tmp_path_factory.mktemp("locked")
    (locked / "f").write_text("x")
    os.chown(locked, OTHER_UID, OTHER_UID)
    locked.chmod(0o700)
    probe = subprocess.run([capsh, DROP, "--", "-c", 'cat "$0/f"', str(locked)], capture_output=True, text=True)
    if probe.returncode == 0 or "Permission denied" not in probe.stderr:
        pytest.skip(f"capsh cannot drop root's DAC capabilities here (rc {probe.returncode}: {probe.stderr.strip()[:200]})")
    return [capsh, DROP, "--", "-c", 'exec "$0" "$@"']


def not_yours(path: Path, mode: int) -> Path:
    """Make `path` belong to another user with `mode` (as non-root: only the mode, for its owner)."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
        path.chmod(mode)
    else:
        path.chmod((mode & 0o007) * 0o111)  # we own it: give ourselves only what others would have
    return path


class CappedServer(ServerProcess):
    """ServerProcess started through a command prefix (capsh)."""

    def __init__(self, prefix: list[str], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix = prefix

    def start(self, wait_ready: bool = True, timeout: float = 120) -> CappedServer:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([*self.prefix, str(BIN / "offline-tts"), "serve"], cwd=self.workdir, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self


@pytest.fixture
def capped(as_service_user, tiny_model_dir: Path, tmp_path: Path):
    started: list[CappedServer] = []

    def make(env: dict[str, str] | None = None, model_dir: Path | None = None) -> CappedServer:
        srv = CappedServer(as_service_user, tmp_path / f"srv{len(started)}", model_dir or tiny_model_dir, env)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
    for path in tmp_path.rglob("*"):  # give the folders back, so pytest can clean up (also as non-root)
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def _uid_text() -> str:
    return f"uid {os.geteuid()}"


def _wait_exit(srv: CappedServer, timeout: float = 60) -> int:
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit:\n{srv.log()}")


def test_unreadable_model_dir_is_a_clear_startup_error(capped, tiny_model_dir: Path, tmp_path: Path):
    # The case: a model folder made by another user with mode 0700 (as random-model used to).
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(tiny_model_dir):
        (model / name).symlink_to(tiny_model_dir / name)
    not_yours(model, 0o700)
    srv = capped(model_dir=model).start(wait_ready=False)
    assert _wait_exit(srv) == 2
    log = srv.log()
    assert "Traceback" not in log and "PermissionError" not in log, log
    assert f"The model directory {model} cannot be read by the service, which runs as {_uid_text()}" in log, log
    assert "chmod -R a+rX" in log and "APP_UID" in log, log


def test_unreadable_model_file_is_a_clear_startup_error(capped, tiny_model_dir: Path, tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("model.pth"))
    (model / "model.pth").symlink_to(tiny_model_dir / "model.pth")
    not_yours(model / "config.json", 0o600)
    srv = capped(model_dir=model).start(wait_ready=False)
    assert _wait_exit(srv) == 2
    log = srv.log()
    assert "Traceback" not in log, log
    assert f"The model directory {model} cannot be read" in log and "(config.json)" in log, log


def test_random_model_folder_is_readable_by_others(tmp_path: Path):
    """`offline-tts random-model` no longer leaves a 0700 folder (mkdtemp's mode) that a container's user cannot read."""
    from offline_tts.engine.random_model import _move_into_place

    tmp = Path(__import__("tempfile").mkdtemp(dir=tmp_path))
    (tmp / "config.json").write_text("{}")
    old = os.umask(0o022)
    try:
        _move_into_place(tmp, tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


@pytest.fixture
def voices_not_writable(capped):
    """A server whose voices folder (holding one clip) belongs to another user (as Docker's root-made bind mount)."""
    srv = capped()
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    not_yours(srv.voices_dir, 0o755)
    return srv.start()


def _upload(http: httpx.Client, name: str, clip: Path) -> httpx.Response:
    return http.post("/api/voices", data={"name": name}, files={"files": (clip.name, clip.read_bytes(), "audio/wav")})


def test_unwritable_voices_dir_warns_at_startup_and_refuses_uploads_clearly(voices_not_writable, tmp_path: Path):
    srv = voices_not_writable
    log = srv.log()
    assert f"The voices directory {srv.voices_dir} is not writable by the service, which runs as {_uid_text()}" in log, log
    assert "Uploads and deletes through the API are disabled" in log and "mkdir voices" in log and "APP_UID" in log
    clip = make_clip(tmp_path / "upload.wav", seconds=6, freq=240)
    with srv.client() as http:
        assert [v["name"] for v in http.get("/api/voices").json()["voices"]] == ["ana"]
        for r in (_upload(http, "bob", clip), http.delete("/api/voices/ana")):
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "voices_not_writable", error
            assert "cannot write to its voices directory" in error["message"]
            assert "mkdir voices" in error["hint"] and _uid_text() in error["hint"], error
            assert str(srv.voices_dir) not in r.text  # no server paths for clients
        # The voices there still work, and nothing was lost.
        r = http.post("/api/tts/batch", json={"text": "Hello there.", "voice_sample": "ana", "language": "en"})
        assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text
        assert [v["name"] for v in http.get("/api/voices").json()["voices"]] == ["ana"]
        # The operator fixes the owner: uploads work at once, no restart needed.
        os.chown(srv.voices_dir, os.geteuid(), os.getegid())
        r = _upload(http, "bob", clip)
        assert r.status_code == 201, r.text
        assert http.delete("/api/voices/bob").status_code == 200
    assert "Traceback" not in srv.log()


def test_read_only_cache_dir_warns_and_the_service_still_works(capped, tmp_path: Path):
    srv = capped()
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.cache_dir.mkdir()
    not_yours(srv.cache_dir, 0o755)
    srv.start()
    log = srv.log()
    assert f"The cache directory {srv.cache_dir} is not writable by the service, which runs as {_uid_text()}" in log, log
    assert "only slower" in log
    with srv.client() as http:
        r = http.post("/api/config", json={"voice_sample": "ana", "language": "en"})
        assert r.status_code == 200, r.text
        for _ in range(2):  # the second time from the in-memory cache
            r = http.post("/api/tts/batch", json={"text": "Hello there."})
            assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text
        assert http.get("/").json()["config"]["voice_sample"] == "ana"
        clip = make_clip(tmp_path / "upload.wav", seconds=6, freq=240)
        assert _upload(http, "bob", clip).status_code == 201  # voices are elsewhere: uploads work
    assert list(srv.cache_dir.iterdir()) == []
    assert "Traceback" not in srv.log()


def test_a_fixed_voices_dir_owner_is_seen_without_a_warning(capped):
    """The control: the same server with its own folders starts without a permission warning."""
    srv = capped()
    make_clip(srv.voices_dir / "ana.wav", seconds=6)
    srv.start()  # ready: its startup lines are in the log
    assert "not writable" not in srv.log() and "cannot be read" not in srv.log()
