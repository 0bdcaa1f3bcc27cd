"""Exact damped natural gradient (GGN / Fisher) through one data-space Woodbury solve.

``G = mu I + K^T K`` with ``K = [K_1 .. K_L]``; ``K K^T = sum_a K_a K_a^T`` is one
``d x d`` Gram, so ``G^{-1} g = (g - K^T (mu I + K K^T)^{-1} K g) / mu`` costs
``O(n d^2 + d^3)`` and equals the dense ``full`` solve to round-off.
"""

from __future__ import annotations

from ..woodbury import cholesky
from ._base import Options, Problem, apply_metric, refine, solve_diagnostics

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options):
    handlers = problem.handlers
    dtype = opts.solve_dtype or handlers[0].delta.dtype
    gram = handlers[0].gram().to(dtype)
    for h in handlers[1:]:
        gram += h.gram()
    gram.diagonal().add_(opts.damping)
    d = gram.shape[0]
    chol = cholesky(gram, what=f"damped data-space Gram of the natural gradient ({d} x {d})")
    Kg = sum(problem.K_gradient(i) for i in range(len(handlers)))
    t = chol.solve(Kg).to(handlers[0].delta.dtype)
    x = [problem.gradient_minus_K_tmv(i, t, 1 / opts.damping) for i in range(len(handlers))]
    if opts.refine:
        x = refine(handlers, chol, opts.damping, problem.gradient, x, opts.refine)
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
                chol=chol,
                v=[a for g in problem.gradient for a in g],
                x=[a for xa in x for a in xa],
                Gx=apply_metric(handlers, opts.damping, x),
            )
        )
    return x, diagnostics
