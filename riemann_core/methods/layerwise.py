"""The layerwise metric: ``G_a = mu I + K_a^T K_a`` per block.

``K_a^T K_a`` is the block of the generalised Gauss-Newton matrix that belongs to
module ``a``, so ``G`` is the damped block-diagonal GGN. A block with more
parameters than factor rows (the usual case) is solved by Woodbury,

    G_a^{-1} g_a = (g_a - K_a^T (mu I + K_a K_a^T)^{-1} K_a g_a) / mu,

in ``O(n_a d^2 + d^3)`` (generic kernel); where factorising ``G_a`` itself
(``K_a^T K_a``, :meth:`Handler.metric`: ``2 n_a^2 d`` from ``K_a``, ``r`` times less for
a Linear layer, plus ``n_a^3 / 3``) costs fewer FLOPs than the Gram and its Cholesky (a
small layer, a large batch), that is done instead. Both are exact. Each block first keeps
``min(r, m_out)`` factor rows per sample (:meth:`Handler.compress_rows`) and needs
only its own pulled-back factor.

Blocks whose Grams have the same size are factorised together: their lower triangles
are written into one ``(B, d, d)`` buffer, factorised in place by one batched Cholesky
and solved by batched triangular solves (one call each, as a GPU wants them). An order
``d`` that is a multiple of 64 (and in float32 on the CPU, one from 89 to 128) is padded
with an identity (``costs.factor_order``: LAPACK's Cholesky is slower at such orders).
"""

from __future__ import annotations

import torch

from ..costs import bound_pays, dense_is_cheaper
from ..modules import Handler, named_module
from ..woodbury import (
    WoodburySolve,
    cholesky_in_place,
    column_major,
    give_back,
    largest_eigenvalue,
    pad_with_identity,
    padded_gram,
)
from ._base import Options, Problem
from ._solve import Solve, gram_conditions

NEEDS_FACTOR = True


def damped(matrix, damping: float):
    """``matrix + mu I``, in place (``matrix`` is a fresh product); batched too."""
    matrix.diagonal(dim1=-2, dim2=-1).add_(damping)
    return matrix


def damped_gram(handlers: list[Handler], damping: float, out=None):
    """``mu I + sum_h K_h K_h^T``, its lower triangle, into ``out``; by default into a
    fresh zero matrix (above the diagonal: zeros, or entries of the Gram)."""
    if out is None:
        d = handlers[0].d
        out = column_major(d, d, like=handlers[0], zero=True)
    for j, h in enumerate(handlers):
        h.gram_into(out, add=j > 0)
    return damped(out, damping)


def dense_solver(chol):
    """``G^{-1}`` for a list of tensors, from the Cholesky factor of the dense ``G``."""

    def apply(v):
        flat = chol.solve(torch.cat([a.reshape(-1) for a in v]))
        return [c.view_as(a) for c, a in zip(flat.split([a.numel() for a in v]), v, strict=True)]

    return apply


def solve(problem: Problem, opts: Options) -> list[Solve]:
    records: list[Solve | None] = [None] * len(problem.handlers)
    by_size: dict[tuple, list[int]] = {}
    for i, handler in enumerate(problem.handlers):
        handler.compress_rows()
        n_a, d, gram = handler.block.n_params, handler.d, handler.gram_flops()
        if dense_is_cheaper(n_a, d, gram, handler.metric_flops()):
            records[i] = _dense(problem, i, opts)
        else:
            by_size.setdefault((handler.d, handler.dtype, handler.device), []).append(i)
    for indices in by_size.values():
        for i, record in zip(indices, _woodbury(problem, indices, opts), strict=True):
            records[i] = record
    return records


def _dense(problem: Problem, i: int, opts: Options) -> Solve:
    """Block ``i`` by a Cholesky factorisation of its own ``n_a x n_a`` metric."""
    handler, mu = problem.handlers[i], opts.damping

    def rebuild():  # symmetric: the transpose is its column-major copy
        return damped(handler.metric(), mu).mT

    matrix = rebuild()
    condition = largest_eigenvalue(matrix) / mu
    chol = cholesky_in_place(matrix)
    name, n_a = handler.block.name, handler.block.n_params
    record = Solve(
        name=name,
        kernel=type(handler).__name__,
        solver="dense",
        indices=[i],
        x=dense_solver(chol)(problem.gradient_of(i)),
        rows=handler.d,
        params=n_a,
        what=f"damped metric of {named_module(name)} ({n_a} x {n_a})",
        rebuild=rebuild,
        factor_solver=dense_solver,
    )
    return record.settle(problem, opts, chol, condition)


def _woodbury(problem: Problem, indices: list[int], opts: Options) -> list[Solve]:
    """The blocks ``indices`` (equal ``d``) by Woodbury, their Grams factorised together."""
    mu = opts.damping
    handlers = [problem.handlers[i] for i in indices]
    d = handlers[0].d
    buffer, grams = padded_gram(len(handlers), d, d, like=handlers[0])
    for h, gram in zip(handlers, grams, strict=True):
        h.gram_into(gram)
    pad_with_identity(buffer, d)
    damped(grams, mu)
    condition, decisive = gram_conditions(problem, opts, grams, handlers[0].N)
    chol = cholesky_in_place(buffer)
    rows = torch.stack([problem.K_gradient(i) for i in indices])
    pad = rows.new_zeros(len(indices), buffer.shape[-1] - d)  # padded as the factor is
    t = chol.solve(torch.cat([rows, pad], 1))[:, :d]
    records = []
    for j, (i, h) in enumerate(zip(indices, handlers, strict=True)):

        def rebuild(h=h):
            return damped_gram([h], mu)

        def factor_solver(chol, h=h):
            return WoodburySolve(chol, mu, h.K_mv, h.K_tmv)

        # (only a factored block, a 2-D Linear layer's, has a bound to take)
        bound = problem.factored(i) and bound_pays(h.block.n_params, h.N, h.f_out, h.device)
        x, x_bound = problem.gradient_minus_K_tmv(i, t[j], 1 / mu, bound)
        name = h.block.name
        record = Solve(
            t=t[j] if problem.rows_refinable(i) else None,
            name=name,
            kernel=type(h).__name__,
            solver="woodbury",
            indices=[i],
            x=x,
            x_bound=x_bound,
            rows=d,
            params=h.block.n_params,
            what=f"damped Gram of {named_module(name)} ({d} x {d})",
            rebuild=rebuild,
            factor_solver=factor_solver,
        )
        sharp = None if decisive is None else decisive[j]
        records.append(record.settle(problem, opts, chol[j], condition[j], sharp))
    give_back(buffer)  # no record keeps the factors: the next call may reuse the memory
    return records
