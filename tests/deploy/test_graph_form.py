"""The graph form the ONNX exporter traces (`onnx_lowering`): grouped attention, RoPE as a
matmul, RMSNorm as x / sqrt. It must compute what the torch module computes, in eager, before
any exporter sees it; and it must leave the module as it found it."""

import torch
import torch.nn.functional as F

from glmc.export.onnx.graphs import onnx_lowering
from glmc.export.torch.model import Attention, RMSNorm, apply_partial_rope, rope_by_matmul, rotate_half_matrix


def test_rope_by_matmul_is_apply_partial_rope_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for d, r in ((48, 24), (32, 32), (128, 64)):
        x = torch.randn(2, 4, 5, d, generator=g)
        angles = torch.randn(2, 5, r // 2, generator=g) * 3
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        want = apply_partial_rope(x, cos, sin)
        got = rope_by_matmul(x, cos, sin, rotate_half_matrix(d, r))
        assert torch.equal(got, want), (d, r)


def test_graph_form_matches_the_module_and_is_undone(make_tiny):
    """forward_static in graph form vs plain over a cache full of stale values the mask must
    hide: a 6-token prefill, then a 3-token verify step where row 1 rewinds to position 3 (as
    after rejected drafts), so the rows sit at different positions."""
    model = make_tiny()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 6), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    runs = []
    for graph_form in (False, True):
        cache = model.static_cache(2, 16)
        for kv in cache:  # stale entries everywhere a query must not look
            for t in kv:
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(2)))
        with torch.no_grad():
            if graph_form:
                with onnx_lowering(model):
                    assert all(m.grouped for m in model.modules() if isinstance(m, Attention))
                    out = [model.forward_static(ids, pos, cache)]
                    out.append(model.forward_static(ids[:, :3], torch.tensor([[6, 7, 8], [3, 4, 5]]), cache))
            else:
                out = [model.forward_static(ids, pos, cache)]
                out.append(model.forward_static(ids[:, :3], torch.tensor([[6, 7, 8], [3, 4, 5]]), cache))
        runs.append(out)
    for (want_logits, want_h), (got_logits, got_h) in zip(*runs, strict=True):
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    # Undone on exit: the training and torch-target paths never see the graph form.
    for m in model.modules():
        if isinstance(m, Attention):
            assert not m.grouped and m.rotate_half is None
        if isinstance(m, RMSNorm):
            assert not m.divide


def test_grouped_attention_equals_sdpa_with_a_padding_query(make_tiny):
    """A query row with no visible slot (a padding query) averages instead of producing NaN."""
    att = next(m for m in make_tiny().modules() if isinstance(m, Attention))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, att.nh, 3, att.d, generator=g)
    k, v = (torch.randn(2, att.nkv, 7, att.d, generator=g) for _ in range(2))
    mask = torch.rand(2, 1, 3, 7, generator=g) > 0.3
    mask[..., 0] = True  # every real query sees slot 0
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=att.scale, enable_gqa=True)
    att.grouped = True
    try:
        got = att._attend(q, k, v, mask)
        mask[1, :, 2] = False
        blind = att._attend(q, k, v, mask)
    finally:
        att.grouped = False
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(blind).all()
