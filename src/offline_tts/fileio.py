"""Atomic file writes: a crash (even SIGKILL) leaves the old file or the new one, never half of one.
And a lock file for read-modify-write updates shared by several processes (replicas on one folder)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a temporary file beside `path`; when the block succeeds it is fsynced and renamed over `path`.

    The temporary name is hidden (`.tmp-...`) and keeps `path`'s suffix, so nothing ever reads it as data.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held by this process (other processes wait) for the block. A lock file that
    cannot be created (read-only folder) means no other writer can save either: the block runs unlocked."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        log.debug("No lock file %s (%s)", path, exc)
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock
