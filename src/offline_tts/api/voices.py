"""Voice management over HTTP: list, upload (checked, conditioned, then stored atomically), delete.

Uploads are streamed straight from the request into a staging folder with python-multipart's parser,
so a file over the size limit is refused as soon as it crosses it, not after it has been received.
Nothing reaches the voices directory before the clips are known to be decodable, long enough and
usable for conditioning; a refused upload leaves nothing behind, neither in the voices directory nor
in the cache (a full disk is a 507).
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from .. import audio
from ..errors import InvalidAudio, TTSError, UploadTooLarge, VoiceNotFound
from ..service import TTSService
from ..voices import AUDIO_EXTENSIONS, Voice, VoiceStore, disk_full_refused
from .deps import get_service
from .middleware import UPLOAD_FILES_PER_REQUEST

log = logging.getLogger(__name__)
router = APIRouter()

FILE_FIELDS = frozenset({"files", "file", "files[]"})
_MAX_FIELD_BYTES = 1024
_MAX_FIELDS = 16
_DRAIN_BYTES = 8 * 1024 * 1024  # read (and drop) this much more after a refusal, so the client gets the answer
_PROBE_CACHE_SIZE = 2048


class BadUpload(TTSError):
    code = "invalid_upload"
    param = "files"


# -- listing ---------------------------------------------------------------------------------------
_probe_cache: dict[tuple[str, int, int], audio.AudioInfo | str] = {}


def _probe_cached(path: Path) -> audio.AudioInfo | str:
    """ffprobe once per file version (path, size, mtime); an unreadable clip gives its error message."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _probe_cache:
        if len(_probe_cache) >= _PROBE_CACHE_SIZE:
            _probe_cache.clear()
        try:
            _probe_cache[key] = audio.probe(path)
        except TTSError as exc:
            _probe_cache[key] = exc.message
    return _probe_cache[key]


def describe(voice: Voice, store: VoiceStore, service: TTSService) -> dict:
    """name, files, duration_s (all clips), sample_rate and channels (of the first clip), cached."""
    root = store.real_root
    infos, errors = [], []
    for path in voice.files:
        info = _probe_cached(path)
        (errors if isinstance(info, str) else infos).append(info)
    first = infos[0] if infos else None
    model_id = service.model_id
    item = {
        "name": voice.name,
        "files": [p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name for p in voice.files],
        "duration_s": round(sum(i.duration_s for i in infos), 3) if infos else None,
        "sample_rate": first.sample_rate if first else None,
        "channels": first.channels if first else None,
        "cached": bool(model_id) and service.cache.is_cached(voice, model_id),
        "language": None,  # the voice's own language (its settings file); None: the default language
    }
    try:
        item["language"] = service.voice_language(voice) if service.ready else store.language(voice)
    except TTSError as exc:
        errors.append(exc.message)
    if errors:
        item["error"] = "; ".join(errors)
    return item


@router.get("/api/voices", summary="List the voices with their clips, duration, format and cache state")
async def list_voices(service: TTSService = Depends(get_service)) -> dict:
    store = service.voices

    def collect() -> list[dict]:
        items = []
        for voice in store.list():
            try:
                items.append(describe(voice, store, service))
            except FileNotFoundError:  # deleted since the folder was listed: it is gone, not an error
                continue
        return items

    return {"voices": await asyncio.to_thread(collect)}


