"""One tiny model, built once per session for every deployment target (about three minutes on
2 cores, mostly the ONNX exports and the two AOTInductor compiles)."""

import os
from pathlib import Path

import pytest
import torch

import glmc
from glmc import presets
from glmc.api import build_torch

ALL_TARGETS = ["torch", "hf", "trtllm", "onnx", "aoti", "torch-trt"]


def tiny_model(seed: int = 7, **overrides):
    """glm-tiny (dense + MoE layers, group-limited routing, QK-norm, MTP) with a non-zero
    correction bias, so exports are checked on routing the bias actually changes."""
    spec = presets.get("glm-tiny")
    if overrides:
        spec = glmc.ModelSpec.from_dict({**spec.model_dump(mode="json"), **overrides})
    m = build_torch(spec, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return m


@pytest.fixture(scope="session")
def make_tiny():
    return tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    glmc.save_pretrained(tiny_model(), path)
    return path


@pytest.fixture(scope="session")
def built(tmp_path_factory, tiny_checkpoint) -> Path:
    """`glmc build CKPT --weights CKPT --emit <all> --dtype f32` through the Python API."""
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    out = tmp_path_factory.mktemp("build") / "out"
    glmc.build(tiny_checkpoint, out, weights=tiny_checkpoint, emit=ALL_TARGETS, dtype="f32")
    return out


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """The glmc torch model the artifacts must reproduce."""
    return glmc.from_pretrained(tiny_checkpoint)
