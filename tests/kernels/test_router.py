"""Router: the reference against transformers, the fused Triton kernel against the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glmc.kernels import route_ref
from glmc.kernels.router import check_route_args, route_triton


def _choice_scores(x, w, bias, n_group, topk_group):
    """Selection scores as the reference computes them (fp32, group-masked)."""
    s = (x.float() @ w.float().t()).sigmoid()
    c = s if bias is None else s + bias.float()
    e = w.shape[0]
    if n_group > 1:
        g = c.view(-1, n_group, e // n_group)
        gs = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter(1, gs.topk(topk_group, -1).indices, True)
        c = g.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, e)
    return c


def assert_same_routing(ids, w, ids_ref, w_ref, choice, atol=1e-6, rtol=1e-5):
    """Same expert sets and weights per token. A row may pick a different set only when both sets
    are equally good under the reference's selection scores (a tie within float rounding)."""
    assert ids.shape == ids_ref.shape and ids.dtype == torch.int64
    order, order_ref = ids.sort(-1), ids_ref.sort(-1)
    same = (order.values == order_ref.values).all(-1)
    for r in (~same).nonzero().flatten().tolist():
        got, want = choice[r, ids[r]].sum().item(), choice[r, ids_ref[r]].sum().item()
        assert abs(got - want) <= 1e-5, (
            f"token {r}: picked {ids[r].tolist()}, reference {ids_ref[r].tolist()}"
        )
    ws = w.gather(1, order.indices)[same]
    ws_ref = w_ref.gather(1, order_ref.indices)[same]
    torch.testing.assert_close(ws, ws_ref, atol=atol, rtol=rtol)


@st.composite
def router_cases(draw):
    n_group = draw(st.sampled_from([1, 1, 2, 4]))
    per_group = draw(st.integers(2 if n_group > 1 else 1, 12))
    experts = n_group * per_group
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, topk_group * per_group))
    return {
        "tokens": draw(st.sampled_from([0, 1, 3, 17, 40])),
        "hidden": draw(st.sampled_from([16, 24, 40, 64, 96])),
        "experts": experts,
        "n_group": n_group,
        "topk_group": topk_group,
        "top_k": top_k,
        "norm": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 2.5])),
        "bias": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _inputs(case, device, requires_grad=False):
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["tokens"], case["hidden"], generator=g).to(case["dtype"])
    w = (torch.randn(case["experts"], case["hidden"], generator=g) / case["hidden"] ** 0.5).to(case["dtype"])
    bias = torch.randn(case["experts"], generator=g) * 0.1 if case["bias"] else None
    x, w = x.to(device).requires_grad_(requires_grad), w.to(device).requires_grad_(requires_grad)
    return x, w, None if bias is None else bias.to(device)


def _kwargs(case):
    return {
        "top_k": case["top_k"],
        "n_group": case["n_group"],
        "topk_group": case["topk_group"],
        "norm_topk_prob": case["norm"],
        "routed_scaling_factor": case["scale"],
    }


@settings(deadline=None)  # examples: the profile in tests/conftest.py
@given(case=router_cases())
def test_fused_router_matches_reference(case, device):
    x, w, bias = _inputs(case, device)
    ids, wts = route_triton(x, w, bias, **_kwargs(case))
    ids_ref, wts_ref = route_ref(x, w, bias, **_kwargs(case))
    assert wts.dtype == torch.float32
    choice = _choice_scores(x, w, bias, case["n_group"], case["topk_group"])
    assert_same_routing(ids, wts, ids_ref, wts_ref, choice)


@settings(deadline=None)  # examples: the profile in tests/conftest.py
@given(case=router_cases())
def test_fused_router_backward_matches_reference(case, device):
    case = {**case, "dtype": torch.float32, "tokens": max(case["tokens"], 1)}
    x, w, bias = _inputs(case, device, requires_grad=True)
    ids, wts = route_triton(x, w, bias, **_kwargs(case))
    g = torch.randn(wts.shape, generator=torch.Generator().manual_seed(1)).to(device)
    dx, dw = torch.autograd.grad((wts * g).sum(), (x, w))
    ids_ref, wts_ref = route_ref(x, w, bias, **_kwargs(case))
    # Random continuous inputs: the selections agree (the forward test covers ties).
    assert torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values)
    dx_ref, dw_ref = torch.autograd.grad((wts_ref * g).sum(), (x, w))
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dw, dw_ref, atol=1e-5, rtol=1e-4)


def test_top_k_equal_to_experts_selects_all(device):
    x = torch.randn(5, 32, device=device)
    w = torch.randn(8, 32, device=device)
    ids, wts = route_triton(
        x, w, None, top_k=8, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0
    )
    assert torch.equal(ids.sort(-1).values.cpu(), torch.arange(8).expand(5, 8))
    torch.testing.assert_close(wts.sum(-1), torch.ones(5, device=device))


def test_group_limit_keeps_experts_in_the_best_groups(device):
    # Bias two experts of group 3 far up: group-limited routing must take both from that group.
    x = torch.randn(4, 16, device=device)
    w = torch.randn(16, 16, device=device) * 0.01
    bias = torch.zeros(16, device=device)
    bias[12:14] = 5.0
    ids, _ = route_triton(
        x, w, bias, top_k=2, n_group=4, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0
    )
    assert torch.equal(ids.sort(-1).values.cpu(), torch.tensor([[12, 13]] * 4))


@pytest.mark.parametrize(
    ("experts", "top_k", "n_group", "topk_group", "message"),
    [
        (10, 2, 3, 1, "n_group=3"),
        (8, 2, 2, 3, "topk_group=3"),
        (8, 5, 2, 1, "top_k=5"),
        (8, 0, 1, 1, "top_k=0"),
    ],
)
def test_bad_router_config_is_rejected(experts, top_k, n_group, topk_group, message):
    with pytest.raises(ValueError, match=message):
        check_route_args(experts, top_k, n_group, topk_group)


@pytest.mark.parametrize(("n_group", "topk_group"), [(1, 1), (4, 2)])
def test_reference_router_matches_transformers(n_group, topk_group):
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    cfg = Glm4MoeConfig(
        hidden_size=48,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    hf = Glm4MoeTopkRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        hf.weight.normal_(0, 0.2)
        hf.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(33, 48)
    _, w_hf, ids_hf = hf(x)
    kw = {
        "top_k": 4,
        "n_group": n_group,
        "topk_group": topk_group,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    }
    ids, w = route_ref(x, hf.weight, hf.e_score_correction_bias, **kw)
    choice = _choice_scores(x, hf.weight, hf.e_score_correction_bias, n_group, topk_group)
    assert_same_routing(ids, w, ids_hf, w_hf.detach(), choice)
