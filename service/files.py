"""Uploaded files (after OpenAI's files API): a client without access to the server's model
roots sends its model or calibration data here, then names it in a job by ``file_id``.

- ``POST /v1/files``: ``multipart/form-data`` with a ``file`` part and a ``purpose`` field
  (``model``: a ``.gguf`` file; ``calibration``: UTF-8 text or an ``activations.npz``). The
  body is streamed to ``<data>/files/.tmp/`` and refused with 413 as soon as it passes
  ``MM_MAX_UPLOAD_BYTES``; the content is checked for its purpose (400 otherwise), then the
  file is renamed to ``<data>/files/<file_id>`` and recorded. Whatever fails, no partial file
  is left behind. With ``MM_MAX_DATA_BYTES`` the upload is refused with 507 as soon as it would
  pass what is left of the quota for uploads and results. The client's file name is metadata
  only: paths come from the id.
- ``GET /v1/files`` (cursor pagination), ``GET /v1/files/{file_id}``,
  ``GET /v1/files/{file_id}/content``, ``DELETE /v1/files/{file_id}`` (409 while a queued or
  running job reads the file).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import unicodedata
from pathlib import Path
from typing import IO, Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Path as PathParam, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from jobstore import FILE_PURPOSES, FileInUse, JobStore, StoredFile, is_file_id, new_file_id
from jobstore.layout import files_dir, stored_file_path
from service.auth import require_api_key
from service.downloads import file_download, open_local
from service.errors import APIError, error_responses
from service.middleware import too_large_message
from service.multipart import MultipartError, MultipartReader, PartData, PartEnd, PartStart, boundary_from_content_type
from service.quota import quota_exceeded, remaining_bytes
from service.schemas import DeletedFile, FileList, FileObject, FilePurpose
from service.state import ServiceState, get_state
from worker.sources import inspect_upload

log = logging.getLogger("metal_marlin.service.files")

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(require_api_key)])

FileId = Annotated[str, PathParam(description="An uploaded file's id (file-...)", max_length=64)]
MAX_FIELD_BYTES = 1024
MAX_FILENAME_CHARS = 255
UPLOAD_PATH = "/v1/files"

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "The file's content"},
                    "purpose": {"type": "string", "enum": list(FILE_PURPOSES), "description": "model: a .gguf file; calibration: UTF-8 text or activations.npz"},
                },
            }
        }
    },
}


def file_to_api(record: StoredFile) -> FileObject:
    return FileObject(
        id=record.id, bytes=record.bytes, created_at=int(record.created_at), filename=record.filename, purpose=record.purpose  # type: ignore[arg-type]
    )


def _file_or_404(store: JobStore, file_id: str) -> StoredFile:
    record = store.get_file(file_id) if is_file_id(file_id) else None
    if record is None:
        raise APIError(404, f"no file {file_id!r}", param="file_id", code="file_not_found")
    return record


def clean_filename(name: str | None) -> str:
    """The client's name for display: its last path component, printable, at most 255 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    return base[:MAX_FILENAME_CHARS] or "upload"


def cleanup_files_dir(store: JobStore, data_dir: Path) -> None:
    """At service start: drop interrupted uploads and files that never got their record."""
    root = files_dir(data_dir)
    shutil.rmtree(root / ".tmp", ignore_errors=True)
    if not root.is_dir():
        return
    known = store.file_ids()
    for child in root.iterdir():
        if child.is_file() and is_file_id(child.name) and child.name not in known:
            log.warning("removing %s: an upload that was never recorded", child)
            child.unlink(missing_ok=True)


def check_purpose(purpose: str) -> None:
    if purpose not in FILE_PURPOSES:
        raise APIError(400, f"invalid value for purpose: expected one of {list(FILE_PURPOSES)}", param="purpose", code="invalid_value")


