"""Fetch the official XTTS-v2 files into the model directory when they are missing.

Verification: every file of `MODEL_FILES` has its size and sha256 pinned (the Hugging Face repo
coqui/XTTS-v2 at commit `REVISION`; the same values are published by several independent
projects that pin this revision). For a manifest entry without them (custom manifests), the
size falls back to what the server says (Content-Length / Content-Range / X-Linked-Size) and the
sha256 to the hub's `X-Linked-Etag` header, which Hugging Face sets to the sha256 of LFS files.

Downloads stream into `<file>.part`, resume with an HTTP Range request when a `.part` is left
from an interrupted run, and are moved into place with `os.replace` only once verified, so the
directory never holds a final-named file that is incomplete. A file lock keeps concurrent
processes (several workers starting at once) from writing the same `.part`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from filelock import FileLock, Timeout

from offline_tts.access import is_access_error, ownership_fix, service_user
from offline_tts.engine.model_files import DEFAULT_BASE_URL, HF_REPO, REQUIRED_FILES, REVISION, missing_model_files

logger = logging.getLogger("offline_tts.download")

LICENSE_URL = "https://coqui.ai/cpml"

_CHUNK = 1 << 20
_LOG_EVERY_S = 5.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelFile:
    name: str
    size: int | None = None  # bytes; None: trust the server's
    sha256: str | None = None  # hex; None: use the hub's X-Linked-Etag when it has one


MODEL_FILES: tuple[ModelFile, ...] = (
    ModelFile("config.json", 4_368, "ef262b1454dd2a77e1461b0b2cd53e19b8a7624cc131b837d36df67356bc75e8"),
    ModelFile("vocab.json", 361_219, "928260878a59da8a72a2a5b7687fea29d5106137669d90945430fe17e415304a"),
    ModelFile("speakers_xtts.pth", 7_754_818, "f0f6137c19a4eab0cbbe4c99b5babacf68b1746e50da90807708c10e645b943b"),
    ModelFile("model.pth", 1_867_929_118, "c7ea20001c6a0a841c77e252d8409f6a74fb423e79b3206a0771ba5989776187"),
)


class ModelUnavailableError(Exception):
    """The model files are missing and could not be obtained; the message says how to fix it."""


class LicenseNotAcceptedError(ModelUnavailableError):
    """Downloading XTTS-v2 needs the Coqui Public Model License to be accepted first."""


class ModelIntegrityError(ModelUnavailableError):
    """A downloaded file does not have the expected size or sha256 (it was deleted)."""


def ensure_model(
    model_dir: Path,
    *,
    accept_license: bool,
    base_url: str = DEFAULT_BASE_URL,
    allow_download: bool = True,
    timeout: float = 30,
    files: Sequence[ModelFile] = MODEL_FILES,
) -> Path:
    """Return `model_dir` once it holds all REQUIRED_FILES, downloading the missing ones.

    No network access when the files are already there. Raises ModelUnavailableError (or its
    LicenseNotAcceptedError / ModelIntegrityError) with an actionable message otherwise.
    """
    model_dir = Path(model_dir).expanduser().absolute()
    check_model_dir_readable(model_dir)
    missing = missing_model_files(model_dir)
    if not missing:
        return model_dir
    if not allow_download:
        raise ModelUnavailableError(
            f"XTTS-v2 model files are missing in {model_dir}: {', '.join(missing)} "
            f"(expected: {', '.join(REQUIRED_FILES)}). Automatic download is disabled. "
            f"{_offline_help(model_dir)}"
        )
    if not accept_license:
        raise LicenseNotAcceptedError(
            f"XTTS-v2 model files are missing in {model_dir}: {', '.join(missing)} "
            f"(expected: {', '.join(REQUIRED_FILES)}). Downloading them requires accepting the "
            f"Coqui Public Model License (CPML, non-commercial use only: {LICENSE_URL}). "
            "If you accept it, set TTS_ACCEPT_LICENSE=true (or COQUI_TOS_AGREED=1) and start again. "
            f"{_offline_help(model_dir)}"
        )

    manifest = {f.name: f for f in files}
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if not is_access_error(exc):
            raise
        raise ModelUnavailableError(
            f"The model directory {model_dir} cannot be created by the service, which runs as {service_user()} "
            f"({exc.strerror}), so the model cannot be downloaded into it. {ownership_fix(model_dir, write=True)}"
        ) from None
    try:
        # Another process may be downloading the same files: wait for it, then re-check.
        with FileLock(str(model_dir / ".download.lock"), timeout=6 * 3600):
            missing = set(missing_model_files(model_dir))
            # Manifest order: the small files first, so a bad URL fails before the big download.
            todo = [f for f in files if f.name in missing]
            todo += [ModelFile(name) for name in REQUIRED_FILES if name in missing and name not in manifest]
            _check_disk_space(model_dir, todo)
            # identity encoding: byte ranges and Content-Length then refer to the file itself.
            headers = {"User-Agent": "offline-tts", "Accept-Encoding": "identity"}
            with httpx.Client(timeout=timeout, follow_redirects=True, headers=headers) as client:
                for spec in todo:
                    _download(client, base_url.rstrip("/"), model_dir, spec)
    except Timeout as exc:
        raise ModelUnavailableError(f"Timed out waiting for another download into {model_dir} ({exc}).") from exc
    logger.info("XTTS-v2 model files ready in %s", model_dir)
    return model_dir


def check_model_dir_readable(model_dir: Path) -> None:
    """ModelUnavailableError, naming the directory, the service's user and the fix, when the model files
    (or the directory holding them) exist but cannot be read: e.g. a folder made by `offline-tts
    random-model` as another user, or a host folder owned by another uid mounted into a container."""
    model_dir = Path(model_dir).expanduser().absolute()
    try:
        for name in REQUIRED_FILES:
            path = model_dir / name
            if path.is_file():  # stat: needs search permission on every folder above
                with path.open("rb"):
                    pass
    except OSError as exc:
        if not is_access_error(exc):
            raise
        raise ModelUnavailableError(
            f"The model directory {model_dir} cannot be read by the service, which runs as {service_user()}: "
            f"{exc.strerror} ({Path(exc.filename).name if exc.filename else model_dir}). "
            f"{ownership_fix(model_dir, write=False)}"
        ) from None


def _offline_help(model_dir: Path) -> str:
    return (
        f"Offline: copy config.json, model.pth, vocab.json and speakers_xtts.pth from "
        f"https://huggingface.co/{HF_REPO} (revision {REVISION}) into {model_dir}. "
        f"For testing only: `offline-tts random-model {model_dir}` writes a random-weight model "
        "(it produces noise)."
    )


def _check_disk_space(model_dir: Path, files: list[ModelFile]) -> None:
    needed = 0
    for f in files:
        if f.size is not None:
            part = model_dir / f"{f.name}.part"
            needed += f.size - (part.stat().st_size if part.is_file() else 0)
    free = shutil.disk_usage(model_dir).free
    if needed > free:
        raise ModelUnavailableError(
            f"Not enough disk space in {model_dir}: the XTTS-v2 files need {needed / 1e9:.2f} GB more, "
            f"{free / 1e9:.2f} GB free."
        )


def _download(client: httpx.Client, base_url: str, model_dir: Path, spec: ModelFile) -> None:
    url = f"{base_url}/{spec.name}"
    final = model_dir / spec.name
    part = model_dir / f"{spec.name}.part"
    offset = part.stat().st_size if part.is_file() else 0
    if spec.size is not None and offset >= spec.size:
        # Complete but not moved in (killed at the very end), or not a prefix of the right file.
        if offset == spec.size and spec.sha256 and _hash_prefix(part, offset).hexdigest() == spec.sha256:
            os.replace(part, final)
            return
        part.unlink()
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    logger.info("Downloading %s%s", url, f" (resuming at {offset / 1e6:.1f} MB)" if offset else "")
    sha_on_disk = None
    restart = False

    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416 and offset:
                restart = True  # the server has nothing past our .part: it cannot be trusted
            else:
                if response.status_code not in (200, 206):
                    raise ModelUnavailableError(
                        f"Downloading {url} failed: HTTP {response.status_code}. "
                        f"Check the model URL or your network. {_offline_help(model_dir)}"
                    )
                if response.status_code == 200 or not _resumes_at(response, offset):
                    offset = 0  # the server ignored the Range header: start over
                expected_size = spec.size or _server_size(response, offset)
                expected_sha = spec.sha256 or _server_sha256(response)
                digest = _hash_prefix(part, offset)
                sha_on_disk = _stream_body(response, part, offset, expected_size, digest, spec.name)
    except httpx.TransportError as exc:
        kept = part.is_file() and part.stat().st_size > 0
        raise ModelUnavailableError(
            f"Could not download {spec.name} from {base_url}: {type(exc).__name__}: {exc}. "
            "The model hub could not be reached or the connection broke"
            + (" (the partial file is kept: running again resumes it)" if kept else "")
            + f". Check the network (or TTS_MODEL_URL). {_offline_help(model_dir)}"
        ) from exc
    if restart:
        logger.warning("%s: the server refused to resume; downloading it from the start", spec.name)
        part.unlink()
        return _download(client, base_url, model_dir, spec)

    _verify(part, spec.name, expected_size, expected_sha, sha_on_disk)
    os.replace(part, final)
    logger.info("%s: verified and saved (%.1f MB)", spec.name, final.stat().st_size / 1e6)


def _stream_body(response: httpx.Response, part: Path, offset: int, total: int | None, digest: Any, name: str) -> str:
    """Append the body to `part` at `offset`; return the sha256 of the whole file (hashed on the fly)."""
    progress = _Progress(name, offset, total)
    with part.open("r+b" if offset else "wb") as out:
        out.seek(offset)
        out.truncate()
        for chunk in response.iter_bytes():  # as received, so a broken transfer keeps all it got
            out.write(chunk)
            digest.update(chunk)
            progress.advance(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    progress.close()
    return digest.hexdigest()


def _verify(part: Path, name: str, expected_size: int | None, expected_sha: str | None, sha: str | None) -> None:
    """Delete `part` and raise ModelIntegrityError unless it has the expected size and sha256."""
    size = part.stat().st_size
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"size {size} bytes, expected {expected_size}"
    elif expected_sha is not None:
        sha = sha or _hash_prefix(part, size).hexdigest()
        if sha != expected_sha:
            problem = f"sha256 {sha}, expected {expected_sha}"
    if problem:
        part.unlink(missing_ok=True)
        raise ModelIntegrityError(
            f"Downloaded {name} is corrupt ({problem}); it was deleted. Run again to download it anew; "
            "if this repeats, the server or a proxy serves a different file."
        )
    if expected_sha is None:
        logger.warning(
            "%s: no sha256 known, %s", name, "only the size was checked" if expected_size else "not verified"
        )


def _hash_prefix(path: Path, length: int) -> Any:
    """A sha256 object fed with the first `length` bytes of `path` (to resume hashing)."""
    digest = hashlib.sha256()
    if length:
        with path.open("rb") as f:
            remaining = length
            while remaining and (block := f.read(min(_CHUNK, remaining))):
                digest.update(block)
                remaining -= len(block)
    return digest


def _resumes_at(response: httpx.Response, offset: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("content-range", ""))
    return bool(match) and int(match.group(1)) == offset


def _server_size(response: httpx.Response, offset: int) -> int | None:
    match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("content-range", ""))
    if match:
        return int(match.group(1))
    for r in (*response.history, response):
        if (linked := r.headers.get("x-linked-size", "")).isdigit():
            return int(linked)
    length = response.headers.get("content-length", "")
    return offset + int(length) if length.isdigit() else None


def _server_sha256(response: httpx.Response) -> str | None:
    # Hugging Face answers /resolve/ for LFS files with a redirect carrying X-Linked-Etag: "<sha256>".
    for r in (*response.history, response):
        etag = r.headers.get("x-linked-etag", "").strip('"').removeprefix("W/").strip('"').lower()
        if _SHA256_RE.match(etag):
            return etag
    return None


class _Progress:
    """Log lines every 10 % or 5 s (logger offline_tts.download); a tqdm bar too on a terminal."""

    def __init__(self, name: str, done: int, total: int | None) -> None:
        self.name, self.done, self.total = name, done, total
        self.start_done = done
        self.start = self.last_log = time.monotonic()
        self.last_tenth = self._tenth()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=name, leave=False)

    def _tenth(self) -> int:
        return self.done * 10 // self.total if self.total else 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        tenth = self._tenth()
        if now - self.last_log >= _LOG_EVERY_S or tenth > self.last_tenth:
            self.last_log, self.last_tenth = now, tenth
            self._log(now)

    def _log(self, now: float) -> None:
        rate = (self.done - self.start_done) / max(now - self.start, 1e-6) / 1e6
        if self.total:
            logger.info(
                "%s: %d%% (%.1f / %.1f MB) at %.1f MB/s",
                self.name, self.done * 100 // self.total, self.done / 1e6, self.total / 1e6, rate,
            )  # fmt: skip
        else:
            logger.info("%s: %.1f MB at %.1f MB/s", self.name, self.done / 1e6, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
