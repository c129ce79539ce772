"""AutoAWQ's GEMM checkpoint layout, both ways: export our native folders, import theirs.

AutoAWQ GEMM (4 bits, integer zero points) stores, per quantized linear ``[out, in]``:

* ``qweight`` int32 ``[in, out/8]``: the codes of input row ``i``, eight output columns per
  word, in AutoAWQ's interleaved nibble order: nibble ``k`` (bits ``4k..4k+3``) of word ``j``
  holds output column ``8j + AWQ_PACK_ORDER[k]``, ``AWQ_PACK_ORDER = 0, 2, 4, 6, 1, 3, 5, 7``;
* ``qzeros`` int32 ``[in/group, out/8]``: integer zero points, packed the same way;
* ``scales`` float16 ``[in/group, out]``;
* ``bias`` float16 ``[out]`` when the linear has one;

with ``w = scale * (q - zero)``. Embeddings and ``lm_head`` stay float16 (AutoAWQ never
quantizes them), and ``config.json`` carries ``quantization_config = {"quant_method": "awq",
"version": "gemm", "bits": 4, "group_size": G, "zero_point": true, ...}``.

Our native layout holds the same numbers: codes in MLX's bitstream (``metal_marlin.quant``),
float16 scales, and ``bias = -scale * zero`` with an integer zero. Export unpacks the codes
with the one unpacker of ``metal_marlin.quant``, recovers each integer zero from the stored
bias (checking that ``-scale * zero`` reproduces the bias exactly), and repacks in
AutoAWQ's order; import packs with ``metal_marlin.quant.pack_codes`` and derives the biases
with ``to_mlx_scales_biases``, the pipeline's own function. A round trip is therefore
bit-exact. What AutoAWQ cannot hold is refused: other bit widths, our fp16 salient side
channels, and MLX checkpoints whose biases are not ``-scale * integer`` (``mx.quantize``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..quant import pack_codes, to_mlx_scales_biases, unpack_codes
from .hf import CONFIG_NAME, INDEX_NAME, read_hf_config, read_hf_weights, save_hf_folder

AWQ_BITS = 4
AWQ_PACK_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble ``k`` of a packed word holds column ``8j + AWQ_PACK_ORDER[k]``."""
_PER_WORD = 32 // AWQ_BITS
_MASK = (1 << AWQ_BITS) - 1
_FLOAT_ONLY = ("embed_tokens", "lm_head")  # modules AutoAWQ keeps in float16
_LEGACY_QUANT_CONFIG = "quant_config.json"  # AutoAWQ's older side file, not a tokenizer file


# ------------------------------------------------------------------ packing


