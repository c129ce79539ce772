"""Learned rounding (``method="awq+round"``): it starts at the AWQ block, lowers the block's
output error on real SmolLM2 activations, stays inside its bounds, and produces ordinary
integer codes that our loader and mlx-lm read."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metal_marlin import pipeline
from metal_marlin.checkpoints import load_model
from metal_marlin.models.llama import DecoderBlock
from metal_marlin.quant import QuantSpec, Rounding, fake_quantize, quantize_tensor
from metal_marlin.rounding import learn_block_rounding, ste_round
from metal_marlin.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_learned_rounding_of_the_stored_codes_is_what_was_learned() -> None:
    """The stored codes (quantize_tensor) dequantize to the function the descent saw
    (fake_quantize with the straight-through rounder), and zero offsets with both ratios at
    the clip ratio are exactly the clip search's quantization."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 128)).astype(np.float32)
    spec = QuantSpec(bits=3, group_size=64)
    clip = rng.uniform(0.7, 1.0, size=(32, 2)).astype(np.float32)
    plain = Rounding(np.zeros_like(w), clip, clip)
    assert np.array_equal(quantize_tensor(w, spec, np, clip).dequantize(), quantize_tensor(w, spec, np, rounding=plain).dequantize())
    learned = Rounding(rng.uniform(-0.5, 0.5, size=w.shape).astype(np.float32), clip * 0.9, clip)
    stored = quantize_tensor(w, spec, np, rounding=learned).dequantize()
    traced = fake_quantize(mx.array(w), spec, mx, rounding=Rounding(*(mx.array(a) for a in (learned.offset, learned.min_ratio, learned.max_ratio))), rounder=ste_round)
    assert np.array_equal(stored, np.array(traced))
    assert not np.array_equal(stored, quantize_tensor(w, spec, np, clip).dequantize())  # the offsets moved codes


def test_straight_through_rounding_passes_gradients() -> None:
    x = mx.array([0.2, 1.7, -2.4])
    value, grad = mx.value_and_grad(lambda v: mx.sum(ste_round(v) * mx.array([1.0, 2.0, 3.0])))(x)
    assert value.item() == pytest.approx(0 + 2 * 2 - 3 * 2)
    assert np.array(grad).tolist() == [1.0, 2.0, 3.0]


def _block_and_inputs(smollm2, tokenizer, index: int = 2, n: int = 4, length: int = 64):
    ids = pipeline._calibration_batch(smollm2.model, tokenizer, None, None, n, length)[0].input_ids
    x = smollm2.model.model.embed(mx.array(ids)).astype(mx.float32)
    for layer in smollm2.model.layers[:index]:
        x = layer(x)
    block = DecoderBlock(smollm2.config)
    block.load_weights(list(tree_flatten(smollm2.model.layers[index].parameters())))
    block.update(pipeline._as_float32(block))
    return block, x


def test_learned_rounding_starts_at_the_awq_block_and_lowers_its_output_error(smollm2, tokenizer) -> None:
    block, x = _block_and_inputs(smollm2, tokenizer)
    spec = QuantSpec(bits=3, group_size=64)
    stats = pipeline._quantize_block(block, x, spec, 0.0, "rms", 5, False, "awq+round", np, pipeline.RoundingSettings(steps=30))[2]
    # step 0 is the AWQ block: all four rows fit one batch, so its loss is the AWQ block error
    assert stats["rounding"]["first_loss"] == pytest.approx(stats["block_output_error"], rel=1e-4)
    assert stats["choice"] == "awq+round"
    assert stats["block_round_output_error"] < 0.7 * stats["block_output_error"], stats
    assert stats["block_output_error"] < stats["block_rtn_output_error"]


def test_learned_parameters_stay_in_bounds_and_the_block_gets_its_float_weights_back(smollm2, tokenizer) -> None:
    block, x = _block_and_inputs(smollm2, tokenizer, index=0, n=2, length=32)
    reference = block(x)
    path = "mlp.down_proj"
    weight = block.mlp.down_proj.weight
    target = pipeline.RoundingTarget(path, weight, None, None)
    outcome = learn_block_rounding(block, [target], x, reference, QuantSpec(bits=2, group_size=64), steps=40)
    rounding = outcome.roundings[path]
    assert np.abs(rounding.offset).max() <= 0.5 and np.abs(rounding.offset).max() > 0.05
    assert 0.0 <= rounding.min_ratio.min() and rounding.max_ratio.max() <= 1.0
    assert outcome.best_loss < outcome.first_loss
    assert outcome.losses[outcome.best_step] == outcome.best_loss
    assert np.array_equal(np.array(block.mlp.down_proj.weight), np.array(weight))  # float weights restored


