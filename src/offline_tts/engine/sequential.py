"""A replica for engines without batching: one sentence at a time, in the replica's own thread.

Same interface as `Scheduler` (submit / call / wake / close and the load figures), so the pool admits,
places and streams for any engine that implements `SpeechEngine.stream`; a second model that cannot batch,
or the fake engine of the unit tests, runs through the same service and pool as XTTS.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from .replica import DONE, ReplicaThread, SentenceJob

log = logging.getLogger(__name__)


class SequentialRunner(ReplicaThread):
    """Owns one engine replica and speaks its sentences one after the other."""

    def __init__(self, engine, *, name: str = "replica"):
        super().__init__(engine, name)
        self._running = 0  # 1 while a sentence or a call runs
        self.start()

    @property
    def busy_slots(self) -> int:
        return self._running

    @property
    def load(self) -> int:
        return self._running + len(self._queue) + len(self._calls)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._queue or self._calls):
                    self._wake.wait()
                if self._closed:
                    break
                work = ("call", self._calls.popleft()) if self._calls else ("job", self._queue.popleft())
                self._running = 1
            try:
                if work[0] == "call":
                    self._call(*work[1])
                else:
                    self._speak(work[1])
            finally:
                self._running = 0
        with self._wake:
            waiting, self._queue = list(self._queue), deque()
        for job in waiting:
            job.deliver(RuntimeError("the model replica was closed"))

    def _speak(self, job: SentenceJob) -> None:
        if job.cancel.is_set():
            job.deliver(DONE)
            return
        started = time.perf_counter()
        try:
            if job.plan is None:
                job.deliver(self.engine.synthesize(job.text, job.language, job.conditioning, speed=job.speed,
                                                   cancel=job.cancel))
            else:
                for chunk in self.engine.stream(job.text, job.language, job.conditioning, speed=job.speed,
                                                plan=job.plan, cancel=job.cancel):
                    job.deliver(chunk)
                    if job.cancel.is_set():
                        break
        except Exception as exc:  # this sentence fails, the runner goes on
            log.warning("Sentence failed: %s: %s", type(exc).__name__, exc)
            job.deliver(exc)
            return
        finally:
            self.step_seconds += time.perf_counter() - started
        self.steps += 1
        self.rows += 1
        job.deliver(DONE)
