"""The seed API: AWQ for one weight matrix, and its inverse.

``awq_quantize(weights [in, out], activations [..., in])`` runs the real AWQ search on that
matrix (see :mod:`metal_marlin.search`): per-input-channel scales from an activation
statistic, chosen by the error of the layer *output* on the calibration activations; then
a per-group clip search; then asymmetric group quantization with integer zero points.

``salient_ratio`` keeps that fraction of input channels (ranked by
:func:`find_salient_weights`) in float16 beside the integer matrix; their columns are zero
in the quantized matrix, so inference is ``(x/s) @ Q + x[:, idx] @ W_salient``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from metal_marlin.backends import check_output_backend, compute_namespace, from_numpy, to_numpy
from metal_marlin.quant import (
    QuantSpec,
    dequantize_codes,
    fake_quantize,
    quantize_tensor,
    unpack_codes,
)
from metal_marlin.search import OutputError, fake_quantize_scaled, search_clip, search_scales

ActivationMethod = Literal["mean", "max", "rms"]
ACTIVATION_METHODS: tuple[str, ...] = ("mean", "max", "rms")
QUANT_TYPES = {2: "awq_int2", 3: "awq_int3", 4: "awq_int4", 8: "awq_int8"}


# ---------------------------------------------------------------------------- validation


def _as_float_array(value: Any, name: str) -> np.ndarray:
    """A float32 copy of ``value`` (never a view: inputs are not modified)."""
    try:
        array = to_numpy(value)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad argument
        raise TypeError(f"{name} must be an array, got {type(value).__name__}") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(f"{name} must be a numeric array, got dtype {array.dtype}")
    array = np.array(array, dtype=np.float32, copy=True)
    if array.size and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s)")
    return array


def _check_method(method: str, name: str = "activation_method") -> None:
    if method not in ACTIVATION_METHODS:
        raise ValueError(f"{name} must be one of {ACTIVATION_METHODS}, got {method!r}")


def _check_salient_ratio(salient_ratio: float) -> None:
    if isinstance(salient_ratio, bool) or not isinstance(salient_ratio, (int, float)):
        raise TypeError(f"salient_ratio must be a number, got {salient_ratio!r}")
    if not (0.0 <= float(salient_ratio) < 0.5) or math.isnan(salient_ratio):
        raise ValueError(f"salient_ratio must be in [0, 0.5), got {salient_ratio!r}")


def _activation_matrix(activations: Any, in_features: int) -> np.ndarray:
    x = _as_float_array(activations, "activations")
    if x.ndim < 2:
        raise ValueError(
            f"activations must have shape [..., in_features] with at least 2 dims, got shape {x.shape}"
        )
    if x.shape[-1] != in_features:
        raise ValueError(
            f"activations last dim {x.shape[-1]} does not match weights in_features {in_features} "
            f"(activations shape {x.shape})"
        )
    x = x.reshape(-1, in_features)
    if x.shape[0] == 0:
        raise ValueError(f"activations is empty (shape {np.shape(activations)}); need at least one token")
    return x


# ---------------------------------------------------------------------------- statistics


def compute_activation_stats(activations: np.ndarray, method: ActivationMethod = "rms") -> np.ndarray:
    """Per-input-channel statistic over all leading axes: mean |x|, max |x| or RMS.

    Accepts ``[tokens, in]`` or ``[batch, seq, in]``; returns float32 ``[in]``. Accumulates
    in float64 so long calibration sets do not lose precision.
    """
    _check_method(method, "method")
    x = _as_float_array(activations, "activations")
    if x.ndim < 2:
        raise ValueError(f"activations must have at least 2 dims [..., in_features], got shape {x.shape}")
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"activations is empty (shape {np.shape(activations)})")
    return np.asarray(channel_stats(x.astype(np.float64), method, np), dtype=np.float32)


def channel_stats(x: Any, method: ActivationMethod, xp: Any) -> Any:
    """The statistic of ``x [tokens, in]`` per input channel, in namespace ``xp``.

    The one formula behind :func:`compute_activation_stats` (numpy, float64) and the
    model pipeline on a GPU (MLX, where the calibration activations stay on the device).
    """
    if method == "mean":
        return xp.mean(xp.abs(x), axis=0)
    if method == "max":
        return xp.max(xp.abs(x), axis=0)
    return xp.sqrt(xp.mean(xp.square(x), axis=0))


def _salient_count(in_features: int, salient_ratio: float) -> int:
    """Channels kept in fp16: ``round(ratio * in)``, at least one for any positive ratio."""
    if salient_ratio <= 0:
        return 0
    return max(1, int(round(salient_ratio * in_features)))


def find_salient_weights(
    weights: np.ndarray,
    activation_stats: np.ndarray,
    salient_ratio: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """The most important input channels of ``weights [in, out]``.

    Importance of input channel ``i`` = ``activation_stats[i] * mean_j |weights[i, j]|``: the
    typical magnitude of that channel's contribution to the output. Returns
    ``(indices, importance)``: the top ``round(salient_ratio * in)`` channel indices (int64,
    most important first) and their importance values (float32).
    """
    _check_salient_ratio(salient_ratio)
    w = _as_float_array(weights, "weights")
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [in_features, out_features], got shape {w.shape}")
    stats = _as_float_array(activation_stats, "activation_stats").reshape(-1)
    if stats.shape[0] != w.shape[0]:
        raise ValueError(
            f"activation_stats has {stats.shape[0]} channels but weights has in_features={w.shape[0]}"
        )
    importance = stats * np.abs(w).mean(axis=1)
    k = _salient_count(w.shape[0], salient_ratio)
    order = np.argsort(-importance, kind="stable")[:k].astype(np.int64)
    return order, importance[order].astype(np.float32)


# ---------------------------------------------------------------------------- result


@dataclass
class AWQResult:
    """A weight matrix quantized with AWQ.

    Storage follows MLX's layout for the ``[out, in]`` linear weight: ``Q`` packs codes into
    ``uint32 [out, in*bits/32]``; ``scales`` (float16) and ``zeros`` (uint8 integer zero
    points) are ``[out, in/group_size]``. ``q_scale [in]`` is the AWQ channel scale ``s``:
    the stored matrix approximates ``diag(s) @ weights``, so inputs must be divided by ``s``.
    Salient channels: ``salient_indices [k]`` with their original rows
    ``salient_weights [k, out]`` (float16).
    """

    Q: Any
    scales: Any
    zeros: Any
    q_scale: Any
    salient_indices: Any
    salient_weights: Any
    in_features: int
    out_features: int
    bits: int
    group_size: int
    activation_method: str
    alpha: float
    clip_ratios: Any
    output_error: float
    """Output MSE of the final quantized layer (with its fp16 side channels) on the calibration activations."""
    rtn_output_error: float
    """Output MSE of plain round-to-nearest (same quantizer, no scaling, clipping or side channels)."""
    search_losses: list[float] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        """Storage per original weight: codes + fp16 scale and bias per group + fp16 side rows."""
        n = self.in_features * self.out_features
        n_groups = self.in_features // self.group_size
        k = len(self.salient_indices)
        total = n * self.bits + self.out_features * n_groups * 32 + k * self.out_features * 16 + k * 32
        return total / n

    @property
    def meta(self) -> dict[str, Any]:
        """What :func:`awq_dequantize` needs besides the four arrays."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group_size": self.group_size,
            "bits": self.bits,
            "quant_type": QUANT_TYPES[self.bits],
            "salient_indices": to_numpy(self.salient_indices),
            "salient_weights": to_numpy(self.salient_weights),
        }


