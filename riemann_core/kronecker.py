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

Decompositions come in two kinds. *Deferred* ones (the default) never wait for the
device: a failure (LAPACK's error, NaN or inf eigenpairs, a failed Cholesky, a NaN,
inf or zero trace) is a device boolean ``failed``, read later with the other checks of
the call (:mod:`riemann_core.methods._solve`). *Checked* ones (``checked=True``, the
slow path after such a failure) decompose a float32 factor again in float64 when
LAPACK fails, add jitter to a Cholesky that fails, and raise :class:`SolveError`
naming the factor when that is not enough.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import all_finite
from .costs import eigen_order, shifted_order
from .woodbury import (
    Cholesky,
    SolveError,
    cholesky,
    cholesky_deferred,
    eigenvalues,
    largest_eigenvalue,
)

OVERFLOW = (
    "check the model outputs and parameters for overflow, or solve in float64 "
    "(solve_dtype=torch.float64)"
)


def linalg_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(matrix)`` (a batch ``(..., n, n)``, lower triangle read) at
    the order :func:`~riemann_core.costs.eigen_order` gives: padded with a diagonal
    ``c I`` below every eigenvalue (``c = -2 n max_{i >= j} |F_ij|``, ``-1`` for a zero
    matrix), whose eigenpairs, sorted first and zero on the matrix's rows, are dropped. The
    zero rows make LAPACK's reduction split the pad off exactly: the eigenpairs are the
    matrix's own. ``c`` is of the matrix's scale, so that LAPACK scales a tiny matrix up
    as it would without the pad (found by review: ``c = -1`` lost 5 digits at 1e-38); where
    ``c`` overflows, the matrix is decomposed at its own order."""
    n = matrix.shape[-1]
    pad = eigen_order(n, matrix.device) - n
    largest = matrix.tril().abs().amax((-2, -1))[..., None] if pad else None
    below = torch.where(largest > 0, -2 * n * largest, -1.0) if pad else None
    if not pad or not bool(torch.isfinite(below).all()):  # (a host read: CPU only)
        return torch.linalg.eigh(matrix)
    padded = matrix.new_zeros(*matrix.shape[:-2], n + pad, n + pad)
    padded[..., :n, :n] = matrix
    padded.diagonal(dim1=-2, dim2=-1)[..., n:] = below
    values, vectors = torch.linalg.eigh(padded)
    return values[..., pad:].contiguous(), vectors[..., :n, pad:].contiguous()


def eigh(matrix: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Checked eigendecomposition of a symmetric PSD ``matrix``; overflow is a
    :class:`SolveError`."""
    if not all_finite(matrix):
        raise SolveError(f"the {what} contains NaN or inf; {OVERFLOW}")
    # float32 LAPACK fails on the factors of saturated layers, whose entries are denormal
    # (seen at 1e-40): it raises, or returns NaN; in float64 those are ordinary numbers
    try:
        values, vectors = linalg_eigh(matrix)
        if all_finite(torch.cat([values, vectors.reshape(-1)])):  # one host sync, not two
            return values, vectors
        failure = "it returned NaN or inf"
    except torch.linalg.LinAlgError as err:
        failure = str(err)
    if matrix.dtype != torch.float64:
        values, vectors = eigh(matrix.double(), what)
        # eigenvalues past the dtype's range (a finite float32 factor of entries near
        # 3e38 has a larger one): cast back they read inf, and the direction NaN, which
        # was refused as an overflow a larger damping would cure (found by review: K-FAC
        # on float32 inputs of 1e19, at every damping up to 1e30)
        if not all_finite(values.to(matrix.dtype)):
            raise SolveError(
                f"the eigenvalues of the {what} (up to {float(values.max()):.1e}) overflow "
                f"{matrix.dtype} whatever the damping; {OVERFLOW}"
            )
        return values.to(matrix.dtype), vectors.to(matrix.dtype)
    raise SolveError(f"the eigendecomposition of the {what} failed: {failure}")


