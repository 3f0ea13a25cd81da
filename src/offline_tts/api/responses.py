"""Responses that carry generated audio: how every route streams it, stops it and notices a client leaving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..service import SynthesisJob

log = logging.getLogger(__name__)
T = TypeVar("T")


class AudioStreamResponse(StreamingResponse):
    """A streaming response that always closes its body and releases its job, so generation stops
    and its slot in the batch is freed when the client leaves, even before the first chunk.

    A client that stops reading is dropped by the job's guard (too much audio waiting, or one write
    stalled too long: see stream_guard.py); its connection is then closed at once."""

    def __init__(self, content, job: SynthesisJob, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job
        self.headers["Content-Language"] = job.language  # the language spoken (e.g. the one detected)
        self._close_connection = None

    async def __call__(self, scope, receive, send) -> None:
        self._close_connection = scope.get("state", {}).get("close_connection")
        await super().__call__(scope, receive, send)

    async def stream_response(self, send) -> None:
        guard = self.job.guard
        try:
            if guard is None:
                await super().stream_response(send)
            else:
                await guard.run(super().stream_response, send)
        finally:
            self.job.release()
            await self.body_iterator.aclose()
        if guard is not None and guard.reason is not None and self._close_connection is not None:
            # Not a graceful close: that would wait for the unread bytes to drain, i.e. forever.
            self._close_connection()


async def encoded_stream(data: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async with contextlib.aclosing(data):
            async for part in data:
                yield part
    except Exception as exc:  # headers are gone: all we can do is end the stream early
        log.error("Stream ended early: %s", exc)


async def unless_client_leaves(request: Request, job: SynthesisJob, work: Awaitable[T]) -> T:
    """Await `work` (the job's synthesis) while watching the connection: a client that hangs up cancels
    the job, so its slot and place are freed at the next audio token, not at the end of the text."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()  # the synthesis stops and raises RequestCancelled

    watcher = asyncio.create_task(watch())
    try:
        return await work
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
