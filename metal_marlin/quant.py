"""The one group-wise affine quantizer and the one packing routine.

Everything in metal-marlin that turns floats into integer codes goes through this module:
the AWQ search (fake quantization of candidates), round-to-nearest baselines, the model
pipeline and the exporters.

Conventions (DESIGN.md):
- Weights are in the layout of a linear layer, ``[out, in]``; groups run along ``in`` (the
  last axis), so a group shares one scale and one zero point per output row.
- Asymmetric codes with an *integer* zero point: ``w ~= scale * (q - zero)``, ``q`` and
  ``zero`` in ``[0, 2**bits - 1]``. The group range is widened to include 0, so an all-zero
  row (a salient channel moved to the fp16 side matrix) is represented exactly.
- Scales are rounded to float16 *before* the codes are computed, because float16 is what we
  store: the codes are then optimal for the stored scale, and dequantization of the stored
  tensors is exactly what the search scored.
- MLX's storage layout: codes packed little-endian as a bitstream into ``uint32`` words along
  ``in``: ``[out, in * bits / 32]``; ``scales`` and ``biases`` ``[out, in / group]`` with
  ``w = scale * q + bias``, i.e. ``bias = -scale * zero``. ``mx.quantize`` picks its own
  scale and bias (a float minimum, not an integer zero point, and no fp16 pre-rounding), so
  we never use it to make codes; ``mx.dequantize``/``mx.quantized_matmul`` read our codes.

All functions take an array namespace ``xp`` (``numpy`` or ``mlx.core``) so that the numpy
reference and the MLX implementation are literally the same code; tests check that both
produce bit-identical packed words.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import numpy as np

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal); keeps scales storable


@dataclass(frozen=True)
class QuantSpec:
    """Bits and group size of a group-wise affine quantizer."""

    bits: int = 4
    group_size: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size!r}"
            )

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def check_in_features(self, in_features: int) -> None:
        """Raise if ``in_features`` cannot be split into whole groups."""
        if in_features % self.group_size != 0:
            raise ValueError(
                f"group_size={self.group_size} does not divide in_features={in_features}; "
                f"choose a group_size that divides it (e.g. "
                f"{[g for g in SUPPORTED_GROUP_SIZES if in_features % g == 0] or 'none fits'})"
            )


def _grouped(w: Any, spec: QuantSpec) -> Any:
    out_features, in_features = w.shape
    spec.check_in_features(in_features)
    return w.reshape(out_features, in_features // spec.group_size, spec.group_size)


Rounder = Callable[[Any], Any]
"""Rounding to integers: ``xp.round``, or a straight-through version while learning rounding."""


@dataclass(frozen=True)
class Rounding:
    """Learned rounding of one ``[out, in]`` weight (see :mod:`metal_marlin.rounding`).

    ``offset`` (``[out, in]``, in ``[-0.5, 0.5]``) is added to ``w / scale`` before rounding,
    so each weight may round the other way; ``min_ratio``/``max_ratio`` (``[out, in/group]``,
    in ``[0, 1]``) shrink each group's minimum and maximum separately (the clip search's one
    ratio shrinks both alike). All zero/one gives plain round-to-nearest.
    """

    offset: Any
    min_ratio: Any
    max_ratio: Any


def group_range(w: Any, spec: QuantSpec, xp: ModuleType = np) -> tuple[Any, Any]:
    """Each group's minimum and maximum of ``w [out, in]``, widened to include 0: ``[out, in/group]``.

    Separate from :func:`affine_params` so a search over clip ratios reduces ``w`` once,
    not once per ratio (the ratio only scales these two).
    """
    g = _grouped(_float32(w, xp), spec)
    return xp.minimum(g.min(axis=-1), 0.0), xp.maximum(g.max(axis=-1), 0.0)


def affine_params(
    w: Any, spec: QuantSpec, xp: ModuleType = np, clip_ratio: Any = None, rounding: Rounding | None = None,
    rounder: Rounder | None = None, w_range: tuple[Any, Any] | None = None,
) -> tuple[Any, Any]:
    """Scales and integer zero points for ``w [out, in]``: each ``[out, in/group]``, float32.

    ``clip_ratio`` (scalar or ``[out, in/group]``) shrinks each group's range towards zero
    before the parameters are derived: the clip search's knob. ``rounding`` instead shrinks
    the minimum and maximum by its own two ratios. ``rounder`` replaces ``xp.round`` (a
    straight-through estimator keeps the result differentiable). ``w_range`` is
    :func:`group_range` of ``w`` when the caller already has it.
    """
    rounder = rounder or xp.round
    w_min, w_max = w_range if w_range is not None else group_range(w, spec, xp)
    if rounding is not None:
        w_max = w_max * rounding.max_ratio
        w_min = w_min * rounding.min_ratio
    elif clip_ratio is not None:
        w_max = w_max * clip_ratio
        w_min = w_min * clip_ratio
    span = w_max - w_min
    scale = xp.where(span > 0, span / spec.max_code, 1.0)
    # Round to the stored precision first, so codes are chosen for the scale we keep.
    scale = xp.maximum(scale.astype(xp.float16).astype(xp.float32), _MIN_SCALE)
    zero = xp.clip(rounder(-w_min / scale), 0, spec.max_code)
    return scale, zero


def _float32(w: Any, xp: ModuleType) -> Any:
    """``w`` as float32, without a copy when it already is (the searches call this per candidate)."""
    return w if w.dtype == xp.float32 else w.astype(xp.float32)


def _float_codes(
    w: Any, scale: Any, zero: Any, spec: QuantSpec, xp: ModuleType, rounding: Rounding | None, rounder: Rounder | None
) -> Any:
    """Codes of ``w`` as floats ``[out, in/group, group]``: ``clip(round(w/scale + offset) + zero)``."""
    rounder = rounder or xp.round
    t = _grouped(_float32(w, xp), spec) / scale[..., None]
    if rounding is not None:
        t = t + _grouped(rounding.offset, spec)
    return xp.clip(rounder(t) + zero[..., None], 0, spec.max_code)


def quantize_codes(
    w: Any, scale: Any, zero: Any, spec: QuantSpec, xp: ModuleType = np, rounding: Rounding | None = None
) -> Any:
    """Integer codes ``uint8 [out, in]`` of ``w`` for given scales and zero points."""
    return _float_codes(w, scale, zero, spec, xp, rounding, None).astype(xp.uint8).reshape(w.shape)


def dequantize_codes(q: Any, scale: Any, zero: Any, spec: QuantSpec, xp: ModuleType = np) -> Any:
    """``scale * (q - zero)`` as float32 ``[out, in]``."""
    g = _grouped(q.astype(xp.float32), spec)
    return ((g - zero[..., None]) * scale[..., None]).reshape(q.shape)


def fake_quantize(
    w: Any, spec: QuantSpec, xp: ModuleType = np, clip_ratio: Any = None, rounding: Rounding | None = None,
    rounder: Rounder | None = None, w_range: tuple[Any, Any] | None = None,
) -> Any:
    """Quantize then dequantize ``w [out, in]`` (what the model will compute with).

    With a straight-through ``rounder`` this is differentiable in ``rounding``'s arrays:
    the function learned rounding descends on, the same one that makes the stored codes.
    ``w_range``: :func:`group_range` of ``w``, when the caller reuses it across calls.
    """
    scale, zero = affine_params(w, spec, xp, clip_ratio, rounding, rounder, w_range)
    q = _float_codes(w, scale, zero, spec, xp, rounding, rounder)
    return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape)


def _check_packable(in_features: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if in_features % 32 != 0:
        raise ValueError(f"in_features={in_features} must be a multiple of 32 to pack codes")


def pack_codes(q: Any, bits: int, xp: ModuleType = np) -> Any:
    """Pack codes ``[out, in]`` into MLX's ``uint32 [out, in * bits / 32]`` bitstream.

    Code ``j`` of a row occupies bits ``[j*bits, (j+1)*bits)`` of the row's little-endian
    bitstream; 3-bit codes straddle word boundaries. Every 32 codes fill exactly ``bits``
    words, so we work on chunks of 32 codes.
    """
    out_features, in_features = q.shape
    _check_packable(in_features, bits)
    chunks = q.astype(xp.uint32).reshape(out_features, in_features // 32, 32)
    words = [xp.zeros((out_features, in_features // 32), dtype=xp.uint32) for _ in range(bits)]
    for j in range(32):
        offset = j * bits
        word, shift = divmod(offset, 32)
        code = chunks[:, :, j]
        words[word] = words[word] | (code << shift)
        if shift + bits > 32:  # the code's high bits spill into the next word
            words[word + 1] = words[word + 1] | (code >> (32 - shift))
    return xp.stack(words, axis=-1).reshape(out_features, in_features * bits // 32)


def unpack_codes(packed: Any, bits: int, xp: ModuleType = np) -> Any:
    """Inverse of :func:`pack_codes`: ``uint8 [out, in]``."""
    out_features, n_words = packed.shape
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if n_words % bits != 0:
        raise ValueError(f"packed has {n_words} words per row, not a multiple of bits={bits}")
    words = packed.astype(xp.uint32).reshape(out_features, n_words // bits, bits)
    mask = (1 << bits) - 1
    codes = []
    for j in range(32):
        offset = j * bits
        word, shift = divmod(offset, 32)
        code = words[:, :, word] >> shift
        if shift + bits > 32:
            code = code | (words[:, :, word + 1] << (32 - shift))
        codes.append(code & mask)
    return xp.stack(codes, axis=-1).reshape(out_features, n_words * 32 // bits).astype(xp.uint8)


def to_mlx_scales_biases(scale: Any, zero: Any, dtype: Any = None, xp: ModuleType = np) -> tuple[Any, Any]:
    """MLX's ``(scales, biases)`` from scales and integer zero points: ``bias = -scale*zero``."""
    dtype = dtype if dtype is not None else xp.float16
    return scale.astype(dtype), (-scale * zero).astype(dtype)


@dataclass
class QuantizedTensor:
    """A quantized ``[out, in]`` weight in MLX layout plus its integer zero points."""

    packed: Any  # uint32 [out, in*bits/32]
    scales: Any  # float32 (float16-exact) [out, in/group]
    zeros: Any  # uint8 [out, in/group]
    spec: QuantSpec

    def dequantize(self, xp: ModuleType = np) -> Any:
        q = unpack_codes(self.packed, self.spec.bits, xp)
        return dequantize_codes(q, self.scales.astype(xp.float32), self.zeros.astype(xp.float32), self.spec, xp)


def quantize_tensor(
    w: Any, spec: QuantSpec, xp: ModuleType = np, clip_ratio: Any = None, rounding: Rounding | None = None
) -> QuantizedTensor:
    """Quantize ``w [out, in]`` (optionally with per-group clip ratios, or learned rounding) and pack it."""
    scale, zero = affine_params(w, spec, xp, clip_ratio, rounding)
    q = quantize_codes(w, scale, zero, spec, xp, rounding)
    return QuantizedTensor(pack_codes(q, spec.bits, xp), scale, zero.astype(xp.uint8), spec)
