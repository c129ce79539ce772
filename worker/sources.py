"""What a quantization job may read: the built-in model, uploaded files, or files under
configured roots.

Uploaded files (``POST /v1/files``) live in ``<data>/files/<file_id>``; their record (purpose,
format, client file name as metadata only) is in the job store. A job names one by id; its
purpose must match the use (``model``: a ``.gguf`` file; ``calibration``: UTF-8 text or an
``activations.npz``). :func:`inspect_upload` checks the content when it is uploaded (npz:
array headers only, never unpickled); the library checks it again when the job reads it.

A job names its model (and optionally a calibration file) by path. Paths are only accepted
inside the configured roots (``MM_MODEL_ROOTS``, ``os.pathsep``-separated):

- any ``..`` component is refused outright;
- the path (absolute, or relative to a root) is resolved with ``os.path.realpath`` and must
  still lie inside a root's own real path, so a symlink inside a root that points outside
  it is refused too;
- "outside the roots" is reported the same way whether or not the target exists, so the
  API cannot be used to probe the file system.

The service validates when a job is submitted and stores the resolved path; the worker
validates again right before reading (the file system may have changed in between).

Pure Python (no MLX): the service imports it.
"""

from __future__ import annotations

import codecs
import json
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jobstore import JobStore, StoredFile, is_file_id
from jobstore.layout import stored_file_path

MAX_PATH_CHARS = 4096
ACTIVATION_ARRAYS = ("input_ids", "hidden_states")


class SourceError(ValueError):
    """A job source that may not or cannot be read; ``param`` names the request field."""

    def __init__(self, message: str, *, param: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def parse_roots(value: str | Iterable[str | os.PathLike[str]] | None) -> list[Path]:
    """Real paths of the configured roots (``os.pathsep``-separated string or a list)."""
    if value is None:
        return []
    items = value.split(os.pathsep) if isinstance(value, str) else [os.fspath(v) for v in value]
    roots = []
    for item in items:
        item = item.strip()
        if item:
            roots.append(Path(os.path.realpath(os.path.expanduser(item))))
    return roots


def _inside(path: str, root: Path) -> bool:
    root_s = str(root)
    try:
        return os.path.commonpath([path, root_s]) == root_s
    except ValueError:  # different drives (Windows)
        return False


def resolve_under_roots(user_path: str, roots: Sequence[Path], *, param: str, what: str = "model") -> Path:
    """The real path of ``user_path`` if it lies inside one of ``roots``; else :class:`SourceError`."""
    if not isinstance(user_path, str) or not user_path.strip():
        raise SourceError(f"{param} must be a non-empty path", param=param, code="invalid_path")
    if "\x00" in user_path or len(user_path) > MAX_PATH_CHARS:
        raise SourceError(f"{param} is not a valid path", param=param, code="invalid_path")
    parts = user_path.replace("\\", "/").split("/")
    if ".." in parts:
        raise SourceError(f"{param} must not contain '..' components", param=param, code="path_not_allowed")
    if not roots:
        raise SourceError(
            f"{what} paths are disabled on this server (no model roots configured: set MM_MODEL_ROOTS)",
            param=param,
            code="path_not_allowed",
        )
    expanded = os.path.expanduser(user_path) if user_path.startswith("~") else user_path
    candidates = [Path(expanded)] if os.path.isabs(expanded) else [root / expanded for root in roots]
    inside_any = False
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if not any(_inside(real, root) for root in roots):
            continue
        inside_any = True
        if os.path.exists(real):
            return Path(real)
    if not inside_any:
        raise SourceError(
            f"{param} is outside the configured model roots", param=param, code="path_not_allowed"
        )
    raise SourceError(f"{what} not found: {user_path}", param=param, code=f"{what.replace(' ', '_')}_not_found")


@dataclass(frozen=True)
class ModelWidths:
    """Input widths of a decoder's linear layers (each must be a multiple of the group size)."""

    hidden_size: int
    intermediate_size: int
    attention_width: int  # num_attention_heads * head_dim: o_proj's input

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.hidden_size, self.intermediate_size, self.attention_width)


def _widths_from_hf(config: dict[str, Any]) -> ModelWidths:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return ModelWidths(hidden, int(config["intermediate_size"]), heads * head_dim)


def _widths_from_gguf(meta: dict[str, Any]) -> ModelWidths:
    arch = meta.get("general.architecture", "llama")
    hidden = int(meta[f"{arch}.embedding_length"])
    heads = int(meta[f"{arch}.attention.head_count"])
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    return ModelWidths(hidden, int(meta[f"{arch}.feed_forward_length"]), heads * head_dim)


@lru_cache(maxsize=64)
def _cached_widths(path: str, mtime_ns: int, size: int) -> ModelWidths:
    p = Path(path)
    if p.is_dir():
        config_path = p / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{p.name}: a model folder needs a config.json")
        return _widths_from_hf(json.loads(config_path.read_text(encoding="utf-8")))
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{p.name}: expected a .gguf file or a folder with config.json")
    from metal_marlin.tokenizer import read_gguf_metadata

    return _widths_from_gguf(read_gguf_metadata(p))


