"""HTTP middleware: request id + access log + metrics, CORS, the optional API key, the body size limit,
HEAD wherever GET works.

All are plain ASGI middleware (no BaseHTTPMiddleware), so streamed responses pass through untouched
and the per-request record lives exactly as long as the response, body included.
Order, outermost first: request context -> CORS -> API key -> body limit -> HEAD as GET -> routes.
(Request header size is bounded earlier, in the HTTP protocol: api/header_limits.py.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from ..errors import Unauthorized
from ..metrics import Metrics
from ..telemetry import end_record, start_record
from .errors import error_body, error_response

access_log = logging.getLogger("offline_tts.access")
log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_GOOD_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:=+/-]{1,128}$")  # anything else could forge log lines
QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes: logged at DEBUG
UPLOAD_FILES_PER_REQUEST = 10  # a multipart request may carry this many maximum-size files


def route_path(scope: Scope) -> str:
    """The request path without the mount prefix (root_path), as the routes see it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def printable(text: str | None, limit: int = 300) -> str | None:
    """A path from the URL, safe for a log line: control characters (%0A...) escaped, length capped."""
    if text is None:
        return None
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def log_value(value: object) -> str:
    """key=value text: values with spaces, quotes or '=' are JSON-quoted, so a line parses one way only."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ' "=') or not text else text


def route_label(scope: Scope) -> str:
    """The matched route's template (`/api/voices/{name}`), never the raw path: bounded label values.
    Requests that no route handled (404, or refused before routing: 401, 413) count as "unmatched"."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


PUBLIC_LISTS = frozenset({"/v1/models", "/v1/audio/voices", "/v1/audio/models"})


def is_public(method: str, path: str, public_lists: bool = False) -> bool:
    """Liveness, and the web page's static shell (it holds no data; it is where the user types the key).
    With public_lists, the OpenAI model and voice lists too: names are no secret, and Open WebUI asks
    for them without the key (it then shows OpenAI's voices instead of this service's)."""
    if path == "/health":
        return True
    if method not in ("GET", "HEAD"):
        return False
    return path == "/ui" or path.startswith("/ui/") or (public_lists and path in PUBLIC_LISTS)


