"""Voice and config state under concurrency and faults (issue 9, items 9-14 and 16): deletions racing
listings, synthesis and POST /api/config; concurrent config changes; the cache following the voices that
exist; no server paths in errors; cut-off multipart bodies; a full disk during an upload.

The races are made deterministic by the fault plugin (tests/fault_plugin/sitecustomize.py): a voice named
`gone*` is deleted right after the store lists or resolves it, and while HOLD/hold exists, conditioning
waits (HOLD/held says it started), so a test can act in the middle of it."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from helpers import ROOT, ServerProcess, make_clip, wait_for

FAULT_PLUGIN = str(ROOT / "tests" / "fault_plugin")
ROOM = 200_000  # bytes a file in the voices directory may take on the "disk" of the `state` server


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root`, hidden ones included, with a hash of its content."""
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def cache_entries(srv: ServerProcess) -> dict[str, str]:
    """The decoded clips and latents on disk (defaults.json is state, not cache)."""
    return {k: v for k, v in tree(srv.cache_dir).items() if k.startswith(("clips/", "latents/")) and v != "dir"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upload(client: httpx.Client, name: str, clip: Path, replace: bool = False) -> httpx.Response:
    data = {"name": name, **({"replace": "true"} if replace else {})}
    return client.post("/api/voices", data=data, files={"files": (clip.name, clip.read_bytes(), "audio/mpeg")})


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("state-clips")
    made = {f"c{i}": make_clip(d / f"c{i}.mp3", seconds=4, freq=130 + 17 * i) for i in range(8)}
    made["big"] = make_clip(d / "big.wav", seconds=4, rate=44100, channels=2)  # ~700 KB > ROOM
    return made


@pytest.fixture(scope="module")
def state(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A private server with the deletion, hold and full-disk faults switched on."""
    workdir = tmp_path_factory.mktemp("state")
    hold_dir = workdir / "hold"
    hold_dir.mkdir()
    srv = ServerProcess(workdir, tiny_model_dir, {
        "PYTHONPATH": FAULT_PLUGIN, "TTS_WORKERS": "1", "FAULT_VANISH": "gone*", "FAULT_HOLD_DIR": str(hold_dir),
        "FAULT_FULL_DIR": str(workdir / "voices"), "FAULT_FULL_AFTER": str(ROOM)})
    make_clip(srv.voices_dir / "ana.wav", seconds=5, freq=220, rate=16000, channels=1)
    srv.hold_dir = hold_dir
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def http(state):
    with state.client() as client:
        yield client


def while_conditioning(srv: ServerProcess, slow: Callable[[], httpx.Response], meanwhile: Callable[[], None]
                       ) -> httpx.Response:
    """Start `slow` (a request that conditions a voice), run `meanwhile` while the conditioning is held,
    then let it finish; returns the slow request's response."""
    hold, held = srv.hold_dir / "hold", srv.hold_dir / "held"
    held.unlink(missing_ok=True)
    hold.touch()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            future = pool.submit(slow)
            wait_for(held.exists, "the conditioning to start")
            meanwhile()
        finally:
            hold.unlink()
        return future.result(timeout=120)


def names(client: httpx.Client) -> list[str]:
    r = client.get("/api/voices")
    assert r.status_code == 200, r.text
    return [v["name"] for v in r.json()["voices"]]


# -- 9: a voice deleted between listing/resolving and reading it ------------------------------------
def test_listing_skips_a_voice_deleted_while_it_is_listed(state, http, clips):
    shutil.copy(clips["c0"], state.voices_dir / "gone_listed.mp3")
    folder = state.voices_dir / "gone_folder"
    folder.mkdir()
    shutil.copy(clips["c1"], folder / "a.mp3")
    listed = names(http)
    assert "ana" in listed and not [n for n in listed if n.startswith("gone")]
    assert not (state.voices_dir / "gone_listed.mp3").exists() and not folder.exists()  # the race did happen


@pytest.mark.parametrize("route", ["/api/tts/batch", "/api/tts/stream", "/api/config"])
def test_a_voice_deleted_after_it_was_resolved_is_a_404(state, http, clips, route):
    name = "gone_" + route.rsplit("/", 1)[-1]
    shutil.copy(clips["c2"], state.voices_dir / f"{name}.mp3")
    before = http.get("/").json()["config"]
    r = http.post(route, json={"text": "Hola.", "voice_sample": name})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "voice_not_found" and name in r.json()["error"]["message"]
    assert http.get("/").json()["config"] == before
    assert "Traceback" not in state.log()


# -- 10, 11: POST /api/config while its voice is being conditioned ----------------------------------
def test_concurrent_config_changes_are_all_kept(state, http, clips):
    shutil.copy(clips["c3"], state.voices_dir / "bea.mp3")  # not conditioned yet: the request is slow
    http.post("/api/config", json={"language": "es"})

    def change_language():
        r = http.post("/api/config", json={"language": "en"})
        assert r.status_code == 200 and r.json()["config"]["language"] == "en", r.text

    slow = while_conditioning(state, lambda: http.post("/api/config", json={"voice_sample": "bea"}), change_language)
    assert slow.status_code == 200, slow.text
    expected = {"voice_sample": "bea", "language": "en"}
    assert slow.json()["config"] == expected
    assert http.get("/").json()["config"] == expected
    state.restart()
    with state.client() as client:
        assert client.get("/").json()["config"] == expected


def test_a_voice_deleted_while_config_conditions_it_is_not_made_default(state, http, clips):
    shutil.copy(clips["c4"], state.voices_dir / "cid.mp3")
    before_config, before_cache = http.get("/").json()["config"], cache_entries(state)

    def delete():
        assert http.delete("/api/voices/cid").status_code == 200

    r = while_conditioning(state, lambda: http.post("/api/config", json={"voice_sample": "cid"}), delete)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "voice_not_found"
    assert http.get("/").json()["config"] == before_config
    assert cache_entries(state) == before_cache  # its latents and decoded clip did not stay
    assert http.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "cid"}).status_code == 404


