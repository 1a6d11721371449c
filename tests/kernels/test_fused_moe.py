"""Routed experts: the fused Triton MoE and the grouped-GEMM torch path against the plain-torch
MoE (forward and backward), and that reference against transformers' Glm4MoeExperts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glmc.kernels import moe_experts_ref, moe_experts_torch
from glmc.kernels.fused_moe import moe_experts_triton


def _case(tokens, hidden, inter, experts, top_k, dtype, seed, device, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    scores = torch.rand(tokens, experts, generator=g)
    if skew:
        scores = scores + torch.linspace(2, 0, experts) ** 4
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    grad = torch.randn(tokens, hidden, generator=g)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, gate_up, down)]
    return (*leaves, ids.to(device), weights.to(device).requires_grad_(), grad.to(device=device, dtype=dtype))


def _run(fn, x, gate_up, down, ids, weights, grad):
    out = fn(x, gate_up, down, ids, weights)
    grads = torch.autograd.grad((out.float() * grad.float()).sum(), (x, gate_up, down, weights))
    return [out, *grads]


def _reference(x, gate_up, down, ids, weights, grad):
    """The plain-torch MoE in fp64 on the same (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (x, gate_up, down, weights)]
    return _run(moe_experts_ref, leaves[0], leaves[1], leaves[2], ids, leaves[3], grad.double())


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


NAMES = ("out", "dx", "d_gate_up", "d_down", "d_weights")


def _check(fn, case, tol):
    ref = _reference(*case)
    got = _run(fn, *case)
    for name, a, b in zip(NAMES[:4], got[:4], ref[:4], strict=True):
        assert a.shape == b.shape, name
        assert _rel(a, b) <= tol, f"{name}: relative error {_rel(a, b):.2e} > {tol:.0e}"
    assert got[0].dtype == case[0].dtype
    # d_weights[t, j] = <grad[t], y_j[t]> is one dot product per entry and may cancel, so bound
    # its error the way a dot product's error is bounded: by |grad[t]| * |y_j[t]|.
    x, gate_up, down, ids, _, grad = case
    with torch.no_grad():
        ones = torch.ones(ids.shape[0], 1, dtype=torch.float64, device=ids.device)
        y_norm = torch.stack(
            [
                moe_experts_ref(x.double(), gate_up.double(), down.double(), ids[:, j : j + 1], ones).norm(
                    dim=1
                )
                for j in range(ids.shape[1])
            ],
            dim=1,
        )
    bound = tol * grad.double().norm(dim=1, keepdim=True) * y_norm + 1e-30
    err = (got[4].double() - ref[4]).abs()
    assert bool((err <= bound).all()), f"d_weights: error / bound up to {(err / bound).max().item():.2f}"


@settings(deadline=None)  # examples: the profile in tests/conftest.py
@given(
    tokens=st.sampled_from([1, 2, 9, 31]),
    hidden=st.sampled_from([16, 40, 64, 72]),
    inter=st.sampled_from([8, 24, 32, 48]),
    experts=st.integers(1, 9),
    top_k=st.integers(1, 4),
    skew=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_moe_matches_plain_torch_fp32(tokens, hidden, inter, experts, top_k, skew, seed, device):
    case = _case(tokens, hidden, inter, experts, min(top_k, experts), torch.float32, seed, device, skew)
    _check(moe_experts_triton, case, 2e-6)


@settings(deadline=None)  # examples: the profile in tests/conftest.py
@given(
    tokens=st.sampled_from([1, 7, 24]),
    hidden=st.sampled_from([16, 32, 64]),
    inter=st.sampled_from([16, 32]),
    experts=st.integers(1, 6),
    top_k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_torch_path_matches_plain_torch_fp32(tokens, hidden, inter, experts, top_k, seed):
    # 16-byte-aligned shapes take torch._grouped_mm, the others its Python fallback.
    case = _case(tokens, hidden, inter, experts, min(top_k, experts), torch.float32, seed, "cpu")
    _check(moe_experts_torch, case, 2e-6)


@pytest.mark.parametrize("fn", [moe_experts_triton, moe_experts_torch], ids=["triton", "torch"])
def test_bf16_within_rounding_of_fp64_reference(fn, device):
    dev = device if fn is moe_experts_triton else "cpu"
    case = _case(24, 64, 32, 6, 2, torch.bfloat16, 3, dev)
    # bf16 inputs, fp32 accumulation, bf16 intermediates: a few bf16 ulps (2^-8) of error.
    _check(fn, case, 1e-2)


@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k", "skew"),
    [
        (1, 32, 16, 8, 2, False),  # a single token
        (5, 24, 16, 4, 4, False),  # top-k = number of experts
        (40, 32, 16, 16, 1, True),  # most experts empty
        (17, 72, 40, 3, 2, False),  # sizes that are not multiples of any block
    ],
)
def test_edge_cases(tokens, hidden, inter, experts, top_k, skew, device):
    case = _case(tokens, hidden, inter, experts, top_k, torch.float32, 11, device, skew)
    _check(moe_experts_triton, case, 2e-6)
    cpu_case = _case(tokens, hidden, inter, experts, top_k, torch.float32, 11, "cpu", skew)
    _check(moe_experts_torch, cpu_case, 2e-6)


def test_no_tokens(device):
    x, gate_up, down, ids, weights, _ = _case(0, 16, 8, 4, 2, torch.float32, 0, device)
    for fn in (moe_experts_triton, moe_experts_torch, moe_experts_ref):
        out = fn(x.detach(), gate_up.detach(), down.detach(), ids, weights.detach())
        assert out.shape == (0, 16)


def test_inference_forward_skips_saving_preactivations(device):
    x, gate_up, down, ids, weights, _ = _case(9, 32, 16, 4, 2, torch.float32, 5, device)
    with torch.no_grad():
        out = moe_experts_triton(x, gate_up, down, ids, weights)
        ref = moe_experts_ref(x, gate_up, down, ids, weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reference_matches_transformers_experts():
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeExperts

    cfg = Glm4MoeConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2)
    hf = Glm4MoeExperts(cfg)
    x, gate_up, down, ids, weights, _ = _case(13, 32, 16, 6, 2, torch.float32, 2, "cpu")
    with torch.no_grad():
        hf.gate_up_proj.copy_(gate_up)
        hf.down_proj.copy_(down)
        want = hf(x.detach(), ids, weights.detach())
        got = moe_experts_ref(x.detach(), gate_up.detach(), down.detach(), ids, weights.detach())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
