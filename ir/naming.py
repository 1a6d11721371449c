"""Checkpoint spelling of IR names: the multi-token-prediction (MTP) layer renaming.

The IR calls MTP layer k `model.mtp.{k}` (it is not a decoder layer of the trunk); Hugging
Face checkpoints (DeepSeek-V3 and GLM-4.5 alike) store it as decoder layer
`model.layers.{num_layers + k}`, which is what transformers, vLLM, SGLang and TensorRT-LLM
look up. Every other name is spelled the same in both. The FP8 scale names are the other
checkpoint naming rule; they live with the recipes (quant.scale_suffix).
"""

from __future__ import annotations

import re

_IR_MTP = re.compile(r"^model\.mtp\.(\d+)(\..*)?$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)(\..*)?$")


def hf_name(ir_name: str, num_layers: int) -> str:
    """The checkpoint name of an IR node or parameter name (MTP layer k -> layer num_layers + k)."""
    m = _IR_MTP.match(ir_name)
    if m is None:
        return ir_name
    return f"model.layers.{num_layers + int(m.group(1))}{m.group(2) or ''}"


def ir_name(hf: str, num_layers: int) -> str:
    """The inverse of `hf_name`: decoder layer num_layers + k of a checkpoint -> `model.mtp.{k}`."""
    layer = hf_layer(hf)
    if layer < num_layers:
        return hf
    m = _HF_LAYER.match(hf)
    assert m is not None
    return f"model.mtp.{layer - num_layers}{m.group(2) or ''}"


def hf_layer(hf: str) -> int:
    """The decoder-layer index of a checkpoint name (`model.layers.{i}...`), -1 for any other."""
    m = _HF_LAYER.match(hf)
    return int(m.group(1)) if m else -1
