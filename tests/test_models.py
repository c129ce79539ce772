"""The MLX Llama model against an independent float64 reference, cache, padding, layers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from metal_marlin.checkpoints import build_model
from metal_marlin.models import DecoderBlock, KVCache, LlamaConfig, LlamaModel, QuantizedLinear
from reference_llama import reference_forward, rel_err, rms_norm, silu

# "The capital of France is Paris. It is known for the Eiffel Tower and" (SmolLM2 vocab)
PROMPT = [504, 3575, 282, 4649, 314, 7042, 30, 657, 314, 1343, 327, 260, 414, 627, 299, 18669]
PARIS = 7042


def tiny_model(make_tiny, model_type="llama", **kw):
    cfg, weights = make_tiny(model_type, **kw)
    return build_model(LlamaConfig.from_hf_dict(cfg), weights), cfg, weights


def logits_np(model: LlamaModel, tokens, **kw) -> np.ndarray:
    return np.array(model(mx.array(tokens), **kw))


# --- the real model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt_logits(smollm2) -> np.ndarray:
    """Full-sequence logits of PROMPT (computed once: the CPU backend is slow)."""
    return logits_np(smollm2.model, [PROMPT])[0]


def test_smollm2_logits_match_float64_reference(smollm2, prompt_logits):
    model, config, _ = smollm2
    logits = prompt_logits
    assert logits.shape == (len(PROMPT), 49152) and logits.dtype == np.float32
    weights = dict(tree_flatten(model.parameters()))
    ref = reference_forward(config.to_hf_dict(), weights, PROMPT)
    err = rel_err(logits, ref)
    assert err < 1e-4, f"max|diff|/max|ref| = {err:.2e}"
    # Greedy tokens agree wherever the reference's top-2 margin exceeds the observed error
    # (a near-tie could legitimately flip); the margin test must leave most positions.
    diff = np.max(np.abs(logits - ref))
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * diff
    assert decided.sum() >= len(PROMPT) - 2
    np.testing.assert_array_equal(logits.argmax(-1)[decided], ref.argmax(-1)[decided])
    # and the model is the real, correctly wired SmolLM2: "...France is" -> " Paris"
    assert ref[4].argmax() == PARIS


def test_kv_cache_decoding_equals_full_forward(smollm2, prompt_logits):
    model = smollm2.model
    n = 10  # causal: the first n rows of the full forward are the n-token forward
    cache = model.make_cache(step=4)  # small step: the buffers grow several times
    pieces = [np.array(model(mx.array([PROMPT[:4]]), cache))[0]]
    for t in PROMPT[4:n]:
        pieces.append(np.array(model(mx.array([[t]]), cache))[0])
    stepped = np.concatenate(pieces)
    assert cache[0].offset == n and cache[0].capacity == 12
    assert rel_err(stepped, prompt_logits[:n]) < 1e-5


# --- the cache itself -------------------------------------------------------------------

def test_kv_cache_preallocates_in_steps_and_trims():
    cache = KVCache(step=8)
    k = mx.arange(2 * 3 * 5 * 4, dtype=mx.float32).reshape(2, 3, 5, 4)
    keys, values = cache.update_and_fetch(k, -k)
    assert cache.offset == 5 and cache.capacity == 8 and keys.shape == (2, 3, 5, 4)
    for _ in range(3):  # 5 -> 8 fits without reallocating
        buffer = cache.keys
        cache.update_and_fetch(k[:, :, :1], -k[:, :, :1])
    assert cache.capacity == 8 and cache.keys is buffer
    keys, values = cache.update_and_fetch(k[:, :, :2], -k[:, :, :2])  # 10 > 8: grows to 16
    assert cache.capacity == 16 and cache.offset == 10
    np.testing.assert_array_equal(np.array(keys[:, :, :5]), np.array(k))
    np.testing.assert_array_equal(np.array(values[:, :, 8:]), -np.array(k[:, :, :2]))
    assert cache.trim(3) == 3 and cache.offset == 7
    keys, _ = cache.update_and_fetch(k[:, :, 4:5], k[:, :, 4:5])  # overwrites slot 7
    np.testing.assert_array_equal(np.array(keys[:, :, 7]), np.array(k[:, :, 4]))
    assert cache.trim(100) == 8 and cache.offset == 0


def test_trim_then_redecode_matches(make_tiny):
    model, _, _ = tiny_model(make_tiny)
    tokens = [5, 9, 17, 3, 44, 81, 2, 7]
    full = logits_np(model, [tokens])[0]
    cache = model.make_cache(step=4)
    model(mx.array([tokens[:6] + [99, 98]]), cache)  # two wrong tokens
    for c in cache:
        c.trim(2)
    out = np.array(model(mx.array([tokens[6:]]), cache))[0]
    assert rel_err(out, full[6:]) < 1e-5


# --- left-padded batches ----------------------------------------------------------------

def test_left_padded_batch_matches_single_sequences(make_tiny):
    model, _, _ = tiny_model(make_tiny)
    a, b = [7, 3, 90, 11, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9]
    pad = len(b) - len(a)
    batch = mx.array([[0] * pad + a, b])
    cache = model.make_cache(step=4)
    out = np.array(model(batch, cache, left_padding=[pad, 0]))
    ref_a, ref_b = logits_np(model, [a])[0], logits_np(model, [b])[0]
    assert rel_err(out[0, pad:], ref_a) < 1e-5
    assert rel_err(out[1], ref_b) < 1e-5
    # decoding continues per row with the same left_padding
    for step, (ta, tb) in enumerate([(40, 41), (50, 51), (60, 61)]):
        a, b = a + [ta], b + [tb]
        out = np.array(model(mx.array([[ta], [tb]]), cache, left_padding=[pad, 0]))
        assert rel_err(out[0, 0], logits_np(model, [a])[0, -1]) < 1e-5, step
        assert rel_err(out[1, 0], logits_np(model, [b])[0, -1]) < 1e-5, step


# --- blocks for calibration -------------------------------------------------------------

def test_block_by_block_equals_model_and_is_causal(make_tiny):
    model, cfg, weights = tiny_model(make_tiny)
    tokens = mx.array([[4, 8, 15, 16, 23, 42], [1, 1, 2, 3, 5, 8]])
    h = model.model.embed_tokens(tokens)
    assert h.dtype == mx.float32
    for block in model.model.layers:
        assert isinstance(block, DecoderBlock)
        h = block(h)  # default mask is causal, no cache
    np.testing.assert_allclose(
        np.array(model.lm_logits(model.model.norm(h))), np.array(model(tokens)), rtol=0, atol=1e-5
    )
    # causal: changing the last token leaves every earlier position's output unchanged
    x = model.model.embed_tokens(tokens)
    y = model.model.embed_tokens(mx.array([[4, 8, 15, 16, 23, 99], [1, 1, 2, 3, 5, 99]]))
    block = model.model.layers[0]
    out_x, out_y = np.array(block(x)), np.array(block(y))
    np.testing.assert_allclose(out_x[:, :-1], out_y[:, :-1], rtol=0, atol=1e-6)
    assert np.abs(out_x[:, -1] - out_y[:, -1]).max() > 1e-2
    # mask=None really attends to the future (so "causal" above was doing something)
    assert np.abs(np.array(block(x, mask=None))[:, 0] - out_x[:, 0]).max() > 1e-3


def test_block_capture_gives_each_linear_group_input(make_tiny):
    model, cfg, w = tiny_model(make_tiny)
    block = model.model.layers[1]
    x = mx.random.normal((2, 7, 64), key=mx.random.key(1))
    out, inputs = block.capture(x)
    np.testing.assert_allclose(np.array(out), np.array(block(x)), rtol=0, atol=1e-6)
    xn = np.array(x, dtype=np.float64)
    p = "model.layers.1."
    attn_in = rms_norm(xn, w[p + "input_layernorm.weight"], cfg["rms_norm_eps"])
    np.testing.assert_allclose(np.array(inputs["attn_input"]), attn_in, atol=1e-5)
    assert inputs["o_proj_input"].shape == (2, 7, 64)
    h = xn + np.array(inputs["o_proj_input"], dtype=np.float64) @ w[p + "self_attn.o_proj.weight"].T
    mlp_in = rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])
    np.testing.assert_allclose(np.array(inputs["mlp_input"]), mlp_in, atol=1e-4)
    gate, up = (mlp_in @ w[p + f"mlp.{n}_proj.weight"].T for n in ("gate", "up"))
    gated = silu(gate) * up
    np.testing.assert_allclose(np.array(inputs["down_proj_input"]), gated, atol=1e-4)
    expected_out = h + gated @ w[p + "mlp.down_proj.weight"].T
    np.testing.assert_allclose(np.array(out), expected_out, atol=1e-4)


# --- architecture variants against the reference ----------------------------------------

@pytest.mark.parametrize(
    "model_type,kw",
    [
        ("llama", {"tie": False}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        (
            "llama",
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        ),
    ],
)
def test_variants_match_reference(make_tiny, model_type, kw):
    model, cfg, weights = tiny_model(make_tiny, model_type, **kw)
    tokens = np.random.default_rng(3).integers(0, 128, 24).tolist()
    err = rel_err(logits_np(model, [tokens])[0], reference_forward(cfg, weights, tokens))
    assert err < 1e-5, err


def test_parameter_names_are_hugging_face_names(make_tiny):
    for model_type, kw in [("llama", {"tie": True}), ("llama", {"tie": False}),
                           ("qwen2", {}), ("qwen3", {})]:
        model, _, weights = tiny_model(make_tiny, model_type, **kw)
        assert set(dict(tree_flatten(model.parameters()))) == set(weights)
    model, _, _ = tiny_model(make_tiny, tie=True)
    assert "lm_head" not in model


def test_rope_scaling_really_changes_logits(make_tiny):
    # guards against the variants test passing because scaling is silently ignored
    tokens = list(range(1, 40))
    plain, _, _ = tiny_model(make_tiny)
    scaled, _, _ = tiny_model(make_tiny, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert rel_err(logits_np(scaled, [tokens]), logits_np(plain, [tokens])) > 1e-3


# --- config -----------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_config_round_trip(make_tiny, model_type):
    cfg, _ = make_tiny(model_type, tie=False, bos_token_id=1, torch_dtype="bfloat16")
    config = LlamaConfig.from_hf_dict(cfg)
    assert config.attention_bias == (model_type == "qwen2")
    assert config.qk_norm == (model_type == "qwen3")
    d = config.to_hf_dict()
    assert d["model_type"] == model_type and d["bos_token_id"] == 1
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    assert d["architectures"] == [architecture]
    assert LlamaConfig.from_hf_dict(d) == config


def test_config_defaults_and_quantization_not_carried(make_tiny):
    cfg, _ = make_tiny()
    del cfg["head_dim"], cfg["num_key_value_heads"]
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    config = LlamaConfig.from_hf_dict(cfg)
    assert config.head_dim == 16 and config.num_key_value_heads == 4
    assert "quantization" not in config.to_hf_dict()


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"model_type": "gpt2"}, "gpt2"),
        ({"model_type": "gemma3_text"}, "gemma3_text"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_unsupported_config_raises_naming_it(make_tiny, change, needle):
    cfg, _ = make_tiny()
    cfg.update(change)
    with pytest.raises(ValueError, match=needle):
        LlamaConfig.from_hf_dict(cfg)


# --- quantized linear -------------------------------------------------------------------

def _quantized_layer(w: mx.array, group: int, bits: int) -> QuantizedLinear:
    layer = QuantizedLinear(w.shape[1], w.shape[0], group_size=group, bits=bits)
    layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size=group, bits=bits)
    return layer


@pytest.mark.parametrize("group,bits", [(64, 4), (32, 3), (128, 8), (64, 2)])
def test_quantized_linear_equals_quantized_matmul(group, bits):
    w = mx.random.normal((48, 256), key=mx.random.key(0))
    x = mx.random.normal((2, 5, 256), key=mx.random.key(1))
    layer = _quantized_layer(w, group, bits)
    expected = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases,
                                   transpose=True, group_size=group, bits=bits)
    np.testing.assert_array_equal(np.array(layer(x)), np.array(expected))
    # and the kernel really computes x @ dequant(W).T
    deq = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, group, bits), np.float64)
    assert rel_err(layer(x), np.array(x, np.float64) @ deq.T) < 1e-5


def test_quantized_linear_salient_path_adds_exactly_the_side_matmul():
    w = mx.random.normal((48, 256), key=mx.random.key(2))
    x = mx.random.normal((3, 256), key=mx.random.key(3))
    layer = _quantized_layer(w, 64, 4)
    base = np.array(layer(x), np.float64)
    idx = np.array([3, 17, 64, 200, 255], np.int32)
    ws = np.random.default_rng(0).standard_normal((48, 5)).astype(np.float32)
    layer.salient_indices = mx.array(idx)
    layer.salient_weight = mx.array(ws)
    side = np.array(x, np.float64)[..., idx] @ ws.astype(np.float64).T
    np.testing.assert_allclose(np.array(layer(x), np.float64) - base, side, atol=1e-5)
    assert np.abs(side).max() > 1.0  # the side path is not negligible


def _pack_uint32(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing, little-endian bit order along the input dim (bits dividing 32)."""
    per_word = 32 // bits
    q = q.astype(np.uint64).reshape(q.shape[0], -1, per_word)
    shifts = (np.arange(per_word, dtype=np.uint64) * bits)[None, None, :]
    return (q << shifts).sum(axis=-1).astype(np.uint32)


