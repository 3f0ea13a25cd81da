"""The synthesis service: turns a request (text, voice, language) into audio using the engine pool
(the replicas' schedulers, which batch the sentences of concurrent requests).

It owns the model lifecycle (download, load, warm-up), validation of text/voice/language, the voice
cache and the defaults. HTTP routers call it; it knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import language as languages
from . import metrics
from . import text as text_utils
from .config import Settings
from .defaults import Defaults, DefaultsStore
from .engine.base import Conditioning, SpeechEngine, StreamPlan
from .engine.pool import EnginePool, Place
from .errors import (
    InvalidText,
    ModelNotReady,
    NoVoice,
    RequestCancelled,
    SynthesisFailed,
    TextTooLong,
    TTSError,
    UnsupportedLanguage,
    without_paths,
)
from .stream_guard import REASONS, StreamGuard
from .voice_cache import VoiceCache
from .voices import Voice, VoiceStore

log = logging.getLogger(__name__)

PAUSE_SECONDS = 0.25  # the audio of a text with nothing to speak

EngineFactory = Callable[[], SpeechEngine]


@dataclass
class SynthesisJob:
    sentences: list[str]
    language: str
    voice: Voice
    conditioning: Conditioning
    speed: float = 1.0
    cancel: threading.Event = field(default_factory=threading.Event)
    on_release: Callable[[], None] | None = None
    guard: StreamGuard | None = None  # bounds a stream whose client stops reading

    def release(self) -> None:
        """Give the request's place in the pool back (idempotent)."""
        self.cancel.set()
        callback, self.on_release = self.on_release, None
        if callback is not None:
            callback()


@dataclass
class Stats:
    """Per-request figures for logs and metrics."""

    first_audio_s: float | None = None
    audio_samples: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    sample_rate: int = 24_000


@contextlib.contextmanager
def engine_faults() -> Iterator[None]:
    """A fault inside the model fails this request only, as a clear 500; our own errors pass through."""
    try:
        yield
    except TTSError:
        raise
    except Exception as exc:
        log.exception("Synthesis failed")
        raise SynthesisFailed(without_paths(f"Synthesis failed: {type(exc).__name__}: {exc}"),
                              "Retry; if it keeps failing, check the server log.") from exc


