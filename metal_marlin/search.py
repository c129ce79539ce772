"""AWQ's two searches: per-input-channel scales, then per-group clipping.

Both are written once over an array namespace ``xp`` (``numpy`` or ``mlx.core``) and used by
the single-matrix API (:func:`metal_marlin.awq.awq_quantize`) and the model pipeline.

Weights are ``[out, in]``; calibration inputs ``x`` are ``[tokens, in]``. A scale vector ``s``
(``[in]``) multiplies weight columns before quantization; the model divides its inputs by
``s`` (folded into the previous op), so the function is unchanged and only the rounding
moves: channels that see large activations get finer effective steps.

Salient channels (see DESIGN.md) are handled by a ``keep`` mask: their weight columns are
zeroed before quantization (an fp16 side matrix carries them exactly), so they neither take
part in a group's range nor in the error being minimised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

from metal_marlin.quant import QuantSpec, fake_quantize, group_range

LossFn = Callable[[Sequence[Any]], Any]
"""Maps per-layer weight errors ``W_hat - W`` (original input space) to a scalar loss: a
float, or a 0-d ``xp`` array that the search reads back with the other candidates' at once."""

_MIN_STAT = 1e-4


def _to_float(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


def schedule(xp: ModuleType, *arrays: Any) -> None:
    """Start computing lazy MLX arrays without waiting for them (numpy is eager: nothing to do).

    On a GPU every read-back of a scalar stalls the host until the device queue drains; the
    searches below score all their candidates first and read the scores back in one go.
    """
    if xp is not np:
        xp.async_eval(*arrays)


def read_floats(values: Sequence[Any]) -> list[float]:
    """Python floats of scalars (numpy or 0-d MLX arrays), with one device read-back."""
    if values and not isinstance(values[0], (float, int, np.generic, np.ndarray)):
        import mlx.core as mx

        return [float(v) for v in mx.stack(list(values)).tolist()]
    return [_to_float(v) for v in values]


class OutputError:
    """Mean squared error of a linear layer's output caused by a weight error ``delta``.

    ``||x @ delta.T||^2 / (tokens * out)``. When there are more calibration tokens than
    input channels, the Gram matrix ``x.T @ x`` is computed once and each candidate costs
    ``out * in^2`` instead of ``out * in * tokens``: the search never touches the raw
    activations again. Per-group diagonal blocks of the Gram matrix serve the clip search.
    """

    def __init__(self, x: Any, xp: ModuleType = np) -> None:
        self.xp = xp
        self.n_tokens, self.in_features = x.shape
        x = x.astype(xp.float32)
        self._use_gram = self.n_tokens > self.in_features
        self._x = x
        self._gram = (x.T @ x) if self._use_gram else None
        self._group_grams: dict[int, Any] = {}

    def total(self, delta: Any) -> float:
        """Output MSE for ``delta [out, in]``."""
        return _to_float(self.total_lazy(delta))

    def total_lazy(self, delta: Any) -> Any:
        """:meth:`total` as a 0-d ``xp`` array, not read back (see :func:`read_floats`)."""
        xp = self.xp
        if self._use_gram:
            value = xp.sum((delta @ self._gram) * delta)
        else:
            value = xp.sum(xp.square(self._x @ delta.T))
        return value / (self.n_tokens * delta.shape[0])

    def group_grams(self, group_size: int) -> Any:
        """``[in/group, group, group]`` diagonal blocks of ``x.T @ x`` (cached)."""
        if group_size not in self._group_grams:
            xp = self.xp
            n_groups = self.in_features // group_size
            if self._use_gram:  # slice the blocks out of the Gram matrix we already have
                grams = xp.stack(
                    [self._gram[g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size] for g in range(n_groups)]
                )
            else:
                xg = self._x.reshape(self.n_tokens, n_groups, group_size).transpose(1, 0, 2)
                grams = xg.transpose(0, 2, 1) @ xg
            self._group_grams[group_size] = grams
        return self._group_grams[group_size]

    def scaled_group_grams(self, group_size: int, inv_scale: Any) -> Any:
        """Gram blocks of the inputs the scaled weights meet, ``x / s`` (``inv_scale = 1/s``)."""
        inv = inv_scale.reshape(self.in_features // group_size, group_size)
        return self.group_grams(group_size) * inv[:, :, None] * inv[:, None, :]

    def per_group(self, delta: Any, grams: Any) -> Any:
        """Output squared error contributed by each group alone: ``[out, in/group]``.

        ``delta`` is in the *scaled* space (weights multiplied by ``s``) and ``grams`` come
        from :meth:`scaled_group_grams`. Cross-group terms are ignored, as in AWQ's clip
        search; the caller checks the total error before accepting clipping.
        """
        xp = self.xp
        n_groups, group_size, _ = grams.shape
        out_features = delta.shape[0]
        d = delta.reshape(out_features, n_groups, group_size).transpose(1, 0, 2)  # [groups, out, gs]
        err = xp.sum((d @ grams) * d, axis=-1)  # [groups, out]
        return err.T


def channel_scales(
    stat: Any,
    alpha: float,
    keep: Any,
    xp: ModuleType = np,
    weight_stat: Any | None = None,
) -> Any:
    """``s = stat**alpha`` (optionally ``/ weight_stat**(1-alpha)``), normalised.

    Normalising by ``sqrt(max * min)`` over kept channels centres ``s`` around 1 so the
    quantizer's dynamic range is not pushed around by a global factor. Dropped (salient)
    channels get ``s = 1``.
    """
    s = xp.power(xp.maximum(stat, _MIN_STAT), alpha)
    if weight_stat is not None:
        s = s / xp.power(xp.maximum(weight_stat, _MIN_STAT), 1.0 - alpha)
    s = xp.maximum(s, _MIN_STAT)
    big = xp.max(xp.where(keep, s, 0.0))
    small = xp.min(xp.where(keep, s, xp.inf))
    s = s / xp.sqrt(big * small)
    return xp.where(keep, s, 1.0).astype(xp.float32)


def weight_channel_stat(weights: Sequence[Any], group_size: int, xp: ModuleType = np) -> Any:
    """AutoAWQ's "duo" weight statistic: mean over outputs of ``|w|`` normalised per group."""
    stats = []
    for w in weights:
        out_features, in_features = w.shape
        g = xp.abs(w).reshape(out_features, in_features // group_size, group_size)
        g = g / xp.maximum(g.max(axis=-1, keepdims=True), 1e-12)
        stats.append(g.reshape(out_features, in_features))
    return xp.concatenate(stats, axis=0).mean(axis=0)


@dataclass
class ScaleSearchResult:
    """Outcome of the scale search for layers that share one input."""

    scales: Any  # [in] float32; s = 1 everywhere means "plain round-to-nearest won"
    alpha: float
    loss: float
    loss_rtn: float  # alpha = 0: s = 1, i.e. plain round-to-nearest of the kept columns
    losses: list[float] = field(default_factory=list)


def alpha_grid(n_grid: int) -> list[float]:
    """``n_grid`` ratios ``0, 1/n, ..., (n-1)/n``: alpha = 0 is plain round-to-nearest."""
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive integer, got {n_grid!r}")
    return [i / n_grid for i in range(n_grid)]


def fake_quantize_scaled(w: Any, s: Any, keep: Any, spec: QuantSpec, xp: ModuleType = np, clip_ratio: Any = None) -> Any:
    """What the model will compute with, in the original input space: ``Q(w*s*keep)/s``."""
    return fake_quantize(w * (s * keep)[None, :], spec, xp, clip_ratio) / s[None, :]


def search_scales(
    weights: Sequence[Any],
    stat: Any,
    keep: Any,
    spec: QuantSpec,
    loss: LossFn,
    n_grid: int = 20,
    duo_scaling: bool = False,
    xp: ModuleType = np,
    tie: Callable[[Any], Any] | None = None,
) -> ScaleSearchResult:
    """Grid search of ``alpha`` for layers sharing one input; keeps the lowest ``loss``.

    ``tie`` maps each candidate ``s`` to the nearest one the previous op can absorb exactly
    (o_proj under grouped-query attention); candidates are scored after it.

    ``loss`` receives ``[W_hat - W*keep for each layer]``: the weight errors in the original
    input space, so any output-error measure (a layer's output, a concatenation of q/k/v
    outputs, a whole block's output) can score the candidates.
    """
    weight_stat = weight_channel_stat(weights, spec.group_size, xp) if duo_scaling else None
    targets = [w * keep[None, :] for w in weights]
    alphas = alpha_grid(n_grid)
    candidates: list[Any] = []
    pending: list[Any] = []
    for alpha in alphas:
        s = channel_scales(stat, alpha, keep, xp, weight_stat if alpha > 0 else None)
        if tie is not None:
            s = tie(s)
        deltas = [fake_quantize_scaled(w, s, keep, spec, xp) - t for w, t in zip(weights, targets)]
        value = loss(deltas)
        schedule(xp, value, s)
        candidates.append(s)
        pending.append(value)
    losses = read_floats(pending)
    best = int(np.argmin(losses))  # ties: the first, i.e. the smaller alpha
    return ScaleSearchResult(scales=candidates[best], alpha=alphas[best], loss=losses[best], loss_rtn=losses[0], losses=losses)


def clip_ratios_grid(n_grid: int = 20, max_shrink: float = 0.5) -> list[float]:
    """Range shrink factors from 1 (no clipping) down to ``1 - max_shrink``."""
    return [1.0 - max_shrink * i / n_grid for i in range(n_grid)]


def search_clip(
    w: Any,
    s: Any,
    keep: Any,
    spec: QuantSpec,
    error: OutputError,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    xp: ModuleType = np,
) -> Any:
    """Per (output row, group) range shrink that minimises that group's output error.

    Returns ``[out, in/group]`` float32 ratios for :func:`metal_marlin.quant.affine_params`.
    """
    ws = (w * (s * keep)[None, :]).astype(xp.float32)
    ws_range = group_range(ws, spec, xp)  # each ratio only scales it
    grams = error.scaled_group_grams(spec.group_size, 1.0 / s)
    best_err = None
    best_ratio = None
    for ratio in clip_ratios_grid(n_grid, max_shrink):
        delta = fake_quantize(ws, spec, xp, ratio, w_range=ws_range) - ws
        err = error.per_group(delta, grams)
        if best_err is None:
            best_err, best_ratio = err, xp.full(err.shape, ratio, dtype=xp.float32)
        else:
            better = err < best_err
            best_err = xp.where(better, err, best_err)
            best_ratio = xp.where(better, ratio, best_ratio)
        schedule(xp, best_err, best_ratio)
    return best_ratio
