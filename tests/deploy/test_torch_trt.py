"""The Torch-TensorRT target: portable ExportedPrograms with static-shape routing that match the
torch model; compiling them needs torch_tensorrt and a GPU (gpu-marked: the engine's logits
match the torch model's), else a clear error."""

import pytest
import torch

from glmc.errors import GlmcError
from glmc.export.torch_trt import compile_engine, trt_unavailable_reason

pytestmark = pytest.mark.slow


def test_exported_program_matches_torch_and_has_no_data_dependent_ops(built, reference):
    ep = torch.export.load(str(built / "torch-trt" / "decode.ep"))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("nonzero" in t or "grouped_mm" in t or "_local_scalar_dense" in t for t in targets), (
        targets
    )
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None]
    with torch.no_grad():
        _, _, past = reference.forward_cached(ids[:, :5], pos[:, :5], reference.empty_cache(1))
        mask = torch.ones(1, 8, dtype=torch.int64)
        want, _, _ = reference.forward_cached(ids[:, 5:], pos[:, 5:], past, mask)
        got = ep.module()(ids[:, 5:], mask, pos[:, 5:], *[t for kv in past for t in kv])
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)


def test_compile_without_gpu_says_why(built, tmp_path, monkeypatch):
    # On a GPU machine the GPU is hidden, so the message is checked there too (never skipped).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = trt_unavailable_reason()
    assert reason is not None and ("not importable" in reason or "no CUDA GPU" in reason), reason
    with pytest.raises(GlmcError, match=r"cannot compile .* with Torch-TensorRT"):
        compile_engine(built / "torch-trt" / "decode.ep", tmp_path / "trt.ep")
    assert not (tmp_path / "trt.ep").exists()


@pytest.mark.gpu
def test_torch_tensorrt_engine_matches_torch(built, reference, tmp_path):
    """The compiled engine computes the decode step's logits and presents. compile_engine
    builds for its example shapes (3 new tokens after 3 cached, see _example_from_program), so
    the check runs at those shapes."""
    reason = trt_unavailable_reason()
    if reason is not None:  # a GPU machine without the torch-trt extra
        pytest.skip(reason)
    import torch_tensorrt

    out = compile_engine(built / "torch-trt" / "decode.ep", tmp_path / "trt.ep")
    engine = torch_tensorrt.load(str(out)).module()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(6)[None]
    mask = torch.ones(1, 6, dtype=torch.int64)
    with torch.no_grad():
        _, _, past = reference.forward_cached(ids[:, :3], pos[:, :3], reference.empty_cache(1))
        want, _, want_past = reference.forward_cached(ids[:, 3:], pos[:, 3:], past, mask)
        flat = [t.cuda() for kv in past for t in kv]
        got = engine(ids[:, 3:].cuda(), mask.cuda(), pos[:, 3:].cuda(), *flat)
    # fp32 engine; TensorRT may run fp32 GEMMs in TF32 (10-bit mantissa), hence 1e-2 of the scale.
    logits = got[0].float().cpu()
    assert logits.shape == want.shape
    assert ((logits - want).abs().max() / want.abs().max()).item() < 1e-2
    for g, w in zip(got[2:], [t for kv in want_past for t in kv], strict=True):
        assert ((g.float().cpu() - w).abs().max() / w.abs().max()).item() < 1e-2
