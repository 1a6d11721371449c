"""Pipeline stages: split the trunk layers into `pp` contiguous, non-empty runs that minimise the
most expensive stage (helpers of the `shard` pass).

The embedding rides with the first layer and the final norm, output head and MTP layers with the
last, so every stage holds at least one trunk layer and their cost is counted where it runs.
Binary search on the bottleneck: a greedy left-to-right fill answers "can `pp` stages each stay
under T?" exactly for contiguous splits, so the smallest feasible T is the optimum. O(n log sum).
"""

from __future__ import annotations


def _stages_needed(costs: list[int], limit: int) -> int:
    count, acc = 1, 0
    for c in costs:
        if acc + c > limit:
            count, acc = count + 1, 0
        acc += c
    return count


def balance(costs: list[int], pp: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) unit indices per stage, minimising the largest stage sum."""
    n = len(costs)
    lo, hi = max(costs), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        if _stages_needed(costs, mid) <= pp:
            hi = mid
        else:
            lo = mid + 1
    # Fill each stage up to the bottleneck, leaving at least one unit per remaining stage.
    out, start = [], 0
    for s in range(pp):
        remaining = pp - s - 1
        end, acc = start, costs[start]
        while end + 1 < n - remaining and acc + costs[end + 1] <= lo:
            end += 1
            acc += costs[end]
        if s == pp - 1:
            end = n - 1
        out.append((start, end))
        start = end + 1
    return out
