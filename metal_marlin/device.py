"""Which device MLX computes on: the GPU when MLX has one, the CPU otherwise.

The GPU is Metal on macOS (Apple silicon) and CUDA on Linux (the ``mlx[cuda13]`` backend,
``pip install 'metal-marlin[cuda]'``). The choice is made once per process, before any model
is loaded, by :func:`select_device` (``--device`` / ``MM_DEVICE``: ``auto``, ``gpu`` or
``cpu``); it sets MLX's default device, which is process-global, so every later MLX call
(the CLI's commands, the worker's generation threads, a job's AWQ search) follows it.

Code that behaves differently on the GPU asks :func:`on_gpu`, and only it: on the GPU the
int4 kernels are the fast path (no float32 weight copies) and the AWQ search runs in MLX
(:func:`metal_marlin.backends.compute_namespace`); on the CPU, float32 copies and numpy's
BLAS are faster. Tests force the GPU path by monkeypatching ``metal_marlin.device.on_gpu``.

MLX is imported lazily (the service process never loads it). On Linux the ``mlx`` package
holds only the Python bindings; ``libmlx.so`` comes from a backend package (``mlx-cpu`` or
``mlx-cuda-13``). Without one ``import mlx.core`` fails obscurely, so :func:`import_mlx`
turns that into :class:`MLXUnavailableError` saying what to install.
"""

from __future__ import annotations

import os
import platform
import sys
from types import ModuleType
from typing import Any

__all__ = [
    "DEVICE_CHOICES",
    "COMPILE_ENV",
    "DEVICE_ENV",
    "DeviceUnavailableError",
    "MLXUnavailableError",
    "device_info",
    "gpu_backend",
    "import_mlx",
    "on_gpu",
    "use_compile",
    "parse_device",
    "select_device",
]

DEVICE_ENV = "MM_DEVICE"
COMPILE_ENV = "MM_COMPILE"
_COMPILE_ALLOWED = os.environ.get(COMPILE_ENV, "1") != "0"  # read once: asked per block per step
DEVICE_CHOICES = ("auto", "gpu", "cpu")

_INSTALL_HINT = "MM_EXTRAS=cuda bash scripts/bootstrap.sh or pip install 'metal-marlin[cuda]'"


class DeviceUnavailableError(ValueError):
    """The GPU was asked for (``--device gpu`` / ``MM_DEVICE=gpu``) and MLX has none.

    A ValueError so the CLI reports it like any other bad setting (one line, exit 2).
    """


class MLXUnavailableError(ImportError):
    """``import mlx.core`` failed: on Linux, usually no backend package is installed."""


def import_mlx() -> ModuleType:
    """``mlx.core``, or :class:`MLXUnavailableError` with the install command to fix it."""
    try:
        import mlx.core as mx
    except ImportError as exc:
        if sys.platform.startswith("linux"):
            hint = (
                "on Linux MLX needs a backend package: install metal-marlin[cpu] or [cuda] "
                "(pip install 'metal-marlin[cpu]', or 'metal-marlin[cuda]' for an NVIDIA GPU; "
                "MM_EXTRAS=cuda bash scripts/bootstrap.sh)"
            )
        else:
            hint = "install it with pip install mlx (macOS on Apple silicon)"
        raise MLXUnavailableError(f"MLX cannot be imported ({exc}); {hint}") from exc
    return mx


def gpu_backend() -> str | None:
    """``"cuda"`` or ``"metal"`` when MLX has that GPU backend, else None.

    Guarded: older MLX has no ``mx.cuda``, and a backend's probe must not crash the caller.
    """
    mx = import_mlx()
    for name in ("cuda", "metal"):
        module = getattr(mx, name, None)
        try:
            if module is not None and module.is_available():
                return name
        except Exception:  # noqa: BLE001 - a failing probe means "not available"
            continue
    return None


