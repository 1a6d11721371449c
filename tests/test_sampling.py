"""Token choice (glmc/runtime/sampling.py) and speculative sampling (glmc/runtime/decode.py)
against hand-computed distributions.

Exact checks: the filtered distribution of fixed logits after temperature and top-p (kept sets
written out by hand, ties and top-p edges included) and greedy choice. Seeded Monte-Carlo checks:
what `pick` draws, and what speculative sampling commits when the draft model differs from the
target, must follow the target distribution (the README's "same output distribution"). Each
Monte-Carlo bound holds with probability > 1 - 1e-6 for any seed on a correct implementation
(Bretagnolle-Huber-Carol), and the seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from glmc.errors import GlmcError
from glmc.runtime import Sampling, generate
from glmc.runtime.backend import GraphBackend
from glmc.runtime.decode import _accept
from glmc.runtime.sampling import distribution, pick

# Probability that a correct implementation fails one Monte-Carlo check, whatever the seed.
FALSE_FAILURE = 1e-6


def _logits(probs: list[float], shift: float = 3.0) -> Tensor:
    """Logits whose softmax is `probs` (a constant shift changes nothing)."""
    return torch.tensor(probs, dtype=torch.float64).log().float() + shift


def _l1_bound(n: int, categories: int, delta: float) -> float:
    """Bretagnolle-Huber-Carol: for n i.i.d. draws from p over k categories, the empirical
    frequencies p_hat satisfy P(||p_hat - p||_1 >= eps) <= 2^k exp(-n eps^2 / 2); the eps at
    which that probability is `delta`."""
    return math.sqrt(2 * (categories * math.log(2) + math.log(1 / delta)) / n)


def _l1(counts: Tensor, p: Tensor) -> float:
    return float((counts.double() / counts.sum() - p.double()).abs().sum())


# ---- temperature and top-p on fixed logits ------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        (1.0, [1 / 7, 2 / 7, 4 / 7]),
        (2.0, [1 / (3 + math.sqrt(2)), math.sqrt(2) / (3 + math.sqrt(2)), 2 / (3 + math.sqrt(2))]),
        (0.5, [1 / 21, 4 / 21, 16 / 21]),
    ],
)
def test_temperature_divides_the_logits(temperature: float, expected: list[float]) -> None:
    logits = _logits([1 / 7, 2 / 7, 4 / 7])  # logits 0, ln 2, ln 4 (+ shift)
    got = distribution(logits, Sampling(greedy=False, temperature=temperature))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


# Token ids deliberately not in probability order. Sorted: id 1 (0.5), id 3 (0.25), then ids 0
# and 4 tied at 0.1, then id 2 (0.05); prefix masses 0.5, 0.75, 0.85, 0.95, 1.0.
PROBS = [0.1, 0.5, 0.05, 0.25, 0.1]


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (1e-6, {1}),  # the most likely token always stays
        (0.5 - 1e-4, {1}),
        (0.5, {1}),  # exactly reached by the first token: the prefix stops there
        (0.5 + 1e-4, {1, 3}),
        (0.75 + 1e-4, {1, 3, 0}),  # one of the tied 0.1 tokens: the lower id
        (0.85 + 1e-4, {1, 3, 0, 4}),
        (0.95 + 1e-4, {0, 1, 2, 3, 4}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p: float, kept: set[int]) -> None:
    got = distribution(_logits(PROBS), Sampling(greedy=False, top_p=top_p))
    mass = sum(PROBS[i] for i in kept)
    expected = torch.tensor([PROBS[i] / mass if i in kept else 0.0 for i in range(len(PROBS))])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert {i for i in range(len(PROBS)) if got[i] > 0} == kept


def test_top_p_ties_at_the_cut_keep_the_lowest_ids_in_a_large_vocabulary() -> None:
    """Five tokens tie for second place, scattered over a 151k vocabulary; top-p needs two of
    them. The kept ones are the two lowest ids, as greedy's argmax prefers the lowest id (the
    order must not depend on the sort's internals)."""
    vocab = 151552
    logits = torch.full((vocab,), -30.0)
    logits[77_000] = 2.0
    tied = [150_001, 3, 99_999, 4096, 75_776]
    logits[tied] = 1.0
    probs = torch.softmax(logits.double(), -1)
    top, second = float(probs[77_000]), float(probs[3])
    top_p = top + 1.5 * second  # reached within the second tied token
    got = distribution(logits, Sampling(greedy=False, top_p=top_p))
    assert {int(i) for i in got.nonzero()} == {77_000, 3, 4096}
    torch.testing.assert_close(
        got[[77_000, 3, 4096]].double(),
        torch.tensor([top, second, second], dtype=torch.float64) / (top + 2 * second),
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        # softmax [0.6, 0.3, 0.1]: top_p 0.7 needs two tokens
        (1.0, [2 / 3, 1 / 3, 0.0]),
        # sharper, [36, 9, 1] / 46: the first token alone holds 0.78 >= 0.7
        (0.5, [1.0, 0.0, 0.0]),
        # flatter, [sqrt 6, sqrt 3, 1] / 5.18: 0.47, then 0.81 >= 0.7
        (
            2.0,
            [math.sqrt(6) / (math.sqrt(6) + math.sqrt(3)), math.sqrt(3) / (math.sqrt(6) + math.sqrt(3)), 0.0],
        ),
    ],
)
def test_top_p_applies_to_the_tempered_distribution(temperature: float, expected: list[float]) -> None:
    got = distribution(_logits([0.6, 0.3, 0.1]), Sampling(greedy=False, temperature=temperature, top_p=0.7))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


