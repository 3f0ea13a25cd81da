"""The defaults set with POST /api/config (voice and language), kept across restarts in a JSON file."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .fileio import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Defaults:
    voice_sample: str | None = None
    language: str = "es"


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


class DefaultsStore:
    def __init__(self, path: Path, language: str):
        self.path = path
        self.current = Defaults(language=language)
        self._lock = threading.Lock()  # one read-change-save at a time: no update is lost
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            self.current = Defaults(voice_sample=saved.get("voice_sample"), language=saved.get("language") or language)
            log.info("Defaults restored from %s: %s", path, self.current)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("Ignoring unreadable defaults file %s (%s)", path, exc)

    def update(self, change: Callable[[Defaults], Defaults]) -> Defaults:
        """Apply `change` to the defaults as they are now and save the result. `change` may raise to
        refuse (nothing is saved); it must be quick: it runs under the lock."""
        with self._lock:
            new = change(self.current)
            if new != self.current:
                self._save(new)
            return new

    def _save(self, defaults: Defaults) -> None:
        try:
            write_json_atomic(self.path, asdict(defaults))
        except OSError as exc:  # a read-only or full disk must not stop the service
            log.warning("Could not save defaults to %s (%s); they last until restart", self.path, exc)
        self.current = defaults
