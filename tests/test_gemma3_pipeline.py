"""AWQ on the real Gemma 3 270M at 4 bits, group 128 (its 640, 1024 and 2048 wide inputs all
divide by 128, unlike SmolLM2's 576), run as ``metal-marlin quantize --model gemma-3-270m``:
the output folder, our loader, greedy chat generation, ``<end_of_turn>`` stopping, the batch
scheduler past a sliding window, mlx-lm. Group 64 is in test_gemma3_g64.py.

Calibration is the smallest that runs every stage (2 x 32 tokens, ``n_grid=2``); the run
takes about 45 s here (18 blocks, each searched and clip-searched twice: AWQ and plain
round-to-nearest).
"""

from __future__ import annotations

import json
from pathlib import Path

import metal_marlin  # noqa: F401  (first: gives MLX a fast BLAS, see metal_marlin._blas)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import require_gemma3
from metal_marlin.assets import GEMMA3_MODEL_NAME
from metal_marlin.checkpoints import build_model, load_model
from metal_marlin.generate import SamplingParams
from metal_marlin.generate.engine import Engine
from metal_marlin.generate.scheduler import BatchScheduler
from metal_marlin.models import Gemma3Config, Gemma3Model
from metal_marlin.cli import main as cli_main
from metal_marlin.tokenizer import Tokenizer

CHAT = [{"role": "user", "content": "Name the capital of France."}]
EIFFEL = "The famous Eiffel Tower is located in the French city of"
PARIS = 9079


@pytest.fixture(scope="module")
def gemma_g128(tmp_path_factory) -> Path:
    require_gemma3()
    out = tmp_path_factory.mktemp("gemma") / "gemma-w4g128"
    argv = ["quantize", "--model", GEMMA3_MODEL_NAME, "--output-path", str(out), "--group-size", "128",
            "--salient-ratio", "0", "--n-samples", "2", "--seq-len", "32", "--n-grid", "2", "--quiet"]
    assert cli_main(argv) == 0  # the command line, by the built-in's name
    return out


@pytest.fixture(scope="module")
def engine_g128(gemma_g128) -> Engine:
    return Engine.load(gemma_g128)


def check_output_folder(folder: Path, group: int, method: str = "awq") -> None:
    """What a quantized Gemma folder holds (also used by test_gemma3_g64.py)."""
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "quant_stats.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["quantization"] == {"group_size": group, "bits": 4}
    assert config["sliding_window"] == 512 and config["sliding_window_pattern"] == 6 and config["eos_token_id"] == 1
    assert Gemma3Config.from_hf_dict(config).layer_types[5] == "full_attention"
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    stats = json.loads((folder / "quant_stats.json").read_text())
    assert len(stats["blocks"]) == 18 and stats["bits_per_weight"] == pytest.approx(4 + 32 / group)
    assert stats["method"] == method and (stats["blocks_awq"] >= 9 if method == "awq" else stats["blocks_rtn"] == 18)
    first = stats["blocks"][0]
    assert first["block_output_error"] <= first["block_rtn_output_error"]
    assert first["linears"]["mlp.gate_proj"]["group"] == "mlp_gate_up" and len(first["linears"]["self_attn.o_proj"]["scales"]) == 1024
    weights = mx.load(str(folder / "model.safetensors"))
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert down.dtype == mx.uint32 and down.shape == (640, 2048 * 4 // 32)
    assert weights["model.layers.0.mlp.down_proj.scales"].shape == (640, 2048 // group)
    assert weights["model.layers.0.self_attn.q_norm.weight"].shape == (256,) and "lm_head.weight" not in weights


def check_loads_and_answers(folder: Path) -> None:
    """Our loader reads the folder, 4 bits still say Paris, and a chat prompt generates."""
    model, config, metadata = load_model(folder)
    assert isinstance(model, Gemma3Model) and metadata["eos_token_ids"] == [1, 106]
    assert metadata["quantization"]["bits"] == 4 and config.layer_types[11] == "full_attention"
    engine = Engine(model, Tokenizer.from_folder(folder), metadata)
    ids = engine.encode(EIFFEL)
    assert int(mx.argmax(engine.forward_last(mx.array([ids]), engine.make_cache())[0]).item()) == PARIS
    result = engine.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=4))
    assert 1 <= result.completion_tokens <= 4 and result.finish_reason in ("length", "stop")
    assert result.prompt_tokens == len(engine.encode_chat(CHAT)) == 15


