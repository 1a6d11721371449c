"""The static-shape MoE path (graph exporters) computes what the grouped-GEMM path computes."""

import pytest
import torch

from glmc.export.torch.moe import moe_experts
from glmc.export.torch.moe_static import moe_experts_static, static_moe


@pytest.mark.parametrize(("tokens", "experts", "k"), [(1, 4, 2), (19, 8, 3), (6, 6, 6)])
def test_static_experts_match_grouped(tokens, experts, k):
    g = torch.Generator().manual_seed(tokens)
    hidden, inter = 16, 8
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g)
    down = torch.randn(experts, hidden, inter, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    want = moe_experts(x, gate_up, down, ids, weights)
    torch.testing.assert_close(moe_experts_static(x, gate_up, down, ids, weights), want, rtol=1e-5, atol=1e-5)


def test_whole_model_same_logits_and_switch_restores_default(make_tiny):
    m = make_tiny()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, (mtp_want,) = m.forward_with_mtp(ids)
        with static_moe(m):
            assert all(e.static_shapes for e in m.modules() if hasattr(e, "static_shapes"))
            got, (mtp_got,) = m.forward_with_mtp(ids)
    assert not any(e.static_shapes for e in m.modules() if hasattr(e, "static_shapes"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mtp_got, mtp_want, rtol=1e-5, atol=1e-5)
