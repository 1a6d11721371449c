"""The AOTInductor target: `.pt2` packages for prefill, decode (and verify) and the MTP draft
step, compiled for this machine's CPU, loadable with `torch._inductor.aoti_load_package`
alone (no glmc import: the MoE runs on the static-shape path, so no glmc custom op remains).

Calling convention (flat tensors; see `glmc.export.steps`):
- `prefill.pt2`: (input_ids, attention_mask, position_ids) -> (logits, hidden_states, *present)
- `decode.pt2`:  (input_ids, attention_mask, position_ids, *past) -> same; P >= 1 cached tokens
- `mtp.pt2`:     (input_ids, hidden_states, attention_mask, position_ids, past_k, past_v)
                 -> (logits, hidden_states_out, present_k, present_v); P >= 0
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from glmc.ir import GlmcError

from ..steps import DecoderStep, MTPStep, PrefillStep, example_inputs
from ..torch.model import GLMForCausalLM
from ..torch.moe_static import static_moe

PACKAGES = {"prefill": "prefill.pt2", "decode": "decode.pt2", "mtp": "mtp.pt2"}

# The wrapper only sequences kernel calls; -O0 on it cuts the C++ compile by about a third
# on 2 cores and costs nothing measurable at runtime (the kernels keep inductor's flags).
_INDUCTOR_CONFIGS = {"aot_inductor.compile_wrapper_opt_level": "O0"}


def _compile(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], dyn: tuple[object, ...], path: Path
) -> None:
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, args, dynamic_shapes=dyn)
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(path), inductor_configs=_INDUCTOR_CONFIGS
            )
    except Exception as e:
        raise GlmcError(f"AOTInductor compile of {path.name} failed: {str(e).splitlines()[0]}") from e


def export_aoti(model: GLMForCausalLM, out: Path, max_len: int, mtp: bool) -> dict[str, str]:
    """Write the packages into `out`; returns {step: file name}. Batch is fixed at 1 (a
    single-stream CPU runtime; dynamic batch would double the guard surface for no user)."""
    from torch.export import Dim

    n = len(model.model.layers)
    seq = Dim("sequence", min=1, max=max_len)
    past = Dim("past_sequence", min=1, max=max_len - 1)
    mtp_past = Dim("mtp_past_sequence", min=0, max=max_len - 1)
    total = Dim.DYNAMIC
    written = {}
    with static_moe(model):
        _compile(
            PrefillStep(model),
            example_inputs(model, 1, 4, 0)[:3],
            ({1: seq}, {1: total}, {1: seq}),
            out / PACKAGES["prefill"],
        )
        written["prefill"] = PACKAGES["prefill"]
        _compile(
            DecoderStep(model),
            example_inputs(model, 1, 3, 5),
            ({1: seq}, {1: total}, {1: seq}, tuple({2: past} for _ in range(2 * n))),
            out / PACKAGES["decode"],
        )
        written["decode"] = PACKAGES["decode"]
        if mtp:
            _compile(
                MTPStep(model),
                example_inputs(model, 1, 3, 5, mtp=True),
                ({1: seq}, {1: seq}, {1: total}, {1: seq}, {2: mtp_past}, {2: mtp_past}),
                out / PACKAGES["mtp"],
            )
            written["mtp"] = PACKAGES["mtp"]
    return written