def pack_awq(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values ``[rows, cols]`` into AutoAWQ's int32 ``[rows, cols/8]``."""
    values = np.asarray(values)
    rows, cols = values.shape
    if cols % _PER_WORD:
        raise ValueError(f"AutoAWQ packs {_PER_WORD} columns per word; {cols} columns do not fit")
    if values.size and (values.min() < 0 or values.max() > _MASK):
        raise ValueError(f"values must lie in [0, {_MASK}] to pack into {AWQ_BITS} bits")
    columns = values.astype(np.uint32).reshape(rows, cols // _PER_WORD, _PER_WORD)
    words = np.zeros((rows, cols // _PER_WORD), dtype=np.uint32)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        words |= columns[:, :, column] << np.uint32(AWQ_BITS * nibble)
    return words.view(np.int32)


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_awq`: int32 ``[rows, n]`` -> uint8 ``[rows, 8n]``."""
    words = np.ascontiguousarray(words)
    if words.dtype not in (np.int32, np.uint32):
        raise ValueError(f"packed AutoAWQ tensors are int32, got {words.dtype}")
    words = words.view(np.uint32)
    rows, n = words.shape
    values = np.empty((rows, n, _PER_WORD), dtype=np.uint8)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        values[:, :, column] = (words >> np.uint32(AWQ_BITS * nibble)) & _MASK
    return values.reshape(rows, n * _PER_WORD)


# ------------------------------------------------------------------ one layer


def _np(value: Any) -> np.ndarray:
    """numpy view of an mx or numpy tensor (bfloat16 goes through float32)."""
    if isinstance(value, mx.array):
        if value.dtype == mx.bfloat16:
            value = value.astype(mx.float32)
        return np.array(value)
    return np.asarray(value)


def integer_zeros(scales: np.ndarray, biases: np.ndarray, where: str = "") -> np.ndarray:
    """Integer zero points ``[out, groups]`` (uint8) with ``bias == fp16(-scale * zero)``.

    Raises ValueError when some bias is not of that form (e.g. ``mx.quantize``'s float
    minimum), since AutoAWQ can only store integer zero points.
    """
    s = scales.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.rint(-biases.astype(np.float32) / s)
    ok = np.isfinite(zero) & (zero >= 0) & (zero <= _MASK)
    zero = np.where(ok, zero, 0).astype(np.float32)
    _, rebuilt = to_mlx_scales_biases(s, zero, biases.dtype)
    ok &= rebuilt == biases  # float equality: a +0.0 bias is zero point 0 as well
    if not ok.all():
        raise ValueError(
            f"{where}: {int((~ok).sum())} group biases are not -scale * integer zero point "
            "(an mx.quantize/mlx-lm quantization?); AutoAWQ stores integer zero points, so "
            "this checkpoint cannot be exported exactly"
        )
    return zero.astype(np.uint8)


def native_linear_to_awq(weight: Any, scales: Any, biases: Any, where: str = "") -> dict[str, np.ndarray]:
    """``{qweight, qzeros, scales}`` of one 4-bit native linear (MLX layout)."""
    scales_np, biases_np = _np(scales).astype(np.float16), _np(biases).astype(np.float16)
    codes = unpack_codes(_np(weight), AWQ_BITS)  # [out, in]
    zeros = integer_zeros(scales_np, biases_np, where)  # [out, groups]
    return {
        "qweight": pack_awq(np.ascontiguousarray(codes.T)),
        "qzeros": pack_awq(np.ascontiguousarray(zeros.T)),
        "scales": np.ascontiguousarray(scales_np.T),
    }


def awq_linear_to_native(qweight: Any, qzeros: Any, scales: Any) -> dict[str, np.ndarray]:
    """``{weight, scales, biases}`` (MLX layout, float16 scales/biases) of one AutoAWQ linear."""
    codes = unpack_awq(_np(qweight)).T  # [out, in]
    zeros = unpack_awq(_np(qzeros)).T.astype(np.float32)  # [out, groups]
    s = np.ascontiguousarray(_np(scales).astype(np.float16).T).astype(np.float32)
    if zeros.shape != s.shape:
        raise ValueError(f"qzeros {zeros.shape[::-1]} and scales {s.shape[::-1]} do not match")
    out_scales, biases = to_mlx_scales_biases(s, zeros)
    return {"weight": pack_codes(np.ascontiguousarray(codes), AWQ_BITS), "scales": out_scales, "biases": biases}


def _dequantize_native(weight: Any, scales: Any, biases: Any, bits: int) -> np.ndarray:
    """``scale * q + bias`` of an MLX-layout tensor, as float16 (for embeddings / lm_head)."""
    codes = unpack_codes(_np(weight), bits).astype(np.float32)
    s, b = _np(scales).astype(np.float32), _np(biases).astype(np.float32)
    rows, groups = s.shape
    grouped = codes.reshape(rows, groups, -1)
    return (grouped * s[..., None] + b[..., None]).reshape(codes.shape).astype(np.float16)


# ------------------------------------------------------------------ whole checkpoints


def _layer_params(quantization: Mapping[str, Any], prefix: str) -> tuple[int, int]:
    override = quantization.get(prefix)
    declared = {**quantization, **override} if isinstance(override, dict) else quantization
    return int(declared["bits"]), int(declared["group_size"])


def _check_salient(config: Mapping[str, Any], names: Any, where: str) -> None:
    notes = config.get("metal_marlin") or {}
    salient = sorted(n for n in names if n.endswith(".salient_indices"))
    if salient or notes.get("salient_channels"):
        ratio = notes.get("salient_ratio")
        detail = f" (salient_ratio={ratio})" if ratio is not None else ""
        raise ValueError(
            f"{where}: the model keeps fp16 salient channels beside its int4 weights{detail}, "
            "which AutoAWQ's GEMM layout cannot hold; requantize with --salient-ratio 0 to export it"
        )


def native_quantization(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The MLX ``quantization`` block of a native config, checked exportable to AutoAWQ."""
    quant = config.get("quantization")
    if quant is None:
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method is not None and str(method).lower() == "awq":
            raise ValueError(f"{where} is already an AutoAWQ checkpoint")
        raise ValueError(
            f"{where} is not a quantized MLX-layout model (no \"quantization\" in config.json); "
            "quantize it first with `metal-marlin quantize --bits 4 --salient-ratio 0`"
        )
    if int(quant["bits"]) != AWQ_BITS:  # per-layer overrides are checked layer by layer
        raise ValueError(
            f"{where}: AutoAWQ GEMM is 4-bit only; this model is quantized to {quant['bits']} bits"
        )
    if quant.get("mode", "affine") != "affine":
        raise ValueError(f"{where}: quantization mode {quant['mode']!r} is not affine")
    _check_salient(config, (), where)
    return dict(quant)


def native_to_awq_weights(
    weights: Mapping[str, Any], quantization: Mapping[str, Any], where: str = "model"
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Native (MLX-layout) tensors -> AutoAWQ GEMM tensors, and the linears left in float.

    Quantized embeddings / ``lm_head`` are dequantized to float16; every other float
    tensor is stored as float16.
    """
    _check_salient({}, weights, where)
    quantized = sorted(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
    out: dict[str, np.ndarray] = {}
    for prefix in quantized:
        bits, group_size = _layer_params(quantization, prefix)
        weight, scales = _np(weights[f"{prefix}.weight"]), weights[f"{prefix}.scales"]
        biases = weights.get(f"{prefix}.biases")
        if biases is None or weight.dtype != np.uint32:
            raise ValueError(f"{where}: {prefix} is not an affine MLX-quantized layer")
        if weight.shape[-1] * 32 != bits * scales.shape[-1] * group_size:
            raise ValueError(
                f"{where}: {prefix} holds {weight.shape[-1]} words and {scales.shape[-1]} groups "
                f"per row, which is not {bits}-bit with group size {group_size}"
            )
        if prefix.rsplit(".", 1)[-1] in _FLOAT_ONLY:
            out[f"{prefix}.weight"] = _dequantize_native(weight, scales, biases, bits)
            continue
        if bits != AWQ_BITS:
            raise ValueError(f"{where}: {prefix} is {bits}-bit; AutoAWQ GEMM is 4-bit only")
        if weight.shape[0] % _PER_WORD:
            raise ValueError(f"{where}: {prefix} has {weight.shape[0]} outputs, not a multiple of 8")
        for name, value in native_linear_to_awq(weight, scales, biases, f"{where}: {prefix}").items():
            out[f"{prefix}.{name}"] = value
    done = {f"{p}.{n}" for p in quantized for n in ("weight", "scales", "biases")}
    not_converted = []
    for name, value in weights.items():
        if name in done:
            continue
        array = _np(value)
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float16)
            if name.startswith("model.layers.") and name.endswith(".weight") and array.ndim == 2:
                not_converted.append(name[: -len(".weight")])
        out[name] = array
    return out, sorted(not_converted)


def autoawq_quantization(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """AutoAWQ GEMM settings of a config (``quantization_config``), or None if not AutoAWQ.

    Raises ValueError for AutoAWQ variants we cannot read (GEMV/Marlin/... layouts, other
    bit widths, no zero points).
    """
    qcfg = config.get("quantization_config") or {}
    if str(qcfg.get("quant_method", "")).lower() != "awq":
        return None
    version = str(qcfg.get("version", "gemm")).lower()
    bits = int(qcfg.get("bits", qcfg.get("w_bit", AWQ_BITS)))
    if version != "gemm":
        raise ValueError(f"AutoAWQ version {qcfg.get('version')!r} is not supported (GEMM only)")
    if bits != AWQ_BITS:
        raise ValueError(f"AutoAWQ checkpoint with {bits} bits is not supported (4 bits only)")
    if qcfg.get("zero_point", True) is False:
        raise ValueError("AutoAWQ checkpoint without zero points is not supported")
    return dict(qcfg)


def awq_to_native_weights(
    weights: Mapping[str, Any], qcfg: Mapping[str, Any], where: str = "model"
) -> tuple[dict[str, Any], dict[str, int]]:
    """AutoAWQ GEMM tensors -> native MLX-layout tensors and the ``quantization`` block.

    Tensors other than ``qweight``/``qzeros``/``scales`` pass through unchanged.
    """
    out: dict[str, Any] = {}
    declared = qcfg.get("group_size", qcfg.get("q_group_size"))
    group_sizes = set()
    for name in weights:
        if name.endswith(".g_idx"):
            raise ValueError(f"{where}: {name}: reordered groups (g_idx) are not AutoAWQ GEMM")
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        try:
            qweight, qzeros, scales = (weights[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales"))
        except KeyError as exc:
            raise ValueError(f"{where}: {prefix} has qweight but no {exc.args[0].rsplit('.', 1)[-1]}") from None
        in_features, groups = qweight.shape[0], scales.shape[0]
        if in_features % groups:
            raise ValueError(f"{where}: {prefix}: {groups} scale rows do not divide {in_features} inputs")
        group_sizes.add(in_features // groups)
        for key, value in awq_linear_to_native(qweight, qzeros, scales).items():
            out[f"{prefix}.{key}"] = value
    if not group_sizes:
        raise ValueError(f"{where}: AutoAWQ config but no .qweight tensors")
    if len(group_sizes) > 1 or (declared not in (None, -1) and int(declared) not in group_sizes):
        raise ValueError(
            f"{where}: config declares group_size={declared} but the tensors hold {sorted(group_sizes)}"
        )
    converted = {k[: -len(".qweight")] for k in weights if k.endswith(".qweight")}
    for name, value in weights.items():
        prefix, _, leaf = name.rpartition(".")
        if not (prefix in converted and leaf in ("qweight", "qzeros", "scales")):
            out[name] = value
    return out, {"group_size": group_sizes.pop(), "bits": AWQ_BITS}


# ------------------------------------------------------------------ folders


def _side_files(folder: Path) -> dict[str, bytes]:
    """Tokenizer, generation config and other plain files to carry over (not weights/config)."""
    skip = {CONFIG_NAME, INDEX_NAME, _LEGACY_QUANT_CONFIG}
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".safetensors" and p.name not in skip
    }


def _check_paths(src: str | Path, dst: str | Path) -> tuple[Path, Path]:
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"model path {str(src)!r} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a model folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"output {str(dst)!r} already exists; choose a new folder")
    return src, dst


def _write_folder(dst: Path, weights: Mapping[str, Any], config: Mapping[str, Any], extra: Mapping[str, bytes]) -> Path:
    if dst.is_dir():  # an empty folder: replace it so the result appears in one rename
        os.rmdir(dst)
    return save_hf_folder(dst, weights, config, extra_files=extra)


def export_autoawq(src: str | Path, dst: str | Path) -> Path:
    """Write our native 4-bit folder ``src`` as a new AutoAWQ GEMM folder ``dst`` (atomically)."""
    src, dst = _check_paths(src, dst)
    config = read_hf_config(src)
    quant = native_quantization(config, str(src))  # refuse before reading the weights
    tensors, not_converted = native_to_awq_weights(read_hf_weights(src), quant, str(src))
    out_config = {k: v for k, v in config.items() if k != "quantization"}
    out_config["quantization_config"] = {
        "quant_method": "awq",
        "bits": AWQ_BITS,
        "group_size": int(quant["group_size"]),
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": not_converted,
    }
    out_config.setdefault("torch_dtype", "float16")
    return _write_folder(dst, tensors, out_config, _side_files(src))


def import_autoawq(src: str | Path, dst: str | Path) -> Path:
    """Write the AutoAWQ GEMM folder ``src`` as a new native MLX-layout folder ``dst`` (atomically)."""
    src, dst = _check_paths(src, dst)
    config = read_hf_config(src)
    qcfg = autoawq_quantization(config)
    if qcfg is None:
        raise ValueError(
            f"{src} is not an AutoAWQ checkpoint (config.json has no quantization_config "
            "with quant_method 'awq')"
        )
    tensors, quant = awq_to_native_weights(read_hf_weights(src), qcfg, str(src))
    out_config = dict(config)
    out_config["quantization"] = dict(quant)
    out_config["quantization_config"] = dict(quant)  # what our pipeline and mlx-lm write
    return _write_folder(dst, tensors, out_config, _side_files(src))


__all__ = [
    "AWQ_PACK_ORDER",
    "autoawq_quantization",
    "awq_linear_to_native",
    "awq_to_native_weights",
    "export_autoawq",
    "import_autoawq",
    "integer_zeros",
    "native_linear_to_awq",
    "native_to_awq_weights",
    "pack_awq",
    "unpack_awq",
]
