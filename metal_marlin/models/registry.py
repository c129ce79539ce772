"""Which model class serves which checkpoint: by Hugging Face ``model_type`` (or config class).

The loader, the pipeline and the engine go through here, so a new architecture is one entry
in :data:`ARCHITECTURES` and nothing else outside its module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Union

from .gemma3 import MODEL_TYPE as GEMMA3_MODEL_TYPE
from .gemma3 import Gemma3Config, Gemma3Model
from .llama import SUPPORTED_MODEL_TYPES as LLAMA_MODEL_TYPES
from .llama import LlamaConfig, LlamaModel

ModelConfig = Union[LlamaConfig, Gemma3Config]


class Architecture(NamedTuple):
    config_class: type
    model_class: type[LlamaModel]
    model_types: tuple[str, ...]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(LlamaConfig, LlamaModel, LLAMA_MODEL_TYPES),
    Architecture(Gemma3Config, Gemma3Model, (GEMMA3_MODEL_TYPE,)),
)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHITECTURES for t in a.model_types)


def config_from_hf_dict(d: Mapping[str, Any]) -> ModelConfig:
    """The config object of a ``config.json`` dict; ValueError naming an unsupported ``model_type``."""
    model_type = d.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch.config_class.from_hf_dict(d)
    raise ValueError(
        f"unsupported model_type {model_type!r} (architectures {d.get('architectures')}); "
        f"supported: {SUPPORTED_MODEL_TYPES}"
    )


def model_for_config(config: ModelConfig) -> LlamaModel:
    """A freshly initialised model of ``config``'s architecture (weights still to load)."""
    for arch in ARCHITECTURES:
        if type(config) is arch.config_class:
            return arch.model_class(config)
    raise TypeError(f"no model class for config type {type(config).__name__}")
