"""Hugging Face folders: read ``config.json`` + safetensors (sharded or not), write atomically.

Writing is atomic because a folder is a job's result that another process may serve or
download at any moment: a reader must see either the old complete files or the new complete
files, never a half-written safetensors. New folders are built under a temporary name next
to the destination and renamed into place; into an existing folder each file is written to a
temporary name in it and renamed, ``config.json`` last (so its presence means "complete").
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    # Mistral repos ship Mistral-named "consolidated" weights beside the HF shards.
    hf_files = [p for p in files if not p.name.startswith("consolidated")]
    return hf_files or files


class SafetensorsFolder:
    """The safetensors of a model folder (index-listed shards, or every file), one tensor
    at a time.

    ``mx.load`` reads a file's header only: its arrays are lazy and each reads its own bytes
    when evaluated (bfloat16 included, which ``safe_open``'s numpy and mlx frameworks cannot
    return in safetensors 0.8), so a tensor costs memory from its evaluation until its
    caller drops it. Each ``tensor()`` call hands out an array no one else holds. Missing
    shards, tensors in two shards, and tensors the index lists but no shard holds raise
    errors here.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = folder = Path(folder)
        files = _weight_files(folder)
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors files")
        self._file_of: dict[str, str] = {}
        self._unread: dict[str, dict[str, mx.array]] = {}  # per file: lazy arrays not handed out
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(
                    f"{folder}: shard {file.name} listed in {INDEX_NAME} is missing"
                )
            arrays = self._unread[str(file)] = mx.load(str(file))
            for key in arrays:
                if key in self._file_of:
                    raise ValueError(f"{folder}: tensor {key!r} appears in more than one shard")
                self._file_of[key] = str(file)
        index = folder / INDEX_NAME
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                missing = set(json.load(f)["weight_map"]) - set(self._file_of)
            if missing:
                raise ValueError(
                    f"{folder}: tensors listed in {INDEX_NAME} not found: {sorted(missing)[:5]}"
                )

    @property
    def names(self) -> list[str]:
        """Every tensor name, shard by shard in file order."""
        return list(self._file_of)

    def tensor(self, name: str) -> mx.array:
        """One tensor, as stored (lazy until evaluated)."""
        file = self._file_of[name]
        unread = self._unread[file]
        if name not in unread:  # handed out before: a fresh lazy array from the file
            unread = self._unread[file] = mx.load(file)
        return unread.pop(name)


def read_hf_weights(folder: str | Path) -> dict[str, mx.array]:
    """All tensors of a folder's safetensors: every tensor of :class:`SafetensorsFolder`.

    Uses ``mx.load`` so bfloat16 checkpoints load without a torch dependency.
    """
    source = SafetensorsFolder(folder)
    return {name: source.tensor(name) for name in source.names}


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = folder / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str):
            return template
    return None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def read_hf_metadata(folder: str | Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Chat template and special token ids from a folder (config + generation config)."""
    folder = Path(folder)
    eos = _ids(config.get("eos_token_id"))
    bos = config.get("bos_token_id")
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        with open(gen_path, encoding="utf-8") as f:
            gen = json.load(f)
        eos += [i for i in _ids(gen.get("eos_token_id")) if i not in eos]
        bos = bos if bos is not None else gen.get("bos_token_id")
    return {
        "chat_template": _chat_template(folder),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos[0] if eos else None,
        "eos_token_ids": eos,
        "context_length": config.get("max_position_embeddings"),
    }


def _as_mx(name: str, value: Any) -> mx.array:
    if isinstance(value, mx.array):
        return value
    arr = np.asarray(value)
    if arr.dtype == np.float64:  # safetensors consumers expect <= 32-bit floats
        arr = arr.astype(np.float32)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
    return mx.array(arr)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def save_hf_folder(
    path: str | Path,
    weights: Mapping[str, mx.array | np.ndarray],
    config: Mapping[str, Any],
    *,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``extra_files``, e.g. tokenizer.json).

    numpy float64 tensors are stored as float32. Returns the folder path.
    """
    dest = Path(path)
    arrays = {name: _as_mx(name, value) for name, value in weights.items()}
    mx.eval(list(arrays.values()))

    def write_weights(target: Path) -> None:
        # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
        mx.save_safetensors(str(target), arrays, metadata={"format": "pt"})
        _fsync_file(target)

    writers: list[tuple[str, Callable[[Path], None]]] = [(WEIGHTS_NAME, write_weights)]
    for name, data in (extra_files or {}).items():
        if Path(name).name != name or name in (WEIGHTS_NAME, CONFIG_NAME):
            raise ValueError(f"extra file name {name!r} must be a plain, non-reserved file name")
        writers.append((name, lambda p, d=data: _write_bytes(p, d)))
    writers.append((CONFIG_NAME, lambda p: _write_json(p, dict(config))))

    if dest.exists():
        if not dest.is_dir():
            raise NotADirectoryError(f"{dest} exists and is not a folder")
        for name, write in writers:
            tmp = dest / f".{uuid.uuid4().hex}.tmp.{name}"
            try:
                write(tmp)
                os.replace(tmp, dest / name)
            finally:
                tmp.unlink(missing_ok=True)
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for name, write in writers:
            write(tmp_dir / name)
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; a result folder is not
        os.rename(tmp_dir, dest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return dest
