"""Model-level AWQ: ``awq_quantize_model``, block by block.

For each decoder block, on the *full-precision* block input:

1. Run the block once, capturing the input of every group of linears that share one input
   (``input_layernorm -> q,k,v``; ``v -> o`` when v and o have matching shapes;
   ``post_attention_layernorm -> gate,up``; ``up -> down``) and the block output.
2. Search each group's channel scales (``metal_marlin.search.search_scales``) by the summed
   output error of the group's linears on the captured inputs.
3. Fold: the previous op absorbs ``1/s`` (RMSNorm weight, or the output rows of the
   previous linear), the group's weight columns absorb ``s``; the float function of the
   block is unchanged.
4. Clip-search every linear except q/k (attention logits are sensitive to clipping), and
   quantize it with the one quantizer (``metal_marlin.quant``).
5. Compare the block's output error (against the float block) with plain round-to-nearest
   of the same block; keep whichever is lower.
6. Feed the float block's output to the next block, so errors do not compound during
   calibration.

All search math is float32. Only one block's calibration activations live at a time, and
``awq_quantize_model`` streams the weights: it reads block ``i``'s tensors from the
checkpoint right before quantizing block ``i`` and drops its float weights right after,
so about one float block (plus the embedding) is in memory, never the whole model.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Literal, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from metal_marlin.awq import ACTIVATION_METHODS, _check_salient_ratio, channel_stats, compute_activation_stats, find_salient_weights
from metal_marlin.backends import compute_namespace
from metal_marlin.calibration import (
    DEFAULT_N_SAMPLES,
    DEFAULT_SEQ_LEN,
    CalibrationBatch,
    calibration_tokens,
    load_activations,
)
from metal_marlin.quant import QuantSpec, Rounding, fake_quantize, quantize_tensor, to_mlx_scales_biases
from metal_marlin.rounding import DEFAULT_BATCH_ROWS, DEFAULT_STEPS, RoundingTarget, check_rounding_settings, learn_block_rounding
from metal_marlin.search import OutputError, fake_quantize_scaled, read_floats, schedule, search_clip, search_scales

ProgressFn = Callable[[dict[str, Any]], None]
Method = Literal["awq", "awq+round", "rtn"]
METHODS: tuple[str, ...] = ("awq", "awq+round", "rtn")
"""``awq``: scales + clipping; ``awq+round``: then learned rounding; ``rtn``: round-to-nearest."""
_CHUNK_SAMPLES = 8  # samples per forward chunk: bounds the attention score memory


@dataclass(frozen=True)
class HeadTie:
    """o_proj's input channels under grouped-query attention (fewer KV heads than query heads).

    Query head ``h`` attends over KV head ``h // group``; o_proj's input is the query heads'
    outputs side by side, each a convex mix of its KV head's value vectors. Dividing one
    ``v_proj`` output channel by ``t`` divides that channel of every query head sharing it by
    ``t``, so o_proj's columns may take ``t`` back exactly only when the scales of the ``group``
    query-head channels fed by one KV channel are equal: one scale per ``v_proj`` output channel,
    repeated over its query heads.
    """

    n_kv_heads: int
    group: int  # query heads per KV head
    head_dim: int

    def tie(self, s: Any, keep: Any, xp: ModuleType) -> Any:
        """``s`` over o_proj's inputs made exact to fold: the geometric mean of each tied set,
        1 for a set holding a salient (kept-aside) channel, whose scale must stay 1."""
        shape = (self.n_kv_heads, self.group, self.head_dim)
        log_s = xp.log(s.reshape(shape)).mean(axis=1, keepdims=True)
        all_kept = keep.reshape(shape).min(axis=1, keepdims=True) > 0
        tied = xp.where(all_kept, xp.exp(log_s), 1.0)
        return xp.broadcast_to(tied, shape).reshape(-1).astype(xp.float32)

    def per_kv_channel(self, s: np.ndarray) -> np.ndarray:
        """The ``v_proj`` output scales of tied o_proj input scales ``s``."""
        return s.reshape(self.n_kv_heads, self.group, self.head_dim)[:, 0, :].reshape(-1)


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, and the op whose output that input is."""

    name: str
    capture_key: str  # key of DecoderBlock.capture()'s inputs
    linears: tuple[str, ...]  # attribute paths inside the block
    previous: str | None  # RMSNorm or linear that absorbs 1/s; None: no scaling possible
    tie: HeadTie | None = None  # scales must be tied so ``previous`` can absorb them (GQA v -> o)


