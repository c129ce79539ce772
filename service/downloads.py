"""Stream a file (from the data directory or the result store) as a download."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from fastapi.responses import StreamingResponse

from jobstore.results import ResultFile, read_chunks
from service.errors import APIError


def open_local(path: Path) -> ResultFile | None:
    """A file of this host's disk, held open from here on (a concurrent delete cannot cut the
    download short); None when it is gone."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    return ResultFile(size=os.fstat(handle.fileno()).st_size, chunks=read_chunks(handle))


def file_download(opened: ResultFile | None, *, download_name: str, ascii_name: str, media_type: str, missing: APIError) -> StreamingResponse:
    """Stream ``opened`` (``missing`` is raised when it is None). ``download_name`` may be any
    text (sent as RFC 5987 ``filename*``), ``ascii_name`` is the plain fallback."""
    if opened is None:
        raise missing
    return StreamingResponse(opened.chunks, media_type=media_type, headers={"Content-Length": str(opened.size), "Content-Disposition": attachment(download_name, ascii_name)})


def attachment(download_name: str, ascii_name: str) -> str:
    """A ``Content-Disposition`` value for a download."""
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(download_name, safe='')}"
