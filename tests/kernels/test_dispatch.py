"""The kernel seam: backend selection, lazy imports, and fullgraph torch.compile of every path."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from glmc.kernels import (
    backend_for,
    moe_experts,
    moe_experts_ref,
    requested_kernels,
    route,
    route_ref,
    set_kernels,
    use_kernels,
)
from glmc.kernels import fp8 as fp8_mod

CPU = torch.device("cpu")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def test_env_var_context_and_function(monkeypatch):
    monkeypatch.setenv("GLMC_KERNELS", "ref")
    assert requested_kernels() == "ref" and backend_for(CPU) == "ref"
    with use_kernels("torch"):
        assert backend_for(CPU) == "torch"
        with use_kernels("ref"):
            assert backend_for(CPU) == "ref"
        assert backend_for(CPU) == "torch"
    assert requested_kernels() == "ref"
    set_kernels("auto")
    try:
        assert backend_for(CPU) == "torch"  # auto on CPU: the compiled-torch path
    finally:
        set_kernels(None)
    monkeypatch.delenv("GLMC_KERNELS")
    assert requested_kernels() == "auto"


def test_bad_names_are_rejected(monkeypatch):
    with (
        pytest.raises(ValueError, match="choose one of auto, ref, torch, triton, cutlass"),
        use_kernels("cuda"),
    ):
        pass
    monkeypatch.setenv("GLMC_KERNELS", "fast")
    with pytest.raises(ValueError, match="GLMC_KERNELS='fast'"):
        requested_kernels()


@needs_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_kernels("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(CPU)
    with use_kernels("cutlass"), pytest.raises(RuntimeError, match="cutlass"):
        backend_for(CPU)


def test_importing_kernels_loads_neither_triton_nor_cutlass():
    code = "import sys, glmc.kernels; print(sorted(m for m in ('triton', 'cutlass') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_seam_rejects_mismatched_shapes():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"gate_up \(2, 6, 8\) must be \[E, 2I, H\]"):
        moe_experts(
            x,
            torch.randn(2, 6, 8),
            torch.randn(2, 8, 4),
            torch.zeros(3, 1, dtype=torch.long),
            torch.ones(3, 1),
        )


def _problem(seed=0, tokens=24, hidden=32, inter=16, experts=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).requires_grad_()
    router = (torch.randn(experts, hidden, generator=g) * 0.2).requires_grad_()
    bias = torch.randn(experts, generator=g) * 0.05
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2).requires_grad_()
    down = (torch.randn(experts, hidden, inter, generator=g) * 0.2).requires_grad_()
    return x, router, bias, gate_up, down


ROUTING = {"top_k": 2, "n_group": 2, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5}


def _moe_layer(x, router, bias, gate_up, down):
    ids, w = route(x, router, bias, **ROUTING)
    return moe_experts(x, gate_up, down, ids, w)


def _moe_layer_ref(x, router, bias, gate_up, down):
    ids, w = route_ref(x, router, bias, **ROUTING)
    return moe_experts_ref(x, gate_up, down, ids, w)


def _fwd_bwd(fn, args):
    out = fn(*args)
    params = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return [out, *torch.autograd.grad(out.square().sum(), params)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_layer_compiles_fullgraph(backend):
    """route + moe_experts under torch.compile(fullgraph=True), forward and backward, on CPU;
    "triton" runs the custom ops through the interpreter."""
    if backend == "triton" and (
        importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1"
    ):
        pytest.skip("the CPU compile test of the Triton ops needs triton and its interpreter")
    torch._dynamo.reset()
    args = _problem()
    with use_kernels(backend):
        got = _fwd_bwd(torch.compile(_moe_layer, fullgraph=True), args)
    want = _fwd_bwd(_moe_layer_ref, args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@needs_triton
def test_fp8_custom_ops_compile_fullgraph():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the interpreter on CPU")
    torch._dynamo.reset()

    def f(x, w):
        q, s = fp8_mod.quantize_weight_fused(w)
        a, a_s = fp8_mod.quantize_act_fused(x)
        return fp8_mod.fp8_gemm_fused(a, a_s, q, s, torch.float32)

    x, w = torch.randn(20, 160), torch.randn(72, 160)
    got = torch.compile(f, fullgraph=True)(x, w)
    a, a_s = fp8_mod.quantize_act_ref(x)
    q, s = fp8_mod.quantize_weight_ref(w)
    torch.testing.assert_close(got, fp8_mod.fp8_gemm_ref(a, a_s, q, s, torch.float32), atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_torch_path_compiles_once_for_every_token_count():
    """dynamic=True: the counting sort and grouped GEMMs keep the token count symbolic, so one
    graph serves every token count >= 2 (dynamo always specialises sizes 0 and 1)."""
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    _, router, bias, gate_up, down = _problem()
    with use_kernels("torch"):
        compiled = torch.compile(_moe_layer, fullgraph=True, dynamic=True, backend=counting_backend)
        for tokens in (2, 7, 40):
            x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens))
            torch.testing.assert_close(
                compiled(x, router, bias, gate_up, down),
                _moe_layer_ref(x, router, bias, gate_up, down),
                atol=1e-5,
                rtol=1e-5,
            )
    assert len(graphs) == 1
