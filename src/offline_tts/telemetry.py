"""What one request did, recorded as it goes: for its access-log line and the metrics.

The record travels in a context variable: the HTTP layer (or a protocol server) opens one per request or
connection, and the service fills it in (voice, language, characters, synthesis figures) without knowing
who asked. `ServiceFigures` is what the service publishes about itself for /metrics.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    """Per-request synthesis figures."""

    first_audio_s: float | None = None
    audio_samples: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    sample_rate: int = 24_000


@dataclass
class RequestRecord:
    """What one request did, for its log line and the metrics (filled in as it goes)."""

    request_id: str
    voice: str | None = None
    language: str | None = None
    characters: int | None = None
    stats: Stats | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def audio_seconds(self) -> float | None:
        if self.stats is None or not self.stats.audio_samples:
            return None
        return self.stats.audio_samples / self.stats.sample_rate


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("tts_request", default=None)


def current_record() -> RequestRecord | None:
    return _current.get()


def start_record(request_id: str) -> tuple[RequestRecord, contextvars.Token]:
    record = RequestRecord(request_id)
    return record, _current.set(record)


def end_record(token: contextvars.Token) -> None:
    _current.reset(token)


def note(**fields: Any) -> None:
    """Attach facts to the current request's record (no-op outside a request, e.g. warm-up)."""
    record = _current.get()
    if record is None:
        return
    for key, value in fields.items():
        if hasattr(record, key) and key != "extra":
            setattr(record, key, value)
        else:
            record.extra[key] = value


@dataclass(frozen=True)
class ServiceFigures:
    """The service's live figures, read when /metrics is scraped."""

    ready: bool
    load_seconds: float | None
    workers: int
    workers_busy: int
    batch_slots: int
    batch_slots_busy: int
    batch_steps: int
    batch_rows: int
    queue_depth: int
    requests_in_progress: int
    queue_limit: int
    streams_dropped: dict[str, int]
    cache_hits: int
    cache_disk_hits: int
    cache_misses: int

