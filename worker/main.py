"""Run the worker: ``run_worker(data_dir, socket_path)`` or ``python -m worker --data-dir D``.

Startup, in order:

0. select the compute device (``MM_DEVICE``: auto, gpu or cpu; the service's ``--device``
   reaches us through it), before any model is loaded; ``gpu`` without a GPU exits with
   one ``worker: error: ...`` line and status 2;
1. take ``<data>/worker.lock`` (one worker per data directory; waits briefly for a previous
   worker that is still exiting);
2. fail jobs left ``running`` by a previous worker that died (nobody else can be running
   them: we hold the lock), and clean staging leftovers;
3. serve the internal API on the Unix socket (mode 0600, in a 0700 folder), or on loopback
   TCP when ``port`` is given;
4. start the job runner (unless ``run_jobs=False``).

SIGTERM/SIGINT shut down gracefully: a running job is stopped and put back in the queue,
schedulers cancel their requests. When started by the service (``parent_pid``), the worker
also exits when the service dies.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import uvicorn

from jobstore import MAX_DATA_BYTES_ENV, job_max_attempts, open_store
from jobstore.node import job_lease_s, worker_node
from jobstore.results import open_results
from metal_marlin.device import MLXUnavailableError, device_info, on_gpu, select_device
from worker.app import WorkerState, create_worker_app
from worker.generation import MIB, ModelRegistry
from worker.proc import die_with_parent, watch_parent
from worker.runner import JobRunner, cleanup_data_dir
from worker.served import ENV_VAR as SERVED_MODELS_VAR
from worker.served import ServedModelError, ServedModelsSpec, parse_served_models

log = logging.getLogger("metal_marlin.worker")

DEFAULT_MEMORY_MB = 4096


class WorkerLockError(RuntimeError):
    pass


class WorkerDeviceError(RuntimeError):
    """The requested compute device cannot be used (bad ``MM_DEVICE``, no GPU, no MLX backend)."""


def _acquire_lock(data_dir: Path, wait_s: float) -> int:
    fd = os.open(data_dir / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                os.close(fd)
                raise WorkerLockError(f"another worker is already running on {data_dir} (worker.lock is held)") from exc
            time.sleep(0.2)


def _bind_unix_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def run_worker(
    data_dir: str | os.PathLike[str],
    socket_path: str | os.PathLike[str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    model_roots: str | None = None,
    served_models: ServedModelsSpec = None,
    memory_mb: int | None = None,
    run_jobs: bool = True,
    parent_pid: int | None = None,
    token: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the worker until SIGTERM/SIGINT (or until ``parent_pid`` exits).

    ``socket_path`` defaults to ``<data_dir>/run/worker.sock``; give ``port`` to listen on
    loopback TCP instead. ``model_roots`` (``os.pathsep``-separated; default
    ``MM_MODEL_ROOTS``) bounds what jobs may read. ``served_models`` (``NAME=PATH`` entries,
    default ``MM_SERVED_MODELS``, see :mod:`worker.served`) are served by name; their paths
    are checked unless the worker was started by the service (``parent_pid``), which checked
    them already: a model removed later must not keep a restarted worker down. ``memory_mb`` (default
    ``MM_WORKER_MEMORY_MB`` or 4096) is the loaded models' budget. ``token`` (default
    ``MM_WORKER_TOKEN``) is required on every internal request when set.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s worker[%(process)d] %(levelname)s %(name)s: %(message)s")
    if served_models is None:
        served_models = os.environ.get(SERVED_MODELS_VAR, "")
    served = parse_served_models(served_models, check_paths=parent_pid is None)  # ServedModelError before any side effect
    try:
        select_device()  # MM_DEVICE; MLX's default device is process-wide, so threads follow it
        info = device_info()
    except (ValueError, MLXUnavailableError) as exc:  # DeviceUnavailableError is a ValueError
        raise WorkerDeviceError(str(exc)) from exc
    log.info("computing on %s (%s%s)", info["device"], info["backend"], f", {info['device_name']}" if info["device_name"] else "")
    if parent_pid is not None:
        die_with_parent(signal.SIGTERM, expected_parent=parent_pid)
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = _acquire_lock(data_dir, wait_s=15.0)
    roots = model_roots if model_roots is not None else os.environ.get("MM_MODEL_ROOTS", "")
    budget_mb = memory_mb or int(os.environ.get("MM_WORKER_MEMORY_MB", "") or DEFAULT_MEMORY_MB)
    token = token if token is not None else (os.environ.get("MM_WORKER_TOKEN") or None)

    store = open_store(data_dir)
    results = open_results(data_dir)
    node = worker_node(data_dir)  # this host's earlier worker held the same lock: its jobs, and only its, are orphans
    left = store.recover_running("The worker restarted while this job was running", code="worker_restarted", max_attempts=job_max_attempts(), node=node)
    if left.requeued or left.failed:
        log.warning("jobs left running by a previous worker: requeued %s, failed %s", left.requeued, left.failed)
    cleanup_data_dir(store, data_dir)

    worker_id = f"w{os.getpid()}-{secrets.token_hex(4)}"  # the claim token: this process only
    runner = None
    if run_jobs:
        child_env = dict(os.environ)
        child_env.pop("MM_WORKER_TOKEN", None)
        quota = int(os.environ.get(MAX_DATA_BYTES_ENV, "") or 0) or None
        runner = JobRunner(store, data_dir, worker_id, roots=roots, env=child_env, max_data_bytes=quota, results=results,
                           node=node, lease_s=job_lease_s(), max_attempts=job_max_attempts())
    # Sequences decoded together per model: a GPU's step costs about the same for 1 or 128
    # rows (memory-bound), a CPU's grows with them.
    batch = int(os.environ.get("MM_MAX_BATCH_SIZE", "") or (128 if on_gpu() else 16))
    registry = ModelRegistry(data_dir, store, budget_mb * MIB, served=served, max_batch_size=batch, results=results)
    state = WorkerState(worker_id=worker_id, store=store, registry=registry, runner=runner, token=token, device_info=info)
    app = create_worker_app(state)

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    if parent_pid is not None:
        watch_parent(parent_pid, lambda: setattr(server, "should_exit", True))

    sockets = None
    uds: Path | None = None
    if port is None:
        uds = Path(socket_path) if socket_path is not None else data_dir / "run" / "worker.sock"
        sockets = [_bind_unix_socket(uds)]
        log.info("worker %s listening on unix:%s", worker_id, uds)
    else:
        config.host, config.port = host, port
        log.info("worker %s listening on http://%s:%d", worker_id, host, port)
    try:
        server.run(sockets=sockets)
    finally:
        if uds is not None:
            try:
                uds.unlink()
            except OSError:
                pass
        store.close()
        os.close(lock_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description="metal-marlin worker (jobs + generation)")
    parser.add_argument("--data-dir", default=os.environ.get("MM_DATA_DIR") or "data")
    parser.add_argument("--socket", default=None, help="Unix socket path (default: <data>/run/worker.sock)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="listen on loopback TCP instead of a socket")
    parser.add_argument("--model-roots", default=None)
    parser.add_argument("--model", dest="served_models", action="append", default=None, metavar="NAME=PATH",
                        help="serve a local model under NAME (repeatable; default: MM_SERVED_MODELS)")
    parser.add_argument("--memory-mb", type=int, default=None)
    parser.add_argument("--no-jobs", action="store_true", help="serve generation only; leave jobs queued")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        run_worker(
            args.data_dir, args.socket, host=args.host, port=args.port, model_roots=args.model_roots, served_models=args.served_models,
            memory_mb=args.memory_mb, run_jobs=not args.no_jobs, parent_pid=args.parent_pid, log_level=args.log_level,
        )
    except (WorkerLockError, ServedModelError, WorkerDeviceError) as exc:
        print(f"worker: error: {exc}", file=sys.stderr)
        return 2
    return 0
