"""Domain errors: each knows its HTTP status, a stable code, what went wrong and how to fix it.

The engine and the stores raise these; the HTTP layer only renders them.
"""

from __future__ import annotations

import re


class TTSError(Exception):
    status_code = 400
    code = "bad_request"
    error_type = "invalid_request_error"  # OpenAI's error `type`
    param: str | None = None
    retry_after: int | None = None  # seconds after which a retry may succeed (HTTP: the Retry-After header)

    def __init__(self, message: str, hint: str = "", *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if param is not None:
            self.param = param
        self.headers = headers or {}  # set by the HTTP layer only (e.g. WWW-Authenticate)


class InvalidText(TTSError):
    code = "invalid_text"
    param = "text"


class TextTooLong(InvalidText):
    status_code = 413
    code = "text_too_long"


class UnsupportedLanguage(TTSError):
    code = "unsupported_language"
    param = "language"


class UnsupportedFormat(TTSError):
    code = "unsupported_format"
    param = "response_format"


class VoiceNotFound(TTSError):
    status_code = 404
    code = "voice_not_found"
    param = "voice"


class InvalidVoiceName(TTSError):
    code = "invalid_voice_name"
    param = "voice"


class NoVoice(TTSError):
    code = "no_voice"
    param = "voice"


class VoiceExists(TTSError):
    status_code = 409
    code = "voice_exists"
    param = "name"


class InvalidAudio(TTSError):
    status_code = 422
    code = "invalid_audio"
    param = "voice"


class UploadTooLarge(TTSError):
    status_code = 413
    code = "upload_too_large"
    param = "files"


class ModelNotReady(TTSError):
    status_code = 503
    code = "model_not_ready"
    error_type = "server_error"
    retry_after = 5


class Busy(TTSError):
    status_code = 503
    code = "busy"
    error_type = "server_error"
    retry_after = 2


class SynthesisFailed(TTSError):
    status_code = 500
    code = "synthesis_failed"
    error_type = "server_error"


class Unauthorized(TTSError):
    status_code = 401
    code = "unauthorized"
    error_type = "authentication_error"


class InsufficientStorage(TTSError):
    status_code = 507
    code = "insufficient_storage"
    error_type = "server_error"


# An absolute filesystem path inside an exception's text: two or more components after a leading "/",
# at the start or after a space, quote, parenthesis, colon or "=".
_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s'"(=:]))/[^\s'"()/]+(?:/[^\s'"(),;]*)+""")


def without_paths(text: str) -> str:
    """`text` (e.g. an exception's message shown to a client) with absolute paths reduced to their last
    component, so API clients do not learn the server's filesystem layout."""
    return _PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


class RequestCancelled(TTSError):
    """The client hung up while its request was being served (logged as 499, nginx's "client closed request")."""

    status_code = 499
    code = "client_closed_request"
