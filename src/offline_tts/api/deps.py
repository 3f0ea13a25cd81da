"""FastAPI dependencies: how routers reach the service (injected, so tests can swap it)."""

from __future__ import annotations

from fastapi import Request

from ..service import TTSService


def get_service(request: Request) -> TTSService:
    return request.app.state.service