def block_groups(block: nn.Module) -> list[LinearGroup]:
    """The AWQ groups of a block, from its architecture's ``SCALING_GROUPS``.

    A group whose previous op is a linear with fewer outputs than the group has inputs
    (v_proj -> o_proj under grouped-query attention) gets tied scales (:class:`HeadTie`);
    any other shape mismatch leaves the group unscaled (clip search and rounding only).
    """
    groups = []
    for declared in type(block).SCALING_GROUPS:
        previous, tie = declared.previous, None
        if previous is not None:
            prev = _module(block, previous)
            in_features = _module(block, declared.linears[0]).weight.shape[1]
            if prev.weight.ndim == 2 and prev.weight.shape[0] != in_features:
                tie = _head_tie(block, prev.weight.shape[0], in_features)
                previous = previous if tie is not None else None
        groups.append(LinearGroup(declared.name, declared.capture_key, declared.linears, previous, tie))
    return groups


def _head_tie(block: nn.Module, prev_out: int, in_features: int) -> HeadTie | None:
    """The tie of o_proj's inputs to v_proj's outputs, when the shapes are those of GQA."""
    attn = getattr(block, "self_attn", None)
    if attn is None:
        return None
    n_heads, n_kv_heads, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    if prev_out != n_kv_heads * head_dim or in_features != n_heads * head_dim or n_heads % n_kv_heads:
        return None
    return HeadTie(n_kv_heads, n_heads // n_kv_heads, head_dim)


def _module(block: nn.Module, path: str) -> nn.Module:
    module = block
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _to_np(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32))


def _run_block(
    block: nn.Module, x: mx.array, capture: bool, xp: ModuleType = np
) -> tuple[mx.array, dict[str, Any]]:
    """Block output for ``x [samples, L, D]`` in chunks, optionally with captured inputs.

    Captured inputs come back as ``xp`` arrays ``[tokens, in]`` float32: numpy for the CPU
    search, MLX on a GPU, where they never leave the device (a 128 x 512 calibration of
    SmolLM2 captures 0.86 GB per block).
    """
    outputs: list[mx.array] = []
    captured: dict[str, list[Any]] = {}
    on_device = xp is not np
    for start in range(0, x.shape[0], _CHUNK_SAMPLES):
        chunk = x[start : start + _CHUNK_SAMPLES]
        if capture:
            out, inputs = block.capture(chunk)
            mx.eval(out, inputs)
            for key, value in inputs.items():
                flat = value.reshape(-1, value.shape[-1])
                captured.setdefault(key, []).append(flat.astype(mx.float32) if on_device else _to_np(flat))
        else:
            out = block(chunk)
            mx.eval(out)
        outputs.append(out)
    join = mx.concatenate if on_device else np.concatenate
    return mx.concatenate(outputs, axis=0), {k: join(v) for k, v in captured.items()}


def _block_mse(block: nn.Module, x: mx.array, reference: mx.array) -> float:
    out, _ = _run_block(block, x, capture=False)
    return float(mx.mean(mx.square(out.astype(mx.float32) - reference)).item())


@dataclass
class _LinearPlan:
    path: str
    scales: np.ndarray  # [in]
    keep: np.ndarray  # [in] float32 0/1
    clip_ratio: np.ndarray | None
    salient_idx: np.ndarray
    error: OutputError
    stats: dict[str, Any]


