"""Quantized linear layer for our native checkpoint format, and the swap helper.

The native format is MLX's affine layout, so that ``mlx_lm.load`` opens our output and we
open mlx-lm's: per layer ``weight`` (uint32, ``[out, in*bits/32]``, packed along the input
dimension), ``scales`` and ``biases`` (``[out, in/group]``, ``w = scale*q + bias``).

Two additions, both optional:

* ``salient_indices`` (int32 ``[k]``) and ``salient_weight`` (``[out, k]``): the input
  channels AWQ ranked most important, kept in floating point beside the int matrix. The
  layer adds ``x[..., idx] @ salient_weight.T``. A checkpoint without them is plain MLX.
* group size 256: MLX kernels stop at 128, but a group of 256 with scale ``s`` and bias
  ``b`` is exactly two groups of 128 with the same ``s`` and ``b``, so the stored columns
  are repeated twice at call time and the kernel runs at 128. Storage stays at 256.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from metal_marlin import device
from metal_marlin.kernels import fused_int4_available, int4_gemv_supported
from metal_marlin.kernels.gemv import MLX_MIN_ROWS, int4_gemv_stacked

NATIVE_GROUP_SIZES = (32, 64, 128)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


def check_quant_params(group_size: int, bits: int, in_features: int, where: str = "") -> None:
    """Raise ValueError unless ``(group_size, bits)`` can serve ``in_features`` inputs."""
    prefix = f"{where}: " if where else ""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{prefix}group size {group_size} not in {SUPPORTED_GROUP_SIZES}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{prefix}{bits} bits not in {SUPPORTED_BITS}")
    if in_features % group_size != 0:
        raise ValueError(
            f"{prefix}input dimension {in_features} is not a multiple of group size "
            f"{group_size}; use a group size that divides it"
        )
    if (in_features * bits) % 32 != 0:
        raise ValueError(f"{prefix}{in_features} inputs x {bits} bits do not fill uint32 words")


DENSE_ROWS_ON_CPU = 64
"""Rows (tokens) from which a CPU forward dequantizes and uses a dense matmul instead."""

DENSE_COPY_MIN_ROWS = 2
"""Rows from which a cached float32 copy is used. A single row (one sequence decoding)
keeps the int4 kernel: it reads 8x fewer bytes, and a float32 sgemv measured up to 2x
slower than it whenever other processes share the cores."""

DENSE_WEIGHT_ATTR = "_dense_weight"
"""Where :func:`cache_dense_cpu_weights` keeps a layer's float32 copy (not a parameter:
MLX leaves ``_``-prefixed members out of ``parameters()``, so it is never saved)."""


def kernel_group_params(scales: mx.array, biases: mx.array, group_size: int):
    """Scales/biases/group size the MLX kernels accept (group 256 -> repeated 128)."""
    if group_size in NATIVE_GROUP_SIZES:
        return scales, biases, group_size
    factor = group_size // 128
    return mx.repeat(scales, factor, axis=1), mx.repeat(biases, factor, axis=1), 128


class QuantizedLinear(nn.Module):
    """``y = x @ dequant(W).T [+ x[..., idx] @ W_s.T] [+ bias]`` with MLX's packed layout.

    Parameters are created with the checkpoint's shapes so that ``load_weights`` with
    ``strict=True`` verifies them; the values come from the checkpoint.
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = False,
        group_size: int = 64,
        bits: int = 4,
        salient_k: int = 0,
        dtype: mx.Dtype = mx.float32,
    ) -> None:
        super().__init__()
        check_quant_params(group_size, bits, input_dims)
        self.input_dims = input_dims
        self.output_dims = output_dims
        self.group_size = group_size
        self.bits = bits
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size), dtype=dtype)
        self.biases = mx.zeros((output_dims, input_dims // group_size), dtype=dtype)
        if bias:
            self.bias = mx.zeros((output_dims,), dtype=dtype)
        if salient_k > 0:
            self.salient_indices = mx.zeros((salient_k,), dtype=mx.int32)
            self.salient_weight = mx.zeros((output_dims, salient_k), dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, bits: int = 4) -> QuantizedLinear:
        """Round-to-nearest quantization of a float ``nn.Linear`` (native group sizes only).

        A baseline and a test helper; AWQ results are built by ``metal_marlin.quant``.
        """
        if group_size not in NATIVE_GROUP_SIZES:
            raise ValueError(f"from_linear supports group sizes {NATIVE_GROUP_SIZES}")
        out_dims, in_dims = linear.weight.shape
        has_bias = "bias" in linear
        layer = cls(in_dims, out_dims, has_bias, group_size, bits, dtype=linear.weight.dtype)
        layer.weight, layer.scales, layer.biases = mx.quantize(
            linear.weight, group_size=group_size, bits=bits
        )
        if has_bias:
            layer.bias = linear.bias
        return layer

    def _extra_repr(self) -> str:
        k = self.salient_weight.shape[1] if "salient_weight" in self else 0
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, "
            f"group_size={self.group_size}, bits={self.bits}, salient={k}"
        )

    def dequantized_weight(self) -> mx.array:
        """``[out, in]`` float32 weight of the integer part (salient columns are zero)."""
        scales, biases, group = kernel_group_params(self.scales, self.biases, self.group_size)
        return mx.dequantize(self.weight, scales, biases, group_size=group, bits=self.bits).astype(mx.float32)

    def _gpu_matmul(self, x: mx.array) -> mx.array:
        """The GPU path: our fused kernel for decode rows, MLX's kernels for the rest.

        The input is flattened to 2-D first: MLX's CUDA kernel re-reads the whole weight
        for every row of a ``[B, 1, K]`` input (441 us vs 65 us for 16 rows of a
        14336x4096 matrix on an H200), and a decode batch has exactly that shape.
        """
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.input_dims)
        rows = x2.shape[0]
        if self.fused_serves(rows, x.dtype):
            y = int4_gemv_stacked(x2, [(self.weight, self.scales, self.biases)], self.group_size)
        else:
            # MLX's CUDA kernel for under 8 rows re-reads the weights per row; 8 rows cost
            # no more than one, so pad (measured: 43 us at 8 rows vs 141 us at 4 for 14336x4096).
            pad = MLX_MIN_ROWS - rows if 1 < rows < MLX_MIN_ROWS else 0
            if pad:
                x2 = mx.concatenate([x2, mx.zeros((pad, self.input_dims), dtype=x2.dtype)])
            scales, biases, group = kernel_group_params(self.scales, self.biases, self.group_size)
            y = mx.quantized_matmul(
                x2, self.weight, scales, biases, transpose=True, group_size=group, bits=self.bits
            )
            if pad:
                y = y[:rows]
        return y.reshape(*lead, self.output_dims)

    def fused_serves(self, rows: int, dtype: mx.Dtype) -> bool:
        """Whether our fused kernel computes this layer's product for ``rows`` rows of x."""
        return int4_gemv_supported(rows, self.input_dims, self.bits, self.group_size, dtype) and fused_int4_available(dtype)

    def _cpu_matmul(self, x: mx.array) -> mx.array:
        """The CPU path: float32 copies or dequantize + sgemm for many rows, int4 for few."""
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        dense = self.get(DENSE_WEIGHT_ATTR)
        if dense is not None and rows >= DENSE_COPY_MIN_ROWS:
            # See cache_dense_cpu_weights: sgemm on a cached float copy.
            return (x.astype(mx.float32) @ dense.T).astype(x.dtype)
        if rows >= DENSE_ROWS_ON_CPU:
            # MLX's CPU quantized_matmul is a scalar kernel whose cost grows linearly with
            # rows; for prefill and evaluation, dequantizing once and calling sgemm is
            # ~7x faster here. Decode batches (few rows) keep the int4 kernel.
            return x @ self.dequantized_weight().T.astype(x.dtype)
        scales, biases, group = kernel_group_params(self.scales, self.biases, self.group_size)
        return mx.quantized_matmul(x, self.weight, scales, biases, transpose=True, group_size=group, bits=self.bits)

    def __call__(self, x: mx.array) -> mx.array:
        y = self._gpu_matmul(x) if device.on_gpu() else self._cpu_matmul(x)
        if "salient_weight" in self:
            y = y + mx.take(x, self.salient_indices, axis=-1) @ self.salient_weight.T
        if "bias" in self:
            y = y + self.bias
        return y


