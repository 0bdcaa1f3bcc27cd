"""The layerwise metric: ``G_a = mu I + K_a^T K_a`` per block, solved by Woodbury.

``K_a^T K_a`` is the block of the generalised Gauss-Newton matrix that belongs to
module ``a``, so ``G`` is the damped block-diagonal GGN:

    G_a^{-1} g_a = (g_a - K_a^T (mu I + K_a K_a^T)^{-1} K_a g_a) / mu.

Each block costs ``O(n_a d^2 + d^3)`` (generic kernel) and needs only its own
pulled-back factor.
"""

from __future__ import annotations

from ..woodbury import WoodburySolve
from ._base import Options, Problem, woodbury_diagnostics

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options):
    directions, diagnostics = [], []
    for i, handler in enumerate(problem.handlers):
        solver = WoodburySolve.factorise(
            handler.gram(), opts.damping, handler.K_mv, handler.K_tmv,
            what=f"damped Gram of module {handler.block.name!r}", solve_dtype=opts.solve_dtype,
        )
        t = solver.inner.solve(problem.K_gradient(i))
        x = [a / opts.damping for a in problem.gradient_minus_K_tmv(i, t)]
        directions.append(x)
        if opts.diagnostics:
            diagnostics.append(woodbury_diagnostics(
                handler.block.name, "layerwise", opts, solver, problem.gradient[i], x,
                kernel=type(handler).__name__, params=handler.block.n_params,
            ))
    return directions, diagnostics