# ---------------------------------------------------------------------------- quantize


def awq_quantize(
    weights: np.ndarray,
    activations: np.ndarray,
    group_size: int = 128,
    salient_ratio: float = 0.01,
    activation_method: ActivationMethod = "rms",
    output_backend: Literal["numpy", "mlx", "torch"] = "numpy",
    *,
    bits: int = 4,
    n_grid: int = 20,
    duo_scaling: bool = False,
    clip_search: bool = True,
    compute_backend: Literal["auto", "numpy", "mlx"] = "auto",
) -> AWQResult:
    """Quantize ``weights [in, out]`` with AWQ using calibration ``activations [..., in]``.

    Searches ``n_grid`` values of alpha for channel scales ``s = stat**alpha`` (normalised;
    with ``duo_scaling`` also divided by a weight statistic, as AutoAWQ does), scoring each
    candidate by the mean squared error of the layer output ``activations @ weights``; then
    shrinks each group's range where that lowers the output error (``clip_search``). Alpha 0
    is plain round-to-nearest, so the search never does worse than it on the calibration set.
    All search math is float32, on numpy or MLX (``compute_backend``; "auto" = MLX on a GPU, else numpy).
    """
    check_output_backend(output_backend)
    _check_method(activation_method)
    _check_salient_ratio(salient_ratio)
    spec = QuantSpec(bits=bits, group_size=group_size)
    w_in_out = _as_float_array(weights, "weights")
    if w_in_out.ndim != 2 or 0 in w_in_out.shape:
        raise ValueError(f"weights must be a non-empty 2-D [in_features, out_features] array, got shape {w_in_out.shape}")
    in_features, out_features = w_in_out.shape
    spec.check_in_features(in_features)
    x = _activation_matrix(activations, in_features)
    xp = compute_namespace(compute_backend)

    stat = compute_activation_stats(x, activation_method)
    salient_idx, _ = find_salient_weights(w_in_out, stat, salient_ratio)
    keep_np = np.ones(in_features, dtype=bool)
    keep_np[salient_idx] = False

    w = xp.array(np.ascontiguousarray(w_in_out.T))  # [out, in]: the linear layer's layout
    keep = xp.array(keep_np.astype(np.float32))
    error = OutputError(xp.array(x), xp)

    rtn_error = error.total(fake_quantize(w, spec, xp) - w)
    found = search_scales(
        [w],
        xp.array(stat),
        keep,
        spec,
        loss=lambda deltas: error.total_lazy(deltas[0]),
        n_grid=n_grid,
        duo_scaling=duo_scaling,
        xp=xp,
    )
    s = found.scales
    target = w * keep[None, :]
    clip_ratio = None
    best_error = found.loss
    if clip_search:
        candidate = search_clip(w, s, keep, spec, error, xp=xp)
        clipped_error = error.total(fake_quantize_scaled(w, s, keep, spec, xp, candidate) - target)
        if clipped_error < best_error:
            clip_ratio, best_error = candidate, clipped_error

    quantized = quantize_tensor(w * (s * keep)[None, :], spec, xp, clip_ratio)
    salient_rows = w_in_out[salient_idx].astype(np.float16)
    # Score what is actually stored: integer matrix plus float16 side rows.
    w_hat = quantized.dequantize(xp) / s[None, :]
    w_hat_np = np.array(w_hat)
    w_hat_np[:, salient_idx] = salient_rows.astype(np.float32).T
    final_error = error.total(xp.array(w_hat_np) - w)

    ratios = np.array(clip_ratio) if clip_ratio is not None else np.ones((out_features, in_features // group_size), np.float32)
    return AWQResult(
        Q=from_numpy(np.array(quantized.packed), output_backend),
        scales=from_numpy(np.array(quantized.scales).astype(np.float16), output_backend),
        zeros=from_numpy(np.array(quantized.zeros), output_backend),
        q_scale=from_numpy(np.array(s, dtype=np.float32), output_backend),
        salient_indices=from_numpy(salient_idx, output_backend),
        salient_weights=from_numpy(salient_rows, output_backend),
        in_features=in_features,
        out_features=out_features,
        bits=bits,
        group_size=group_size,
        activation_method=activation_method,
        alpha=found.alpha,
        clip_ratios=from_numpy(ratios, output_backend),
        output_error=final_error,
        rtn_output_error=rtn_error,
        search_losses=found.losses,
    )


# ---------------------------------------------------------------------------- dequantize


def _bits_from_meta(meta: dict[str, Any]) -> int:
    if "bits" in meta:
        return int(meta["bits"])
    quant_type = meta.get("quant_type", "awq_int4")
    for bits, name in QUANT_TYPES.items():
        if name == quant_type:
            return bits
    raise ValueError(f"meta['quant_type'] must be one of {sorted(QUANT_TYPES.values())}, got {quant_type!r}")


def awq_dequantize(
    packed: Any,
    scales: Any,
    zeros: Any,
    q_scale: Any,
    meta: dict[str, Any],
    weights_dtype: np.dtype | None = None,
    output_backend: Literal["numpy", "mlx", "torch"] = "numpy",
) -> Any:
    """The ``[in, out]`` approximation of the original weights.

    Unpacks the codes, applies scales and zero points, divides out the AWQ channel scale
    ``q_scale`` and puts back the float16 salient rows carried in ``meta`` (as produced by
    :attr:`AWQResult.meta`; a seed-style meta without them restores none).
    """
    check_output_backend(output_backend)
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in ("in_features", "out_features", "group_size") if k not in meta]
    if missing:
        raise ValueError(f"meta is missing {missing}")
    in_features, out_features = int(meta["in_features"]), int(meta["out_features"])
    spec = QuantSpec(bits=_bits_from_meta(meta), group_size=int(meta["group_size"]))
    spec.check_in_features(in_features)
    packed_np = to_numpy(packed)
    expected = (out_features, in_features * spec.bits // 32)
    if packed_np.shape != expected:
        raise ValueError(f"packed has shape {packed_np.shape}, expected {expected} for meta {in_features}x{out_features}")
    scales_np = _as_float_array(scales, "scales")
    zeros_np = _as_float_array(zeros, "zeros")
    group_shape = (out_features, in_features // spec.group_size)
    for name, arr in (("scales", scales_np), ("zeros", zeros_np)):
        if arr.shape != group_shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {group_shape}")
    s = _as_float_array(q_scale, "q_scale").reshape(-1)
    if s.shape[0] != in_features:
        raise ValueError(f"q_scale has {s.shape[0]} entries, expected in_features={in_features}")
    if np.any(s == 0):
        raise ValueError("q_scale contains zeros; it must be the positive AWQ channel scale")

    codes = unpack_codes(packed_np.astype(np.uint32), spec.bits)
    w_oi = dequantize_codes(codes, scales_np, zeros_np, spec) / s[None, :]
    weights = np.ascontiguousarray(w_oi.T)  # [in, out]
    idx = meta.get("salient_indices")
    if idx is not None and len(to_numpy(idx)):
        idx_np = to_numpy(idx).astype(np.int64)
        rows = _as_float_array(meta.get("salient_weights"), "meta['salient_weights']")
        if rows.shape != (len(idx_np), out_features):
            raise ValueError(f"meta['salient_weights'] has shape {rows.shape}, expected {(len(idx_np), out_features)}")
        weights[idx_np] = rows
    if weights_dtype is not None:
        weights = weights.astype(weights_dtype)
    return from_numpy(weights, output_backend)
