"""Folders the service cannot read or write: found at startup and explained, not a traceback or a 500.

The usual cause is a container whose user (uid 1000 in the image) does not own a bind-mounted or
pre-filled folder: Docker creates a missing `./voices` as root, and `offline-tts random-model` makes
its folder readable by its owner only. Each message names the folder, the user the service runs as,
and the fix.
"""

from __future__ import annotations

import errno
import os
import pwd
import tempfile
from pathlib import Path

# A permission problem (as opposed to a full disk or a missing file).
ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def service_user() -> str:
    """'uid 1000 (app), gid 1000': who the service runs as, for messages."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        name = f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:  # a uid without a passwd entry (docker run --user 1234)
        name = ""
    return f"uid {uid}{name}, gid {gid}"


def ownership_fix(path: Path, *, write: bool) -> str:
    """How to give the service's user access to `path`, on a host and in Docker."""
    uid, gid = os.geteuid(), os.getegid()
    mode = "u+rwX" if write else "a+rX"
    how = f"`chown -R {uid}:{gid} {path}`" if write else f"`chmod -R {mode} {path}` (or `chown -R {uid}:{gid} {path}`)"
    return (f"Fix: on the host, {how}. With Docker, create host folders as yourself before the first start "
            "(`mkdir voices`: a missing one is created by Docker as root), or build the image with "
            "APP_UID set to the folder owner's uid (`APP_UID=$(id -u)` in .env, then `docker compose up --build`).")


def is_access_error(exc: OSError) -> bool:
    return exc.errno in ACCESS_ERRNOS


def write_problem(folder: Path) -> str | None:
    """None when the service can create (and remove) a file in `folder` (created if missing); else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return "it is on a read-only filesystem (a read-only volume or mount)"
        return f"{exc.strerror or type(exc).__name__}"
    return None
