"""The synthesis service: turns a request (text, voice, language) into audio using the engine pool
(the replicas' schedulers, which batch the sentences of concurrent requests).

It owns the model's lifecycle state (loading, warm-up, ready or failed; the app supplies the download
step), validation of text/voice/language, the voice cache and the defaults. HTTP routers call it; it knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import audio
from . import language as languages
from . import telemetry
from . import text as text_utils
from .access import ownership_fix, service_user, write_problem
from .config import Settings
from .defaults import Defaults, DefaultsStore
from .engine.base import Conditioning, SpeechEngine, StreamPlan
from .engine.pool import EnginePool, Place
from .errors import (
    InvalidAudio,
    InvalidText,
    ModelNotReady,
    NoVoice,
    RequestCancelled,
    SynthesisFailed,
    TextTooLong,
    TTSError,
    UnsupportedLanguage,
    VoiceNotFound,
    without_paths,
)
from .speech_session import SpeechSession
from .stream_guard import REASONS, StreamGuard
from .telemetry import ServiceFigures, Stats
from .voice_cache import VoiceCache
from .voices import Voice, VoiceStore, naming_uploads

log = logging.getLogger(__name__)

OPENAI_VOICES = frozenset("alloy ash ballad cedar coral echo fable marin nova onyx sage shimmer verse".split())
PROBE_MEMO_SIZE = 2048
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
    stats: Stats = field(default_factory=Stats)  # its figures, for the caller, logs and metrics

    def release(self) -> None:
        """Give the request's place in the pool back (idempotent)."""
        self.cancel.set()
        callback, self.on_release = self.on_release, None
        if callback is not None:
            callback()


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
        if problem := write_problem(settings.cache_dir):
            log.warning(
                "The cache directory %s is not writable by the service, which runs as %s: %s. The service works, "
                "only slower: voices are conditioned again after each restart and the defaults set with "
                "POST /api/config last until then. %s", settings.cache_dir.absolute(), service_user(), problem,
                ownership_fix(settings.cache_dir.absolute(), write=True))
        self.defaults = DefaultsStore(settings.defaults_file, settings.language)
        self.pool: EnginePool[SpeechEngine] | None = None
        self.state = "starting"  # starting -> loading -> ready | failed
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.plan = StreamPlan(settings.stream_first_chunk_tokens, settings.stream_chunk_tokens,
                               settings.stream_max_chunk_tokens, settings.stream_context_tokens)
        self._probes: dict[tuple[str, int, int], audio.AudioInfo | str] = {}  # `describe_voice`'s ffprobe results
        self.streams_dropped: Counter[str] = Counter({reason: 0 for reason in REASONS})  # by reason, for /metrics

    # -- lifecycle --------------------------------------------------------------------------------
    async def load(self, prepare: Callable[[], Awaitable[None]] | None = None) -> None:
        """`prepare()` first (the app's: download the model files if missing), then load one replica per worker
        (in threads, off the event loop) and warm them up. A failure is kept in `state`/`error` (shown on /ready,
        without server paths) and raised."""
        self.state = "loading"
        started = time.perf_counter()
        if prepare is not None:
            try:
                await prepare()
            except Exception as exc:
                self.state, self.error = "failed", without_paths(str(exc))
                raise
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
                                   cuda_graphs=self.settings.cuda_graphs,
                                   vocoder_thread=self.settings.vocoder_thread)
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
                                "Wait until GET /ready answers 200, then retry; check the server log.")
        return self.pool

    @property
    def engine(self) -> SpeechEngine:
        return self.require_pool().engines[0]

    @property
    def languages(self) -> tuple[str, ...]:
        return self.engine.languages

    @property
    def sample_rate(self) -> int:
        """Of the audio the service produces."""
        return self.engine.sample_rate

    @property
    def model_id(self) -> str | None:
        """The loaded model's id (what the voice cache is keyed by); None until it is ready."""
        return self.pool.engines[0].model_id if self.ready and self.pool else None

    def audio_tokens(self, samples: int) -> int:
        """Audio tokens the model generated for `samples` of output (rounded up)."""
        return math.ceil(samples * self.engine.audio_tokens_per_second / self.sample_rate)

    @property
    def workers(self) -> int:
        return self.pool.size if self.pool else 0

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

    def language_rule(self, requested: str | None, voice: Voice) -> tuple[str, bool]:
        """(language, detect): the request's language, else the voice's, else the default; `detect` when an
        "auto" came first, and then `language` is the next one named after it (the voice's, the default,
        then TTS_LANGUAGE_FALLBACK): what text too short or ambiguous to tell is spoken in."""
        detect = False
        for choice in self._language_choices(requested, voice):
            if choice == languages.AUTO:
                detect = True
            elif choice:
                break
        return choice, detect

    async def resolve_language(self, text: str, requested: str | None, voice: Voice) -> str:
        """The language to speak `text` in (see `language_rule`; "auto" detects it from the text)."""
        choice, detect = self.language_rule(requested, voice)
        if not detect:
            return choice
        return await asyncio.to_thread(languages.detect, text, self.languages, choice)

    def resolve_voice(self, name: str | Voice | None) -> Voice:
        if isinstance(name, Voice):  # resolved already (e.g. by `voice_for_openai_name`)
            return name
        name = name or self.defaults.current.voice_sample
        if not name:
            available = ", ".join(self.voices.names()) or "none yet"
            raise NoVoice("No voice given and no default voice set.",
                          f"Pass 'voice_sample' (available: {available}) or set a default with POST /api/config.")
        return self.voices.resolve(name)

    def voice_for_openai_name(self, name: str) -> Voice | None:
        """The voice an OpenAI client's `voice` means (None: the default voice): a voice of this service wins;
        else TTS_OPENAI_VOICE_MAP's mapping; else an OpenAI voice name ("alloy") is the default voice or, with
        none set, the first voice by name (predictable), so clients whose default is `alloy` (Home Assistant's
        key check, SillyTavern, pipecat) hear a real voice."""
        try:
            return self.voices.resolve(name)
        except VoiceNotFound:
            key = name.lower()
            mapped = self.settings.openai_voice_map.get(key) or self.settings.openai_voice_map.get(name)
            if mapped:
                try:
                    return self.voices.resolve(mapped)
                except VoiceNotFound as exc:
                    exc.hint = f"TTS_OPENAI_VOICE_MAP maps {name!r} to {mapped!r}, which does not exist. " + exc.hint
                    raise
            if key not in OPENAI_VOICES:
                raise
            if self.defaults.current.voice_sample:
                return None
            if not (voices := self.voices.list()):
                raise NoVoice(f"{name!r} is an OpenAI voice name, and this server has no voice yet.",
                              "Add a voice (POST /api/voices, or a clip in the voices directory), then map OpenAI "
                              "names with TTS_OPENAI_VOICE_MAP or set a default voice (POST /api/config).") from None
            return min(voices, key=lambda v: v.name)

    async def conditioning(self, voice: Voice) -> Conditioning:
        pool = self.require_pool()
        return await self.cache.get(voice, pool.engines[0], pool.run)

    async def prepare(self, text: str | None, voice: str | Voice | None, language: str | None,
                      speed: float = 1.0) -> SynthesisJob:
        """Validate a request and get its voice conditioning: everything that can fail before audio starts."""
        pool = self.require_pool()
        text = self.check_text(text)
        requested = self.check_language(language) if language and language.strip() else None
        resolved = self.resolve_voice(voice)
        lang = await self.resolve_language(text, requested, resolved)
        sentences = await asyncio.to_thread(self.prepare_sentences, text, lang)  # fails here, before any 200
        telemetry.note(voice=resolved.name, language=lang, characters=len(text))  # for the access log and /metrics
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
        record = telemetry.current_record()
        telemetry.note(dropped=reason)  # in the request's access-log line
        why = {"buffer": f"more than {self.settings.stream_max_buffer_seconds:g} s of audio waited unread",
               "stall": f"the client took no data for {self.settings.stream_stall_seconds:g} s"}[reason]
        log.warning("Stream dropped (request %s): %s; its slot and place are free for others",
                    record.request_id if record else "-", why)

    # -- synthesis --------------------------------------------------------------------------------
    async def stream(self, job: SynthesisJob) -> AsyncIterator[np.ndarray]:
        """Audio chunks (float32, `sample_rate`) as they are generated, sentence after sentence; the figures
        go to `job.stats`."""
        stats = self._track(job)
        guard = job.guard
        made = guard.made if guard is not None else None  # too much waiting unread: the stream is dropped
        try:
            if not job.sentences:
                pause = self.pause()
                stats.first_audio_s, stats.audio_samples = time.perf_counter() - stats.started, len(pause)
                yield pause
            async for chunk in self.speak_pieces(job.sentences, job.language, job.conditioning, job.speed,
                                                 job.cancel, made):
                if stats.first_audio_s is None:
                    stats.first_audio_s = time.perf_counter() - stats.started
                stats.audio_samples += len(chunk)
                if guard is not None:
                    guard.took(len(chunk))
                yield chunk
        finally:
            stats.finished = time.perf_counter()
            job.release()  # also stops the worker thread at its next chunk if the client went away

    async def speak_pieces(self, pieces: list[str], language: str, conditioning: Conditioning, speed: float,
                           cancel: threading.Event, made: Callable[[int], None] | None = None,
                           ) -> AsyncIterator[np.ndarray]:
        """Prepared sentences (`prepare_sentences` / the engine's `prepare_text`) as streamed audio chunks, one
        sentence after the other; stops when `cancel` is set. A fault in the model is a SynthesisFailed."""
        pool = self.require_pool()
        with engine_faults():
            for piece in pieces:
                async for chunk in pool.stream(piece, language, conditioning, speed=speed, plan=self.plan,
                                               cancel=cancel, seed=self.settings.seed, made=made):
                    yield chunk
                if cancel.is_set():
                    return

    async def open_session(self, voice: str | Voice | None, language: str | None, speed: float = 1.0,
                           clause_chars: int = 0) -> SpeechSession:
        """A session for text that arrives in pieces (speech_session.py), its voice conditioned and its
        language settled ("auto": detected from its first sentence); raises what `prepare` raises."""
        self.require_pool()
        requested = self.check_language(language) if language and language.strip() else None
        resolved = self.resolve_voice(voice)
        lang, detect = self.language_rule(requested, resolved)
        async with self.admission():
            conditioning = await self.conditioning(resolved)
        return SpeechSession(self, resolved, conditioning, lang, detect, speed, clause_chars)

    async def synthesize(self, job: SynthesisJob) -> np.ndarray:
        """The whole audio (float32, `sample_rate`); the figures go to `job.stats`."""
        pool = self.require_pool()
        stats = self._track(job)
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

    def _track(self, job: SynthesisJob) -> Stats:
        """The job's figures, from now, attached to the request's record for logs and metrics."""
        stats = job.stats
        stats.started, stats.sample_rate = time.perf_counter(), self.sample_rate
        telemetry.note(stats=stats)
        return stats

    def figures(self) -> ServiceFigures:
        """What /metrics shows about the service, read at scrape time."""
        pool, cache = self.pool, self.cache
        steps, rows = pool.batch_steps if pool else (0, 0)
        return ServiceFigures(
            ready=self.ready, load_seconds=self.load_seconds, workers=self.workers,
            workers_busy=pool.busy if pool else 0, batch_slots=pool.capacity if pool else 0,
            batch_slots_busy=pool.busy_slots if pool else 0, batch_steps=steps, batch_rows=rows,
            thread_seconds=pool.thread_seconds if pool else dict.fromkeys(("step", "vocoder", "join_stall", "join_stall_max"), 0.0),
            queue_depth=pool.waiting if pool else 0, requests_in_progress=pool.admitted if pool else 0,
            queue_limit=self.settings.max_queue, streams_dropped=dict(self.streams_dropped),
            cache_hits=cache.hits, cache_disk_hits=cache.disk_hits, cache_misses=cache.misses)

    # -- voices -----------------------------------------------------------------------------------
    def describe_voice(self, voice: Voice) -> dict:
        """name, files, duration_s (all clips), sample_rate and channels (of the first clip), cached, language
        (its own; None: the default), and `error` when a clip or its settings cannot be read. Blocking (ffprobe)."""
        root = self.voices.real_root
        infos, errors = [], []
        for path in voice.files:
            info = self._probe(path)
            (errors if isinstance(info, str) else infos).append(info)
        first = infos[0] if infos else None
        model_id = self.model_id
        item = {
            "name": voice.name,
            "files": [p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name for p in voice.files],
            "duration_s": round(sum(i.duration_s for i in infos), 3) if infos else None,
            "sample_rate": first.sample_rate if first else None,
            "channels": first.channels if first else None,
            "cached": bool(model_id) and self.cache.is_cached(voice, model_id),
            "language": None,
        }
        try:
            item["language"] = self.voice_language(voice) if self.ready else self.voices.language(voice)
        except TTSError as exc:
            errors.append(exc.message)
        if errors:
            item["error"] = "; ".join(errors)
        return item

    def describe_voices(self) -> list[dict]:
        items = []
        for voice in self.voices.list():
            try:
                items.append(self.describe_voice(voice))
            except FileNotFoundError:  # deleted since the folder was listed: it is gone, not an error
                continue
        return items

    def _probe(self, path: Path) -> audio.AudioInfo | str:
        """ffprobe once per file version (path, size, mtime); an unreadable clip gives its error message."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._probes:
            if len(self._probes) >= PROBE_MEMO_SIZE:
                self._probes.clear()
            try:
                self._probes[key] = audio.probe(path)
            except TTSError as exc:
                self._probes[key] = exc.message
        return self._probes[key]

    async def add_voice(self, name: str, uploads: list[tuple[str, Path]], staging: Path, replace: bool,
                        language: str | None = None) -> Voice:
        """Store uploaded clips (`uploads`: (the client's file name, its staged path)) as voice `name`: checked
        (decodable, long enough, not too long), conditioned, then moved into place; `language` is its own.
        Any refusal on the way (a silent clip, the name taken meanwhile, a full disk...) leaves nothing, in
        the voices directory or the cache; a replaced voice's cache entries go too (unless another voice
        uses them). The caller holds a place in the line (conditioning uses the model)."""
        language = language.strip() if language else None
        if language:  # the voice's own language: requests without one speak it ("auto": detect)
            language = self.check_language(language)
        store, cache, settings = self.voices, self.cache, self.settings
        store.check_new(name, replace)
        self.require_pool()  # conditioning needs the model: refuse before the slow checks

        def check_all() -> list[Path]:
            return [store.check_clip_file(path, label, settings.min_clip_seconds, settings.max_clip_seconds)
                    for label, path in uploads]

        clips = await asyncio.to_thread(check_all)
        staged = Voice(name, tuple(clips), is_folder=len(clips) > 1)
        digests = await asyncio.to_thread(cache.clip_digests, staged)
        try:
            try:
                await self.conditioning(staged)
            except InvalidAudio as exc:
                raise naming_uploads(exc, [(label, clip) for (label, _), clip in zip(uploads, clips)]) from None
            old = await asyncio.to_thread(store.list, name) if replace else []
            old_digests = [await asyncio.to_thread(self._digests_if_present, v) for v in old if v.name == name]
            voice = await asyncio.to_thread(store.commit, name, clips, staging, replace)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(cache.release, digests))  # even when the client went away
            raise
        for previous in old_digests:
            if previous is not None:
                await asyncio.to_thread(cache.release, previous)
        if language:
            await asyncio.to_thread(store.save_language, name, language)
        log.info("Voice %r stored (%d clip(s))%s", name, len(clips), " replacing the old one" if old_digests else "")
        return voice

    def _digests_if_present(self, voice: Voice) -> list[str] | None:
        try:
            return self.cache.clip_digests(voice)
        except VoiceNotFound:  # deleted meanwhile: nothing of it to release later
            return None

    async def delete_voice(self, name: str) -> Voice:
        """Remove a voice: its clips, its settings, its cache entries; clears the default voice if it was it."""
        voice = self.voices.resolve(name)
        digests = await asyncio.to_thread(self.cache.clip_digests, voice)  # hashes the clips: before they are gone
        removed = await asyncio.to_thread(self.voices.delete, name)
        # After the clips are gone: a conditioning of this voice still running sees them gone and cleans up
        # itself, or wrote its entries before this releases them (latents and decoded clips).
        await asyncio.to_thread(self.cache.release, digests)
        self.clear_default_voice_if(removed)
        log.info("Voice %r deleted", removed.name)
        return removed

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
