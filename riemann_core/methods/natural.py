"""Exact damped natural gradient (GGN / Fisher) through one data-space Woodbury solve.

``G = mu I + K^T K`` with ``K = [K_1 .. K_L]``; ``K K^T = sum_a K_a K_a^T`` is one
``d x d`` Gram, so ``G^{-1} g = (g - K^T (mu I + K K^T)^{-1} K g) / mu`` costs
``O(n d^2 + d^3)`` and equals the dense ``full`` solve to round-off.
"""

from __future__ import annotations

import torch

from ..woodbury import WoodburySolve, cholesky_in_place
from ._base import Options, Problem
from ._solve import Solve, gram_conditions
from .layerwise import damped_gram

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options) -> list[Solve]:
    problem.in_one_dtype()
    handlers = problem.handlers
    sizes = [len(b.params) for b in problem.blocks]
    mu = opts.damping

    def per_block(flat):
        it = iter(flat)
        return [[next(it) for _ in range(s)] for s in sizes]

    def K_mv(v):
        return sum(h.K_mv(va) for h, va in zip(handlers, per_block(v)))

    def K_tmv(t):
        return [a for h in handlers for a in h.K_tmv(t)]

    def factor_solver(chol):
        return WoodburySolve(chol, mu, K_mv, K_tmv)

    def rebuild():
        return damped_gram(handlers, mu)

    gram = rebuild()
    d = gram.shape[0]
    condition, decisive = gram_conditions(problem, opts, gram, handlers[0].N)
    chol = cholesky_in_place(gram)
    Kg = sum(problem.K_gradient(i) for i in range(len(handlers)))
    t = chol.solve(Kg)
    parts = [problem.gradient_minus_K_tmv(i, t, 1 / mu) for i in range(len(handlers))]
    x = [a for part, _ in parts for a in part]
    bounds = [b for _, b in parts]
    x_bound = (
        None if any(b is None for b in bounds) else torch.linalg.vector_norm(torch.stack(bounds))
    )
    record = Solve(
        t=t if all(problem.rows_refinable(i) for i in range(len(handlers))) else None,
        name="(all)",
        kernel=opts.kernel,
        solver="woodbury",
        indices=list(range(len(handlers))),
        x=x,
        x_bound=x_bound,
        rows=d,
        params=sum(b.n_params for b in problem.blocks),
        what=f"damped data-space Gram of the natural gradient ({d} x {d})",
        rebuild=rebuild,
        factor_solver=factor_solver,
    )
    return [record.settle(problem, opts, chol, condition, decisive)]
