"""Quantization jobs API (after OpenAI's fine-tuning jobs API).

``POST /v1/quantization/jobs`` validates the request completely before queuing it: sources
must be the built-in model or lie under the model roots, and the group size must divide the
model's layer widths (checked from its config/GGUF metadata, without loading weights), so a
job that cannot run is refused with a 400 instead of failing later.

Sources: the built-in model and Wikipedia text, uploaded files (``{"source": "file",
"file_id": ...}``, see :mod:`service.files`), or paths under the model roots. ``model`` also
takes a name, as OpenAI's jobs APIs do (see :func:`model_source_for_name`): it is stored as
the object it stands for, so the worker only ever reads objects.

``GET .../{id}/events`` lists events, or with ``?stream=true`` (or ``Accept:
text/event-stream``) follows them live as Server-Sent Events until the job ends.

``export_format: "autoawq"`` also writes an AutoAWQ GEMM export of the result (downloaded with
``GET .../{id}/result?format=autoawq``); such a job needs ``bits: 4`` and ``salient_ratio: 0``
(AutoAWQ has no fp16 side channels) and is refused with 422 naming the parameter otherwise.

``Idempotency-Key``: the same key with the same body returns the original job (header
``Idempotent-Replayed: true``); the same key with a different body is refused with 422.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path as PathType  # ``Path`` is FastAPI's path parameter here
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from jobstore import (
    IdempotencyConflict,
    Job,
    JobEvent,
    JobStateError,
    JobStore,
    OwnerLimit,
    QueueFull,
    fingerprint,
    is_file_id,
    is_job_id,
    parse_event_id,
)
from jobstore.results import result_rel
from metal_marlin.assets import BUILTIN_MODEL_NAME, BUILTIN_MODELS, builtin_model_path
from service.auth import request_owner, require_api_key
from service.downloads import file_download
from service.errors import APIError, error_responses, sse_error
from service.openai_api import SSE_HEADERS
from service.quota import remaining_bytes
from service.schemas import (
    BuiltinModelSource,
    DeletedJob,
    ExportFormat,
    FileModelSource,
    ModelSourceObject,
    PathModelSource,
    QuantizationJob,
    QuantizationJobCreate,
    QuantizationJobEvent,
    QuantizationJobEventList,
    QuantizationJobList,
)
from service.state import ServiceState, get_state
from worker.sources import SourceError, check_quantizable, model_widths, resolve_file_source, resolve_under_roots

log = logging.getLogger("metal_marlin.service.jobs")

router = APIRouter(prefix="/v1/quantization/jobs", tags=["quantization jobs"], dependencies=[Depends(require_api_key)])

JobId = Annotated[str, Path(description="A quantization job id (qjob-...)", max_length=64)]
AUTO_GROUP_SIZES = (128, 64, 32)
EVENT_ID_PATTERN = r"^qjev-[0-9]{1,18}$"
EVENT_POLL_S = 0.5
EVENT_KEEPALIVE_S = 15.0
EVENT_STREAM_MAX_S = 3600.0


def _job_or_404(state: ServiceState, job_id: str) -> Job:
    job = state.store.get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise APIError(404, f"no quantization job {job_id!r}", param="job_id", code="job_not_found")
    return job


def _model_name(model: dict[str, Any]) -> str:
    if model["source"] == "builtin":
        return model.get("name", BUILTIN_MODEL_NAME)
    if model["source"] == "file":
        return model["file_id"]
    return model["path"]


def job_to_api(job: Job) -> QuantizationJob:
    spec = job.spec
    model = spec["model"]
    calibration = spec.get("calibration") or {"source": "builtin"}
    succeeded = job.status == "succeeded"
    result = (job.result or {}) if succeeded else {}
    return QuantizationJob(
        id=job.id,
        created_at=int(job.created_at),
        started_at=int(job.started_at) if job.started_at else None,
        finished_at=int(job.finished_at) if job.finished_at else None,
        status=job.status,  # type: ignore[arg-type]
        model=_model_name(model),
        model_source={"source": model["source"], "path": model.get("path"), "file_id": model.get("file_id")},
        calibration={"source": calibration["source"], "path": calibration.get("path"), "file_id": calibration.get("file_id")},
        hyperparameters=spec["hyperparameters"],
        progress=job.progress if job.status == "running" else None,
        cancel_requested=job.cancel_requested and not succeeded,
        error=job.error if job.status == "failed" else None,
        result_model=job.id if succeeded else None,
        export_format=spec.get("export_format", "mlx"),
        result_formats=_result_formats(job),
        result_files=result.get("files", []),
        autoawq_result_files=result.get("autoawq_files", []),
        stats=result.get("stats") if succeeded else None,
    )


def _result_formats(job: Job) -> list[str]:
    """Formats of a succeeded job's result (jobs from before exports hold ``mlx`` only)."""
    if job.status != "succeeded":
        return []
    return list((job.result or {}).get("formats", ["mlx"]))


