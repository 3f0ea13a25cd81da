"""The web playground: one static page (plain HTML/JS/CSS in offline_tts/web, no build step) at /ui.

The page is public even when an API key is set: it holds no data, and it is where the user types the key.
"""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=1)
def _page_template() -> str:
    return (WEB_DIR / "index.html").read_text(encoding="utf-8")


@router.get("/ui", response_class=HTMLResponse)
@router.get("/ui/", response_class=HTMLResponse)
async def page(request: Request) -> HTMLResponse:
    # <base> makes the page's relative URLs (assets under ui/, API under ../) work at /ui, /ui/
    # and behind a reverse proxy that mounts the service under a prefix (root_path).
    base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/ui/", quote=True)
    return HTMLResponse(_page_template().replace("{{BASE}}", base), headers={"Cache-Control": "no-cache"})


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the filesystem
        raise HTTPException(404, f"No such file: /ui/{name}. The playground is at /ui.")
    return FileResponse(WEB_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