def eigh_deferred(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues, eigenvectors and a device boolean ``failed`` (one per matrix of a
    batch ``(..., n, n)``), without a host sync of ours (on CUDA ``torch.linalg.eigh``
    itself waits to check the solver's status: once per call, however large the batch)."""
    try:
        values, vectors = linalg_eigh(matrix)
    except torch.linalg.LinAlgError:  # NaN eigenpairs send it to the slow path
        vectors = torch.full_like(matrix, math.nan)
        values = vectors[..., 0]
    total = values.sum(-1) + vectors.sum((-2, -1))
    # t - t is NaN for a NaN or inf t and 0 otherwise: two kernels, where ~isfinite is five
    return values, vectors, (total - total).ne(0)


def batched(device: torch.device) -> bool:
    """Whether :func:`eigen_together` batches the factors on ``device`` (and
    :func:`shifted_together` its power iterations): off the CPU. On
    CUDA every ``torch.linalg.eigh`` call waits for the host to check its status. On a
    CPU there is no such wait, LAPACK runs one matrix at a time either way, and MKL's
    eigenvectors of a matrix differ in their last bits with where it sits in memory, so
    each is decomposed alone, as a resumed checkpoint decomposes it (a batched product's
    last bits differ from one matrix's too)."""
    return device.type != "cpu"


def eigen_together(factors: Iterable[Factor]) -> None:
    """The deferred eigendecompositions (:meth:`Factor.eigen`) of ``factors`` on a GPU,
    those of matrices of one order, dtype and device in one batched call, so that a
    network of equal widths takes one host sync per order however deep it is, not one
    per factor (:func:`batched`). A batch that fails (a NaN factor) sends all its factors
    to the checked path, one by one."""
    groups: dict[tuple, list[Factor]] = {}
    for f in factors:
        m = f.decomposed()
        if False not in f._eigen and batched(m.device):
            groups.setdefault((m.shape, m.dtype, m.device), []).append(f)
    for group in groups.values():
        if len(group) > 1:  # alone, Factor.eigen decomposes it when asked
            values, vectors, failed = eigh_deferred(torch.stack([f.decomposed() for f in group]))
            for i, f in enumerate(group):
                f._eigen[False] = f.eigen_of(values[i], vectors[i], failed[i])


@dataclass(frozen=True)
class Eigen:
    """``F = B diag(w) B^T`` restricted to the eigenvalues ``values`` of ``F``.

    ``complete``: ``B`` is ``F``'s whole orthonormal eigenbasis and ``w = values``.
    Otherwise (a thin factor) ``B = R^T U`` spans the range of ``F``, ``B^T B =
    diag(values)`` and ``w = 1``. ``failed``: a device boolean (deferred), or ``None``
    (checked).
    """

    vectors: Tensor
    values: Tensor
    complete: bool
    failed: Tensor | None = None


def unit_eigen(like: Tensor) -> Eigen:
    """The input factor of a bias alone, ``A = 1`` (``1 x 1``), in ``like``'s dtype."""
    one = like.new_ones(1, 1)
    return Eigen(one, one[0], True)


class Factor:
    """A Kronecker factor ``F`` (``n x n``): thin as its rows ``R`` (``F = R^T R``, kept
    while ``m < n``) or dense. Its Gram and eigendecompositions are computed once."""

    def __init__(self, rows: Tensor | None = None, matrix: Tensor | None = None, *, what: str):
        self.rows, self.matrix, self.what = rows, matrix, what
        self._gram: Tensor | None = None
        self._eigen: dict[bool, Eigen] = {}  # by checked
        self._float64: Factor | None = None

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

    def trace(self, leading: int | None = None) -> Tensor:
        """``tr F``, or that of its leading ``leading x leading`` block (an input factor's
        weight columns, without the bias's column of ones)."""
        if self.thin:
            rows = self.rows if leading is None else self.rows[:, :leading]
            return rows.square().sum()
        return self.matrix.diagonal()[:leading].sum()

    def gram(self) -> Tensor:
        """``R R^T`` (``m x m``) of a thin factor."""
        if self._gram is None:
            self._gram = self.rows @ self.rows.T
        return self._gram

    def float64(self) -> Factor:
        """The same factor in float64 (made once)."""
        if self._float64 is None:
            data = self.data.double()
            self._float64 = (
                Factor(data, what=self.what) if self.thin else Factor(matrix=data, what=self.what)
            )
        return self._float64

    def times64(self, Y: Tensor) -> Tensor:
        """``F Y`` in float64 (``R^T (R Y)`` for a thin factor), for residuals."""
        if self.thin:
            R = self.rows.double()
            return R.T @ (R @ Y)
        return self.matrix.double() @ Y

    def decomposed(self) -> Tensor:
        """The matrix :meth:`eigen` decomposes: the Gram ``R R^T`` of a thin factor, else
        ``F``."""
        return self.gram() if self.thin else self.matrix

    def eigen(self, checked: bool = False) -> Eigen:
        if checked not in self._eigen:
            matrix = self.decomposed()
            if checked:
                what = f"Gram R R^T of the {self.what}" if self.thin else self.what
                self._eigen[checked] = self.eigen_of(*eigh(matrix, what), None)
            else:
                self._eigen[checked] = self.eigen_of(*eigh_deferred(matrix))
        return self._eigen[checked]

    def eigen_of(self, values: Tensor, vectors: Tensor, failed: Tensor | None) -> Eigen:
        """The :class:`Eigen` of the eigendecomposition ``(values, vectors)`` of
        :meth:`decomposed`: ``B = R^T U`` for a thin factor."""
        # PSD: round-off negatives clamped so that g a^T + mu stays >= mu
        if self.thin:
            return Eigen(self.rows.T @ vectors, values.clamp_min(0), False, failed)
        return Eigen(vectors, values.clamp_min(0), True, failed)

    def shifted(self, shift: Tensor | float, checked: bool = False) -> Shifted:
        """``c (F + c I)^{-1}`` for ``c = shift``, factorised: deferred
        (:func:`shifted_together`), or checked with jitter at its own order."""
        if not checked:
            return shifted_together([(self, shift)])[0]
        F = self.decomposed()
        n = F.shape[0]
        M = self.damped_into(shift, F.new_empty(n, n))
        estimate = self.estimate(largest_eigenvalue(M), shift)
        size = f"{n} x {n}"
        what = f"damped Gram of the {self.what} ({size})" if self.thin else f"damped {self.what}"
        return Shifted(self, shift, cholesky(M, what=what), estimate, what)

    def damped_into(self, shift: Tensor | float, padded: Tensor) -> Tensor:
        """``M (+) s I`` written into ``padded`` (of order at least ``M``'s), ``M`` (a view)
        returned: the matrix whose Cholesky factor :meth:`shifted` takes, ``c I + R R^T``
        (thin) or ``F / c + I``, and ``s`` its diagonal shift."""
        F = self.decomposed()
        n = F.shape[0]
        M = padded if padded.shape[0] == n else padded[:n, :n]
        if padded.shape[0] > n:
            padded[n:].zero_()
            padded[:n, n:].zero_()
        if self.thin:  # M = c I + R R^T
            M.copy_(F)
            padded.diagonal().add_(shift)
        else:  # M = F / c + I
            torch.div(F, shift, out=M)
            padded.diagonal().add_(1)
        return M

    def estimate(self, largest: Tensor, shift: Tensor | float) -> Tensor:
        """``cond(F + c I)`` estimated from ``largest``, an estimate of ``lambda_max(M)``
        (:meth:`damped_into`): ``cond(F + c I) <~ lambda_max(M)``, over ``c`` for a thin
        factor."""
        return largest / shift if self.thin else largest


def shifted_together(requests: list[tuple[Factor, Tensor | float]]) -> list[Shifted]:
    """The deferred :meth:`Factor.shifted` of each ``(factor, shift)``, the matrices of
    one order, dtype and device in one batch: one Cholesky each, however deep the network
    (on a GPU each call costs the host more than such matrices cost the device; a CPU's
    LAPACK factorises a batch one matrix at a time, to the bit as alone), and one power
    iteration where :func:`batched` (on a CPU each matrix's own, to the bit as alone).
    Each is factorised at the order :func:`~riemann_core.costs.shifted_order`
    gives, padded to ``M (+) s I`` (:meth:`Factor.damped_into`), whose Cholesky factor is
    ``L (+) sqrt(s) I`` exactly (MKL's Cholesky is 2x slower at 1024 than at 1032)."""
    groups: dict[tuple, list[int]] = {}
    for i, (factor, _) in enumerate(requests):
        F = factor.decomposed()
        groups.setdefault((F.shape[0], F.dtype, F.device), []).append(i)
    out: dict[int, Shifted] = {}
    for (n, dtype, device), indices in groups.items():
        order = shifted_order(n, dtype, device)
        batch = () if len(indices) == 1 else (len(indices),)  # alone: no unbinding
        padded = torch.empty(*batch, order, order, dtype=dtype, device=device)
        for i, member in zip(indices, _members(padded, batch), strict=True):
            factor, shift = requests[i]
            factor.damped_into(shift, member)
        chol = cholesky_deferred(padded)
        square = padded if order == n else padded[..., :n, :n]
        if batch and not batched(device):
            # on a CPU each alone: MKL's batched products differ from one matrix's in their
            # last bits, and the estimate would depend on which factors a call refactorises
            # (a resumed checkpoint's load takes them all; a step may take one alone)
            tops = [largest_eigenvalue(m) for m in square.unbind()]
        else:
            tops = _members(largest_eigenvalue(square), batch)
        members = zip(_members(chol.factor, batch), _members(chol.failed, batch), tops)
        for i, (L, failed, top) in zip(indices, members, strict=True):
            factor, shift = requests[i]
            out[i] = Shifted(factor, shift, Cholesky(L, 0.0, failed), factor.estimate(top, shift))
    return [out[i] for i in range(len(requests))]


def _members(t: Tensor, batch: tuple) -> tuple[Tensor, ...]:
    """The matrices (or scalars) of a batch, ``t`` itself where there is none."""
    return t.unbind() if batch else (t,)


@dataclass(frozen=True)
class Shifted:
    """``c (F + c I)^{-1}``: the inverse of ``F / c + I`` through its Cholesky factor
    (dense), or ``I - R^T (c I + R R^T)^{-1} R`` through the Cholesky factor of
    ``c I + R R^T`` (thin, by Woodbury). Either way no product is divided by ``c``, a
    device scalar: a host ``scale`` rides along in the last product instead.

    ``estimate``: an estimate of ``cond(F + c I)``, a device scalar: the largest
    eigenvalue of the factorised matrix by a few power iterations
    (:func:`riemann_core.woodbury.largest_eigenvalue`) over its smallest possible one;
    ``what`` names the factorised matrix (checked factorisations).
    """

    factor: Factor
    shift: Tensor | float
    chol: Cholesky
    estimate: Tensor
    what: str = ""

    @property
    def jitter(self) -> float:
        """The jitter of the Cholesky factorisation, on the diagonal of ``F + c I``."""
        if not self.chol.jitter:
            return 0.0
        return self.chol.jitter * (1 if self.factor.thin else float(self.shift))

    def solve(self, Y: Tensor, scale: float = 1.0) -> Tensor:
        """``scale c (F + c I)^{-1} Y`` for ``Y`` of shape ``(n, k)``."""
        if not self.factor.thin:
            X = self.chol.solve(Y)
            return X if scale == 1 else X.mul_(scale)
        R = self.factor.rows
        return torch.addmm(Y, R.T, self.chol.solve(R @ Y), beta=scale, alpha=-scale)

    def solve_right(self, Y: Tensor, scale: float = 1.0) -> Tensor:
        """``scale Y c (F + c I)^{-1}`` for ``Y`` of shape ``(k, n)``, in ``Y``'s layout."""
        if not self.factor.thin:
            L, n = self.chol.factor, Y.shape[-1]
            if L.shape[-1] > n:  # a factor of M (+) s I: zero columns for the padding's
                Y = torch.nn.functional.pad(Y, (0, L.shape[-1] - n))
            Z = torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False)
            X = torch.linalg.solve_triangular(L, Z, upper=False, left=False)
            X = X if X.shape[-1] == n else X[..., :n]
            return X if scale == 1 else X.mul_(scale)
        R = self.factor.rows
        t = self.chol.solve((Y @ R.T).T).T
        return torch.addmm(Y, t, R, beta=scale, alpha=-scale)

    def times64(self, Y: Tensor) -> Tensor:
        """``(F + c I) Y`` in float64."""
        c = self.shift.double() if isinstance(self.shift, Tensor) else self.shift
        return self.factor.times64(Y) + c * Y

    def condition(self) -> Tensor:
        """``cond(F + c I)`` exactly (an eigendecomposition of ``F`` or its Gram)."""
        F = self.factor
        values = eigenvalues(F.gram() if F.thin else F.matrix)
        low = values.new_zeros(()) if F.thin else values[0].clamp_min(0)
        return (values[-1] + self.shift) / (low + self.shift)


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
    # divided in two steps: the product mu (g a^T + mu) overflows float32 where each
    # factor does not (found by a hunt: inputs of 1e11 at damping 1e19 made it inf, the
    # correction zero and the direction V / mu, 24x off without a word)
    correction = torch.linalg.multi_dot([G.vectors, W / (ga + damping) / damping, A.vectors.T])
    return V / damping - correction


#: the error of an eigenvalue ``eigh`` computes, in ``eps`` times the largest
EIGENVALUE_ERROR = 4


def exact_condition(G: Eigen, A: Eigen, damping: float) -> Tensor:
    """``cond(Gamma (x) A + mu I)`` from the eigenvalues (a device scalar). An eigenvalue
    is known to a few ``eps`` times the largest (``eigh``'s error in practice), so the
    smallest is taken at the low end of :data:`EIGENVALUE_ERROR` of that: rounding then
    cannot make a singular factor look well conditioned (found by a hunt: cross-entropy's
    Gamma, singular, read its zero as 3.7e-8 = 1.0 eps x its largest in float32, and the
    figure 370x low at damping 1e-10). Not ``n eps``, the worst-case bound: that read a
    float32 layer of 512 inputs, eigenvalues spread over 1e4, 300x ill-conditioned, and
    warned of an error of 0.6 where the direction was 1e-3 off (found by review)."""
    high = G.values.max() * A.values.max() + damping
    if G.complete and A.complete:
        low = [
            (
                e.values.min() - EIGENVALUE_ERROR * torch.finfo(e.values.dtype).eps * e.values.max()
            ).clamp_min(0)
            for e in (G, A)
        ]
        return high / (low[0] * low[1] + damping)
    return high / damping


def split_damping(gamma: Factor, A: Factor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(pi sqrt(mu), sqrt(mu) / pi)``, the damping of ``Gamma`` and of ``A``, as device
    scalars, and whether they are defined: ``False`` when a trace is NaN, inf or zero
    (:func:`split_damping_checked` then says which)."""
    pi = torch.sqrt((gamma.trace() / gamma.n) / (A.trace() / A.n))
    root = math.sqrt(damping)
    # a zero trace makes pi 0 or inf, NaN or inf in one makes it NaN, inf or 0 (NaN
    # compares false: three kernels, where isfinite's test is six)
    return pi * root, root / pi, (pi > 0) & (pi < math.inf)


def split_damping_checked(gamma: Factor, A: Factor, damping: float) -> tuple[float, float] | None:
    """:func:`split_damping` read on the host: a NaN or inf trace is a
    :class:`SolveError`; ``None`` when a factor is zero, since as ``pi -> 0`` (or
    ``inf``) the damped product tends to ``mu I``, the metric such a block has."""
    mean_gamma = float(gamma.trace()) / gamma.n
    mean_A = float(A.trace()) / A.n
    for factor, mean in ((gamma, mean_gamma), (A, mean_A)):
        if not math.isfinite(mean):
            raise SolveError(f"the {factor.what} contains NaN or inf; {OVERFLOW}")
    if mean_gamma == 0 or mean_A == 0:
        return None
    pi = math.sqrt(mean_gamma / mean_A)
    root = math.sqrt(damping)
    return pi * root, root / pi
