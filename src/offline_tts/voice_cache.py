"""The voice cache: each voice's conditioning ("DNA") computed once, kept in memory and on disk.

Keys are the hash of the clips' bytes plus the model id, so a replaced file is never served stale
latents and a restart reuses what was computed. Decoded clips are kept too (per file content), so a
compressed clip is decoded once. Disk entries are written atomically; a corrupt one is discarded and
recomputed; a read-only or full cache directory only costs speed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from . import audio
from .engine.base import Conditioning, SpeechEngine
from .fileio import atomic_write
from .voices import Voice

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class VoiceCache:
    def __init__(self, cache_dir: Path, capacity: int, min_clip_seconds: float, max_clip_seconds: float = 60.0):
        self.dir = cache_dir
        self.capacity = capacity
        self.min_clip_seconds = min_clip_seconds
        self.max_clip_seconds = max_clip_seconds  # longer clips are cut to it: memory and cache stay bounded
        self._memory: OrderedDict[str, Conditioning] = OrderedDict()
        self._inflight: dict[str, asyncio.Lock] = {}
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self._model_ids: set[str] = set()

    # -- keys -------------------------------------------------------------------------------------
    @staticmethod
    def clip_digests(voice: Voice) -> list[str]:
        return [file_digest(p) for p in voice.files]

    @staticmethod
    def key(digests: list[str], model_id: str) -> str:
        return hashlib.sha256(("|".join(digests) + "|" + model_id).encode()).hexdigest()[:32]

    def _latents_path(self, key: str, model_id: str) -> Path:
        return self.dir / "latents" / model_id / f"{key}.pt"

    def is_cached(self, voice: Voice, model_id: str) -> bool:
        try:
            key = self.key(self.clip_digests(voice), model_id)
        except OSError:
            return False
        return key in self._memory or self._latents_path(key, model_id).is_file()

    # -- lookup -----------------------------------------------------------------------------------
    async def get(
        self,
        voice: Voice,
        engine: SpeechEngine,
        compute: Callable[[Callable[[SpeechEngine], Conditioning]], Awaitable[Conditioning]],
    ) -> Conditioning:
        """The voice's conditioning for `engine`'s model; `compute` runs a function on a free worker."""
        digests = await asyncio.to_thread(self.clip_digests, voice)
        key = self.key(digests, engine.model_id)
        self._model_ids.add(engine.model_id)
        if (hit := self._memory_get(key)) is not None:
            self.hits += 1
            return hit
        lock = self._inflight.setdefault(key, asyncio.Lock())
        async with lock:  # one computation per voice, however many requests ask at once
            try:
                if (hit := self._memory_get(key)) is not None:
                    self.hits += 1
                    return hit
                path = self._latents_path(key, engine.model_id)
                conditioning = await asyncio.to_thread(self._load, engine, path)
                if conditioning is not None:
                    self.hits += 1
                    self.disk_hits += 1
                else:
                    self.misses += 1
                    clips = await asyncio.to_thread(self._decoded_clips, voice, digests, engine.conditioning_sample_rate)
                    conditioning = await compute(lambda e: e.compute_conditioning(clips))
                    await asyncio.to_thread(self._store, engine, conditioning, path)
                    log.info("Voice %r conditioned and cached (%d clip(s))", voice.name, len(clips))
                self._memory_put(key, conditioning)
                return conditioning
            finally:
                self._inflight.pop(key, None)

    def forget(self, voice: Voice) -> None:
        """Drop a voice's cached conditioning (memory and disk), e.g. when it is deleted."""
        try:
            digests = self.clip_digests(voice)
        except OSError:
            return
        latents = self.dir / "latents"
        model_ids = set(self._model_ids)
        if latents.is_dir():
            model_ids.update(d.name for d in latents.iterdir())
        for model_id in model_ids:
            key = self.key(digests, model_id)
            self._memory.pop(key, None)
            try:
                self._latents_path(key, model_id).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("Could not remove cached conditioning %s (%s)", key, exc)

    # -- internals --------------------------------------------------------------------------------
    def _memory_get(self, key: str) -> Conditioning | None:
        value = self._memory.get(key)
        if value is not None:
            self._memory.move_to_end(key)
        return value

    def _memory_put(self, key: str, value: Conditioning) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def _load(self, engine: SpeechEngine, path: Path) -> Conditioning | None:
        if not path.is_file():
            return None
        try:
            return engine.load_conditioning(path)
        except Exception as exc:  # truncated, corrupt or foreign file: recompute
            log.warning("Discarding unreadable cache entry %s (%s)", path, exc)
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def _store(self, engine: SpeechEngine, conditioning: Conditioning, path: Path) -> None:
        try:
            with atomic_write(path) as f:
                engine.save_conditioning(conditioning, f)
        except OSError as exc:
            log.warning("Voice cache not written to %s (%s); the voice stays cached in memory", path, exc)

    def _decoded_clips(self, voice: Voice, digests: list[str], sample_rate: int) -> list[np.ndarray]:
        clips, new = [], []
        for path, digest in zip(voice.files, digests, strict=True):
            cached = self.dir / "clips" / f"{digest}-{sample_rate}.npy"
            clip = self._load_decoded(cached)
            if clip is None:
                audio.probe(path, self.max_clip_seconds)  # clear errors: not audio, no audio track, impossible format
                clip = self._decode_at_most_max(path, sample_rate)
                audio.check_clip(clip, sample_rate, path.name, self.min_clip_seconds)
                new.append((cached, clip))
            clips.append(clip)
        for cached, clip in new:  # only once every clip passed: a refused voice leaves nothing on disk
            self._save_decoded(cached, clip)
        return clips

    def _decode_at_most_max(self, path: Path, sample_rate: int) -> np.ndarray:
        """Uploads longer than the limit were refused; a longer clip dropped into the voices directory is
        used up to the limit (decoding stops there, whatever length the file declares)."""
        clip = audio.decode(path, sample_rate, self.max_clip_seconds)
        if audio.longer_than(clip, sample_rate, self.max_clip_seconds):
            log.warning("Clip %r is longer than TTS_MAX_CLIP_SECONDS=%g: only its first %g s are used",
                        path.name, self.max_clip_seconds, self.max_clip_seconds)
            clip = clip[: round(self.max_clip_seconds * sample_rate)]
        return clip

    @staticmethod
    def _load_decoded(path: Path) -> np.ndarray | None:
        try:
            return np.load(path, allow_pickle=False)
        except (FileNotFoundError, NotADirectoryError):  # not cached (or the cache path is unusable)
            return None
        except (OSError, ValueError) as exc:
            log.warning("Discarding unreadable decoded clip %s (%s)", path, exc)
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only cache: it stays unread, we decode again
                pass
            return None

    @staticmethod
    def _save_decoded(path: Path, clip: np.ndarray) -> None:
        try:
            with atomic_write(path) as f:
                np.save(f, clip, allow_pickle=False)
        except OSError as exc:
            log.warning("Decoded clip not cached at %s (%s)", path, exc)
