"""All service settings in one place: environment variables with the `TTS_` prefix and/or a `.env` file."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .engine.model_files import DEFAULT_BASE_URL as DEFAULT_MODEL_URL


def default_torch_threads() -> int:
    """One thread fewer than the physical CPU cores, at least 1 (measured with `python -m bench`: on 2 cores
    the GPT is memory-bound, so 2 threads gain nothing, and torch's spinning OpenMP threads run it 5-10x
    slower whenever anything else, such as the server's own event loop, needs a core)."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores - 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TTS_", env_file=".env", extra="ignore")

    # Paths
    model_dir: Path = Field(Path("models/xtts_v2"), description="XTTS-v2 files: config.json, model.pth, vocab.json, speakers_xtts.pth")
    voices_dir: Path = Field(Path("voices"), description="Reference clips (any format ffmpeg reads), one file or folder per voice")
    cache_dir: Path = Field(Path("cache"), description="Decoded clips, voice conditioning latents and the saved defaults")

    # Server
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 to accept other machines; the Docker image does)")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on")
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM): serve https:// and wss:// (the elevenlabs SDK "
                                      "only speaks wss); with TTS_SSL_KEYFILE")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM) of TTS_SSL_CERTFILE")
    log_level: str = Field("info", description="debug, info, warning or error")
    log_json: bool = Field(False, description="One JSON object per log line")

    # Model
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU when CUDA is available, else the CPU")
    language: str = Field("es", description="Default language when neither the request, its voice nor /api/config gives one; "
                                             "auto: detect it from each text (es, en, zh or zh-CN, ...)")
    language_fallback: str = Field("en", description="Language auto: the language of a text too short or ambiguous to "
                                                     "detect, when neither its voice nor the default names one")
    accept_license: bool = Field(False, description="Accept the Coqui Public Model License so the model may be downloaded")
    model_url: str = Field(DEFAULT_MODEL_URL, description="Where the XTTS-v2 files are downloaded from")
    download: bool = Field(True, description="Download the model when it is missing (needs accept_license)")
    max_audio_tokens: int | None = Field(None, ge=1, description="Absolute cap of audio tokens generated per sentence")
    torch_threads: int = Field(default_factory=default_torch_threads, ge=0,
                               description="torch intra-op threads; default: CPU cores - 1 (at least 1); 0 = torch's default")
    half: bool = Field(True, description="Half precision (fp16) for the GPT on CUDA")
    cuda_graphs: bool = Field(True, description="CUDA only: replay the batched GPT decode step from CUDA graphs "
                                                "(fewer kernel launches per step; not yet measured on a GPU)")
    vocoder_thread: bool = Field(True, description="Run HiFi-GAN on a thread of its own per replica, overlapping the "
                                 "GPT steps (false: on the replica's thread, between steps)")
    cpu_int8: bool = Field(False, description="CPU only: dynamic int8 GPT (about 3x faster per token here; quality unverified without the real weights)")
    temperature: float = Field(0.75, gt=0, description="Sampling temperature of the GPT (XTTS default)")
    top_k: int = Field(50, ge=1, description="Top-k sampling (XTTS default)")
    top_p: float = Field(0.85, gt=0, le=1, description="Nucleus sampling (XTTS default)")
    repetition_penalty: float = Field(10.0, gt=0, description="Repetition penalty (XTTS default)")
    greedy: bool = Field(False, description="Greedy decoding (deterministic output; for tests)")
    seed: int | None = Field(None, description="Each sentence samples from its own RNG seeded with this "
                             "(reproducible with any TTS_WORKERS, whatever shares its batch)")

    # Streaming
    stream_first_chunk_tokens: int = Field(8, ge=1, description="Audio tokens in the first streamed chunk (small = early first audio)")
    stream_chunk_tokens: int = Field(24, ge=1, description="Audio tokens in the second streamed chunk; later ones double")
    stream_max_chunk_tokens: int = Field(96, ge=1, description="Largest streamed chunk, in audio tokens")
    stream_context_tokens: int = Field(4, ge=0, description="Left context decoded with each chunk so seams match the one-shot decode")
    stream_max_buffer_seconds: float = Field(
        30.0, ge=0, description="A stream whose client stops reading is dropped once this much audio waits unread (0 = no limit)")
    stream_stall_seconds: float = Field(
        60.0, ge=0, description="A stream is dropped when its client takes no data for this long (0 = no limit)")

    # Capacity
    workers: int = Field(1, ge=1, description="Model replicas (each a full copy of the model, batching its own requests)")
    max_batch: int = Field(0, ge=0, description="Sentences decoded together per replica, one per running request "
                           "(0 = by device: 8 on CPU, 32 on CUDA)")
    max_queue: int = Field(8, ge=0, description="Requests allowed to wait for a free slot; beyond it: 503 + Retry-After")
    voice_cache_size: int = Field(64, ge=1, description="Voices whose conditioning is kept in memory")

    # Limits
    max_text_chars: int = Field(5000, ge=1, description="Longest text accepted per request")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest JSON request body")
    max_upload_bytes: int = Field(20_000_000, ge=1024, description="Largest uploaded clip (per file)")
    max_clip_seconds: float = Field(60.0, gt=0, description="Longest clip: a longer upload is refused; "
                                    "of a longer clip in the voices directory only this much is used")
    min_clip_seconds: float = Field(2.0, gt=0, description="Shortest usable clip")
    max_header_bytes: int = Field(16384, ge=1024, description="Largest request header block (request line included); beyond it: 431")
    max_headers: int = Field(100, ge=8, description="Most request headers; beyond it: 431")

    # WebSocket routes (/api/tts/ws, ElevenLabs stream-input): per-connection limits
    ws_clause_chars: int = Field(100, ge=0, description="Text in pieces: a clause break (, ; :) after this many characters "
                                 "ends a piece even without a sentence end, so a long sentence starts sooner (0 = off)")
    ws_max_message_bytes: int = Field(65536, ge=1024, description="Largest WebSocket message from a client; beyond it: close 1009")
    ws_max_buffered_chars: int = Field(5000, ge=1, description="Text a connection may have received and not yet spoken; "
                                       "beyond it: close 1008")
    ws_max_characters: int = Field(100_000, ge=1, description="Text one connection may send in all; beyond it: close 1008")
    ws_idle_seconds: float = Field(60.0, gt=0, description="A connection that sends nothing for this long while nothing is "
                                   "being spoken is closed (1008); the first message must come within it too")

    # Security
    api_key: str | None = Field(None, description="When set, every route but /health (and the public lists) needs "
                                                  "`Authorization: Bearer <key>`; surrounding whitespace is ignored, empty = no key")
    public_lists: bool = Field(True, description="With an API key set, GET /v1/models, /v1/audio/voices and /v1/audio/models "
                                                 "still answer without it (Open WebUI asks without the key); false = key needed")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS, comma-separated or a JSON list (none by default)")

    # OpenAI compatibility: OpenAI voice name -> voice of this service (empty = the default voice)
    openai_voice_map: dict[str, str] = Field(
        default_factory=dict,
        description='OpenAI voice names mapped to voices of this service, JSON: {"alloy": "ana", "nova": "my_voice_sample"}; '
                    "OpenAI names left out use the default voice, else the first voice by name")
    model_name: str = Field("xtts-v2", description="This model's id on /v1/models; /v1/audio/speech also accepts OpenAI's "
                                                   "names (tts-1, tts-1-hd, gpt-4o-mini-tts and their dated snapshots)")

    shutdown_grace_seconds: float = Field(20.0, ge=0, description="How long running streams may finish on SIGTERM")

    # Home Assistant (Wyoming protocol)
    wyoming_uri: str | None = Field(None, description="Also serve the Wyoming protocol (Home Assistant) here, e.g. "
                                                      "tcp://0.0.0.0:10200 (or unix:///path); unset = off")
    wyoming_without_key: bool = Field(False, description="With TTS_API_KEY set, also serve Wyoming (which cannot carry "
                                                         "a key) on a network address; without it only loopback or "
                                                         "unix:// is allowed")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, v: object) -> object:
        if isinstance(v, str):  # "https://a.example,https://b.example" or '["https://a.example"]'
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _strip_key(cls, v: object) -> object:
        # A secrets file or env_file often ends the key with a newline; clients' keys are stripped too.
        if isinstance(v, str):
            if v and not v.strip():
                raise ValueError("the key is only whitespace: set the real key, or leave it empty for no key")
            return v.strip() or None
        return v

    @field_validator("wyoming_uri", mode="before")
    @classmethod
    def _wyoming_uri(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if not v:  # `TTS_WYOMING_URI=` (an empty line in .env / compose): off
                return None
            from urllib.parse import urlparse

            url = urlparse(v)
            try:
                port = url.port
            except ValueError:
                port = None
            if url.scheme == "tcp" and (not url.hostname or port is None):
                raise ValueError("a tcp:// address needs a host and a port, e.g. tcp://0.0.0.0:10200")
            if url.scheme == "unix" and not url.path:
                raise ValueError("a unix:// address needs a socket path, e.g. unix:///run/offline-tts.sock")
            if url.scheme not in ("tcp", "unix"):
                raise ValueError("use tcp://HOST:PORT (e.g. tcp://0.0.0.0:10200) or unix:///PATH")
        return v

    @model_validator(mode="after")
    def _wyoming_needs_no_key(self) -> Settings:
        """Every protocol checks the API key when one is set; Wyoming has no way to send one, so with a key it
        listens only where nobody else can reach it, unless the operator says otherwise knowingly."""
        if self.api_key and self.wyoming_uri and not self.wyoming_without_key:
            from urllib.parse import urlparse

            url = urlparse(self.wyoming_uri)
            if url.scheme == "tcp" and url.hostname not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError(
                    f"TTS_API_KEY is set, but the Wyoming protocol (TTS_WYOMING_URI={self.wyoming_uri}) cannot carry "
                    "a key: anyone who reaches that address could use the service. Listen on loopback "
                    "(tcp://127.0.0.1:10200) or a unix:// socket, or set TTS_WYOMING_WITHOUT_KEY=true to serve it "
                    "without a key on purpose (e.g. on a trusted home network for Home Assistant)")
        return self

    @field_validator("language", "language_fallback")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()

    @property
    def license_accepted(self) -> bool:
        """TTS_ACCEPT_LICENSE=true, or coqui's own convention COQUI_TOS_AGREED=1."""
        return self.accept_license or os.environ.get("COQUI_TOS_AGREED") == "1"

    @property
    def defaults_file(self) -> Path:
        return self.cache_dir / "defaults.json"


@lru_cache
def get_settings() -> Settings:
    return Settings()