class _Upload:
    """The state of one multipart upload while its body streams in."""

    def __init__(self, tmp_path: Path, limit: int, quota: tuple[int, int] | None = None) -> None:
        self.tmp_path = tmp_path
        self.limit = limit
        self.quota = quota  # (bytes left under MM_MAX_DATA_BYTES when the upload began, the quota)
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self._part: PartStart | None = None
        self._value = bytearray()
        self._sink: IO[bytes] | None = None

    async def handle(self, event: PartStart | PartData | PartEnd) -> None:
        if isinstance(event, PartStart):
            self._part = event
            self._value = bytearray()
            if event.name == "file":
                if self.filename is not None:
                    raise APIError(400, "send one 'file' part per upload", param="file", code="invalid_multipart")
                if event.filename is None:
                    raise APIError(400, "the 'file' field must be a file part (with a filename)", param="file", code="invalid_multipart")
                self.filename = clean_filename(event.filename)
                self._sink = await anyio.to_thread.run_sync(open, self.tmp_path, "xb")
        elif isinstance(event, PartData):
            assert self._part is not None
            if self._sink is not None and self._part.name == "file":
                self.size += len(event.data)
                if self.size > self.limit:
                    raise APIError(413, too_large_message(self.limit), param="file", code="request_too_large")
                if self.quota is not None and self.size > self.quota[0]:
                    raise quota_exceeded(self.quota[1], "this upload")
                await anyio.to_thread.run_sync(self._sink.write, event.data)
            else:
                self._value += event.data
                if len(self._value) > MAX_FIELD_BYTES:
                    raise APIError(400, f"the form field {self._part.name!r} is longer than {MAX_FIELD_BYTES} bytes", param=self._part.name, code="invalid_value")
        else:
            assert self._part is not None
            if self._part.name == "file" and self._sink is not None:
                await anyio.to_thread.run_sync(self._finish_sink)
            elif self._part.name != "file":
                try:
                    self.fields[self._part.name] = self._value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise APIError(400, f"the form field {self._part.name!r} is not UTF-8", param=self._part.name, code="invalid_value") from exc
                if self._part.name == "purpose":
                    check_purpose(self.fields["purpose"])  # before a file part that follows is uploaded for nothing
            self._part = None

    def _finish_sink(self) -> None:
        assert self._sink is not None
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        self._sink = None

    def discard(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self.tmp_path.unlink(missing_ok=True)


@router.post(
    "",
    response_model=FileObject,
    summary="Upload a file (multipart/form-data: file, purpose)",
    description="`purpose` `model`: a `.gguf` file; `calibration`: UTF-8 text (paragraphs separated by blank "
    "lines) or an `activations.npz` from `metal-marlin collect`. Use the returned id as "
    '`{"source": "file", "file_id": ...}` in a quantization job. Limit: `MM_MAX_UPLOAD_BYTES`.',
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=error_responses(400, 401, 413, 415, 507),
)
async def upload_file(request: Request) -> FileObject:
    state = get_state(request)
    try:
        reader = MultipartReader(boundary_from_content_type(request.headers.get("content-type", "")))
    except MultipartError as exc:
        raise APIError(415, str(exc), code="unsupported_media_type") from exc
    data_dir = state.settings.data_dir
    tmp_dir = files_dir(data_dir) / ".tmp"
    await anyio.to_thread.run_sync(lambda: tmp_dir.mkdir(parents=True, exist_ok=True))
    left = await remaining_bytes(state, "this upload")
    quota = None if left is None or state.settings.max_data_bytes is None else (left, state.settings.max_data_bytes)
    file_id = new_file_id()
    upload = _Upload(tmp_dir / f"{file_id}.part", state.settings.max_upload_bytes, quota)
    published = False
    try:
        try:
            async for chunk in request.stream():
                for event in reader.feed(chunk):
                    await upload.handle(event)
            reader.close()
        except MultipartError as exc:
            raise APIError(400, f"invalid multipart body: {exc}", code="invalid_multipart") from exc
        except ClientDisconnect as exc:  # nobody is left to read an answer; the upload is discarded
            log.info("upload %s: the client disconnected after %d bytes", file_id, upload.size)
            raise APIError(400, "the client disconnected during the upload", code="client_disconnected") from exc
        record = await run_in_threadpool(_publish, state, upload, file_id)
        published = True
    finally:
        if not published:
            await anyio.to_thread.run_sync(upload.discard)
    return file_to_api(record)


def _publish(state: ServiceState, upload: _Upload, file_id: str) -> StoredFile:
    """Validate a complete upload, rename it into place, record it (in that order)."""
    if upload.filename is None:
        raise APIError(400, "missing required parameter: file", param="file", code="missing_required_parameter")
    purpose = upload.fields.get("purpose")
    if purpose is None:
        raise APIError(400, "missing required parameter: purpose", param="purpose", code="missing_required_parameter")
    check_purpose(purpose)
    if upload.size == 0:
        raise APIError(400, "the uploaded file is empty", param="file", code="invalid_file")
    try:
        fmt = inspect_upload(upload.tmp_path, purpose)
    except ValueError as exc:
        raise APIError(400, f"the file does not fit purpose {purpose!r}: {exc}", param="file", code="invalid_file") from exc
    final = stored_file_path(state.settings.data_dir, file_id)
    os.replace(upload.tmp_path, final)
    try:
        return state.store.add_file(file_id, nbytes=upload.size, filename=upload.filename, purpose=purpose, format=fmt, created_at=time.time())
    except BaseException:
        final.unlink(missing_ok=True)
        raise


@router.get("", response_model=FileList, summary="List uploaded files", responses=error_responses(400, 401))
def list_files(
    request: Request,
    after: Annotated[str | None, Query(pattern=r"^file-[0-9a-f]{24}$", description="Id of the last file of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    purpose: Annotated[FilePurpose | None, Query()] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time")] = "desc",
) -> FileList:
    files, has_more = get_state(request).store.list_files(after=after, limit=limit, purpose=purpose, order=order)
    data = [file_to_api(f) for f in files]
    return FileList(data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FileObject, summary="Get an uploaded file's record", responses=error_responses(401, 404))
def get_file(file_id: FileId, request: Request) -> FileObject:
    return file_to_api(_file_or_404(get_state(request).store, file_id))


@router.get(
    "/{file_id}/content",
    summary="Download an uploaded file",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "description": "The file"},
        **error_responses(401, 404),
    },
)
def get_file_content(file_id: FileId, request: Request) -> StreamingResponse:
    state = get_state(request)
    record = _file_or_404(state.store, file_id)
    return file_download(
        open_local(stored_file_path(state.settings.data_dir, record.id)),
        download_name=record.filename,
        ascii_name=record.id,
        media_type="application/octet-stream",
        missing=APIError(404, f"the content of file {file_id} is gone", param="file_id", code="file_not_found"),
    )


@router.delete("/{file_id}", response_model=DeletedFile, summary="Delete an uploaded file", responses=error_responses(401, 404, 409))
def delete_file(file_id: FileId, request: Request) -> DeletedFile:
    state = get_state(request)
    _file_or_404(state.store, file_id)
    try:
        state.store.delete_file(file_id)
    except KeyError as exc:
        raise APIError(404, f"no file {file_id!r}", param="file_id", code="file_not_found") from exc
    except FileInUse as exc:
        raise APIError(409, str(exc), param="file_id", code="file_in_use") from exc
    stored_file_path(state.settings.data_dir, file_id).unlink(missing_ok=True)
    return DeletedFile(id=file_id, deleted=True)
