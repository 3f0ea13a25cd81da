"""ElevenLabs-compatible input streaming: `WS /v1/text-to-speech/{voice_id}/stream-input`, so voice-agent
frameworks (pipecat, LiveKit Agents, the elevenlabs SDKs) pointed at this server speak with its voices.

As ElevenLabs: the query's `output_format` (pcm_16000, pcm_22050, pcm_24000, pcm_44100, pcm_48000, ulaw_8000,
alaw_8000, mp3_22050_32, mp3_44100_{32,64,96,128,192}, opus_48000_{32,64,96,128,192}; default mp3_44100_128),
`language_code` and `inactivity_timeout`; the key as the `xi-api-key` header or the first message's `xi_api_key`
/ `xi-api-key` / `authorization`; the first message `{"text": " ", "voice_settings": ..., ...}` (its
`voice_settings.speed` is the speed), then `{"text": "...", "try_trigger_generation": ..., "flush": ...}`, and
`{"text": ""}` for the end of input. The server sends `{"audio": base64, "isFinal": null, ...}` as audio is
made and `{"isFinal": true}` when all is spoken, then closes normally. `voice_id` is one of this service's
voices. Fields that mean nothing here (model_id, voice_settings but speed, generation_config, ...) are
accepted and ignored; `alignment` is not computed (null).
"""

from __future__ import annotations

import asyncio
import base64
import math

from fastapi import APIRouter, WebSocket

from .. import telemetry
from ..encoders import AudioFormat
from ..errors import UnsupportedFormat
from ..speech_session import SpeechSession
from .ws_common import NORMAL, AudioOut, Refusal, SpeechConnection

router = APIRouter()

_PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
_BITRATES = (32, 64, 96, 128, 192)
_MP3 = ("-c:a", "libmp3lame", "-write_xing", "0", "-id3v2_version", "0", "-f", "mp3")
_OPUS = ("-c:a", "libopus", "-frame_duration", "20", "-page_duration", "100000", "-f", "ogg")
ENGINE_RATE = 24_000
_MAX_CONTEXTS = 8  # open contexts per multi-stream-input connection


def _formats() -> dict[str, AudioFormat]:
    formats = {}
    for rate in _PCM_RATES:  # raw s16le mono; the engine's own rate needs no ffmpeg
        args = () if rate == ENGINE_RATE else ("-ar", str(rate), "-f", "s16le")
        formats[f"pcm_{rate}"] = AudioFormat("pcm" if rate == ENGINE_RATE else f"pcm_{rate}", "audio/pcm", args)
    formats["ulaw_8000"] = AudioFormat("ulaw_8000", "audio/basic", ("-ar", "8000", "-c:a", "pcm_mulaw", "-f", "mulaw"))
    formats["alaw_8000"] = AudioFormat("alaw_8000", "audio/alaw", ("-ar", "8000", "-c:a", "pcm_alaw", "-f", "alaw"))
    formats["mp3_22050_32"] = AudioFormat("mp3_22050_32", "audio/mpeg", ("-ar", "22050", "-b:a", "32k", *_MP3))
    for kbps in _BITRATES:
        formats[f"mp3_44100_{kbps}"] = AudioFormat(f"mp3_44100_{kbps}", "audio/mpeg", ("-ar", "44100", "-b:a", f"{kbps}k", *_MP3))
        formats[f"opus_48000_{kbps}"] = AudioFormat(f"opus_48000_{kbps}", "audio/ogg", ("-ar", "48000", "-b:a", f"{kbps}k", *_OPUS))
    return formats


OUTPUT_FORMATS = _formats()
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"


def output_format(name: str | None) -> AudioFormat:
    key = (name or DEFAULT_OUTPUT_FORMAT).strip().lower()
    if key not in OUTPUT_FORMATS:
        raise UnsupportedFormat(f"Unsupported output_format {key[:40]!r}.", f"Use one of: {', '.join(OUTPUT_FORMATS)}.",
                                param="output_format")
    return OUTPUT_FORMATS[key]


