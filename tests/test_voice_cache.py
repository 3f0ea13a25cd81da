"""The voice cache, end to end: conditioning is computed once per clip content (read from /metrics:
tts_voice_cache_misses counts computations, _hits lookups served, _disk_hits those loaded from disk), kept on
disk across restarts, never served stale for a replaced clip; decoded clips are kept per file content."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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


@pytest.fixture(scope="module")
def cache_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("cache"), tiny_model_dir)
    make_clip(srv.voices_dir / "lena.mp3", seconds=6, freq=190)
    make_clip(srv.voices_dir / "omar.m4a", seconds=5, freq=120, rate=32000, channels=1)
    make_clip(srv.voices_dir / "pia.ogg", seconds=5, freq=240, rate=48000)
    srv.start()
    yield srv
    srv.stop()


def test_second_request_skips_conditioning(cache_server: ServerProcess) -> None:
    assert speak(cache_server, "lena.mp3") == COMPUTED
    assert speak(cache_server, "lena.mp3") == IN_MEMORY
    assert speak(cache_server, "lena", endpoint="stream") == IN_MEMORY  # another name of the clip, the other route


def test_cache_files_are_keyed_by_content(cache_server: ServerProcess) -> None:
    assert speak(cache_server, "omar") == COMPUTED
    clip = cache_server.voices_dir / "omar.m4a"
    digest = hashlib.sha256(clip.read_bytes()).hexdigest()
    decoded = [p for p in decoded_clips(cache_server) if p.name.startswith(digest)]
    assert len(decoded) == 1, decoded_clips(cache_server)  # the decoded clip is kept under its content's hash
    assert latents(cache_server), "no conditioning latents on disk"
    assert not list(cache_server.cache_dir.rglob(".tmp-*")), "temporary files left behind"

    # The same bytes under another name are the same voice for the cache: nothing is recomputed.
    shutil.copyfile(clip, cache_server.voices_dir / "omar_copy.m4a")
    before_latents, before_clips = latents(cache_server), decoded_clips(cache_server)
    assert speak(cache_server, "omar_copy") == IN_MEMORY
    assert (latents(cache_server), decoded_clips(cache_server)) == (before_latents, before_clips)


def test_restart_keeps_the_cache(cache_server: ServerProcess) -> None:
    """After a restart (memory gone) the disk cache serves the latents. Decoding happens once per file
    content: a voice whose latents were deleted is conditioned again from its kept decoded clip, which
    is neither decoded nor written again."""
    assert speak(cache_server, "pia.ogg") == COMPUTED
    before_ines = latents(cache_server)
    make_clip(cache_server.voices_dir / "ines.mp3", seconds=5, freq=210)
    assert speak(cache_server, "ines") == COMPUTED
    (ines_latents,) = latents(cache_server) - before_ines
    digest = hashlib.sha256((cache_server.voices_dir / "ines.mp3").read_bytes()).hexdigest()
    (decoded,) = [p for p in decoded_clips(cache_server) if p.name.startswith(digest)]
    stamp = (decoded.stat().st_ino, decoded.stat().st_mtime_ns)
    ines_latents.unlink()
    files = latents(cache_server)

    cache_server.restart()
    assert speak(cache_server, "pia.ogg") == FROM_DISK
    assert speak(cache_server, "lena") == FROM_DISK
    assert speak(cache_server, "ines") == COMPUTED  # latents recomputed...
    assert (decoded.stat().st_ino, decoded.stat().st_mtime_ns) == stamp  # ...from the kept decoded clip
    assert latents(cache_server) == files | {ines_latents}


def test_replaced_clip_is_recomputed(cache_server: ServerProcess) -> None:
    make_clip(cache_server.voices_dir / "vera.flac", seconds=5, freq=150, rate=44100, channels=1)
    assert speak(cache_server, "vera") == COMPUTED
    before = latents(cache_server)
    # Same file name, new content (another speaker): the old latents must not be served.
    make_clip(cache_server.voices_dir / "vera.flac", seconds=7, freq=260, rate=22050, channels=2)
    assert speak(cache_server, "vera") == COMPUTED
    assert len(latents(cache_server) - before) == 1  # a new entry for the new content
    assert speak(cache_server, "vera") == IN_MEMORY
