"""One entry point from a path to a ready model (``LlamaModel`` or ``Gemma3Model``).

The architecture comes from the checkpoint (GGUF ``general.architecture``, ``config.json``
``model_type``; see :mod:`metal_marlin.models.registry`). A built-in model's name stands for
its file (:func:`metal_marlin.assets.resolve_model_path`).

Accepts a ``.gguf`` file (dequantized to float), a Hugging Face folder, an MLX-layout
quantized folder (ours or mlx-lm's: ``config.json`` has ``"quantization"``; ours may add
``salient_indices``/``salient_weight`` tensors), or an AutoAWQ GEMM folder (converted in
memory to the MLX layout, see ``autoawq``). The returned metadata tells callers
(generation, the service) what they need besides the weights: chat template, special
token ids, context length, and how the weights are quantized.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..assets import BUILTIN_MODEL_NAME, builtin_model_path, resolve_model_path
from ..models.layers import quantize_model_layers
from ..models.llama import LlamaModel
from ..models.registry import ModelConfig, config_from_hf_dict, model_for_config
from .autoawq import autoawq_quantization, awq_to_native_weights
from .gguf_reader import GGUFCheckpoint, read_gguf
from .hf import SafetensorsFolder, read_hf_config, read_hf_metadata, read_hf_weights


class LoadedModel(NamedTuple):
    """``(model, config, metadata)``; unpacks like the plain tuple."""

    model: LlamaModel  # or a subclass: Gemma3Model
    config: ModelConfig
    metadata: dict[str, Any]


def _is_floating(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def compute_dtype(model: LlamaModel, dtype: mx.Dtype) -> mx.Dtype:
    """``dtype``, except that a float16 request gets the architecture's 16-bit float
    (``half_dtype``: bfloat16 for Gemma 3, whose activations overflow float16)."""
    return getattr(model, "half_dtype", mx.float16) if dtype == mx.float16 else dtype


def _model_tensors(weights: Mapping[str, mx.array | np.ndarray], dtype: mx.Dtype) -> dict[str, mx.array]:
    """MLX arrays, floating ones cast to ``dtype``; packed uint32 weights and int indices kept."""
    tensors = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in weights.items()}
    return {k: v.astype(dtype) if _is_floating(v) and v.dtype != dtype else v for k, v in tensors.items()}


def build_model(
    config: ModelConfig,
    weights: Mapping[str, mx.array | np.ndarray],
    *,
    quantization: Mapping[str, Any] | None = None,
    dtype: mx.Dtype = mx.float32,
) -> LlamaModel:
    """Instantiate ``config``'s architecture and load ``weights`` (HF names) into it, strictly.

    Floating tensors are cast to ``dtype`` (float16: see :func:`compute_dtype`); packed
    uint32 weights and int indices are kept.
    Layers with ``<path>.scales`` in ``weights`` become quantized (``quantization`` holds
    the config's ``group_size``/``bits`` and per-layer overrides). Every parameter must be
    provided and every tensor used, so a wrong checkpoint fails here, not at inference.
    """
    model = model_for_config(config)
    tensors = _model_tensors(model.sanitize(weights), compute_dtype(model, dtype))
    if quantization is not None or any(k.endswith(".scales") for k in tensors):
        quantize_model_layers(model, dict(quantization or {}), tensors)
    model.load_weights(list(tensors.items()), strict=True)
    mx.eval(model.parameters())
    return model


def _quantization(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """MLX-layout quantization settings of a config, or ValueError for other schemes."""
    quant = config.get("quantization")
    if quant is not None:
        return dict(quant)
    legacy = config.get("quantization_config")
    if not legacy:
        return None
    method = legacy.get("quant_method")
    if method is None and "bits" in legacy and "group_size" in legacy:
        return dict(legacy)  # older mlx-lm wrote only "quantization_config"
    raise ValueError(
        f"checkpoint quantized with quant_method={method!r}; only MLX-layout affine "
        "quantization and AutoAWQ GEMM checkpoints load"
    )


def load_hf_folder(folder: str | Path, dtype: mx.Dtype = mx.float32) -> LoadedModel:
    """Load a Hugging Face / MLX folder (``config.json`` + safetensors)."""
    folder = Path(folder)
    raw = read_hf_config(folder)
    config = config_from_hf_dict(raw)
    awq = autoawq_quantization(raw)
    quant = None if awq is not None else _quantization(raw)
    weights = read_hf_weights(folder)
    if awq is not None:
        weights, quant = awq_to_native_weights(weights, awq, str(folder))
    model = build_model(config, weights, quantization=quant, dtype=dtype)
    return LoadedModel(model, config, _hf_metadata(folder, raw, quant, weights))


def _hf_metadata(
    folder: Path, raw: Mapping[str, Any], quant: Mapping[str, Any] | None, names: Any
) -> dict[str, Any]:
    return {
        "source": str(folder),
        "format": "hf",
        "quantization": quant,
        "salient_layers": sum(k.endswith(".salient_indices") for k in names),
        **read_hf_metadata(folder, raw),
    }


def load_gguf(path: str | Path, dtype: mx.Dtype = mx.float32) -> LoadedModel:
    """Load a GGUF file, dequantized to float (see ``gguf_reader``)."""
    config, weights, metadata = read_gguf(path)
    model = build_model(config, weights, dtype=dtype)
    return LoadedModel(model, config, metadata)


def _looks_like_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_model(path: str | Path, dtype: mx.Dtype = mx.float32) -> LoadedModel:
    """Load a ``.gguf`` file, a model folder or a built-in model by name; returns
    ``(model, config, metadata)``.

    metadata keys: ``source``, ``format`` ("gguf" | "hf"), ``quantization`` (the MLX
    ``{"group_size", "bits", ...}`` dict or None; for an AutoAWQ folder, its MLX
    equivalent), ``chat_template``, ``bos_token_id``, ``eos_token_id`` (first id),
    ``eos_token_ids`` (all), ``context_length``; GGUF adds ``gguf_tokenizer`` (the
    ``tokenizer.ggml.*`` fields) and ``architecture``, HF adds ``salient_layers``.
    """
    path = resolve_model_path(path)
    if _is_folder(path):
        return load_hf_folder(path, dtype)
    return load_gguf(path, dtype)


def _is_folder(path: Path) -> bool:
    """True for a model folder, False for a GGUF file; errors for anything else."""
    if path.is_dir():
        return True
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if _looks_like_gguf(path):
        return False
    raise ValueError(f"{path}: expected a .gguf file or a folder with config.json")


def load_builtin_model(dtype: mx.Dtype = mx.float32, name: str = BUILTIN_MODEL_NAME) -> LoadedModel:
    """A built-in model, dequantized (default: SmolLM2-135M-Instruct, Q4_1 GGUF)."""
    return load_model(builtin_model_path(name), dtype)


# ------------------------------------------------------------------ one block at a time


class TensorSource(Protocol):
    """Tensors of a checkpoint by HF name, read one at a time."""

    @property
    def names(self) -> list[str]: ...

    def tensor(self, name: str) -> mx.array | np.ndarray: ...


class LazyCheckpoint(NamedTuple):
    """A float checkpoint opened without reading its tensors (see ``open_checkpoint``)."""

    config: ModelConfig
    metadata: dict[str, Any]
    tensors: TensorSource


def open_checkpoint(path: str | Path | None = None) -> LazyCheckpoint:
    """Open a float ``.gguf`` file or Hugging Face folder lazily (None: the default built-in
    model; a built-in model's name: that model).

    Config and metadata are ``load_model``'s; each tensor is read (a GGUF tensor
    dequantized) only when ``tensors.tensor(name)`` asks for it. Quantized folders are
    refused: this is the input of quantization.
    """
    path = resolve_model_path(path)
    if not _is_folder(path):
        gguf_file = GGUFCheckpoint(path)
        return LazyCheckpoint(gguf_file.config, gguf_file.metadata, gguf_file)
    raw = read_hf_config(path)
    config = config_from_hf_dict(raw)
    if autoawq_quantization(raw) is not None or _quantization(raw) is not None:
        raise ValueError(f"{path} is already quantized; quantize a float (fp32/fp16/bf16) checkpoint")
    source = SafetensorsFolder(path)
    return LazyCheckpoint(config, _hf_metadata(path, raw, None, source.names), source)


_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.")


def build_model_lazily(
    checkpoint: LazyCheckpoint, dtype: mx.Dtype = mx.float32
) -> tuple[LlamaModel, Callable[[int], None]]:
    """``(model, load_block)``: the model with every tensor outside the decoder blocks
    loaded (embedding, final norm, untied ``lm_head``), and a function that loads block
    ``i`` from the checkpoint.

    Until then a block holds its constructor's arrays, which MLX never evaluates, so they
    take no memory. Tensor names go through ``model.sanitize`` and must match the model's
    parameters exactly, as in ``build_model``; shapes are checked as each part loads.
    """
    model = model_for_config(checkpoint.config)
    dtype = compute_dtype(model, dtype)
    names = list(model.sanitize(dict.fromkeys(checkpoint.tensors.names)))
    expected = {k for k, _ in tree_flatten(model.parameters())}
    if extra := sorted(set(names) - expected):
        raise ValueError(f"Received {len(extra)} parameters not in model: \n" + ",\n".join(extra))
    if missing := sorted(expected - set(names)):
        raise ValueError(f"Missing {len(missing)} parameters: \n" + ",\n".join(missing))
    blocks: dict[int, list[str]] = {}
    for name in names:
        match = _BLOCK_NAME.match(name)
        if match:
            blocks.setdefault(int(match.group(1)), []).append(name)

    def load(module: Any, prefix: str, part: list[str]) -> None:
        tensors = _model_tensors({n[len(prefix):]: checkpoint.tensors.tensor(n) for n in part}, dtype)
        current = dict(tree_flatten(module.parameters()))
        for key, value in tensors.items():
            if value.shape != current[key].shape:
                raise ValueError(f"Expected shape {current[key].shape} but received shape {value.shape} for parameter {prefix}{key}")
        module.load_weights(list(tensors.items()), strict=False)
        mx.eval(list(tensors.values()))

    load(model, "", [n for n in names if not _BLOCK_NAME.match(n)])

    def load_block(index: int) -> None:
        load(model.model.layers[index], f"model.layers.{index}.", blocks[index])

    return model, load_block
