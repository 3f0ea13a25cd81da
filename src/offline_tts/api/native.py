"""The service's own API: status, defaults, batch and streaming synthesis (a contract users rely on)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import audio, encoders
from ..defaults import Defaults
from ..service import Stats, SynthesisJob, TTSService
from .deps import get_service

log = logging.getLogger(__name__)
router = APIRouter()
T = TypeVar("T")


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


async def pcm_chunks(service: TTSService, job: SynthesisJob, stats: Stats) -> AsyncIterator[bytes]:
    async for chunk in service.stream(job, stats):
        yield audio.to_pcm16(chunk)


async def wav_stream(service: TTSService, job: SynthesisJob, stats: Stats) -> AsyncIterator[bytes]:
    yield audio.wav_header(service.engine.sample_rate)
    try:
        async for data in pcm_chunks(service, job, stats):
            yield data
    except Exception as exc:  # headers are gone: all we can do is end the stream early
        log.error("Stream ended early: %s", exc)


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


@router.post("/api/tts/batch", summary="Synthesize the whole text and answer one WAV file",
             response_class=Response, responses={200: {"content": {"audio/wav": {}}}})
async def tts_batch(body: TTSRequest, request: Request, service: TTSService = Depends(get_service)) -> Response:
    fmt = encoders.check_format(body.format, "wav", param="format")
    job = await service.prepare(body.text, body.voice_sample, body.language, body.speed)
    stats = Stats()
    wav = await unless_client_leaves(request, job, service.synthesize(job, stats))
    headers = {"Content-Language": job.language}  # the language spoken (e.g. the one detected)
    if fmt.name == "wav":
        return Response(audio.encode_wav(wav, service.engine.sample_rate), media_type="audio/wav", headers=headers)
    return Response(await encoders.encode_all(wav, fmt, service.engine.sample_rate), media_type=fmt.media_type,
                    headers=headers)


@router.post("/api/tts/stream", summary="Stream audio while it is generated (WAV header, then PCM16 chunks)",
             response_class=StreamingResponse, responses={200: {"content": {"audio/wav": {}}}})
async def tts_stream(body: TTSRequest, service: TTSService = Depends(get_service)) -> StreamingResponse:
    fmt = encoders.check_format(body.format, "wav", param="format")
    job = await service.prepare(body.text, body.voice_sample, body.language, body.speed)
    if fmt.name == "wav":
        return AudioStreamResponse(wav_stream(service, job, Stats()), job, media_type="audio/wav")
    data = encoders.encode(service.stream(job, Stats()), fmt, service.engine.sample_rate, stop=job.release)
    return AudioStreamResponse(encoded_stream(data), job, media_type=fmt.media_type)