def test_the_compiled_step_learns_what_the_step_by_step_one_does(smollm2, tokenizer, monkeypatch) -> None:
    """On a GPU the descent runs as one ``mx.compile``d graph per step (the block's mutation
    inside it included); the CPU runs it op by op. Both must learn the same rounding."""
    from metal_marlin import device

    block, x = _block_and_inputs(smollm2, tokenizer, index=0, n=2, length=16)
    reference = block(x)
    weight = block.mlp.down_proj.weight
    outcomes = []
    for compiled in (False, True):
        monkeypatch.setattr(device, "use_compile", lambda: compiled)
        target = pipeline.RoundingTarget("mlp.down_proj", weight, None, None)
        outcomes.append(learn_block_rounding(block, [target], x, reference, QuantSpec(bits=3, group_size=64), steps=6))
        assert np.array_equal(np.array(block.mlp.down_proj.weight), np.array(weight))
    eager, traced = outcomes
    assert traced.losses == pytest.approx(eager.losses, rel=1e-4)
    assert traced.best_step == eager.best_step and traced.best_loss < traced.first_loss
    for key in ("offset", "min_ratio", "max_ratio"):
        assert np.allclose(getattr(traced.roundings["mlp.down_proj"], key), getattr(eager.roundings["mlp.down_proj"], key), atol=1e-6)


def _first_blocks(smollm2, n: int):
    from metal_marlin.models.llama import LlamaModel

    model = LlamaModel(smollm2.config.replace(num_hidden_layers=n))
    keep = lambda k: not k.startswith("model.layers.") or int(k.split(".")[2]) < n  # noqa: E731
    model.load_weights([(k, v) for k, v in tree_flatten(smollm2.model.parameters()) if keep(k)])
    return model


def test_an_awq_round_model_is_plain_int_codes_that_mlx_reads(smollm2, tokenizer) -> None:
    """Two real SmolLM2 blocks through the model pipeline with learned rounding: the stored
    tensors are MLX's packed codes + fp16 scales/biases (``mx.dequantize`` reads them as is),
    and the model built from them predicts what the float one does."""
    from metal_marlin.checkpoints.loader import build_model
    from metal_marlin.quant import unpack_codes

    float_model = _first_blocks(smollm2, 2)
    batch = pipeline._calibration_batch(float_model, tokenizer, None, None, 4, 32)[0]
    tensors, stats = pipeline.quantize_loaded_model(
        float_model, batch, bits=4, group_size=64, salient_ratio=0.0, n_grid=3, method="awq+round", rounding_steps=20,
    )
    assert stats["method"] == "awq+round" and stats["rounding_steps"] == 20
    assert stats["blocks_round"] == 2, [b["choice"] for b in stats["blocks"]]
    prefix = "model.layers.1.mlp.down_proj"
    packed, scales, biases = (tensors[f"{prefix}.{n}"] for n in ("weight", "scales", "biases"))
    assert packed.dtype == np.uint32 and packed.shape == (576, 1536 * 4 // 32)
    codes = unpack_codes(packed, 4).astype(np.float32).reshape(576, 24, 64)
    scales, biases = (a.astype(np.float16).astype(np.float32) for a in (scales, biases))  # as stored
    by_hand = (codes * scales[..., None] + biases[..., None]).reshape(576, 1536)
    by_mlx = mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=64, bits=4)
    assert np.allclose(np.array(by_mlx), by_hand, atol=1e-6)
    quantized = build_model(float_model.config, tensors, quantization={"group_size": 64, "bits": 4})
    reference = _first_blocks(smollm2, 2)
    ids = mx.array([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    assert mx.argmax(reference(ids)[0, -1]).item() == mx.argmax(quantized(ids)[0, -1]).item()


def test_settings_errors_name_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="method"):
        pipeline.awq_quantize_model(None, tmp_path / "x", method="round")
    with pytest.raises(ValueError, match="rounding_steps"):
        pipeline.awq_quantize_model(None, tmp_path / "x", method="awq+round", rounding_steps=0)
    assert not (tmp_path / "x").exists()
