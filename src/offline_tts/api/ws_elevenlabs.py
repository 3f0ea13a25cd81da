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

import base64
import math

from fastapi import APIRouter, WebSocket

from ..encoders import AudioFormat
from ..errors import UnsupportedFormat
from .ws_common import Refusal, SpeechConnection

router = APIRouter()

_PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
_BITRATES = (32, 64, 96, 128, 192)
_MP3 = ("-c:a", "libmp3lame", "-write_xing", "0", "-id3v2_version", "0", "-f", "mp3")
_OPUS = ("-c:a", "libopus", "-frame_duration", "20", "-page_duration", "100000", "-f", "ogg")
ENGINE_RATE = 24_000


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


@router.websocket("/v1/text-to-speech/{voice_id}/stream-input")
async def stream_input(websocket: WebSocket, voice_id: str) -> None:
    await ElevenLabsConnection(websocket, voice_id).serve()