# -- upload ----------------------------------------------------------------------------------------
class _UploadReader:
    """python-multipart callbacks that write file parts into `dest` and keep small text fields."""

    def __init__(self, dest: Path, max_file_bytes: int, max_files: int):
        self.dest = dest
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.fields: dict[str, str] = {}
        self.files: list[tuple[str, Path]] = []  # (name given by the client, staged path)
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""
        self._field: str | None = None
        self._label = ""
        self._data = bytearray()
        self._out = None
        self._size = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
            "on_part_data": self._part_data, "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._field, self._out, self._size = b"", None, None, 0
        self._data = bytearray()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._field = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
            if len(self.fields) >= _MAX_FIELDS:
                raise BadUpload("Too many form fields.", "Send 'name', 'files' and optionally 'replace' and 'language'.")
            return
        if self._field not in FILE_FIELDS:
            raise BadUpload(f"Unexpected file field {self._field[:40]!r}.", "Send the clips in the 'files' field.")
        if len(self.files) >= self.max_files:
            raise BadUpload(f"Too many files: at most {self.max_files} clips per voice.", "Send fewer clips.")
        self._label = Path(filename.decode("utf-8", "replace").replace("\\", "/")).name[:120] or "upload"
        suffix = Path(self._label).suffix.lower()
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(self._label).stem)[:40].strip("_") or "clip"
        path = self.dest / f"{len(self.files) + 1:02d}_{stem}{suffix if suffix in AUDIO_EXTENSIONS else '.upload'}"
        with disk_full_refused():
            self._out = path.open("xb")
        self.files.append((self._label, path))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is None:
            if self._field in FILE_FIELDS:
                return
            self._data += data[start:end]
            if len(self._data) > _MAX_FIELD_BYTES:
                raise BadUpload(f"Form field {self._field[:40]!r} is too long.", "Form fields are short text values.",
                                param=self._field)
            return
        self._size += end - start
        if self._size > self.max_file_bytes:
            raise UploadTooLarge(f"'{self._label}' is larger than the limit of {self.max_file_bytes} bytes.",
                                 "A 5-15 s clip is plenty (a few hundred KB as MP3); or raise TTS_MAX_UPLOAD_BYTES.")
        with disk_full_refused():
            self._out.write(data[start:end])

    def _part_end(self) -> None:
        if self._out is not None:
            self.close()
        elif self._field is not None and self._field not in FILE_FIELDS:
            self.fields[self._field] = self._data.decode("utf-8", "replace")
            if self._field == "name":  # refuse a bad name before reading the (large) files after it
                VoiceStore.check_upload_name(self.fields["name"])

    def close(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            with disk_full_refused():  # closing flushes the last buffered bytes
                out.close()


async def _read_upload(request: Request, reader: _UploadReader) -> None:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise BadUpload("Expected a multipart/form-data body.",
                        "Send a form: curl -F name=ana -F files=@ana.wav http://HOST/api/voices")
    parser = MultipartParser(boundary, reader.callbacks())
    stream = request.stream()
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
        if parser.state != MultipartState.END:  # python-multipart's finalize() does not check this
            raise BadUpload("The upload is incomplete: the body ended before the form's closing boundary.",
                            "The connection was probably cut: send the whole form again.")
    except MultipartParseError as exc:
        raise BadUpload(f"Malformed multipart body: {exc}.", "Send a form with 'name' and 'files'.") from None
    except TTSError:
        # Read a little more so that a client still sending gets the answer instead of a reset.
        drained = 0
        try:
            async for chunk in stream:
                drained += len(chunk)
                if drained > _DRAIN_BYTES:
                    break
        except Exception:  # noqa: BLE001 - the refusal is what matters
            pass
        raise
    finally:
        reader.close()


def _as_bool(value: str | None, param: str) -> bool:
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise BadUpload(f"Invalid value {text[:20]!r} for {param!r}.", "Use true or false.", param=param)


async def _receive(request: Request, staging: Path, max_file_bytes: int) -> _UploadReader:
    """The form, its files written into `staging`/clips as they arrive."""
    clips_dir = staging / "clips"
    clips_dir.mkdir()
    reader = _UploadReader(clips_dir, max_file_bytes, UPLOAD_FILES_PER_REQUEST)
    await _read_upload(request, reader)
    return reader


async def _condition(service: TTSService, staged: Voice, labels: list[str]) -> None:
    """Decode, check for silence, compute and cache the latents; errors name the uploaded files."""
    try:
        await service.conditioning(staged)
    except InvalidAudio as exc:  # name the uploaded file, not its staged copy
        for label, path in zip(labels, staged.files, strict=True):
            exc.message = exc.message.replace(f"'{path.name}'", f"'{label}'")
        exc.param = "files"
        raise


def _digests_if_present(service: TTSService, voice: Voice) -> list[str] | None:
    try:
        return service.cache.clip_digests(voice)
    except VoiceNotFound:  # deleted meanwhile: nothing of it to release later
        return None


async def _condition_and_commit(service: TTSService, name: str, clips: list[Path], labels: list[str],
                                staging: Path, replace: bool) -> tuple[Voice, bool]:
    """Condition the staged voice, then move it into place; returns it and whether it replaced one.
    Any refusal on the way (a silent clip, the name taken meanwhile, a full disk...) releases the cache
    entries made for it, and a replaced voice's entries go too (unless another voice uses them)."""
    store, cache = service.voices, service.cache
    staged = Voice(name, tuple(clips), is_folder=len(clips) > 1)
    digests = await asyncio.to_thread(cache.clip_digests, staged)
    try:
        await _condition(service, staged, labels)
        old = [v for v in await asyncio.to_thread(store.list) if v.name == name] if replace else []
        old_digests = [await asyncio.to_thread(_digests_if_present, service, v) for v in old]
        voice = await asyncio.to_thread(store.commit, name, clips, staging, replace)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(cache.release, digests))  # even when the client went away
        raise
    for previous in old_digests:
        if previous is not None:
            await asyncio.to_thread(cache.release, previous)
    return voice, bool(old)


