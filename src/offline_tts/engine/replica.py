"""A model replica's thread and its unit of work: one sentence of one request, its audio coming back through a
callback. `ReplicaThread` is what the pool talks to (submit / call / wake / close, load figures); the batching
`Scheduler` (scheduler.py) and the one-at-a-time `SequentialRunner` (sequential.py) fill in how sentences run."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
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


class ReplicaThread:
    """One thread that owns one engine replica: sentences queue here, functions (`call`) run between them."""

    max_batch = 1
    vocoder_seconds = 0.0  # HiFi-GAN time counted apart from the steps (the batching scheduler's)

    def __init__(self, engine, name: str):
        self.engine = engine
        self._queue: deque[SentenceJob] = deque()
        self._calls: deque[tuple[Callable[[Any], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run (a whole sentence per step when not batched)
        self.rows = 0  # sentences decoded in them, all steps together (rows / steps: the mean batch)
        # Where the thread's time goes (seconds, summed): decode steps and join stalls (prefills that running
        # streams waited for); `stall_max`: the longest such stall. (HiFi-GAN: `vocoder_seconds`.)
        self.step_seconds = self.stall_seconds = self.stall_max = 0.0
        self._thread = threading.Thread(target=self._run, name=f"tts-{name}", daemon=True)

    def start(self) -> None:
        """Start the thread (at the end of a subclass's __init__, once its state exists)."""
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------------
    def submit(self, job: SentenceJob) -> None:
        with self._wake:
            self._queue.append(job)
            self._wake.notify()

    def call(self, fn: Callable[[Any], Any]) -> Future:
        """Run `fn(engine)` on the replica's thread between two steps; its result or error comes in the future."""
        future: Future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def wake(self) -> None:
        """Look at the cancel flags now (the loop also looks at every step)."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        """Sentences waiting for a slot."""
        return len(self._queue)

    # -- the replica's thread ---------------------------------------------------------------------
    def _run(self) -> None:
        raise NotImplementedError

    def _call(self, fn: Callable[[Any], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)
