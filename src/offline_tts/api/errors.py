"""Render every failure as JSON saying what is wrong and how to fix it; never a stack trace.

One envelope serves every route, and it is OpenAI's, so OpenAI clients understand it:
`{"error": {"message", "type", "param", "code", "hint"}}`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import TTSError

log = logging.getLogger(__name__)


def error_body(message: str, code: str, *, error_type: str = "invalid_request_error", param: str | None = None,
               hint: str = "") -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code, "hint": hint}}


def error_headers(exc: TTSError) -> dict[str, str]:
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return headers


def error_response(exc: TTSError) -> JSONResponse:
    body = error_body(exc.message, exc.code, error_type=exc.error_type, param=exc.param, hint=exc.hint)
    return JSONResponse(body, status_code=exc.status_code, headers=error_headers(exc))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form")]
        field = ".".join(loc) or "body"
        param = param or field
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TTSError)
    async def _tts_error(request: Request, exc: TTSError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request", param=param,
                                       hint="Check the request against the API docs at /docs."), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code, "http_error")
        hint = "See the API docs at /docs." if exc.status_code in (404, 405) else ""
        return JSONResponse(error_body(str(exc.detail), code, hint=hint), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("Internal server error.", "internal_error", error_type="server_error",
                                       hint="Retry; if it keeps failing, check the server log."), status_code=500)
