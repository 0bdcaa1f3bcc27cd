"""Exact damped natural gradient (GGN / Fisher) through one data-space Woodbury solve.

``G = mu I + K^T K`` with ``K = [K_1 .. K_L]``; ``K K^T = sum_a K_a K_a^T`` is one
``d x d`` Gram, so ``G^{-1} g = (g - K^T (mu I + K K^T)^{-1} K g) / mu`` costs
``O(n d^2 + d^3)`` and equals the dense ``full`` solve to round-off.
"""

from __future__ import annotations

from ..woodbury import WoodburySolve
from ._base import Options, Problem, woodbury_diagnostics

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options):
    handlers = problem.handlers
    sizes = [len(b.params) for b in problem.blocks]

    def split(flat):
        out, i = [], 0
        for s in sizes:
            out.append(flat[i : i + s])
            i += s
        return out

    def K_mv(v):
        return sum(h.K_mv(part) for h, part in zip(handlers, split(v), strict=True))

    def K_tmv(t):
        return [a for h in handlers for a in h.K_tmv(t)]

    gram = handlers[0].gram()
    for h in handlers[1:]:
        gram += h.gram()
    solver = WoodburySolve.factorise(
        gram, opts.damping, K_mv, K_tmv, what="damped data-space Gram (natural gradient)",
        solve_dtype=opts.solve_dtype,
    )
    t = solver.inner.solve(sum(problem.K_gradient(i) for i in range(len(handlers))))
    x = [[a / opts.damping for a in problem.gradient_minus_K_tmv(i, t)]
         for i in range(len(handlers))]
    diagnostics = []
    if opts.diagnostics:
        n = sum(b.n_params for b in problem.blocks)
        g = [a for grads in problem.gradient for a in grads]
        diagnostics.append(woodbury_diagnostics(
            "(all)", "natural", opts, solver, g, [a for block in x for a in block],
            kernel=opts.kernel, params=n,
        ))
    return x, diagnostics
