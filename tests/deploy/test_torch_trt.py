"""The Torch-TensorRT target: portable ExportedPrograms with static-shape routing that match the
torch model; compiling them needs torch_tensorrt and a GPU (gpu-marked), else a clear error."""

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
    ids = torch.randint(0, 512, (1, 8))
    pos = torch.arange(8)[None]
    with torch.no_grad():
        _, _, past = reference.forward_cached(ids[:, :5], pos[:, :5], reference.empty_cache(1))
        mask = torch.ones(1, 8, dtype=torch.int64)
        want, _, _ = reference.forward_cached(ids[:, 5:], pos[:, 5:], past, mask)
        got = ep.module()(ids[:, 5:], mask, pos[:, 5:], *[t for kv in past for t in kv])
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)


def test_compile_without_gpu_says_why(built, tmp_path):
    if trt_unavailable_reason() is None:
        pytest.skip("torch_tensorrt and a GPU are present: the gpu test compiles")
    with pytest.raises(GlmcError, match=r"cannot compile .* with Torch-TensorRT"):
        compile_engine(built / "torch-trt" / "decode.ep", tmp_path / "trt.ep")


@pytest.mark.gpu
def test_torch_tensorrt_compiles_the_program(built, tmp_path):
    if trt_unavailable_reason() is not None:
        pytest.skip(trt_unavailable_reason())
    out = compile_engine(built / "torch-trt" / "decode.ep", tmp_path / "trt.ep")
    assert out.is_file()