def model_widths(path: Path | None) -> ModelWidths:
    """Widths of a model file or folder (``None``: the built-in model), without loading weights."""
    if path is None:
        from metal_marlin.assets import builtin_model_path

        path = builtin_model_path()
    target = path / "config.json" if path.is_dir() else path
    st = target.stat() if target.exists() else path.stat()
    try:
        return _cached_widths(str(path), st.st_mtime_ns, st.st_size)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, KeyError):
            raise ValueError(f"model config lacks {exc.args[0]!r}") from exc
        raise ValueError(str(exc)) from exc


def check_quantizable(widths: ModelWidths, bits: int, group_size: int) -> None:
    """Raise ``ValueError`` (the library's message) if the group size does not fit the model."""
    from metal_marlin.quant import QuantSpec

    spec = QuantSpec(bits=bits, group_size=group_size)
    for width in widths.as_tuple():
        spec.check_in_features(width)


# ---------------------------------------------------------------------------------------
# Uploaded files
# ---------------------------------------------------------------------------------------
def resolve_file_source(store: JobStore, data_dir: Path, file_id: str, *, purpose: str, param: str) -> tuple[StoredFile, Path]:
    """The record and path of an uploaded file usable as ``purpose``; else :class:`SourceError`."""
    record = store.get_file(file_id) if is_file_id(file_id) else None
    path = stored_file_path(data_dir, file_id) if record is not None else None
    if record is None or path is None or not path.is_file():
        raise SourceError(f"no uploaded file {file_id!r}", param=param, code="file_not_found")
    if record.purpose != purpose:
        raise SourceError(
            f"file {file_id} was uploaded with purpose {record.purpose!r}; {param} needs a file with purpose {purpose!r}",
            param=param,
            code="invalid_file_purpose",
        )
    return record, path


def _npy_header(handle: Any) -> tuple[tuple[int, ...], Any]:
    import numpy as np

    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(handle)
    return shape, dtype


def check_activations_npz(path: Path) -> None:
    """Structure of an ``activations.npz`` from its array headers (nothing is unpickled or
    decompressed in bulk); then ``input_ids`` is loaded with ``allow_pickle=False``."""
    import numpy as np

    headers: dict[str, tuple[tuple[int, ...], Any]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                key = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else None
                if key not in ACTIVATION_ARRAYS:
                    raise ValueError(f"unexpected member {info.filename!r}; allowed arrays are {list(ACTIVATION_ARRAYS)}")
                with archive.open(info) as handle:
                    headers[key] = _npy_header(handle)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"not a valid .npz file: {exc}") from exc
    if any(dtype.hasobject for _, dtype in headers.values()):
        raise ValueError("the .npz holds object arrays (pickled data), which are never loaded")
    if "input_ids" not in headers:
        raise ValueError("missing array 'input_ids' (int32 [samples, seq_len])")
    shape, dtype = headers["input_ids"]
    if len(shape) != 2 or 0 in shape or dtype.kind not in "iu":
        raise ValueError(f"'input_ids' must be a non-empty integer array [samples, seq_len], got {dtype} {shape}")
    if "hidden_states" in headers:
        hshape, hdtype = headers["hidden_states"]
        if len(hshape) != 3 or tuple(hshape[:2]) != tuple(shape) or hdtype.kind != "f":
            raise ValueError(f"'hidden_states' must be floating point [samples, seq_len, hidden] matching 'input_ids', got {hdtype} {hshape}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            ids = archive["input_ids"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read 'input_ids': {exc}") from exc
    if ids.min() < 0:
        raise ValueError("'input_ids' has negative token ids")


def check_utf8_text(path: Path, chunk: int = 1 << 20) -> None:
    """UTF-8 text with some non-blank content and no NUL bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    content = False
    with open(path, "rb") as handle:
        while True:
            data = handle.read(chunk)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise ValueError(f"calibration text must be UTF-8 (invalid byte at offset {exc.start} of a chunk)") from exc
            if "\x00" in text:
                raise ValueError("calibration text contains NUL bytes: not a text file")
            content = content or bool(text.strip())
            if not data:
                break
    if not content:
        raise ValueError("calibration text is empty")


def inspect_upload(path: Path, purpose: str) -> str:
    """Check an upload's content for its purpose; returns its format (``gguf``, ``npz``, ``text``).

    Raises ``ValueError`` with the reason when the content does not fit the purpose.
    """
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if purpose == "model":
        if magic != b"GGUF":
            raise ValueError("a model upload must be a .gguf file (the content does not start with the GGUF magic)")
        try:
            model_widths(path)
        except Exception as exc:  # noqa: BLE001 - any parse failure means an unusable file
            raise ValueError(f"cannot read the GGUF metadata: {exc}") from exc
        return "gguf"
    if purpose == "calibration":
        if magic == b"PK\x03\x04":
            check_activations_npz(path)
            return "npz"
        check_utf8_text(path)
        return "text"
    raise ValueError(f"unknown purpose {purpose!r}")
