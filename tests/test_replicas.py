"""Several replicas on one shared voices/cache folder (issue 15): what one changes, every other sees at
its next request; concurrent writers lose no update and never leave a half-written file."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from helpers import ROOT, ServerProcess, make_clip, wav_info
from offline_tts.defaults import Defaults, DefaultsStore
from offline_tts.fileio import atomic_write

_APPEND = """
import dataclasses, sys
from pathlib import Path
from offline_tts.defaults import DefaultsStore
store = DefaultsStore(Path(sys.argv[1]), "es")
for _ in range(int(sys.argv[3])):
    store.update(lambda d: dataclasses.replace(d, voice_sample=(d.voice_sample or "") + sys.argv[2]))
"""


def test_defaults_changed_by_one_store_are_seen_by_another(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "defaults.json"
    a, b = DefaultsStore(path, "es"), DefaultsStore(path, "es")
    assert a.current == b.current == Defaults(language="es")
    a.update(lambda d: Defaults(voice_sample="ana", language="en"))
    assert b.current == Defaults(voice_sample="ana", language="en")  # no restart: re-read because the file changed
    b.update(lambda d: Defaults(voice_sample=d.voice_sample, language="fr"))  # applied to a's change, not to a stale copy
    assert a.current == Defaults(voice_sample="ana", language="fr")
    assert path.is_file()


def test_concurrent_read_modify_write_from_processes_loses_nothing(tmp_path: Path) -> None:
    """4 processes each append 30 letters to the saved voice name: all 120 arrive (the lock file
    serialises whole read-modify-write cycles; without it, updates overwrite each other)."""
    path = tmp_path / "defaults.json"
    procs = [subprocess.Popen([sys.executable, "-c", _APPEND, str(path), letter, "30"], cwd=ROOT) for letter in "abcd"]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    saved = json.loads(path.read_text())["voice_sample"]
    assert sorted(saved) == sorted("abcd" * 30), saved
    assert DefaultsStore(path, "es").current.voice_sample == saved


_WRITER = """
import sys, time
from pathlib import Path
from offline_tts.fileio import atomic_write
payload = bytes([int(sys.argv[2])]) * 65536
for _ in range(int(sys.argv[3])):
    with atomic_write(Path(sys.argv[1])) as f:
        for i in range(0, len(payload), 4096):  # written slowly, in pieces, as a big tensor would be
            f.write(payload[i:i + 4096])
            time.sleep(0.0005)
"""


def test_two_writers_of_one_cache_entry_never_show_a_half_file(tmp_path: Path) -> None:
    """Two replicas conditioning the same voice both write its cache entry: readers see no entry or a
    whole one, never a mix or a prefix."""
    path = tmp_path / "latents" / "model" / "key.pt"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(byte), "15"], cwd=ROOT) for byte in (1, 2)]
    seen: list[bytes] = []
    while any(w.poll() is None for w in writers):
        try:
            seen.append(path.read_bytes())
        except FileNotFoundError:
            pass
    assert [w.wait() for w in writers] == [0, 0]
    seen.append(path.read_bytes())
    assert len(seen) > 5
    assert all(data in (b"\x01" * 65536, b"\x02" * 65536) for data in seen)
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind


def test_atomic_write_failure_keeps_the_old_entry(tmp_path: Path) -> None:
    path = tmp_path / "entry.pt"
    path.write_bytes(b"whole")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"ha")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [path]


_REPLACER = """
import sys
from pathlib import Path
from offline_tts.voices import VoiceStore
store = VoiceStore(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    with store.staging() as staging:
        clip = staging / f"clip{sys.argv[2] if i % 2 else '.wav'}"
        clip.write_bytes(b"RIFF" + bytes(1000))
        store.commit("ana", [clip], staging, replace=True)
"""


def test_replicas_replacing_one_voice_at_once_leave_one_voice(tmp_path: Path) -> None:
    """Three processes replace voice 'ana' 150 times each, with clips of different extensions: every
    replace succeeds and one clip holds the name at the end (not ana.wav beside ana.mp3: ambiguous)."""
    voices = tmp_path / "voices"
    procs = [subprocess.Popen([sys.executable, "-c", _REPLACER, str(voices), ext, "150"], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for ext in (".mp3", ".ogg", ".flac")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert [p.name for p in voices.iterdir() if not p.name.startswith(".")] in (["ana.wav"], ["ana.mp3"], ["ana.ogg"], ["ana.flac"])


# -- two real servers on one folder ------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_servers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two replicas started together on one voices/cache folder (shared by the tests of this module)."""
    tmp_path = tmp_path_factory.mktemp("replicas")
    shared = tmp_path / "shared"
    env = {"TTS_VOICES_DIR": str(shared / "voices"), "TTS_CACHE_DIR": str(shared / "cache")}
    make_clip(shared / "voices" / "ana.wav", seconds=6, freq=220)
    servers = [ServerProcess(tmp_path / f"replica{i}", tiny_model_dir, env) for i in range(2)]
    try:
        for s in servers:
            s.start(wait_ready=False)  # both load at once, as replicas of a deployment do
        for s in servers:
            s.wait_ready(300)
        yield shared, servers
    finally:
        for s in servers:
            s.stop()


def speak(srv: ServerProcess, voice: str | None = None) -> httpx.Response:
    body = {"text": "Hola mundo."} | ({"voice_sample": voice} if voice else {})
    return httpx.post(srv.url + "/api/tts/batch", json=body, timeout=120)


def metric(srv: ServerProcess, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "_total "))


