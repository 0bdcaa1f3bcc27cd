"""K-FAC's Kronecker factors and the two ways of damping their product.

A factor ``F`` (``n x n``, symmetric PSD) arrives as its rows ``R`` (``m x n``,
``F = R^T R``): the output factor ``Gamma``'s rows are the factor rows pulled back to a
layer's output, the input factor ``A``'s are the layer's input patches over ``sqrt(N T)``.
While ``m < n`` the factor is kept *thin*, as ``R``: its rank is at most ``m`` and all the
algebra below runs through the ``m x m`` Gram ``R R^T`` (``O(m^2 n + m^3)``) instead of
``F`` itself (``O(m n^2 + n^3)``). Both give the same matrix; for a Linear layer on a
batch smaller than its width (``A`` has ``N`` rows) or a sampled Fisher (``Gamma`` has
``N S``) this is the difference between an ``n^3`` and an ``m^2 n`` factorisation.
A running average of factors is dense.

Exact damping solves ``(Gamma (x) A + mu I) vec(X) = vec(V)``, i.e.
``Gamma X A + mu X = V``, in the eigenbases ``Gamma = Q_G diag(g) Q_G^T``,
``A = Q_A diag(a) Q_A^T``:

    X = Q_G [(Q_G^T V Q_A) / (g a^T + mu)] Q_A^T.

A thin factor has eigenvectors only for its nonzero eigenvalues; on the rest
``Gamma (x) A`` vanishes and the metric is ``mu I``, so

    X = V / mu - Q_G [(Q_G^T V Q_A) * g a^T / (mu (g a^T + mu))] Q_A^T,

written with ``B = R^T U`` (``R R^T = U diag(s) U^T``, ``F = B B^T``) in place of the
unit eigenvectors ``B diag(s)^{-1/2}``, which divides by no eigenvalue.

Factored (Tikhonov) damping (Martens & Grosse 2015, section 6.3) damps each factor:

    X = (Gamma + pi sqrt(mu) I)^{-1} V (A + sqrt(mu) / pi I)^{-1},
    pi = sqrt((tr(Gamma) / dim Gamma) / (tr(A) / dim A)),

each inverse by Cholesky (a thin factor by Woodbury,
``(R^T R + c I)^{-1} = (I - R^T (c I + R R^T)^{-1} R) / c``); no eigendecomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import all_finite
from .woodbury import Cholesky, SolveError, cholesky


def eigh(matrix: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD ``matrix``; overflow is a :class:`SolveError`."""
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


@dataclass(frozen=True)
class Eigen:
    """``F = B diag(w) B^T`` restricted to the eigenvalues ``values`` of ``F``.

    ``complete``: ``B`` is ``F``'s whole orthonormal eigenbasis and ``w = values``.
    Otherwise (a thin factor) ``B = R^T U`` spans the range of ``F``, ``B^T B =
    diag(values)`` and ``w = 1``.
    """

    vectors: Tensor
    values: Tensor
    complete: bool


def unit_eigen(like: Tensor) -> Eigen:
    """The input factor of a bias alone, ``A = 1`` (``1 x 1``), in ``like``'s dtype."""
    one = like.new_ones(1, 1)
    return Eigen(one, one[0], True)


class Factor:
    """A Kronecker factor ``F`` (``n x n``): thin as its rows ``R`` (``F = R^T R``, kept
    while ``m < n``) or dense. Its Gram and eigendecomposition are computed once."""

    def __init__(self, rows: Tensor | None = None, matrix: Tensor | None = None, *, what: str):
        self.rows, self.matrix, self.what = rows, matrix, what
        self._gram: Tensor | None = None
        self._eigen: Eigen | None = None
        self._shifted: dict[float, Shifted] = {}

    @classmethod
    def of_rows(cls, rows: Tensor, *, what: str) -> Factor:
        """``F = R^T R``, thin when ``R`` has fewer rows than columns."""
        if rows.shape[0] < rows.shape[1]:
            return cls(rows=rows, what=what)
        return cls(matrix=rows.T @ rows, what=what)

    @property
    def thin(self) -> bool:
        return self.rows is not None

    @property
    def data(self) -> Tensor:
        """What is stored: the rows, or the matrix."""
        return self.rows if self.thin else self.matrix

    @property
    def n(self) -> int:
        return self.data.shape[-1]

    def dense(self) -> Tensor:
        return self.rows.T @ self.rows if self.thin else self.matrix

    def trace(self) -> Tensor:
        return self.rows.square().sum() if self.thin else self.matrix.diagonal().sum()

    def gram(self) -> Tensor:
        """``R R^T`` (``m x m``) of a thin factor."""
        if self._gram is None:
            self._gram = self.rows @ self.rows.T
        return self._gram

    def eigen(self) -> Eigen:
        if self._eigen is None:
            if self.thin:
                values, U = eigh(self.gram(), f"Gram R R^T of the {self.what}")
                self._eigen = Eigen(self.rows.T @ U, values.clamp_min(0), False)
            else:
                values, Q = eigh(self.matrix, self.what)
                # PSD: round-off negatives clamped so that g a^T + mu stays >= mu
                self._eigen = Eigen(Q, values.clamp_min(0), True)
        return self._eigen

    def shifted(self, shift: float) -> Shifted:
        """``(F + shift I)^{-1}``, factorised (once per shift)."""
        if shift not in self._shifted:
            M = (self.gram() if self.thin else self.matrix).clone()
            M.diagonal().add_(shift)
            size = f"{M.shape[0]} x {M.shape[0]}"
            what = (
                f"damped Gram of the {self.what} ({size})" if self.thin else f"damped {self.what}"
            )
            self._shifted[shift] = Shifted(self, shift, cholesky(M, what=what))
        return self._shifted[shift]


