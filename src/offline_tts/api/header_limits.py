"""A bound on request headers, enforced while they are read (uvicorn's httptools parser has none).

httptools buffers a header of any size before a route, or the API key check, sees the request: one
64 MB header cost ~+65 MB RSS and stalled the event loop (and /health) for seconds. This protocol
counts header bytes as they arrive and answers 431 for everyone, key or not, once a request's
headers (request line included) pass TTS_MAX_HEADER_BYTES or TTS_MAX_HEADERS.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body

log = logging.getLogger(__name__)

_LINE_OVERHEAD = 4  # ": " and CRLF around each header
_LINGER_SECONDS = 2.0  # after a refusal, read and drop what the client still sends so it can read the answer


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing; httptools reports it as HttpParserCallbackError."""


class LimitedHeadersProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on header bytes and count (set by `limited_headers_protocol`)."""

    max_header_bytes = 16 * 1024
    max_headers = 100

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reading_headers = True  # True until a request's headers are complete, again once it ends
        self._message_ended = False
        self._header_bytes = 0  # counted from the parser's callbacks (completed pieces)
        self._unparsed_bytes = 0  # reads that ended inside the headers (what the parser buffers)
        self._header_count = 0
        self._refusal: tuple[str, str] | None = None  # (message, setting) once the request is refused

    # -- counting ---------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # lingering after a 431: drop the rest of the request
            return
        self._message_ended = False
        super().data_received(data)
        if self._refusal is None and self._reading_headers and not self._message_ended:
            # The whole read belongs to headers that are still incomplete: httptools holds it in memory.
            # (A read that also ended the previous request is left out: at most one read goes uncounted.)
            self._unparsed_bytes += len(data)
            if self._unparsed_bytes > self.max_header_bytes:
                self._refuse(self._size_message())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._header_bytes = self._unparsed_bytes = self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refusal = (f"The request has more than {self.max_headers} headers.", "TTS_MAX_HEADERS")
            raise _HeadersTooLarge
        self._count(len(name) + len(value) + _LINE_OVERHEAD)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading_headers = self._message_ended = True
        super().on_message_complete()

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            self._refusal = self._size_message()
            raise _HeadersTooLarge

    def _size_message(self) -> tuple[str, str]:
        return f"The request headers are larger than the limit of {self.max_header_bytes} bytes.", "TTS_MAX_HEADER_BYTES"

    # -- refusing ---------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; ours when the error was a callback refusing the headers."""
        if self._refusal is not None:
            self._refuse(self._refusal)
        else:
            super().send_400_response(msg)

    def _refuse(self, refusal: tuple[str, str]) -> None:
        self._refusal = refusal
        message, setting = refusal
        log.warning("Refused a request from %s with 431: %s", self.client[0] if self.client else "?", message)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined request while a response is under way: no place to answer
            return
        body = json.dumps(error_body(
            message, "headers_too_large",
            hint=f"Send fewer or smaller headers (the server's limit is set by {setting}).")).encode()
        head = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n"
                b"connection: close\r\n\r\n")
        self.transport.write(head + body)
        # Half-close and keep reading for a moment: closing with unread input would reset the connection
        # and the client could lose the answer.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(_LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


def limited_headers_protocol(max_header_bytes: int, max_headers: int) -> type[LimitedHeadersProtocol]:
    """The protocol class to give uvicorn.Config(http=...), with these limits."""
    return type("LimitedHeadersProtocol", (LimitedHeadersProtocol,),
                {"max_header_bytes": max_header_bytes, "max_headers": max_headers})