def test_output_folder(gemma_g128) -> None:
    check_output_folder(gemma_g128, 128)
    assert json.loads((gemma_g128 / "quant_stats.json").read_text())["model_path"] == GEMMA3_MODEL_NAME


def test_quantized_model_loads_and_answers(gemma_g128) -> None:
    check_loads_and_answers(gemma_g128)


def test_end_of_turn_stops_generation(engine_g128) -> None:
    forced = engine_g128.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=8, logit_bias={106: 100.0}))
    assert forced.token_ids == [106] and forced.finish_reason == "stop" and forced.stop_reason == 106 and forced.text == ""


def test_batch_scheduler_matches_single_sequences_past_the_window(engine_g128) -> None:
    """The g128 model rebuilt with an 8-token window: left-padded batches in the scheduler
    (its own BatchKVCache) give each request's single-sequence greedy tokens."""
    config = engine_g128.config.replace(sliding_window=8)
    weights = dict(tree_flatten(engine_g128.model.parameters()))
    model = build_model(config, weights, quantization=engine_g128.metadata["quantization"])
    engine = Engine(model, engine_g128.tokenizer, engine_g128.metadata)
    prompts = ["One, two, three, four, five, six,", EIFFEL, "def add(a, b):\n    return"]  # 10 to 13 tokens
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    singles = [engine.generate(p, params) for p in prompts]
    sched = BatchScheduler(engine, start=False)
    handles = [sched.submit(engine.encode(p), params) for p in prompts]
    sched.run_until_idle()
    for handle, single in zip(handles, singles):
        assert handle.result(timeout=0).token_ids == single.token_ids
    assert sched.stats["decode_tokens"] > sched.stats["decode_steps"]  # really batched


def test_mlx_lm_loads_our_gemma_and_agrees(gemma_g128, engine_g128) -> None:
    """mlx-lm's own Gemma 3 reads the folder. Its one deliberate difference: it rounds the
    embedding scale sqrt(640) to bfloat16 (25.25 instead of 25.298); with ours set the same,
    the logits agree to float32 rounding, and greedy tokens agree either way."""
    import mlx_lm

    theirs, their_tokenizer = mlx_lm.load(str(gemma_g128))
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the stored float16; compare like with like
    ours = engine_g128.model
    ids = engine_g128.encode(EIFFEL)
    assert their_tokenizer.encode(EIFFEL) == ids
    their_logits = np.array(theirs(mx.array([ids])).astype(mx.float32))
    exact = np.array(ours(mx.array([ids])))
    # Greedy tokens agree wherever the top two logits are further apart than the two models
    # differ (a near-tie, e.g. 0.003 apart against 0.03 of difference, is a coin toss), and
    # at the last position, where both say Paris.
    top2 = np.sort(exact[0], axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * np.abs(exact[0] - their_logits[0]).max(axis=-1)
    assert decided.sum() >= len(ids) - 2 and decided[-1]
    assert np.array_equal(exact[0].argmax(-1)[decided], their_logits[0].argmax(-1)[decided])
    assert exact[0, -1].argmax() == their_logits[0, -1].argmax() == PARIS
    scale = ours.model.embed_scale
    ours.model.embed_scale = float(mx.array(scale, dtype=mx.bfloat16).astype(mx.float32).item())
    try:
        rounded = np.array(ours(mx.array([ids])))
    finally:
        ours.model.embed_scale = scale
    np.testing.assert_allclose(rounded, their_logits, rtol=0, atol=1e-3 * np.abs(their_logits).max())
    assert np.abs(exact - their_logits).max() > np.abs(rounded - their_logits).max()  # the scale was the difference
