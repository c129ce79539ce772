"""Read and write model checkpoints: GGUF (read), Hugging Face / MLX folders (read, write),
AutoAWQ GEMM folders (read, write)."""

from .autoawq import export_autoawq, import_autoawq
from .gguf_reader import GGUFCheckpoint, read_gguf, unpermute_qk
from .hf import SafetensorsFolder, read_hf_config, read_hf_metadata, read_hf_weights, save_hf_folder
from .loader import (
    LazyCheckpoint,
    LoadedModel,
    build_model,
    build_model_lazily,
    load_builtin_model,
    load_model,
    open_checkpoint,
)

__all__ = [
    "GGUFCheckpoint",
    "LazyCheckpoint",
    "LoadedModel",
    "SafetensorsFolder",
    "build_model",
    "build_model_lazily",
    "export_autoawq",
    "import_autoawq",
    "load_builtin_model",
    "load_model",
    "open_checkpoint",
    "read_gguf",
    "read_hf_config",
    "read_hf_metadata",
    "read_hf_weights",
    "save_hf_folder",
    "unpermute_qk",
]