def check_export_format(body: QuantizationJobCreate) -> None:
    """AutoAWQ GEMM holds 4-bit weights with integer zero points and nothing else: 422 otherwise."""
    if body.export_format != "autoawq":
        return
    if body.bits != 4:
        raise APIError(422, f"export_format 'autoawq' needs bits 4 (AutoAWQ GEMM is 4-bit only), got {body.bits}", param="bits", code="unsupported_export_format")
    if body.salient_ratio != 0:
        raise APIError(
            422, f"export_format 'autoawq' needs salient_ratio 0 (AutoAWQ cannot hold fp16 salient channels), got {body.salient_ratio}",
            param="salient_ratio", code="unsupported_export_format",
        )


def _served_model_path(name: str, served: PathType, roots: list[PathType]) -> str:
    """A served model's path as a job's ``model.path``: relative to the model root that holds
    it, so the job does not show clients the server's absolute path (model cards do not
    either); absolute only where an earlier root holds the same relative path (relative paths
    are tried root by root). Jobs read models only under the roots, so a served model
    elsewhere cannot be quantized: :class:`SourceError` then."""
    try:
        resolved = resolve_under_roots(str(served), roots, param="model", what="model")
    except SourceError as exc:
        reason = (
            "it is not under the server's model roots (MM_MODEL_ROOTS), the only places quantization jobs read models from"
            if exc.code == "path_not_allowed" else "its file or folder no longer exists"
        )
        raise SourceError(f"served model {name!r} cannot be quantized: {reason}", param="model", code=exc.code) from exc
    root = next(r for r in roots if resolved.is_relative_to(r))
    relative = str(resolved.relative_to(root))
    return relative if resolve_under_roots(relative, roots, param="model", what="model") == resolved else str(resolved)


def model_source_for_name(name: str, state: ServiceState) -> ModelSourceObject:
    """The object a job's ``model`` given as a string stands for, so that the stored spec (and
    the worker, which reads it) is exactly what sending that object gives. Names are the ids
    ``GET /v1/models`` lists, then upload ids. A job id is refused with 400 (its result is
    quantized, and ``open_checkpoint`` only reads float checkpoints); anything else is 404."""
    if name in BUILTIN_MODELS:
        return BuiltinModelSource(name=name)
    served = state.settings.served_models.get(name)
    if served is not None:
        return PathModelSource(source="path", path=_served_model_path(name, served, state.settings.roots))
    if is_file_id(name):
        return FileModelSource(source="file", file_id=name)
    job = state.store.get(name) if is_job_id(name) else None
    if job is not None:
        raise APIError(
            400,
            f"model {name!r} is a quantization job, whose result is already quantized; jobs quantize float "
            f"(fp32/fp16/bf16) checkpoints: submit the model that job started from ({_model_name(job.spec['model'])!r}) instead",
            param="model",
            code="model_already_quantized",
        )
    raise APIError(
        404,
        f"no model {name!r} to quantize: model takes a built-in model's name ({', '.join(map(repr, BUILTIN_MODELS))}), a served "
        "model's name (GET /v1/models), an uploaded model's file id (file-...), or an object with source "
        "'builtin', 'path' or 'file'",
        param="model",
        code="model_not_found",
    )