# -- 12: the cache follows the voices that exist ------------------------------------------------------
def test_upload_delete_churn_leaves_the_cache_as_it_was(state, http, clips):
    baseline = cache_entries(state)
    for clip in ("c5", "c6", "c7"):
        assert upload(http, "churn", clips[clip]).status_code == 201
        entries = cache_entries(state)
        assert any(digest(clips[clip]) in k for k in entries) and len(entries) == len(baseline) + 2
        assert http.delete("/api/voices/churn").status_code == 200
        assert cache_entries(state) == baseline
    # replace: the old clip's entries go, the new one's stay
    assert upload(http, "churn", clips["c5"]).status_code == 201
    assert upload(http, "churn", clips["c6"], replace=True).status_code == 201
    entries = cache_entries(state)
    assert len(entries) == len(baseline) + 2 and not any(digest(clips["c5"]) in k for k in entries)
    assert http.delete("/api/voices/churn").status_code == 200
    assert cache_entries(state) == baseline


def test_entries_of_clips_removed_by_hand_are_pruned_at_startup(state, http, clips):
    baseline = cache_entries(state)
    shutil.copy(clips["c5"], state.voices_dir / "hand.mp3")
    assert http.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "hand"}).status_code == 200
    assert len(cache_entries(state)) == len(baseline) + 2
    (state.voices_dir / "hand.mp3").unlink()  # not through the API: the running server does not know
    state.restart()
    assert cache_entries(state) == baseline
    assert "removed 2 entries" in state.log()


def test_deleting_one_of_two_voices_with_the_same_clip_keeps_the_other_cached(state, http, clips):
    baseline = cache_entries(state)
    assert upload(http, "twin1", clips["c5"]).status_code == 201
    with_twin = cache_entries(state)
    assert upload(http, "twin2", clips["c5"]).status_code == 201
    assert http.delete("/api/voices/twin2").status_code == 200
    assert cache_entries(state) == with_twin
    conditioned = state.log().count("Voice 'twin1' conditioned")
    assert http.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "twin1"}).status_code == 200
    assert state.log().count("Voice 'twin1' conditioned") == conditioned  # still cached
    assert http.delete("/api/voices/twin1").status_code == 200
    assert cache_entries(state) == baseline


