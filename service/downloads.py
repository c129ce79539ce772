"""Stream a file from the data directory as a download."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.responses import StreamingResponse

from service.errors import APIError


def _iter_file(handle: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    try:
        while data := handle.read(chunk):
            yield data
    finally:
        handle.close()


def file_download(path: Path, *, download_name: str, ascii_name: str, media_type: str, missing: APIError) -> StreamingResponse:
    """The file at ``path``, held open from here on (a concurrent delete cannot cut the download
    short); ``missing`` is raised when it is gone. ``download_name`` may be any text (sent as
    RFC 5987 ``filename*``), ``ascii_name`` is the plain fallback."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError as exc:
        raise missing from exc
    size = os.fstat(handle.fileno()).st_size
    disposition = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(download_name, safe='')}"
    return StreamingResponse(
        _iter_file(handle), media_type=media_type, headers={"Content-Length": str(size), "Content-Disposition": disposition}
    )
