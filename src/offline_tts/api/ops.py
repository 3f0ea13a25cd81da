"""Operations endpoints: liveness, readiness and Prometheus metrics. All cheap: no model call, no disk."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..errors import ModelNotReady
from ..service import TTSService
from .deps import get_service
from .errors import error_response

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers (no API key needed)")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: 200 once the model is loaded and warm, 503 before",
            responses={503: {"description": "Model not loaded yet (or failed to load)"}})
async def ready(service: TTSService = Depends(get_service)) -> Response:
    if not service.ready:
        detail = f" ({service.error})" if service.error else ""
        return error_response(ModelNotReady(f"The model is not ready: {service.state}{detail}.",
                                            "Wait and retry; a failed load is explained in the server log."))
    return JSONResponse({"status": "ready", "model": service.state, "workers": service.workers,
                         "load_seconds": round(service.load_seconds or 0.0, 3)})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