class TTSService:
    def __init__(self, settings: Settings, engine_factory: EngineFactory):
        self.settings = settings
        self.engine_factory = engine_factory
        self.voices = VoiceStore(settings.voices_dir)
        self.cache = VoiceCache(settings.cache_dir, settings.voice_cache_size, settings.min_clip_seconds,
                                settings.max_clip_seconds, live_voices=self.voices.list)
        self.defaults = DefaultsStore(settings.defaults_file, settings.language)
        self.pool: EnginePool[SpeechEngine] | None = None
        self.state = "starting"  # starting -> loading -> ready | failed
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.plan = StreamPlan(settings.stream_first_chunk_tokens, settings.stream_chunk_tokens,
                               settings.stream_max_chunk_tokens, settings.stream_context_tokens)
        self.streams_dropped: Counter[str] = Counter({reason: 0 for reason in REASONS})  # by reason, for /metrics

    # -- lifecycle --------------------------------------------------------------------------------
    async def load(self) -> None:
        """Load one replica per worker (in threads, off the event loop) and warm them up."""
        self.state = "loading"
        started = time.perf_counter()
        # Nothing uses the cache before the model is ready: drop what no voice needs any more.
        try:
            if pruned := await asyncio.to_thread(self.cache.prune):
                log.info("Voice cache: removed %d entries of clips that no longer exist", pruned)
        except OSError as exc:  # an unusable cache directory only costs speed
            log.warning("Voice cache not pruned (%s)", exc)
        try:
            engines = []
            for i in range(self.settings.workers):
                log.info("Loading model replica %d/%d from %s", i + 1, self.settings.workers, self.settings.model_dir)
                engines.append(await asyncio.to_thread(self.engine_factory))
            self.pool = EnginePool(engines, self.settings.max_queue, self.max_batch(engines[0].device),
                                   cuda_graphs=self.settings.cuda_graphs)
            await self._warm_up()
        except Exception as exc:
            self.state, self.error = "failed", without_paths(f"{type(exc).__name__}: {exc}")
            raise
        self.load_seconds = time.perf_counter() - started
        self.state = "ready"
        log.info("Model ready: %d worker(s) of %d slots on %s, languages %s (%.1f s)", len(engines),
                 self.pool.max_batch, engines[0].device, ",".join(engines[0].languages), self.load_seconds)
        if self.defaults.current.voice_sample:
            try:  # so the first request after a restart does not pay for conditioning
                await self.conditioning(self.voices.resolve(self.defaults.current.voice_sample))
            except TTSError as exc:
                log.warning("Default voice %r is not usable: %s", self.defaults.current.voice_sample, exc.message)
        try:
            if self.default_language() == languages.AUTO:  # load the detector now, not in the first request
                await asyncio.to_thread(languages.detect, "warm up", self.languages, self.languages[0])
        except TTSError as exc:
            log.warning("Default language: %s %s", exc.message, exc.hint)

    def max_batch(self, device: str) -> int:
        """Sentences decoded together per replica: TTS_MAX_BATCH, else sized for the device."""
        return self.settings.max_batch or (32 if device == "cuda" else 8)

    async def _warm_up(self) -> None:
        """One tiny generation per replica so the first real request does not pay for lazy init."""
        noise = (np.random.default_rng(0).standard_normal(22_050 * 3) * 0.1).astype(np.float32)
        await self.pool.warm_up(noise, "ok.", StreamPlan(2, 2, 2, 2))

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def require_pool(self) -> EnginePool[SpeechEngine]:
        if self.pool is None or not self.ready:
            detail = f" ({self.error})" if self.error else ""
            raise ModelNotReady(f"The model is not loaded yet: {self.state}{detail}.",
                                "Wait until GET /ready answers 200, then retry; check the server log.",
                                headers={"Retry-After": "5"})
        return self.pool

    @property
    def engine(self) -> SpeechEngine:
        return self.require_pool().engines[0]

    @property
    def languages(self) -> tuple[str, ...]:
        return self.engine.languages

    # -- validation -------------------------------------------------------------------------------
    def check_text(self, text: str | None) -> str:
        text = text_utils.normalize(text or "")
        if not text:
            raise InvalidText("The text is empty.", "Send some text to speak in the 'text' field.")
        if len(text) > self.settings.max_text_chars:
            raise TextTooLong(f"The text has {len(text)} characters; the limit is {self.settings.max_text_chars}.",
                              "Split it into several requests, or raise TTS_MAX_TEXT_CHARS.")
        return text

    def prepare_sentences(self, text: str, language: str) -> list[str]:
        """The checked text as the sentences the engine will speak, each one it can read (or InvalidText).
        None for text with nothing to speak ("...", "?!"): it sounds as a short pause (clients such as
        Home Assistant check a server with "." and must get audio back).

        CPU work (splitting, number expansion, tokenizing): call it in a thread, never on the event loop."""
        engine = self.engine
        return [piece for sentence in text_utils.split_sentences(text, language, engine.char_limit(language))
                for piece in engine.prepare_text(sentence, language)]

    def pause(self) -> np.ndarray:
        """What a text with nothing to speak sounds like."""
        return np.zeros(int(PAUSE_SECONDS * self.engine.sample_rate), dtype=np.float32)

    def check_language(self, language: str | None) -> str:
        """A language code from a client or a setting as the model's code ("zh" -> "zh-cn"), or "auto"."""
        return languages.normalize(language, self.languages)

    def default_language(self) -> str:
        """The language for requests and voices that name none: /api/config's, else TTS_LANGUAGE."""
        return self.check_language(self.defaults.current.language or self.settings.language)

    def voice_language(self, voice: Voice) -> str | None:
        """The voice's own language (its settings file), None when it has none."""
        code = self.voices.language(voice)
        if code is None:
            return None
        try:
            return self.check_language(code)
        except UnsupportedLanguage as exc:
            exc.message = f"Voice {voice.name!r} is set to an unsupported language {code[:20]!r}."
            exc.hint = f"Fix or delete {voice.name}.json in the voices directory. " + exc.hint
            raise

    def _language_choices(self, requested: str | None, voice: Voice) -> Iterator[str | None]:
        """Where a request's language comes from, in order of precedence; read lazily, so a broken
        setting further down does not matter when an earlier one decides."""
        yield requested
        yield self.voice_language(voice)
        yield self.default_language()
        yield languages.normalize(self.settings.language_fallback, self.languages, allow_auto=False)

    async def resolve_language(self, text: str, requested: str | None, voice: Voice) -> str:
        """The language to speak `text` in: the request's, else the voice's, else the default. "auto"
        (wherever it comes from) detects it from the text; text too short or ambiguous to tell is spoken in
        the next language named after the "auto" (the voice's, the default, then TTS_LANGUAGE_FALLBACK)."""
        detect = False
        for choice in self._language_choices(requested, voice):
            if choice == languages.AUTO:
                detect = True
            elif choice:
                break
        if not detect:
            return choice
        return await asyncio.to_thread(languages.detect, text, self.languages, choice)

    def resolve_voice(self, name: str | None) -> Voice:
        name = name or self.defaults.current.voice_sample
        if not name:
            available = ", ".join(self.voices.names()) or "none yet"
            raise NoVoice("No voice given and no default voice set.",
                          f"Pass 'voice_sample' (available: {available}) or set a default with POST /api/config.")
        return self.voices.resolve(name)

    async def conditioning(self, voice: Voice) -> Conditioning:
        pool = self.require_pool()
        return await self.cache.get(voice, pool.engines[0], pool.run)

    async def prepare(self, text: str | None, voice: str | None, language: str | None, speed: float = 1.0) -> SynthesisJob:
        """Validate a request and get its voice conditioning: everything that can fail before audio starts."""
        pool = self.require_pool()
        text = self.check_text(text)
        requested = self.check_language(language) if language and language.strip() else None
        resolved = self.resolve_voice(voice)
        lang = await self.resolve_language(text, requested, resolved)
        sentences = await asyncio.to_thread(self.prepare_sentences, text, lang)  # fails here, before any 200
        metrics.note(voice=resolved.name, language=lang, characters=len(text))  # for the access log and /metrics
        async with self.admission() as place:
            conditioning = await self.conditioning(resolved)
            job = SynthesisJob(sentences, lang, resolved, conditioning, speed, on_release=place.hand_over())
        job.guard = StreamGuard(job.cancel, pool.engines[0].sample_rate, self.settings.stream_max_buffer_seconds,
                                self.settings.stream_stall_seconds, on_drop=self._stream_dropped)
        return job

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[Place]:
        """A place in the line for one use of the model (a synthesis, a voice to condition), held for the
        block unless handed over (`place.hand_over()`: a job that streams after the block); raises Busy
        (503 + Retry-After) at once when the line is full. Every use counts, so the line bounds all the
        work waiting for a worker, and /metrics shows it."""
        place = self.require_pool().admit()
        try:
            yield place
        finally:
            if not place.handed_over:
                place.release()

    def _stream_dropped(self, reason: str) -> None:
        self.streams_dropped[reason] += 1
        record = metrics.current_record()
        metrics.note(dropped=reason)  # in the request's access-log line
        why = {"buffer": f"more than {self.settings.stream_max_buffer_seconds:g} s of audio waited unread",
               "stall": f"the client took no data for {self.settings.stream_stall_seconds:g} s"}[reason]
        log.warning("Stream dropped (request %s): %s; its slot and place are free for others",
                    record.request_id if record else "-", why)

    # -- synthesis --------------------------------------------------------------------------------
    async def stream(self, job: SynthesisJob, stats: Stats | None = None) -> AsyncIterator[np.ndarray]:
        """Audio chunks (float32, engine sample rate) as they are generated, sentence after sentence."""
        pool = self.require_pool()
        stats = self._track(stats, pool)
        guard = job.guard
        made = guard.made if guard is not None else None  # too much waiting unread: the stream is dropped
        try:
            if not job.sentences:
                pause = self.pause()
                stats.first_audio_s, stats.audio_samples = time.perf_counter() - stats.started, len(pause)
                yield pause
            with engine_faults():
                for sentence in job.sentences:
                    async for chunk in pool.stream(sentence, job.language, job.conditioning, speed=job.speed,
                                                   plan=self.plan, cancel=job.cancel, seed=self.settings.seed,
                                                   made=made):
                        if stats.first_audio_s is None:
                            stats.first_audio_s = time.perf_counter() - stats.started
                        stats.audio_samples += len(chunk)
                        if guard is not None:
                            guard.took(len(chunk))
                        yield chunk
                    if job.cancel.is_set():
                        return
        finally:
            stats.finished = time.perf_counter()
            job.release()  # also stops the worker thread at its next chunk if the client went away

    async def synthesize(self, job: SynthesisJob, stats: Stats | None = None) -> np.ndarray:
        pool = self.require_pool()
        stats = self._track(stats, pool)
        parts = []
        try:
            with engine_faults():
                for sentence in job.sentences:
                    async for audio in pool.stream(sentence, job.language, job.conditioning, speed=job.speed,
                                                   plan=None, cancel=job.cancel, seed=self.settings.seed):
                        parts.append(audio)  # plan None: the sentence in one piece, decoded whole
                    if job.cancel.is_set():  # the client left (the router watches): stop, speak no more
                        raise RequestCancelled("The client closed the connection before the audio was ready.",
                                               "Nothing to do: the synthesis was stopped.")
        finally:
            job.release()
        result = np.concatenate(parts) if parts else self.pause()
        stats.finished = stats.finished or time.perf_counter()
        stats.first_audio_s = stats.finished - stats.started
        stats.audio_samples = len(result)
        return result

    @staticmethod
    def _track(stats: Stats | None, pool: EnginePool[SpeechEngine]) -> Stats:
        """The request's stats (new if the caller passed none), attached to its record for logs and metrics."""
        stats = stats if stats is not None else Stats()
        stats.sample_rate = pool.engines[0].sample_rate
        metrics.note(stats=stats)
        return stats

    # -- defaults ---------------------------------------------------------------------------------
    async def set_defaults(self, voice: str | None = None, language: str | None = None,
                           clear_voice: bool = False) -> Defaults:
        """Validate and store new defaults; a voice is conditioned right away (and refused if broken).
        Only the fields given change, applied to the defaults as they are when saved: a concurrent
        change of the other field is kept."""
        changes: dict[str, str | None] = {}
        if language is not None:
            changes["language"] = self.check_language(language)
        if voice is not None:
            resolved = self.voices.resolve(voice)
            async with self.admission():  # conditioning may need a worker: it counts like a synthesis
                await self.conditioning(resolved)  # slow: other changes may land meanwhile
            changes["voice_sample"] = voice.strip()
        elif clear_voice:
            changes["voice_sample"] = None

        def apply(current: Defaults) -> Defaults:
            if voice is not None:
                self.voices.resolve(voice)  # deleted while it was conditioned: 404, not a default that is gone
            return dataclasses.replace(current, **changes)

        return self.defaults.update(apply)

    def clear_default_voice_if(self, voice: Voice) -> None:
        """Called after `voice` was deleted; under the defaults' lock, so a concurrent POST /api/config
        either saw the voice gone or saved it before this clears it."""
        def apply(current: Defaults) -> Defaults:
            name = current.voice_sample
            if name and (Path(name).stem == voice.name or name == voice.name):
                return dataclasses.replace(current, voice_sample=None)
            return current

        self.defaults.update(apply)
