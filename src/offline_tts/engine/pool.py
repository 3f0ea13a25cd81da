"""A pool of model replicas (workers) with a bounded waiting line.

Each replica serves one sentence at a time. Requests are admitted while fewer than
`workers + max_queue` are in the house; beyond that they are refused at once (the HTTP layer answers
503 + Retry-After) instead of piling up. Workers are handed out first come, first served, per
sentence, so concurrent streams interleave instead of waiting for whole texts. A worker goes back to
the pool as soon as its thread is done, never later: a client that reads slowly (or not at all)
holds the audio already made, not the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Generic, TypeVar

from ..errors import Busy

E = TypeVar("E")
T = TypeVar("T")

_DONE = object()


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
    def __init__(self, engines: list[E], max_queue: int):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = engines
        self.max_queue = max_queue
        self._idle: asyncio.Queue[E] = asyncio.Queue()
        for engine in engines:
            self._idle.put_nowait(engine)
        self.admitted = 0  # requests in the house (running or waiting)

    @property
    def size(self) -> int:
        return len(self.engines)

    @property
    def busy(self) -> int:
        return self.size - self._idle.qsize()

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - self.busy)

    def admit(self) -> Place:
        """Take a place for one request, or raise Busy when the line is full."""
        if self.admitted >= self.size + self.max_queue:
            raise Busy(
                f"The server is busy ({self.admitted} requests running or queued).",
                "Retry in a few seconds, or raise TTS_WORKERS / TTS_MAX_QUEUE.",
                headers={"Retry-After": "2"},
            )
        self.admitted += 1
        return Place(self)

    @contextlib.asynccontextmanager
    async def worker(self) -> AsyncIterator[E]:
        engine = await self._idle.get()
        try:
            yield engine
        finally:
            self._idle.put_nowait(engine)

    async def run(self, fn: Callable[[E], T]) -> T:
        """Run `fn(engine)` on a free worker, in a thread (off the event loop)."""
        async with self.worker() as engine:
            return await asyncio.to_thread(fn, engine)

    async def iterate(self, fn: Callable[[E], Iterator[T]], cancel: threading.Event | None = None) -> AsyncIterator[T]:
        """Run the generator `fn(engine)` in a thread on a free worker, yielding its items as they come.

        The worker goes back to the pool when the thread is done with it, not when the consumer has
        taken every item: items wait here for a slow consumer (the caller bounds how many, e.g. by
        setting `cancel`). When the consumer leaves early, `cancel` is set, so the thread stops at its
        next step instead of finishing the whole generator.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = False

        def produce(engine: E) -> None:
            try:
                with contextlib.closing(fn(engine)) as items:
                    for item in items:
                        loop.call_soon_threadsafe(queue.put_nowait, item)
                        if stop:
                            break
            except BaseException as exc:  # forwarded to the consumer, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        engine = await self._idle.get()
        # The worker is handed to no one else while the thread still uses it, and to the next one as soon
        # as it is done: the thread's end gives it back, whatever the consumer is doing.
        thread = asyncio.ensure_future(asyncio.to_thread(produce, engine))
        thread.add_done_callback(lambda _: self._idle.put_nowait(engine))
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop = True
            if not finished and cancel is not None:
                cancel.set()  # the consumer left (e.g. a client disconnected): stop now, not at the next item