def test_refused_uploads_leave_nothing_in_the_cache(state, http, clips):
    baseline, voices_before = cache_entries(state), tree(state.voices_dir)
    r = upload(http, "ana", clips["c6"])  # duplicate name
    assert r.status_code == 409
    assert (cache_entries(state), tree(state.voices_dir)) == (baseline, voices_before)

    # Refused after decoding and conditioning: the name was taken meanwhile (a clip dropped in by hand).
    def drop_in():
        shutil.copy(clips["c7"], state.voices_dir / "dup.mp3")

    r = while_conditioning(state, lambda: upload(http, "dup", clips["c6"]), drop_in)
    assert r.status_code == 409, r.text
    assert cache_entries(state) == baseline
    (state.voices_dir / "dup.mp3").unlink()


# -- 16: a full disk while an upload is staged ---------------------------------------------------------
def test_upload_on_a_full_disk_is_a_clear_507_and_leaves_nothing(state, http, clips):
    voices_before, cache_before = tree(state.voices_dir), cache_entries(state)
    r = upload(http, "fat", clips["big"])
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_storage" and "disk is full" in error["message"]
    assert "free space" in error["hint"]
    assert (tree(state.voices_dir), cache_entries(state)) == (voices_before, cache_before)  # no staging left
    assert "Traceback" not in state.log() and "disk holding the voices directory is full" in state.log()
    assert upload(http, "slim", clips["c7"]).status_code == 201  # a clip that fits still goes in
    assert http.delete("/api/voices/slim").status_code == 200


def test_no_room_for_the_staging_folder_is_a_507(tmp_path, monkeypatch):
    from offline_tts.errors import InsufficientStorage
    from offline_tts.voices import VoiceStore

    store = VoiceStore(tmp_path)
    before = sorted(tmp_path.iterdir())  # the replicas' lock file only

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    with pytest.raises(InsufficientStorage), store.staging():
        pass
    assert sorted(tmp_path.iterdir()) == before == [tmp_path / ".voices.lock"]


# -- 13: errors do not reveal server paths -------------------------------------------------------------
API_PATHS = ("/api/", "/v1/", "/docs", "/ui", "/ready", "/health", "/metrics")


def assert_no_server_path(srv: ServerProcess, r: httpx.Response) -> None:
    error = r.json()["error"]
    text = error["message"] + " " + error["hint"]
    for root in (srv.workdir, srv.voices_dir, srv.cache_dir):
        assert str(root) not in text and str(root.resolve()) not in text, text
    paths = [p for p in re.findall(r"(?<![\w.])/[\w.-]+(?:/[\w.-]*)*", text) if not p.startswith(API_PATHS)]
    assert not paths, text


def test_error_messages_and_hints_name_no_server_path(server, tmp_path):
    with server.client() as client:
        responses = [
            client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "nobody"}),
            client.post("/api/tts/stream", json={"text": "Hola.", "voice_sample": "nobody.wav"}),
            client.post("/api/config", json={"voice_sample": "nobody"}),
            client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hola.", "voice": "nobody"}),
            client.delete("/api/voices/nobody"),
            client.post("/api/voices", data={"name": "x"}, files={"files": ("a.wav", b"not audio" * 100)}),
            client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "../etc/passwd"}),
        ]
    assert [r.status_code for r in responses] == [404, 404, 404, 404, 404, 422, 400]
    for r in responses:
        assert_no_server_path(server, r)


def test_exception_text_shown_to_clients_loses_its_paths():
    from offline_tts.errors import without_paths

    text = without_paths("FileNotFoundError: [Errno 2] No such file or directory: '/srv/tts/voices/ana.wav'")
    assert "/srv" not in text and "ana.wav" in text
    assert without_paths("CUDA out of memory. Tried to allocate 2.00 GiB") == "CUDA out of memory. Tried to allocate 2.00 GiB"


# -- 14: a multipart body cut before its closing boundary ----------------------------------------------
def test_an_upload_cut_before_the_closing_boundary_is_refused(server, clips):
    clip = clips["c0"].read_bytes()
    boundary = "cutboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\ncut\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"cut.mp3\"\r\n"
            "Content-Type: audio/mpeg\r\n\r\n").encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    before = tree(server.voices_dir)
    with server.client() as client:
        for body in (head + clip[: len(clip) // 2],  # cut in the middle of the clip
                     head + clip + f"\r\n--{boundary}".encode()):  # cut inside the closing boundary
            r = client.post("/api/voices", content=body, headers=headers)  # Content-Length matches what is sent
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "invalid_upload" and "incomplete" in r.json()["error"]["message"]
            assert tree(server.voices_dir) == before
        assert "cut" not in names(client)