def _plan_group(
    block: nn.Module,
    group: LinearGroup,
    x: Any,
    spec: QuantSpec,
    salient_ratio: float,
    activation_method: str,
    n_grid: int,
    duo_scaling: bool,
    use_awq: bool,
    xp: ModuleType,
    error: OutputError,
) -> list[_LinearPlan]:
    """Scale search + clip search for one group (``use_awq=False``: plain round-to-nearest).

    Everything stays in ``xp`` (on the GPU: on the device) and every error is scored lazily;
    the group's figures are read back together at the end, so the host waits on the device
    a handful of times per group instead of once per candidate.
    """
    ws = [_in_namespace(_module(block, p).weight, xp) for p in group.linears]
    in_features = x.shape[1]
    if isinstance(x, np.ndarray):
        stat = compute_activation_stats(x, activation_method)
    else:  # calibration inputs on the GPU: reduce there, bring back one value per channel
        stat = np.array(channel_stats(x, activation_method, mx), dtype=np.float32)
    salient_idx = np.zeros(0, np.int64)
    if salient_ratio > 0:  # importance needs only the mean |w| of each input channel
        mean_abs = sum(xp.abs(w).sum(axis=0) for w in ws) / sum(w.shape[0] for w in ws)
        salient_idx, _ = find_salient_weights(np.array(mean_abs, dtype=np.float32)[:, None], stat, salient_ratio)
    keep_np = np.ones(in_features, np.float32)
    keep_np[salient_idx] = 0.0
    keep = xp.array(keep_np)
    targets = [w * keep[None, :] for w in ws]

    def loss(deltas: list[Any]) -> Any:
        return sum(error.total_lazy(d) * d.shape[0] for d in deltas) / sum(d.shape[0] for d in deltas)

    if use_awq and group.previous is not None:
        tie = (lambda scales: group.tie.tie(scales, keep, xp)) if group.tie is not None else None
        found = search_scales(ws, xp.array(stat), keep, spec, loss, n_grid=n_grid, duo_scaling=duo_scaling, xp=xp, tie=tie)
        s, alpha, rtn_loss, awq_loss = found.scales, found.alpha, found.loss_rtn, found.loss
    else:
        s = xp.ones((in_features,), dtype=xp.float32)
        alpha = 0.0
        rtn_loss = awq_loss = read_floats([loss([fake_quantize_scaled(w, s, keep, spec, xp) - t for w, t in zip(ws, targets)])])[0]

    # Per linear: the error without clipping, the clip search's candidate and its error, and
    # plain RTN's error (for the stats); all scored before anything is read back.
    lazy: list[tuple[str, Any, Any, Any, Any]] = []
    for path, w, target in zip(group.linears, ws, targets):
        no_clip = error.total_lazy(fake_quantize_scaled(w, s, keep, spec, xp) - target)
        candidate = clipped = None
        if use_awq and not path.endswith(("q_proj", "k_proj")):
            candidate = search_clip(w, s, keep, spec, error, xp=xp)
            clipped = error.total_lazy(fake_quantize_scaled(w, s, keep, spec, xp, candidate) - target)
        rtn = error.total_lazy(fake_quantize(w, spec, xp) - w)
        schedule(xp, *[v for v in (no_clip, candidate, clipped, rtn) if v is not None])
        lazy.append((path, no_clip, candidate, clipped, rtn))
    values = read_floats([v for _, no_clip, _, clipped, rtn in lazy for v in (no_clip, rtn, clipped if clipped is not None else no_clip)])
    s_np = np.array(s, dtype=np.float32)

    plans = []
    for index, (path, _, candidate, _, _) in enumerate(lazy):
        no_clip, rtn, clipped = values[3 * index : 3 * index + 3]
        clip_ratio, final = None, no_clip
        if candidate is not None and clipped < no_clip:
            clip_ratio, final = np.array(candidate), clipped
        plans.append(
            _LinearPlan(
                path=path,
                scales=s_np,
                keep=keep_np,
                clip_ratio=clip_ratio,
                salient_idx=salient_idx,
                error=error,
                stats={
                    "group": group.name,
                    "alpha": alpha,
                    "clipped": clip_ratio is not None,
                    "output_error": final,
                    "rtn_output_error": rtn,
                    "group_search_loss": awq_loss,
                    "group_rtn_loss": rtn_loss,
                    "salient_channels": [int(i) for i in salient_idx],
                },
            )
        )
    return plans


