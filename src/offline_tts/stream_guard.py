"""Bounds on what one stream may cost while its client does not read.

A client that opens a stream and then stops reading (or reads a trickle) must not hold the service. The
scheduler frees a sentence's slot as soon as it is generated (engine/scheduler.py); this guard then drops the
stream when
- more than `max_buffer_seconds` of generated audio wait unread (made but not yet taken by the
  connection), or
- one write to the connection waits longer than `stall_seconds` (the client took nothing meanwhile).
Dropping cancels the synthesis (the engine stops at its next step) and stops the response, whose
connection is then closed. The service counts and logs each drop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

Send = Callable[[dict[str, Any]], Awaitable[None]]

BUFFER = "buffer"  # too much audio waiting unread
STALL = "stall"  # one write waited too long
REASONS = (BUFFER, STALL)


class StreamGuard:
    def __init__(self, cancel: threading.Event, sample_rate: int, max_buffer_seconds: float, stall_seconds: float,
                 on_drop: Callable[[str], None] | None = None):
        self._loop = asyncio.get_running_loop()
        self._cancel = cancel
        self._max_buffer = int(max_buffer_seconds * sample_rate) if max_buffer_seconds > 0 else None
        self._stall_seconds = stall_seconds if stall_seconds > 0 else None
        self._on_drop = on_drop
        self._stop_response: Callable[[], None] | None = None
        # Two counters, each written by one side only (no lock needed): the generating thread adds what it
        # makes, the event loop what the connection took.
        self.produced = 0
        self.taken = 0
        self.reason: str | None = None  # why the stream was dropped; None while it is not

    @property
    def waiting_samples(self) -> int:
        return self.produced - self.taken

    # -- the generating thread ---------------------------------------------------------------------
    def made(self, samples: int) -> None:
        """Audio generated for the stream (called from the generating thread)."""
        self.produced += samples
        if self._max_buffer is not None and self.waiting_samples > self._max_buffer and not self._cancel.is_set():
            self._cancel.set()  # stop generating at once; the rest happens on the event loop
            self._loop.call_soon_threadsafe(self.drop, BUFFER)

    # -- the event loop ----------------------------------------------------------------------------
    def took(self, samples: int) -> None:
        """Audio taken by the response (on its way to the client)."""
        self.taken += samples

    def drop(self, reason: str) -> None:
        """Give up on the stream: cancel its synthesis and stop its response (once)."""
        if self.reason is not None:
            return
        self.reason = reason
        self._cancel.set()
        if self._on_drop is not None:
            self._on_drop(reason)
        if self._stop_response is not None:
            self._stop_response()

    async def run(self, respond: Callable[[Send], Awaitable[None]], send: Send) -> None:
        """Run `respond(send)` (a response's body loop) under the guard. Returns early, without an error,
        when the stream is dropped; `reason` then says why."""
        with anyio.CancelScope() as scope:
            self._stop_response = scope.cancel
            if self.reason is not None:
                scope.cancel()
            await respond(self._bounded(send))
        self._stop_response = None

    def _bounded(self, send: Send) -> Send:
        async def bounded_send(message: dict[str, Any]) -> None:
            with anyio.move_on_after(self._stall_seconds):
                await send(message)
                return
            self.drop(STALL)

        return bounded_send
