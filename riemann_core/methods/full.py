"""The whole damped GGN ``G = mu I + K^T K`` as a dense ``n x n`` matrix, Cholesky-solved.

``O(n^2 d + n^3)`` time and ``O(n^2)`` memory: the reference the layerwise metric is
measured against, and an oracle for ``natural`` (same matrix, other algebra). Where every
block is a Linear layer with one position per sample (an MLP), ``G``'s block ``(a, b)``
is formed from the samples' Grams, ``K_a^T K_b = sum_s (Delta^a_s^T Delta^b_s) (x)
(xt^a_s xt^b_s^T)`` (``LinearHandler.metric``): ``O(n^2 N + n^3)``, ``r`` times fewer
FLOPs than ``K^T K`` for ``r`` rows per sample, so that full is measured at its best.
"""

from __future__ import annotations

import torch

from ..modules import Handler, LinearHandler
from ..woodbury import cholesky_in_place, largest_eigenvalue
from ._base import Options, Problem
from ._solve import Solve
from .layerwise import damped, dense_solver

NEEDS_FACTOR = True


def blockwise(handlers: list[Handler]) -> bool:
    """Whether ``G`` is formed block by block from the samples' Grams: every pair of
    blocks qualifies (``LinearHandler.samples_metric_with``); else ``K^T K`` in one
    product, which is faster than its blocks one by one from ``K``."""
    return all(
        isinstance(h, LinearHandler) and h.samples_metric_with(g)
        for a, h in enumerate(handlers)
        for g in handlers[: a + 1]
    )


def metric(handlers: list[Handler]) -> torch.Tensor:
    """``K^T K`` (``n x n``, symmetric), its blocks ``K_a^T K_b`` formed below the
    diagonal and mirrored above it where :func:`blockwise`."""
    if not blockwise(handlers):
        K = torch.cat([h.K() for h in handlers], dim=1)
        return K.T @ K
    sizes = [h.block.n_params for h in handlers]
    n, h0 = sum(sizes), handlers[0]
    G = torch.empty(n, n, dtype=h0.dtype, device=h0.device)
    blocks_a = G.split(sizes, dim=0)
    for a, h in enumerate(handlers):
        row = blocks_a[a].split(sizes, dim=1)
        for b, g in enumerate(handlers[: a + 1]):
            row[b].copy_(h.metric(g))
            if b != a:
                blocks_a[b].split(sizes, dim=1)[a].copy_(row[b].T)
    return G


def solve(problem: Problem, opts: Options) -> list[Solve]:
    def rebuild():
        return damped(metric(problem.handlers), opts.damping).mT  # symmetric: column-major

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
