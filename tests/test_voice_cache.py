"""The voice cache, end to end: conditioning is computed once per clip content (read from /metrics:
tts_voice_cache_misses counts computations, _hits lookups served, _disk_hits those loaded from disk), kept on
disk across restarts, never served stale for a replaced clip; decoded clips are kept per file content.
On the session server (no private one: a server start costs seconds); each test adds the clips it speaks."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx

from helpers import WAV_HEADER, ServerProcess, cache_counts, make_clip, wav_info


def speak(srv: ServerProcess, voice: str, endpoint: str = "batch") -> dict[str, float]:
    """Speak with `voice`; returns what the request did to the cache: {"misses": computed, "hits", "disk_hits"}."""
    before = cache_counts(srv)
    r = httpx.post(f"{srv.url}/api/tts/{endpoint}", timeout=120,
                   json={"text": "Hola mundo.", "voice_sample": voice, "language": "es"})
    assert r.status_code == 200, r.text
    if endpoint == "batch":
        assert wav_info(r.content)[:2] == (24_000, 1)
    else:
        assert r.content[:4] == b"RIFF" and len(r.content) > WAV_HEADER
    after = cache_counts(srv)
    return {k: after[k] - before[k] for k in after}


COMPUTED = {"misses": 1, "hits": 0, "disk_hits": 0}
IN_MEMORY = {"misses": 0, "hits": 1, "disk_hits": 0}
FROM_DISK = {"misses": 0, "hits": 1, "disk_hits": 1}


def latents(srv: ServerProcess) -> set[Path]:
    return set((srv.cache_dir / "latents").rglob("*.pt"))


def decoded_clips(srv: ServerProcess) -> set[Path]:
    return set((srv.cache_dir / "clips").glob("*.npy"))


def test_second_request_skips_conditioning(server: ServerProcess) -> None:
    make_clip(server.voices_dir / "lena.mp3", seconds=6, freq=190)
    assert speak(server, "lena.mp3") == COMPUTED
    assert speak(server, "lena.mp3") == IN_MEMORY
    assert speak(server, "lena", endpoint="stream") == IN_MEMORY  # another name of the clip, the other route


def test_cache_files_are_keyed_by_content(server: ServerProcess) -> None:
    make_clip(server.voices_dir / "omar.m4a", seconds=5, freq=120, rate=32000, channels=1)
    assert speak(server, "omar") == COMPUTED
    clip = server.voices_dir / "omar.m4a"
    digest = hashlib.sha256(clip.read_bytes()).hexdigest()
    decoded = [p for p in decoded_clips(server) if p.name.startswith(digest)]
    assert len(decoded) == 1, decoded_clips(server)  # the decoded clip is kept under its content's hash
    assert latents(server), "no conditioning latents on disk"
    assert not list(server.cache_dir.rglob(".tmp-*")), "temporary files left behind"

    # The same bytes under another name are the same voice for the cache: nothing is recomputed.
    shutil.copyfile(clip, server.voices_dir / "omar_copy.m4a")
    before_latents, before_clips = latents(server), decoded_clips(server)
    assert speak(server, "omar_copy") == IN_MEMORY
    assert (latents(server), decoded_clips(server)) == (before_latents, before_clips)


def test_restart_keeps_the_cache(server: ServerProcess) -> None:
    """After a restart (memory gone) the disk cache serves the latents. Decoding happens once per file
    content: a voice whose latents were deleted is conditioned again from its kept decoded clip, which
    is neither decoded nor written again."""
    make_clip(server.voices_dir / "pia.ogg", seconds=5, freq=240, rate=48000)
    assert speak(server, "pia.ogg") == COMPUTED
    before_ines = latents(server)
    make_clip(server.voices_dir / "ines.mp3", seconds=5, freq=210)
    assert speak(server, "ines") == COMPUTED
    (ines_latents,) = latents(server) - before_ines
    digest = hashlib.sha256((server.voices_dir / "ines.mp3").read_bytes()).hexdigest()
    (decoded,) = [p for p in decoded_clips(server) if p.name.startswith(digest)]
    stamp = (decoded.stat().st_ino, decoded.stat().st_mtime_ns)
    ines_latents.unlink()
    files = latents(server)

    server.restart()
    assert speak(server, "pia.ogg") == FROM_DISK
    assert speak(server, "lena") == FROM_DISK
    assert speak(server, "ines") == COMPUTED  # latents recomputed...
    assert (decoded.stat().st_ino, decoded.stat().st_mtime_ns) == stamp  # ...from the kept decoded clip
    # only ines's entry was written again (the restart may prune entries of clips other tests removed)
    assert latents(server) - files == {ines_latents}


def test_replaced_clip_is_recomputed(server: ServerProcess) -> None:
    make_clip(server.voices_dir / "vera.flac", seconds=5, freq=150, rate=44100, channels=1)
    assert speak(server, "vera") == COMPUTED
    before = latents(server)
    # Same file name, new content (another speaker): the old latents must not be served.
    make_clip(server.voices_dir / "vera.flac", seconds=7, freq=260, rate=22050, channels=2)
    assert speak(server, "vera") == COMPUTED
    assert len(latents(server) - before) == 1  # a new entry for the new content
    assert speak(server, "vera") == IN_MEMORY
