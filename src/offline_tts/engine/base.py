"""The engine interface: what the service needs from a speech model, and nothing about HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np


@dataclass(frozen=True)
class Conditioning:
    """A voice's "DNA" for one model: opaque to everything but the engine that made it."""

    model_id: str
    data: dict[str, Any]


@dataclass(frozen=True)
class StreamPlan:
    """How a sentence is cut into streamed chunks (in audio tokens, ~21.5 per second of audio).

    A small first chunk gets audio out early; later chunks double up to `max_chunk_tokens`, which keeps
    the per-chunk overhead (left context decoded again) small on long sentences.
    """

    first_chunk_tokens: int = 8
    chunk_tokens: int = 24
    max_chunk_tokens: int = 96
    context_tokens: int = 4

    def boundaries(self):
        """Token counts at which a chunk is flushed: 8, 32, 80, 176, 272, ..."""
        at, size = self.first_chunk_tokens, self.chunk_tokens
        while True:
            yield at
            at += size
            size = min(size * 2, max(self.max_chunk_tokens, self.chunk_tokens))


class SpeechEngine(Protocol):
    model_id: str
    device: str
    sample_rate: int  # of the audio produced
    conditioning_sample_rate: int  # of the clips given to compute_conditioning
    audio_tokens_per_second: float  # what the model generates per second of audio (OpenAI's `usage`)
    batched: bool  # True: runs on the batching Scheduler (gpt_prefix, token_cap, decoder); False: one
    # sentence at a time through `stream` / `synthesize` (engine/sequential.py)
    languages: tuple[str, ...]

    def char_limit(self, language: str) -> int: ...

    def prepare_text(self, text: str, language: str) -> list[str]:
        """One sentence as the pieces the engine will speak (what `stream`/`synthesize` are then given);
        raises InvalidText for text it cannot speak. CPU work: call it off the event loop."""
        ...

    def compute_conditioning(self, clips: list[np.ndarray]) -> Conditioning: ...

    def save_conditioning(self, conditioning: Conditioning, target: BinaryIO) -> None: ...

    def load_conditioning(self, path: Path) -> Conditioning: ...

    def stream(
        self,
        text: str,
        language: str,
        conditioning: Conditioning,
        *,
        speed: float = 1.0,
        plan: StreamPlan | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[np.ndarray]:
        """Speak one sentence, yielding float32 mono chunks as they are generated."""
        ...

    def synthesize(self, text: str, language: str, conditioning: Conditioning, *, speed: float = 1.0,
                   cancel: threading.Event | None = None) -> np.ndarray:
        """Speak one sentence and return its whole audio."""
        ...