def _declares_quantization(folder: PathType) -> bool:
    """Whether a model folder's config.json declares a quantization (MLX ``quantization``, or
    any ``quantization_config``): ``open_checkpoint`` refuses such a folder, so a job on it
    could only fail in the worker."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config.get("quantization") is not None or bool(config.get("quantization_config"))


def build_spec(body: QuantizationJobCreate, state: ServiceState) -> dict[str, Any]:
    """The stored job spec: sources resolved under the roots, hyperparameters complete."""
    check_export_format(body)
    roots = state.settings.roots
    data_dir = state.settings.data_dir
    # A model given by name: errors name ``model``, the field the client sent.
    file_param, path_param = ("model", "model") if isinstance(body.model, str) else ("model.file_id", "model.path")
    try:
        source = model_source_for_name(body.model, state) if isinstance(body.model, str) else body.model
        if source.source == "builtin":
            model: dict[str, Any] = {"source": "builtin"}
            if source.name != BUILTIN_MODEL_NAME:  # the default's spec stays as it always was
                model["name"] = source.name
            model_path = None
        elif source.source == "file":
            _, model_path = resolve_file_source(state.store, data_dir, source.file_id, purpose="model", param=file_param)
            model = {"source": "file", "file_id": source.file_id}
        else:
            model_path = resolve_under_roots(source.path, roots, param=path_param, what="model")
            if not (model_path.is_dir() or model_path.is_file()):
                raise SourceError(f"{path_param} must be a .gguf file or a model folder", param=path_param, code="invalid_model")
            model = {"source": "path", "path": source.path, "resolved": str(model_path)}
        cal = body.calibration
        if cal.source == "builtin":
            calibration: dict[str, Any] = {"source": "builtin"}
        elif cal.source == "file":
            record, _ = resolve_file_source(state.store, data_dir, cal.file_id, purpose="calibration", param="calibration.file_id")
            calibration = {"source": "file", "file_id": cal.file_id, "format": record.format}
        else:
            cal_path = resolve_under_roots(cal.path, roots, param="calibration.path", what="calibration file")
            if not cal_path.is_file():
                raise SourceError("calibration.path must be a file", param="calibration.path", code="invalid_calibration")
            calibration = {"source": cal.source, "path": cal.path, "resolved": str(cal_path)}
    except SourceError as exc:
        raise APIError(400, exc.message, param=exc.param, code=exc.code) from exc

    try:
        if model.get("name"):  # a built-in model other than the default (assembled on first use)
            model_path = builtin_model_path(model["name"])
        widths = model_widths(model_path)
    except FileNotFoundError as exc:  # the built-in model's package is not installed
        raise APIError(400, str(exc), param="model", code="model_not_available") from exc
    except (ValueError, OSError) as exc:
        raise APIError(400, f"cannot read the model: {exc}", param=path_param, code="invalid_model") from exc
    if model_path is not None and model_path.is_dir() and _declares_quantization(model_path):
        raise APIError(
            400, "the model is already quantized (its config.json declares a quantization); jobs quantize float "
            "(fp32/fp16/bf16) checkpoints", param=path_param, code="model_already_quantized",
        )

    group_size = body.group_size
    if group_size is None:
        fits = [g for g in AUTO_GROUP_SIZES if all(w % g == 0 for w in widths.as_tuple())]
        if not fits:
            raise APIError(400, f"no supported group size divides the model's layer widths {widths.as_tuple()}", param="group_size", code="invalid_group_size")
        group_size = fits[0]
    try:
        check_quantizable(widths, body.bits, group_size)
    except ValueError as exc:
        raise APIError(400, str(exc), param="group_size", code="invalid_group_size") from exc

    return {
        "model": model,
        "calibration": calibration,
        "hyperparameters": {
            "bits": body.bits,
            "group_size": group_size,
            "salient_ratio": body.salient_ratio,
            "activation_method": body.activation_method,
            "n_samples": body.n_samples,
            "seq_len": body.seq_len,
            "n_grid": body.n_grid,
            "duo_scaling": body.duo_scaling,
            "method": body.method,
            "rounding_steps": body.rounding_steps,
        },
        "export_format": body.export_format,
    }


async def _wake_worker(state: ServiceState) -> None:
    """Best effort: every worker polls the queue anyway."""
    await state.supervisor.broadcast("POST", "/jobs/wake", timeout_s=2.0)


@router.post(
    "",
    response_model=QuantizationJob,
    summary="Create a quantization job",
    responses=error_responses(400, 401, 404, 413, 422, 429, 507),
)
async def create_job(
    body: QuantizationJobCreate,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
               description="Retry-safe submission: the same key and body return the same job."),
    ] = None,
) -> QuantizationJob:
    state = get_state(request)
    fp = fingerprint(body.model_dump(mode="json"))
    if idempotency_key is not None:
        seen = await run_in_threadpool(state.store.lookup_idempotency, idempotency_key)
        if seen is not None:
            if seen[0] != fp:
                raise APIError(
                    422,
                    f"Idempotency-Key {idempotency_key!r} was already used with a different request body",
                    param="Idempotency-Key",
                    code="idempotency_key_reused",
                )
            existing = await run_in_threadpool(state.store.get, seen[1])
            if existing is not None:
                response.headers["Idempotent-Replayed"] = "true"
                return job_to_api(existing)
    spec = await run_in_threadpool(build_spec, body, state)
    await remaining_bytes(state, "a new result")
    try:
        job, created = await run_in_threadpool(
            lambda: state.store.create_job(
                spec,
                idempotency_key=idempotency_key,
                request_fingerprint=fp,
                max_queued=state.settings.max_queued_jobs,
                owner=request_owner(request),
                max_active_per_owner=state.settings.max_jobs_per_key,
            )
        )
    except IdempotencyConflict as exc:
        raise APIError(422, str(exc), param="Idempotency-Key", code="idempotency_key_reused") from exc
    except QueueFull as exc:
        state.metrics.rejected.inc(reason="job_queue_full")
        raise APIError(429, str(exc), code="job_queue_full", headers={"Retry-After": "30"}) from exc
    except OwnerLimit as exc:
        state.metrics.rejected.inc(reason="too_many_jobs")
        raise APIError(429, str(exc), code="too_many_jobs", headers={"Retry-After": "30"}) from exc
    if created:
        await _wake_worker(state)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return job_to_api(job)


@router.get("", response_model=QuantizationJobList, summary="List quantization jobs (newest first)", responses=error_responses(400, 401))
def list_jobs(
    request: Request,
    after: Annotated[str | None, Query(pattern=r"^qjob-[0-9a-f]{24}$", description="Id of the last job of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None, Query()] = None,
) -> QuantizationJobList:
    if after is not None and not is_job_id(after):
        raise APIError(400, f"after must be a job id, got {after!r}", param="after", code="invalid_cursor")
    jobs, has_more = get_state(request).store.list(after=after, limit=limit, status=status)
    return QuantizationJobList(data=[job_to_api(j) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=QuantizationJob, summary="Get a quantization job", responses=error_responses(401, 404))
def get_job(job_id: JobId, request: Request) -> QuantizationJob:
    return job_to_api(_job_or_404(get_state(request), job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=QuantizationJob,
    summary="Cancel a queued or running job",
    description="A queued job is cancelled at once; a running job stops after its current block "
    "(status stays `running` with `cancel_requested: true` until then).",
    responses=error_responses(401, 404, 409),
)
def cancel_job(job_id: JobId, request: Request) -> QuantizationJob:
    state = get_state(request)
    _job_or_404(state, job_id)
    try:
        job = state.store.request_cancel(job_id)
    except KeyError as exc:
        raise APIError(404, f"no quantization job {job_id!r}", param="job_id", code="job_not_found") from exc
    except JobStateError as exc:
        raise APIError(409, str(exc), code="job_not_cancellable") from exc
    return job_to_api(job)


def _event_to_api(e: JobEvent) -> QuantizationJobEvent:
    return QuantizationJobEvent(id=e.public_id, created_at=int(e.created_at), level=e.level, type=e.type, message=e.message, data=e.data)


async def follow_events(
    store: JobStore,
    job_id: str,
    after: int | None,
    *,
    poll_s: float = EVENT_POLL_S,
    keepalive_s: float = EVENT_KEEPALIVE_S,
    max_s: float = EVENT_STREAM_MAX_S,
) -> AsyncIterator[bytes]:
    """A job's events as SSE (``id:`` + ``data:`` per event), read from the store as they
    are written, then ``data: [DONE]`` once the job has ended. Between reads the stream waits
    for the store to announce a new event (Postgres ``LISTEN``), at most ``poll_s`` (all an
    SQLite store can do: it polls). Ends without ``[DONE]`` after ``max_s`` (the client
    resumes with ``after`` or ``Last-Event-ID``)."""
    started = last_sent = time.monotonic()
    while True:
        job = await run_in_threadpool(store.get, job_id)  # before the events: a finished job's last event is already in
        if job is None:
            yield sse_error(f"job {job_id} was deleted", "not_found_error", code="job_not_found")
            return
        has_more = True
        while has_more:
            events, has_more = await run_in_threadpool(lambda: store.events(job_id, after=after, limit=100))
            for event in events:
                yield f"id: {event.public_id}\ndata: {_event_to_api(event).model_dump_json()}\n\n".encode()
                after = event.id
                last_sent = time.monotonic()
        if job.finished:
            yield b"data: [DONE]\n\n"
            return
        now = time.monotonic()
        if now - started >= max_s:
            return
        if now - last_sent >= keepalive_s:
            yield b": keepalive\n\n"
            last_sent = now
        await store.wait_for_events(job_id, after=after, timeout_s=poll_s)


@router.get(
    "/{job_id}/events",
    response_model=QuantizationJobEventList,
    summary="A job's events (oldest first), or a live stream of them",
    description="With `stream=true` (or `Accept: text/event-stream` and no `stream`), the events are sent as "
    "Server-Sent Events as they are written: `id: <event id>` and `data: <event>` per event; after the job's "
    "final status event, `data: [DONE]`. `after` (or the `Last-Event-ID` header) resumes after an event. "
    "`limit` applies to the list only.",
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": 'id: qjev-1\ndata: {"id": "qjev-1", "type": "created", ...}\n\ndata: [DONE]\n\n'}},
            "description": "The events (a list, or an SSE stream)",
        },
        **error_responses(400, 401, 404),
    },
)
async def list_events(
    job_id: JobId,
    request: Request,
    after: Annotated[str | None, Query(pattern=EVENT_ID_PATTERN, description="Id of the last event already seen")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: Annotated[bool | None, Query(description="Stream the events as SSE until the job ends")] = None,
    last_event_id: Annotated[  # typed str (not str | None): a header is absent or a string, never null
        str,
        Header(alias="Last-Event-ID", max_length=64, json_schema_extra={"pattern": EVENT_ID_PATTERN},  # checked below, after the job
               description="SSE resumption (used when `after` is not given)"),
    ] = None,  # type: ignore[assignment]
) -> Any:
    state = get_state(request)
    await run_in_threadpool(_job_or_404, state, job_id)
    cursor, param = (after, "after") if after is not None else (last_event_id, "Last-Event-ID")
    after_n = None
    if cursor is not None:
        after_n = parse_event_id(cursor)
        if after_n is None:
            raise APIError(400, f"{param} must be an event id, got {cursor!r}", param=param, code="invalid_cursor")
    if stream is None:
        stream = "text/event-stream" in request.headers.get("accept", "")
    if stream:
        return StreamingResponse(follow_events(state.store, job_id, after_n), media_type="text/event-stream", headers=SSE_HEADERS)
    events, has_more = await run_in_threadpool(lambda: state.store.events(job_id, after=after_n, limit=limit))
    return QuantizationJobEventList(data=[_event_to_api(e) for e in events], has_more=has_more)


@router.get(
    "/{job_id}/result",
    summary="Download a succeeded job's model",
    description="`model.safetensors` by default; `file` picks another file of the result "
    "(`config.json`, `quant_stats.json`, tokenizer files; see the job's `result_files`). `format=autoawq` "
    "downloads from the AutoAWQ GEMM export instead (see `autoawq_result_files`); 409 if the job was not "
    "exported that way (see its `result_formats`). 409 until the job has succeeded. When the server keeps "
    "results on S3 with presigned downloads (`MM_RESULTS_PRESIGN_S`), a 307 redirect to a time-limited URL instead.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "description": "The file"},
        307: {"description": "Presigned downloads: the file's time-limited URL in `Location`"},
        **error_responses(400, 401, 404, 409),
    },
)
def get_result(
    job_id: JobId,
    request: Request,
    file: Annotated[str, Query(max_length=255, description="A file name from result_files (or autoawq_result_files)")] = "model.safetensors",
    format: Annotated[ExportFormat, Query(description="`mlx`: the native result; `autoawq`: its AutoAWQ GEMM export")] = "mlx",
) -> Response:
    state = get_state(request)
    job = _job_or_404(state, job_id)
    if job.status != "succeeded":
        raise APIError(409, f"job {job_id} is {job.status}; its result is available once it has succeeded", code="job_not_succeeded")
    if format not in _result_formats(job):
        raise APIError(409, f"job {job_id} was not exported as {format!r} (submit it with export_format {format!r})", param="format", code="format_not_available")
    listed = (job.result or {}).get("files" if format == "mlx" else f"{format}_files", [])
    names = {f["filename"] for f in listed}
    if file not in names:
        raise APIError(400, f"the {format} result has no file {file!r}; available: {sorted(names)}", param="file", code="invalid_file")
    name = file if format == "mlx" else f"{format}-{file}"
    rel = result_rel(format, file)
    url = state.results.presigned_url(job_id, rel)
    if url is not None:  # MM_RESULTS_PRESIGN_S: the client fetches it from the store itself
        return RedirectResponse(url, status_code=307)
    return file_download(
        state.results.open_file(job_id, rel),
        download_name=f"{job_id}-{name}",
        ascii_name=f"{job_id}-{name}",
        media_type="application/json" if file.endswith(".json") else "application/octet-stream",
        missing=APIError(404, f"the result of job {job_id} is gone", code="result_not_found"),
    )


@router.delete("/{job_id}", response_model=DeletedJob, summary="Delete a finished job and its files", responses=error_responses(401, 404, 409))
async def delete_job(job_id: JobId, request: Request) -> DeletedJob:
    state = get_state(request)
    await run_in_threadpool(_job_or_404, state, job_id)
    try:
        await run_in_threadpool(state.store.delete, job_id)
    except KeyError as exc:
        raise APIError(404, f"no quantization job {job_id!r}", param="job_id", code="job_not_found") from exc
    except JobStateError as exc:
        raise APIError(409, str(exc), code="job_not_finished") from exc
    await run_in_threadpool(state.results.delete, job_id)
    await state.supervisor.broadcast("POST", f"/models/{job_id}/unload")  # each worker re-checks the job on every request anyway
    return DeletedJob(id=job_id, deleted=True)
