"""Operator-registered models: ``metal-marlin serve --model NAME=PATH`` / ``MM_SERVED_MODELS``.

The operator names local models the service should serve besides the built-in model and
succeeded jobs: a ``.gguf`` file, a Hugging Face / MLX folder (``config.json`` +
safetensors), a metal-marlin quantized folder, or an AutoAWQ GEMM folder. Clients can only
name them (``"model": NAME``); the paths are configuration, never request input, so they
are not bounded by the model roots.

Syntax: each entry is ``NAME=PATH`` (split at the first ``=``). ``--model`` repeats;
``MM_SERVED_MODELS`` holds entries separated by ``os.pathsep`` (``:`` on macOS/Linux), like
``MM_MODEL_ROOTS``. Names are 1-64 characters of ``A-Z a-z 0-9 . _ -`` starting with a letter
or digit, must differ from each other and from the built-in models' names, and must not start
with ``qjob-`` (job ids are model ids too). Paths must exist when the service starts.

Pure Python (no MLX): the service imports it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from jobstore import JOB_ID_PREFIX
from metal_marlin.assets import BUILTIN_MODELS

ENV_VAR = "MM_SERVED_MODELS"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

class ServedModelError(ValueError):
    """A served model entry with a bad syntax, name or path (one-line message)."""


ServedModelsSpec = str | Iterable[str] | Mapping[str, "str | os.PathLike[str]"] | None


def _entries(spec: ServedModelsSpec) -> list[tuple[str, str]]:
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        return [(str(name), os.fspath(path)) for name, path in spec.items()]
    items = spec.split(os.pathsep) if isinstance(spec, str) else list(spec)
    pairs = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ServedModelError(f"served model {item!r} must be NAME=PATH (--model or {ENV_VAR})")
        pairs.append((name.strip(), path.strip()))
    return pairs


def check_served_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ServedModelError(
            f"served model name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name in BUILTIN_MODELS:
        raise ServedModelError(f"served model name {name!r} is a built-in model's name; choose another")
    if name.lower().startswith(JOB_ID_PREFIX):
        raise ServedModelError(f"served model name {name!r} must not start with {JOB_ID_PREFIX!r} (quantization job ids are model ids)")


def check_served_path(name: str, path: Path) -> None:
    """The path exists and looks loadable: a GGUF file, or a folder with ``config.json``."""
    if not path.exists():
        raise ServedModelError(f"served model {name!r}: {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ServedModelError(f"served model {name!r}: the folder {str(path)!r} has no config.json")
        return
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ServedModelError(f"served model {name!r}: cannot read {str(path)!r}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise ServedModelError(f"served model {name!r}: {str(path)!r} is neither a .gguf file nor a model folder")


def parse_served_models(spec: ServedModelsSpec, *, check_paths: bool = True) -> dict[str, Path]:
    """``{name: absolute path}`` of ``NAME=PATH`` entries (a list, an ``os.pathsep``-separated
    string, or a mapping). Raises :class:`ServedModelError` (a ``ValueError``) with a one-line
    message for a bad entry, name or (with ``check_paths``) path."""
    served: dict[str, Path] = {}
    for name, raw in _entries(spec):
        check_served_name(name)
        if name in served:
            raise ServedModelError(f"served model {name!r} is given twice")
        path = Path(raw).expanduser().absolute()
        if check_paths:
            check_served_path(name, path)
        served[name] = path
    return served


def served_model_args(served: Mapping[str, Path]) -> list[str]:
    """Command-line arguments that pass ``served`` on to a worker."""
    args: list[str] = []
    for name, path in served.items():
        args += ["--model", f"{name}={path}"]
    return args
