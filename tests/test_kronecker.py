"""Kronecker factors: thin (kept as rows) and dense give the same damped solves.

Each solve is checked against ``torch.linalg.solve`` of the dense ``n x n`` (or
Kronecker-product) matrix, in float64, on random right-hand sides and on factors of
full rank and of low rank.
"""

from __future__ import annotations

import pytest
import torch
from oracle import rel_error

from riemann_core import costs, kronecker
from riemann_core.kronecker import (
    Factor,
    eigh_deferred,
    exact_condition,
    exact_solve,
    split_damping,
    split_damping_checked,
    unit_eigen,
)
from riemann_core.woodbury import SolveError


def rows(m, n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, n, dtype=torch.float64, generator=g)


#: Factor kinds: thin (rows, fewer than columns: low rank), the same low-rank factor
#: dense, and a dense factor of full rank. ``Factor.of_rows`` picks thin exactly when
#: there are fewer rows than columns.
KINDS = {"thin": (3, 7), "dense-low-rank": (3, 7), "dense": (12, 5)}


def factor(kind, seed, scale=1.0):
    R = rows(*KINDS[kind], seed=seed, scale=scale)
    if kind == "thin":
        return R, Factor.of_rows(R, what="test factor")
    return R, Factor(matrix=R.T @ R, what="test factor")


@pytest.mark.parametrize("damping", [1e-3, 1e-1, 10.0], ids=lambda d: f"damping={d:g}")
@pytest.mark.parametrize("kind_A", KINDS, ids=lambda k: f"A={k}")
@pytest.mark.parametrize("kind_G", KINDS, ids=lambda k: f"G={k}")
def test_exact_solve_is_the_damped_kronecker_solve(kind_G, kind_A, damping):
    """``Gamma X A + mu X = V`` (row-major ``vec``: ``(Gamma (x) A + mu I) vec X``)."""
    (RG, G), (RA, A) = factor(kind_G, seed=1), factor(kind_A, seed=2, scale=3.0)
    assert G.thin == (kind_G == "thin") and A.thin == (kind_A == "thin")
    V = rows(G.n, A.n, seed=3)
    X = exact_solve(V, G.eigen(), A.eigen(), damping)
    M = torch.kron(RG.T @ RG, RA.T @ RA)
    M.diagonal().add_(damping)
    expected = torch.linalg.solve(M, V.reshape(-1)).reshape(V.shape)
    assert rel_error(X, expected) < 1e-9
    condition = torch.linalg.cond(M).item()
    assert float(exact_condition(G.eigen(), A.eigen(), damping)) == pytest.approx(
        condition, rel=1e-6
    )
    assert not G.eigen().failed and not A.eigen().failed


def test_unit_input_factor_is_a_one_factor_solve():
    """The bias's block: ``A = 1``, so ``X = (Gamma + mu I)^{-1} V``."""
    v = rows(7, 1, seed=5)
    for kind in ("thin", "dense-low-rank"):
        RG, G = factor(kind, seed=4)
        x = exact_solve(v, G.eigen(), unit_eigen(v), 0.1)
        expected = torch.linalg.solve(RG.T @ RG + 0.1 * torch.eye(7, dtype=torch.float64), v)
        assert rel_error(x, expected) < 1e-12


@pytest.mark.parametrize("checked", [False, True], ids=["deferred", "checked"])
@pytest.mark.parametrize("shift", [1e-6, 1e-2, 10.0], ids=lambda s: f"shift={s:g}")
@pytest.mark.parametrize("kind", KINDS)
def test_shifted_solve(kind, shift, checked):
    """``c (F + c I)^{-1} Y`` (times a ``scale``): Cholesky of ``F / c + I``, or Woodbury
    through ``c I + R R^T``; the estimate of its condition number from ``lambda_max``
    within the power iteration's reach (at least ``0.4 lambda_max``) and above by at most
    the ratio of its smallest eigenvalue to ``c``."""
    R, F = factor(kind, seed=6)
    Y = rows(F.n, 4, seed=7)
    dense = R.T @ R + shift * torch.eye(F.n, dtype=torch.float64)
    shifted = F.shifted(torch.tensor(shift, dtype=torch.float64), checked=checked)
    assert not shifted.chol.failed
    inverse = torch.linalg.solve(dense, Y)
    assert rel_error(shifted.solve(Y), shift * inverse) < 1e-9
    assert rel_error(shifted.solve(Y, 1 / shift), inverse) < 1e-9
    assert rel_error(shifted.solve_right(Y.T, 2.0), 2 * shift * inverse.T) < 1e-9
    assert rel_error(shifted.times64(inverse), Y) < 1e-9
    condition = torch.linalg.cond(dense).item()
    assert float(shifted.condition()) == pytest.approx(condition, rel=1e-6)
    low = float(torch.linalg.eigvalsh(dense)[0]) / shift
    assert 0.4 * condition <= float(shifted.estimate) <= condition * low * (1 + 1e-9)


