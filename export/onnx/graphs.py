"""Trace the decoder and MTP step modules into ONNX graphs (torch.onnx dynamo exporter).

fp32 only: ONNX Runtime's CPU provider lacks bf16 kernels for ops this graph needs (Expand),
so bf16 weights are upcast before export. The MoE runs on the static-shape path
(`moe_static`): the grouped-GEMM path has no ONNX lowering.

FP8 models (quantize-fp8) keep their weights FP8 in the file: each is a FLOAT8E4M3FN
initializer read through `DequantizeLinear` (opset 21, blocked along the input dim with
`block_size` 128 for block128, one block per row for channel), which ONNX Runtime 1.32's CPU
provider runs; the graph then computes in fp32 as the torch model does on CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from glmc.ir import GlmcError

from ..steps import (
    DecoderStep,
    MTPStep,
    StaticDecoderStep,
    StaticMTPStep,
    StaticVerifyStep,
    example_inputs,
    kv_names,
    static_trace_args,
)
from ..torch.model import Attention, GLMForCausalLM, RMSNorm
from ..torch.moe_static import static_moe

OPSET = 20
OPSET_FP8 = 21  # DequantizeLinear with FLOAT8E4M3FN input and block_size
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")
MTP_INPUTS = ("input_ids", "hidden_states", "attention_mask", "position_ids")
STATIC_DECODER_INPUTS = ("input_ids", "position_ids")
STATIC_MTP_INPUTS = ("input_ids", "hidden_states", "position_ids")
# The greedy round's first part (greedy_verify_static), before the updated caches.
STATIC_VERIFY_OUTPUTS = ("best", "accepted", "trunk_ok", "draft", "draft_ok", "mtp_hidden_states")


@contextlib.contextmanager
def onnx_lowering(model: GLMForCausalLM) -> Iterator[GLMForCausalLM]:
    """The model as the ONNX graphs spell it: the static-shape MoE, grouped attention (no copy of
    the cache per query head) and the RMSNorm form ONNX Runtime fuses into one node. The same
    math as the torch module; on glm-small it cut a decode step's graph from 722 nodes (after
    ONNX Runtime's own fusions) to 431."""

    def switch(on: bool) -> None:
        for m in model.modules():
            if isinstance(m, Attention):
                m.graph_form(on)
            elif isinstance(m, RMSNorm):
                m.divide = on

    switch(True)
    try:
        with static_moe(model):
            yield model
    finally:
        switch(False)


def _dims(max_len: int) -> tuple[object, object, object, object]:
    from torch.export import Dim

    # Batch, new tokens, cached tokens, total tokens. Past may be 0 (prefill with an empty cache,
    # as ONNX Runtime GenAI does); tracing uses sizes > 1 so nothing specialises on 0 or 1.
    return (
        Dim("batch", min=1, max=1024),
        Dim("sequence", min=1, max=max_len),
        Dim("past_sequence", min=0, max=max_len),
        Dim.DYNAMIC,
    )


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], dyn: tuple[object, ...],
            inputs: list[str], outputs: list[str], path: Path) -> None:  # fmt: skip
    quiet = io.StringIO()
    # The exporter logs one line per optional torchvision op it cannot register; not ours.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    fp8 = any(b.dtype == torch.float8_e4m3fn for b in module.buffers())
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamic_shapes=dyn, input_names=inputs, output_names=outputs,
                dynamo=True, opset_version=OPSET_FP8 if fp8 else OPSET, verbose=False,
                custom_translation_table=_fp8_translations() if fp8 else None,
            )  # fmt: skip
    except Exception as e:  # the exporter's own errors are long; keep the first line and the op
        raise GlmcError(f"ONNX export of {path.name} failed: {str(e).splitlines()[0]}") from e
    finally:
        registration.setLevel(level)
    assert program is not None
    # external_data=None: weights move to a `.data` file only past protobuf's 2 GiB limit.
    program.save(str(path))


