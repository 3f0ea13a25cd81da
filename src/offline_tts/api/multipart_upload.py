"""The voice upload form, read as it arrives: python-multipart's parser writes each file part into a staging
folder, so a file over the size limit is refused as soon as it crosses it, not after it has been received,
and a bad name is refused before the (large) files after it are read."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from ..errors import TTSError, UploadTooLarge
from ..voices import AUDIO_EXTENSIONS, VoiceStore, disk_full_refused

FILE_FIELDS = frozenset({"files", "file", "files[]"})
_MAX_FIELD_BYTES = 1024
_MAX_FIELDS = 16
_DRAIN_BYTES = 8 * 1024 * 1024  # read (and drop) this much more after a refusal, so the client gets the answer


class BadUpload(TTSError):
    code = "invalid_upload"
    param = "files"


class UploadReader:
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


async def _read_form(request: Request, reader: UploadReader) -> None:
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


def as_bool(value: str | None, param: str) -> bool:
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise BadUpload(f"Invalid value {text[:20]!r} for {param!r}.", "Use true or false.", param=param)


async def receive_upload(request: Request, staging: Path, max_file_bytes: int, max_files: int) -> UploadReader:
    """The form, its files written into `staging`/clips as they arrive."""
    clips_dir = staging / "clips"
    clips_dir.mkdir()
    reader = UploadReader(clips_dir, max_file_bytes, max_files)
    await _read_form(request, reader)
    return reader