def connection_closer(receive: Receive) -> Callable[[], None] | None:
    """A way to close the client's connection at once, unsent bytes dropped, or None where the server
    offers none. ASGI has no such message; uvicorn's `receive` belongs to the request cycle, which holds
    the connection's transport (so this must see uvicorn's own `receive`: the outermost middleware)."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    return abort if callable(abort) else None


class RequestContextMiddleware:
    """Request id in and out, one access-log line and the metrics per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _GOOD_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id for routes
        scope["state"]["close_connection"] = connection_closer(receive)  # for streams whose client stops reading
        record, token = start_record(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if response_started:  # nothing sensible can be sent any more; the server closes the connection
                raise
            # Answer here rather than in Starlette's outer error handler, so the 500 carries the request id too.
            log.exception("Unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
            body = error_body("Internal server error.", "internal_error", error_type="server_error",
                              hint=f"Retry; if it keeps failing, check the server log for request {request_id}.")
            await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            route = route_label(scope)
            if self.metrics is not None:
                self.metrics.observe_request(scope.get("method", "?"), route, status, duration, record)
            self._log(scope, route, status, duration, record)
            end_record(token)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One WebSocket connection: a request id, one access-log line when it ends (status 101 once accepted,
        else the refusal's status: 403 for a close before accept) and the metrics, like an HTTP request."""
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _GOOD_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        record, token = start_record(request_id)
        started = time.perf_counter()
        status = 500  # nothing sent: the app failed before answering (the server then refuses the upgrade)

        async def send_tracked(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "websocket.accept":
                status = 101
                headers = list(message.get("headers") or [])
                message = {**message, "headers": headers + [(REQUEST_ID_HEADER.lower().encode(), request_id.encode())]}
            elif kind == "websocket.http.response.start":
                status = message["status"]
            elif kind == "websocket.close" and status != 101:
                status = 403  # closed before accept: the server answers the upgrade with 403
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            log.exception("Unhandled error on WebSocket %s (request %s)", scope.get("path"), request_id)
        finally:
            duration = time.perf_counter() - started
            route = route_label(scope)
            if self.metrics is not None:
                self.metrics.observe_request("WS", route, status, duration, record)
            self._log({**scope, "method": "WS"}, route, status, duration, record)
            end_record(token)

    @staticmethod
    def _log(scope: Scope, route: str, status: int, duration: float, record) -> None:
        stats = record.stats
        ttfa = stats.first_audio_s if stats is not None else None
        client = scope.get("client")
        fields = {
            "request_id": record.request_id,
            "method": scope.get("method"),
            "path": printable(scope.get("path")),
            "route": route,
            "status": status,
            "voice": record.voice,
            "language": record.language,
            "characters": record.characters,
            "audio_seconds": round(record.audio_seconds, 3) if record.audio_seconds is not None else None,
            "ttfa_seconds": round(ttfa, 3) if ttfa is not None else None,
            "duration_seconds": round(duration, 3),
            "client": client[0] if client else None,
            **record.extra,
        }
        message = "request " + " ".join(f"{k}={log_value(v)}" for k, v in fields.items() if v is not None)
        level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        access_log.log(level, message, extra=fields)


class ApiKeyMiddleware:
    """When an API key is configured, every route but liveness (and the UI's static page) needs it."""

    def __init__(self, app: ASGIApp, api_key: str, public_lists: bool = False):
        self.app = app
        self.public_lists = public_lists
        # Compare digests: constant time, and equal lengths, so not even the key's length leaks.
        self._digest = hashlib.sha256(api_key.encode()).digest()

    def authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return self.matches(token)

    def matches(self, key: str) -> bool:
        return secrets.compare_digest(hashlib.sha256(key.strip().encode()).digest(), self._digest)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket's key, checked before the upgrade is accepted: `Authorization: Bearer`, `xi-api-key`
        (ElevenLabs clients) or the `api_key` query parameter (browsers cannot set headers). A wrong key is
        refused at once (HTTP 401). Without any, the route takes it from the first message (ElevenLabs'
        `xi_api_key` field): `scope["state"]["check_api_key"]` is then set, and a connection without it is closed."""
        headers = Headers(scope=scope)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = []
        if "authorization" in headers:
            scheme, _, token = headers["authorization"].partition(" ")
            given.append(token if scheme.lower() == "bearer" else "")
        given += [headers[name] for name in ("xi-api-key",) if name in headers]
        given += [value for name in ("api_key", "xi_api_key") for value in query.get(name, [])]
        if not given:
            scope.setdefault("state", {})["check_api_key"] = self.matches
            await self.app(scope, receive, send)
            return
        if all(key.strip() and self.matches(key) for key in given):
            await self.app(scope, receive, send)
            return
        exc = Unauthorized("Invalid API key.", "Send the key set as TTS_API_KEY on the server: header "
                           "'Authorization: Bearer <key>' or 'xi-api-key: <key>', or the query parameter api_key=<key>.")
        if "websocket.http.response" in scope.get("extensions", {}):
            await error_response(exc)(scope, receive, send)  # a real HTTP 401 with the JSON envelope
        else:  # the server cannot answer the upgrade with a body: 403 (close before accept)
            await send({"type": "websocket.close", "code": 1008, "reason": exc.message})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] == "http" and not is_public(scope.get("method", ""), route_path(scope), self.public_lists):
            headers = Headers(scope=scope)
            if not self.authorized(headers):
                missing = "authorization" not in headers
                exc = Unauthorized(
                    "This server needs an API key." if missing else "Invalid API key.",
                    "Send the header 'Authorization: Bearer <key>' with the key set as TTS_API_KEY on the server "
                    "(OpenAI clients: pass it as api_key).",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over the limit: at once by Content-Length, or as soon as a chunked body exceeds it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_body_bytes: int):
        self.app = app
        self.max_body = max_body_bytes
        self.max_upload = max_upload_body_bytes

    def _too_large(self, limit: int, upload: bool) -> HTTPException:
        what = "upload" if upload else "request body"
        setting = "TTS_MAX_UPLOAD_BYTES (per file)" if upload else "TTS_MAX_BODY_BYTES"
        return HTTPException(413, f"The {what} is larger than the limit of {limit} bytes. Raise {setting} if needed.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        upload = headers.get("content-type", "").lower().startswith("multipart/")
        limit = self.max_upload if upload else self.max_body
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            exc = self._too_large(limit, upload)
            body = error_body(exc.detail, "request_too_large", hint="Send a smaller body.")
            await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body that never said its size
                    raise self._too_large(limit, upload)
            return message

        await self.app(scope, counting_receive, send)


class HeadAsGetMiddleware:
    """HEAD is answered wherever GET is: the GET route runs and only its status and headers are sent.

    HTTP requires HEAD wherever GET works (uptime checkers use it), but FastAPI's routes list only GET.
    The routes see GET (a copy of the scope); the outer middleware keep seeing HEAD and the matched route."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, send_without_body)
        finally:
            if "route" in as_get:  # for the access log and the metrics' route label
                scope["route"] = as_get["route"]


def install_middleware(app: FastAPI, settings: Settings, metrics: Metrics | None) -> None:
    """Add the middleware in order (Starlette wraps the last added outermost)."""
    upload_limit = settings.max_upload_bytes * UPLOAD_FILES_PER_REQUEST + settings.max_body_bytes
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, max_upload_body_bytes=upload_limit)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, public_lists=settings.public_lists)
    if settings.cors_origins:  # closed by default: no CORS headers at all
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
