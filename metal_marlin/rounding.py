"""Learned rounding on top of AWQ: ``method="awq+round"``.

AWQ picks channel scales and clip ranges; every weight is still rounded to its nearest code.
Rounding to nearest is optimal per weight, not for the block: letting some weights round the
other way can cancel the errors of their neighbours on the block's real inputs. Following
AutoRound (Cheng et al., arXiv 2309.05516), after a block's AWQ scales are folded and its clip
ratios chosen, we learn for every quantized linear

- an offset ``v`` in ``[-0.5, 0.5]`` per weight, added to ``w / scale`` before rounding, and
- two ratios in ``[0, 1]`` per group, shrinking its minimum and maximum (they start at AWQ's
  clip ratio, so step 0 is exactly the AWQ block),

by signed gradient descent on the mean squared error of the block's output against the float
block, on random batches of calibration rows. Rounding passes gradients straight through (the
straight-through estimator). The result is still integer codes + scale + zero from the one
quantizer (:func:`metal_marlin.quant.quantize_tensor` with a :class:`~metal_marlin.quant.Rounding`),
so every reader of the stored format serves it unchanged.

Defaults follow AutoRound's: 200 steps, learning rate ``1 / steps`` decaying linearly to 0 (so an
offset moves by at most 0.5 in all), the parameters of the step with the lowest loss kept, batches
of 8 rows. The loss runs through MLX (``mx.value_and_grad``) on whatever device MLX computes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from metal_marlin import device
from metal_marlin.quant import QuantSpec, Rounding, fake_quantize

DEFAULT_STEPS = 200
DEFAULT_BATCH_ROWS = 8
_OFFSET_BOUND = 0.5
_RATIO_BOUNDS = (0.0, 1.0)


def check_rounding_settings(steps: int, batch_rows: int) -> None:
    """Raise ValueError naming the parameter for settings learned rounding cannot use."""
    for name, value in (("rounding_steps", steps), ("rounding_batch_rows", batch_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def ste_round(x: mx.array) -> mx.array:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + mx.stop_gradient(mx.round(x) - x)


@dataclass
class RoundingTarget:
    """One linear of the block whose rounding is learned.

    ``weight`` is the folded weight with salient columns zeroed (what gets codes), ``side`` the
    salient columns kept in float beside it (zero when there are none), ``clip_ratio`` AWQ's
    per-group ratio (None: no clipping).
    """

    path: str
    weight: mx.array  # [out, in] float32
    side: mx.array | None
    clip_ratio: np.ndarray | None


@dataclass
class RoundingOutcome:
    roundings: dict[str, Rounding]  # MLX arrays, where they were learned (on a GPU: on the device)
    first_loss: float  # the AWQ block's batch loss (step 0)
    best_loss: float
    best_step: int
    losses: list[float]


def _initial_params(target: RoundingTarget, spec: QuantSpec) -> dict[str, mx.array]:
    out_features, in_features = target.weight.shape
    groups = in_features // spec.group_size
    ratio = mx.ones((out_features, groups), dtype=mx.float32)
    if target.clip_ratio is not None:
        ratio = mx.broadcast_to(mx.array(np.asarray(target.clip_ratio, np.float32)), ratio.shape)
    return {"offset": mx.zeros((out_features, in_features), dtype=mx.float32), "min_ratio": ratio, "max_ratio": ratio}


def _clamp(params: dict[str, dict[str, mx.array]]) -> dict[str, dict[str, mx.array]]:
    low, high = _RATIO_BOUNDS
    return {
        path: {
            "offset": mx.clip(p["offset"], -_OFFSET_BOUND, _OFFSET_BOUND),
            "min_ratio": mx.clip(p["min_ratio"], low, high),
            "max_ratio": mx.clip(p["max_ratio"], low, high),
        }
        for path, p in params.items()
    }


def learn_block_rounding(
    block: nn.Module,
    targets: list[RoundingTarget],
    x: mx.array,
    reference: mx.array,
    spec: QuantSpec,
    steps: int = DEFAULT_STEPS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    seed: int = 0,
) -> RoundingOutcome:
    """Learn the rounding of ``targets`` (linears of ``block``) on ``x [rows, L, D]``.

    ``reference`` is the float block's output for ``x``. The block's other parameters stay as
    they are (folded, float); its target linears' weights are overwritten while learning and
    set back to the float (folded) weights at the end.
    """
    check_rounding_settings(steps, batch_rows)
    by_path = {t.path: t for t in targets}
    params = {t.path: _initial_params(t, spec) for t in targets}

    def block_loss(p: dict[str, dict[str, mx.array]], xb: mx.array, yb: mx.array) -> mx.array:
        weights = []
        for path, q in p.items():
            t = by_path[path]
            w = fake_quantize(t.weight, spec, mx, rounding=Rounding(**q), rounder=ste_round)
            weights.append((f"{path}.weight", w if t.side is None else w + t.side))
        block.update(tree_unflatten(weights))
        return mx.mean(mx.square(block(xb).astype(mx.float32) - yb))

    loss_and_grad = mx.value_and_grad(block_loss)

    def descend(state: dict[str, Any], xb: mx.array, yb: mx.array, lr: mx.array, step: mx.array) -> dict[str, Any]:
        """One signed-gradient step; the best parameters so far are kept on the device."""
        loss, grads = loss_and_grad(state["params"], xb, yb)
        better = loss < state["best_loss"]
        return {
            "loss": loss,
            "params": _clamp(tree_map(lambda p, g: p - lr * mx.sign(g), state["params"], grads)),
            "best": tree_map(lambda b, p: mx.where(better, p, b), state["best"], state["params"]),
            "best_loss": mx.where(better, loss, state["best_loss"]),
            "best_step": mx.where(better, step, state["best_step"]),
        }

    # On a GPU, one traced graph for every step: the block's other weights are constants of
    # it, the parameters, batch, learning rate and step number its inputs (same shapes every step).
    step_fn = mx.compile(descend) if device.use_compile() else descend
    rng = np.random.default_rng(seed)
    rows = x.shape[0]
    batch = min(batch_rows, rows)
    state: dict[str, Any] = {
        "loss": mx.array(0.0), "params": params, "best": params,
        "best_loss": mx.array(float("inf")), "best_step": mx.array(0, dtype=mx.int32),
    }
    losses: list[mx.array] = []
    for step in range(steps):
        idx = mx.array(np.sort(rng.choice(rows, size=batch, replace=False)))
        lr = mx.array(1.0 / steps * (1.0 - step / steps), dtype=mx.float32)
        state = step_fn(state, x[idx], reference[idx], lr, mx.array(step, dtype=mx.int32))
        mx.async_eval(state)
        if losses:  # stay one step ahead of the device: queue step k, then wait for step k - 1
            mx.eval(losses[-1])
        losses.append(state["loss"])
    mx.eval(state)
    loss_values = [float(v) for v in mx.stack(losses).tolist()]
    best, best_step, best_loss = state["best"], int(state["best_step"].item()), float(state["best_loss"].item())
    block.update(tree_unflatten([(f"{t.path}.weight", t.weight if t.side is None else t.weight + t.side) for t in targets]))
    roundings = {path: Rounding(offset=p["offset"], min_ratio=p["min_ratio"], max_ratio=p["max_ratio"]) for path, p in best.items()}
    return RoundingOutcome(roundings, loss_values[0], best_loss, best_step, loss_values)