@dataclass(frozen=True)
class Shifted:
    """``(F + c I)^{-1}`` through the Cholesky factor of ``F + c I`` (dense) or of
    ``c I + R R^T`` (thin, by Woodbury)."""

    factor: Factor
    shift: float
    chol: Cholesky

    def solve(self, Y: Tensor) -> Tensor:
        """``(F + c I)^{-1} Y`` for ``Y`` of shape ``(n, k)``."""
        if not self.factor.thin:
            return self.chol.solve(Y)
        R, c = self.factor.rows, self.shift
        return torch.addmm(Y, R.T, self.chol.solve(R @ Y), beta=1 / c, alpha=-1 / c)

    def solve_right(self, Y: Tensor) -> Tensor:
        """``Y (F + c I)^{-1}`` for ``Y`` of shape ``(k, n)``, in ``Y``'s layout."""
        if not self.factor.thin:
            L = self.chol.factor
            Z = torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False)
            return torch.linalg.solve_triangular(L, Z, upper=False, left=False)
        R, c = self.factor.rows, self.shift
        t = self.chol.solve((Y @ R.T).T).T
        return torch.addmm(Y, t, R, beta=1 / c, alpha=-1 / c)

    def condition(self) -> float:
        """2-norm condition number of ``F + c I`` (from ``F``'s eigenvalues)."""
        values = self.factor.eigen().values
        low = 0.0 if self.factor.thin else float(values.min())
        return (float(values.max()) + self.shift) / (low + self.shift)


def exact_solve(V: Tensor, G: Eigen, A: Eigen, damping: float) -> Tensor:
    """``X`` with ``Gamma X A + mu X = V`` (``V``: ``f_out x P``) from the eigenbases."""
    ga = G.values[:, None] * A.values[None, :]
    W = torch.linalg.multi_dot([G.vectors.T, V, A.vectors])
    if G.complete and A.complete:
        return torch.linalg.multi_dot([G.vectors, W / (ga + damping), A.vectors.T])
    if G.complete:
        W = W * G.values[:, None]
    if A.complete:
        W = W * A.values[None, :]
    correction = torch.linalg.multi_dot([G.vectors, W / (damping * (ga + damping)), A.vectors.T])
    return V / damping - correction


def exact_condition(G: Eigen, A: Eigen, damping: float) -> float:
    """2-norm condition number of ``Gamma (x) A + mu I``."""
    high = float(G.values.max() * A.values.max())
    low = float(G.values.min() * A.values.min()) if G.complete and A.complete else 0.0
    return (high + damping) / (low + damping)


def split_damping(gamma: Factor, A: Factor, damping: float) -> tuple[float, float] | None:
    """``(pi sqrt(mu), sqrt(mu) / pi)``, the damping of ``Gamma`` and of ``A``.

    ``None`` when a factor is zero: as ``pi -> 0`` (or ``inf``) the damped product tends
    to ``mu I``, the metric such a block has.
    """
    mean_gamma = float(gamma.trace()) / gamma.n
    mean_A = float(A.trace()) / A.n
    for factor, mean in ((gamma, mean_gamma), (A, mean_A)):
        if not math.isfinite(mean):
            raise SolveError(
                f"the {factor.what} contains NaN or inf; check the model outputs and "
                "parameters for overflow, or solve in float64 (solve_dtype=torch.float64)"
            )
    if mean_gamma == 0 or mean_A == 0:
        return None
    pi = math.sqrt(mean_gamma / mean_A)
    root = math.sqrt(damping)
    return pi * root, root / pi