def _speed(voice_settings: object) -> float:
    """ElevenLabs' voice_settings.speed (0.7-1.2 there) as this service's speed; anything else is ignored."""
    speed = voice_settings.get("speed") if isinstance(voice_settings, dict) else None
    if isinstance(speed, int | float) and not isinstance(speed, bool) and math.isfinite(speed):
        return min(4.0, max(0.25, float(speed)))
    return 1.0


class ElevenLabsConnection(SpeechConnection):
    route = "/v1/text-to-speech/{voice_id}/stream-input"

    def __init__(self, ws: WebSocket, voice_id: str):
        super().__init__(ws)
        self.voice_id = voice_id
        timeout = ws.query_params.get("inactivity_timeout")  # ElevenLabs: seconds, 20 by default, at most 180
        try:
            if timeout is not None and 0 < float(timeout) < self.idle_seconds:
                self.idle_seconds = float(timeout)
        except ValueError:
            pass

    async def start(self, message: dict) -> None:
        self.check_key(message.get("xi_api_key"), message.get("xi-api-key"), message.get("authorization"))
        text = message.get("text")
        if not isinstance(text, str):
            raise Refusal("invalid_message", "The first message needs a 'text' field (\" \" to start).",
                          'Start with {"text": " "}.')
        fmt = output_format(self.ws.query_params.get("output_format"))
        language = self.ws.query_params.get("language_code") or None
        await self.open_session(self.voice_id, language, _speed(message.get("voice_settings")), fmt)
        if text.strip():
            self.feed(text)

    async def handle(self, message: dict) -> None:
        text = message.get("text")
        if not isinstance(text, str):
            if message.get("flush") is True:  # a flush without text
                self.session.flush()
                return
            raise Refusal("invalid_message", "A message needs a 'text' string.",
                          'Send {"text": "..."}; {"text": ""} ends the input.')
        if text == "":
            self.close_input()
            return
        self.feed(text)
        if message.get("flush") is True:
            self.session.flush()

    async def deliver(self, data: bytes) -> None:
        await self.send_json({"audio": base64.b64encode(data).decode("ascii"), "isFinal": None,
                              "normalizedAlignment": None, "alignment": None})

    async def on_end(self) -> None:
        await self.send_json({"isFinal": True})

    def error_message(self, refusal: Refusal) -> dict:
        return {"message": refusal.message, "error": refusal.code, "code": refusal.close_code, "hint": refusal.hint}


class _Context:
    def __init__(self, context_id: str, session: SpeechSession, out: AudioOut):
        self.id, self.session, self.out = context_id, session, out
        self.task: asyncio.Task | None = None


