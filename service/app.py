"""The FastAPI application: ``create_app(settings)``.

The app never imports MLX: models, their memory and their crashes stay in the worker
process, which the app's lifespan starts and supervises (:mod:`service.supervisor`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

import metal_marlin
from jobstore import open_store
from jobstore.results import open_results
from service import files, jobs, openai_api
from service.console import console_router
from service.config import Settings
from service.errors import install_error_handlers, register_server_paths
from service.metrics import CONTENT_TYPE, ServiceMetrics
from service.middleware import BodySizeLimit, RequestMetrics, TrailingSlash
from service.schemas import Health
from service.state import ServiceState, get_state
from service.supervisor import WorkerSupervisor
from service.workers import WorkerPool

log = logging.getLogger("metal_marlin.service")

#: What ``/health`` reports of the worker's compute device (from its readiness answer).
WORKER_DEVICE_FIELDS = ("device", "backend", "device_name")

DESCRIPTION = """\
OpenAI-compatible completions served from AWQ-quantized models, and a quantization jobs API.

- `/v1/completions`, `/v1/chat/completions`, `/v1/models`: OpenAI shapes (SSE streaming). Models: the
  built-in one, those the operator registered (`metal-marlin serve --model NAME=PATH`), and every
  succeeded job's result under its job id.
- `/v1/files`: upload a `.gguf` model or calibration data (text or `activations.npz`).
- `/v1/quantization/jobs`: submit AWQ quantization of the built-in model, an uploaded model or
  a model under the server's model roots; follow its events (also live, as SSE); download the
  result (native MLX layout, or with `export_format: "autoawq"` also AutoAWQ GEMM); serve it under
  its job id.
- Errors are always `{"error": {"message", "type", "param", "code"}}`.
- `/v1` routes need `Authorization: Bearer <key>` when the server has an API key.
- `/`: a web console (jobs with live progress, results with plots, a chat playground) built on this API.
"""


def create_app(settings: Settings | None = None, *, start_worker: bool = True) -> FastAPI:
    """Build the service. ``start_worker=False`` skips the worker (tests, OpenAPI export)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServiceState = app.state.mm
        await run_in_threadpool(files.cleanup_files_dir, state.store, state.settings.data_dir)
        if start_worker:
            await state.supervisor.start()
        try:
            yield
        finally:
            if start_worker:
                await state.supervisor.stop()
            else:
                await state.supervisor.aclose()
            state.store.close()  # a Postgres store's pool and listener (SQLite: this thread's connection)
            state.results.close()

    app = FastAPI(
        title="metal-marlin",
        version=metal_marlin.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.data_dir)
    results = open_results(settings.data_dir)
    supervisor: WorkerSupervisor | WorkerPool
    if settings.workers:  # worker hosts elsewhere: probe and route, start none
        supervisor = WorkerPool(settings)
    else:
        supervisor = WorkerSupervisor(settings, store, on_restart=lambda: metrics.worker_restarts.inc())
    metrics = ServiceMetrics(
        job_counts=store.counts,
        worker_up=lambda: supervisor.ready,
        worker_device=lambda: supervisor.ready_info.get("device_info"),
        worker_generation=lambda: supervisor.ready_info.get("generation"),
    )
    app.state.mm = ServiceState(settings=settings, store=store, results=results, supervisor=supervisor, metrics=metrics)

    install_error_handlers(app)
    register_server_paths(settings.data_dir, settings.roots)
    app.include_router(openai_api.router)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(console_router())

    @app.get(
        "/health",
        response_model=Health,
        tags=["operations"],
        summary="Readiness: 200 when the worker is ready, else 503",
        responses={503: {"model": Health, "description": "The worker is not ready"}},
    )
    async def health(request: Request) -> JSONResponse:
        sup = get_state(request).supervisor
        if sup.ready:
            info = {k: sup.ready_info.get(k) for k in ("pid", "jobs_enabled", "current_job", "loaded_models", "active_requests", "generation")}
            device = sup.ready_info.get("device_info") or {}
            info.update({k: device.get(k) for k in WORKER_DEVICE_FIELDS})
            info["restarts"] = sup.restarts
            return JSONResponse(_health_body(Health(status="ok", worker=info, workers=sup.workers_info())))
        worker = {"restarts": sup.restarts, "last_exit": sup.last_exit}
        status = "starting" if sup.restarts == 0 else "unavailable"
        body = _health_body(Health(status=status, worker=worker, workers=sup.workers_info()))
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format 0.0.4"}},
    )
    async def prometheus(request: Request) -> PlainTextResponse:
        text = await run_in_threadpool(get_state(request).metrics.render)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    _use_error_shape_in_openapi(app)
    # the middleware added last is outermost: metrics see every response, 413s included, and
    # every layer sees the path without its trailing slash
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes, streamed={("POST", files.UPLOAD_PATH): settings.max_upload_bytes})
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(TrailingSlash)
    return app


def _health_body(health: Health) -> dict:
    """The answer of ``/health``; ``workers`` only when the gateway fronts several."""
    body = health.model_dump()
    if body.get("workers") is None:
        body.pop("workers", None)
    return body


def _use_error_shape_in_openapi(app: FastAPI) -> None:
    """Document validation failures as what they are: 400 with the error shape (FastAPI's
    generated 422 ``HTTPValidationError`` responses never happen here)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                responses = op.get("responses", {})
                generated = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                if generated.get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
                    if op.get("parameters") or op.get("requestBody"):
                        responses.setdefault("400", {"description": "Invalid request", "content": {"application/json": {"schema": error_ref}}})
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
