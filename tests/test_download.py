"""ensure_model against a local HTTP server: license gate, verification, resume, failures.

No test reaches the real hub: every call passes the local server's URL, and a guard fails any
request to another host.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from offline_tts.engine import download
from offline_tts.engine.download import (
    LicenseNotAcceptedError,
    ModelFile,
    ModelIntegrityError,
    ModelUnavailableError,
    ensure_model,
)
from offline_tts.engine.model_files import REQUIRED_FILES, missing_model_files


@dataclass
class ServerState:
    files: dict[str, bytes]
    ranges: bool = True  # honour Range requests
    linked_etags: dict[str, str] = field(default_factory=dict)  # name -> sha256 sent as X-Linked-Etag
    cut_after: dict[str, int] = field(default_factory=dict)  # name -> bytes sent before dropping (once)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (name, Range header)
    bytes_sent: dict[str, int] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        state.requests.append((name, self.headers.get("Range")))
        data = state.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and state.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        if name in state.linked_etags:
            self.send_header("X-Linked-Etag", f'"{state.linked_etags[name]}"')
        self.end_headers()
        if name in state.cut_after:
            body = body[: state.cut_after.pop(name)]  # then the connection closes: a broken download
        self.wfile.write(body)
        state.bytes_sent[name] = state.bytes_sent.get(name, 0) + len(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Server:
    url: str
    state: ServerState


@pytest.fixture
def serve() -> Iterator:
    servers: list[ThreadingHTTPServer] = []

    def start(files: dict[str, bytes], **options) -> Server:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.state = ServerState(files=files, **options)  # type: ignore[attr-defined]
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return Server(f"http://127.0.0.1:{httpd.server_address[1]}/repo/resolve/main", httpd.state)  # type: ignore[attr-defined]

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _local_network_only(monkeypatch: pytest.MonkeyPatch) -> None:
    original = httpx.HTTPTransport.handle_request

    def guarded(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == "127.0.0.1", f"test tried to reach {request.url}"
        return original(self, request)

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", guarded)


def _manifest(files: dict[str, bytes]) -> list[ModelFile]:
    return [ModelFile(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()]


def _small_files(model_size: int = 300_000) -> dict[str, bytes]:
    rng = random.Random(1)
    return {
        "config.json": b'{"model": "xtts"}',
        "vocab.json": b'{"version": "1.0"}',
        "speakers_xtts.pth": rng.randbytes(5_000),
        "model.pth": rng.randbytes(model_size),
    }


def _checkpoint_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in REQUIRED_FILES}


def test_manifest_pins_the_official_files() -> None:
    assert [f.name for f in download.MODEL_FILES] == ["config.json", "vocab.json", "speakers_xtts.pth", "model.pth"]
    assert all(f.size and re.fullmatch(r"[0-9a-f]{64}", f.sha256 or "") for f in download.MODEL_FILES)
    assert download.REVISION in download.DEFAULT_BASE_URL and download.DEFAULT_BASE_URL.startswith(
        "https://huggingface.co/coqui/XTTS-v2/"
    )


def test_present_model_makes_no_request(serve, tiny_checkpoint: Path) -> None:
    server = serve({})
    assert ensure_model(tiny_checkpoint, accept_license=False, base_url=server.url) == tiny_checkpoint
    assert ensure_model(tiny_checkpoint, accept_license=True, allow_download=False, base_url=server.url)
    assert server.state.requests == []


def test_refuses_without_license(serve, tmp_path: Path) -> None:
    files = _small_files()
    server = serve(files)
    model_dir = tmp_path / "models" / "xtts"
    with pytest.raises(LicenseNotAcceptedError) as info:
        ensure_model(model_dir, accept_license=False, base_url=server.url, files=_manifest(files))
    message = str(info.value)
    assert str(model_dir) in message
    assert all(name in message for name in REQUIRED_FILES)
    assert "TTS_ACCEPT_LICENSE=true" in message and "https://coqui.ai/cpml" in message
    assert "offline-tts random-model" in message
    assert server.state.requests == []
    assert not model_dir.exists()


def test_refuses_when_download_disabled(serve, tmp_path: Path) -> None:
    server = serve(_small_files())
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailableError) as info:
        ensure_model(tmp_path, accept_license=True, allow_download=False, base_url=server.url)
    assert not isinstance(info.value, LicenseNotAcceptedError)
    message = str(info.value)
    assert str(tmp_path) in message and "model.pth, vocab.json, speakers_xtts.pth" in message
    assert "disabled" in message and "offline-tts random-model" in message
    assert server.state.requests == []


def test_downloads_missing_files_verifies_and_loads(
    serve, tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _checkpoint_files(tiny_checkpoint)
    server = serve(files)
    model_dir = tmp_path / "xtts"
    model_dir.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", model_dir / "config.json")  # already there: not fetched

    with caplog.at_level(logging.INFO, logger="offline_tts.download"):
        ensure_model(model_dir, accept_license=True, base_url=server.url, files=_manifest(files))

    assert sorted(name for name, _ in server.state.requests) == ["model.pth", "speakers_xtts.pth", "vocab.json"]
    assert _checkpoint_files(model_dir) == files
    assert not list(model_dir.glob("*.part"))
    assert any(re.search(r"model\.pth: \d+% \(.* MB/s", r.getMessage()) for r in caplog.records)

    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    config = XttsConfig()
    config.load_json(str(model_dir / "config.json"))
    model = Xtts(config)
    model.load_checkpoint(config, checkpoint_dir=str(model_dir), use_deepspeed=False, eval=True)
    assert model.speaker_manager is not None and model.speaker_manager.num_speakers >= 1


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_corrupt_file_is_rejected(serve, tmp_path: Path, damage: str) -> None:
    files = _small_files()
    good = files["model.pth"]
    bad = good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:] if damage == "flipped byte" else good[:-10]
    server = serve({**files, "model.pth": bad})
    with pytest.raises(ModelIntegrityError, match=r"model\.pth is corrupt") as info:
        ensure_model(tmp_path, accept_license=True, base_url=server.url, files=_manifest(files))
    assert ("sha256" if damage == "flipped byte" else "size") in str(info.value)
    assert not (tmp_path / "model.pth").exists() and not (tmp_path / "model.pth.part").exists()
    assert missing_model_files(tmp_path) == ["model.pth"]


def test_hub_sha256_header_is_checked_without_a_pinned_hash(serve, tmp_path: Path) -> None:
    files = _small_files()
    etags = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    unpinned = [ModelFile(name) for name in files]

    server = serve({**files, "model.pth": files["model.pth"][::-1]}, linked_etags=etags)
    with pytest.raises(ModelIntegrityError, match="sha256"):
        ensure_model(tmp_path / "bad", accept_license=True, base_url=server.url, files=unpinned)
    assert not (tmp_path / "bad" / "model.pth").exists()

    server = serve(files, linked_etags=etags)
    ensure_model(tmp_path / "good", accept_license=True, base_url=server.url, files=unpinned)
    assert _checkpoint_files(tmp_path / "good") == files


def test_broken_download_keeps_part_and_resumes(serve, tmp_path: Path) -> None:
    files = _small_files(model_size=2_000_000)
    cut = 700_000
    server = serve(files, cut_after={"model.pth": cut})
    with pytest.raises(ModelUnavailableError, match="resumes"):
        ensure_model(tmp_path, accept_license=True, base_url=server.url, files=_manifest(files))
    assert (tmp_path / "model.pth.part").stat().st_size == cut
    assert missing_model_files(tmp_path) == ["model.pth"]

    server.state.requests.clear()
    ensure_model(tmp_path, accept_license=True, base_url=server.url, files=_manifest(files))
    assert server.state.requests == [("model.pth", f"bytes={cut}-")]
    assert server.state.bytes_sent["model.pth"] == cut + (len(files["model.pth"]) - cut)  # no byte twice
    assert _checkpoint_files(tmp_path) == files
    assert not (tmp_path / "model.pth.part").exists()


def test_server_without_range_support_restarts_from_zero(serve, tmp_path: Path) -> None:
    files = _small_files()
    (tmp_path / "model.pth.part").write_bytes(b"stale bytes that must not survive")
    server = serve(files, ranges=False)
    ensure_model(tmp_path, accept_license=True, base_url=server.url, files=_manifest(files))
    assert _checkpoint_files(tmp_path) == files


def test_complete_part_from_a_killed_run_is_used(serve, tmp_path: Path) -> None:
    files = _small_files()
    for name, data in files.items():
        (tmp_path / f"{name}.part").write_bytes(data)
    server = serve(files)
    ensure_model(tmp_path, accept_license=True, base_url=server.url, files=_manifest(files))
    assert server.state.requests == []
    assert _checkpoint_files(tmp_path) == files


def test_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ModelUnavailableError) as info:
        ensure_model(
            tmp_path / "xtts", accept_license=True, base_url=f"http://127.0.0.1:{port}/x", timeout=5,
            files=_manifest(_small_files()),
        )  # fmt: skip
    message = str(info.value)
    assert "could not be reached" in message and str(tmp_path / "xtts") in message
    assert "offline-tts random-model" in message
    assert missing_model_files(tmp_path / "xtts") == list(REQUIRED_FILES)


def test_missing_file_on_server(serve, tmp_path: Path) -> None:
    files = _small_files()
    server = serve({name: data for name, data in files.items() if name != "vocab.json"})
    with pytest.raises(ModelUnavailableError, match="HTTP 404"):
        ensure_model(tmp_path, accept_license=True, base_url=server.url, files=_manifest(files))
    assert not (tmp_path / "vocab.json").exists()
