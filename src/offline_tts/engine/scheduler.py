"""Continuous batching of sentences on one model replica: the thread that owns the replica.

Requests submit sentences (`SentenceJob`) and get their audio chunks back, in order, through a callback;
nothing else runs this replica's model meanwhile. Each turn of the loop:

1. runs queued replica work (`call`: e.g. a voice's conditioning) between two decode steps;
2. drops cancelled sequences (slot freed at once; a queued one never starts);
3. admits queued sentences into free slots (tokenize + prefix; a failure fails that sentence only);
4. prefills joining sentences in pieces: everything at once when nothing is decoding, otherwise at most
   `prefill_tokens` per turn, so the running streams keep getting a step every turn (bounded join stall);
5. runs one batched `BatchedGpt.step` and hands each latent to its sentence's `ChunkDecoder` (same flush
   plan as `XttsEngine.stream`: a small first chunk, doubling chunks, a final flush; no plan: one final
   decode, as `XttsEngine.synthesize`). A finished sentence leaves its slot in that same step.

Faults: an exception while admitting or decoding one sentence fails that sentence only; an exception in
the batched prefill or step fails the sentences in it (their slots are freed) and the loop goes on.

HiFi-GAN runs on this thread, between steps: one chunk's vocoding delays the others' next step by its
duration. The thread's time is counted (`step_seconds`, `vocoder_seconds`, `stall_seconds`; /metrics
and the bench's concurrency rows): with the full-size model on 2 CPU cores HiFi-GAN took 25-35% of it
at 1-8 streams of 42 tokens. A vocoder thread (or another CUDA stream) is not tried yet: on 2 cores it
could only win what two half-size thread pools gain over one; on a GPU it would overlap the steps.

Memory: when the replica has been idle for IDLE_TRIM_SECONDS the KV cache is freed and glibc hands its
free heap pages back (`release_free_memory`), so RSS returns to its after-load level between bursts.
"""

from __future__ import annotations

import ctypes
import logging
import time

import numpy as np
import torch

from .batching import BatchedGpt, Sampling, default_max_len
from .replica import DONE, ReplicaThread, SentenceJob
from .streaming import ChunkDecoder

log = logging.getLogger(__name__)

# Seconds a replica stays idle before it frees its KV cache and returns freed heap memory to the OS
# (short enough that RSS falls back between bursts; long enough not to churn between two sentences).
IDLE_TRIM_SECONDS = 1.0

# Prefix tokens prefilled per loop turn while other sentences decode. A full-size prefix is ~100-450 tokens,
# so a joining sentence is ready within a few steps, and each of those steps costs the running streams
# about what a 64-token forward costs (measured in bench/batching_bench.py).
PREFILL_TOKENS = 64


def slot_length(engine) -> int:
    """Cache positions one slot needs: the longest prefix plus the audio tokens a sentence may make
    (TTS_MAX_AUDIO_TOKENS shortens the static cache, which is allocated for every slot)."""
    gpt = engine.model.gpt
    tokens = int(gpt.max_gen_mel_tokens)
    return default_max_len(gpt) - tokens + min(tokens, engine.max_audio_tokens or tokens)