@pytest.mark.parametrize("kind", ["thin", "dense"])
def test_a_shifted_factor_at_a_padded_order_solves_as_its_own(kind):
    """On the CPU a damped factor, or a thin factor's damped Gram, of order 512 is
    factorised at 520 (``costs.shifted_order``), as ``M (+) s I_8``: the solves are those
    of the order-512 matrix, to float64's round-off, as is the condition estimate."""
    m, n = (512, 600) if kind == "thin" else (700, 512)
    R = rows(m, n, seed=9)
    F = Factor.of_rows(R, what="test factor")
    assert F.thin == (kind == "thin")
    shift = torch.tensor(1e-2, dtype=torch.float64)
    shifted = F.shifted(shift)
    assert shifted.chol.factor.shape == (520, 520)
    assert costs.shifted_order(512, torch.float32, "cuda") == 512  # other devices: own order
    assert costs.shifted_order(448, torch.float32, "cpu") == 448  # below 512: own order
    Y = rows(n, 5, seed=10)
    dense = R.T @ R + shift * torch.eye(n, dtype=torch.float64)
    inverse = torch.linalg.solve(dense, Y)
    assert rel_error(shifted.solve(Y), shift * inverse) < 1e-10
    assert rel_error(shifted.solve_right(Y.T, 2.0), 2 * shift * inverse.T) < 1e-10
    if kind == "thin":  # the matrix factorised: c I + R R^T, or F / c + I
        matrix = R @ R.T + shift * torch.eye(m, dtype=torch.float64)
    else:
        matrix = R.T @ R / shift + torch.eye(n, dtype=torch.float64)
    own = kronecker.largest_eigenvalue(matrix) / (shift if kind == "thin" else 1)
    assert float(shifted.estimate) == pytest.approx(float(own), rel=1e-12)


