"""K-FAC: per block ``G_a = Gamma_a (x) A_a + mu I``, solved exactly in the eigenbases.

``Gamma = sum_{r,t} delta delta^T`` (output side, the pulled-back factor rows) and
``A = mean_{b,t} xt xt^T`` (input side, bias column included); ``Gamma (x) A`` is the
Kronecker approximation of the block ``K_a^T K_a`` (exact for one sample at one
position). Damping scheme: ``mu I`` is added to the Kronecker product itself, not
factored (no ``pi`` heuristic), so ``kfac`` uses the same ``mu`` as every other method:
with ``Gamma = Q_G diag(g) Q_G^T`` and ``A = Q_A diag(a) Q_A^T``,

    X = Q_G [(Q_G^T V Q_A) / (g a^T + mu)] Q_A^T      for the gradient V = [W | b].

Cost per block ``O(f_in^3 + f_out^3 + N T (f_in^2 + f_out^2))``.
"""

from __future__ import annotations

import torch

from .._checks import all_finite
from ..modules import kronecker_handler
from ..woodbury import SolveError
from ._base import LayerDiagnostics, Options, Problem, norm

NEEDS_FACTOR = True


def eigh(matrix, what: str):
    """Eigendecomposition of a symmetric PSD factor; overflow is a :class:`SolveError`."""
    if not all_finite(matrix):
        raise SolveError(
            f"the {what} contains NaN or inf; check the model outputs and parameters for "
            "overflow, or solve in float64 (solve_dtype=torch.float64)"
        )
    # float32 LAPACK fails on the factors of saturated layers, whose entries are denormal
    # (seen at 1e-40): it raises, or returns NaN; in float64 those are ordinary numbers
    try:
        values, vectors = torch.linalg.eigh(matrix)
        if all_finite(torch.cat([values, vectors.reshape(-1)])):  # one host sync, not two
            return values, vectors
        failure = "it returned NaN or inf"
    except torch.linalg.LinAlgError as err:
        failure = str(err)
    if matrix.dtype != torch.float64:
        values, vectors = eigh(matrix.double(), what)
        return values.to(matrix.dtype), vectors.to(matrix.dtype)
    raise SolveError(f"the eigendecomposition of the {what} failed: {failure}")


def solve(problem: Problem, opts: Options):
    directions, diagnostics = [], []
    for handler, g in zip(problem.handlers, problem.gradient, strict=True):
        handler = kronecker_handler(handler)  # the factors need the layer structure
        Gamma, A = handler.kronecker()
        dtype = opts.solve_dtype or Gamma.dtype
        eg, QG = eigh(
            Gamma.to(dtype), f"K-FAC output factor Gamma of module {handler.block.name!r}"
        )
        ea, QA = eigh(A.to(dtype), f"K-FAC input factor A of module {handler.block.name!r}")
        # Factors are PSD; clamp round-off negatives so g a^T + mu stays >= mu.
        scale = eg.clamp_min(0)[:, None] * ea.clamp_min(0)[None, :] + opts.damping
        V = handler.to_matrix(g)
        X = (QG @ ((QG.T @ V.to(dtype) @ QA) / scale) @ QA.T).to(V.dtype)
        directions.append(handler.from_matrix(X))
        if opts.diagnostics:
            residual = (Gamma @ X @ A + opts.damping * X - V).norm() / V.norm()
            diagnostics.append(
                LayerDiagnostics(
                    name=handler.block.name,
                    method="kfac",
                    kernel=type(handler).__name__,
                    solver="kronecker",
                    rows=handler.d,
                    params=handler.block.n_params,
                    condition=float(scale.max() / scale.min()),
                    residual=float(residual),
                    jitter=0.0,
                    update_norm=norm([X]),
                )
            )
    return directions, diagnostics
