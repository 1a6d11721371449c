"""Flat-tensor step modules that the graph exporters (ONNX, AOTInductor, Torch-TensorRT) trace.

A serving runtime calls a graph with a flat list of tensors, not glmc's list of (k, v) pairs,
so these wrap `GLMForCausalLM.forward_cached` / `mtp_cached` with the ONNX Runtime GenAI
naming: inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value`;
outputs `logits`, `hidden_states`, `present.{i}.key/value`. Shapes: ids/positions [B, S]
int64, attention_mask [B, P+S] int64 (1 = real token), KV [B, nkv, P, d].
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from .torch.model import GLMForCausalLM


def kv_names(prefix: str, layers: int, key: str = "key", value: str = "value") -> list[str]:
    """`past_key_values.0.key, past_key_values.0.value, ...` (or `present.*`)."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in (key, value)]


def _pairs(flat: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _flat(pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    return [t for kv in pairs for t in kv]


class DecoderStep(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, hidden_states, *present).
    One graph for prefill (P = 0) and decode/verify (P > 0)."""

    def __init__(self, model: GLMForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.num_layers = len(model.model.layers)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
    ) -> tuple[Tensor, ...]:
        logits, h, presents = self.model.forward_cached(input_ids, position_ids, _pairs(past), attention_mask)
        return (logits, h, *_flat(presents))


class PrefillStep(nn.Module):
    """(input_ids, attention_mask, position_ids) -> (logits, hidden_states, *present): the
    empty cache is built inside, so the graph has no zero-length inputs."""

    def __init__(self, model: GLMForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        past = self.model.empty_cache(input_ids.shape[0])
        logits, h, presents = self.model.forward_cached(input_ids, position_ids, past, attention_mask)
        return (logits, h, *_flat(presents))


class MTPStep(nn.Module):
    """(input_ids, hidden_states, attention_mask, position_ids, past_key, past_value) ->
    (logits, hidden_states_out, present_key, present_value): MTP layer 0 over new positions.
    input_ids are the tokens *after* the positions whose trunk (or chained MTP) hidden states
    are given; logits predict one token further."""

    def __init__(self, model: GLMForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        hidden_states: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_key: Tensor,
        past_value: Tensor,
    ) -> tuple[Tensor, ...]:
        logits, z, (k, v) = self.model.mtp_cached(
            input_ids, hidden_states, position_ids, (past_key, past_value), attention_mask
        )
        return logits, z, k, v


class StaticDecoderStep(nn.Module):
    """(input_ids, position_ids, *cache) -> (logits, hidden_states, *cache_out): the static-cache
    step (`forward_static`) with the cache [B, nkv, T, d] passed in and returned updated: the
    graph writes the new tokens' entries into a copy (ONNX has no in-place inputs; one
    ScatterElements per tensor there), which ONNX Runtime writes into a second preallocated
    buffer and an AOTInductor package returns as the next step's cache."""

    def __init__(self, model: GLMForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        # Clones: the exported program then has no mutated inputs, only outputs.
        out = [t.clone() for t in cache]
        pairs = [(out[i], out[i + 1]) for i in range(0, len(out), 2)]
        logits, h = self.model.forward_static(input_ids, position_ids, pairs)
        return (logits, h, *out)


class StaticMTPStep(nn.Module):
    """(input_ids, hidden_states, position_ids, cache_key, cache_value) ->
    (logits, hidden_states_out, cache_out_key, cache_out_value): `mtp_static` likewise."""

    def __init__(self, model: GLMForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, hidden_states: Tensor, position_ids: Tensor,
        key: Tensor, value: Tensor,
    ) -> tuple[Tensor, ...]:  # fmt: skip
        k, v = key.clone(), value.clone()
        logits, z = self.model.mtp_static(input_ids, hidden_states, position_ids, (k, v))
        return logits, z, k, v


class StaticVerifyStep(nn.Module):
    """(input_ids, position_ids, *cache, mtp_key, mtp_value) -> (best, accepted, trunk_ok,
    draft, draft_ok, mtp_hidden, *cache_out, mtp_key_out, mtp_value_out): the greedy round's
    first part (`greedy_verify_static`: verify, acceptance, MTP catch-up, first draft) for any
    number of drafts, so one graph replaces a verify and a catch-up call; the chained drafts
    run on `StaticMTPStep`."""

    def __init__(self, model: GLMForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        out = [t.clone() for t in caches]
        pairs = [(out[i], out[i + 1]) for i in range(0, len(out) - 2, 2)]
        verified = self.model.greedy_verify_static(input_ids, position_ids, pairs, (out[-2], out[-1]))
        return (*verified, *out)


def example_inputs(
    model: GLMForCausalLM, batch: int, seq: int, past: int, mtp: bool = False
) -> tuple[Tensor, ...]:
    """Random example tensors for tracing (fresh values: never zeros)."""
    vocab = model.model.embed_tokens.num_embeddings
    ids = torch.randint(0, vocab, (batch, seq))
    pos = (torch.arange(seq) + past).expand(batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    dtype = model.model.embed_tokens.weight.dtype
    layers: Any = model.model.mtp if mtp else model.model.layers
    att = cast(Any, layers[0]).self_attn
    kv = [torch.randn(batch, att.nkv, past, att.d, dtype=dtype) for _ in range(2 * len(layers))]
    if mtp:
        h = torch.randn(batch, seq, model.model.norm.weight.shape[0], dtype=dtype)
        return (ids, h, mask, pos, *kv)
    return (ids, mask, pos, *kv)


# The decoding runtime sizes a static cache to the longest row plus its drafts (at most 8),
# rounded up to a multiple of 64 (glmc.runtime.decode): always under max_len + 128 slots.
STATIC_CACHE_SLACK = 128


def static_trace_args(
    model: GLMForCausalLM, max_len: int, mtp: bool, verify: bool = False
) -> tuple[tuple[Tensor, ...], tuple[object, ...]]:
    """(example inputs, dynamic shapes) for tracing `StaticDecoderStep` (or `StaticMTPStep`,
    or with `verify` `StaticVerifyStep`): batch 2, 3 new tokens at positions 2..4 of a 7-slot
    cache, every size > 1 and distinct so the trace specialises on none; batch, new tokens
    and cache slots dynamic (a verify step has at least 2 tokens: the last one and a draft)."""
    from torch.export import Dim

    batch, seq, slots = 2, 3, 7
    b = Dim("batch", min=1, max=1024)
    s = Dim("sequence", min=2 if verify else 1, max=max_len)
    t = Dim("cache_sequence", min=2, max=max_len + STATIC_CACHE_SLACK)
    ids, *rest = example_inputs(model, batch, seq, slots, mtp=mtp)
    pos = (torch.arange(seq) + 2).expand(batch, seq).contiguous()
    if mtp:
        h, _mask, _pos, *kv = rest
        return (ids, h, pos, *kv), ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}, {0: b, 2: t}, {0: b, 2: t})
    _mask, _pos, *kv = rest
    if verify:
        kv += list(example_inputs(model, batch, seq, slots, mtp=True)[-2:])
    return (ids, pos, *kv), ({0: b, 1: s}, {0: b, 1: s}, tuple({0: b, 2: t} for _ in kv))
