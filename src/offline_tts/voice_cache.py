"""The voice cache: each voice's conditioning ("DNA") computed once, kept in memory and on disk.

Keys are the hash of the clips' bytes plus the model id, so a replaced file is never served stale
latents and a restart reuses what was computed. Decoded clips are kept too (per file content), so a
compressed clip is decoded once. Disk entries are written atomically; a corrupt one is discarded and
recomputed; a read-only or full cache directory only costs speed.

The cache holds entries of existing voices only: a deleted voice's entries are released (unless another
voice holds the same bytes), a voice deleted while it was being conditioned leaves nothing behind, and
at startup entries of clips that are gone (removed or replaced by hand) are pruned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import numpy as np

from . import audio
from .engine.base import Conditioning, SpeechEngine
from .errors import InvalidAudio, VoiceNotFound
from .fileio import atomic_write
from .voices import Voice

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_DIGEST_MEMO_SIZE = 4096


def vanished(voice: Voice) -> VoiceNotFound:
    return VoiceNotFound(f"Voice {voice.name!r} was deleted.", "Choose a voice listed by GET /api/voices.")


def still_there(voice: Voice) -> bool:
    return all(p.is_file() for p in voice.files)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:  # a read-only cache: the entry stays, it costs only disk
        log.warning("Could not remove cache entry %s (%s)", path.name, exc)
        return False


class VoiceCache:
    def __init__(self, cache_dir: Path, capacity: int, min_clip_seconds: float, max_clip_seconds: float = 60.0, *,
                 live_voices: Callable[[], Iterable[Voice]]):
        """`live_voices` lists the voices that exist: their entries are never released."""
        self.dir = cache_dir
        self.live_voices = live_voices
        self._digest_memo: dict[tuple, str] = {}
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
    def clip_digests(self, voice: Voice) -> list[str]:
        """The hashes of the voice's clips (read again only when a file changed: see `_memo_digest`);
        VoiceNotFound when one was deleted since the voice was resolved."""
        try:
            return [self._memo_digest(p) for p in voice.files]
        except (FileNotFoundError, NotADirectoryError):
            raise vanished(voice) from None

    @staticmethod
    def key(digests: list[str], model_id: str) -> str:
        return hashlib.sha256(("|".join(digests) + "|" + model_id).encode()).hexdigest()[:32]

    def _latents_path(self, key: str, model_id: str) -> Path:
        return self.dir / "latents" / model_id / f"{key}.pt"

    def is_cached(self, voice: Voice, model_id: str) -> bool:
        try:
            key = self.key(self.clip_digests(voice), model_id)
        except (OSError, VoiceNotFound):
            return False
        return key in self._memory or self._latents_path(key, model_id).is_file()

    # -- lookup -----------------------------------------------------------------------------------
    async def get(
        self,
        voice: Voice,
        engine: SpeechEngine,
        compute: Callable[[Callable[[SpeechEngine], Conditioning]], Awaitable[Conditioning]],
    ) -> Conditioning:
        """The voice's conditioning for `engine`'s model; `compute` runs a function on a model replica."""
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
                    clips = await self._decode_unless_vanished(voice, digests, engine.conditioning_sample_rate)
                    conditioning = await compute(lambda e: e.compute_conditioning(clips))
                    await asyncio.to_thread(self._store, engine, conditioning, path)
                    log.info("Voice %r conditioned and cached (%d clip(s))", voice.name, len(clips))
                self._memory_put(key, conditioning)
            finally:
                self._inflight.pop(key, None)
        # Deleted while we worked: its DELETE released the entries before we wrote them, so do it here.
        if not await asyncio.to_thread(still_there, voice):
            await asyncio.to_thread(self.release, digests)
            raise vanished(voice)
        return conditioning

    async def _decode_unless_vanished(self, voice: Voice, digests: list[str], sample_rate: int) -> list[np.ndarray]:
        try:
            return await asyncio.to_thread(self._decoded_clips, voice, digests, sample_rate)
        except (OSError, InvalidAudio):  # a clip that vanished is a deleted voice, not a broken clip
            if not await asyncio.to_thread(still_there, voice):
                raise vanished(voice) from None
            raise

    # -- releasing entries ------------------------------------------------------------------------
    def release(self, digests: list[str]) -> None:
        """Drop the entries (latents in memory and on disk, decoded clips) of the clips with these hashes,
        e.g. of a deleted voice or a refused upload, except what an existing voice still uses (two voices
        may hold the same bytes)."""
        live = self._live_digests()
        if tuple(digests) not in live:
            for model_id in self._known_model_ids():
                key = self.key(digests, model_id)
                self._memory.pop(key, None)
                _unlink(self._latents_path(key, model_id))
        live_clips = {d for clip_digests in live for d in clip_digests}
        for digest in set(digests) - live_clips:
            for path in self._decoded_paths(digest):
                _unlink(path)

    def prune(self) -> int:
        """Remove every disk entry no existing voice uses (clips removed or replaced by hand while the
        server was down, entries of another voices directory); returns how many. Run before serving."""
        live = self._live_digests()
        live_clips = {d for clip_digests in live for d in clip_digests}
        removed = 0
        clips_dir = self.dir / "clips"
        for path in sorted(clips_dir.glob("*.npy")) if clips_dir.is_dir() else []:
            if path.name.split("-", 1)[0] not in live_clips:
                removed += _unlink(path)
        for model_id in self._known_model_ids():
            keep = {self.key(list(clip_digests), model_id) for clip_digests in live}
            for path in sorted((self.dir / "latents" / model_id).glob("*.pt")):
                if path.stem not in keep:
                    removed += _unlink(path)
        return removed

    def _live_digests(self) -> set[tuple[str, ...]]:
        """The clip hashes of every existing voice (a voice vanishing meanwhile is simply not live)."""
        live = set()
        for voice in self.live_voices():
            try:
                live.add(tuple(self._memo_digest(p) for p in voice.files))
            except OSError:
                continue
        return live

    def _memo_digest(self, path: Path) -> str:
        """file_digest, remembered per file version (path, inode, size, mtime, ctime): a request does not read
        the clips again to find its cache key, nor does releasing an entry re-read every voice. A replaced or
        rewritten clip is a new version (uploads replace by rename: a new inode; an edit changes mtime)."""
        st = path.stat()
        version = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if version not in self._digest_memo:
            if len(self._digest_memo) >= _DIGEST_MEMO_SIZE:
                self._digest_memo.clear()
            self._digest_memo[version] = file_digest(path)
        return self._digest_memo[version]

    def _known_model_ids(self) -> set[str]:
        model_ids = set(self._model_ids)
        latents = self.dir / "latents"
        try:
            model_ids.update(d.name for d in latents.iterdir() if d.is_dir() and not d.name.startswith("."))
        except OSError:  # no latents yet, or an unusable cache directory
            pass
        return model_ids

    def _decoded_paths(self, digest: str) -> list[Path]:
        clips_dir = self.dir / "clips"
        return sorted(clips_dir.glob(f"{digest}-*.npy")) if clips_dir.is_dir() else []

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
