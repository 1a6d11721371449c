"""The decoding loop: prefill, then plain decode or MTP speculation, over any Backend.

Speculation (DeepSeek-V3 / GLM-4.5 MTP, one MTP layer reused for K drafts as TensorRT-LLM's
MTP-Eagle and SGLang do). Invariant at the top of a round: `seq` holds every committed token;
the trunk cache covers seq[:-1]; `pending_h` holds trunk hidden states of the positions the
MTP cache does not cover yet (the MTP layer at position t reads h_t and token t+1).
1. catch up: one MTP call over the pending positions; its last logits give draft d1;
2. chain: K-1 more MTP calls, each on the previous MTP hidden state and draft (the
   speculative MTP cache entries are dropped afterwards: they saw drafts, not the trunk);
3. verify: one trunk forward over [seq[-1], d1..dK]; keep the longest accepted prefix plus
   the trunk's own next token; cut the trunk cache back to the committed tokens.
Greedy acceptance is exact match, so greedy output equals plain greedy decoding. Sampling
uses speculative sampling (accept d with prob min(1, p(d)/q(d)), else draw from
norm(max(p - q, 0))), which leaves the output distribution unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from glmc.errors import GlmcError
from glmc.runtime.backend import KV, Backend
from glmc.runtime.sampling import Sampling, distribution, pick

MAX_DRAFT_TOKENS = 8


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    rounds: int = 0  # trunk forwards after prefill
    accepted_per_round: list[int] = field(default_factory=list)  # tokens committed per round

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which prefill produces) per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per trunk forward in decode (1.0 without speculation)."""
        a = self.accepted_per_round
        return sum(a) / len(a) if a else 0.0


def generate(
    backend: Backend,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),  # noqa: B008 (frozen dataclass: a safe default)
    draft_tokens: int = 0,
    eos_token_ids: tuple[int, ...] = (),
) -> tuple[list[int], Stats]:
    """New tokens after `prompt` (at most max_new_tokens, fewer at EOS or the context end)."""
    context = backend.spec.max_position_embeddings
    _check(backend, prompt, max_new_tokens, draft_tokens, context)
    gen = sampling.generator()
    stats = Stats(prompt_tokens=len(prompt))
    seq = list(prompt)
    t0 = time.perf_counter()
    logits, h, past = backend.forward(_ids(seq), _pos(0, len(seq)), backend.empty_cache(), _mask(len(seq)))
    _require_finite(backend, logits[0, -1:], len(seq) - 1)
    seq.append(pick(logits[0, -1], sampling, gen))
    stats.prefill_s = time.perf_counter() - t0
    limit = min(len(prompt) + max_new_tokens, context)
    pending_h, mtp_past = h, backend.empty_mtp_cache()
    t0 = time.perf_counter()
    while len(seq) < limit and seq[-1] not in eos_token_ids:
        k = min(draft_tokens, limit - len(seq) - 1, context - len(seq))
        if k <= 0:
            logits, _, past = backend.forward(_ids(seq[-1:]), _pos(len(seq) - 1, 1), past, _mask(len(seq)))
            _require_finite(backend, logits[0, -1:], len(seq) - 1)
            new = [pick(logits[0, -1], sampling, gen)]
        else:
            new, past, pending_h, mtp_past = _speculate(
                backend, seq, past, pending_h, mtp_past, k, sampling, gen
            )
        stats.rounds += 1
        stats.accepted_per_round.append(len(new))
        seq += new
    stats.decode_s = time.perf_counter() - t0
    out = seq[len(prompt) :][:max_new_tokens]
    for i, t in enumerate(out):
        if t in eos_token_ids:
            out = out[: i + 1]
            break
    stats.new_tokens = len(out)
    return out, stats