@router.post("/api/voices", status_code=201, summary="Upload a voice: one clip, or several clips of one speaker",
             responses={201: {"description": "Stored and conditioned, ready to use"}})
async def upload_voice(request: Request, service: TTSService = Depends(get_service)) -> JSONResponse:
    """Multipart form: `name` (letters, digits, `_`, `-`), `files` (one or more clips, any format ffmpeg
    reads, 5-15 s ideal), `replace` (true to overwrite an existing voice) and `language` (optional: the
    voice's own language, used when a request names none; `auto` detects it from each text)."""
    # Conditioning uses the model: the upload takes a place in the line like a synthesis, before its body
    # is read, so a refused upload (503 + Retry-After) reads and stores nothing.
    async with service.admission():
        return await _store_upload(request, service)


async def _store_upload(request: Request, service: TTSService) -> JSONResponse:
    settings, store = service.settings, service.voices
    with store.staging() as staging, disk_full_refused():
        reader = await _receive(request, staging, settings.max_upload_bytes)
        name = store.check_upload_name(reader.fields.get("name", ""))
        replace = _as_bool(reader.fields.get("replace"), "replace")
        language = reader.fields.get("language", "").strip() or None
        if language:  # the voice's own language: requests without one speak it ("auto": detect)
            language = service.check_language(language)
        if not reader.files:
            raise BadUpload("No audio file in the upload.", "Send one or more clips in the 'files' field.")
        store.check_new(name, replace)
        service.require_pool()  # conditioning needs the model: refuse before the slow checks

        def check_all() -> list[Path]:
            return [store.check_clip_file(path, label, settings.min_clip_seconds, settings.max_clip_seconds)
                    for label, path in reader.files]

        clips = await asyncio.to_thread(check_all)
        labels = [label for label, _ in reader.files]
        voice, replaced = await _condition_and_commit(service, name, clips, labels, staging, replace)
        if language:
            await asyncio.to_thread(store.save_language, name, language)
    log.info("Voice %r stored (%d clip(s))%s", name, len(clips), " replacing the old one" if replaced else "")
    return JSONResponse({"voice": await asyncio.to_thread(describe, voice, store, service)}, status_code=201)


@router.delete("/api/voices/{name}", summary="Delete a voice: its clip(s) and its cached conditioning")
async def delete_voice(name: str, service: TTSService = Depends(get_service)) -> dict:
    store = service.voices
    voice = store.resolve(name)
    digests = await asyncio.to_thread(service.cache.clip_digests, voice)  # hashes the clips: before they are gone
    removed = await asyncio.to_thread(store.delete, name)
    # After the clips are gone: a conditioning of this voice still running sees them gone and cleans up
    # itself, or wrote its entries before this releases them (latents and decoded clips).
    await asyncio.to_thread(service.cache.release, digests)
    service.clear_default_voice_if(removed)
    log.info("Voice %r deleted", removed.name)
    return {"status": "ok", "message": f"Voice {removed.name!r} deleted.", "deleted": removed.name}
