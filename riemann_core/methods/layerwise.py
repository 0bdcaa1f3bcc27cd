"""The layerwise metric: ``G_a = mu I + K_a^T K_a`` per block.

``K_a^T K_a`` is the block of the generalised Gauss-Newton matrix that belongs to
module ``a``, so ``G`` is the damped block-diagonal GGN. A block with more
parameters than factor rows (the usual case) is solved by Woodbury,

    G_a^{-1} g_a = (g_a - K_a^T (mu I + K_a K_a^T)^{-1} K_a g_a) / mu,

in ``O(n_a d^2 + d^3)`` (generic kernel); where factorising ``G_a`` itself
(``2 n_a^2 d + n_a^3 / 3``) costs fewer FLOPs than the Gram and its Cholesky (a small
layer, a large batch), that is done instead. Both are exact. Each block first keeps
``min(r, m_out)`` factor rows per sample (:meth:`Handler.compress_rows`) and needs
only its own pulled-back factor.
"""

from __future__ import annotations

import torch

from ..costs import dense_is_cheaper
from ..woodbury import WoodburySolve, cholesky_deferred
from ._base import Options, Problem
from ._solve import Solve

NEEDS_FACTOR = True


def damped(matrix, damping: float):
    """``matrix + mu I``, in place (``matrix`` is a fresh product)."""
    matrix.diagonal().add_(damping)
    return matrix


def dense_solver(chol):
    """``G^{-1}`` for a list of tensors, from the Cholesky factor of the dense ``G``."""

    def apply(v):
        flat = chol.solve(torch.cat([a.reshape(-1) for a in v]))
        return [c.view_as(a) for c, a in zip(flat.split([a.numel() for a in v]), v, strict=True)]

    return apply


def solve(problem: Problem, opts: Options) -> list[Solve]:
    solves = []
    mu = opts.damping
    for i, handler in enumerate(problem.handlers):
        handler.compress_rows()
        name, n_a, d = handler.block.name, handler.block.n_params, handler.d
        if dense_is_cheaper(n_a, d, handler.gram_flops()):

            def rebuild(handler=handler):
                K = handler.K()
                return damped(K.T @ K, mu)

            matrix = rebuild()
            chol = cholesky_deferred(matrix)
            factor_solver = dense_solver
            x = dense_solver(chol)(problem.gradient_of(i))
            solver, what = "dense", f"damped metric of module {name!r} ({n_a} x {n_a})"
        else:

            def rebuild(handler=handler):
                return damped(handler.gram(), mu)

            def factor_solver(chol, handler=handler):
                return WoodburySolve(chol, mu, handler.K_mv, handler.K_tmv)

            matrix = rebuild()
            chol = cholesky_deferred(matrix)
            t = chol.solve(problem.K_gradient(i))
            x = problem.gradient_minus_K_tmv(i, t, 1 / mu)
            solver, what = "woodbury", f"damped Gram of module {name!r} ({d} x {d})"
        record = Solve(
            name=name,
            kernel=type(handler).__name__,
            solver=solver,
            indices=[i],
            x=x,
            rows=d,
            params=n_a,
            what=what,
            rebuild=rebuild,
            factor_solver=factor_solver,
        )
        solves.append(record.settle(problem, opts, matrix, chol))
    return solves