def test_distribution_filters_each_row_of_a_batch() -> None:
    rows = [PROBS, [0.05, 0.05, 0.6, 0.2, 0.1], [0.2] * 5]
    s = Sampling(greedy=False, temperature=0.7, top_p=0.8)
    logits = torch.stack([_logits(r, shift=float(i)) for i, r in enumerate(rows)]).reshape(3, 1, 5)
    got = distribution(logits, s)
    assert got.shape == (3, 1, 5)
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i, 0], distribution(_logits(r), s))


def test_greedy_pick_is_the_argmax_and_the_lowest_id_on_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    assert pick(_logits(PROBS), Sampling(), gen) == 1
    tied = torch.tensor([0.0, 2.0, -1.0, 2.0, 2.0])
    assert pick(tied, Sampling(), gen) == 1
    assert pick(tied[[3, 4, 0, 1, 2]], Sampling(), gen) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"temperature": float("nan")}, "temperature must be > 0"),
        ({"top_p": 0.0}, r"top-p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top-p must be in \(0, 1\]"),
        ({"top_p": float("nan")}, r"top-p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(GlmcError, match=match):
        Sampling(greedy=False, **kwargs)


# ---- Monte Carlo: what pick draws ---------------------------------------------------------------


def test_sampled_pick_draws_from_the_filtered_distribution() -> None:
    s = Sampling(greedy=False, temperature=0.8, top_p=0.85, seed=11)
    logits = _logits(PROBS)
    want = distribution(logits, s)
    assert (want > 0).sum() == 3  # the filter really removes tokens at this temperature
    gen = s.generator()
    n = 8_000
    counts = torch.bincount(torch.tensor([pick(logits, s, gen) for _ in range(n)]), minlength=5)
    assert counts[want == 0].sum() == 0, counts
    assert _l1(counts, want) < _l1_bound(n, 5, FALSE_FAILURE)
    # the seed alone decides the draws
    a, b = s.generator(), s.generator()
    assert [pick(logits, s, a) for _ in range(64)] == [pick(logits, s, b) for _ in range(64)]


# ---- Monte Carlo: speculative sampling commits target-distributed tokens ------------------------

# The draft prefers other tokens than the target, but their supports still overlap after top-p
# (with disjoint supports every draft is rejected and a residual of p itself would pass). A
# residual drawn from p instead of norm(max(p - q, 0)) moves the output by L1 0.41 (plain) and
# 0.42 (tempered, top-p), accepting every draft by 0.9 and 1.4; the bound at n = 6000 is 0.079.
TARGET = [0.35, 0.25, 0.2, 0.1, 0.06, 0.04]
DRAFT = [0.05, 0.4, 0.05, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(
    "s",
    [
        Sampling(greedy=False, temperature=1.0, seed=5),
        Sampling(greedy=False, temperature=0.7, top_p=0.85, seed=6),
    ],
    ids=["plain", "tempered-top-p"],
)
def test_rejection_and_residual_give_the_target_distribution(s: Sampling) -> None:
    """One draft per round: the committed token must be distributed as the target p, although
    drafts come from q != p (accept with min(1, p/q), else draw from norm(max(p - q, 0)))."""
    target_logits = torch.stack([_logits(TARGET), _logits(TARGET[::-1])])  # row 1: the bonus token
    draft_logits = _logits(DRAFT)
    p, q = distribution(target_logits[0], s), distribution(draft_logits, s)
    gen = torch.Generator().manual_seed(s.seed or 0)
    n = 6_000
    first = torch.empty(n, dtype=torch.int64)
    accepted = 0
    for i in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        out = _accept(target_logits, [d], [q], s, gen)
        first[i] = out[0]
        accepted += len(out) == 2
    counts = torch.bincount(first, minlength=6)
    assert _l1(counts, p) < _l1_bound(n, 6, FALSE_FAILURE / 2), (counts.tolist(), p.tolist())
    # acceptance rate is sum(min(p, q)); a binomial n, r stays within +-6 sigma
    rate = float(torch.minimum(p, q).sum())
    assert abs(accepted - n * rate) < 6 * math.sqrt(n * rate * (1 - rate)) + 1, (accepted, n * rate)


class _MarkovBackend(GraphBackend):
    """A Backend whose next-token logits depend only on the current token: row x of `target`
    for the trunk, row x of `draft` for the MTP layer. The target process is then a Markov chain
    with transition distribution(target[x]); speculative decoding must reproduce that chain
    whatever the drafts. Caches hold no values (width 0), only their lengths, which the fake
    checks against positions and masks like a real model would rely on them (the decoding
    loop's static cache reaches it through the exported graphs' calling convention)."""

    name = "markov"
    has_mtp = True

    def __init__(self, target: Tensor, draft: Tensor, context: int) -> None:
        self.target, self.draft = target, draft
        self.spec = SimpleNamespace(vocab_size=target.shape[0], max_position_embeddings=context)

    def empty_cache(self) -> list[tuple[Tensor, Tensor]]:
        return [(torch.zeros(1, 1, 0, 0), torch.zeros(1, 1, 0, 0))]

    def empty_mtp_cache(self) -> tuple[Tensor, Tensor]:
        return torch.zeros(1, 1, 0, 0), torch.zeros(1, 1, 0, 0)

    @staticmethod
    def _grow(
        kv: tuple[Tensor, Tensor], ids: Tensor, positions: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        past = kv[0].shape[2]
        s = ids.shape[1]
        assert positions.tolist() == [list(range(past, past + s))], (past, positions)
        assert mask.shape == (1, past + s)
        grown = torch.zeros(1, 1, past + s, 0)
        return grown, grown

    def forward(
        self, ids: Tensor, positions: Tensor, past: list[tuple[Tensor, Tensor]], mask: Tensor
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        grown = self._grow(past[0], ids, positions, mask)
        hidden = ids[..., None].float()  # the MTP step reads it back: h_t carries token t
        return self.target[ids], hidden, [grown]

    def mtp(
        self, ids: Tensor, h: Tensor, positions: Tensor, past: tuple[Tensor, Tensor], mask: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        assert h.shape[:2] == ids.shape, (h.shape, ids.shape)
        grown = self._grow(past, ids, positions, mask)
        return self.draft[ids], ids[..., None].float(), grown


def _circulant(row: list[float]) -> Tensor:
    """Logits of the chain x -> x + j (mod V) with probability row[j]."""
    return torch.stack([_logits(row).roll(x) for x in range(len(row))])


def test_speculative_generation_follows_the_target_chain() -> None:
    """The whole loop (catch-up and chained drafts from the MTP step, verify, accept, residual,
    bonus token, cache cut-back) on a 4-token Markov chain: each token's distribution given the
    one before must be the target's, within the bound for the visits of that state. Circulant
    chains visit every state about equally; the draft prefers other moves than the target."""
    target = _circulant([0.1, 0.5, 0.25, 0.15])
    draft = _circulant([0.3, 0.1, 0.2, 0.4])
    s = Sampling(greedy=False, temperature=0.9, top_p=0.9, seed=100)
    n = 4_000
    backend = _MarkovBackend(target, draft, context=n + 10)
    out, stats = generate(backend, [0], n, s, draft_tokens=2)
    assert len(out) == n
    assert 1.2 < stats.mean_acceptance_length < 3  # drafts are accepted, though not always
    seq = torch.tensor([0, *out])
    want = distribution(target, s)
    assert (want == 0).sum() == 4  # top-p drops the 0.1 move from every state
    for x in range(4):
        nxt = seq[1:][seq[:-1] == x]
        assert len(nxt) > n / 8, (x, len(nxt))
        counts = torch.bincount(nxt, minlength=4)
        assert counts[want[x] == 0].sum() == 0, (x, counts)
        bound = _l1_bound(len(nxt), 4, FALSE_FAILURE / 4)
        assert _l1(counts, want[x]) < bound, (x, counts.tolist(), want[x].tolist(), bound)