def _fp8_translations() -> dict[Callable[..., Any], Callable[..., Any]]:
    """glmc::fp8_dequantize (per-row block scales along the last dim) -> DequantizeLinear."""
    from onnxscript import opset21 as op

    def fp8_dequantize(q: Any, s_rows: Any, block: int) -> Any:
        return op.DequantizeLinear(q, s_rows, axis=-1, block_size=block)

    return {torch.ops.glmc.fp8_dequantize.default: fp8_dequantize}


def export_decoder(model: GLMForCausalLM, path: Path, max_len: int) -> None:
    """model.onnx: (input_ids, attention_mask, position_ids, past_key_values.*) ->
    (logits, hidden_states, present.*)."""
    n = len(model.model.layers)
    b, s, p, t = _dims(max_len)
    dyn = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in range(2 * n)))
    inputs = [*DECODER_INPUTS, *kv_names("past_key_values", n)]
    outputs = ["logits", "hidden_states", *kv_names("present", n)]
    with onnx_lowering(model):
        _export(DecoderStep(model), example_inputs(model, 2, 3, 3), dyn, inputs, outputs, path)


def export_mtp(model: GLMForCausalLM, path: Path, max_len: int) -> None:
    """mtp.onnx: (input_ids, hidden_states, attention_mask, position_ids, past_key_values.0.*) ->
    (logits, hidden_states_out, present.0.*)."""
    b, s, p, t = _dims(max_len)
    dyn = ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, {0: b, 2: p}, {0: b, 2: p})
    inputs = [*MTP_INPUTS, *kv_names("past_key_values", 1)]
    outputs = ["logits", "hidden_states_out", *kv_names("present", 1)]
    with onnx_lowering(model):
        _export(MTPStep(model), example_inputs(model, 2, 3, 3, mtp=True), dyn, inputs, outputs, path)


def export_decoder_static(model: GLMForCausalLM, path: Path, max_len: int) -> None:
    """model_static.onnx: (input_ids, position_ids, cache.*) -> (logits, hidden_states, cache_out.*);
    cache [B, nkv, T, d], slot = position; a query sees its own row's slots 0..position."""
    n = len(model.model.layers)
    inputs = [*STATIC_DECODER_INPUTS, *kv_names("cache", n)]
    outputs = ["logits", "hidden_states", *kv_names("cache_out", n)]
    with onnx_lowering(model):
        _export(
            StaticDecoderStep(model), *static_trace_args(model, max_len, mtp=False), inputs, outputs, path
        )


def export_mtp_static(model: GLMForCausalLM, path: Path, max_len: int) -> None:
    """mtp_static.onnx: (input_ids, hidden_states, position_ids, cache.0.*) ->
    (logits, hidden_states_out, cache_out.0.*)."""
    inputs = [*STATIC_MTP_INPUTS, *kv_names("cache", 1)]
    outputs = ["logits", "hidden_states_out", *kv_names("cache_out", 1)]
    with onnx_lowering(model):
        _export(StaticMTPStep(model), *static_trace_args(model, max_len, mtp=True), inputs, outputs, path)


def export_verify_static(model: GLMForCausalLM, path: Path, max_len: int) -> None:
    """verify_static.onnx: (input_ids, position_ids, cache.*, mtp_cache.0.*) -> (best, accepted,
    trunk_ok, draft, draft_ok, mtp_hidden_states, cache_out.*, mtp_cache_out.0.*): a greedy
    speculation round's verify, acceptance, MTP catch-up and first draft in one graph, for any
    number of drafts (`GLMForCausalLM.greedy_verify_static`)."""
    n = len(model.model.layers)
    inputs = [*STATIC_DECODER_INPUTS, *kv_names("cache", n), *kv_names("mtp_cache", 1)]
    outputs = [*STATIC_VERIFY_OUTPUTS, *kv_names("cache_out", n), *kv_names("mtp_cache_out", 1)]
    with onnx_lowering(model):
        _export(
            StaticVerifyStep(model),
            *static_trace_args(model, max_len, mtp=False, verify=True),
            inputs,
            outputs,
            path,
        )
