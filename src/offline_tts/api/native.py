"""The service's own API: status, defaults, batch and streaming synthesis (a contract users rely on)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import encoders
from ..defaults import Defaults
from ..service import TTSService
from .deps import get_service
from .responses import AudioStreamResponse, encoded_stream, unless_client_leaves

router = APIRouter()


class ConfigRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"voice_sample": "my_voice_sample.wav", "language": "es"}})
    voice_sample: str | None = Field(None, max_length=255, description="Default voice (file name in voices/, extension optional); null clears it")
    language: str | None = Field(None, max_length=16, description="Default language, e.g. es, en, zh; auto: detect it from each text")


class TTSRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"text": "Hola mundo.", "voice_sample": "my_voice_sample.mp3", "language": "es"}})
    text: str = Field(..., description="Text to speak; long text is split into sentences")
    voice_sample: str | None = Field(None, max_length=255, description="Voice: a clip file name in voices/ (extension optional); default from /api/config")
    language: str | None = Field(None, max_length=16, description="Language code (es, en, zh, pt-BR, ...) or auto (detect it "
                                                                  "from the text); default: the voice's language, else /api/config's")
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Speaking rate")
    format: str | None = Field(None, max_length=8, description="Output: wav (default), mp3, opus, aac, flac or pcm (raw 24 kHz mono s16le)")


def config_view(defaults: Defaults) -> dict:
    return {"voice_sample": defaults.voice_sample, "language": defaults.language}


@router.get("/", summary="Service status and current defaults")
async def root(service: TTSService = Depends(get_service)) -> dict:
    return {
        "status": "online",
        "message": "TTS service is running",
        "config": config_view(service.defaults.current),
        "model": service.state,
        "ui": "/ui",
        "docs": "/docs",
    }


@router.post("/api/config", summary="Set the default voice and/or language")
async def set_config(body: ConfigRequest, service: TTSService = Depends(get_service)) -> dict:
    clear_voice = "voice_sample" in body.model_fields_set and body.voice_sample is None
    defaults = await service.set_defaults(body.voice_sample, body.language, clear_voice=clear_voice)
    message = "Defaults updated."
    if body.voice_sample:
        message += f" Voice {body.voice_sample!r} is conditioned and cached."
    return {"status": "ok", "message": message, "config": config_view(defaults)}


@router.post("/api/tts/batch", summary="Synthesize the whole text and answer one file (WAV by default)",
             response_class=Response, responses={200: {"content": {"audio/wav": {}}}})
async def tts_batch(body: TTSRequest, request: Request, service: TTSService = Depends(get_service)) -> Response:
    fmt = encoders.check_format(body.format, "wav", param="format")
    job = await service.prepare(body.text, body.voice_sample, body.language, body.speed)
    samples = await unless_client_leaves(request, job, service.synthesize(job))
    return Response(await encoders.encode_all(samples, fmt, service.sample_rate), media_type=fmt.media_type,
                    headers={"Content-Language": job.language})  # the language spoken (e.g. the one detected)


@router.post("/api/tts/stream", summary="Stream audio while it is generated (WAV by default: a header, then PCM16 chunks)",
             response_class=StreamingResponse, responses={200: {"content": {"audio/wav": {}}}})
async def tts_stream(body: TTSRequest, service: TTSService = Depends(get_service)) -> StreamingResponse:
    fmt = encoders.check_format(body.format, "wav", param="format")
    job = await service.prepare(body.text, body.voice_sample, body.language, body.speed)
    data = encoders.encode(service.stream(job), fmt, service.sample_rate, stop=job.release)
    return AudioStreamResponse(encoded_stream(data), job, media_type=fmt.media_type)
