"""One entry point from a path to a ready ``LlamaModel``.

Accepts a ``.gguf`` file (dequantized to float), a Hugging Face folder, an MLX-layout
quantized folder (ours or mlx-lm's: ``config.json`` has ``"quantization"``; ours may add
``salient_indices``/``salient_weight`` tensors), or an AutoAWQ GEMM folder (converted in
memory to the MLX layout, see ``autoawq``). The returned metadata tells callers
(generation, the service) what they need besides the weights: chat template, special
token ids, context length, and how the weights are quantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from ..assets import builtin_model_path
from ..models.layers import quantize_model_layers
from ..models.llama import LlamaConfig, LlamaModel
from .autoawq import autoawq_quantization, awq_to_native_weights
from .gguf_reader import read_gguf
from .hf import read_hf_config, read_hf_metadata, read_hf_weights


class LoadedModel(NamedTuple):
    """``(model, config, metadata)``; unpacks like the plain tuple."""

    model: LlamaModel
    config: LlamaConfig
    metadata: dict[str, Any]


def _is_floating(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def build_model(
    config: LlamaConfig,
    weights: Mapping[str, mx.array | np.ndarray],
    *,
    quantization: Mapping[str, Any] | None = None,
    dtype: mx.Dtype = mx.float32,
) -> LlamaModel:
    """Instantiate a model and load ``weights`` (HF names) into it, strictly.

    Floating tensors are cast to ``dtype``; packed uint32 weights and int indices are kept.
    Layers with ``<path>.scales`` in ``weights`` become quantized (``quantization`` holds
    the config's ``group_size``/``bits`` and per-layer overrides). Every parameter must be
    provided and every tensor used, so a wrong checkpoint fails here, not at inference.
    """
    model = LlamaModel(config)
    tensors = {
        k: v if isinstance(v, mx.array) else mx.array(v)
        for k, v in model.sanitize(weights).items()
    }
    if quantization is not None or any(k.endswith(".scales") for k in tensors):
        quantize_model_layers(model, dict(quantization or {}), tensors)
    tensors = {
        k: v.astype(dtype) if _is_floating(v) and v.dtype != dtype else v
        for k, v in tensors.items()
    }
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
    config = LlamaConfig.from_hf_dict(raw)
    awq = autoawq_quantization(raw)
    quant = None if awq is not None else _quantization(raw)
    weights = read_hf_weights(folder)
    if awq is not None:
        weights, quant = awq_to_native_weights(weights, awq, str(folder))
    model = build_model(config, weights, quantization=quant, dtype=dtype)
    metadata = {
        "source": str(folder),
        "format": "hf",
        "quantization": quant,
        "salient_layers": sum(k.endswith(".salient_indices") for k in weights),
        **read_hf_metadata(folder, raw),
    }
    return LoadedModel(model, config, metadata)


def load_gguf(path: str | Path, dtype: mx.Dtype = mx.float32) -> LoadedModel:
    """Load a llama GGUF file, dequantized to float (see ``gguf_reader``)."""
    config, weights, metadata = read_gguf(path)
    model = build_model(config, weights, dtype=dtype)
    return LoadedModel(model, config, metadata)


def _looks_like_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_model(path: str | Path, dtype: mx.Dtype = mx.float32) -> LoadedModel:
    """Load a ``.gguf`` file or a model folder; returns ``(model, config, metadata)``.

    metadata keys: ``source``, ``format`` ("gguf" | "hf"), ``quantization`` (the MLX
    ``{"group_size", "bits", ...}`` dict or None; for an AutoAWQ folder, its MLX
    equivalent), ``chat_template``, ``bos_token_id``, ``eos_token_id`` (first id),
    ``eos_token_ids`` (all), ``context_length``; GGUF adds ``gguf_tokenizer`` (the
    ``tokenizer.ggml.*`` fields), HF adds ``salient_layers``.
    """
    path = Path(path)
    if path.is_dir():
        return load_hf_folder(path, dtype)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if _looks_like_gguf(path):
        return load_gguf(path, dtype)
    raise ValueError(f"{path}: expected a .gguf file or a folder with config.json")


def load_builtin_model(dtype: mx.Dtype = mx.float32) -> LoadedModel:
    """The built-in SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)."""
    return load_model(builtin_model_path(), dtype)
