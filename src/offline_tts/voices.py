"""The voice store: reference clips in the voices directory, found by safe name resolution.

A voice is either one clip (`voices/ana.mp3`, voice name `ana`) or a folder of clips of one speaker
(`voices/ana/*.wav`). Names come from users, so nothing reaches the filesystem before it has been
checked: no separators, no `..`, no hidden files, and the resolved path must stay inside the directory
(a symlink pointing out is refused).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import audio
from .access import is_access_error, ownership_fix, service_user, write_problem
from .errors import (
    InsufficientStorage,
    InvalidAudio,
    InvalidVoiceName,
    UnsupportedLanguage,
    VoiceExists,
    VoiceNotFound,
    VoicesNotWritable,
)
from .fileio import atomic_write, file_lock

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .mp3 .ogg .oga .opus .flac .m4a .mp4 .aac .webm .wma .aiff .aif .mka .mkv .mov .3gp .amr .wv .caf .ac3 .mpga".split()
)
UPLOAD_NAME_RULE = "1-64 characters: letters, digits, '_' and '-', starting with a letter or digit"
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SETTINGS_SUFFIX = ".json"  # `voices/<name>.json` beside a voice's clip or folder: {"language": "en"}
_MAX_SETTINGS_BYTES = 4096
LOCK_FILE = ".voices.lock"  # hidden: never listed as a voice
LEFTOVER_SECONDS = 3600  # a staging folder untouched this long belongs to no running upload


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def disk_full_refused(what: str = "the upload") -> Iterator[None]:
    """A full disk (or quota) while writing is the server's condition, not a bug: a clear 507 for the
    client and one warning line in the log, no traceback. Callers remove what was half-written."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        log.warning("Refused %s: the disk holding the voices directory is full (%s)", what, exc.strerror)
        raise InsufficientStorage(
            "The server's disk is full: the voice could not be stored.",
            "Nothing was kept. Ask the operator to free space on the server (or raise its quota), then retry.",
            param="files") from None


@contextlib.contextmanager
def not_writable_refused() -> Iterator[None]:
    """A voices directory the service's user cannot write (a root-owned bind mount, a read-only volume):
    a clear 503 saying so, instead of a PermissionError's 500. Checked on every write, so fixing the
    folder's owner takes effect without a restart."""
    try:
        yield
    except OSError as exc:
        if not is_access_error(exc):
            raise
        log.warning("Refused a change to the voices: the voices directory is not writable (%s)", exc.strerror)
        raise VoicesNotWritable(
            "The server cannot write to its voices directory, so voices cannot be uploaded or deleted; "
            "the voices already there can be used.",
            f"The operator must make the voices folder writable by the service's user ({service_user()}): "
            "with Docker, `mkdir voices` before the first start (a missing one is created as root), or set "
            "APP_UID to the folder owner's uid and rebuild. The server log says more.") from None


@dataclass(frozen=True)
class Voice:
    name: str
    files: tuple[Path, ...]  # absolute, inside the voices directory
    is_folder: bool = False


def naming_uploads(exc: InvalidAudio, uploads: list[tuple[str, Path]]) -> InvalidAudio:
    """The error names the uploaded files (their names as the client sent them), not their staged copies."""
    for label, path in uploads:
        exc.message = exc.message.replace(f"'{path.name}'", f"'{label}'")
    exc.param = "files"
    return exc