def _speculate(
    backend: Backend,
    seq: list[int],
    past: list[KV],
    pending_h: Tensor,
    mtp_past: KV,
    k: int,
    s: Sampling,
    gen: torch.Generator,
) -> tuple[list[int], list[KV], Tensor, KV]:
    n = len(seq)
    m0 = mtp_past[0].shape[2]  # MTP positions already cached: 0..m0-1; pending: m0..n-2
    lg, z, mtp_past = backend.mtp(
        _ids(seq[m0 + 1 : n]), pending_h, _pos(m0, n - 1 - m0), mtp_past, _mask(n - 1)
    )
    drafts: list[int] = []
    qs: list[Tensor] = []
    chain_past, z_last, d_logits = mtp_past, z[:, -1:], lg[0, -1]
    for j in range(k):
        if j > 0:
            lg, z_last, chain_past = backend.mtp(
                _ids(drafts[-1:]), z_last, _pos(n - 2 + j, 1), chain_past, _mask(n - 1 + j)
            )
            d_logits = lg[0, -1]
        _require_finite(backend, d_logits[None], n - 1 + j, "MTP draft")
        if s.greedy:
            drafts.append(int(d_logits.argmax()))
        else:
            q = distribution(d_logits, s)
            qs.append(q)
            drafts.append(int(torch.multinomial(q, 1, generator=gen)))
    logits, h, grown = backend.forward(_ids([seq[-1], *drafts]), _pos(n - 1, k + 1), past, _mask(n + k))
    _require_finite(backend, logits[0], n - 1)
    new = _accept(logits[0], drafts, qs, s, gen)
    keep = n + len(new) - 1  # trunk entries for positions 0..n-2+len(new)
    past = [(kk[:, :, :keep], vv[:, :, :keep]) for kk, vv in grown]
    return new, past, h[:, : len(new)], mtp_past


def _accept(
    target_logits: Tensor, drafts: list[int], qs: list[Tensor], s: Sampling, gen: torch.Generator
) -> list[int]:
    """Committed tokens: the accepted drafts, then one token from the trunk."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        if s.greedy:
            best = int(target_logits[i].argmax())
            if best != d:
                return [*out, best]
        else:
            p, q = distribution(target_logits[i], s), qs[i]
            if torch.rand((), generator=gen) * q[d] >= p[d]:  # reject with prob 1 - min(1, p/q)
                residual = (p - q).clamp_min(0)
                total = residual.sum()
                nxt = torch.multinomial(residual / total if total > 0 else p, 1, generator=gen)
                return [*out, int(nxt)]
        out.append(d)
    return [*out, pick(target_logits[len(drafts)], s, gen)]


def _require_finite(backend: Backend, logits: Tensor, position: int, what: str = "trunk") -> None:
    """Refuse to pick tokens from NaN/Inf logits: argmax of NaNs is token 0 and sampling
    fails inside torch.multinomial, so either way the output would be meaningless."""
    ok = torch.isfinite(logits).all(dim=-1)
    if bool(ok.all()):
        return
    at = position + int((~ok).nonzero()[0, 0])
    raise GlmcError(
        f"the {backend.name} artifact's {what} logits at position {at} hold NaN or Inf (non-finite weights, "
        "or activations overflowing the artifact's dtype); no token can be chosen from them"
    )


def _check(backend: Backend, prompt: list[int], max_new: int, draft_tokens: int, context: int) -> None:
    if not prompt:
        raise GlmcError("the prompt is empty: give at least one token")
    vocab = backend.spec.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise GlmcError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if len(prompt) >= context:
        raise GlmcError(
            f"the prompt has {len(prompt)} tokens but the model's context is {context} "
            "(max_position_embeddings): shorten the prompt"
        )
    if max_new < 1:
        raise GlmcError(f"--max-new-tokens must be at least 1 (got {max_new})")
    if draft_tokens and not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise GlmcError(f"--draft-tokens must be in 1..{MAX_DRAFT_TOKENS} (got {draft_tokens})")
    if draft_tokens and not backend.has_mtp:
        raise GlmcError(
            f"--speculative mtp needs MTP weights, but this {backend.name} artifact has no MTP layer "
            "(num_mtp_layers = 0, or a checkpoint saved without model.layers.{num_layers}.* tensors); "
            "drop --speculative"
        )


def _ids(tokens: list[int]) -> Tensor:
    return torch.tensor([tokens], dtype=torch.int64)


def _pos(start: int, n: int) -> Tensor:
    return torch.arange(start, start + n, dtype=torch.int64)[None]


def _mask(total: int) -> Tensor:
    return torch.ones(1, total, dtype=torch.int64)
