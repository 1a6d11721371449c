"""The AOTInductor target: `.pt2` packages of the static-cache trunk step and the MTP draft
step, compiled for this machine's CPU, loadable with `torch._inductor.aoti_load_package`
alone (no glmc import: the MoE runs on the static-shape path, so no glmc custom op remains).

Calling convention (flat tensors; see `glmc.export.steps`, `StaticDecoderStep` / `StaticMTPStep`):
- `decoder_static.pt2`: (input_ids, position_ids, *cache) -> (logits, hidden_states, *cache_out)
- `mtp_static.pt2`:     (input_ids, hidden_states, position_ids, cache_key, cache_value)
                        -> (logits, hidden_states_out, cache_out_key, cache_out_value)
- `verify_static.pt2`:  (input_ids, position_ids, *cache, mtp_key, mtp_value)
                        -> (best, accepted, trunk_ok, draft, draft_ok, mtp_hidden_states,
                            *cache_out, mtp_key_out, mtp_value_out)
  (with MTP) a greedy speculation round's verify, acceptance, MTP catch-up and first draft
  in one call, for any number of drafts (`GLMForCausalLM.greedy_verify_static`); the
  runtime chains the further drafts on `mtp_static.pt2`.

ids and positions [B, S] int64 (positions per row); cache k, v [B, nkv, T, d] per layer
(key, value, layer by layer), slot t = position t of each row; a query attends over its own
row's slots 0..position. The step writes its tokens' k, v at their positions into a copy of
the cache and returns it: the caller passes that `cache_out` as the next step's cache. Batch,
new tokens and cache slots are dynamic. Prefill is the same call with positions 0..S-1 into
a zeroed cache; decode, speculative verify and the MTP catch-up are calls at later positions.

Folders written by earlier glmc versions hold `prefill.pt2`, `decode.pt2` and `mtp.pt2`
(batch 1, cache in and grown cache out); `glmc.runtime.backend_aoti` still runs them.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from glmc.ir import GlmcError

from ..steps import StaticDecoderStep, StaticMTPStep, StaticVerifyStep, static_trace_args
from ..torch.model import GLMForCausalLM
from ..torch.moe_static import static_moe

# glmc_runtime.json file keys -> package names (the ONNX target's static graphs use the same keys).
PACKAGES = {
    "decoder_static": "decoder_static.pt2",
    "mtp_static": "mtp_static.pt2",
    "verify_static": "verify_static.pt2",
}

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
    """Write the packages into `out`; returns {glmc_runtime.json file key: file name}."""
    written = {}
    with static_moe(model):
        _compile(
            StaticDecoderStep(model),
            *static_trace_args(model, max_len, mtp=False),
            out / PACKAGES["decoder_static"],
        )
        written["decoder_static"] = PACKAGES["decoder_static"]
        if mtp:
            _compile(
                StaticMTPStep(model),
                *static_trace_args(model, max_len, mtp=True),
                out / PACKAGES["mtp_static"],
            )
            written["mtp_static"] = PACKAGES["mtp_static"]
            _compile(
                StaticVerifyStep(model),
                *static_trace_args(model, max_len, mtp=False, verify=True),
                out / PACKAGES["verify_static"],
            )
            written["verify_static"] = PACKAGES["verify_static"]
    return written
