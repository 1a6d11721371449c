"""The Hugging Face target: glmc's in-memory weights <-> the `Glm4MoeForCausalLM` checkpoint layout
that transformers, vLLM and SGLang load (per-expert tensors, MTP layer at `num_layers + k`).

`hf_tensor_layout` says what a checkpoint holds; `to_hf` / `from_hf` are streaming, mutually
inverse weight transforms; `write_checkpoint` / `open_checkpoint` do the safetensors I/O.

Passed graphs (fused, sharded, FP8) describe other layouts: `plan_checkpoint` lists a rank's
tensors as pieces of the Hugging Face ("logical") tensors, `produce` makes them from a
`LogicalSource`, which in turn reads logical tensors back out of any unsharded layout;
`assemble` undoes sharding; `StreamingCheckpoint` / `StreamingWriter` keep conversion memory
bounded by a few tensors.
"""

from glmc.ir.naming import hf_name

from .assemble import assemble
from .fp8 import dequantize, quantize
from .layout import OutTensor, Piece, plan_checkpoint, rank_dir, ranks, unquantized_modules
from .logical import DictCheckpoint, LogicalSource, RawCheckpoint
from .names import HFTensor, hf_tensor_layout, hf_tensors
from .produce import produce
from .quant_config import quantization_config, recipe_of
from .safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    ST_TORCH,
    TORCH_DTYPES,
    Planned,
    SafetensorsCheckpoint,
    StreamingCheckpoint,
    StreamingWriter,
    open_checkpoint,
    shard_name,
    write_checkpoint,
    write_safetensors,
)
from .weights import TensorReader, check_finite, from_hf, to_hf

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "ST_TORCH",
    "TORCH_DTYPES",
    "DictCheckpoint",
    "HFTensor",
    "LogicalSource",
    "OutTensor",
    "Piece",
    "Planned",
    "RawCheckpoint",
    "SafetensorsCheckpoint",
    "StreamingCheckpoint",
    "StreamingWriter",
    "TensorReader",
    "assemble",
    "check_finite",
    "dequantize",
    "from_hf",
    "hf_name",
    "hf_tensor_layout",
    "hf_tensors",
    "open_checkpoint",
    "plan_checkpoint",
    "produce",
    "quantization_config",
    "quantize",
    "rank_dir",
    "ranks",
    "recipe_of",
    "shard_name",
    "to_hf",
    "unquantized_modules",
    "write_checkpoint",
    "write_safetensors",
]
