"""One quantization job, in its own process: ``python -m worker.job_process ...``.

The worker's :class:`~worker.runner.JobRunner` starts this for each claimed job. Running the
job in a child process keeps the AWQ search (heavy, MLX + numpy) off the threads that serve
generation, lets a job's memory go back to the OS when it ends, and lets the worker stop a
job hard if it must. The child:

- re-validates the job's sources against the model roots (the file system may have changed),
  and that an uploaded source still exists with the right purpose;
- runs :func:`metal_marlin.pipeline.awq_quantize_model` into a staging folder, recording a
  progress event per block in the job store; with ``export_format: "autoawq"`` it then writes
  the AutoAWQ GEMM export of that folder into ``<staging>/autoawq/``;
- between blocks, stops if cancellation was requested, if the job is no longer its worker's
  running job (the service failed it after a crash), or if its parent worker is gone;
- exits 0 on success, 3 when cancelled, 4 for a job that cannot run as specified (its
  message in ``--error-file``), 1 for an unexpected error.

It never publishes a result: the parent moves the staging folder into place and marks the
job succeeded, so a job whose worker dies can never leave a result behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from jobstore import JobStore, open_store
from jobstore.layout import format_dir
from metal_marlin.assets import BUILTIN_MODEL_NAME, builtin_model_path
from worker.proc import die_with_parent
from worker.sources import SourceError, parse_roots, resolve_file_source, resolve_under_roots

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CANCELLED = 3
EXIT_INVALID = 4
EXIT_LOST = 5


class JobCancelled(Exception):
    pass


class JobLost(Exception):
    """The job is no longer this worker's running job, or the worker is gone."""


def _write_error(path: Path, code: str, message: str, detail: str | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"code": code, "message": message, "detail": detail}), encoding="utf-8")
    os.replace(tmp, path)


def _source_path(source: dict[str, Any], roots: list[Path], param: str, what: str) -> Path | None:
    if source.get("source", "builtin") == "builtin":
        return None
    return resolve_under_roots(source["resolved"], roots, param=param, what=what)


def _calibration_paths(store: JobStore, data_dir: Path, calibration: dict[str, Any], roots: list[Path]) -> tuple[Path | None, Path | None]:
    """``(text_path, activations_path)`` of a job's calibration source (both None: built-in)."""
    kind = calibration.get("source", "builtin")
    if kind == "file":  # the upload's format was recorded when it was checked
        record, path = resolve_file_source(store, data_dir, calibration["file_id"], purpose="calibration", param="calibration.file_id")
        return (None, path) if record.format == "npz" else (path, None)
    if kind == "text":
        return _source_path(calibration, roots, "calibration.path", "calibration file"), None
    if kind == "activations":
        return None, _source_path(calibration, roots, "calibration.path", "calibration file")
    return None, None


def run_job(
    store: JobStore, job_id: str, worker: str, output: Path, roots: list[Path], parent_pid: int, data_dir: Path
) -> dict[str, Any]:
    job = store.get(job_id)
    if job is None or not store.still_owned(job_id, worker):
        raise JobLost(f"job {job_id} is not running for worker {worker}")
    spec = job.spec
    hp = spec["hyperparameters"]
    if spec["model"].get("source") == "file":
        _, model_path = resolve_file_source(store, data_dir, spec["model"]["file_id"], purpose="model", param="model.file_id")
    elif spec["model"].get("name"):  # a built-in model other than the default
        model_path = builtin_model_path(spec["model"]["name"])
    else:
        model_path = _source_path(spec["model"], roots, "model.path", "model")
    text_path, activations_path = _calibration_paths(store, data_dir, spec.get("calibration") or {"source": "builtin"}, roots)

    def progress(event: dict[str, Any]) -> None:
        if os.getppid() != parent_pid:
            raise JobLost("the worker process is gone")
        if store.cancel_requested(job_id):
            raise JobCancelled()
        stage = str(event.get("stage", "quantizing"))
        data = {
            "stage": stage,
            "block": int(event.get("block", 0)),
            "n_blocks": int(event.get("n_blocks", 0)),
            "elapsed_s": round(float(event.get("elapsed_s", 0.0)), 3),
        }
        if "choice" in event:
            data["choice"] = event["choice"]
        message = "Writing the result" if stage == "writing" else f"Block {data['block']}/{data['n_blocks']} quantized"
        if "choice" in event:
            message += f" ({event['choice']})"
        if not store.record_progress(job_id, worker, data, message):
            raise JobLost(f"job {job_id} is no longer running for this worker")

    store.record_progress(job_id, worker, {"stage": "loading", "block": 0, "n_blocks": 0, "elapsed_s": 0.0}, "Loading the model and calibration data")
    from metal_marlin.pipeline import awq_quantize_model

    stats = awq_quantize_model(
        model_path,
        output,
        activations_path=activations_path,
        group_size=hp["group_size"],
        salient_ratio=hp["salient_ratio"],
        activation_method=hp["activation_method"],
        verbose=False,
        bits=hp["bits"],
        n_samples=hp["n_samples"],
        seq_len=hp["seq_len"],
        text_path=text_path,
        n_grid=hp["n_grid"],
        duo_scaling=hp.get("duo_scaling", False),
        progress=progress,
        method=hp.get("method", "awq"),
        rounding_steps=hp.get("rounding_steps", 200),
    )
    stats = _record_public_source(output, spec["model"], stats)
    if spec.get("export_format", "mlx") == "autoawq":
        export_autoawq_result(store, job_id, worker, output, stats)
    return stats


