"""Tokenizer rebuilt from the built-in SmolLM2 GGUF, its saved folder, and chat templates."""

from __future__ import annotations

import gguf
import pytest
from tokenizers import pre_tokenizers

from metal_marlin.assets import builtin_model_path
from metal_marlin.generate.chat import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    apply_chat_template,
    encode_chat,
    normalize_messages,
    render_chat_template,
)
from metal_marlin.tokenizer import Tokenizer, read_gguf_metadata

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 ≈ π.",
    "  two  leading spaces,   three inside, trailing   ",
    "line one\nline two\n\n\tindented\r\nwindows line",
    "naïve café, Straße, Ελληνικά, русский",
    "中文测试：你好，世界！日本語のテキスト。한국어",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷 and ❤️",
    "code: def f(x):\n    return x**2  # square\n",
    "mixed<|im_start|>user\nspecial<|im_end|> tokens",
    "",
    " ",
    "123456789012345678901234567890",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(builtin_model_path())


@pytest.fixture(scope="module")
def saved_folder(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save(folder)
    return folder


def test_smollm2_special_tokens(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.bos_token_id == 1 and tok.bos_token == "<|im_start|>"
    assert tok.eos_token_id == 2 and tok.eos_token_ids == {2}
    assert tok.unk_token_id == 0 and tok.pad_token_id == 2
    assert tok.add_bos_token is False
    assert set(range(17)) == set(tok.all_special_ids)  # <|endoftext|> ... <empty_output>
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template


def test_smollm2_pretokenizer_splits_digits_and_keeps_spaces(tok: Tokenizer) -> None:
    ids = tok.encode("12345 apples in 2024")
    pieces = [tok.id_to_token(i) for i in ids]
    # Every digit is its own token (Digits(individual_digits=True)); no prefix space is added.
    assert pieces == ["1", "2", "3", "4", "5", "Ġapples", "Ġin", "Ġ", "2", "0", "2", "4"]
    assert tok.encode("Hello world") == [19556, 905]  # regression value, no BOS
    assert [tok.id_to_token(i) for i in tok.encode(" leading")] == ["Ġleading"]
    # GPT-2's "\s+(?!\S)": a whitespace run before a word leaves its last char to that word.
    assert [tok.id_to_token(i) for i in tok.encode("\n\n")] == ["ĊĊ"]
    assert [tok.id_to_token(i) for i in tok.encode("a\n\nb")] == ["a", "Ċ", "Ċ", "b"]


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_special_tokens_skipped_on_request(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids == [1, 4093, 198, 6004, 2]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_transformers_and_mlx_lm_load_the_saved_folder(tok: Tokenizer, saved_folder) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved_folder))
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == text
    assert hf.bos_token == "<|im_start|>" and hf.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        apply_chat_template(tok, messages)
    )

    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    wrapper = tokenizer_utils.load(saved_folder)
    assert wrapper.eos_token_ids == {2}
    assert type(wrapper.detokenizer).__name__ == "BPEStreamingDetokenizer"
    assert wrapper.encode("12 ab") == tok.encode("12 ab")


def test_from_folder_matches_gguf(tok: Tokenizer, saved_folder) -> None:
    again = Tokenizer.from_folder(saved_folder)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.chat_template == tok.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.eos_token_ids) == (1, 2, {2})
    assert again.add_bos_token is False
    assert again.all_special_ids == tok.all_special_ids


def test_from_folder_reads_generation_config_eos(saved_folder, tmp_path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((saved_folder / name).read_bytes())
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [0, 2]}')
    assert Tokenizer.from_folder(tmp_path).eos_token_ids == {0, 2}


def _tiny_gguf(path, *, model: str = "gpt2", pre: str = "smollm", add_bos: bool = True) -> None:
    """A byte-level BPE vocabulary: the 256 byte symbols, two merges, BOS/EOS control tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, "ab", "Ġab", "<s>", "</s>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_metadata_reader_agrees_with_gguf_reader(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    ours = read_gguf_metadata(path)
    reader = gguf.GGUFReader(str(path))
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours == theirs
    # A reader someone already opened works as a source too, and so do prefix-less fields.
    expected = Tokenizer.from_gguf(path).encode("ab ab")
    assert Tokenizer.from_gguf(reader).encode("ab ab") == expected
    stripped = {k.removeprefix("tokenizer.ggml."): v for k, v in ours.items() if k.startswith("tokenizer.ggml.")}
    again = Tokenizer.from_gguf_metadata(stripped, chat_template="T")
    assert again.encode("ab ab") == expected and again.chat_template == "T"


def test_bos_added_when_gguf_asks(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    tiny = Tokenizer.from_gguf(path)
    bos, eos = tiny.bos_token_id, tiny.eos_token_id
    assert tiny.encode("ab ab") == [bos, 256, 257]
    assert tiny.encode("ab ab", add_special_tokens=False) == [256, 257]
    assert tiny.decode(tiny.encode("ab ab"), skip_special_tokens=True) == "ab ab"
    # A template that writes bos_token itself must not get a second BOS.
    ids = encode_chat(tiny, [{"role": "user", "content": "ab"}])
    assert ids == [bos, 256] and eos in tiny.eos_token_ids

    folder = tmp_path / "saved"
    tiny.save(folder)
    assert Tokenizer.from_folder(folder).encode("ab ab") == [bos, 256, 257]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf("ab ab")["input_ids"] == [bos, 256, 257]  # exactly one BOS there too


def test_unsupported_gguf_tokenizers_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    path = tmp_path / "odd.gguf"
    _tiny_gguf(path, pre="made-up-pre")
    with pytest.raises(ValueError, match="'made-up-pre'"):
        Tokenizer.from_gguf(path)
    with pytest.raises(ValueError, match="not a GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"nope" * 10)
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


# ---------------------------------------------------------------- chat templates


def test_smollm2_template_inserts_default_system_prompt(tok: Tokenizer) -> None:
    text = apply_chat_template(tok, [{"role": "user", "content": "Hi there"}])
    assert text == (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_smollm2_template_keeps_given_system_and_history(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = apply_chat_template(tok, messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi\nthere<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_chatml_fallback_without_template(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.backend, bos_token_id=1, eos_token_id=2)
    text = apply_chat_template(bare, [{"role": "developer", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat_template(CHATML_TEMPLATE, [], add_generation_prompt=False) == ""


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "at least one"),
        ("hello", "must be a list"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user"}], r"messages\[0\]\.content is required"),
        ([{"role": "user", "content": 5}], "string or a list"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "'image_url'"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]"),
    ],
)
def test_invalid_messages(messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalize_messages(messages)


def test_assistant_tool_call_without_content_is_allowed() -> None:
    msgs = normalize_messages([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])
    assert msgs[0]["content"] == ""


def test_template_errors_and_sandbox() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="only user roles"):
        render_chat_template("{{ raise_exception('only user roles') }}", msgs)
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", msgs)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", msgs)
    out = render_chat_template(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content | tojson }}{% endfor %}",
        msgs + msgs,
    )
    assert out == '"x"'
