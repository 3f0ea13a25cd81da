"""`WS /api/tts/ws`: text that arrives in pieces (an LLM's tokens), spoken sentence by sentence as it comes.

Client -> server, JSON text messages:
- first `{"type": "start", "voice", "language", "format", "speed", "api_key"}` (all optional: the defaults of
  /api/config; `format` pcm = raw 24 kHz s16le mono, the default, or any streamed format: wav, mp3, opus,
  aac, flac; `api_key` for browsers, which cannot set headers);
- then `{"type": "text", "text": "...", "flush": false}`, `{"type": "flush"}`, `{"type": "cancel"}`,
  `{"type": "close"}` (end of input: the rest is spoken, then `done` and a normal close).
Server -> client: binary messages with the audio, and JSON events `ready`, `sentence_start`, `sentence_end`,
`sentence_error`, `cancelled`, `done`, `error` (the service's error envelope, then the connection closes).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import encoders
from ..speech_session import Cancelled, SentenceDone, SentenceFailed, SentenceStarted
from .ws_common import Refusal, SpeechConnection, error_envelope

router = APIRouter()

_MESSAGES = "start (first), then text, flush, cancel, close"


class StartMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["start"]
    voice: str | None = Field(None, max_length=255)
    language: str | None = Field(None, max_length=16)
    format: str | None = Field(None, max_length=8)
    speed: float = Field(1.0, ge=0.25, le=4.0)
    api_key: str | None = Field(None, max_length=1024)


def _invalid(exc: ValidationError, what: str) -> Refusal:
    parts = []
    for err in exc.errors():
        field = ".".join(str(x) for x in err.get("loc", ())) or "message"
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return Refusal("invalid_message", f"Invalid {what} message: " + "; ".join(parts)[:300],
                   f"Messages: {_MESSAGES}. See the README's WebSocket section.")


class NativeConnection(SpeechConnection):
    route = "/api/tts/ws"

    async def start(self, message: dict) -> None:
        if message.get("type") != "start":
            raise Refusal("invalid_message", "The first message must be {\"type\": \"start\", ...}.",
                          "Send start with the voice, language, format and speed first.")
        try:
            start = StartMessage.model_validate(message)
        except ValidationError as exc:
            raise _invalid(exc, "start") from None
        self.check_key(start.api_key)
        fmt = encoders.check_format(start.format, "pcm", param="format")
        await self.open_session(start.voice, start.language, start.speed, fmt)
        await self.send_json({"type": "ready", "voice": self.session.voice.name, "language": self.session.language,
                              "format": fmt.name, "media_type": fmt.media_type,
                              "sample_rate": self.service.engine.sample_rate})

    async def handle(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "text":
            text, flush = message.get("text"), message.get("flush", False)
            if not isinstance(text, str) or not isinstance(flush, bool) or set(message) - {"type", "text", "flush"}:
                raise Refusal("invalid_message", "A text message is {\"type\": \"text\", \"text\": string, "
                              "\"flush\": optional boolean}.", f"Messages: {_MESSAGES}.")
            self.feed(text)
            if flush:
                self.session.flush()
        elif kind in ("flush", "cancel", "close"):
            if set(message) != {"type"}:
                raise Refusal("invalid_message", f"A {kind} message has no other fields.", f"Send {{\"type\": \"{kind}\"}}.")
            {"flush": lambda: self.session.flush(), "cancel": lambda: self.session.cancel(),
             "close": self.close_input}[kind]()
        elif kind == "start":
            raise Refusal("invalid_message", "The connection has started already.", "Send start only once.")
        else:
            raise Refusal("invalid_message", f"Unknown message type {str(kind)[:40]!r}.", f"Messages: {_MESSAGES}.")

    async def on_event(self, event) -> None:
        if isinstance(event, SentenceStarted):
            await self.send_json({"type": "sentence_start", "index": event.index, "text": event.text})
        elif isinstance(event, SentenceDone):
            await self.send_json({"type": "sentence_end", "index": event.index,
                                  "audio_seconds": round(event.audio_samples / self.out.sample_rate, 3),
                                  "first_audio_seconds": self.first_audio_seconds(event.index)})
        elif isinstance(event, SentenceFailed):
            await self.send_json({"type": "sentence_error", "index": event.index, "text": event.text,
                                  "error": error_envelope(event.error)})
        elif isinstance(event, Cancelled):
            await self.send_json({"type": "cancelled", "dropped_sentences": event.dropped_sentences})

    async def deliver(self, data: bytes) -> None:
        await self.send_bytes(data)

    async def on_end(self) -> None:
        session = self.session
        await self.send_json({"type": "done", "sentences": session.sentences_spoken, "characters": session.characters,
                              "audio_seconds": round(session.audio_samples / self.out.sample_rate, 3)})

    def error_message(self, refusal: Refusal) -> dict:
        return {"type": "error", "error": refusal.envelope()}


@router.websocket("/api/tts/ws")
async def tts_ws(websocket: WebSocket) -> None:
    await NativeConnection(websocket).serve()
