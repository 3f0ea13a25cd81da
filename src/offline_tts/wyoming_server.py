"""The Wyoming protocol (Home Assistant's local voice services), served by the same process, event loop and
service as the HTTP API: same voices, voice cache, defaults, batching, admission limits, metrics and logs.

On when TTS_WYOMING_URI is set (tcp://0.0.0.0:10200). Home Assistant opens one connection per request:
- `describe` -> `info`: this TTS program and every voice of the service, each with all the model's languages
  (read at every describe, so uploads and deletions show up);
- `synthesize` (text; voice name and/or language, both optional) -> `audio-start`, `audio-chunk`...,
  `audio-stop` (s16le mono at the engine's rate), sent as each sentence is generated;
- `synthesize-start`, `synthesize-chunk`..., `synthesize-stop` (text while a language model writes it) ->
  for each sentence the incremental splitter completes: `audio-start`, `audio-chunk`..., `audio-stop`; then
  `synthesize-stopped`. The `synthesize` a client sends inside that stream (the whole text again, for
  servers without streaming) is ignored, as wyoming-piper does;
- what cannot be done -> an `error` event (text: what is wrong and how to fix it; code: the HTTP API's
  error code); the connection stays open for the next request. Inside a text stream a failed sentence is
  an `error` and the stream goes on; it still ends with `synthesize-stopped`.
A client that disconnects stops its generation at once and gives its place back. The end of what a client
sends is taken as its leaving (a TCP half-close cannot be told apart): clients keep their sending side open
until the audio is done, as Home Assistant and wyoming's own client do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from . import __version__, audio, metrics, telemetry
from .api.middleware import access_log, log_value
from .errors import InvalidText, TextTooLong, TTSError
from .service import TTSService
from .speech_session import SentenceDone, SentenceFailed, SentenceStarted, SpeechSession
from .stream_guard import StreamGuard
from .telemetry import Stats

log = logging.getLogger(__name__)

PROGRAM = "offline-tts"
ATTRIBUTION = Attribution(name="Coqui XTTS-v2", url="https://huggingface.co/coqui/XTTS-v2")
SAMPLES_PER_CHUNK = 2048  # per audio-chunk event (85 ms at 24 kHz); a chunk is sent as soon as it exists
MAX_PENDING = 4  # requests one connection may queue behind the one being spoken


class ProtocolError(TTSError):
    code = "invalid_event"


class EventTooLarge(ProtocolError):
    code = "event_too_large"


def program_info(service: TTSService) -> Info:
    """The `info` answer: every voice of the service, each in all the model's languages."""
    languages = list(service.languages)  # ModelNotReady while the model loads
    voices = [TtsVoice(name=v.name, description=v.name, attribution=ATTRIBUTION, installed=True, version=None,
                       languages=languages) for v in service.voices.list()]
    return Info(tts=[TtsProgram(name=PROGRAM, description="Voice cloning text to speech (XTTS-v2), offline",
                                attribution=ATTRIBUTION, installed=True, version=__version__, voices=voices,
                                supports_synthesize_streaming=True)])


def error_event(exc: TTSError) -> Event:
    return Error(text=f"{exc.message} {exc.hint}".strip(), code=exc.code).event()


def voice_fields(data: dict[str, Any]) -> tuple[str | None, str | None]:
    """(voice name, language) of a synthesize / synthesize-start event; both optional. Read from the raw data:
    wyoming's SynthesizeVoice drops the language when a name is given, and we honor both."""
    voice = data.get("voice") or {}
    if not isinstance(voice, dict):
        raise ProtocolError("'voice' must be an object: {\"name\": ..., \"language\": ...}.",
                            "Send the voice's name (from describe) and/or a language code.")
    name, language = voice.get("name"), voice.get("language")
    for field, value in (("name", name), ("language", language)):
        if value is not None and not isinstance(value, str):
            raise ProtocolError(f"voice.{field} must be a string.", "Send the voice's name (from describe) and/or "
                                "a language code such as 'en'.")
    return name or None, language or None


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """wyoming's `async_read_event` with bounds: an event's data and payload may not exceed `max_bytes`
    (the library would read any length a client declares). None at the end of the connection."""
    try:
        line = await reader.readline()
    except ValueError:  # a header line over the reader's limit (64 KiB)
        raise EventTooLarge("An event header is too long.", "Send events as the wyoming library writes them.") from None
    except ConnectionError:
        return None
    if not line:
        return None
    try:
        header = json.loads(line)
    except ValueError:
        raise ProtocolError("An event header is not JSON.", "Send Wyoming events (one JSON line each).") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("An event has no 'type'.", "Send Wyoming events (one JSON line each).")
    lengths = [header.get("data_length") or 0, header.get("payload_length") or 0]
    if not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise ProtocolError("An event's data_length/payload_length is not a count of bytes.",
                            "Send events as the wyoming library writes them.")
    if sum(lengths) > max_bytes:
        raise EventTooLarge(f"An event carries {sum(lengths)} bytes; the limit is {max_bytes}.",
                            "Send less text per event (or raise TTS_MAX_BODY_BYTES).")
    data = header.get("data") or {}
    try:
        if lengths[0]:
            extra = json.loads(await reader.readexactly(lengths[0]))
            if not isinstance(extra, dict) or not isinstance(data, dict):
                raise ValueError
            data.update(extra)
        payload = await reader.readexactly(lengths[1]) if lengths[1] else None
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    except ValueError:
        raise ProtocolError("An event's data is not a JSON object.", "Send Wyoming events.") from None
    if not isinstance(data, dict):
        raise ProtocolError("An event's data is not a JSON object.", "Send Wyoming events.")
    return Event(type=header["type"], data=data, payload=payload)


