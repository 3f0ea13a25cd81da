"""OpenAI-compatible speech API: a drop-in for clients of `POST /v1/audio/speech` (the official SDKs,
Open WebUI, SillyTavern, agent frameworks), speaking in the service's cloned voices.

Every response format is streamed as it is generated. Errors use OpenAI's envelope (api/errors.py
renders every error that way).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import encoders, telemetry
from ..errors import InvalidText, TTSError
from ..service import SynthesisJob, TTSService
from .deps import get_service
from .errors import error_body
from .responses import AudioStreamResponse, encoded_stream

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")

# OpenAI's own voice names: clients with a fixed list send these. Mapped by TTS_OPENAI_VOICE_MAP;
# a name left out of the map speaks in the default voice (POST /api/config), else in the first voice by name.
# Every model name OpenAI's speech API accepts (listed on /v1/models), and any dated snapshot of a family.
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "tts-1-1106", "tts-1-hd-1106",
                 "gpt-4o-mini-tts-2025-03-20", "gpt-4o-mini-tts-2025-12-15")
_SNAPSHOT = re.compile(r"(tts-1|tts-1-hd|gpt-4o-mini-tts)-\d{4}-\d{2}-\d{2}")


class InvalidParameter(TTSError):
    code = "invalid_parameter"


class SpeechRequest(BaseModel):
    """OpenAI's request body (unknown fields are ignored, like OpenAI-compatible servers do)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"example": {
        "model": "tts-1", "input": "Hola, ¿qué tal?", "voice": "my_voice_sample", "response_format": "mp3"}})
    model: str | None = Field(None, description="tts-1, tts-1-hd, gpt-4o-mini-tts (and their dated snapshots) or this "
                                                "service's model name (GET /v1/models); all speak the same way")
    input: str | None = Field(None, description="The text to speak")
    voice: str | dict[str, Any] | None = Field(
        None, description="A voice of this service (GET /v1/audio/voices), or an OpenAI voice name (mapped by "
                          "TTS_OPENAI_VOICE_MAP, else the default voice, else the first voice by name); "
                          "{\"id\": name} is accepted too")
    response_format: str | None = Field(None, description="mp3 (default), opus, aac, flac, wav or pcm (24 kHz mono s16le)")
    speed: float | None = Field(None, description="0.25 to 4.0 (default 1.0)")
    stream_format: str | None = Field(None, description="audio (default): the audio bytes; sse: server-sent events")
    instructions: str | None = Field(None, description="Accepted for compatibility and ignored")
    language: str | None = Field(None, max_length=16, description="Extension: language code or auto (detect it); default: "
                                                                  "the voice's language, else /api/config's")


def accepted_models(service: TTSService) -> list[str]:
    return [service.settings.model_name, *OPENAI_MODELS]


def check_model(model: str | None, service: TTSService) -> str:
    accepted = accepted_models(service)
    name = (model or "").strip()
    if name not in accepted and not _SNAPSHOT.fullmatch(name):
        raise InvalidParameter(f"Unsupported model {str(model)[:60]!r}.", f"Use one of: {', '.join(accepted)}.",
                               param="model")
    return name


def check_speed(speed: float | None) -> float:
    speed = 1.0 if speed is None else float(speed)
    if not 0.25 <= speed <= 4.0:
        raise InvalidParameter(f"speed must be between 0.25 and 4.0, not {speed:g}.", "1.0 is normal speed.", param="speed")
    return speed


def resolve_voice(voice: str | dict[str, Any] | None, service: TTSService) -> str | None:
    """The service voice to speak in (None = the default voice)."""
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice.strip():
        raise InvalidParameter("'voice' is required.", "Name a voice from GET /v1/audio/voices.", param="voice")
    return service.voice_for_openai_name(voice.strip())


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def _audio_events(data: AsyncIterator[bytes], text: str, job: SynthesisJob, service: TTSService,
                        ) -> AsyncIterator[bytes]:
    """`speech.audio.delta` events (base64 audio of the asked format), then `speech.audio.done`."""
    try:
        async with contextlib.aclosing(data):
            async for part in data:
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(part).decode("ascii")})
    except Exception as exc:  # the response has started: say so in the stream, then end it
        log.error("Speech stream ended early: %s", exc)
        message, code = (exc.message, exc.code) if isinstance(exc, TTSError) else (str(exc), "synthesis_failed")
        yield _sse({"type": "error", **error_body(message, code, error_type="server_error")})
        return
    input_tokens = len(text.split())
    output_tokens = service.audio_tokens(job.stats.audio_samples)
    yield _sse({"type": "speech.audio.done", "usage": {
        "input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}})


@router.post("/audio/speech", summary="OpenAI-compatible text to speech (streamed in every format)",
             response_class=StreamingResponse,
             responses={200: {"content": {f.media_type: {} for f in encoders.FORMATS.values()} | {"text/event-stream": {}}}})
async def create_speech(body: SpeechRequest, service: TTSService = Depends(get_service)) -> StreamingResponse:
    check_model(body.model, service)
    if body.input is None or not body.input.strip():
        raise InvalidText("'input' is empty.", "Send the text to speak in 'input'.", param="input")
    fmt = encoders.check_format(body.response_format, "mp3")
    stream_format: Literal["audio", "sse"] | str = (body.stream_format or "audio").strip().lower()
    if stream_format not in ("audio", "sse"):
        raise InvalidParameter(f"Unsupported stream_format {stream_format[:20]!r}.", "Use 'audio' or 'sse'.",
                               param="stream_format")
    speed = check_speed(body.speed)
    voice = resolve_voice(body.voice, service)
    sample_rate = service.sample_rate
    telemetry.note(format=fmt.name)
    job: SynthesisJob = await service.prepare(body.input, voice, body.language, speed)
    data = encoders.encode(service.stream(job), fmt, sample_rate, stop=job.release)
    if stream_format == "sse":
        return AudioStreamResponse(_audio_events(data, body.input, job, service), job, media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return AudioStreamResponse(encoded_stream(data), job, media_type=fmt.media_type,
                               headers={"X-Accel-Buffering": "no"})


@router.get("/audio/voices", summary="The voices (OpenAI-style list; each with an id)")
async def list_voices(service: TTSService = Depends(get_service)) -> dict:
    voices = [{"id": name, "name": name} for name in service.voices.names()]
    return {"object": "list", "data": voices, "voices": voices}


def _models(service: TTSService) -> list[dict]:
    return [{"id": m, "object": "model", "created": 0, "owned_by": "offline-tts"} for m in accepted_models(service)]


@router.get("/models", summary="The accepted model names (OpenAI list shape)")
async def list_models(service: TTSService = Depends(get_service)) -> dict:
    return {"object": "list", "data": _models(service)}


@router.get("/audio/models", summary="The speech models (the shape Open WebUI asks for)")
async def list_audio_models(service: TTSService = Depends(get_service)) -> dict:
    return {"object": "list", "data": _models(service), "models": _models(service)}