def test_group_256_via_repeated_scales_equals_dequantized_matmul():
    rng = np.random.default_rng(4)
    out_f, in_f, bits = 24, 512, 4
    q = rng.integers(0, 16, (out_f, in_f))
    scales = rng.uniform(0.01, 0.1, (out_f, in_f // 256)).astype(np.float32)
    biases = rng.uniform(-0.5, 0.5, (out_f, in_f // 256)).astype(np.float32)
    w = np.repeat(scales, 256, axis=1) * q + np.repeat(biases, 256, axis=1)
    layer = QuantizedLinear(in_f, out_f, group_size=256, bits=bits)
    layer.weight = mx.array(_pack_uint32(q, bits))
    layer.scales, layer.biases = mx.array(scales), mx.array(biases)
    assert layer.scales.shape == (out_f, 2)  # stored at 256
    x = rng.standard_normal((3, in_f)).astype(np.float32)
    assert rel_err(layer(mx.array(x)), x.astype(np.float64) @ w.T) < 1e-5


def test_quantized_layer_rejects_bad_group_size():
    with pytest.raises(ValueError, match="576"):
        QuantizedLinear(576, 64, group_size=128)
    with pytest.raises(ValueError, match="group size 48"):
        QuantizedLinear(96, 64, group_size=48)


def test_from_linear_round_to_nearest_is_close():
    lin = nn.Linear(128, 32)
    q = QuantizedLinear.from_linear(lin, group_size=32, bits=8)
    x = mx.random.normal((4, 128), key=mx.random.key(5))
    assert rel_err(q(x), lin(x)) < 1e-2


def test_dense_cpu_weight_copies_compute_what_the_int4_kernels_compute() -> None:
    from metal_marlin.models.layers import cache_dense_cpu_weights, dense_cpu_weight_bytes

    mx.random.seed(3)
    holder = nn.Module()
    holder.proj = QuantizedLinear.from_linear(nn.Linear(256, 96), group_size=64, bits=4)
    holder.embed = nn.QuantizedEmbedding(500, 128, group_size=64, bits=4)
    x = mx.random.normal((5, 256))
    h = mx.random.normal((2, 128))
    before_proj, before_head = holder.proj(x), holder.embed.as_linear(h)
    saved = {k for k, _ in tree_flatten(holder.parameters())}

    added = cache_dense_cpu_weights(holder)
    assert added == (96 * 256 + 500 * 128) * 4 == dense_cpu_weight_bytes(holder)
    assert cache_dense_cpu_weights(holder) == 0  # idempotent
    assert {k for k, _ in tree_flatten(holder.parameters())} == saved  # never saved with the model
    np.testing.assert_allclose(np.array(holder.proj(x)), np.array(before_proj), rtol=1e-4, atol=1e-4)
    dense_head = h @ holder.embed["_dense_weight"].T
    np.testing.assert_allclose(np.array(dense_head), np.array(before_head), rtol=1e-4, atol=1e-4)


def test_compiled_decode_steps_equal_the_eager_ones(monkeypatch) -> None:
    """The GPU's compiled decode block (forced here on the CPU) computes what the eager
    block computes, for one sequence and for a left-padded batch."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from _models import llama_config, random_quantized_llama

    from metal_marlin.models import llama

    cfg = llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=512)
    model = random_quantized_llama(cfg, mx.float32)

    def decode(compiled: bool, left_padding):
        monkeypatch.setattr(llama, "compiled_decode_enabled", lambda: compiled)
        cache = model.make_cache()
        rows = 1 if left_padding is None else len(left_padding)
        logits = model(mx.array([[5, 6, 7, 8, 9]] * rows), cache, left_padding=left_padding)
        steps = []
        for _ in range(3):
            logits = model(mx.argmax(logits[:, -1], axis=-1)[:, None], cache, left_padding=left_padding)
            steps.append(logits)
        mx.eval(steps)
        return steps

    for pads in (None, [0, 2]):
        for eager, compiled in zip(decode(False, pads), decode(True, pads)):
            assert mx.allclose(eager, compiled, atol=1e-5, rtol=1e-5)
    assert model.layers[0]._compiled is not None
