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
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import audio
from .errors import InsufficientStorage, InvalidAudio, InvalidVoiceName, UnsupportedLanguage, VoiceExists, VoiceNotFound
from .fileio import atomic_write

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset(
    ".wav .wave .mp3 .ogg .oga .opus .flac .m4a .mp4 .aac .webm .wma .aiff .aif .mka .mkv .mov .3gp .amr .wv .caf .ac3 .mpga".split()
)
UPLOAD_NAME_RULE = "1-64 characters: letters, digits, '_' and '-', starting with a letter or digit"
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SETTINGS_SUFFIX = ".json"  # `voices/<name>.json` beside a voice's clip or folder: {"language": "en"}
_MAX_SETTINGS_BYTES = 4096


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


@dataclass(frozen=True)
class Voice:
    name: str
    files: tuple[Path, ...]  # absolute, inside the voices directory
    is_folder: bool = False


class VoiceStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()  # one commit or delete at a time
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Staging folders of uploads/deletes cut short by a crash (hidden, never read): no one owns them at startup."""
        for leftover in [*self.root.glob(".upload-*"), *self.root.glob(".delete-*")]:
            if leftover.is_dir() and not leftover.is_symlink():
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

    def list(self, stem: str | None = None) -> list[Voice]:
        """Every voice, sorted by file name (with `stem`: only the voices of that name, in one directory scan)."""
        voices: list[Voice] = []
        for entry in sorted(self.root.iterdir()):
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
        with atomic_write(self.settings_file(self.check_upload_name(name)), "w", encoding="utf-8") as f:
            json.dump({"language": language}, f)

    # -- saving and deleting ----------------------------------------------------------------------
    # Uploads are staged in a hidden folder inside the voices directory (same filesystem, so moving
    # them into place is a rename: readers see the old voice or the new one, never half of one).
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A hidden scratch folder for one upload, removed with whatever is left in it."""
        with disk_full_refused():
            path = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def entries(self, name: str) -> list[Path]:
        """What holds voice `name` in the directory: its folder and/or clip files named `name.<ext>`."""
        found = []
        for entry in sorted(self.root.iterdir()):
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
        except InvalidAudio as exc:  # name the upload, not the staged file
            exc.message = exc.message.replace(f"'{path.name}'", f"'{label}'")
            exc.param = "files"
            raise

    def commit(self, name: str, clips: list[Path], staging: Path, replace: bool) -> Voice:
        """Move staged, checked clips into place as voice `name` (a file for one clip, a folder for
        several). With `replace`, what held the name before is removed; if the move fails, it is put back."""
        name = self.check_upload_name(name)
        if not clips:
            raise ValueError("a voice needs at least one clip")
        with self._write_lock, disk_full_refused():
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
        return self.resolve(name)

    def delete(self, name: str) -> Voice:
        """Remove a voice (its clip, or its folder of clips); returns what was removed."""
        with self._write_lock:
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
