"""Name the machine a benchmark ran on, so every number carries its context."""

from __future__ import annotations

import os
import platform


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

    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, mlx {mx.__version__} on {mx.default_device()}, "
        f"MLX BLAS: {_blas.loaded_blas or 'bundled reference'}"
    )


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
