"""Token choice: greedy, or temperature + nucleus (top-p) sampling with a seeded generator.

`distribution` gives the processed probabilities both the plain and the speculative loop use,
so speculative sampling accepts against exactly the distribution plain sampling draws from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glmc.errors import GlmcError


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.greedy:
            if not self.temperature > 0:
                raise GlmcError(
                    f"--temperature must be > 0 (got {self.temperature}); use --greedy for argmax"
                )
            if not 0 < self.top_p <= 1:
                raise GlmcError(f"--top-p must be in (0, 1] (got {self.top_p})")

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def distribution(logits: Tensor, s: Sampling) -> Tensor:
    """logits [..., V] -> probabilities [..., V] in fp32 after temperature and top-p."""
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1:
        # Stable: among tied tokens the lower ids come first and stay, as greedy's argmax picks
        # the lowest id; an unstable sort keeps an arbitrary one of them (on CPU the choice
        # changed with the vocabulary size).
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick(logits: Tensor, s: Sampling, gen: torch.Generator) -> int:
    """One token from logits [V]."""
    if s.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(distribution(logits, s), 1, generator=gen))
