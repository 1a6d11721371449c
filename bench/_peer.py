"""The peer for CPU benches: transformers' Glm4MoeForCausalLM holding glmc's exact weights."""

from __future__ import annotations

import tempfile
import warnings

import torch

import glmc
from glmc.api import build_torch
from glmc.spec import ModelSpec


def glmc_and_transformers(spec: ModelSpec, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A seeded fp32 glmc model, and transformers loading the checkpoint glmc wrote of it."""
    import transformers

    ours = build_torch(spec, dtype=torch.float32, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        glmc.save_pretrained(ours, tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.Glm4MoeForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return ours, hf
