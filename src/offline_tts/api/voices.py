"""Voice management over HTTP: list, upload (checked, conditioned, then stored atomically), delete.

The form is read as it arrives (multipart_upload.py); the service checks, conditions and stores the voice
(nothing reaches the voices directory before the clips are known to be usable; a refused upload leaves
nothing behind, neither in the voices directory nor in the cache; a full disk is a 507).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..service import TTSService
from ..voices import disk_full_refused
from .deps import get_service
from .middleware import UPLOAD_FILES_PER_REQUEST
from .multipart_upload import BadUpload, as_bool, receive_upload

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/api/voices", summary="List the voices with their clips, duration, format and cache state")
async def list_voices(service: TTSService = Depends(get_service)) -> dict:
    return {"voices": await asyncio.to_thread(service.describe_voices)}


@router.post("/api/voices", status_code=201, summary="Upload a voice: one clip, or several clips of one speaker",
             responses={201: {"description": "Stored and conditioned, ready to use"}})
async def upload_voice(request: Request, service: TTSService = Depends(get_service)) -> JSONResponse:
    """Multipart form: `name` (letters, digits, `_`, `-`), `files` (one or more clips, any format ffmpeg
    reads, 5-15 s ideal), `replace` (true to overwrite an existing voice) and `language` (optional: the
    voice's own language, used when a request names none; `auto` detects it from each text)."""
    # Conditioning uses the model: the upload takes a place in the line like a synthesis, before its body
    # is read, so a refused upload (503 + Retry-After) reads and stores nothing.
    async with service.admission():
        store = service.voices
        with store.staging() as staging, disk_full_refused():
            form = await receive_upload(request, staging, service.settings.max_upload_bytes, UPLOAD_FILES_PER_REQUEST)
            name = store.check_upload_name(form.fields.get("name", ""))
            replace = as_bool(form.fields.get("replace"), "replace")
            if not form.files:
                raise BadUpload("No audio file in the upload.", "Send one or more clips in the 'files' field.")
            voice = await service.add_voice(name, form.files, staging, replace, form.fields.get("language"))
    return JSONResponse({"voice": await asyncio.to_thread(service.describe_voice, voice)}, status_code=201)


@router.delete("/api/voices/{name}", summary="Delete a voice: its clip(s) and its cached conditioning")
async def delete_voice(name: str, service: TTSService = Depends(get_service)) -> dict:
    removed = await service.delete_voice(name)
    return {"status": "ok", "message": f"Voice {removed.name!r} deleted.", "deleted": removed.name}
