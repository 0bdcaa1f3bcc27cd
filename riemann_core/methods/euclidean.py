"""``G = I``: the direction is the gradient itself (the baseline)."""

from __future__ import annotations

from ._base import Options, Problem
from ._solve import Solve

NEEDS_FACTOR = False


def solve(problem: Problem, opts: Options) -> list[Solve]:
    return [
        Solve(name=b.name, kernel="", solver="none", indices=[i], x=[g.clone() for g in grads])
        for i, (b, grads) in enumerate(zip(problem.blocks, problem.gradient, strict=True))
    ]
