"""Name the machine a benchmark ran on, and the command it ran, so every number carries its
context. Reports are quoted in docs/RESULTS.md, which is committed: neither may name a path of
the machine that ran them (its checkout, home or scratch folders)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def relative_args(argv: Sequence[str], base: Path = REPO) -> list[str]:
    """``argv`` with each absolute path (also the value of ``--opt=PATH``) written relative to
    ``base``, or as ``<abs>/NAME`` where it lies outside ``base``; other arguments as given."""
    out = []
    for arg in argv:
        prefix, sep, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        if os.path.isabs(value):
            path = Path(os.path.normpath(value))
            value = os.path.relpath(path, base) if path.is_relative_to(base) else f"<abs>/{path.name}"
        out.append(prefix + sep + value)
    return out


def repo_command(argv: Sequence[str]) -> str:
    """The command that reruns ``argv`` (``sys.argv``: the script, then its arguments) from the
    repository root: ``python bench/NAME.py ARGS``, whatever interpreter, checkout and working
    directory ran it. The script is named relative to the repository, absolute paths as
    :func:`relative_args` writes them, relative ones as given (the benchmarks run from the
    root). Space-joined as the page quotes it, an empty argument as ``''`` so that it shows."""
    script, *args = argv
    return " ".join(arg or "''" for arg in ["python", *relative_args([str(Path(script).resolve()), *args])])


def describe_machine() -> str:
    """CPU model, core count, OS and the BLAS MLX was given (see metal_marlin._blas)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from metal_marlin import _blas
    import mlx.core as mx

    gpu = nvidia_gpu()
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, mlx {mx.__version__} on {mx.default_device()}, "
        f"MLX BLAS: {os.path.basename(_blas.loaded_blas or 'bundled reference')}"  # MM_BLAS_LIBRARY may be a path
        + (f", GPU: {gpu}" if gpu else "")
    )


def nvidia_gpu() -> str | None:
    """``NAME, driver VERSION`` of the first NVIDIA GPU (nvidia-smi), None where there is none:
    a GPU figure names its GPU and driver."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    first = out.stdout.strip().splitlines()[:1]
    if out.returncode != 0 or not first:
        return None
    name, _, driver = first[0].partition(",")
    return f"{name.strip()}, driver {driver.strip()}"


def describe_gpu() -> dict:
    """The GPU, its driver and MLX's view of the device (nvidia-smi where it exists)."""
    import shutil
    import subprocess

    import mlx.core as mx

    info: dict = {"mlx": mx.__version__, "default_device": str(mx.default_device())}
    try:
        info["mlx_device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (int, float, str))}
    except Exception as exc:  # older MLX or no device
        info["mlx_device_info"] = f"unavailable: {exc}"
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = out.stdout.strip()
    return info
