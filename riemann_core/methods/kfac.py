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

from dataclasses import dataclass

import torch

from .._checks import all_finite
from ..modules import PatchHandler, kronecker_handler
from ..woodbury import SolveError
from ._base import Options, Problem
from ._solve import Solve

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


def kronecker_solve(Gamma, A, V, damping: float, decompose):
    """``X`` with ``(Gamma (x) A + mu I) vec X = vec V``, the eigenpairs, and the
    eigenvalues ``g a^T + mu`` of the damped metric."""
    eg, QG = decompose(Gamma, "output factor Gamma")
    ea, QA = decompose(A, "input factor A")
    # Factors are PSD; clamp round-off negatives so g a^T + mu stays >= mu.
    scale = eg.clamp_min(0)[:, None] * ea.clamp_min(0)[None, :] + damping
    X = QG @ ((QG.T @ V @ QA) / scale) @ QA.T
    return X, (eg, QG, ea, QA), scale


@dataclass
class KroneckerSolve(Solve):
    """A block's K-FAC solve: its metric is ``Gamma (x) A + mu I``."""

    handler: PatchHandler | None = None
    factors: tuple | None = None

    def metric64(self, problem, damping):
        Gamma, A = (f.double() for f in self.factors)

        def G(x):
            X = self.handler.to_matrix(x)
            return self.handler.from_matrix(Gamma @ X @ A + damping * X)

        return G

    def redo(self, problem, opts) -> None:
        """Slow path: eigendecompositions checked one by one, in float64 if need be."""
        name = self.handler.block.name

        def decompose(matrix, what):
            return eigh(matrix, f"K-FAC {what} of module {name!r}")

        Gamma, A = self.factors
        V = self.handler.to_matrix(self.rhs(problem))
        X, _, _ = kronecker_solve(Gamma, A, V, opts.damping, decompose)
        self.x = self.handler.from_matrix(X)


def _eigh(matrix, what):
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:  # LAPACK refused: NaN eigenpairs send it to redo()
        nan = torch.full_like(matrix, float("nan"))
        return nan[0], nan


def solve(problem: Problem, opts: Options) -> list[Solve]:
    solves = []
    for i, handler in enumerate(problem.handlers):
        handler = kronecker_handler(handler)  # the factors need the layer structure
        Gamma, A = handler.kronecker()
        V = handler.to_matrix(problem.gradient_of(i))
        X, parts, scale = kronecker_solve(Gamma, A, V, opts.damping, _eigh)
        solves.append(
            KroneckerSolve(
                name=handler.block.name,
                kernel=type(handler).__name__,
                solver="kronecker",
                indices=[i],
                x=handler.from_matrix(X),
                rows=handler.d,
                params=handler.block.n_params,
                condition=scale.max() / scale.min(),
                failed=~torch.isfinite(sum(p.sum() for p in parts)),
                handler=handler,
                factors=(Gamma, A),
            )
        )
    return solves
