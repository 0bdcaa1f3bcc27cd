"""The whole damped GGN ``G = mu I + K^T K`` as a dense ``n x n`` matrix, Cholesky-solved.

``O(n^2 d + n^3)`` time and ``O(n^2)`` memory: the reference the layerwise metric is
measured against, and an oracle for ``natural`` (same matrix, other algebra). Where every
block is a Linear layer with one position per sample (an MLP) and it costs less
(:func:`blockwise`), ``G``'s block ``(a, b)`` is formed from the samples' Grams,
``K_a^T K_b = sum_s (Delta^a_s^T Delta^b_s) (x) (xt^a_s xt^b_s^T)``
(``LinearHandler.metric_into``): ``O(N (n^2 + r (sum_a f_a)^2) + n^3)``, about ``r``
times fewer FLOPs than ``K^T K`` for ``r`` rows per sample.
"""

from __future__ import annotations

import torch

from ..costs import metric_by_blocks
from ..modules import Handler, LinearHandler
from ..woodbury import cholesky_in_place, largest_eigenvalue
from ._base import Options, Problem
from ._solve import Solve
from .layerwise import damped, dense_solver

NEEDS_FACTOR = True


def _pairs(handlers: list[Handler]) -> list[tuple[Handler, Handler]] | None:
    """The pairs ``(a, b)``, ``b <= a``, where every one qualifies for the samples' Grams
    (``LinearHandler.samples_metric_with``), else ``None``."""
    pairs = [(h, g) for a, h in enumerate(handlers) for g in handlers[: a + 1]]
    if all(isinstance(h, LinearHandler) and h.samples_metric_with(g) for h, g in pairs):
        return pairs
    return None


def blockwise(handlers: list[Handler]) -> bool:
    """Whether ``G`` is formed block by block from the samples' Grams: every pair of
    blocks qualifies and the blocks cost less than ``K^T K`` in one product on their
    device (:func:`riemann_core.costs.metric_by_blocks`)."""
    pairs = _pairs(handlers)
    if pairs is None:
        return False
    n, h0 = sum(h.block.n_params for h in handlers), handlers[0]
    blocks = [
        (h.metric_flops(g), h.block.n_params * g.block.n_params, h.metric_groups(g))
        for h, g in pairs
    ]
    return metric_by_blocks(blocks, n, h0.d, h0.N, h0.device)


def metric(handlers: list[Handler], by_blocks: bool | None = None) -> torch.Tensor:
    """``K^T K`` (``n x n``, symmetric), its blocks ``K_a^T K_b`` formed below the
    diagonal and mirrored above it where :func:`blockwise` (``by_blocks``: the one form or
    the other, as ``bench/full_metric_forms.py`` times them; the blocks need every pair to
    qualify)."""
    if by_blocks and _pairs(handlers) is None:
        raise ValueError(
            "by_blocks=True needs every block to be a Linear layer with one position per "
            "sample and every pair to qualify (LinearHandler.samples_metric_with); "
            "pass by_blocks=None to let the rule choose"
        )
    if not (blockwise(handlers) if by_blocks is None else by_blocks):
        K = torch.cat([h.K() for h in handlers], dim=1)
        return K.T @ K
    sizes = [h.block.n_params for h in handlers]
    n, h0 = sum(sizes), handlers[0]
    G = torch.empty(n, n, dtype=h0.dtype, device=h0.device)
    grid = [row.split(sizes, dim=1) for row in G.split(sizes, dim=0)]
    for a, h in enumerate(handlers):
        for b, g in enumerate(handlers[: a + 1]):
            h.metric_into(grid[a][b], g)
            if b != a:
                grid[b][a].copy_(grid[a][b].T)
    return G


def solve(problem: Problem, opts: Options) -> list[Solve]:
    def rebuild():
        return damped(metric(problem.handlers), opts.damping).mT  # symmetric: column-major

    G = rebuild()  # (an allocation failure is named by methods.memory)
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
