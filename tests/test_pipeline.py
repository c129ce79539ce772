"""Model-level AWQ on the real SmolLM2: folding, output format, mlx-lm interop, quality."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metal_marlin.calibration import (
    CalibrationBatch,
    calibration_tokens,
    kjv_first_chapters,
    load_activations,
    save_activations,
    wikipedia_text,
)
from metal_marlin.checkpoints.loader import load_model
from metal_marlin.cli import main as cli_main
from metal_marlin.eval import evaluation_windows, perplexity
from metal_marlin.pipeline import awq_quantize_model, block_groups, fold_scales
from metal_marlin.tokenizer import load_tokenizer

PROMPT = "The capital of France is"
TINY = dict(group_size=64, n_samples=4, seq_len=64, n_grid=5, verbose=False)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="session")
def eval_windows(tokenizer) -> np.ndarray:
    windows, _ = evaluation_windows(tokenizer, window=256, max_windows=3)
    return windows


def greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        logits = model(mx.array([ids]))
        ids.append(int(mx.argmax(logits[0, -1]).item()))
    return ids


# ---------------------------------------------------------------- folding


def test_folded_scales_leave_the_float_model_unchanged(smollm2, tokenizer) -> None:
    model = smollm2.model
    saved = dict(tree_flatten(model.parameters()))
    tokens = mx.array([tokenizer.encode(PROMPT, add_special_tokens=False)])
    before = model(tokens)
    rng = np.random.default_rng(0)
    try:
        for block in model.model.layers:
            groups = block_groups(block)
            widths = {g.name: _width(block, g) for g in groups}
            scales = {
                g.name: np.exp(rng.normal(0, 0.7, size=widths[g.name])).astype(np.float32)
                for g in groups
                if g.previous is not None
            }
            # SmolLM2 has 9 query heads on 3 KV heads: v -> o is scaled too, with tied scales
            (attn_o,) = [g for g in groups if g.name == "attn_o"]
            assert attn_o.previous == "self_attn.v_proj" and attn_o.tie is not None and attn_o.tie.group == 3
            keep = np.ones(widths["attn_o"], np.float32)
            scales["attn_o"] = attn_o.tie.tie(scales["attn_o"], keep, np)
            fold_scales(block, groups, scales)
        after = model(tokens)
        for name in ("q_proj", "v_proj", "o_proj"):
            key = f"model.layers.0.self_attn.{name}.weight"
            changed = np.abs(np.array(getattr(model.model.layers[0].self_attn, name).weight) - np.array(saved[key])).max()
            assert changed > 1e-3, name  # the weights really moved
        np.testing.assert_allclose(np.array(after), np.array(before), rtol=0, atol=2e-3 * float(mx.abs(before).max().item()))
        assert np.array_equal(np.argmax(np.array(after), -1), np.argmax(np.array(before), -1))
    finally:
        model.load_weights(list(saved.items()))


def test_head_tie_gives_one_scale_per_kv_channel_and_keeps_salient_sets_at_one() -> None:
    from metal_marlin.pipeline import HeadTie

    tie = HeadTie(n_kv_heads=2, group=3, head_dim=2)  # 6 query heads x 2 = 12 o_proj inputs
    s = np.arange(1, 13, dtype=np.float32)
    keep = np.ones(12, np.float32)
    keep[11] = 0.0  # a salient channel of KV channel (1, 1)
    tied = tie.tie(s, keep, np).reshape(2, 3, 2)
    assert np.allclose(tied[0, :, 0], np.exp(np.log([1, 3, 5]).mean())) and np.allclose(tied[0, :, 1], np.exp(np.log([2, 4, 6]).mean()))
    assert np.allclose(tied[1, :, 0], np.exp(np.log([7, 9, 11]).mean())) and np.all(tied[1, :, 1] == 1.0)
    assert np.array_equal(tie.per_kv_channel(tied.reshape(-1)), tied[:, 0, :].reshape(-1))
    tied_mx = tie.tie(mx.array(s), mx.array(keep), mx)  # the same on the GPU path
    np.testing.assert_allclose(np.array(tied_mx), tied.reshape(-1), rtol=1e-6)


def _width(block, group) -> int:
    from metal_marlin.pipeline import _module

    return _module(block, group.linears[0]).weight.shape[1]


# ---------------------------------------------------------------- output format


def test_output_folder_is_complete_and_mlx_layout(quantized_dir: Path) -> None:
    names = {p.name for p in quantized_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "quant_stats.json"} <= names
    assert not [n for n in names if "tmp" in n]
    config = json.loads((quantized_dir / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    stats = json.loads((quantized_dir / "quant_stats.json").read_text())
    assert len(stats["blocks"]) == 30 and stats["bits_per_weight"] == pytest.approx(4.5)
    assert stats["blocks_awq"] + stats["blocks_rtn"] == 30 and stats["blocks_awq"] >= 20
    first = stats["blocks"][0]
    assert first["block_output_error"] <= first["block_rtn_output_error"]
    q = first["linears"]["self_attn.q_proj"]
    assert len(q["scales"]) == 576 and q["alpha"] >= 0
    weights = mx.load(str(quantized_dir / "model.safetensors"))
    w = weights["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == mx.uint32 and w.shape == (576, 1536 * 4 // 32)
    assert weights["model.layers.0.mlp.down_proj.scales"].shape == (576, 1536 // 64)
    assert "lm_head.weight" not in weights  # tied embeddings stay tied


def test_quantized_model_matches_mlx_lm_greedy_tokens(quantized_dir: Path, tokenizer) -> None:
    import mlx_lm

    ours = load_model(quantized_dir).model
    theirs, their_tokenizer = mlx_lm.load(str(quantized_dir))
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the stored float16; compare like with like
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert their_tokenizer.encode(PROMPT) == ids
    our_logits = np.array(ours(mx.array([ids])))
    their_logits = np.array(theirs(mx.array([ids])).astype(mx.float32))
    np.testing.assert_allclose(our_logits, their_logits, rtol=0, atol=1e-3 * np.abs(their_logits).max())
    assert greedy(ours, ids, 6) == greedy(theirs, ids, 6)


def test_quantized_model_stays_close_to_the_original(quantized_dir: Path, smollm2, eval_windows) -> None:
    base = perplexity(smollm2.model, eval_windows).perplexity
    quant = perplexity(load_model(quantized_dir).model, eval_windows).perplexity
    assert base < quant < base * 1.35, (base, quant)


def test_awq_beats_round_to_nearest_at_3_bits(tmp_path: Path, eval_windows) -> None:
    """The product's promise on a real model: lower perplexity than plain rounding."""
    settings = dict(TINY, bits=3, salient_ratio=0.0)
    awq_quantize_model(None, tmp_path / "awq", **settings)
    awq_quantize_model(None, tmp_path / "rtn", method="rtn", **settings)
    ppl_awq = perplexity(load_model(tmp_path / "awq").model, eval_windows).perplexity
    ppl_rtn = perplexity(load_model(tmp_path / "rtn").model, eval_windows).perplexity
    assert ppl_awq < 0.95 * ppl_rtn, (ppl_awq, ppl_rtn)