def parse_device(requested: str | None = None) -> str:
    """The normalised request, ``"auto"``, ``"gpu"`` or ``"cpu"``, without touching MLX.

    ``requested`` wins, else ``MM_DEVICE``, else ``"auto"``; case and surrounding spaces
    are ignored. Anything else raises ValueError naming both ways of setting it.
    """
    source = "--device" if requested is not None else DEVICE_ENV
    raw = requested if requested is not None else os.environ.get(DEVICE_ENV) or "auto"
    value = raw.strip().lower()
    if value not in DEVICE_CHOICES:
        raise ValueError(
            f"{source} must be one of {', '.join(DEVICE_CHOICES)}, got {raw!r} (the device is set by --device or {DEVICE_ENV})"
        )
    return value


def select_device(requested: str | None = None) -> str:
    """Make MLX compute on the requested device; returns ``"gpu"`` or ``"cpu"``.

    ``requested`` (else ``MM_DEVICE``, else ``"auto"``): ``auto`` takes the GPU when MLX
    has one; ``gpu`` without one raises :class:`DeviceUnavailableError` (a one-line
    message with the fix) instead of silently running ~10x slower on the CPU. Safe to
    call again (it sets the same device).
    """
    value = parse_device(requested)
    mx = import_mlx()
    backend = gpu_backend() if value != "cpu" else None
    if value == "gpu" and backend is None:
        raise DeviceUnavailableError(
            f"the GPU was requested (--device gpu / {DEVICE_ENV}=gpu) but MLX {mx.__version__} found no GPU backend; "
            f"on macOS MLX uses Metal on Apple silicon; on Linux with an NVIDIA GPU install the CUDA backend "
            f"({_INSTALL_HINT}); or use --device cpu"
        )
    device = "gpu" if backend is not None else "cpu"
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    return device


def on_gpu() -> bool:
    """Whether MLX's default device is a GPU. The one place that answers this question.

    False when MLX cannot be imported at all, so numpy-only code paths keep working.
    """
    try:
        mx = import_mlx()
    except MLXUnavailableError:
        return False
    return mx.default_device().type == mx.DeviceType.gpu


def use_compile() -> bool:
    """Whether hot loops run as ``mx.compile``d graphs: on a GPU, unless ``MM_COMPILE=0``.

    On a GPU the host building a graph op by op is the bottleneck (thousands of small kernels
    launched per decode or rounding step), and a compiled graph fuses them. On the CPU it is
    not: there each new graph costs a C++ compile (seconds) and runs no faster.
    """
    return _COMPILE_ALLOWED and on_gpu()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metal-marlin")
    except PackageNotFoundError:
        return "0+unknown"


def _mlx_device_properties(mx: ModuleType) -> dict[str, Any]:
    """``mx.device_info()`` of the default device (``mx.metal.device_info()`` on old MLX); {} if neither works."""
    for getter in (getattr(mx, "device_info", None), getattr(getattr(mx, "metal", None), "device_info", None)):
        if getter is None:
            continue
        try:
            info = getter()
        except Exception:  # noqa: BLE001 - informational only
            continue
        if isinstance(info, dict):
            return info
    return {}


def _physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def device_info() -> dict[str, Any]:
    """What this process computes on, as JSON-serialisable data (``metal-marlin info``, worker readiness).

    Keys: ``metal_marlin`` and ``mlx`` (versions), ``device`` (``"gpu"``/``"cpu"``: MLX's
    default device now), ``backend`` (``"cuda"``, ``"metal"`` or ``"cpu"``), ``device_name``
    and ``architecture`` (from ``mx.device_info()``, None when MLX does not say),
    ``memory_bytes`` (GPU memory on a GPU, physical RAM on the CPU; None if unknown),
    ``python`` and ``platform``.
    """
    mx = import_mlx()
    gpu = on_gpu()
    props = _mlx_device_properties(mx)
    if gpu:
        backend = gpu_backend() or "gpu"
        memory = props.get("memory_size", props.get("total_memory"))
    else:
        backend = "cpu"
        memory = _physical_memory_bytes()
    return {
        "metal_marlin": _package_version(),
        "mlx": str(mx.__version__),
        "device": "gpu" if gpu else "cpu",
        "backend": backend,
        "device_name": _jsonable(props.get("device_name")),
        "architecture": _jsonable(props.get("architecture")),
        "memory_bytes": int(memory) if isinstance(memory, (int, float)) else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
