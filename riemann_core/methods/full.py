"""The whole damped GGN ``G = mu I + K^T K`` as a dense ``n x n`` matrix, Cholesky-solved.

``O(n^2 d + n^3)`` time and ``O(n^2)`` memory: the reference the layerwise metric is
measured against, and an oracle for ``natural`` (same matrix, other algebra).
"""

from __future__ import annotations

import torch

from ..woodbury import cholesky
from ._base import Options, Problem, solve_diagnostics

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options):
    K = torch.cat([h.K() for h in problem.handlers], dim=1)
    dtype = opts.solve_dtype or K.dtype
    K = K.to(dtype)
    G = K.T @ K
    G.diagonal().add_(opts.damping)
    chol = cholesky(G, what=f"damped {G.shape[0]} x {G.shape[0]} GGN (method='full')")
    g = torch.cat([a.reshape(-1) for grads in problem.gradient for a in grads])
    x = chol.solve(g).to(g.dtype)
    directions, i = [], 0
    for grads in problem.gradient:
        block = []
        for a in grads:
            block.append(x[i : i + a.numel()].view_as(a))
            i += a.numel()
        directions.append(block)
    diagnostics = []
    if opts.diagnostics:
        diagnostics.append(
            solve_diagnostics(
                "(all)",
                "full",
                opts.kernel,
                "dense",
                rows=K.shape[0],
                params=K.shape[1],
                chol=chol,
                v=[g],
                x=[x],
                Gx=[(G @ x.to(dtype)).to(g.dtype)],
            )
        )
    return directions, diagnostics