def test_two_servers_share_uploads_defaults_deletes_and_the_cache(two_servers, tmp_path: Path) -> None:
    shared, (a, b) = two_servers
    clip = make_clip(tmp_path / "bob.wav", seconds=6, freq=140).read_bytes()
    r = httpx.post(a.url + "/api/voices", data={"name": "bob", "language": "en"},
                   files={"files": ("bob.wav", clip, "audio/wav")}, timeout=120)
    assert r.status_code == 201, r.text
    # Seen by the other at its next request, and its conditioning comes from a's cache entry on disk.
    assert "bob" in [v["name"] for v in httpx.get(b.url + "/api/voices", timeout=10).json()["voices"]]
    disk_hits = metric(b, "tts_voice_cache_disk_hits")
    r = speak(b, "bob")
    assert r.status_code == 200, r.text
    assert wav_info(r.content)[0] == 24_000
    assert metric(b, "tts_voice_cache_disk_hits") == disk_hits + 1 and metric(b, "tts_voice_cache_misses") == 0

    # Defaults set through one are the defaults of both.
    r = httpx.post(b.url + "/api/config", json={"voice_sample": "bob", "language": "fr"}, timeout=120)
    assert r.status_code == 200, r.text
    for srv in (a, b):
        assert httpx.get(srv.url + "/", timeout=10).json()["config"] == {"voice_sample": "bob", "language": "fr"}
    assert speak(a).status_code == 200  # a's default voice is b's choice

    # Deleted through one: gone for both, and the default voice that named it is cleared for both.
    assert httpx.delete(a.url + "/api/voices/bob", timeout=30).status_code == 200
    for srv in (a, b):
        assert "bob" not in [v["name"] for v in httpx.get(srv.url + "/api/voices", timeout=10).json()["voices"]]
        assert speak(srv, "bob").status_code == 404
        assert httpx.get(srv.url + "/", timeout=10).json()["config"]["voice_sample"] is None


def test_two_servers_conditioning_one_voice_at_once_write_one_valid_entry(two_servers, tiny_model_dir: Path, tmp_path: Path) -> None:
    shared, (a, b) = two_servers
    make_clip(shared / "voices" / "carla.mp3", seconds=6, freq=170)  # dropped in by hand: cached by neither
    before = set((shared / "cache" / "latents").rglob("*.pt"))
    results: list[int] = []
    threads = [threading.Thread(target=lambda s=s: results.append(speak(s, "carla").status_code)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    new = set((shared / "cache" / "latents").rglob("*.pt")) - before
    assert len(new) == 1
    assert not list((shared / "cache").rglob(".tmp-*"))
    # The entry is whole: a third replica loads it from disk instead of computing it.
    c = ServerProcess(tmp_path / "replica2", tiny_model_dir,
                      {"TTS_VOICES_DIR": str(shared / "voices"), "TTS_CACHE_DIR": str(shared / "cache")})
    try:
        c.start(wait_ready=False).wait_ready(300)
        assert speak(c, "carla").status_code == 200
        assert metric(c, "tts_voice_cache_disk_hits") == 1 and metric(c, "tts_voice_cache_misses") == 0
        assert "Discarding" not in a.log() + b.log() + c.log()
    finally:
        c.stop()