def test_damped_factors_of_one_order_are_factorised_together_as_alone(monkeypatch):
    """``shifted_together``: the damped factors of one order (thin Grams and dense
    factors, each with its shift) in one batched Cholesky, those of another order apart;
    each Cholesky factor and failure flag is the factor's alone, to the bit (a NaN factor
    fails alone), and on a CPU its condition estimate too."""
    nan = rows(5, 9, seed=17)
    nan[1, 2] = float("nan")
    factors = [
        Factor.of_rows(rows(5, 9, seed=15), what="thin"),
        Factor.of_rows(rows(12, 5, seed=16), what="dense"),
        Factor.of_rows(nan, what="NaN"),
        Factor.of_rows(rows(12, 7, seed=18), what="another order"),
        Factor.of_rows(rows(5, 11, seed=19), what="thin, another shift"),
    ]
    shifts = [torch.tensor(1e-2, dtype=torch.float64), 0.5, 1e-2, 2.0, 3.0]
    calls, cholesky_ex = [], torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda m, **k: calls.append(m.shape) or cholesky_ex(m, **k)
    )
    together = kronecker.shifted_together(list(zip(factors, shifts, strict=True)))
    assert calls == [(4, 5, 5), (7, 7)]
    for f, c, s in zip(factors, shifts, together, strict=True):
        alone = f.shifted(c)
        assert s.factor is f and s.shift is c
        assert bool(s.chol.failed) == bool(alone.chol.failed) == (f.what == "NaN")
        if f.what != "NaN":
            assert torch.equal(s.chol.factor, alone.chol.factor)
            assert torch.equal(s.estimate, alone.estimate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_condition_estimates_of_factors_together_are_those_alone_on_the_cpu(dtype):
    """On a CPU ``shifted_together`` estimates each damped factor's condition alone, to
    the bit as :meth:`Factor.shifted` of that factor alone: MKL's batched products differ
    in their last bits from one matrix's (from order 31 or so), and a resumed checkpoint
    refactorises together the modules a step between refreshes refactorised alone."""
    factors = [
        Factor.of_rows(rows(m, n, seed=20 + i).to(dtype), what=f"factor {i}")
        for i, (m, n) in enumerate([(60, 48), (30, 70), (90, 48), (48, 100), (70, 48)])
    ]
    shifts = [torch.tensor(1e-2, dtype=dtype), 1e-3, 0.5, torch.tensor(2.0, dtype=dtype), 3e-2]
    together = kronecker.shifted_together(list(zip(factors, shifts, strict=True)))
    for f, c, s in zip(factors, shifts, together, strict=True):
        alone = f.shifted(c)
        assert torch.equal(s.chol.factor, alone.chol.factor)
        assert torch.equal(s.estimate, alone.estimate), f.what


def test_deferred_decompositions_flag_failures_without_raising():
    """A NaN factor: its deferred eigendecomposition and Cholesky say ``failed`` (device
    booleans); the checked ones raise a :class:`SolveError` naming the factor."""
    R = rows(6, 4, seed=13)
    R[2, 1] = float("nan")
    F = Factor.of_rows(R, what="input factor A of module '0'")
    assert bool(F.eigen().failed)
    assert bool(F.shifted(0.1).chol.failed)
    values, vectors, failed = eigh_deferred(torch.full((3, 3), float("nan"), dtype=torch.float64))
    assert bool(failed)
    with pytest.raises(SolveError, match="input factor A of module '0' contains NaN or inf"):
        F.eigen(checked=True)
    with pytest.raises(SolveError, match="damped input factor A of module '0'"):
        F.shifted(0.1, checked=True)


def test_checked_cholesky_reports_its_jitter_in_the_damped_factor():
    """A factor that round-off made indefinite (eigenvalue ``-1e-2``) at a tiny shift:
    the deferred Cholesky of ``F / c + I`` fails, the checked one succeeds with jitter,
    reported on the diagonal of ``F + c I`` (``c`` times the jitter of ``F / c + I``)."""
    Q = torch.linalg.qr(rows(30, 30, seed=14)).Q
    values = torch.cat([torch.tensor([1e3, -1e-2]), torch.ones(28)]).double()
    F = Factor(matrix=(Q * values) @ Q.T, what="A")
    assert bool(F.shifted(1e-6).chol.failed)
    checked = F.shifted(1e-6, checked=True)
    assert checked.what == "damped A"
    assert checked.jitter == pytest.approx(checked.chol.jitter * 1e-6)
    assert 1e-2 < checked.jitter < 1e2


def test_thin_and_dense_factors_agree_on_trace_and_matrix():
    R = rows(3, 8, seed=8)
    thin, dense = Factor.of_rows(R, what="t"), Factor.of_rows(rows(9, 8, seed=8), what="d")
    assert thin.thin and not dense.thin
    torch.testing.assert_close(thin.dense(), R.T @ R)
    torch.testing.assert_close(thin.trace(), (R.T @ R).trace())
    torch.testing.assert_close(dense.trace(), dense.matrix.trace())


def test_split_damping_balances_the_mean_eigenvalues():
    """``pi = sqrt(mean eig Gamma / mean eig A)``; the two shifts multiply to ``mu``; a
    zero factor leaves the split undefined (deferred: ``ok`` is false; checked: ``None``,
    the metric's limit ``mu I``)."""
    G, A = Factor.of_rows(rows(3, 4, seed=9), what="G"), Factor.of_rows(rows(5, 2, 10), what="A")
    c_G, c_A, ok = split_damping(G, A, 1e-2)
    mean_G, mean_A = float(G.trace()) / 4, float(A.trace()) / 2
    assert bool(ok)
    assert float(c_G * c_A) == pytest.approx(1e-2)
    assert float(c_G / c_A) == pytest.approx(mean_G / mean_A)
    assert split_damping_checked(G, A, 1e-2) == pytest.approx((float(c_G), float(c_A)))
    zero = Factor(matrix=torch.zeros(2, 2, dtype=torch.float64), what="zero")
    for pair in ((G, zero), (zero, A)):
        assert not bool(split_damping(*pair, 1e-2)[2])
        assert split_damping_checked(*pair, 1e-2) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_split_damping_refuses_a_non_finite_factor(bad):
    """A NaN trace must not read as a zero factor (whose metric would be ``mu I``)."""
    R = rows(3, 4, seed=11)
    R[1, 2] = bad
    G, A = Factor.of_rows(R, what="output factor G"), Factor.of_rows(rows(5, 2, 12), what="A")
    assert not bool(split_damping(G, A, 1e-2)[2])
    with pytest.raises(SolveError, match="output factor G contains NaN or inf"):
        split_damping_checked(G, A, 1e-2)


@pytest.mark.parametrize(
    "dtype,scale",
    [(torch.float64, s) for s in (1e-150, 1.0, 1e150)]
    + [(torch.float32, s) for s in (3e-21, 1e-20, 1.0, 1e16)],
)
def test_an_eigendecomposition_at_a_padded_order_gives_the_matrix_own(dtype, scale):
    """On the CPU with MKL an order such as 768 is eigendecomposed 8 rows larger (LAPACK
    runs slower at it, see ``costs.eigen_order``), beside a diagonal below the spectrum:
    the eigenpairs are the matrix's own, for a singular factor too (zero eigenvalues, and
    rounding's slightly negative ones), from near the smallest normal numbers to near the
    largest (found by review: a pad of -1 lost 5 digits of a float32 factor at 1e-38, and
    one past float32's range made every eigenpair NaN), one matrix or a batch."""
    if not torch.backends.mkl.is_available():
        pytest.skip("the orders are padded on MKL's LAPACK only")
    assert costs.eigen_order(768, "cpu") == 776 and costs.eigen_order(1024, "cpu") == 1032
    assert costs.eigen_order(640, "cpu") == 640 and costs.eigen_order(1024, "cuda") == 1024
    R = rows(300, 768, seed=5, scale=scale)  # rank 300
    F = (R.T @ R).to(dtype)
    eps = torch.finfo(dtype).eps
    expected_values, expected_vectors = torch.linalg.eigh(F)
    values, vectors = kronecker.linalg_eigh(F)
    assert values.shape == (768,) and vectors.shape == (768, 768) and vectors.is_contiguous()
    top = expected_values.abs().max()
    assert (values - expected_values).abs().max() <= 20 * eps * top
    assert (
        rel_error(  # at the scale of 1: the norms of F itself under- or overflow
            (vectors.double() * (values / top).double()) @ vectors.double().T, (F / top).double()
        )
        <= 1000 * eps
    )
    eye = torch.eye(768, dtype=dtype)
    torch.testing.assert_close(vectors.T @ vectors, eye, atol=1000 * eps, rtol=0)
    top_vectors = vectors[:, -300:].T @ expected_vectors[:, -300:]  # the same subspace
    assert torch.linalg.svdvals(top_vectors.double()).min() >= 1 - 1e4 * eps
    batch_values, _ = kronecker.linalg_eigh(torch.stack([F, 2 * F]))
    twice = torch.stack([values, 2 * values])
    torch.testing.assert_close(batch_values, twice, rtol=1000 * eps, atol=1000 * eps * top)


def test_a_factor_whose_pad_would_overflow_is_decomposed_at_its_own_order():
    """Where ``-2 n max |F_ij|`` passes float32's range, no pad (found by review: NaN)."""
    if not torch.backends.mkl.is_available():
        pytest.skip("the orders are padded on MKL's LAPACK only")
    F = torch.eye(768) * 1e36
    values, vectors = kronecker.linalg_eigh(F)
    assert torch.equal(values, torch.full((768,), 1e36)) and torch.equal(vectors, torch.eye(768))
