"""Read and write model checkpoints: GGUF (read), Hugging Face / MLX folders (read, write),
AutoAWQ GEMM folders (read, write)."""

from .autoawq import export_autoawq, import_autoawq
from .gguf_reader import read_gguf, unpermute_qk
from .hf import read_hf_config, read_hf_metadata, read_hf_weights, save_hf_folder
from .loader import LoadedModel, build_model, load_builtin_model, load_model

__all__ = [
    "LoadedModel",
    "build_model",
    "export_autoawq",
    "import_autoawq",
    "load_builtin_model",
    "load_model",
    "read_gguf",
    "read_hf_config",
    "read_hf_metadata",
    "read_hf_weights",
    "save_hf_folder",
    "unpermute_qk",
]