class VoiceStore:
    def __init__(self, root: Path):
        self.root = root
        self._thread_lock = threading.Lock()
        if problem := write_problem(root):  # creates it when missing
            log.warning(
                "The voices directory %s is not writable by the service, which runs as %s: %s. Uploads and "
                "deletes through the API are disabled (503 voices_not_writable) until it is; the clips in it "
                "can still be used. %s", root.absolute(), service_user(), problem, ownership_fix(root.absolute(), write=True))
        with contextlib.suppress(OSError):  # made now, so it is part of the folder before any upload
            (root / LOCK_FILE).touch(exist_ok=True)
        self._remove_leftovers()

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """One commit or delete at a time, in this process and in every replica sharing the directory."""
        with self._thread_lock, file_lock(self.root / LOCK_FILE):
            yield

    def _remove_leftovers(self) -> None:
        """Staging folders of uploads/deletes cut short by a crash (hidden, never read). Only old ones:
        a young one may be another replica's upload in progress (replicas share the directory)."""
        too_old = time.time() - LEFTOVER_SECONDS
        for leftover in [*self.root.glob(".upload-*"), *self.root.glob(".delete-*")]:
            with contextlib.suppress(OSError):
                if leftover.is_dir() and not leftover.is_symlink() and leftover.stat().st_mtime < too_old:
                    shutil.rmtree(leftover, ignore_errors=True)

    @property
    def real_root(self) -> Path:
        return self.root.resolve()

    # -- listing ----------------------------------------------------------------------------------
    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.real_root)
        except (OSError, RuntimeError):  # dangling or looping symlinks
            return False

    def _clips_in(self, folder: Path) -> tuple[Path, ...]:
        try:
            entries = sorted(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):  # deleted (or replaced) while we were listing
            return ()
        return tuple(
            p for p in entries
            if not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file() and self._inside(p)
        )

    def _entries(self) -> list[Path]:
        try:
            return sorted(self.root.iterdir())
        except FileNotFoundError:  # could not be created (see __init__): no voices
            return []

    def list(self, stem: str | None = None) -> list[Voice]:
        """Every voice, sorted by file name (with `stem`: only the voices of that name, in one directory scan)."""
        voices: list[Voice] = []
        for entry in self._entries():
            if stem is not None and entry.name != stem and entry.stem != stem:
                continue  # before any other system call: resolving a name scans the directory once
            if entry.name.startswith(".") or not self._inside(entry):
                continue
            if entry.is_dir():
                clips = self._clips_in(entry)
                if clips:
                    voices.append(Voice(entry.name, clips, is_folder=True))
            elif entry.is_file() and entry.suffix.lower() in AUDIO_EXTENSIONS:
                voices.append(Voice(entry.stem, (entry.resolve(),)))
        return voices

    def names(self) -> list[str]:
        return [v.name for v in self.list()]

    # -- resolution -------------------------------------------------------------------------------
    def check_name(self, name: str) -> str:
        """Refuse names that could leave the voices directory or are not plain file names."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidVoiceName("The voice name is empty.", "Give the file name of a clip in the voices directory.")
        name = name.strip()
        bad = (
            len(name.encode("utf-8", "surrogatepass")) > 255  # the filesystem counts bytes (ENAMETOOLONG)
            or any(unicodedata.category(c)[0] == "C" for c in name)  # NUL and other control characters
            or "/" in name or "\\" in name
            or name.startswith(".")
            or ".." in name
            or Path(name).is_absolute()
        )
        if bad:
            raise InvalidVoiceName(
                f"Invalid voice name {name[:80]!r}: it must be a plain file or folder name inside the voices directory.",
                "Use a name from GET /api/voices, e.g. 'my_voice_sample.mp3' or 'my_voice_sample'.",
            )
        return name

    def resolve(self, name: str) -> Voice:
        name = self.check_name(name)
        direct = self.root / name
        if direct.exists() or direct.is_symlink():
            if not self._inside(direct):
                raise InvalidVoiceName(f"Voice {name!r} points outside the voices directory.",
                                       "Copy the clip into the voices directory instead of linking to it.")
            if direct.is_dir():
                clips = self._clips_in(direct)
                if not clips:
                    raise VoiceNotFound(f"Voice folder {name!r} holds no audio clips.", "Put one or more clips of the speaker in it.")
                return Voice(name, clips, is_folder=True)
            return Voice(Path(name).stem, (direct.resolve(),))
        # "ana" finds ana.wav; "ana.mp3" also finds ana.wav when it is the only clip of that name.
        stem = Path(name).stem if Path(name).suffix.lower() in AUDIO_EXTENSIONS else name
        matches = [v for v in self.list(stem) if v.name == stem]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            files = ", ".join(f.name for v in matches for f in v.files)
            raise VoiceNotFound(f"Voice name {name!r} is ambiguous: {files}.", "Give the full file name, with its extension.")
        available = self.names()
        raise VoiceNotFound(
            f"Unknown voice {name!r}. Available voices: {', '.join(available) if available else 'none'}.",
            f"Put a 5-15 s clip named {name!r} in the server's voices directory or upload one with POST /api/voices.",
        )

    @staticmethod
    def check_upload_name(name: str) -> str:
        if not isinstance(name, str) or not _UPLOAD_NAME.fullmatch(name):
            raise InvalidVoiceName(f"Invalid voice name {str(name)[:80]!r}.", f"A voice name is {UPLOAD_NAME_RULE}.", param="name")
        return name

    # -- per-voice settings -----------------------------------------------------------------------
    # A voice's settings live in `<name>.json` beside its clip or folder (not in the folder: a one-clip
    # voice has none), so an operator can write one by hand for a dropped clip; today: its language.
    def settings_file(self, name: str) -> Path:
        return self.root / f"{name}{SETTINGS_SUFFIX}"

    def language(self, voice: Voice) -> str | None:
        """The language code written in the voice's settings file, unchecked (None: it sets none)."""
        path = self.settings_file(voice.name)
        if not path.is_file():  # no settings (a folder or FIFO of that name is not a settings file either)
            return None
        problem = f"Voice {voice.name!r} has an unusable settings file ({path.name})"
        hint = 'Fix or delete it (it holds JSON like {"language": "en"}), or upload the voice again with a language.'
        if not self._inside(path):
            raise UnsupportedLanguage(f"{problem}: it points outside the voices directory.", hint)
        try:
            with path.open("rb") as f:
                raw = f.read(_MAX_SETTINGS_BYTES + 1)
        except FileNotFoundError:  # deleted meanwhile
            return None
        except OSError as exc:  # its message would name the server's path
            raise UnsupportedLanguage(f"{problem}: {type(exc).__name__}.", hint) from None
        try:
            if len(raw) > _MAX_SETTINGS_BYTES:
                raise ValueError(f"larger than {_MAX_SETTINGS_BYTES} bytes")
            data = json.loads(raw)
        except ValueError as exc:
            raise UnsupportedLanguage(f"{problem}: {exc}.", hint) from None
        language = data.get("language") if isinstance(data, dict) else None
        if language is not None and not isinstance(language, str):
            raise UnsupportedLanguage(f"{problem}: 'language' is not a string.", hint)
        return language or None

    def save_language(self, name: str, language: str) -> None:
        """Write the voice's settings file (atomically: readers see the old one or the new one)."""
        with not_writable_refused(), atomic_write(self.settings_file(self.check_upload_name(name)), "w", encoding="utf-8") as f:
            json.dump({"language": language}, f)

    # -- saving and deleting ----------------------------------------------------------------------
    # Uploads are staged in a hidden folder inside the voices directory (same filesystem, so moving
    # them into place is a rename: readers see the old voice or the new one, never half of one).
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A hidden scratch folder for one upload, removed with whatever is left in it."""
        with disk_full_refused(), not_writable_refused():
            path = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def entries(self, name: str) -> list[Path]:
        """What holds voice `name` in the directory: its folder and/or clip files named `name.<ext>`."""
        found = []
        for entry in self._entries():
            if entry.name.startswith("."):
                continue
            if entry.name == name and entry.is_dir() and not entry.is_symlink():
                found.append(entry)
            elif entry.stem == name and entry.suffix.lower() in AUDIO_EXTENSIONS and not entry.is_dir():
                found.append(entry)
        return found

    def check_new(self, name: str, replace: bool) -> None:
        if not replace and self.entries(name):
            raise VoiceExists(f"A voice named {name!r} already exists.",
                              "Choose another name, delete it first (DELETE /api/voices/{name}), or send replace=true.")

    @staticmethod
    def check_clip_file(path: Path, label: str, min_seconds: float, max_seconds: float) -> Path:
        """Refuse a staged upload that is not audio or is too short/long; returns the clip to keep
        (a file of a kind the store does not list by extension is converted to WAV)."""
        too_long_hint = "Trim it (5-15 s is ideal), or raise TTS_MAX_CLIP_SECONDS."
        try:
            info = audio.probe(path, max_seconds)
            if info.duration_s and info.duration_s > max_seconds:
                raise InvalidAudio(f"'{label}' is {info.duration_s:.1f} s long; the limit is {max_seconds:g} s.",
                                   too_long_hint)
            if info.duration_s and info.duration_s < min_seconds:
                raise InvalidAudio(f"'{label}' is {info.duration_s:.1f} s long; at least {min_seconds:g} s of speech is needed.",
                                   audio.IDEAL_CLIP)
            # The declared length may lie (a "decode bomb"): decode, stopping just past the limit.
            convert = path.suffix.lower() not in AUDIO_EXTENSIONS
            rate = info.sample_rate if convert else audio.MEASURE_RATE
            decoded = audio.decode(path, rate, max_seconds)
            if audio.longer_than(decoded, rate, max_seconds):
                raise InvalidAudio(f"'{label}' holds more than {max_seconds:g} s of audio (whatever it declares); "
                                   f"the limit is {max_seconds:g} s.", too_long_hint)
            if not convert:
                return path
            wav = path.with_suffix(".wav")
            audio.write_wav_atomic(wav, decoded, rate)
            path.unlink()
            return wav
        except InvalidAudio as exc:
            raise naming_uploads(exc, [(label, path)]) from None

    def commit(self, name: str, clips: list[Path], staging: Path, replace: bool) -> Voice:
        """Move staged, checked clips into place as voice `name` (a file for one clip, a folder for
        several). With `replace`, what held the name before is removed; if the move fails, it is put back."""
        name = self.check_upload_name(name)
        if not clips:
            raise ValueError("a voice needs at least one clip")
        with self._write_lock(), disk_full_refused(), not_writable_refused():
            self.check_new(name, replace)
            old = self.entries(name)
            trash = staging / ".replaced"
            trash.mkdir()
            moved: list[Path] = []
            try:
                for entry in old:
                    os.rename(entry, trash / entry.name)
                    moved.append(entry)
                if len(clips) == 1:
                    os.rename(clips[0], self.root / f"{name}{clips[0].suffix.lower()}")
                else:
                    folder = clips[0].parent
                    if any(c.parent != folder for c in clips):
                        raise ValueError("the clips of a voice must be staged in one folder")
                    os.rename(folder, self.root / name)
            except BaseException:
                for entry in moved:
                    with contextlib.suppress(OSError):
                        os.rename(trash / entry.name, entry)
                raise
            return self.resolve(name)  # under the lock: what this commit stored, not another replica's next one

    def delete(self, name: str) -> Voice:
        """Remove a voice (its clip, or its folder of clips); returns what was removed."""
        with self._write_lock(), not_writable_refused():
            voice = self.resolve(name)
            direct = self.root / self.check_name(name)
            entry = direct if (direct.exists() or direct.is_symlink()) else self.entries(voice.name)[0]
            if entry.is_dir() and not entry.is_symlink():
                trash = Path(tempfile.mkdtemp(prefix=".delete-", dir=self.root))
                os.rename(entry, trash / entry.name)  # gone at once for readers; then removed
                shutil.rmtree(trash, ignore_errors=True)
            else:
                entry.unlink()
            if not self.entries(voice.name):  # its settings go with its last clip
                self.settings_file(voice.name).unlink(missing_ok=True)
        return voice