def _in_namespace(array: mx.array, xp: ModuleType) -> Any:
    """A float32 copy of a block parameter in ``xp``: numpy on the host, or MLX where it lives."""
    return _to_np(array) if xp is np else array.astype(mx.float32)


def _set_param(module: nn.Module, name: str, value: np.ndarray | mx.array, like: mx.array) -> None:
    module.update({name: mx.array(value).astype(like.dtype)})


def fold_scales(block: nn.Module, groups: Sequence[LinearGroup], scales: dict[str, np.ndarray]) -> None:
    """Fold AWQ channel scales into the block, in float: the block's function is unchanged.

    For a group with scales ``s``: its linears' weight columns are multiplied by ``s`` and the
    previous op's output is divided by ``s`` (an RMSNorm's weight, or the output rows and
    bias of the previous linear; under GQA one row per tied set, see :class:`HeadTie`, so a
    tied group's ``s`` must come from :meth:`HeadTie.tie`). All folds happen before any quantization, because a
    group's previous op (``up_proj`` for ``down_proj``) belongs to another group.
    """
    for group in groups:
        s = scales.get(group.name)
        if s is None or np.all(s == 1.0):
            continue
        if group.previous is None:
            raise ValueError(f"group {group.name} has no previous op to absorb its scales")
        s_mx = mx.array(s)
        for path in group.linears:
            linear = _module(block, path)
            _set_param(linear, "weight", linear.weight.astype(mx.float32) * s_mx[None, :], linear.weight)
        prev = _module(block, group.previous)
        if prev.weight.ndim == 1:  # a norm: it multiplies its output by weight + offset
            offset = float(getattr(prev, "weight_offset", 0.0))  # Gemma stores w and applies 1 + w
            _set_param(prev, "weight", (prev.weight.astype(mx.float32) + offset) / s_mx - offset, prev.weight)
        else:
            s_out = mx.array(group.tie.per_kv_channel(s) if group.tie is not None else s)  # one per v_proj output
            _set_param(prev, "weight", prev.weight.astype(mx.float32) / s_out[:, None], prev.weight)
            if "bias" in prev:
                _set_param(prev, "bias", prev.bias.astype(mx.float32) / s_out, prev.bias)