def _record_public_source(output: Path, model: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """``quant_stats.json`` of a job names its model as the client did (built-in, the path under
    the model roots, the upload id), not by the server's paths; the staging folder it was
    written to means nothing once the result is published, so it is dropped."""
    kind = model.get("source", "builtin")
    public = {"builtin": f"builtin:{model.get('name', BUILTIN_MODEL_NAME)}", "path": f"models:{model.get('path')}", "file": f"file:{model.get('file_id')}"}
    stats = {**stats, "model_path": public.get(kind, kind)}
    stats.pop("output_path", None)
    path = output / "quant_stats.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return stats


def export_autoawq_result(store: JobStore, job_id: str, worker: str, output: Path, stats: dict[str, Any]) -> None:
    """Write the AutoAWQ GEMM export of the native result ``output`` into ``output/autoawq``."""
    from metal_marlin.checkpoints.autoawq import export_autoawq

    if store.cancel_requested(job_id):
        raise JobCancelled()
    n_blocks = int(stats.get("blocks_awq", 0)) + int(stats.get("blocks_rtn", 0))
    data = {"stage": "exporting", "block": n_blocks, "n_blocks": n_blocks, "elapsed_s": round(float(stats.get("total_time_s", 0.0)), 3)}
    if not store.record_progress(job_id, worker, data, "Writing the AutoAWQ GEMM export"):
        raise JobLost(f"job {job_id} is no longer running for this worker")
    export_autoawq(output, format_dir(output, "autoawq"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.job_process")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--worker", required=True, help="claim token of the parent worker")
    parser.add_argument("--output", required=True, help="staging folder to write the result into")
    parser.add_argument("--error-file", required=True)
    parser.add_argument("--roots", default="", help="model roots, os.pathsep-separated")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(expected_parent=args.parent_pid)

    error_file = Path(args.error_file)
    store = open_store(args.data_dir)
    try:
        from metal_marlin.device import select_device

        select_device()  # MM_DEVICE, inherited from the worker: the AWQ search runs where the worker computes
        run_job(store, args.job_id, args.worker, Path(args.output), parse_roots(args.roots), args.parent_pid, Path(args.data_dir))
    except JobCancelled:
        return EXIT_CANCELLED
    except JobLost as exc:
        _write_error(error_file, "job_lost", str(exc))
        return EXIT_LOST
    except SourceError as exc:
        _write_error(error_file, exc.code, exc.message)
        return EXIT_INVALID
    except KeyError as exc:
        key = exc.args[0] if exc.args else "?"
        message = f"the model is incomplete: missing {key!r} in its config or weights"
        _write_error(error_file, "invalid_job", message, traceback.format_exc(limit=5))
        return EXIT_INVALID
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as exc:
        _write_error(error_file, "invalid_job", str(exc), traceback.format_exc(limit=5))
        return EXIT_INVALID
    except MemoryError:
        _write_error(error_file, "out_of_memory", "the job ran out of memory")
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - report anything else as an internal error
        _write_error(error_file, "internal_error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=10))
        return EXIT_ERROR
    finally:
        store.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
