"""Run the service: ``serve(host, port, data_dir, api_key, ...)`` or ``python -m service``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import uvicorn

from service.app import create_app
from service.config import Settings


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    *,
    model_roots: str | None = None,
    served_models: Sequence[str] | None = None,
    worker_url: str | None = None,
    workers: Sequence[str] | None = None,
    worker_memory_mb: int | None = None,
    run_jobs: bool | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API with uvicorn until SIGINT/SIGTERM; starts and supervises the worker.

    Arguments left as None come from the environment (``MM_DATA_DIR``, ``MM_API_KEY``,
    ``MM_MODEL_ROOTS``, ``MM_SERVED_MODELS``, ``MM_WORKER_URL``, ``MM_WORKER_MEMORY_MB``,
    ``MM_WORKER_JOBS``; see :mod:`service.config`). ``served_models``: ``NAME=PATH`` entries
    (see :mod:`worker.served`); a bad name or a missing path raises ValueError before anything
    starts. ``worker_url`` attaches to an already running worker instead (give that worker the
    same served models); ``workers`` (``http(s)://`` URLs) fronts several worker hosts
    (:mod:`service.workers`).
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s service[%(process)d] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per worker call is noise
    settings = Settings.from_env(
        data_dir=data_dir,
        api_key=api_key,
        model_roots=model_roots,
        served_models=served_models,
        worker_url=worker_url,
        workers=tuple(workers) if workers else None,
        worker_memory_mb=worker_memory_mb,
        worker_jobs=run_jobs,
    )
    app = create_app(settings)
    # the one line a new user needs: where the browser console is
    logging.getLogger("metal_marlin.service").info("web console: http://%s:%d/", "127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="metal-marlin HTTP service")
    parser.add_argument("--host", default=os.environ.get("MM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("MM_PORT", "8000")))
    parser.add_argument("--data-dir", default=None, help="default: MM_DATA_DIR or ./data")
    parser.add_argument("--api-key", default=None, help="default: MM_API_KEY (unset: no auth)")
    parser.add_argument("--model-roots", default=None, help="default: MM_MODEL_ROOTS")
    parser.add_argument("--model", dest="served_models", action="append", default=None, metavar="NAME=PATH",
                        help="serve a local .gguf file or model folder as NAME (repeatable; default: MM_SERVED_MODELS)")
    parser.add_argument("--worker-url", default=None, help="use a running worker (unix:/path or http://127.0.0.1:port)")
    parser.add_argument("--worker", dest="workers", action="append", default=None, metavar="URL",
                        help="front a worker host over TCP (repeatable; default: MM_WORKERS); no worker is started")
    parser.add_argument("--worker-memory-mb", type=int, default=None)
    parser.add_argument("--no-jobs", action="store_true", help="the worker serves generation only")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        serve(
            args.host, args.port, args.data_dir, args.api_key,
            model_roots=args.model_roots, served_models=args.served_models, worker_url=args.worker_url, workers=args.workers, worker_memory_mb=args.worker_memory_mb,
            run_jobs=False if args.no_jobs else None, log_level=args.log_level,
        )
    except (ValueError, ConnectionError) as exc:  # bad MM_* settings or --model entries, MM_DATABASE_URL unreachable
        print(f"service: error: {exc}", file=sys.stderr)
        return 2
    return 0
