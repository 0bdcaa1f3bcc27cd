"""Which rank solves which block: a deterministic greedy plan, the same on every rank.

Greedy longest-processing-time-first (Graham, 1969): the jobs, in decreasing order of
their modelled cost, each go to the rank with the smallest load so far. Jobs of equal
cost keep their order and equal loads go to the lowest rank, so every rank computes the
same plan from the same costs, without communication. Its largest load ``T`` satisfies

    max(sum c / P, max c)  <=  T_opt  <=  T  <=  (4/3 - 1/(3P)) T_opt,

so the work per rank falls like ``1/P`` until the largest job dominates.
"""

from __future__ import annotations

from collections.abc import Sequence


def assign(costs: Sequence[float], ranks: int) -> list[int]:
    """The owner rank of each job (``costs[i]`` its modelled FLOPs) among ``ranks``.

    >>> assign([3.0, 5.0, 2.0, 2.0], 2)
    [1, 0, 1, 0]
    """
    if ranks < 1:
        raise ValueError(f"need at least one rank, got {ranks}")
    load = [0.0] * ranks
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda i: -costs[i]):  # stable: ties by index
        rank = min(range(ranks), key=lambda p: load[p])  # ties: the lowest rank
        owners[job] = rank
        load[rank] += costs[job]
    return owners


def loads(costs: Sequence[float], owners: Sequence[int], ranks: int) -> list[float]:
    """The summed cost of each rank's jobs."""
    total = [0.0] * ranks
    for cost, owner in zip(costs, owners, strict=True):
        total[owner] += cost
    return total


def lower_bound(costs: Sequence[float], ranks: int) -> float:
    """``max(sum c / P, max c)``: no plan's largest load is smaller."""
    return max(sum(costs) / ranks, max(costs, default=0.0))


def greedy_ratio(ranks: int) -> float:
    """``4/3 - 1/(3P)``: the greedy plan's largest load over the best possible, at most."""
    return 4 / 3 - 1 / (3 * ranks)
