"""The AOTInductor target: `.pt2` packages of the static-cache trunk step and the MTP draft
step, compiled for this machine's CPU, loadable with `torch._inductor.aoti_load_package`
alone (no glmc import: the MoE runs on the static-shape path, so no glmc custom op remains).

Calling convention (flat tensors; see `glmc.export.steps`, `StaticDecoderStep` / `StaticMTPStep`):
- `decoder_static.pt2`: (input_ids, position_ids, *cache) -> (logits, hidden_states, *cache_out)
- `mtp_static.pt2`:     (input_ids, hidden_states, position_ids, cache_key, cache_value)
                        -> (logits, hidden_states_out, cache_out_key, cache_out_value)

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

from ..steps import StaticDecoderStep, StaticMTPStep, example_inputs
from ..torch.model import GLMForCausalLM
from ..torch.moe_static import static_moe

# glmc_runtime.json file keys -> package names (the ONNX target's static graphs use the same keys).
PACKAGES = {"decoder_static": "decoder_static.pt2", "mtp_static": "mtp_static.pt2"}

# The wrapper only sequences kernel calls; -O0 on it cuts the C++ compile by about a third
# on 2 cores and costs nothing measurable at runtime (the kernels keep inductor's flags).
_INDUCTOR_CONFIGS = {"aot_inductor.compile_wrapper_opt_level": "O0"}

# The runtime sizes the cache to the longest row plus its drafts, rounded up to a multiple of
# 64 (glmc.runtime.decode): at most max_len + 2 * 64 slots for up to 64 drafts.
_CACHE_SLACK = 128


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


def _dims(max_len: int) -> tuple[object, object, object]:
    from torch.export import Dim

    # Batch, new tokens, cache slots. The example sizes below are all > 1 (and distinct), so
    # the trace specialises on none of them.
    return (
        Dim("batch", min=1, max=1024),
        Dim("sequence", min=1, max=max_len),
        Dim("cache_sequence", min=2, max=max_len + _CACHE_SLACK),
    )


def _inputs(model: GLMForCausalLM, mtp: bool) -> tuple[torch.Tensor, ...]:
    """Batch 2, 3 new tokens at positions 2..4 of a 7-slot cache (random values: never zeros)."""
    batch, seq, slots = 2, 3, 7
    ids, *rest = example_inputs(model, batch, seq, slots, mtp=mtp)
    pos = (torch.arange(seq) + 2).expand(batch, seq).contiguous()
    if mtp:
        h, _mask, _pos, *kv = rest
        return (ids, h, pos, *kv)
    _mask, _pos, *kv = rest
    return (ids, pos, *kv)


def export_aoti(model: GLMForCausalLM, out: Path, max_len: int, mtp: bool) -> dict[str, str]:
    """Write the packages into `out`; returns {glmc_runtime.json file key: file name}."""
    n = len(model.model.layers)
    b, s, t = _dims(max_len)
    written = {}
    with static_moe(model):
        _compile(
            StaticDecoderStep(model),
            _inputs(model, mtp=False),
            ({0: b, 1: s}, {0: b, 1: s}, tuple({0: b, 2: t} for _ in range(2 * n))),
            out / PACKAGES["decoder_static"],
        )
        written["decoder_static"] = PACKAGES["decoder_static"]
        if mtp:
            _compile(
                StaticMTPStep(model),
                _inputs(model, mtp=True),
                ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}, {0: b, 2: t}, {0: b, 2: t}),
                out / PACKAGES["mtp_static"],
            )
            written["mtp_static"] = PACKAGES["mtp_static"]
    return written