def _quantize_folded(
    block: nn.Module, plans: dict[str, list[_LinearPlan]], spec: QuantSpec, xp: ModuleType,
    roundings: dict[str, Rounding] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Quantize every (already folded) linear; set it to its dequantized weight for scoring.

    The one quantizer runs in ``xp`` (on a GPU, on the device: only the packed codes, scales
    and biases come back to the host). ``roundings`` (learned rounding, by linear path)
    replace the plans' clip ratios. Returns the stored tensors per linear path: packed codes,
    fp16 scales and biases, and the fp16 side channels when there are salient channels.
    """
    made = []
    for group_plans in plans.values():
        for plan in group_plans:
            linear = _module(block, plan.path)
            folded = _in_namespace(linear.weight, xp)
            rounding = roundings.get(plan.path) if roundings else None
            if rounding is not None:  # learned in MLX: stays on the device unless the quantizer runs in numpy
                rounding = Rounding(*(_in_namespace(a, xp) for a in (rounding.offset, rounding.min_ratio, rounding.max_ratio)))
            clip = None if plan.clip_ratio is None else xp.array(plan.clip_ratio)
            qt = quantize_tensor(folded * xp.array(plan.keep)[None, :], spec, xp, clip, rounding)
            scales, biases = to_mlx_scales_biases(qt.scales, qt.zeros.astype(xp.float32), xp=xp)
            deq = qt.dequantize(xp)
            if plan.salient_idx.size:  # the side channels replace their zeroed columns
                side = np.array(folded)[:, plan.salient_idx].astype(np.float16)
                deq = np.array(deq)
                deq[:, plan.salient_idx] = side.astype(np.float32)
            else:
                side = None
            schedule(xp, qt.packed, scales, biases, deq)
            made.append((plan, linear, qt.packed, scales, biases, deq, side))
    stored: dict[str, dict[str, np.ndarray]] = {}
    for plan, linear, packed, scales, biases, deq, side in made:
        tensors = {"weight": np.array(packed), "scales": np.array(scales), "biases": np.array(biases)}
        if side is not None:
            tensors["salient_indices"] = plan.salient_idx.astype(np.int32)
            tensors["salient_weight"] = side
        _set_param(linear, "weight", deq, linear.weight)
        stored[plan.path] = tensors
    return stored


def _rounding_targets(block: nn.Module, plans: dict[str, list[_LinearPlan]]) -> list[RoundingTarget]:
    """The (already folded) linears of a block as learned rounding sees them."""
    targets = []
    for group_plans in plans.values():
        for plan in group_plans:
            folded = _module(block, plan.path).weight.astype(mx.float32)
            keep = mx.array(plan.keep)[None, :]
            side = folded * (1.0 - keep) if plan.salient_idx.size else None
            targets.append(RoundingTarget(plan.path, folded * keep, side, plan.clip_ratio))
    return targets


def _store_float_params(block: nn.Module, stored: dict[str, dict[str, np.ndarray]]) -> None:
    """Add every block parameter that is not a quantized weight (norms, biases), as folded."""
    for name, value in tree_flatten(block.parameters()):
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and path in stored:
            continue  # the packed codes are already there
        stored.setdefault(path, {})[leaf] = _to_np(value)


def _snapshot(block: nn.Module) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in tree_flatten(block.parameters())}


def _restore(block: nn.Module, params: dict[str, mx.array]) -> None:
    block.load_weights(list(params.items()))


_COMPARE_SAMPLES = 16  # calibration samples used to compare AWQ and RTN block outputs


@dataclass(frozen=True)
class RoundingSettings:
    """Learned rounding's knobs (``method="awq+round"``), see :mod:`metal_marlin.rounding`."""

    steps: int = DEFAULT_STEPS
    batch_rows: int = DEFAULT_BATCH_ROWS


def _quantize_block(
    block: nn.Module,
    x: mx.array,
    spec: QuantSpec,
    salient_ratio: float,
    activation_method: str,
    n_grid: int,
    duo_scaling: bool,
    method: str,
    xp: ModuleType,
    rounding: RoundingSettings = RoundingSettings(),
) -> tuple[mx.array, dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Quantize one block; returns (float block output, stored tensors, stats).

    With ``method="awq"`` the block is quantized twice, with AWQ and with plain
    round-to-nearest, and the variant with the lower block-output error is kept. With
    ``"awq+round"`` the AWQ block's rounding is then learned, and kept only if its block-output
    error beats the AWQ block's (and RTN's).
    """
    fp_out, captured = _run_block(block, x, capture=True, xp=xp)
    groups = block_groups(block)
    original = _snapshot(block)
    errors = {g.name: OutputError(xp.array(captured[g.capture_key]), xp) for g in groups}
    x_cmp, ref_cmp = x[:_COMPARE_SAMPLES], fp_out[:_COMPARE_SAMPLES]

    outcomes: dict[str, tuple[float, dict[str, dict[str, np.ndarray]], dict[str, list[_LinearPlan]]]] = {}
    variants = ("awq", "rtn") if method in ("awq", "awq+round") else ("rtn",)
    for variant in variants:
        _restore(block, original)
        plans = {
            g.name: _plan_group(
                block, g, captured[g.capture_key], spec, salient_ratio, activation_method, n_grid, duo_scaling,
                variant == "awq", xp, errors[g.name],
            )
            for g in groups
        }
        fold_scales(block, groups, {name: group_plans[0].scales for name, group_plans in plans.items()})
        if variant == "awq" and method == "awq+round":
            folded = _snapshot(block)
            learned = learn_block_rounding(
                block, _rounding_targets(block, plans), x, fp_out, spec, rounding.steps, rounding.batch_rows
            )
            stored = _quantize_folded(block, plans, spec, xp, learned.roundings)
            outcomes["awq+round"] = (_block_mse(block, x_cmp, ref_cmp), stored, plans)
            _store_float_params(block, stored)
            _restore(block, folded)  # the AWQ variant quantizes the folded float weights
        stored = _quantize_folded(block, plans, spec, xp)
        block_error = _block_mse(block, x_cmp, ref_cmp)
        _store_float_params(block, stored)
        outcomes[variant] = (block_error, stored, plans)
    rtn_error = outcomes["rtn"][0]
    awq_error = outcomes["awq"][0] if "awq" in outcomes else rtn_error
    choice = "awq" if "awq" in outcomes and awq_error <= rtn_error else "rtn"
    if "awq+round" in outcomes and outcomes["awq+round"][0] < outcomes[choice][0]:
        choice = "awq+round"
    _, stored, plans = outcomes[choice]
    stats: dict[str, Any] = {
        "choice": choice,
        "block_output_error": awq_error,
        "block_rtn_output_error": rtn_error,
        "linears": {},
    }
    if "awq+round" in outcomes:
        stats["block_round_output_error"] = outcomes["awq+round"][0]
        stats["rounding"] = {"first_loss": learned.first_loss, "best_loss": learned.best_loss, "best_step": learned.best_step}
    for group_plans in plans.values():
        for plan in group_plans:
            stats["linears"][plan.path] = {**plan.stats, "scales": [round(float(v), 6) for v in plan.scales]}
    _restore(block, original)
    return fp_out, stored, stats


def _calibration_batch(
    model: nn.Module,
    tokenizer: Any,
    activations_path: str | Path | None,
    text_path: str | Path | None,
    n_samples: int,
    seq_len: int,
) -> tuple[CalibrationBatch, str]:
    cfg = model.config
    if activations_path is not None:
        batch = load_activations(activations_path, cfg.hidden_size, cfg.vocab_size)
        return batch, f"activations file {activations_path}"
    ids = calibration_tokens(tokenizer, n_samples, seq_len, text_path)
    return CalibrationBatch(ids), f"text file {text_path}" if text_path else "built-in Wikipedia calibration split"


def quantize_loaded_model(
    model: nn.Module,
    batch: CalibrationBatch,
    bits: int = 4,
    group_size: int = 128,
    salient_ratio: float = 0.01,
    activation_method: str = "rms",
    n_grid: int = 20,
    duo_scaling: bool = False,
    compute_backend: str = "auto",
    progress: ProgressFn | None = None,
    method: Method = "awq",
    load_block: Callable[[int], None] | None = None,
    rounding_steps: int = DEFAULT_STEPS,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """AWQ over every block of a model; returns (output tensors by HF name, stats).

    Each block's float weights are released once its quantized tensors exist, so the
    model is never held twice. ``load_block(i)``, when given, is called right before
    block ``i`` is quantized (after block ``i - 1`` was released) to load its weights:
    with ``checkpoints.build_model_lazily`` only one float block is ever in memory.
    """
    spec = validate_settings(model.config, bits, group_size, salient_ratio, activation_method, method, rounding_steps)
    xp = compute_namespace(compute_backend)
    rounding = RoundingSettings(steps=rounding_steps)

    if batch.hidden_states is not None:
        x = mx.array(batch.hidden_states.astype(np.float32))
    else:
        x = model.model.embed(mx.array(batch.input_ids)).astype(mx.float32)
    mx.eval(x)

    tensors: dict[str, np.ndarray] = {}
    block_stats = []
    layers = model.model.layers
    started = time.perf_counter()
    for index, block in enumerate(layers):
        t0 = time.perf_counter()
        if load_block is not None:
            load_block(index)
        block.update(_as_float32(block))
        fp_out, stored, stats = _quantize_block(block, x, spec, salient_ratio, activation_method, n_grid, duo_scaling, method, xp, rounding)
        for path, items in stored.items():
            for name, value in items.items():
                tensors[f"model.layers.{index}.{path}.{name}"] = value
        stats["index"] = index
        stats["time_s"] = time.perf_counter() - t0
        block_stats.append(stats)
        layers[index] = _ReleasedBlock()  # drop the float weights of this block
        x = fp_out
        if progress is not None:
            progress({"block": index + 1, "n_blocks": len(layers), "elapsed_s": time.perf_counter() - started, "choice": stats["choice"]})
    for name, value in tree_flatten(model.parameters()):
        if not name.startswith("model.layers."):
            tensors[name] = _to_np(value)
    summary = {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "salient_ratio": salient_ratio,
        "activation_method": activation_method,
        "n_grid": n_grid,
        "duo_scaling": duo_scaling,
        "calibration_tokens": int(np.prod(x.shape[:2])),
        "blocks_awq": sum(s["choice"] == "awq" for s in block_stats),
        "blocks_rtn": sum(s["choice"] == "rtn" for s in block_stats),
        "blocks_round": sum(s["choice"] == "awq+round" for s in block_stats),
        "rounding_steps": rounding_steps if method == "awq+round" else None,
        "bits_per_weight": bits_per_weight(tensors, bits),
        "time_s": time.perf_counter() - started,
        "blocks": block_stats,
    }
    return tensors, summary


class _ReleasedBlock(nn.Module):
    """Placeholder for a block whose float weights were released after quantization."""

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        raise RuntimeError("this block was released after quantization; load the quantized output instead")


def validate_settings(
    config: Any, bits: int, group_size: int, salient_ratio: float, activation_method: str, method: str = "awq",
    rounding_steps: int = DEFAULT_STEPS,
) -> QuantSpec:
    """Check every setting (against the model's widths when ``config`` is given); returns the spec."""
    spec = QuantSpec(bits=bits, group_size=group_size)
    if activation_method not in ACTIVATION_METHODS:
        raise ValueError(f"activation_method must be one of {ACTIVATION_METHODS}, got {activation_method!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_rounding_settings(rounding_steps, DEFAULT_BATCH_ROWS)
    _check_salient_ratio(salient_ratio)
    if config is None:
        return spec
    for width in (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim):
        spec.check_in_features(width)
    return spec


def _as_float32(block: nn.Module) -> dict[str, Any]:
    from mlx.utils import tree_map

    return tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, block.parameters())


def bits_per_weight(tensors: dict[str, np.ndarray], bits: int) -> float:
    """Storage bits per quantized weight: codes + fp16 scales/biases + fp16 side channels."""
    n_weights = 0
    n_bits = 0
    for name, value in tensors.items():
        if name.endswith(".weight") and value.dtype == np.uint32:
            prefix = name[: -len(".weight")]
            n = value.shape[0] * value.shape[1] * 32 // bits
            n_weights += n
            n_bits += value.size * 32 + tensors[f"{prefix}.scales"].size * 16 + tensors[f"{prefix}.biases"].size * 16
            if f"{prefix}.salient_weight" in tensors:
                n_bits += tensors[f"{prefix}.salient_weight"].size * 16 + tensors[f"{prefix}.salient_indices"].size * 32
    return n_bits / n_weights if n_weights else float("nan")


def output_config(hf_config: dict[str, Any], bits: int, group_size: int, salient: bool, stats: dict[str, Any]) -> dict[str, Any]:
    """config.json for the quantized folder: mlx-lm's ``quantization`` block plus our notes."""
    config = dict(hf_config)
    config["quantization"] = {"group_size": group_size, "bits": bits}
    config["quantization_config"] = {"group_size": group_size, "bits": bits}
    config["metal_marlin"] = {
        "method": stats["method"],
        "salient_channels": salient,
        "salient_ratio": stats["salient_ratio"],
        "activation_method": stats["activation_method"],
        "bits_per_weight": stats["bits_per_weight"],
    }
    return config


def awq_quantize_model(
    model_path: str | Path | None,
    output_path: str | Path,
    activations_path: str | Path | None = None,
    group_size: int = 128,
    salient_ratio: float = 0.01,
    activation_method: Literal["mean", "max", "rms"] = "rms",
    verbose: bool = True,
    *,
    bits: int = 4,
    n_samples: int = DEFAULT_N_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    text_path: str | Path | None = None,
    n_grid: int = 20,
    duo_scaling: bool = False,
    compute_backend: Literal["auto", "numpy", "mlx"] = "auto",
    progress: ProgressFn | None = None,
    method: Method = "awq",
    rounding_steps: int = DEFAULT_STEPS,
) -> dict[str, Any]:
    """Quantize every linear layer of a model with AWQ and write an MLX-layout folder.

    ``model_path``: a GGUF file, a Hugging Face folder, or None for the built-in
    SmolLM2-135M-Instruct. Calibration: ``activations_path`` (an ``activations.npz`` from
    ``metal-marlin collect``), else ``text_path``, else the built-in Wikipedia calibration
    split; ``n_samples`` x ``seq_len`` tokens. Writes ``model.safetensors``, ``config.json``,
    tokenizer files and ``quant_stats.json`` to ``output_path`` (atomically) and returns
    the stats dict. ``progress`` receives one event per block, then one with ``"stage":
    "writing"`` before the files are written; ``verbose`` draws a progress bar when no
    callback is given. Raising from ``progress`` aborts (used for cancellation).
    ``method``: ``"awq"``, ``"awq+round"`` (AWQ, then ``rounding_steps`` steps of learned
    rounding per block, kept where it lowers the block's output error) or ``"rtn"``.
    """
    from metal_marlin.checkpoints.hf import save_hf_folder
    from metal_marlin.checkpoints.loader import build_model_lazily, open_checkpoint
    from metal_marlin.tokenizer import load_tokenizer

    output_path = Path(output_path)
    validate_settings(None, bits, group_size, salient_ratio, activation_method, method, rounding_steps)  # before loading
    started = time.perf_counter()
    checkpoint = open_checkpoint(model_path)
    config, metadata = checkpoint.config, checkpoint.metadata
    validate_settings(config, bits, group_size, salient_ratio, activation_method, method, rounding_steps)
    model, load_block = build_model_lazily(checkpoint)
    tokenizer = load_tokenizer(model_path)
    batch, source = _calibration_batch(model, tokenizer, activations_path, text_path, n_samples, seq_len)

    on_event = progress  # the caller's callback (not the bar's): it also hears of the writing stage
    bar = None
    if progress is None and verbose:
        from tqdm import tqdm

        bar = tqdm(total=config.num_hidden_layers, desc="AWQ blocks", unit="block")
        progress = lambda event: bar.update(1)  # noqa: E731
    try:
        tensors, stats = quantize_loaded_model(
            model, batch, bits=bits, group_size=group_size, salient_ratio=salient_ratio,
            activation_method=activation_method, n_grid=n_grid, duo_scaling=duo_scaling,
            compute_backend=compute_backend, progress=progress, method=method, load_block=load_block,
            rounding_steps=rounding_steps,
        )
    finally:
        if bar is not None:
            bar.close()
    if on_event is not None:
        n_blocks = config.num_hidden_layers
        on_event({"stage": "writing", "block": n_blocks, "n_blocks": n_blocks, "elapsed_s": time.perf_counter() - started})
    del model, load_block, checkpoint  # the float embedding lives on as numpy in ``tensors``
    mx.clear_cache()  # give MLX's freed buffers back before the output copies are made
    stats.update(
        {
            "model_path": str(model_path) if model_path is not None else "builtin:smollm2-135m-instruct",
            "output_path": str(output_path),
            "calibration": source,
            "total_time_s": time.perf_counter() - started,
        }
    )
    hf_config = config.to_hf_dict()
    for key in ("bos_token_id", "eos_token_id"):
        if metadata.get(key) is not None:
            hf_config[key] = metadata[key]
    config_out = output_config(hf_config, bits, group_size, salient_ratio > 0, stats)
    stored = {k: _storage_dtype(k, tensors.pop(k)) for k in list(tensors)}  # one float32 copy at a time
    extra_files: dict[str, str | bytes] = {"quant_stats.json": json.dumps(stats, indent=1)}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        extra_files.update({p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()})
    save_hf_folder(output_path, stored, config_out, extra_files=extra_files)
    return stats


def _storage_dtype(name: str, value: np.ndarray) -> np.ndarray:
    """Float tensors are stored as float16 (MLX/mlx-lm convention); integers unchanged."""
    if np.issubdtype(value.dtype, np.floating):
        return value.astype(np.float16)
    return value
