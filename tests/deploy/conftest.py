"""One tiny model, built once per session for every deployment target (about three minutes on
2 cores, mostly the ONNX exports and the two AOTInductor compiles)."""

import os
from dataclasses import dataclass
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


@dataclass
class VerifyCase:
    """A greedy round's verify after a prefill of two 6-token rows (`prompt`, and the MTP layer
    over it): row 0's two drafts are the trunk's own picks (both accepted), row 1's are not
    (none accepted), so the rows' MTP catch-ups stop at different positions. `before`: the
    caches the verify reads, flat (k, v per trunk layer, then the MTP layer's); `want` and
    `after`: `greedy_verify_static`'s outputs and the caches it left."""

    prompt: torch.Tensor
    ids: torch.Tensor
    pos: torch.Tensor
    before: list[torch.Tensor]
    want: tuple[torch.Tensor, ...]
    after: list[torch.Tensor]

    def prefill(self, steps) -> None:
        """The same prefill through a backend's steps (glmc.runtime.steps.Steps)."""
        pos = torch.arange(6).expand(2, 6).contiguous()
        _, h = steps.trunk(self.prompt, pos, prefill=True)
        steps.mtp(self.prompt.roll(-1, 1), h, pos, prefill=True)

    def check(self, got) -> None:
        """An exported verify step's outputs (the six of greedy_verify_static, then the caches)."""
        assert torch.equal(got[1], self.want[1])
        for i in (0, 2, 3, 4):  # best, trunk_ok, draft, draft_ok
            assert torch.equal(got[i], self.want[i]), i
        torch.testing.assert_close(got[5], self.want[5], rtol=1e-4, atol=1e-4)
        for out, ref in zip(got[6:], self.after, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="session")
def verify_case(reference) -> VerifyCase:
    g = torch.Generator().manual_seed(5)
    cache = reference.static_cache(2, 64)
    mcache = reference.static_cache(2, 64, mtp=True)[0]
    with torch.no_grad():
        prompt = torch.randint(0, 512, (2, 6), generator=g)
        _, h = reference.forward_static(prompt, torch.arange(6).expand(2, 6), cache)
        reference.mtp_static(prompt.roll(-1, 1), h, torch.arange(6).expand(2, 6), mcache)
        ids = torch.randint(0, 512, (2, 3), generator=g)
        pos = torch.tensor([[5, 6, 7], [5, 6, 7]])
        for i in (1, 2):  # row 0's drafts become what the trunk picks
            trial = [(k.clone(), v.clone()) for k, v in cache]
            ids[0, i] = reference.forward_static(ids, pos, trial)[0][0, i - 1].argmax()
        before = [t.clone() for kv in cache for t in kv] + [t.clone() for t in mcache]
        want = reference.greedy_verify_static(ids, pos, cache, mcache)
    assert want[1].tolist() == [2, 0]
    return VerifyCase(prompt, ids, pos, before, want, [*(t for kv in cache for t in kv), *mcache])
