"""Where the data directory keeps uploads and results, and how a published result is checked.

``<data>/files/<file_id>``: an upload's bytes (its record is in the job store).
``<data>/jobs/<job_id>/``: a succeeded job's result (native MLX layout at the top, the AutoAWQ
export in ``autoawq/``), with ``.checksums.json``: the SHA-256 of every file, recorded by the
worker before it made the folder visible. :func:`verify_result` checks a folder against it, so
a reader can tell a whole result from a damaged one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from jobstore.records import is_file_id

EXPORT_FORMATS = ("mlx", "autoawq")
AUTOAWQ_DIR = "autoawq"
CHECKSUMS_FILE = ".checksums.json"
RESULT_SUMMARY_KEYS = (
    "bits",
    "group_size",
    "salient_ratio",
    "activation_method",
    "n_grid",
    "duo_scaling",
    "calibration_tokens",
    "blocks_awq",
    "blocks_rtn",
    "bits_per_weight",
    "time_s",
    "total_time_s",
    "calibration",
)


# -- uploads ------------------------------------------------------------------------------
def files_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "files"


def stored_file_path(data_dir: Path, file_id: str) -> Path:
    """``<data>/files/<file_id>``: the id is checked, so no client text reaches the path."""
    if not is_file_id(file_id):
        raise ValueError(f"not a file id: {file_id!r}")
    return files_dir(data_dir) / file_id


# -- the disk quota -------------------------------------------------------------------------
def data_bytes(data_dir: Path) -> int:
    """Bytes the uploads and results of a data directory take, unfinished ones included
    (uploads streaming into ``files/.tmp``, jobs writing into ``jobs/.staging``): what
    ``MM_MAX_DATA_BYTES`` bounds."""
    total = 0
    for root in (files_dir(data_dir), jobs_dir(data_dir)):
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:  # removed while we walked
                    pass
    return total


# -- results ------------------------------------------------------------------------------
def jobs_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "jobs"


def result_dir(data_dir: Path, job_id: str) -> Path:
    return jobs_dir(data_dir) / job_id


def results_cache_dir(data_dir: Path) -> Path:
    """``<data>/cache/results``: where a worker keeps copies of results fetched from a shared
    result store (see :mod:`jobstore.results`); not counted by the quota."""
    return Path(data_dir) / "cache" / "results"


def holds_weights(folder: Path, fmt: str = "mlx") -> bool:
    """Whether a result folder (published or staged) has the weights of format ``fmt``: what
    loading it and its default download need."""
    return (format_dir(folder, fmt) / "model.safetensors").is_file()


def format_dir(folder: Path, fmt: str) -> Path:
    """Where a result folder keeps one format: the native (``mlx``) files at its top, the
    AutoAWQ export in ``autoawq/``."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown result format {fmt!r}")
    return folder if fmt == "mlx" else folder / AUTOAWQ_DIR


def spec_formats(spec: dict[str, Any]) -> list[str]:
    """The formats a job writes: always ``mlx``, plus its ``export_format``."""
    wanted = spec.get("export_format", "mlx")
    return ["mlx"] if wanted == "mlx" else ["mlx", wanted]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _result_files(folder: Path) -> list[str]:
    """Every file of a result, as paths relative to it; hidden files (the checksums) excluded."""
    names = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix())
    return names


def write_checksums(folder: Path) -> dict[str, str]:
    """Record the SHA-256 of every file of ``folder`` in ``.checksums.json`` (written atomically)."""
    sums = {name: _sha256(folder / name) for name in _result_files(folder)}
    tmp = folder / (CHECKSUMS_FILE + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump({"algorithm": "sha256", "files": sums}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / CHECKSUMS_FILE)
    return sums


def verify_result(folder: Path) -> list[str]:
    """What is wrong with a result folder against its recorded checksums ([] when it is whole)."""
    try:
        recorded: dict[str, str] = json.loads((folder / CHECKSUMS_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{CHECKSUMS_FILE} is missing or unreadable"]
    problems = [f"{name}: not recorded" for name in _result_files(folder) if name not in recorded]
    for name, digest in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif _sha256(path) != digest:
            problems.append(f"{name}: checksum mismatch")
    return problems


def _file_list(folder: Path, sums: dict[str, str], prefix: str = "") -> list[dict[str, Any]]:
    files = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.is_file() and not p.name.startswith("."):
            entry: dict[str, Any] = {"filename": p.name, "bytes": p.stat().st_size}
            if prefix + p.name in sums:
                entry["sha256"] = sums[prefix + p.name]
            files.append(entry)
    return files


def result_summary(folder: Path) -> dict[str, Any]:
    """Files of a finished job (name, bytes, SHA-256 when recorded), the formats it holds
    (``autoawq_files`` when exported), and the headline numbers of its quant_stats.json."""
    stats: dict[str, Any] = {}
    stats_path = folder / "quant_stats.json"
    if stats_path.is_file():
        raw = json.loads(stats_path.read_text(encoding="utf-8"))
        stats = {k: raw[k] for k in RESULT_SUMMARY_KEYS if k in raw}
    try:
        sums: dict[str, str] = json.loads((folder / CHECKSUMS_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        sums = {}
    summary: dict[str, Any] = {"files": _file_list(folder, sums), "stats": stats, "formats": ["mlx"]}
    if holds_weights(folder, "autoawq"):
        summary["formats"].append("autoawq")
        summary["autoawq_files"] = _file_list(format_dir(folder, "autoawq"), sums, prefix=f"{AUTOAWQ_DIR}/")
    return summary


def remove_tree(path: Path, trash: Path) -> None:
    """Make ``path`` disappear at once (rename into ``trash``), then delete it."""
    if not path.exists():
        return
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{path.name}.{os.getpid()}.{time.monotonic_ns()}"
    try:
        os.rename(path, target)
    except OSError:
        target = path
    shutil.rmtree(target, ignore_errors=True)
