"""The front of the model replicas: admission, and "speak this sentence, give me its chunks".

Behind it, each replica is a `Scheduler` (engine/scheduler.py): one thread that owns the replica and
decodes up to `max_batch` sentences together, one batched GPT step for all of them. Callers see none of
that: `stream` yields one sentence's audio chunks, `run` runs a function on a replica (voice conditioning).

Admission bounds the work in the house: up to `workers * max_batch` requests run at once (one sentence
of each in a slot) and `max_queue` more may wait for a slot; beyond that a request is refused at once
(Busy, with a retry delay: the HTTP layer answers 503 + Retry-After) instead of piling up. A request keeps its place while it
streams; its sentences take a slot one at a time, each leaving it the moment it is generated (a client
that reads slowly holds the audio already made, not a slot).

Room to grow: the unit of work is a sentence with a `deliver` callback, not a request, so text that
arrives in pieces submits each sentence when the splitter completes it (speech_session.py), and an engine
that cannot batch (`batched = False`) runs on a `SequentialRunner` (engine/sequential.py) with the same
`submit(SentenceJob)` / `call(fn)`, so the pool admits, places and streams for it unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from ..errors import Busy
from .base import Conditioning, StreamPlan
from .replica import DONE, SentenceJob
from .sequential import SequentialRunner

if TYPE_CHECKING:
    from .scheduler import Scheduler

E = TypeVar("E")
T = TypeVar("T")


def replica(engine, max_batch: int, name: str, cuda_graphs: bool = False,
            vocoder_thread: bool = False) -> Scheduler | SequentialRunner:
    """The thread that runs one engine replica: the batching scheduler when the engine supports it."""
    if not engine.batched:
        return SequentialRunner(engine, name=name)
    from .scheduler import Scheduler  # torch: imported only for an engine that uses it

    return Scheduler(engine, max_batch, name=name, cuda_graphs=cuda_graphs, vocoder_thread=vocoder_thread)


class Place:
    """One admitted request's place in the house. `release` gives it back (once; later calls do nothing);
    `hand_over` passes that duty on to whatever keeps the place after the block that took it."""

    def __init__(self, pool: EnginePool):
        self._pool: EnginePool | None = pool
        self.handed_over = False

    def release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.admitted -= 1

    def hand_over(self) -> Callable[[], None]:
        self.handed_over = True
        return self.release


class EnginePool(Generic[E]):
    def __init__(self, engines: list[E], max_queue: int, max_batch: int = 1, *, cuda_graphs: bool = False,
                 vocoder_thread: bool = False):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = engines
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.schedulers = [replica(engine, max_batch, f"replica-{i}", cuda_graphs, vocoder_thread)
                           for i, engine in enumerate(engines)]
        self.admitted = 0  # requests in the house (running or waiting)

    @property
    def size(self) -> int:
        return len(self.engines)

    @property
    def capacity(self) -> int:
        """Requests that run at once (one slot each)."""
        return sum(s.max_batch for s in self.schedulers)

    @property
    def busy(self) -> int:
        """Replicas with work (sentences decoding or queued, or a function running)."""
        return sum(1 for s in self.schedulers if s.load)

    @property
    def busy_slots(self) -> int:
        return sum(s.busy_slots for s in self.schedulers)

    @property
    def batch_steps(self) -> tuple[int, int]:
        """(batched decode steps run, sentences decoded in them), all replicas together."""
        return sum(s.steps for s in self.schedulers), sum(s.rows for s in self.schedulers)

    @property
    def thread_seconds(self) -> dict[str, float]:
        """Where the replicas' threads spent their time (seconds, all replicas), and the longest join stall."""
        return {"step": sum(s.step_seconds for s in self.schedulers),
                "vocoder": sum(s.vocoder_seconds for s in self.schedulers),
                "join_stall": sum(s.stall_seconds for s in self.schedulers),
                "join_stall_max": max(s.stall_max for s in self.schedulers)}

    @property
    def waiting(self) -> int:
        """Sentences waiting for a slot."""
        return sum(s.queued for s in self.schedulers)

    def admit(self) -> Place:
        """Take a place for one request, or raise Busy when the line is full."""
        if self.admitted >= self.capacity + self.max_queue:
            raise Busy(
                f"The server is busy ({self.admitted} requests running or queued).",
                "Retry in a few seconds, or raise TTS_MAX_BATCH / TTS_WORKERS / TTS_MAX_QUEUE.",
            )
        self.admitted += 1
        return Place(self)

    def _least_loaded(self) -> Scheduler:
        return min(self.schedulers, key=lambda s: s.load)

    async def run(self, fn: Callable[[E], T]) -> T:
        """Run `fn(engine)` on the least loaded replica, between two of its decode steps."""
        return await asyncio.wrap_future(self._least_loaded().call(fn))

    async def stream(self, text: str, language: str, conditioning: Conditioning, *, speed: float = 1.0,
                     plan: StreamPlan | None = None, cancel: threading.Event | None = None, seed: int | None = None,
                     made: Callable[[int], None] | None = None) -> AsyncIterator[np.ndarray]:
        """One sentence's audio chunks (float32) as the replica makes them; `plan` None: one chunk, decoded
        whole. `made(samples)` is called on the replica's thread for each chunk made. When the consumer
        leaves early, `cancel` is set: the sentence leaves its slot at the replica's next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = cancel if cancel is not None else threading.Event()

        def deliver(item: Any) -> None:  # on the replica's thread
            if made is not None and isinstance(item, np.ndarray):
                made(len(item))
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                cancel.set()

        scheduler = self._least_loaded()
        scheduler.submit(SentenceJob(text, language, conditioning, deliver, speed=speed, plan=plan, cancel=cancel,
                                     seed=seed))
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                cancel.set()  # the consumer left (e.g. a client disconnected): free the slot now
                scheduler.wake()

    async def warm_up(self, clip: np.ndarray, text: str, plan: StreamPlan) -> None:
        """Condition a voice on `clip` and speak `text` on every replica (not just the least loaded), so
        the first real request does not pay for lazy initialisation."""
        for scheduler in self.schedulers:
            engine = scheduler.engine
            conditioning = await asyncio.wrap_future(scheduler.call(lambda e: e.compute_conditioning([clip])))
            ended: concurrent.futures.Future = concurrent.futures.Future()

            def deliver(item: Any, ended: concurrent.futures.Future = ended) -> None:
                if item is DONE or isinstance(item, BaseException):
                    ended.set_result(item)

            scheduler.submit(SentenceJob(text, engine.languages[0], conditioning, deliver, plan=plan))
            if isinstance(item := await asyncio.wrap_future(ended), BaseException):
                raise item

    def close(self) -> None:
        for scheduler in self.schedulers:
            scheduler.close()
