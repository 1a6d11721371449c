"""Which routed experts each expert-parallel rank holds (helpers of the `shard` pass).

- Contiguous (default): rank r holds experts [r*E/ep, (r+1)*E/ep).
- Load-aware, from a measured histogram of tokens per expert: optionally give the busiest
  experts extra replicas (`redundant_experts`, DeepSeek-V3's EPLB idea; a replica takes an equal
  share of its expert's tokens), then pack the E + R replicas onto the ranks, each rank getting
  the same number of slots, the heaviest first onto the least-loaded rank that has a free slot
  and no copy of that expert yet. Greedy "longest processing time first" is within 4/3 of the
  optimal maximum load and deterministic (ties go to the lower expert id and rank).

The histogram file is JSON: either one list of E counts (every MoE layer), or an object mapping
Hugging Face layer indices (strings; the MTP layer is num_layers + k) to lists, optionally with
a "default" list for layers it does not name. Layers without any histogram are contiguous.
"""

from __future__ import annotations

import heapq
import json
import math
from functools import lru_cache
from pathlib import Path

from .base import PassError

Placement = tuple[tuple[int, ...], ...]
MAX_HISTOGRAM_BYTES = 64 * 2**20


@lru_cache(maxsize=16)  # every layer shares one placement object (they are large at big ep)
def contiguous(num_experts: int, ep: int) -> Placement:
    per = num_experts // ep
    return tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ep))


def load_histograms(path: str, num_experts: int, moe_layers: list[int]) -> dict[int, list[float]]:
    """Layer -> tokens per expert, from the file given as `expert_load`."""
    p = Path(path)
    try:
        if not p.is_file():  # a FIFO or a device (/dev/zero) would block or never end
            raise OSError("not a regular file" if p.exists() else "no such file")
        if p.stat().st_size > MAX_HISTOGRAM_BYTES:
            raise OSError(
                f"{p.stat().st_size:,} bytes is more than a histogram needs ({MAX_HISTOGRAM_BYTES:,})"
            )
        data = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise PassError(f"shard: cannot read expert_load={path}: {e}") from None
    if isinstance(data, list):
        return {layer: _counts(data, num_experts, path, "the list") for layer in moe_layers}
    if not isinstance(data, dict):
        raise PassError(f"shard: expert_load={path} must hold a list of counts or an object of lists")
    default = data.get("default")
    out: dict[int, list[float]] = {}
    for key, counts in data.items():
        if key == "default":
            continue
        if not key.isdigit() or int(key) not in moe_layers:
            raise PassError(
                f"shard: expert_load={path} names layer {key!r}, which is not an MoE layer "
                f"(MoE layers: {moe_layers[0]}..{moe_layers[-1]})"
            )
        out[int(key)] = _counts(counts, num_experts, path, f"layer {key}")
    if default is not None:
        d = _counts(default, num_experts, path, "default")
        for layer in moe_layers:
            out.setdefault(layer, d)
    return out


def _counts(values: object, num_experts: int, path: str, where: str) -> list[float]:
    if not isinstance(values, list) or len(values) != num_experts:
        n = len(values) if isinstance(values, list) else type(values).__name__
        raise PassError(
            f"shard: expert_load={path}: {where} must list {num_experts} counts (moe.num_experts), got {n}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise PassError(f"shard: expert_load={path}: {where} has {v!r}; counts must be finite and >= 0")
        out.append(float(v))
    return out


def balanced(loads: list[float], ep: int, redundant: int) -> Placement:
    """Replicate the busiest experts `redundant` times in all, then pack replicas onto ranks."""
    return _balanced(tuple(loads), ep, redundant)


@lru_cache(maxsize=64)  # layers without a histogram of their own share one placement
def _balanced(loads: tuple[float, ...], ep: int, redundant: int) -> Placement:
    # Heaps keep this O((E + R) log(E + ep)): a plan with tens of thousands of slots is placed
    # in well under a second (a linear scan per replica took hours at ep in the thousands).
    n = len(loads)
    replicas = [1] * n
    # The expert whose replicas carry the most tokens each gets one more (at most one per rank);
    # ties go to the lower expert id.
    heap = [(-loads[i], i) for i in range(n) if ep > 1]
    heapq.heapify(heap)
    for _ in range(redundant):
        _, e = heapq.heappop(heap)
        replicas[e] += 1
        if replicas[e] < ep:
            heapq.heappush(heap, (-(loads[e] / replicas[e]), e))
    # Replicas heaviest first; an expert's replicas weigh the same, so they come one after another.
    order = sorted(range(n), key=lambda e: (-(loads[e] / replicas[e]), e))
    slots = (n + redundant) // ep
    bins: list[list[int]] = [[] for _ in range(ep)]
    weight = [0.0] * ep
    free = [(0.0, r) for r in range(ep)]  # (weight, rank) of ranks with a free slot
    for e in order:
        w = loads[e] / replicas[e]
        taken: list[int] = []  # ranks given a replica of e: no second copy there
        for _ in range(replicas[e]):
            if free:
                _, r = heapq.heappop(free)  # the least-loaded rank with a free slot, lowest id first
            else:  # every rank with a free slot already holds e
                r = _make_room(bins, e, slots)
            bins[r].append(e)
            weight[r] += w
            taken.append(r)
        for r in taken:  # _make_room may have filled one of them; only ranks with room go back
            if len(bins[r]) < slots:
                heapq.heappush(free, (weight[r], r))
    return tuple(tuple(sorted(b)) for b in bins)


def _make_room(bins: list[list[int]], e: int, slots: int) -> int:
    """Every rank with a free slot already holds `e`: move some other expert from a full rank
    without `e` into the free slot, and return that full rank (now with a free slot)."""
    for a in (r for r in range(len(bins)) if len(bins[r]) < slots):
        for b in (r for r in range(len(bins)) if e not in bins[r]):
            for x in bins[b]:
                if x not in bins[a]:
                    bins[b].remove(x)
                    bins[a].append(x)
                    return b
    raise PassError(f"shard: cannot place the replicas of expert {e} on distinct ranks")