def project_stacked(x: mx.array, layers: Sequence[nn.Module]) -> list[mx.array]:
    """``[layer(x) for layer in layers]``, in one fused kernel launch where it can be.

    Projections that read the same input (q/k/v, gate/up) are one pass over ``x`` and one
    graph node on the GPU: fewer launches and less Python per decode step, which at batch 1
    on a GPU costs as much as the weights' reading. Anything the kernel does not cover
    (CPU, many rows, salient channels, biases, other bit widths) takes the plain path.
    """
    first = layers[0]
    if not (device.on_gpu() and all(isinstance(l, QuantizedLinear) for l in layers)):
        return [layer(x) for layer in layers]
    k = first.input_dims
    rows = x.size // k
    uniform = all(
        l.group_size == first.group_size and l.input_dims == k and "salient_weight" not in l and "bias" not in l
        for l in layers
    )
    if not (uniform and all(l.fused_serves(rows, x.dtype) for l in layers)):
        return [layer(x) for layer in layers]
    y = int4_gemv_stacked(x.reshape(rows, k), [(l.weight, l.scales, l.biases) for l in layers], first.group_size)
    lead = x.shape[:-1]
    outs, start = [], 0
    for l in layers:
        outs.append(y[:, start : start + l.output_dims].reshape(*lead, l.output_dims))
        start += l.output_dims
    return outs


