"""Continuous batching of sentences on one model replica: the thread that owns the replica.

Requests submit sentences (`SentenceJob`) and get their audio chunks back, in order, through a callback;
nothing else runs this replica's model meanwhile. Each turn of the loop:

1. runs queued replica work (`call`: e.g. a voice's conditioning) between two decode steps;
2. drops cancelled sequences (slot freed at once; a queued one never starts);
3. admits queued sentences into free slots (tokenize + prefix; a failure fails that sentence only);
4. prefills joining sentences in pieces: everything at once when no stream is playing (nothing decodes,
   or nothing decoding has sent audio yet), otherwise at most `prefill_tokens` per turn, so the playing
   streams keep getting a step every turn (bounded join stall);
5. runs one batched `BatchedGpt.step` and hands each latent to its sentence's `ChunkDecoder` (same flush
   plan as `XttsEngine.stream`: a small first chunk, doubling chunks, a final flush; no plan: one final
   decode, as `XttsEngine.synthesize`). A finished sentence leaves its slot in that same step.

Faults: an exception while admitting or decoding one sentence fails that sentence only; an exception in
the batched prefill or step fails the sentences in it (their slots are freed) and the loop goes on.

HiFi-GAN runs on a vocoder thread of the replica (`Vocoder`, TTS_VOCODER_THREAD, on by default): the
scheduler hands it each due chunk's latents and goes on stepping, so one stream's vocoding no longer delays
every stream's next step; first chunks of streams go before later chunks. `make bench` (full-size model,
2 CPU cores, 1 torch thread: the GPT on one core, HiFi-GAN on the other) against HiFi-GAN inline between
steps: +15% throughput at 1 stream, +17% at 2, +26% at 4, +21% at 8. With `vocoder_thread=False` it runs
inline as before. The time is counted (`step_seconds`, `vocoder_seconds`,
`stall_seconds`; /metrics and the bench's concurrency rows). On a GPU the vocoder's kernels queue on the
same CUDA stream as the steps (another stream is not tried yet).

Memory: when the replica has been idle for IDLE_TRIM_SECONDS the KV cache is freed and glibc hands its
free heap pages back (`release_free_memory`), so RSS returns to its after-load level between bursts.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

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
    """A sentence in a slot. The scheduler's thread collects its latents and says when a chunk is due;
    the vocoder (`Vocoder`: this thread or its own) turns them into audio with the sentence's own decoder,
    in order, and delivers it."""

    def __init__(self, job: SentenceJob, decoder: ChunkDecoder, vocoder: Vocoder):
        self.job = job
        self.decoder = decoder  # touched by the vocoder only
        self.vocoder = vocoder
        self.frames = 0  # latents taken so far
        self.ended = False  # failed or cancelled on the vocoder thread: its remaining chunks are skipped
        self._pending: list[torch.Tensor] = []
        self._first = True
        self._boundaries = job.plan.boundaries() if job.plan else None
        self._next_flush = next(self._boundaries) if self._boundaries else None

    def take(self, latent: torch.Tensor) -> None:
        """One latent frame: a chunk is due when the plan says so."""
        self._pending.append(latent)
        self.frames += 1
        if self._next_flush is not None and self.frames >= self._next_flush:
            self._next_flush = next(self._boundaries)
            self._chunk(final=False)

    def finish(self) -> None:
        self._chunk(final=True)

    @property
    def waiting_for_audio(self) -> bool:
        """No chunk made yet (a whole-sentence request is waiting until its end: it has no gap to hear)."""
        return self._first or self.job.plan is None

    def _chunk(self, final: bool) -> None:
        latents, self._pending = self._pending, []
        # A stream's first chunk goes first: it is what its listener is waiting for.
        self.vocoder.submit(self, latents, final, urgent=self._first and self.job.plan is not None)
        self._first = False

    def vocode(self, latents: list[torch.Tensor], final: bool) -> None:
        """On the vocoder: the new latents into the decoder, the audio now due out (then DONE when final)."""
        for latent in latents:
            self.decoder.add(latent)
        chunk = self.decoder.flush(final=final)
        if len(chunk):
            self.job.deliver(chunk)
        if final:
            self.job.deliver(DONE)


class Vocoder:
    """Where a replica's HiFi-GAN work runs: inline on the scheduler's thread (`threaded=False`: an error
    propagates to the scheduler, which fails that sentence), or on a thread of its own, so a chunk's
    vocoding overlaps the next GPT steps instead of delaying every stream's step (an error then fails that
    sentence here and cancels it, so the scheduler frees its slot at the next turn). Per sentence, chunks
    run in order; first chunks of streams run before later chunks of others. (Making the scheduler wait
    for first chunks before its next step changed nothing measurable on 2 CPU cores: not done.)"""

    def __init__(self, threaded: bool, name: str, on_failure: Callable[[], None]):
        self.threaded = threaded
        self.seconds = 0.0
        self._on_failure = on_failure
        self._work: list[tuple[int, int, _Sequence | None, list[torch.Tensor], bool]] = []  # a heap
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"tts-{name}-vocoder", daemon=True) if threaded else None
        if self._thread:
            self._thread.start()

    def submit(self, sequence: _Sequence, latents: list[torch.Tensor], final: bool, urgent: bool = False) -> None:
        if not self.threaded:
            self._vocode(sequence, latents, final)
            return
        with self._ready:
            heapq.heappush(self._work, (0 if urgent else 1, next(self._order), sequence, latents, final))
            self._ready.notify()

    def _vocode(self, sequence: _Sequence, latents: list[torch.Tensor], final: bool) -> None:
        started = time.perf_counter()
        try:
            sequence.vocode(latents, final)
        finally:
            self.seconds += time.perf_counter() - started

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._ready:
                while not self._work:
                    self._ready.wait()
                _, _, sequence, latents, final = heapq.heappop(self._work)
            if sequence is None:  # closed: everything submitted before has been done
                return
            if sequence.job.cancel.is_set() and not sequence.ended:  # its listener left: no more work for it
                sequence.ended = True
                sequence.job.deliver(DONE)
            try:
                if not sequence.ended:
                    with torch.inference_mode():
                        self._vocode(sequence, latents, final)
            except Exception as exc:  # this sentence's decoding: it alone fails
                sequence.ended = True
                sequence.job.deliver(exc)
                sequence.job.cancel.set()
                self._on_failure()

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        if self._thread:
            with self._ready:
                heapq.heappush(self._work, (2, next(self._order), None, [], False))
                self._ready.notify()
            self._thread.join(timeout=30)


class Scheduler(ReplicaThread):
    """Owns one engine replica and runs all its sentences, batched, in one thread."""

    def __init__(self, engine, max_batch: int, *, prefill_tokens: int = PREFILL_TOKENS, name: str = "replica",
                 cuda_graphs: bool = False, vocoder_thread: bool = False):
        super().__init__(engine, name)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.vocoder = Vocoder(vocoder_thread, name, on_failure=self.wake)
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
    @property
    def vocoder_seconds(self) -> float:  # HiFi-GAN time, on whichever thread it runs
        return self.vocoder.seconds

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
        self.vocoder.close()

    def _trim(self) -> None:
        self.gpt.trim()
        release_free_memory()

    def _turn(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self.gpt.prefill_pending:
            budget = self.prefill_tokens if self._playing() else self.gpt.prefill_pending
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
            self.step_seconds += time.perf_counter() - started
            self.steps += 1
            self.rows += len(rows)
            self._deliver(emitted)

    def _playing(self) -> bool:
        """Whether a decoding stream has audio out (a listener who would hear a long stall as a gap). Before
        their first chunk, streams only wait: joiners are then prefilled whole and decode with them at once,
        which gets every one of them its first audio sooner than joining piece by piece."""
        return any(not self._active[slot].waiting_for_audio for slot in self.gpt.decoding if slot in self._active)

    def _deliver(self, emitted) -> None:
        """Each latent to its sequence (HiFi-GAN runs when a chunk is due: here, or on the vocoder thread)."""
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
                self._active[self._start(job)] = _Sequence(job, self._decoder(job), self.vocoder)
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