def test_salient_channels_are_stored_and_served(tmp_path: Path, smollm2, tokenizer) -> None:
    # not a quality measurement: the smallest calibration that exercises the salient path
    stats = awq_quantize_model(None, tmp_path / "s", salient_ratio=0.01, **dict(TINY, n_samples=2, seq_len=32, n_grid=2))
    assert stats["bits_per_weight"] > 4.5
    weights = mx.load(str(tmp_path / "s" / "model.safetensors"))
    idx = weights["model.layers.3.mlp.down_proj.salient_indices"]
    assert idx.shape == (15,) and weights["model.layers.3.mlp.down_proj.salient_weight"].shape == (576, 15)
    model = load_model(tmp_path / "s").model
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert greedy(model, ids, 1)[-1] == greedy(smollm2.model, ids, 1)[-1]  # " Paris" survives


# ---------------------------------------------------------------- calibration data


def test_calibration_and_evaluation_splits_are_disjoint_and_fixed() -> None:
    calib, held_out = wikipedia_text("calibration"), wikipedia_text("evaluation")
    assert len(held_out) > 900 and len(calib) > 8 * len(held_out)
    assert not set(calib) & set(held_out)
    assert wikipedia_text("evaluation")[:3] == held_out[:3]


def test_out_of_domain_evaluation_text_is_the_kjv_first_chapters(tokenizer) -> None:
    windows, source = evaluation_windows(tokenizer, window=128, max_windows=2, corpus="kjv")
    assert windows.shape == (2, 128) and "King James" in source
    assert tokenizer.decode(windows[0, :6].tolist()).startswith("In the beginning God created")
    assert len(kjv_first_chapters()) == 66  # one chapter per book
    with pytest.raises(ValueError, match="corpus"):
        evaluation_windows(tokenizer, window=128, max_windows=1, corpus="bible")


