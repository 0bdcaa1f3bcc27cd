"""The whole damped GGN ``G = mu I + K^T K`` as a dense ``n x n`` matrix, Cholesky-solved.

``O(n^2 d + n^3)`` time and ``O(n^2)`` memory: the reference the layerwise metric is
measured against, and an oracle for ``natural`` (same matrix, other algebra).
"""

from __future__ import annotations

import torch

from ..woodbury import cholesky_in_place, largest_eigenvalue
from ._base import Options, Problem
from ._solve import Solve
from .layerwise import damped, dense_solver

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options) -> list[Solve]:
    def rebuild():
        K = torch.cat([h.K() for h in problem.handlers], dim=1)
        return damped(K.T @ K, opts.damping).mT  # symmetric: its column-major copy

    G = rebuild()
    n = G.shape[0]
    condition = largest_eigenvalue(G) / opts.damping
    chol = cholesky_in_place(G)
    indices = list(range(len(problem.blocks)))
    v = [a for i in indices for a in problem.gradient_of(i)]
    record = Solve(
        name="(all)",
        kernel=opts.kernel,
        solver="dense",
        indices=indices,
        x=dense_solver(chol)(v),
        rows=problem.handlers[0].d,
        params=n,
        what=f"damped {n} x {n} GGN (method='full')",
        rebuild=rebuild,
        factor_solver=dense_solver,
    )
    return [record.settle(problem, opts, chol, condition)]
