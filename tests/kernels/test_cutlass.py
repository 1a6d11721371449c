"""The CUTLASS (CuTe DSL) Hopper grouped GEMM: builds to an sm_90a cubin on a machine without a
GPU; on a Hopper GPU it matches the reference, alone and as the "cutlass" MoE backend."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from glmc.kernels import grouped_mm_ref, moe_align_ref, moe_experts_ref, use_kernels

needs_cutlass = pytest.mark.skipif(
    importlib.util.find_spec("cutlass") is None, reason="nvidia-cutlass-dsl not installed"
)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@needs_cutlass
def test_compiles_to_sm90a_cubin_without_a_gpu(tmp_path):
    # A fresh process: the DSL reads CUTE_DSL_* once, and the test process stays cutlass-free.
    env = {
        **os.environ,
        "CUTE_DSL_ARCH": "sm_90a",
        "CUTE_DSL_KEEP": "ptx,cubin",
        "CUTE_DSL_DUMP_DIR": str(tmp_path),
        "CUTE_DSL_DISABLE_FILE_CACHING": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    code = (
        "import torch, cuda.bindings.driver as cuda, cutlass.cute as cute\n"
        "from glmc.kernels.cutlass_grouped_gemm import HopperGroupedGemm, compile_for_arch, launch_args\n"
        "for dt in (torch.bfloat16, torch.float16):\n"
        "    compile_for_arch(dt)\n"
        "# the argument path grouped_gemm() launches with, built from (CPU) torch tensors\n"
        "a, b, c = torch.zeros(256, 520), torch.zeros(5, 256, 520), torch.zeros(256, 256)\n"
        "args = launch_args(a.bfloat16(), b.bfloat16(), c.bfloat16(), torch.zeros(2, dtype=torch.int32), cuda.CUstream(0))\n"
        "cute.compile(HopperGroupedGemm(128), *args)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, timeout=600
    )
    cubins = sorted(tmp_path.glob("*.sm_90a.cubin"))
    ptxs = sorted(tmp_path.glob("*.sm_90a.ptx"))
    assert len(cubins) == 3 and len(ptxs) == 3
    for cubin, ptx in zip(cubins, ptxs, strict=True):
        assert cubin.read_bytes()[:4] == b"\x7fELF"
        text = ptx.read_text()
        assert ".target sm_90a" in text
        assert "wgmma.mma_async.sync.aligned" in text  # Hopper tensor-core MMA
        assert "cp.async.bulk.tensor" in text  # TMA loads


def _padded_problem(counts, n, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = len(counts)
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])[
        torch.randperm(sum(counts), generator=g)
    ]
    al = moe_align_ref(ids.view(-1, 1), experts, 128)
    a = torch.randn(sum(counts), k, generator=g)
    rows = al.sorted_ids.long()
    a_pad = torch.where((rows < len(ids)).unsqueeze(1), a[rows.clamp(max=len(ids) - 1)], 0.0)
    b = torch.randn(experts, n, k, generator=g) / k**0.5
    return a_pad.to(device, dtype), b.to(device, dtype), al


@pytest.mark.gpu
@needs_cutlass
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_gemm_matches_reference_on_hopper(dtype):
    if not _hopper():
        pytest.skip("needs a Hopper (sm_90) GPU")
    from glmc.kernels.cutlass_grouped_gemm import grouped_gemm

    a, b, al = _padded_problem([300, 0, 1, 129, 64], 256, 520, dtype, "cuda")
    got = grouped_gemm(a, b, al.block_expert.cuda())
    want = grouped_mm_ref(a.float(), b.float().transpose(1, 2), al.offsets[1:].cuda())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cutlass
def test_cutlass_moe_backend_forward_backward_on_hopper():
    if not _hopper():
        pytest.skip("needs a Hopper (sm_90) GPU")
    from glmc.kernels import moe_experts

    g = torch.Generator().manual_seed(0)
    t, h, i, e, k = 200, 256, 128, 8, 2
    x = torch.randn(t, h, generator=g)
    gate_up, down = torch.randn(e, 2 * i, h, generator=g) / 16, torch.randn(e, h, i, generator=g) / 11
    ids = torch.rand(t, e, generator=g).topk(k, -1).indices
    w = torch.rand(t, k, generator=g)
    leaves = [v.cuda().bfloat16().requires_grad_() for v in (x, gate_up, down)]
    wc = w.cuda().requires_grad_()
    with use_kernels("cutlass"):
        out = moe_experts(*leaves, ids.cuda(), wc)
    grads = torch.autograd.grad(out.float().square().sum(), [*leaves, wc])
    ref_leaves = [v.detach().double().requires_grad_() for v in (*leaves, wc)]
    ref = moe_experts_ref(ref_leaves[0], ref_leaves[1], ref_leaves[2], ids.cuda(), ref_leaves[3])
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    for a, b in zip([out, *grads], [ref, *ref_grads], strict=True):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-2