def test_calibration_tokens_shape_and_errors(tokenizer, tmp_path: Path) -> None:
    ids = calibration_tokens(tokenizer, 3, 32)
    assert ids.shape == (3, 32) and ids.dtype == np.int32
    text = tmp_path / "t.txt"
    text.write_text("short text")
    with pytest.raises(ValueError, match="has only .* tokens"):
        calibration_tokens(tokenizer, 2, 512, text)
    with pytest.raises(ValueError, match="n_samples"):
        calibration_tokens(tokenizer, 0, 32)


def test_activations_file_round_trip_and_validation(tmp_path: Path) -> None:
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    good = tmp_path / "a.npz"
    save_activations(good, CalibrationBatch(ids, np.ones((2, 6, 8), np.float32)))
    batch = load_activations(good, hidden_size=8, vocab_size=100)
    assert np.array_equal(batch.input_ids, ids) and batch.hidden_states.shape == (2, 6, 8)

    cases = {
        "wrong_key": ({"tokens": ids}, "unexpected key"),
        "missing": ({"hidden_states": np.ones((2, 6, 8))}, "missing key 'input_ids'"),
        "shape": ({"input_ids": ids, "hidden_states": np.ones((2, 6, 9))}, "expected \\(2, 6, 8\\)"),
        "vocab": ({"input_ids": ids + 100}, "outside \\[0, 100\\)"),
        "float_ids": ({"input_ids": ids.astype(np.float32)}, "integer array"),
        "pickled": ({"input_ids": np.array([{"x": 1}], dtype=object)}, "pickled"),
    }
    for name, (arrays, pattern) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=pattern):
            load_activations(path, hidden_size=8, vocab_size=100)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a valid .npz"):
        load_activations(garbage, 8, 100)


# ---------------------------------------------------------------- eval and CLI


def test_perplexity_of_uniform_logits_is_the_vocabulary_size() -> None:
    vocab = 37
    result = perplexity(lambda tokens: mx.zeros((*tokens.shape, vocab)), np.zeros((3, 10), np.int32))
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)
    assert result.n_predicted_tokens == 27
    assert result.standard_error == pytest.approx(0.0, abs=1e-6)  # every window alike


def test_perplexity_standard_error_treats_windows_as_the_samples() -> None:
    """Window w's logits favour nothing (NLL log 8) or its target strongly; the standard error is
    the delta method over the four window means, not over the 36 tokens."""
    windows = np.array([[1] * 10, [2] * 10, [3] * 10, [4] * 10], np.int32)
    boost = {1: 0.0, 2: 2.0, 3: 0.0, 4: 2.0}

    def model(tokens: mx.array) -> mx.array:
        rows = [mx.zeros((tokens.shape[1], 8)).at[:, int(r[0].item())].add(boost[int(r[0].item())]) for r in tokens]
        return mx.stack(rows)

    result = perplexity(model, windows, batch_size=3)
    per_window = np.array([np.log(8) if b == 0 else np.log(7 + np.exp(b)) - b for b in boost.values()])
    assert result.mean_nll == pytest.approx(per_window.mean(), rel=1e-5)
    expected = np.exp(per_window.mean()) * per_window.std(ddof=1) / 2
    assert result.standard_error == pytest.approx(expected, rel=1e-4)


