"""The decoding loop: prefill, then plain decode or MTP speculation, over any Backend, for one
prompt or a batch of prompts of different lengths (each row stops at its own EOS or budget).

The loop runs on static-cache steps (glmc.runtime.steps): slot t of a row's cache holds its
position t, so rows advance independently, and after the prefill every step has the same
shape (plain: 1 token per row; speculation: a K+1-token verify, a K+1-token MTP catch-up and
1-token MTP drafts), which is what lets the torch backend compile each once.

Speculation (DeepSeek-V3 / GLM-4.5 MTP, one MTP layer reused for K drafts as TensorRT-LLM's
MTP-Eagle and SGLang do). Invariant per row at the top of a round: `seq` holds every committed
token (n of them); the trunk cache covers positions 0..n-2; `pending` holds the trunk hidden
states of the positions the MTP cache does not cover yet (the MTP layer at position t reads
h_t and token t+1). The prefill ends with one MTP call over the whole prompt.
1. catch up: one MTP call over the pending positions (1..K+1 of them, padded to K+1); the
   logits at the last real one give draft d1;
2. chain: K-1 more MTP calls, each on the previous MTP hidden state and draft (what they
   write into the MTP cache saw drafts, not the trunk: the next catch-up writes over it);
3. verify: one trunk forward over [seq[-1], d1..dK]; keep the longest accepted prefix plus
   the trunk's own next token (cut to the row's budget); entries of rejected drafts stay in
   the cache past the row's tokens until the next verify overwrites them.
Greedy speculation on steps that have `greedy_round` (the torch backend; aoti folders with
`verify_static.pt2` chain the drafts after it in separate calls) runs 3 and 1-2 as one call a
round: verify, acceptance by exact match, catch-up over the K+1 verify positions
with the trunk's own argmax tokens as next tokens (the entries past the accepted ones are
overwritten next round before any query sees them), and the next round's chained drafts.
Greedy acceptance is exact match, so greedy output equals plain greedy decoding. Sampling
uses speculative sampling (accept d with prob min(1, p(d)/q(d)), else draw from
norm(max(p - q, 0))), which leaves the output distribution unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from glmc.errors import GlmcError
from glmc.runtime.backend import Backend
from glmc.runtime.sampling import Sampling, distribution, pick
from glmc.runtime.steps import GreedyRounds

MAX_DRAFT_TOKENS = 8


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # the trunk over the prompts (and, speculating, the MTP layer)
    decode_s: float = 0.0  # everything after: drafts, verifies, catch-ups, plain steps
    compile_s: float = 0.0  # compiling and warming up the fixed-shape steps (before timing)
    batch: int = 1
    rounds: int = 0  # trunk forwards after prefill
    accepted_per_round: list[int] = field(default_factory=list)  # tokens committed per row and round

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after each row's first (which prefill produces) per second of decoding."""
        after = self.new_tokens - self.batch
        return after / self.decode_s if self.decode_s > 0 and after > 0 else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per row and trunk forward in decode (1.0 without speculation)."""
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
    (out,), stats = generate_batch(backend, [prompt], max_new_tokens, sampling, draft_tokens, eos_token_ids)
    return out, stats


def generate_batch(
    backend: Backend,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),  # noqa: B008 (frozen dataclass: a safe default)
    draft_tokens: int = 0,
    eos_token_ids: tuple[int, ...] = (),
) -> tuple[list[list[int]], Stats]:
    """New tokens after each prompt, all prompts decoded together (greedy output equals each
    prompt decoded alone). A backend that takes one row at a time decodes them in turn."""
    if not prompts:
        raise GlmcError("no prompts: give at least one")
    context = backend.spec.max_position_embeddings
    for i, p in enumerate(prompts):
        _check(
            backend, p, max_new_tokens, draft_tokens, context, f"prompt {i + 1}: " if len(prompts) > 1 else ""
        )
    if backend.max_batch is not None and len(prompts) > backend.max_batch:
        outs: list[list[int]] = []
        total = Stats(batch=0)
        for i in range(0, len(prompts), backend.max_batch):
            o, st = generate_batch(
                backend,
                prompts[i : i + backend.max_batch],
                max_new_tokens,
                sampling,
                draft_tokens,
                eos_token_ids,
            )
            outs += o
            _add(total, st)
        return outs, total
    with torch.inference_mode():
        return _Loop(backend, prompts, max_new_tokens, sampling, draft_tokens, eos_token_ids).run()


def _add(total: Stats, st: Stats) -> None:
    total.prompt_tokens += st.prompt_tokens
    total.new_tokens += st.new_tokens
    total.prefill_s += st.prefill_s
    total.decode_s += st.decode_s
    total.compile_s += st.compile_s
    total.batch += st.batch
    total.rounds += st.rounds
    total.accepted_per_round += st.accepted_per_round


class _Loop:
    def __init__(
        self,
        backend: Backend,
        prompts: list[list[int]],
        max_new: int,
        sampling: Sampling,
        k: int,
        eos: tuple[int, ...],
    ) -> None:
        self.backend, self.s, self.k, self.eos = backend, sampling, k, eos
        self.prompts = prompts
        self.b = len(prompts)
        context = backend.spec.max_position_embeddings
        self.limit = [min(len(p) + max_new, context) for p in prompts]
        self.max_new = max_new
        # Verify writes up to position n-1+K < limit+K; drafts past a row's budget are computed
        # (shapes stay fixed) and never committed.
        self.length = _bucket(max(self.limit) + k + 1)
        self.steps = backend.steps(self.b, self.length)
        self.gen = sampling.generator()
        self.seq = [list(p) for p in prompts]
        self.rows = torch.arange(self.b)
        self.stats = Stats(prompt_tokens=sum(map(len, prompts)), batch=self.b)

    def done(self, r: int) -> bool:
        return len(self.seq[r]) >= self.limit[r] or self.seq[r][-1] in self.eos

    def run(self) -> tuple[list[list[int]], Stats]:
        try:
            return self._run()
        except GlmcError:
            # Non-finite logits: NaN or Inf may now sit in cache slots, and attention weighs a
            # masked slot by exactly 0, but 0 * NaN is NaN. Later calls start on fresh caches.
            self.backend.forget_steps(self.b, self.length)
            raise

    def _run(self) -> tuple[list[list[int]], Stats]:
        st = self.stats
        st.compile_s = self.steps.warm_up(self.k, greedy=self.s.greedy)
        t0 = time.perf_counter()
        lens = [len(p) for p in self.prompts]
        width = max(lens)
        pos = torch.arange(width).expand(self.b, width).contiguous()
        logits, h = self.steps.trunk(_ids([_pad(p, width) for p in self.seq]), pos, prefill=True)
        for r, n in enumerate(lens):
            _require_finite(self.backend, logits[r, n - 1 : n], n - 1)
            self.seq[r].append(pick(logits[r, n - 1], self.s, self.gen))
        active = [r for r in range(self.b) if not self.done(r)]
        speculate = bool(active and self.k)
        if speculate:
            # The MTP layer over the whole prompt (position t reads h_t and token t+1, the last
            # one the pick above) is prompt work like the trunk's pass: it counts as prefill.
            lg, z = self.steps.mtp(_ids([_pad(q[1:], width) for q in self.seq]), h, pos, prefill=True)
        st.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if speculate:
            self._speculate(lg, z)
        elif active:
            self._plain()
        st.decode_s = time.perf_counter() - t0
        outs = []
        for r, p in enumerate(self.prompts):
            out = self.seq[r][len(p) :][: self.max_new]
            for i, t in enumerate(out):
                if t in self.eos:
                    out = out[: i + 1]
                    break
            outs.append(out)
        st.new_tokens = sum(map(len, outs))
        return outs, st

    def _plain(self) -> None:
        while True:
            active = [r for r in range(self.b) if not self.done(r)]
            if not active:
                return
            ids = _ids([[q[-1]] for q in self.seq])
            pos = torch.tensor([[len(q) - 1] for q in self.seq])
            logits, _ = self.steps.trunk(ids, pos)
            best = logits[:, 0].argmax(-1).tolist() if self.s.greedy else []  # one op for every row
            for r in active:
                n = len(self.seq[r])
                _require_finite(self.backend, logits[r], n - 1)
                self.seq[r].append(best[r] if self.s.greedy else pick(logits[r, 0], self.s, self.gen))
                self.stats.accepted_per_round.append(1)
            self.stats.rounds += 1

    def _speculate(self, lg: Tensor, z: Tensor) -> None:
        """Rounds from the MTP prefill's draft logits `lg` and hidden states `z` [B, width, .]."""
        k, s, gen = self.k, self.s, self.gen
        last = [len(p) - 1 for p in self.prompts]  # index of the catch-up's last real position
        greedy_rounds = s.greedy and callable(getattr(self.steps, "greedy_round", None))
        rounds = cast(GreedyRounds, self.steps) if greedy_rounds else None
        while True:
            active = [r for r in range(self.b) if not self.done(r)]
            if not active:
                return
            drafts, qs = self._draft(lg, z, last, active)
            if rounds is not None:
                return self._greedy_rounds(rounds, drafts)
            logits, hv = self.steps.trunk(*self._verify_inputs(drafts))
            pending = [1] * self.b
            for r in active:
                n = len(self.seq[r])
                _require_finite(self.backend, logits[r], n - 1)
                new = _accept(logits[r], drafts[r], qs[r], s, gen)[: self.limit[r] - n]
                self.seq[r] += new
                pending[r] = len(new)
                self.stats.accepted_per_round.append(len(new))
            self.stats.rounds += 1
            if all(self.done(r) for r in range(self.b)):
                return
            # Catch-up: the pending positions n_old-1 .. n-2 of each row, padded to K+1.
            start = [len(q) - 1 - c for q, c in zip(self.seq, pending, strict=True)]
            ids = _ids(
                [_pad(q[m + 1 : m + 1 + c], k + 1) for q, m, c in zip(self.seq, start, pending, strict=True)]
            )
            pos = _ids([list(range(m, m + k + 1)) for m in start])
            lg, z = self.steps.mtp(ids, hv, pos)
            last = [c - 1 for c in pending]

    def _verify_inputs(self, drafts: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Each row's [last committed token, d1..dK] and their positions n-1 .. n-1+K."""
        ids = _ids([[q[-1], *d] for q, d in zip(self.seq, drafts, strict=True)])
        pos = _ids([list(range(len(q) - 1, len(q) + self.k)) for q in self.seq])
        return ids, pos

    def _draft(
        self, lg: Tensor, z: Tensor, last: list[int], active: list[int]
    ) -> tuple[list[list[int]], list[list[Tensor]]]:
        """K drafts per row: from the catch-up's logits `lg` at each row's last real position,
        then K-1 chained MTP steps; with sampling, also each draft's distribution."""
        k, s, gen = self.k, self.s, self.gen
        drafts: list[list[int]] = [[] for _ in range(self.b)]
        qs: list[list[Tensor]] = [[] for _ in range(self.b)]
        at = (self.rows, torch.tensor(last))  # each row's last real catch-up position
        z_last, d_logits = z[at][:, None], lg[at]
        for j in range(k):
            if j > 0:
                ids = _ids([[d[-1]] for d in drafts])
                pos = torch.tensor([[len(q) - 2 + j] for q in self.seq])
                lg1, z_last = self.steps.mtp(ids, z_last, pos)
                d_logits = lg1[:, 0]
            best = d_logits.argmax(-1).tolist() if s.greedy else []  # one op for every row
            for r in range(self.b):
                if r in active:
                    _require_finite(self.backend, d_logits[r][None], len(self.seq[r]) - 1 + j, "MTP draft")
                if s.greedy:
                    drafts[r].append(best[r])
                elif r in active:
                    q = distribution(d_logits[r], s)
                    qs[r].append(q)
                    drafts[r].append(int(torch.multinomial(q, 1, generator=gen)))
                else:
                    drafts[r].append(0)
        return drafts, qs

    def _greedy_rounds(self, rounds: GreedyRounds, drafts: list[list[int]]) -> None:
        """Greedy speculation with one call a round (verify, acceptance, MTP catch-up and the
        next drafts in one graph): the same tokens as the three-call loop above."""
        k = self.k
        while True:
            active = [r for r in range(self.b) if not self.done(r)]
            if not active:
                return
            ids, pos = self._verify_inputs(drafts)
            best_t, accepted_t, drafts_t, trunk_ok, draft_ok = rounds.greedy_round(ids, pos, k)
            best, accepted, drafts = best_t.tolist(), accepted_t.tolist(), drafts_t.tolist()
            finite = bool(trunk_ok.all())  # the common case in one op
            for r in active:
                n = len(self.seq[r])
                if not finite:
                    _require_ok(self.backend, trunk_ok[r], n - 1)
                new = best[r][: accepted[r] + 1][: self.limit[r] - n]
                self.seq[r] += new
                self.stats.accepted_per_round.append(len(new))
            self.stats.rounds += 1
            if not bool(draft_ok.all()):
                for r in range(self.b):
                    if not self.done(r):
                        _require_ok(self.backend, draft_ok[r], len(self.seq[r]) - 1, "MTP draft")


def _bucket(n: int) -> int:
    """Cache length rounded up (to a multiple of 64), so nearby requests share compiled steps."""
    return -(-n // 64) * 64


def _pad(tokens: list[int], width: int) -> list[int]:
    """Right padding with token 0: padded positions sit past the row's tokens (see steps)."""
    return [*tokens, *[0] * (width - len(tokens))]


def _accept(
    target_logits: Tensor, drafts: list[int], qs: list[Tensor], s: Sampling, gen: torch.Generator
) -> list[int]:
    """Committed tokens: the accepted drafts, then one token from the trunk."""
    out: list[int] = []
    if s.greedy:
        best = target_logits.argmax(-1).tolist()  # one op for every position
        for i, d in enumerate(drafts):
            if best[i] != d:
                return [*out, best[i]]
            out.append(d)
        return [*out, best[len(drafts)]]
    for i, d in enumerate(drafts):
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
    if math.isfinite(float(logits.sum())):
        return  # the common case in one op: a NaN or Inf anywhere makes the sum non-finite
    _require_ok(backend, torch.isfinite(logits).all(dim=-1), position, what)


def _require_ok(backend: Backend, ok: Tensor, position: int, what: str = "trunk") -> None:
    """`ok` [S]: whether the logits at positions position .. position+S-1 are all finite."""
    if bool(ok.all()):
        return  # finite logits (whose sum, for _require_finite, overflowed)
    at = position + int((~ok).nonzero()[0, 0])
    raise GlmcError(
        f"the {backend.name} artifact's {what} logits at position {at} hold NaN or Inf (non-finite weights, "
        "or activations overflowing the artifact's dtype); no token can be chosen from them"
    )


def _check(
    backend: Backend, prompt: list[int], max_new: int, draft_tokens: int, context: int, which: str = ""
) -> None:
    if not prompt:
        raise GlmcError(f"{which}the prompt is empty: give at least one token")
    vocab = backend.spec.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise GlmcError(f"{which}prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if len(prompt) >= context:
        raise GlmcError(
            f"{which}the prompt has {len(prompt)} tokens but the model's context is {context} "
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


def _ids(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64)
