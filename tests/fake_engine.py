"""A small engine for the unit layer: implements `SpeechEngine` (engine/base.py) without a model.

Its audio is deterministic and tells what was asked: each sentence is a tone whose frequency comes from its
voice and whose length is `SECONDS_PER_CHAR` per character divided by the speed, streamed in chunks on the
plan's token grid. It runs through the real service and pool (on a `SequentialRunner`, as it does not batch),
so the service, admission, sessions and the HTTP layer are tested in-process in milliseconds.
`fail_on` makes a sentence containing that text raise, like a model fault.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from offline_tts.engine.base import Conditioning, StreamPlan
from offline_tts.errors import InvalidText
from offline_tts.text import split_sentences

SAMPLE_RATE = 24_000
SECONDS_PER_CHAR = 0.02
SAMPLES_PER_TOKEN = 1024


class FakeEngine:
    model_id = "fake-1"
    device = "cpu"
    sample_rate = SAMPLE_RATE
    conditioning_sample_rate = 22_050
    languages = ("es", "en", "fr", "de", "zh-cn")
    audio_tokens_per_second = 22_050 / 1024
    batched = False

    def __init__(self, *, char_limit: int = 200, fail_on: str | None = None, delay_per_chunk: float = 0.0):
        self._char_limit = char_limit
        self.fail_on = fail_on
        self.delay_per_chunk = delay_per_chunk  # seconds per streamed chunk (to hold a slot in tests)
        self.conditioned = 0  # compute_conditioning calls
        self.spoken: list[tuple[str, str]] = []  # (text, language) of each sentence spoken

    def char_limit(self, language: str) -> int:
        return self._char_limit

    def prepare_text(self, text: str, language: str) -> list[str]:
        if "\x00" in text:
            raise InvalidText("The text holds a NUL character.", "Remove it.")
        return [p for p in split_sentences(text, language, self._char_limit) if any(c.isalnum() for c in p)]

    def compute_conditioning(self, clips: list[np.ndarray]) -> Conditioning:
        self.conditioned += 1
        energy = float(np.mean([np.sqrt(np.mean(np.square(c))) for c in clips]))
        return Conditioning(self.model_id, {"frequency": 200.0 + 400.0 * min(energy, 1.0)})

    def save_conditioning(self, conditioning: Conditioning, target: BinaryIO) -> None:
        target.write(json.dumps({"model_id": conditioning.model_id, **conditioning.data}).encode())

    def load_conditioning(self, path: Path) -> Conditioning:
        data = json.loads(path.read_bytes())
        if data.pop("model_id") != self.model_id or set(data) != {"frequency"}:
            raise ValueError(f"{path.name}: conditioning of another model")
        return Conditioning(self.model_id, data)

    def _audio(self, text: str, conditioning: Conditioning, speed: float) -> np.ndarray:
        if self.fail_on and self.fail_on in text:
            raise RuntimeError(f"fake model fault on {self.fail_on!r}")
        samples = int(len(text) * SECONDS_PER_CHAR * SAMPLE_RATE / speed)
        t = np.arange(samples, dtype=np.float32) / SAMPLE_RATE
        return (0.3 * np.sin(2 * np.pi * conditioning.data["frequency"] * t)).astype(np.float32)

    def stream(self, text: str, language: str, conditioning: Conditioning, *, speed: float = 1.0,
               plan: StreamPlan | None = None, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        self.spoken.append((text, language))
        audio = self._audio(text, conditioning, speed)
        plan = plan or StreamPlan()
        start = 0
        for tokens in plan.boundaries():
            if cancel is not None and cancel.is_set():
                return
            end = min(len(audio), tokens * SAMPLES_PER_TOKEN)
            if self.delay_per_chunk:
                time.sleep(self.delay_per_chunk)
            yield audio[start:end]
            start = end
            if end >= len(audio):
                return

    def synthesize(self, text: str, language: str, conditioning: Conditioning, *, speed: float = 1.0,
                   cancel: threading.Event | None = None) -> np.ndarray:
        self.spoken.append((text, language))
        return self._audio(text, conditioning, speed)