def release_free_memory() -> None:
    """glibc keeps freed memory in its arenas (one per thread that allocated: the replica, torch's
    workers, the event loop); malloc_trim hands the free pages of all of them back to the OS."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class _Sequence:
    """A sentence in a slot: its latents go to its own decoder, flushed on its own plan."""

    def __init__(self, job: SentenceJob, decoder: ChunkDecoder):
        self.job = job
        self.decoder = decoder
        self._boundaries = job.plan.boundaries() if job.plan else None
        self._next_flush = next(self._boundaries) if self._boundaries else None

    def take(self, latent: torch.Tensor) -> None:
        """One latent frame: flush a chunk when the plan says so."""
        self.decoder.add(latent)
        if self._next_flush is not None and self.decoder.frames >= self._next_flush:
            self._next_flush = next(self._boundaries)
            self.send(self.decoder.flush())

    def finish(self) -> None:
        self.send(self.decoder.flush(final=True))
        self.job.deliver(DONE)

    def send(self, chunk: np.ndarray) -> None:
        if len(chunk):
            self.job.deliver(chunk)


class Scheduler(ReplicaThread):
    """Owns one engine replica and runs all its sentences, batched, in one thread."""

    def __init__(self, engine, max_batch: int, *, prefill_tokens: int = PREFILL_TOKENS, name: str = "replica",
                 cuda_graphs: bool = False):
        super().__init__(engine, name)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.gpt = BatchedGpt.for_engine(engine, max_batch, max_len=slot_length(engine), cuda_graphs=cuda_graphs)
        self.sampling = Sampling.of_engine(engine)
        self._active: dict[int, _Sequence] = {}  # slot -> sequence
        self._calling = False
        self.start()

    @property
    def busy_slots(self) -> int:
        return len(self._active)

    @property
    def load(self) -> int:
        return len(self._active) + len(self._queue) + len(self._calls) + self._calling

    # -- the replica's thread ---------------------------------------------------------------------
    def _idle(self) -> bool:
        return not (self._closed or self._queue or self._calls or self._active)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        trimmed = True
        while True:
            with self._wake:
                timed_out = False
                while self._idle() and not timed_out:
                    timed_out = not self._wake.wait(None if trimmed else IDLE_TRIM_SECONDS)
                if self._closed:
                    break
                idle = self._idle()
                calls = [] if idle else list(self._calls)
                self._calls.clear()
                self._calling = bool(calls)
            if idle:  # nothing to do for IDLE_TRIM_SECONDS: give the busy period's memory back
                self._trim()
                trimmed = True
                continue
            trimmed = False
            for fn, future in calls:
                self._call(fn, future)
            self._calling = False
            try:
                with torch.inference_mode():
                    self._turn()
            except Exception:  # a bug of the loop itself: fail what runs, keep serving
                log.exception("Scheduler turn failed")
                self._fail_all(RuntimeError("the scheduler failed"))
        self._fail_all(RuntimeError("the model replica was closed"))

    def _trim(self) -> None:
        self.gpt.trim()
        release_free_memory()

    def _turn(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self.gpt.prefill_pending:
            budget = self.prefill_tokens if self.gpt.decoding else self.gpt.prefill_pending
            joining = [slot for slot in self._active if slot not in self.gpt.decoding]
            started = time.perf_counter()
            try:
                self.gpt.prefill_some(budget)
            except Exception as exc:
                self._fail(joining, exc)
            if len(joining) < len(self._active):  # others were decoding: they waited for this
                stall = time.perf_counter() - started
                self.stall_seconds += stall
                self.stall_max = max(self.stall_max, stall)
        if self.gpt.decoding:
            rows = self.gpt.decoding
            started = time.perf_counter()
            try:
                emitted = self._step()
            except Exception as exc:
                self._fail(rows, exc)
                return
            stepped = time.perf_counter()
            self.step_seconds += stepped - started
            self.steps += 1
            self.rows += len(rows)
            self._deliver(emitted)
            self.vocoder_seconds += time.perf_counter() - stepped

    def _deliver(self, emitted) -> None:
        """Each latent to its sequence's decoder (HiFi-GAN runs here when a chunk is due)."""
        for slot, out in emitted.items():
            try:
                self._active[slot].take(out.latent)
                if out.finished:
                    self._active[slot].finish()
                    del self._active[slot]
            except Exception as exc:  # this sentence's decoding: it alone fails
                self._fail([slot], exc)

    def _step(self):
        """One batched decode step (a seam for fault-injection tests)."""
        return self.gpt.step()

    def _drop_cancelled(self) -> None:
        for slot, sequence in list(self._active.items()):
            if sequence.job.cancel.is_set():
                self.gpt.release(slot)
                del self._active[slot]
                sequence.job.deliver(DONE)
        with self._wake:
            waiting = list(self._queue)
            self._queue.clear()
            for job in waiting:
                if job.cancel.is_set():
                    job.deliver(DONE)
                else:
                    self._queue.append(job)

    def _admit(self) -> None:
        while self.gpt.free_slots:
            with self._wake:
                if not self._queue:
                    return
                job = self._queue.popleft()
            try:
                self._active[self._start(job)] = _Sequence(job, self._decoder(job))
            except Exception as exc:
                self._report(job, exc)

    def _start(self, job: SentenceJob) -> int:
        engine = self.engine
        prefix = engine.gpt_prefix(job.text, job.language, job.conditioning)
        generator = None
        if job.seed is not None:  # its own generator: reproducible whatever else is in the batch
            generator = torch.Generator(device=engine.device).manual_seed(job.seed)
        return self.gpt.admit(prefix, self.sampling, engine.token_cap(job.text), generator)

    def _decoder(self, job: SentenceJob) -> ChunkDecoder:
        to_grid, vocode, columns_per_frame, hop = self.engine.decoder(job.conditioning, job.speed)
        context = job.plan.context_tokens if job.plan else 0
        return ChunkDecoder(to_grid, vocode, columns_per_frame, hop, context_frames=context)

    def _fail(self, slots: list[int], exc: Exception) -> None:
        for slot in slots:
            sequence = self._active.pop(slot, None)
            if sequence is not None:
                self.gpt.release(slot)  # harmless when the step already freed it
                self._report(sequence.job, exc)

    def _fail_all(self, exc: Exception) -> None:
        self._fail(list(self._active), exc)
        with self._wake:
            waiting = list(self._queue)
            self._queue.clear()
        for job in waiting:
            self._report(job, exc)

    @staticmethod
    def _report(job: SentenceJob, exc: Exception) -> None:
        job.deliver(exc)