def audio_events(chunk: np.ndarray, rate: int, offset: int) -> Iterator[Event]:
    """One generated chunk as audio-chunk events (s16le mono), timestamped from the start of the audio."""
    for start in range(0, len(chunk), SAMPLES_PER_CHUNK):
        piece = chunk[start:start + SAMPLES_PER_CHUNK]
        yield AudioChunk(rate=rate, width=2, channels=1, audio=audio.to_pcm16(piece),
                         timestamp=(offset + start) * 1000 // rate).event()


class WyomingHandler(AsyncEventHandler):
    """One client connection. Events are read all the time (so a disconnect is seen at once); the requests
    are spoken one after another by a worker task."""

    def __init__(self, service: TTSService, app_metrics: metrics.Metrics, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        super().__init__(reader, writer)
        self.service = service
        self.metrics = app_metrics
        peer = writer.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) and peer else "local"
        self._work: asyncio.Queue[tuple[Callable[..., Awaitable[None]], tuple]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._text: asyncio.Queue[str | None] | None = None  # the text stream being received, if any
        self._text_chars = 0
        self._text_refused = False

    # -- receiving ------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                try:
                    event = await read_event(self.reader, self.service.settings.max_body_bytes)
                except ProtocolError as exc:  # the byte stream cannot be trusted any more: say why, hang up
                    with contextlib.suppress(ConnectionError):
                        await self.write_event(error_event(exc))
                    break
                if event is None or not await self.handle_event(event):
                    break
        finally:
            await self.disconnect()
            self.writer.close()

    async def handle_event(self, event: Event) -> bool:
        try:
            if Describe.is_type(event.type):
                await self.write_event((await asyncio.to_thread(program_info, self.service)).event())
            elif Synthesize.is_type(event.type):
                if self._text is None:  # inside a text stream it repeats the whole text for older servers
                    self._enqueue(self._synthesize, event.data)
            elif SynthesizeStart.is_type(event.type):
                if self._text is not None:
                    raise ProtocolError("synthesize-start while a text stream is open.", "Send synthesize-stop first.")
                self._text, self._text_chars, self._text_refused = asyncio.Queue(), 0, False
                self._enqueue(self._stream, event.data, self._text)
            elif SynthesizeChunk.is_type(event.type):
                self._add_text(event.data.get("text"))
            elif SynthesizeStop.is_type(event.type):
                if self._text is None:
                    raise ProtocolError("synthesize-stop without synthesize-start.", "Start a text stream first.")
                self._text.put_nowait(None)
                self._text = None
            elif Ping.is_type(event.type):
                await self.write_event(Pong(text=Ping.from_event(event).text).event())
            else:
                log.debug("Wyoming: ignored a %r event", event.type)
        except TTSError as exc:
            await self.write_event(error_event(exc))
        return True

    def _add_text(self, text: object) -> None:
        if self._text is None:
            raise ProtocolError("synthesize-chunk without synthesize-start.", "Start a text stream first.")
        if not isinstance(text, str):
            raise ProtocolError("synthesize-chunk needs a 'text' string.", "Send the next piece of text.")
        if self._text_refused:
            return
        self._text_chars += len(text)
        limit = self.service.settings.max_text_chars
        if self._text_chars > limit:  # said once; the text before the limit is still spoken
            self._text_refused = True
            raise TextTooLong(f"The text stream has more than {limit} characters; the rest is not spoken.",
                              "Send shorter answers, or raise TTS_MAX_TEXT_CHARS.")
        self._text.put_nowait(text)

    def _enqueue(self, job: Callable[..., Awaitable[None]], *args: Any) -> None:
        if self._work.qsize() >= MAX_PENDING:
            raise ProtocolError(f"More than {MAX_PENDING} requests are waiting on this connection.",
                                "Wait for audio-stop / synthesize-stopped before sending the next request.")
        self._work.put_nowait((job, args))
        if self._worker is None:
            self._worker = asyncio.create_task(self._work_loop(), name="wyoming requests")

    async def _work_loop(self) -> None:
        while True:
            job, args = await self._work.get()
            try:
                await job(*args)
            except ConnectionError:  # the client is gone; the receiving side ends the connection
                return
            except Exception:
                log.exception("Wyoming request failed")
                with contextlib.suppress(ConnectionError):
                    await self.write_event(Error(text="Internal error; see the server log.", code="internal_error").event())

    async def disconnect(self) -> None:
        """The client is gone (or the server stops): stop speaking, free what its requests hold."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    def _abort(self) -> None:
        """Close at once, unsent audio dropped (a graceful close would wait for a client that does not read)."""
        self.writer.transport.abort()

    # -- one request: accounting ------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _request(self, kind: str) -> AsyncIterator[telemetry.RequestRecord]:
        """The request's record (the service fills it in), then its metrics and its log line."""
        record, token = telemetry.start_record(uuid.uuid4().hex)
        record.extra["outcome"] = "ok"
        started = time.perf_counter()
        try:
            yield record
        except (ConnectionError, asyncio.CancelledError):
            record.extra["outcome"] = "client_closed_request"
            raise
        except Exception:
            record.extra["outcome"] = "internal_error"
            raise
        finally:
            outcome = record.extra.pop("outcome")
            self.metrics.wyoming.labels(kind, outcome).inc()
            self.metrics.observe_synthesis(f"wyoming {kind}", record)
            self._log(kind, outcome, time.perf_counter() - started, record)
            telemetry.end_record(token)

    def _log(self, kind: str, outcome: str, duration: float, record: telemetry.RequestRecord) -> None:
        stats = record.stats
        fields = {
            "request_id": record.request_id, "protocol": "wyoming", "kind": kind, "outcome": outcome,
            "voice": record.voice, "language": record.language, "characters": record.characters,
            "audio_seconds": round(record.audio_seconds, 3) if record.audio_seconds is not None else None,
            "ttfa_seconds": round(stats.first_audio_s, 3) if stats and stats.first_audio_s is not None else None,
            "duration_seconds": round(duration, 3), "client": self.client, **record.extra,
        }
        access_log.info("request " + " ".join(f"{k}={log_value(v)}" for k, v in fields.items() if v is not None),
                        extra=fields)

    async def _send_guarded(self, guard: StreamGuard, respond: Callable[[Callable[[Event], Awaitable[None]]], Awaitable[None]],
                            record: telemetry.RequestRecord) -> bool:
        """Run `respond(send)` so that a client that stops reading is dropped (stream_guard.py, as for HTTP
        streams); False when it was, and the connection is then closed."""
        await guard.run(respond, self.write_event)
        if guard.reason is None:
            return True
        record.extra["outcome"] = f"dropped_{guard.reason}"
        self._abort()
        return False

    # -- synthesize ----------------------------------------------------------------------------------
    async def _synthesize(self, data: dict[str, Any]) -> None:
        async with self._request("synthesize") as record:
            try:
                text = data.get("text")
                if not isinstance(text, str):
                    raise InvalidText("synthesize needs a 'text' string.", "Send the text to speak.")
                voice, language = voice_fields(data)
                job = await self.service.prepare(text, voice, language)
            except TTSError as exc:
                record.extra["outcome"] = exc.code
                await self.write_event(error_event(exc))
                return
            rate = self.service.sample_rate
            started = False

            async def respond(send: Callable[[Event], Awaitable[None]]) -> None:
                nonlocal started
                await send(AudioStart(rate=rate, width=2, channels=1).event())
                started = True
                sent = 0
                async with contextlib.aclosing(self.service.stream(job)) as chunks:
                    async for chunk in chunks:
                        for event in audio_events(chunk, rate, sent):
                            await send(event)
                        sent += len(chunk)
                await send(AudioStop().event())

            try:
                await self._send_guarded(job.guard, respond, record)
            except TTSError as exc:  # the model failed mid-way: say so, then end the audio the client waits for
                record.extra["outcome"] = exc.code
                await self.write_event(error_event(exc))
                if started:
                    await self.write_event(AudioStop().event())
            finally:
                job.release()

    # -- synthesize-start / -chunk / -stop ------------------------------------------------------------
    async def _stream(self, data: dict[str, Any], text: asyncio.Queue[str | None]) -> None:
        async with self._request("stream") as record:
            try:
                voice, language = voice_fields(data)
                session = await self.service.open_session(voice, language)
            except TTSError as exc:  # nothing can be spoken: say why, then end the stream when the client does
                record.extra["outcome"] = exc.code
                await self.write_event(error_event(exc))
                while await text.get() is not None:
                    pass
                await self.write_event(SynthesizeStopped().event())
                return
            feeder = asyncio.create_task(self._feed(session, text))
            try:
                if await self._speak(session, record):
                    await self.write_event(SynthesizeStopped().event())
            finally:
                feeder.cancel()
                await session.aclose()

    @staticmethod
    async def _feed(session: SpeechSession, text: asyncio.Queue[str | None]) -> None:
        while (piece := await text.get()) is not None:
            session.feed(piece)
        session.close()

    async def _speak(self, session: SpeechSession, record: telemetry.RequestRecord) -> bool:
        """The session's sentences as audio-start / audio-chunk... / audio-stop each, errors as `error`
        events; False when the client stopped reading and was dropped."""
        rate = self.service.sample_rate
        stats = Stats(sample_rate=rate)
        record.stats, record.voice = stats, session.voice.name
        spoke = failed = False

        async def respond(send: Callable[[Event], Awaitable[None]]) -> None:
            nonlocal spoke, failed
            open_audio, sent = False, 0
            async for event in session.events():
                if isinstance(event, SentenceStarted):
                    if not spoke:  # time to first audio: from the moment the first sentence was complete
                        stats.started, spoke = event.completed_at, True
                    await send(AudioStart(rate=rate, width=2, channels=1).event())
                    open_audio, sent = True, 0
                elif isinstance(event, np.ndarray):
                    if stats.first_audio_s is None:
                        stats.first_audio_s = time.perf_counter() - stats.started
                    stats.audio_samples += len(event)
                    for chunk_event in audio_events(event, rate, sent):
                        await send(chunk_event)
                    sent += len(event)
                elif isinstance(event, SentenceDone):
                    if sent == 0:  # a sentence with nothing to say ("..."): a short pause, as in the HTTP API
                        pause = self.service.pause()
                        stats.audio_samples += len(pause)
                        for chunk_event in audio_events(pause, rate, 0):
                            await send(chunk_event)
                    await send(AudioStop().event())
                    open_audio = False
                elif isinstance(event, SentenceFailed):
                    failed = True
                    record.extra["outcome"] = event.error.code
                    await send(error_event(event.error))
                    if open_audio:
                        await send(AudioStop().event())
                        open_audio = False

        guard = StreamGuard(threading.Event(), rate, 0, self.service.settings.stream_stall_seconds,
                            on_drop=self.service._stream_dropped)
        try:
            if not await self._send_guarded(guard, respond, record):
                return False
        finally:
            stats.finished = time.perf_counter()
            record.language, record.characters = session.language, session.characters
        if not spoke and not failed:
            exc = InvalidText("The text is empty.", "Send some text in synthesize-chunk events.")
            record.extra["outcome"] = exc.code
            await self.write_event(error_event(exc))
        return True


class WyomingServer:
    """The listening side: started and stopped with the app (app.py's lifespan)."""

    def __init__(self, service: TTSService, app_metrics: metrics.Metrics, uri: str):
        self.service = service
        self.metrics = app_metrics
        self.uri = uri
        self._server: AsyncServer | None = None

    async def start(self) -> None:
        server = AsyncServer.from_uri(self.uri)
        await server.start(partial(WyomingHandler, self.service, self.metrics))
        self._server = server
        log.info("Wyoming protocol (Home Assistant) on %s", self.uri)

    async def stop(self, timeout: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        handlers = list(server._handlers)  # their tasks: each frees what its connection holds on the way out
        await server.stop()
        if handlers:
            await asyncio.wait(handlers, timeout=timeout)
