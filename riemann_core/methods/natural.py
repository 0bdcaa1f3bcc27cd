"""Exact damped natural gradient (GGN / Fisher) through one data-space Woodbury solve.

``G = mu I + K^T K`` with ``K = [K_1 .. K_L]``; ``K K^T = sum_a K_a K_a^T`` is one
``d x d`` Gram, so ``G^{-1} g = (g - K^T (mu I + K K^T)^{-1} K g) / mu`` costs
``O(n d^2 + d^3)`` and equals the dense ``full`` solve to round-off.
"""

from __future__ import annotations

from ..woodbury import WoodburySolve
from ._base import Options, Problem, solve_diagnostics

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options):
    handlers = problem.handlers
    sizes = [len(b.params) for b in problem.blocks]

    def per_block(flat):
        it = iter(flat)
        return [[next(it) for _ in range(s)] for s in sizes]

    def K_mv(v):
        return sum(h.K_mv(va) for h, va in zip(handlers, per_block(v)))

    def K_tmv(t):
        return [a for h in handlers for a in h.K_tmv(t)]

    gram = handlers[0].gram()
    for h in handlers[1:]:
        gram += h.gram()
    d = gram.shape[0]
    woodbury = WoodburySolve.factorise(
        gram,
        opts.damping,
        K_mv,
        K_tmv,
        solve_dtype=opts.solve_dtype,
        what=f"damped data-space Gram of the natural gradient ({d} x {d})",
    )
    Kg = sum(problem.K_gradient(i) for i in range(len(handlers)))
    t = woodbury.inner.solve(Kg).to(handlers[0].delta.dtype)
    x = [
        a
        for i in range(len(handlers))
        for a in problem.gradient_minus_K_tmv(i, t, 1 / opts.damping)
    ]
    g = (
        [a for grads in problem.gradient for a in grads]
        if opts.refine or opts.diagnostics
        else None
    )
    if opts.refine:
        x = woodbury.refine(g, x, opts.refine)
    diagnostics = []
    if opts.diagnostics:
        diagnostics.append(
            solve_diagnostics(
                "(all)",
                "natural",
                opts.kernel,
                "woodbury",
                rows=d,
                params=sum(b.n_params for b in problem.blocks),
                chol=woodbury.inner,
                v=g,
                x=x,
                Gx=woodbury.metric(x),
            )
        )
    return per_block(x), diagnostics
