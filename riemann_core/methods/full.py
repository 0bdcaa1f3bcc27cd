"""The whole damped GGN ``G = mu I + K^T K`` as a dense ``n x n`` matrix, Cholesky-solved.

``O(n^2 d + n^3)`` time and ``O(n^2)`` memory: the reference the layerwise metric is
measured against, and an oracle for ``natural`` (same matrix, other algebra).
"""

from __future__ import annotations

import torch

from ..woodbury import cholesky_deferred, largest_eigenvalue
from ._base import Options, Problem
from ._solve import Solve
from .layerwise import dense_solver

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options) -> list[Solve]:
    K = torch.cat([h.K() for h in problem.handlers], dim=1)
    G = K.T @ K
    G.diagonal().add_(opts.damping)
    chol = cholesky_deferred(G)
    indices = list(range(len(problem.blocks)))
    v = [a for i in indices for a in problem.gradient_of(i)]
    n = G.shape[0]
    return [
        Solve(
            name="(all)",
            kernel=opts.kernel,
            solver="dense",
            indices=indices,
            x=dense_solver(chol)(v),
            rows=K.shape[0],
            params=n,
            what=f"damped {n} x {n} GGN (method='full')",
            apply=dense_solver(chol),
            condition=largest_eigenvalue(G) / opts.damping,
            failed=chol.failed,
            matrix=G,
            factor_solver=dense_solver,
        )
    ]
