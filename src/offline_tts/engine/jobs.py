"""The unit of work of a model replica: one sentence of one request, and how its audio comes back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import Conditioning, StreamPlan

DONE = object()  # the last item delivered for a sentence that ended normally (or was cancelled)


@dataclass
class SentenceJob:
    """One sentence of one request, as the scheduler runs it."""

    text: str  # already prepared by the engine (`prepare_text`)
    language: str
    conditioning: Conditioning
    deliver: Callable[[Any], None]  # gets each float32 chunk, then DONE, or an exception
    speed: float = 1.0
    plan: StreamPlan | None = None  # None: the whole sentence in one chunk, decoded in one go
    cancel: threading.Event = field(default_factory=threading.Event)
    seed: int | None = None
