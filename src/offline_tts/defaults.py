"""The defaults set with POST /api/config (voice and language), kept across restarts in a JSON file.

Several replicas may share the file (one cache folder on shared storage): each re-reads it when it
changed (inode, size, mtime) and a change is a read-modify-write under a lock file (fcntl.flock, which
works across processes and, on Linux, on NFS too), so the defaults set on one replica are those of all.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .fileio import atomic_write, file_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defaults:
    voice_sample: str | None = None
    language: str = "es"


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _version(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class DefaultsStore:
    def __init__(self, path: Path, language: str):
        self.path = path
        self.lock_path = path.with_name(f".{path.name}.lock")  # hidden, beside it: never read as data
        self.language = language
        self._current = Defaults(language=language)
        self._version: tuple[int, int, int] | None = None  # of the file as last read or written
        self._lock = threading.Lock()  # one read-change-save at a time in this process
        if self._refresh():
            log.info("Defaults restored from %s: %s", path, self._current)

    @property
    def current(self) -> Defaults:
        """The defaults as saved now (another replica may have changed them): one stat per call."""
        self._refresh()
        return self._current

    def _refresh(self) -> bool:
        """Re-read the file if it is not the version last seen; True when it was read."""
        version = _version(self.path)
        if version is None or version == self._version:
            return False  # unchanged, or never saved (or unsaveable: what was set stays in memory)
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            self._current = Defaults(voice_sample=saved.get("voice_sample"), language=saved.get("language") or self.language)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("Ignoring unreadable defaults file %s (%s)", self.path, exc)
        self._version = version  # an unreadable version is not read again
        return True

    def update(self, change: Callable[[Defaults], Defaults]) -> Defaults:
        """Apply `change` to the defaults as they are now (in any replica) and save the result. `change`
        may raise to refuse (nothing is saved); it must be quick: it runs under the locks."""
        with self._lock, file_lock(self.lock_path):
            self._refresh()
            new = change(self._current)
            if new != self._current:
                self._save(new)
            return new

    def _save(self, defaults: Defaults) -> None:
        try:
            write_json_atomic(self.path, asdict(defaults))
            self._version = _version(self.path)
        except OSError as exc:  # a read-only or full disk must not stop the service
            log.warning("Could not save defaults to %s (%s); they last until restart", self.path, exc)
        self._current = defaults
