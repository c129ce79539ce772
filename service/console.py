"""The web console: a jobs page, a job page and a chat playground, served at ``/``.

The pages are static files shipped inside the package (``service/console/``: plain HTML, CSS
and ES modules, so there is no build step and nothing comes from a CDN). Everything they show
comes from the ``/v1`` API in the browser, with the API key as the bearer token; so without a
key a client gets only what these files hold (the page shell and its login form), never data.

Why a fixed table instead of a static-files mount: the files are read once, when the app is
built, and a request can name only one of them (``/console/<name>``, looked up in a dict), so no
request path, however encoded, reaches the file system.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response

from service.errors import APIError

CONSOLE_DIR = Path(__file__).with_name("console")
ASSET_PREFIX = "/console/"
#: Names a console file may have: one path segment, lower case, a known extension.
ASSET_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}\.(html|js|css|svg)$")
MEDIA_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
}
#: The pages talk to this server only; scripts and styles are the shipped files (no inline code).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "script-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidate every time (the ETag makes that a 304): an upgraded server never serves stale pages
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(folder: Path = CONSOLE_DIR) -> dict[str, Asset]:
    """The console's files by name, read into memory (a few tens of KB). Files whose names do
    not fit :data:`ASSET_NAME` are not served."""
    assets: dict[str, Asset] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = ASSET_NAME.match(path.name)
        if match and path.is_file():
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            assets[path.name] = Asset(body, MEDIA_TYPES[match.group(1)], etag)
    return assets


def _serve(asset: Asset, request: Request) -> Response:
    headers = {**SECURITY_HEADERS, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def console_router(assets: dict[str, Asset] | None = None) -> APIRouter:
    """Routes for ``/`` (the page) and ``/console/<name>`` (its files); not in the OpenAPI
    document, which describes the API."""
    table = load_assets() if assets is None else assets
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def index(request: Request) -> Response:
        page = table.get("index.html")
        if page is None:  # a broken install: say so instead of a bare 404
            raise APIError(404, "the web console's files are not installed", code="console_not_installed")
        return _serve(page, request)

    @router.get(ASSET_PREFIX + "{name}")
    def asset(name: str, request: Request) -> Response:
        found = table.get(name)
        if found is None:
            raise APIError(404, f"no console file {name!r}", param="name", code="not_found")
        return _serve(found, request)

    return router
