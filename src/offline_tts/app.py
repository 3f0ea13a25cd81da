"""The application factory: settings in, a ready FastAPI app out (the model loads in the background)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from . import __version__
from .api import native, ops, ws_elevenlabs, ws_native
from .api import openai as openai_api
from .api import ui as ui_page
from .api import voices as voices_api
from .api.errors import install_error_handlers
from .api.middleware import install_middleware
from .config import Settings, get_settings
from .metrics import Metrics
from .service import EngineFactory, TTSService

log = logging.getLogger(__name__)


def xtts_factory(settings: Settings) -> EngineFactory:
    def build():
        import torch  # imported here, in the loading thread, so the port opens without waiting for torch

        from .engine.xtts import XttsEngine

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)

        return XttsEngine(
            settings.model_dir, settings.device, max_audio_tokens=settings.max_audio_tokens, half=settings.half, cpu_int8=settings.cpu_int8,
            temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty, greedy=settings.greedy, seed=settings.seed,
        )

    return build


async def prepare_model(settings: Settings) -> None:
    """Download the model if it is missing and the license was accepted (in a thread: it can take minutes)."""
    from .engine.download import ensure_model

    await asyncio.to_thread(ensure_model, settings.model_dir, accept_license=settings.license_accepted,
                            base_url=settings.model_url, allow_download=settings.download)


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    settings = settings or get_settings()
    service = TTSService(settings, engine_factory or xtts_factory(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def start() -> None:
            try:
                await service.load(prepare=(lambda: prepare_model(settings)) if engine_factory is None else None)
                log.info("TTS service online at http://%s:%d (docs: /docs, playground: /ui)", settings.host, settings.port)
            except Exception as exc:  # the service keeps the state and the message /ready shows
                log.error("Model could not be loaded: %s", exc)
                if app.state.on_fatal is not None:  # `offline-tts serve` stops: a server that can never be ready
                    app.state.on_fatal()

        wyoming = None
        if settings.wyoming_uri:  # listens at once; answers `error` (model not ready) until the model is loaded
            from .wyoming_server import WyomingServer

            wyoming = WyomingServer(service, app.state.metrics, settings.wyoming_uri)
            try:
                await wyoming.start()
            except OSError as exc:  # the address is taken or not ours: the service cannot do what it was asked
                service.state, service.error = "failed", f"Wyoming address {settings.wyoming_uri}: {exc.strerror or exc}"
                log.error("Cannot listen for Wyoming on %s (TTS_WYOMING_URI): %s", settings.wyoming_uri, exc)
                if app.state.on_fatal is not None:
                    app.state.on_fatal()
                yield
                return
        task = asyncio.create_task(start())
        yield
        task.cancel()
        if wyoming is not None:
            await wyoming.stop()

    app = FastAPI(
        title="Offline TTS (XTTS-v2 voice cloning)",
        version=__version__,
        description="Text to speech in a voice cloned from a 5-15 s clip: batch WAV, streaming, OpenAI-compatible.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.on_fatal = None  # set by the CLI: what to do when the model cannot be loaded
    app.state.metrics = Metrics(service.figures)  # one registry per app: several apps in one process do not clash
    install_error_handlers(app)
    install_middleware(app, settings, app.state.metrics)
    app.include_router(ops.router)
    app.include_router(native.router, tags=["tts"])
    app.include_router(voices_api.router, tags=["voices"])
    app.include_router(openai_api.router, tags=["openai"])
    app.include_router(ws_native.router)
    app.include_router(ws_elevenlabs.router)
    app.include_router(ui_page.router)
    return app
