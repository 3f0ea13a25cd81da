"""Fault injection for tests, loaded only by server subprocesses started with PYTHONPATH=tests/fault_plugin.

Production code has no test hooks: this module patches it from the outside at interpreter start.
Each fault is switched on by an environment variable:

- FAULT_TEXT=1: a sentence containing `faultruntime` raises RuntimeError when it joins the batch, `faultoom`
  raises torch.OutOfMemoryError (what CUDA raises), `faultlate` raises in its own decoding after a few
  audio frames, `faultstep` makes the batched GPT step fail (for every sentence in it) once it has
  a few frames.
- FAULT_LOAD_GATE=PATH: model loading waits until PATH exists (so "not ready yet" lasts as long as a test needs).
- FAULT_PAUSE=PATTERNS + FAULT_PAUSE_MARK=PATH: an fsync/replace/rename of a file whose path matches
  one of the fnmatch PATTERNS (os.pathsep-separated) appends a line to PATH and hangs that thread,
  so a test can SIGKILL the process in the middle of a write.
- FAULT_DENY_DIR=DIR + FAULT_DENY_ERRNO=EROFS|ENOSPC: creating or writing files inside DIR fails as
  on a read-only or full disk.
- FAULT_FULL_DIR=DIR + FAULT_FULL_AFTER=BYTES: a file opened for writing by name inside DIR takes at most
  BYTES; writing more fails with ENOSPC (a disk with that much room left).
- FAULT_VANISH=PATTERN: a voice whose name matches the fnmatch PATTERN is deleted from the voices directory
  right after the store lists or resolves it (another request's DELETE landing at the worst moment).
- FAULT_HOLD_DIR=DIR: while DIR/hold exists, computing a voice's conditioning creates DIR/held and waits
  until DIR/hold is removed (so a test can act while a voice is being conditioned).
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import shutil
import sys
import threading
import time


def _inside(path, root: str) -> bool:
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(root.rstrip("/") + "/")
    except (TypeError, ValueError):
        return False


def _patch_engine() -> None:
    import torch

    from offline_tts.engine import scheduler, xtts

    original_prefix = xtts.XttsEngine.gpt_prefix
    original_take = scheduler._Sequence.take
    original_step = scheduler.Scheduler._step
    original_init = xtts.XttsEngine.__init__

    def gpt_prefix(self, text, language, conditioning):
        lowered = text.lower()
        if os.environ.get("FAULT_TEXT"):
            if "faultruntime" in lowered:
                raise RuntimeError("simulated failure inside generation")
            if "faultoom" in lowered:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original_prefix(self, text, language, conditioning)

    def take(self, latent):
        if os.environ.get("FAULT_TEXT") and "faultlate" in self.job.text.lower() and self.frames >= 10:
            raise RuntimeError("simulated failure in the middle of generation")
        return original_take(self, latent)

    def _step(self):
        # The batched step itself fails (every sentence in it) while a sentence with the marker decodes.
        if os.environ.get("FAULT_TEXT") and any("faultstep" in seq.job.text.lower() and seq.frames >= 3
                                                for seq in self._active.values()):
            raise RuntimeError("simulated failure in the batched step")
        return original_step(self)

    def __init__(self, *args, **kwargs):
        gate = os.environ.get("FAULT_LOAD_GATE")
        while gate and not os.path.exists(gate):
            time.sleep(0.1)
        original_init(self, *args, **kwargs)

    xtts.XttsEngine.gpt_prefix = gpt_prefix
    scheduler._Sequence.take = take
    scheduler.Scheduler._step = _step
    xtts.XttsEngine.__init__ = __init__


def _patch_pause() -> None:
    patterns, mark = os.environ["FAULT_PAUSE"].split(os.pathsep), os.environ["FAULT_PAUSE_MARK"]
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def matches(path) -> bool:
        path = os.path.abspath(os.fsdecode(path))
        return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)

    def hang(what: str, path) -> None:
        with open(mark, "a") as f:
            f.write(f"{what} {os.fsdecode(path)}\n")
        while True:  # until SIGKILL
            time.sleep(1)

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path and matches(path):
            hang("fsync", path)
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        if matches(dst):
            hang("replace", dst)
        return real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if matches(dst):
            hang("rename", dst)
        return real_rename(src, dst, *args, **kwargs)

    os.fsync, os.replace, os.rename = fsync, replace, rename


def _patch_deny() -> None:
    root = os.environ["FAULT_DENY_DIR"]
    code = getattr(errno, os.environ.get("FAULT_DENY_ERRNO", "EROFS"))
    real_os_open, real_open, real_mkdir = os.open, builtins.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def fail(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def os_open(path, flags, *args, **kwargs):
        if flags & writing and _inside(path, root):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and _inside(file, root):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if _inside(path, root):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    os.open, builtins.open, io.open, os.mkdir = os_open, open_, open_, mkdir


class _CappedFile:
    """A file that takes at most `room` more bytes, then fails like a full disk."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _patch_full() -> None:
    root, room = os.environ["FAULT_FULL_DIR"], int(os.environ["FAULT_FULL_AFTER"])
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and _inside(file, root):
            return _CappedFile(f, room)
        return f

    builtins.open, io.open = open_, open_


def _patch_vanish() -> None:
    from offline_tts import voices

    pattern = os.environ["FAULT_VANISH"]
    original_list, original_resolve = voices.VoiceStore.list, voices.VoiceStore.resolve

    def vanish(voice) -> None:
        if fnmatch.fnmatch(voice.name, pattern):
            for path in voice.files:
                target = path.parent if voice.is_folder else path
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)

    def list_(self, *args, **kwargs):
        found = original_list(self, *args, **kwargs)
        for voice in found:
            vanish(voice)
        return found

    def resolve(self, name):
        voice = original_resolve(self, name)
        vanish(voice)
        return voice

    voices.VoiceStore.list, voices.VoiceStore.resolve = list_, resolve


def _patch_hold() -> None:
    from offline_tts.engine import xtts

    hold_dir = os.environ["FAULT_HOLD_DIR"]
    hold, held = os.path.join(hold_dir, "hold"), os.path.join(hold_dir, "held")
    original = xtts.XttsEngine.compute_conditioning
    lock = threading.Lock()

    def compute_conditioning(self, *args, **kwargs):
        with lock:
            if os.path.exists(hold):
                with open(held, "w"):
                    pass
                while os.path.exists(hold):
                    time.sleep(0.05)
        return original(self, *args, **kwargs)

    xtts.XttsEngine.compute_conditioning = compute_conditioning


# Only in the server process (the `offline-tts` console script), never in ffmpeg helpers or pip.
if os.path.basename(sys.argv[0] if sys.argv else "") == "offline-tts":
    if os.environ.get("FAULT_TEXT") or os.environ.get("FAULT_LOAD_GATE"):
        _patch_engine()
    if os.environ.get("FAULT_PAUSE"):
        _patch_pause()
    if os.environ.get("FAULT_DENY_DIR"):
        _patch_deny()
    if os.environ.get("FAULT_FULL_DIR"):
        _patch_full()
    if os.environ.get("FAULT_VANISH"):
        _patch_vanish()
    if os.environ.get("FAULT_HOLD_DIR"):
        _patch_hold()