def test_cli_reports_user_errors_in_one_line(capsys, tmp_path: Path) -> None:
    assert cli_main(["quantize", "--output-path", str(tmp_path / "o"), "--group-size", "128", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["metal-marlin: error: group_size=128 does not divide in_features=576; choose a group_size that divides it (e.g. [32, 64])"]
    assert cli_main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_collect_writes_an_activations_file_the_pipeline_accepts(tmp_path: Path, smollm2, tokenizer) -> None:
    from metal_marlin.pipeline import _calibration_batch

    path = tmp_path / "activations.npz"
    assert cli_main(["collect", "--output", str(path), "--n-samples", "2", "--seq-len", "16", "--hidden-states"]) == 0
    batch, source = _calibration_batch(smollm2.model, tokenizer, path, None, 128, 512)
    assert batch.input_ids.shape == (2, 16) and batch.hidden_states.shape == (2, 16, 576)
    assert np.array_equal(batch.input_ids, calibration_tokens(tokenizer, 2, 16))
    expected = np.array(smollm2.model.model.embed_tokens(mx.array(batch.input_ids)))
    np.testing.assert_allclose(batch.hidden_states, expected, rtol=1e-3, atol=1e-3)  # stored as float16
    assert "activations file" in source


# ---------------------------------------------------------------- streaming


def test_streaming_reads_one_block_at_a_time_and_matches_the_eager_pipeline(tmp_path: Path, smollm2, tokenizer, monkeypatch) -> None:
    """awq_quantize_model asks for block i's tensors only after block i-1 was released, and
    its outputs and stats are those of quantize_loaded_model on the eagerly loaded model."""
    from metal_marlin import pipeline
    from metal_marlin.checkpoints import LazyCheckpoint, loader
    from metal_marlin.models.llama import LlamaModel

    events: list[tuple[str, int]] = []  # ("read", block or -1 outside the blocks) / ("released", block)

    class Spy:
        def __init__(self, source):
            self.source, self.names = source, source.names

        def tensor(self, name):
            events.append(("read", int(name.split(".")[2]) if name.startswith("model.layers.") else -1))
            return self.source.tensor(name)

    def spying_open(path=None):
        checkpoint = open_checkpoint(path)
        return LazyCheckpoint(checkpoint.config, checkpoint.metadata, Spy(checkpoint.tensors))

    open_checkpoint = loader.open_checkpoint
    monkeypatch.setattr(loader, "open_checkpoint", spying_open)
    outputs = {}  # every float32 output tensor, as the pipeline hands it to storage
    store = pipeline._storage_dtype
    monkeypatch.setattr(pipeline, "_storage_dtype", lambda name, value: store(name, outputs.setdefault(name, value)))
    settings = dict(bits=4, group_size=64, salient_ratio=0.01, method="rtn")
    stats = awq_quantize_model(
        None, tmp_path / "s", n_samples=2, seq_len=64, verbose=False,
        progress=lambda event: events.append(("writing", event["block"]) if event.get("stage") == "writing" else ("released", event["block"] - 1)),
        **settings,
    )

    expected = [("read", -1)] * 2  # the embedding (tied, so no lm_head) and the final norm
    for i in range(smollm2.config.num_hidden_layers):
        expected += [("read", i)] * 9 + [("released", i)]  # 2 norms and 7 linears, each read once
    expected.append(("writing", smollm2.config.num_hidden_layers))  # then the files are written
    assert events == expected

    # the eager path: the same float weights (the session model's, not released), same batch
    eager = LlamaModel(smollm2.config)
    eager.load_weights(list(tree_flatten(smollm2.model.parameters())))
    batch, _ = pipeline._calibration_batch(eager, tokenizer, None, None, 2, 64)
    tensors, eager_stats = pipeline.quantize_loaded_model(eager, batch, **settings)
    assert outputs.keys() == tensors.keys()
    for name, value in tensors.items():
        assert outputs[name].dtype == value.dtype, name
        np.testing.assert_array_equal(outputs[name], value, err_msg=name)

    def timeless(value):
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if k != "time_s"}
        return [timeless(v) for v in value] if isinstance(value, list) else value

    assert timeless(eager_stats) == {k: v for k, v in timeless(stats).items() if k in eager_stats}
    assert smollm2.model.model.layers[0].mlp.up_proj.weight.shape == (1536, 576)  # still loaded


def test_the_mlx_search_keeps_calibration_inputs_on_the_device_and_agrees_with_numpy(smollm2, tokenizer) -> None:
    """compute_backend="auto" picks MLX on a GPU, where the captured inputs stay MLX arrays:
    one block quantized that way chooses what the numpy search chooses, to float tolerance."""
    from metal_marlin import pipeline
    from metal_marlin.models.llama import DecoderBlock
    from metal_marlin.quant import QuantSpec

    ids = pipeline._calibration_batch(smollm2.model, tokenizer, None, None, 2, 64)[0].input_ids
    x = smollm2.model.model.embed_tokens(mx.array(ids)).astype(mx.float32)
    _, captured = pipeline._run_block(smollm2.model.layers[0], x, capture=True, xp=mx)
    assert all(isinstance(v, mx.array) and v.dtype == mx.float32 for v in captured.values())
    results = {}
    for name, xp in (("numpy", np), ("mlx", mx)):
        block = DecoderBlock(smollm2.config)
        block.load_weights(list(tree_flatten(smollm2.model.layers[0].parameters())))
        results[name] = pipeline._quantize_block(block, x, QuantSpec(bits=4, group_size=64), 0.0, "rms", 5, False, "awq", xp)[2]
    a, b = results["numpy"], results["mlx"]
    assert a["choice"] == b["choice"]
    assert b["block_output_error"] == pytest.approx(a["block_output_error"], rel=0.05)
    for path, stats in a["linears"].items():
        assert b["linears"][path]["alpha"] == pytest.approx(stats["alpha"], abs=0.21), path
