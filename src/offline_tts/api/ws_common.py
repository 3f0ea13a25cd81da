"""What the WebSocket routes for text in pieces share (the native /api/tts/ws and the ElevenLabs-compatible
stream-input): the per-connection limits, the key from the first message, one audio encoder per connection,
the pump that turns a SpeechSession's events into messages, and the connection's access-log line and metrics.

A route subclasses `SpeechConnection` with its protocol: how the first message opens the session
(`start`), what a later message does (`handle`), and the shapes it sends (`on_event`, `deliver`,
`on_end`, `error_message`). Everything here is protocol parsing and calls to the service (no torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from starlette.websockets import WebSocket, WebSocketState

from .. import audio, encoders, telemetry
from ..config import Settings
from ..encoders import AudioFormat
from ..errors import TTSError
from ..metrics import Metrics
from ..service import TTSService
from ..telemetry import Stats
from ..speech_session import Cancelled, SentenceDone, SentenceFailed, SentenceStarted, SpeechSession

log = logging.getLogger(__name__)

NORMAL, GOING_AWAY, UNSUPPORTED_DATA, POLICY, TOO_BIG, SERVER_ERROR, TRY_AGAIN = 1000, 1001, 1003, 1008, 1009, 1011, 1013
_ENCODER_QUEUE = 32  # chunks waiting for ffmpeg: back-pressure, so a slow encoder slows the pump


class Refusal(Exception):
    """Ends the connection: an error message in the protocol's shape, then a close with `close_code`."""

    def __init__(self, code: str, message: str, hint: str = "", close_code: int = POLICY,
                 error_type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint
        self.close_code, self.error_type, self.param = close_code, error_type, param

    @classmethod
    def from_error(cls, exc: TTSError) -> Refusal:
        close = TRY_AGAIN if exc.status_code == 503 else SERVER_ERROR if exc.status_code >= 500 else POLICY
        return cls(exc.code, exc.message, exc.hint, close, exc.error_type, exc.param)

    def envelope(self) -> dict:
        """The service's error envelope (api/errors.py)."""
        return {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code,
                "hint": self.hint}

    @property
    def reason(self) -> str:
        """The close frame's reason (at most 123 bytes)."""
        return self.message.encode()[:123].decode(errors="ignore")


class ClientGone(Exception):
    """The client vanished (closed, reset, or stopped reading): nothing more can be sent."""


def error_envelope(exc: TTSError) -> dict:
    return Refusal.from_error(exc).envelope()


class AudioOut:
    """One encoder per connection: float32 chunks at the engine rate in, the format's bytes out (to
    `deliver`). Raw PCM at the engine rate (and WAV) are written here; every other format through one
    ffmpeg for the whole connection (encoders.py), which also resamples."""

    def __init__(self, fmt: AudioFormat, sample_rate: int, deliver: Callable[[bytes], Awaitable[None]]):
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._deliver = deliver
        self._direct = not fmt.ffmpeg_args
        self._header_sent = fmt.name != "wav"
        self._queue: asyncio.Queue[np.ndarray | None] | None = None
        self._task: asyncio.Task | None = None

    async def write(self, chunk: np.ndarray) -> None:
        if self._direct:
            if not self._header_sent:
                self._header_sent = True
                await self._deliver(audio.wav_header(self.sample_rate))
            await self._deliver(audio.to_pcm16(chunk))
            return
        if self._task is None:
            self._queue = asyncio.Queue(_ENCODER_QUEUE)
            self._task = asyncio.create_task(self._encode(), name=f"ws-encoder-{self.fmt.name}")
        if self._task.done():
            self._task.result()  # ffmpeg failed: raise its error
        await self._queue.put(chunk)

    async def _encode(self) -> None:
        async def source() -> AsyncIterator[np.ndarray]:
            while (chunk := await self._queue.get()) is not None:
                yield chunk

        async with contextlib.aclosing(encoders.encode(source(), self.fmt, self.sample_rate)) as data:
            async for part in data:
                await self._deliver(part)

    async def finish(self) -> None:
        """End of input: the encoder's tail is written out (ffmpeg sees the end of its input)."""
        if self._task is not None:
            await self._queue.put(None)
            task, self._task = self._task, None
            await task

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class SpeechConnection:
    """One WebSocket connection speaking text that arrives in pieces (subclassed per protocol)."""

    route: str = "?"  # the route template, for metrics

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.service: TTSService = ws.app.state.service
        self.settings: Settings = ws.app.state.settings
        self.metrics: Metrics | None = getattr(ws.app.state, "metrics", None)
        self.idle_seconds = self.settings.ws_idle_seconds
        self.session: SpeechSession | None = None
        self.out: AudioOut | None = None
        self.input_closed = False
        self.characters = 0  # text received on the connection, all sessions together
        self.stats: Stats | None = None  # from the first sentence's completion to its first audio
        self._send_lock = asyncio.Lock()
        self._sentence_started: dict[int, float] = {}  # index -> when its text was complete
        self._first_audio: dict[int, float] = {}  # index -> seconds from then to its first audio
        self._current: int | None = None
        self.close_code = GOING_AWAY

    # -- the protocol (subclasses) ----------------------------------------------------------------
    async def start(self, message: dict) -> None:
        """Open `self.session` and `self.out` from the first message (raise Refusal or TTSError)."""
        raise NotImplementedError

    async def handle(self, message: dict) -> None:
        """A later message: call feed / flush / cancel / close_input (raise Refusal when malformed)."""
        raise NotImplementedError

    async def on_event(self, event: SentenceStarted | SentenceDone | SentenceFailed | Cancelled) -> None:
        pass

    async def deliver(self, data: bytes) -> None:
        """Encoded audio bytes for the client."""
        raise NotImplementedError

    async def on_end(self) -> None:
        """Everything was spoken after the end of input (then the connection closes normally)."""

    def error_message(self, refusal: Refusal) -> dict:
        raise NotImplementedError

    # -- helpers for the protocols ------------------------------------------------------------------
    def check_key(self, *candidates: object) -> None:
        """The key from the first message, when the API key middleware left it to the route (none was in
        the headers or the query)."""
        check = self.ws.scope.get("state", {}).get("check_api_key")
        if check is None:
            return
        for key in candidates:
            if isinstance(key, str) and key.strip():
                if check(key.removeprefix("Bearer ").strip()):
                    return
                raise Refusal("unauthorized", "Invalid API key.", "Send the key set as TTS_API_KEY on the server.",
                              POLICY, "authentication_error")
        raise Refusal("unauthorized", "This server needs an API key.",
                      "Send it as the header 'Authorization: Bearer <key>' or 'xi-api-key', the query parameter "
                      "api_key, or in the first message.", POLICY, "authentication_error")

    async def open_session(self, voice: str | None, language: str | None, speed: float, fmt: AudioFormat) -> None:
        self.session = await self.service.open_session(voice, language, speed, self.settings.ws_clause_chars)
        self.out = AudioOut(fmt, self.service.engine.sample_rate, self.deliver)
        telemetry.note(voice=self.session.voice.name, language=self.session.language)

    def feed(self, text: str, session: SpeechSession | None = None) -> None:
        if self.input_closed:
            raise Refusal("invalid_message", "Text after the end of input.", "Open a new connection for more text.")
        session = session or self.session
        if self.characters + len(text) > self.settings.ws_max_characters:
            raise Refusal("too_many_characters", f"This connection sent more than {self.settings.ws_max_characters} "
                          "characters in all.", "Open a new connection, or raise TTS_WS_MAX_CHARACTERS.")
        self.characters += len(text)
        session.feed(text)
        if self.buffered_chars() > self.settings.ws_max_buffered_chars:
            raise Refusal("buffer_full", f"More than {self.settings.ws_max_buffered_chars} characters wait to be "
                          "spoken.", "Send text about as fast as it is spoken, or raise TTS_WS_MAX_BUFFERED_CHARS.")

    def buffered_chars(self) -> int:
        return self.session.buffered_chars

    def busy(self) -> bool:
        """Something is being spoken or waits to be (the client listens: it is not idle)."""
        return self.input_closed or (self.session is not None and not self.session.idle)

    def close_input(self) -> None:
        if not self.input_closed:
            self.input_closed = True
            self.session.close()

    async def send_json(self, message: dict) -> None:
        await self._send({"type": "websocket.send", "text": json.dumps(message, ensure_ascii=False)})

    async def send_bytes(self, data: bytes) -> None:
        await self._send({"type": "websocket.send", "bytes": data})

    async def _send(self, message: dict) -> None:
        stall = self.settings.stream_stall_seconds or None
        async with self._send_lock:
            if self.ws.application_state != WebSocketState.CONNECTED:
                raise ClientGone()
            try:  # a client that takes nothing for this long is gone (its slot must not wait on it)
                await asyncio.wait_for(self.ws.send(message), stall)
            except Exception as exc:
                raise ClientGone() from exc

    # -- the connection ---------------------------------------------------------------------------
    async def serve(self) -> None:
        await self.ws.accept()
        if self.metrics is not None:
            self.metrics.websockets_open.labels(self.route).inc()
        pump: asyncio.Task | None = None
        try:
            first = await self._receive()
            if first is None:
                return
            try:
                await self.start(first)
            except TTSError as exc:
                raise Refusal.from_error(exc) from None
            pump = asyncio.create_task(self._pump(), name="ws-pump")
            await self._converse(pump)
        except Refusal as refusal:
            await self._refuse(refusal, pump)
        except ClientGone:
            self.close_code = 1006
        except Exception:
            log.exception("WebSocket connection failed (%s)", self.route)
            await self._refuse(Refusal("internal_error", "Internal server error.", "Check the server log.",
                                       SERVER_ERROR, "server_error"), pump)
        finally:
            await self._cleanup(pump)

    async def _converse(self, pump: asyncio.Task) -> None:
        """Read messages while the pump speaks; ends when the pump is done (after the end of input)."""
        while True:
            receiving = asyncio.ensure_future(self._receive())
            done, _ = await asyncio.wait({receiving, pump}, return_when=asyncio.FIRST_COMPLETED)
            if receiving not in done:  # everything was spoken (or the pump failed)
                receiving.cancel()
                await asyncio.gather(receiving, return_exceptions=True)
                pump.result()
                return
            message = receiving.result()
            if message is None:  # the client left
                self.close_code = 1006 if self.close_code == GOING_AWAY else self.close_code
                return
            if self.input_closed:
                continue  # after the end of input only a disconnect matters
            await self.handle(message)

    async def _receive(self) -> dict | None:
        """The next JSON object from the client; None when it left. Limits: the idle time (only while
        nothing is being spoken), the message size, JSON objects in text frames only."""
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), self.idle_seconds)
            except TimeoutError:
                if self.busy():
                    continue  # still speaking: the client listens
                raise Refusal("idle_timeout", f"Nothing received for {self.idle_seconds:g} s.",
                              "Send text, or close the connection when done; TTS_WS_IDLE_SECONDS sets the time.")
            break
        if message["type"] == "websocket.disconnect":
            self.close_code = message.get("code", 1006) or 1006
            return None
        text = message.get("text")
        if text is None:
            raise Refusal("invalid_message", "Binary messages are not accepted.", "Send JSON objects as text messages.",
                          UNSUPPORTED_DATA)
        limit = self.settings.ws_max_message_bytes
        if len(text) > limit or len(text.encode()) > limit:
            raise Refusal("message_too_large", f"A message is larger than {limit} bytes.",
                          "Send the text in smaller pieces, or raise TTS_WS_MAX_MESSAGE_BYTES.", TOO_BIG)
        try:
            data = json.loads(text)
        except ValueError:
            raise Refusal("invalid_message", "A message is not valid JSON.", "Send one JSON object per message.") from None
        if not isinstance(data, dict):
            raise Refusal("invalid_message", "A message is not a JSON object.", "Send one JSON object per message.")
        return data

    async def _pump(self) -> None:
        """The session's events as the protocol's messages, audio through the connection's encoder."""
        await self.speak(self.session, self.out, self.on_event)
        await self.on_end()
        self.close_code = NORMAL

    async def speak(self, session: SpeechSession, out: AudioOut, on_event) -> None:
        """One session's events to the client until it ends, audio through `out`."""
        async for event in session.events():
            if isinstance(event, np.ndarray):
                self._note_audio(len(event))
                await out.write(event)
                continue
            if isinstance(event, SentenceStarted):
                self._current = event.index
                self._sentence_started[event.index] = event.completed_at
                if self.stats is None:
                    self.stats = Stats(started=event.completed_at, sample_rate=self.service.engine.sample_rate)
            elif isinstance(event, SentenceDone) and self.metrics is not None:
                self.metrics.websocket_sentences.labels(self.route).inc()
            await on_event(event)
        await out.finish()

    def _note_audio(self, samples: int) -> None:
        now = time.perf_counter()
        index = self._current
        if index is not None and index not in self._first_audio:
            self._first_audio[index] = now - self._sentence_started.get(index, now)
        if self.stats is not None:
            if self.stats.first_audio_s is None:
                self.stats.first_audio_s = now - self.stats.started
            self.stats.audio_samples += samples

    def first_audio_seconds(self, index: int) -> float | None:
        """From the moment sentence `index`'s text was complete to its first audio chunk."""
        value = self._first_audio.get(index)
        return round(value, 4) if value is not None else None

    async def _refuse(self, refusal: Refusal, pump: asyncio.Task | None) -> None:
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        self.close_code = refusal.close_code
        telemetry.note(error=refusal.code)
        with contextlib.suppress(ClientGone):
            await self.send_json(self.error_message(refusal))
        with contextlib.suppress(Exception):
            await self.ws.close(refusal.close_code, refusal.reason)

    async def _cleanup(self, pump: asyncio.Task | None) -> None:
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if self.out is not None:
            await self.out.aclose()
        session = self.session
        if session is not None:
            await session.aclose()  # stops the sentence being generated, frees the slot and the place
            telemetry.note(sentences=session.sentences_spoken)
        telemetry.note(characters=self.characters or None)
        if self.stats is not None:
            self.stats.finished = time.perf_counter()
            telemetry.note(stats=self.stats)
        telemetry.note(close_code=self.close_code)
        if self.metrics is not None:  # before the close: a client that saw it finds it counted
            self.metrics.websockets_open.labels(self.route).dec()
            self.metrics.websocket_closes.labels(self.route, str(self.close_code)).inc()
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(self.close_code if self.close_code != 1006 else NORMAL)
