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
from ..woodbury import WoodburySolve, cholesky
from ._base import Options, Problem, solve_diagnostics

NEEDS_FACTOR = True


def solve(problem: Problem, opts: Options):
    directions, diagnostics = [], []
    for i, handler in enumerate(problem.handlers):
        handler.compress_rows()
        name, n_a, d = handler.block.name, handler.block.n_params, handler.d
        dtype = opts.solve_dtype or handler.delta.dtype
        if dense_is_cheaper(n_a, d, handler.gram_flops()):
            solver = "dense"
            K = handler.K().to(dtype)
            G = K.T @ K
            G.diagonal().add_(opts.damping)
            chol = cholesky(G, what=f"damped metric of module {name!r} ({n_a} x {n_a})")
            g = problem.gradient_of(i)
            flat = chol.solve(torch.cat([a.reshape(-1) for a in g]))
            x = [c.view_as(a).to(a.dtype) for c, a in zip(flat.split([a.numel() for a in g]), g)]
            if opts.diagnostics:
                Gx = [opts.damping * a + b for a, b in zip(x, handler.K_tmv(handler.K_mv(x)))]
        else:
            solver = "woodbury"
            woodbury = WoodburySolve.factorise(
                handler.gram(),
                opts.damping,
                handler.K_mv,
                handler.K_tmv,
                what=f"damped Gram of module {name!r} ({d} x {d})",
                solve_dtype=opts.solve_dtype,
            )
            chol = woodbury.inner
            t = chol.solve(problem.K_gradient(i)).to(handler.delta.dtype)
            x = problem.gradient_minus_K_tmv(i, t, 1 / opts.damping)
            if opts.refine:
                x = woodbury.refine(problem.gradient_of(i), x, opts.refine)
            Gx = woodbury.metric(x) if opts.diagnostics else None
        directions.append(x)
        if opts.diagnostics:
            diagnostics.append(
                solve_diagnostics(
                    name,
                    "layerwise",
                    type(handler).__name__,
                    solver,
                    rows=d,
                    params=n_a,
                    chol=chol,
                    v=problem.gradient_of(i),
                    x=x,
                    Gx=Gx,
                )
            )
    return directions, diagnostics
