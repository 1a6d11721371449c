"""The Hugging Face target: glmc's in-memory weights <-> the `Glm4MoeForCausalLM` checkpoint layout
that transformers, vLLM and SGLang load (per-expert tensors, MTP layer at `num_layers + k`).

`hf_tensor_layout` says what a checkpoint holds; `to_hf` / `from_hf` are streaming, mutually
inverse weight transforms; `write_checkpoint` / `open_checkpoint` do the safetensors I/O.
"""

from .names import HFTensor, Part, hf_name, hf_tensor_layout, hf_tensors
from .safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsCheckpoint,
    open_checkpoint,
    shard_name,
    write_checkpoint,
)
from .weights import TORCH_DTYPES, TensorReader, from_hf, to_hf

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "TORCH_DTYPES",
    "HFTensor",
    "Part",
    "SafetensorsCheckpoint",
    "TensorReader",
    "from_hf",
    "hf_name",
    "hf_tensor_layout",
    "hf_tensors",
    "open_checkpoint",
    "shard_name",
    "to_hf",
    "write_checkpoint",
]