class ElevenLabsMultiConnection(ElevenLabsConnection):
    """`multi-stream-input`: several contexts on one connection (an agent opens a new one per turn and closes
    the old one on barge-in), each a session of its own with its own encoder; messages carry `context_id`
    (none: the default context), audio answers `contextId`. `close_context` stops a context at once (its
    queued text is dropped) and answers `{"isFinal": true, "contextId"}`; `flush` speaks what it buffered;
    `{"text": "", "context_id"}` keeps it alive; `close_socket` ends the input: every context is spoken to
    its end, then the connection closes normally."""

    route = "/v1/text-to-speech/{voice_id}/multi-stream-input"
    DEFAULT = "default"  # ElevenLabs' name for the context of messages without context_id... ours at least

    def __init__(self, ws: WebSocket, voice_id: str):
        super().__init__(ws, voice_id)
        self.contexts: dict[str, _Context] = {}
        self._finished = asyncio.Event()
        self._fmt: AudioFormat | None = None
        self._language: str | None = None
        self._speed = 1.0

    async def start(self, message: dict) -> None:
        self.check_key(message.get("xi_api_key"), message.get("xi-api-key"), message.get("authorization"))
        self._fmt = output_format(self.ws.query_params.get("output_format"))
        self._language = self.ws.query_params.get("language_code") or None
        self._speed = _speed(message.get("voice_settings"))
        await self._context(message)  # the voice is checked now, not at the first text
        if {"text", "flush", "close_context", "close_socket"} & set(message):
            await self.handle(message)

    async def _context(self, message: dict) -> _Context:
        context_id = message.get("context_id")
        context_id = context_id if isinstance(context_id, str) and context_id else self.DEFAULT
        context = self.contexts.get(context_id)
        if context is None:
            if len(self.contexts) >= _MAX_CONTEXTS:
                raise Refusal("too_many_contexts", f"More than {_MAX_CONTEXTS} contexts are open.",
                              "Close contexts you no longer need (close_context).")
            session = await self.service.open_session(self.voice_id, self._language, self._speed,
                                                      self.settings.ws_clause_chars)
            telemetry.note(voice=session.voice.name, language=session.language)
            self.session = self.session or session  # the first one: what the base class reports
            context = _Context(context_id, session, None)
            context.out = AudioOut(self._fmt, self.service.engine.sample_rate,
                                   lambda data, c=context_id: self._send_audio(data, c))
            context.task = asyncio.create_task(self._speak_context(context), name=f"ws-context-{context_id[:20]}")
            self.contexts[context_id] = context
        return context

    async def _speak_context(self, context: _Context) -> None:
        async def no_events(event) -> None:
            pass

        await self.speak(context.session, context.out, no_events)
        if self.contexts.get(context.id) is context:
            await self.send_json({"isFinal": True, "contextId": context.id})
            del self.contexts[context.id]
        self._check_finished()

    def _check_finished(self) -> None:
        if self.input_closed and not self.contexts:
            self._finished.set()

    async def _send_audio(self, data: bytes, context_id: str) -> None:
        await self.send_json({"audio": base64.b64encode(data).decode("ascii"), "isFinal": None,
                              "normalizedAlignment": None, "alignment": None, "contextId": context_id})

    def buffered_chars(self) -> int:
        return sum(c.session.buffered_chars for c in self.contexts.values())

    def busy(self) -> bool:
        return self.input_closed or any(not c.session.idle for c in self.contexts.values())

    async def handle(self, message: dict) -> None:
        if message.get("close_socket") is True:
            self.input_closed = True
            for context in self.contexts.values():
                context.session.close()
            self._check_finished()
            return
        text = message.get("text")
        if message.get("close_context") is True:
            context = self.contexts.pop(message.get("context_id") or self.DEFAULT, None)
            if context is not None:  # barge-in: stop now, drop what it still had
                await self._stop(context)
                await self.send_json({"isFinal": True, "contextId": context.id})
            self._check_finished()
            return
        if text is not None and not isinstance(text, str):
            raise Refusal("invalid_message", "'text' must be a string.", 'Send {"text": "...", "context_id": "..."}.')
        if text is None and message.get("flush") is not True:
            raise Refusal("invalid_message", "A message needs 'text', 'flush', 'close_context' or 'close_socket'.",
                          'Send {"text": "...", "context_id": "..."}.')
        context = await self._context(message)
        if text and text.strip():
            self.feed(text, context.session)
        if message.get("flush") is True:
            context.session.flush()

    async def _pump(self) -> None:
        await self._finished.wait()
        self.close_code = NORMAL

    @staticmethod
    async def _stop(context: _Context) -> None:
        await context.session.aclose()  # the sentence being generated stops, its slot is freed
        context.task.cancel()
        await asyncio.gather(context.task, return_exceptions=True)
        await context.out.aclose()

    async def _cleanup(self, pump: asyncio.Task | None) -> None:
        for context in list(self.contexts.values()):
            await self._stop(context)
        self.contexts.clear()
        await super()._cleanup(pump)


@router.websocket("/v1/text-to-speech/{voice_id}/stream-input")
async def stream_input(websocket: WebSocket, voice_id: str) -> None:
    await ElevenLabsConnection(websocket, voice_id).serve()


@router.websocket("/v1/text-to-speech/{voice_id}/multi-stream-input")
async def multi_stream_input(websocket: WebSocket, voice_id: str) -> None:
    await ElevenLabsMultiConnection(websocket, voice_id).serve()