def _infer_params(
    path: str, in_features: int, weights: Mapping[str, Any], declared: dict[str, Any]
) -> tuple[int, int]:
    """``(group_size, bits)`` of one layer, from the packed shapes, checked against config.

    The shapes determine both numbers exactly once the input width is known, which is what
    makes mixed-precision checkpoints (per-layer overrides) load correctly.
    """
    packed = weights[f"{path}.weight"].shape
    n_groups = weights[f"{path}.scales"].shape[-1]
    if (packed[-1] * 32) % in_features or in_features % n_groups:
        raise ValueError(
            f"{path}: packed weight {tuple(packed)} / scales with {n_groups} groups do not fit "
            f"an input width of {in_features}"
        )
    bits = packed[-1] * 32 // in_features
    group_size = in_features // n_groups
    for name, value in (("bits", bits), ("group_size", group_size)):
        if name in declared and int(declared[name]) != value:
            raise ValueError(
                f"{path}: config declares {name}={declared[name]} but the tensors hold {value}"
            )
    mode = declared.get("mode", "affine")
    if mode != "affine":
        raise ValueError(f"{path}: quantization mode {mode!r} is not supported (affine only)")
    check_quant_params(group_size, bits, in_features, where=path)
    return group_size, bits


def quantize_model_layers(
    model: nn.Module, quant_config: Mapping[str, Any], weights: Mapping[str, Any]
) -> list[str]:
    """Swap float layers for quantized ones where the checkpoint has ``<path>.scales``.

    Follows mlx-lm's rule: a layer is quantized iff its scales are present (a per-layer
    entry ``quant_config[path] = False`` also forces it to stay float, and a per-layer dict
    supplies its own ``group_size``/``bits``). ``nn.Linear`` becomes ``QuantizedLinear``
    (with a salient side path when ``<path>.salient_indices`` exists); ``nn.Embedding``
    becomes MLX's ``nn.QuantizedEmbedding`` (native group sizes only). Parameter *values*
    are not loaded here; call ``model.load_weights`` afterwards. Returns the swapped paths.
    """
    swapped: list[str] = []

    def swap(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return module
        override = quant_config.get(path, {})
        if override is False:
            raise ValueError(f"{path}: config marks it unquantized but the checkpoint has scales")
        declared = {**{k: v for k, v in quant_config.items() if not isinstance(v, (dict, bool))}}
        if isinstance(override, dict):
            declared.update(override)
        if isinstance(module, nn.Linear):
            out_dims, in_dims = module.weight.shape
            group_size, bits = _infer_params(path, in_dims, weights, declared)
            salient = weights.get(f"{path}.salient_indices")
            layer = QuantizedLinear(
                in_dims,
                out_dims,
                bias="bias" in module,
                group_size=group_size,
                bits=bits,
                salient_k=0 if salient is None else int(salient.shape[0]),
                dtype=module.weight.dtype,
            )
        elif isinstance(module, nn.Embedding):
            vocab, dims = module.weight.shape
            group_size, bits = _infer_params(path, dims, weights, declared)
            if group_size not in NATIVE_GROUP_SIZES:
                raise ValueError(f"{path}: quantized embeddings need a group size in "
                                 f"{NATIVE_GROUP_SIZES}, got {group_size}")
            layer = nn.QuantizedEmbedding(vocab, dims, group_size=group_size, bits=bits)
        else:
            raise ValueError(f"{path}: cannot quantize a {type(module).__name__}")
        swapped.append(path)
        return layer

    new_modules = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(new_modules)
    return swapped


def cache_dense_cpu_weights(model: nn.Module) -> int:
    """Keep a float32 dequantized copy of every quantized matrix, for MLX's CPU backend.

    Why: MLX's CPU ``quantized_matmul`` is a scalar kernel (~1 GMAC/s here) whose cost grows
    linearly with the number of rows, so a batch of 16 decode rows costs 16 single steps.
    OpenBLAS sgemm on a cached float32 copy is memory-bound instead: a decode step costs
    about the same for 1 or 16 rows. The price is memory, 4 bytes per weight on top of the
    packed int4 (the returned byte count, which callers add to their memory accounting).
    On Metal the int4 kernels are fast and this is not used.

    The copy serves calls with at least ``DENSE_COPY_MIN_ROWS`` rows (batched decode,
    prefill); a single row keeps the int4 kernel. The copy is exactly ``dequantize(W)``, so outputs equal the int4 kernel's up to float
    summation order. Covers ``QuantizedLinear`` layers and a quantized tied embedding used
    as the output head (``model.lm_logits`` picks that up). Returns the bytes added.
    """
    added = 0
    for _, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and DENSE_WEIGHT_ATTR not in module:
            dense = module.dequantized_weight()
        elif isinstance(module, nn.QuantizedEmbedding) and DENSE_WEIGHT_ATTR not in module:
            dense = mx.dequantize(
                module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits
            ).astype(mx.float32)
        else:
            continue
        mx.eval(dense)
        setattr(module, DENSE_WEIGHT_ATTR, dense)
        added += dense.nbytes
    return added


def dense_cpu_weight_bytes(model: nn.Module) -> int:
    """Bytes held by :func:`cache_dense_cpu_weights` copies in ``model``."""
    return sum(
        module[DENSE_WEIGHT_ATTR].nbytes for _, module in model.named_modules() if DENSE_WEIGHT_ATTR in module
    )
