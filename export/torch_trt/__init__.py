"""The Torch-TensorRT target: `torch.export` ExportedPrograms with static-shape routing
(`decode.ep`, and `mtp.ep` when the model has an MTP layer), ready for
`torch_tensorrt.dynamo.compile`. Torch-TensorRT has no converter for grouped GEMMs or
data-dependent shapes (reference/deploy-formats.md §4), so the MoE gathers each token's
experts (`moe_static`): topk with a static k, gather, batched matmul; all have converters.

The programs are written on any machine; `compile_engine` runs only where torch_tensorrt and
a CUDA GPU exist and raises a GlmcError elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch

from glmc.ir import GlmcError

from ..steps import DecoderStep, MTPStep, example_inputs
from ..torch.model import GLMForCausalLM
from ..torch.moe_static import static_moe

PROGRAMS = {"decode": "decode.ep", "mtp": "mtp.ep"}


def _export(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], dyn: tuple[object, ...], path: Path
) -> None:
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.export.save(torch.export.export(module, args, dynamic_shapes=dyn), str(path))
    except Exception as e:
        raise GlmcError(f"torch.export of {path.name} failed: {str(e).splitlines()[0]}") from e


def export_programs(model: GLMForCausalLM, out: Path, max_len: int, mtp: bool) -> dict[str, str]:
    """One decode/verify program (P >= 1 cached tokens; prefill runs it with a 1-token cache
    split or on the torch target) and the MTP step, batch 1, in the model's dtype."""
    from torch.export import Dim

    n = len(model.model.layers)
    seq = Dim("sequence", min=1, max=max_len)
    past = Dim("past_sequence", min=1, max=max_len - 1)
    total = Dim.DYNAMIC
    written = {}
    with static_moe(model):
        _export(
            DecoderStep(model),
            example_inputs(model, 1, 3, 5),
            ({1: seq}, {1: total}, {1: seq}, tuple({2: past} for _ in range(2 * n))),
            out / PROGRAMS["decode"],
        )
        written["decode"] = PROGRAMS["decode"]
        if mtp:
            _export(
                MTPStep(model),
                example_inputs(model, 1, 3, 5, mtp=True),
                ({1: seq}, {1: seq}, {1: total}, {1: seq}, {2: past}, {2: past}),
                out / PROGRAMS["mtp"],
            )
            written["mtp"] = PROGRAMS["mtp"]
    return written


def trt_unavailable_reason() -> str | None:
    """Why Torch-TensorRT cannot compile here, or None when it can."""
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or its own "could not find libnvinfer" Exception
        return f"torch_tensorrt is not importable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def compile_engine(program: Path, out: Path, **settings: Any) -> Path:
    """Compile a saved program with Torch-TensorRT (dynamo) and save it as an ExportedProgram
    holding the TRT engines. GPU + torch_tensorrt only."""
    reason = trt_unavailable_reason()
    if reason is not None:
        raise GlmcError(
            f"cannot compile {program} with Torch-TensorRT: {reason}. The exported program itself is "
            "portable: copy the folder to a machine with an NVIDIA GPU and torch-tensorrt installed "
            "(pip install 'glmc[torch-trt]') and run the compile there."
        )
    import torch_tensorrt

    ep = torch.export.load(str(program))
    example = _example_from_program(ep)
    trt = torch_tensorrt.dynamo.compile(ep, arg_inputs=example, **settings)
    torch_tensorrt.save(trt, str(out), output_format="exported_program", arg_inputs=example, retrace=True)
    return out


def _example_from_program(ep: Any) -> list[torch.Tensor]:
    """CUDA example inputs matching the program's placeholders (ids, masks and positions int64)."""
    sig = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out = []
    for s in sig:
        val = nodes[s.arg.name].meta["val"]
        # Every dynamic dim is 3 new or 3 cached tokens, so the mask spans 6.
        free = 6 if "attention_mask" in s.arg.name else 3
        shape = [int(d) if isinstance(d, int) else free for d in val.shape]
        if val.dtype == torch.int64:
            out.append(torch.ones(shape, dtype=torch.int64, device="cuda"))
        else:
            out.append(torch.randn(shape, dtype=val.dtype, device="cuda"))
    return out
