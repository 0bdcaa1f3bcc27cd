"""``woodbury``: the damped solve on random vectors, Cholesky with jitter and its errors."""

from __future__ import annotations

import threading
import weakref

import pytest
import torch
from oracle import Problem, rel_error
from torch import nn

import riemann_core as rc
from riemann_core import costs, woodbury
from riemann_core.costs import factor_order
from riemann_core.measure.flops import flop_counter
from riemann_core.methods import Options, build_problem
from riemann_core.methods.layerwise import damped_gram
from riemann_core.woodbury import (
    JITTER_SCALES,
    SERIAL_POTRF_ORDER,
    Cholesky,
    WoodburySolve,
    cholesky,
    cholesky_in_place,
    column_major,
    diagonal_blocks,
    largest_eigenvalue,
    pad_with_identity,
    padded_gram,
    probe_block_estimates,
    sharpen_condition,
)

# (d, n): fewer rows than unknowns (the usual case) and more (rank-deficient Gram)
SHAPES = [(4, 12), (12, 4), (6, 6)]
SHAPE_IDS = [f"d={d}-n={n}" for d, n in SHAPES]
DAMPINGS = [1e-3, 1.0, 10.0]


def random_K(d, n, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.randn(d, n, dtype=dtype)


def solver_for(K, damping):
    damped = K @ K.T + damping * torch.eye(K.shape[0], dtype=K.dtype)
    return WoodburySolve(
        cholesky(damped, what="test Gram"), damping, lambda v: K @ v, lambda t: K.T @ t
    )


def dense(K, damping, v):
    n = K.shape[1]
    return torch.linalg.solve(damping * torch.eye(n, dtype=K.dtype) + K.T @ K, v)


@pytest.mark.parametrize("damping", DAMPINGS, ids=lambda m: f"damping={m:g}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_solve_random_vectors(shape, damping):
    """``cond(mu I + K^T K) <= ~4e4`` here, so float64 agrees to far below 1e-10."""
    K = random_K(*shape)
    solver = solver_for(K, damping)
    for seed in range(3):
        torch.manual_seed(100 + seed)
        v = torch.randn(shape[1], dtype=torch.float64)
        assert rel_error(solver(v), dense(K, damping, v)) < 1e-10


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_solve_list_of_tensors(shape):
    """Vectors may be lists of per-parameter tensors (a weight matrix and a bias)."""
    d, n = shape
    K = random_K(d, n, seed=1)
    sizes = [n - 2, 2]

    def K_mv(v):
        return K @ torch.cat([a.reshape(-1) for a in v])

    def K_tmv(t):
        return list((K.T @ t).split(sizes))

    inner = cholesky(K @ K.T + 0.5 * torch.eye(d, dtype=K.dtype), what="test Gram")
    solver = WoodburySolve(inner, 0.5, K_mv, K_tmv)
    v = torch.randn(n, dtype=torch.float64)
    out = solver(list(v.split(sizes)))
    assert isinstance(out, list) and [a.numel() for a in out] == sizes
    assert rel_error(torch.cat(out), dense(K, 0.5, v)) < 1e-10


def test_coefficients_are_data_space_solve():
    K = random_K(4, 9, seed=2)
    v = torch.randn(9, dtype=torch.float64)
    t = solver_for(K, 0.3).coefficients(v)
    expected = torch.linalg.solve(0.3 * torch.eye(4, dtype=K.dtype) + K @ K.T, K @ v)
    assert rel_error(t, expected) < 1e-12


def test_solve_is_exact_inverse_of_metric():
    """``(mu I + K^T K) x = v`` back-substituted, independent of any dense solve."""
    K = random_K(7, 15, seed=4)
    v = torch.randn(15, dtype=torch.float64)
    x = solver_for(K, 0.1)(v)
    assert rel_error(0.1 * x + K.T @ (K @ x), v) < 1e-12


# ---------------------------------------------------------------------- Cholesky


def test_cholesky_positive_definite_needs_no_jitter():
    A = random_K(5, 8, seed=5)
    A = A @ A.T + torch.eye(5, dtype=torch.float64)
    chol = cholesky(A, what="test matrix")
    assert chol.jitter == 0.0
    torch.testing.assert_close(chol.factor @ chol.factor.T, A)
    b = torch.randn(5, dtype=torch.float64)
    assert rel_error(chol.solve(b), torch.linalg.solve(A, b)) < 1e-12
    B = torch.randn(5, 3, dtype=torch.float64)
    assert rel_error(chol.solve(B), torch.linalg.solve(A, B)) < 1e-12


def test_cholesky_singular_psd_gets_jitter():
    """``[[1, 1], [1, 1]]`` is PSD with a zero pivot: the plain factorisation fails."""
    A = torch.ones(2, 2)
    chol = cholesky(A, what="test matrix")
    assert chol.jitter > 0
    assert chol.jitter == pytest.approx(JITTER_SCALES[1] * 1.0)
    L = chol.factor
    torch.testing.assert_close(L @ L.T, A + chol.jitter * torch.eye(2))


def test_cholesky_float32_rank_deficient_gram_gets_jitter():
    """``B B^T`` (rank 2 of 6) in float32 is indefinite by round-off (eigenvalues ~ -3e-8)."""
    torch.manual_seed(0)
    B = torch.randn(6, 2)
    A = B @ B.T
    assert int(torch.linalg.cholesky_ex(A).info) != 0  # the premise: plain Cholesky fails
    chol = cholesky(A, what="test matrix")
    assert chol.jitter > 0
    assert torch.isfinite(chol.factor).all()
    assert chol.jitter <= JITTER_SCALES[-1] * float(A.diagonal().mean())


def test_in_place_cholesky_reports_failure_on_the_device():
    """``cholesky_in_place`` never syncs: a failed factor is a device flag, redone with
    jitter by ``cholesky``; NaN pivots count as a failure too. (A symmetric matrix's
    transpose is its column-major copy.)"""
    torch.manual_seed(0)
    B = torch.randn(6, 2)
    assert not bool(cholesky_in_place((B @ B.T + torch.eye(6)).mT).failed)
    assert bool(cholesky_in_place((B @ B.T).mT).failed)  # rank 2 of 6 in float32
    nan = torch.eye(3)
    nan[0, 0] = float("nan")
    assert bool(cholesky_in_place(nan.mT).failed)


@pytest.mark.parametrize("m", [7, woodbury.DIRECT_POTRF_ORDER + 8], ids=lambda m: f"m={m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_in_place_cholesky_reads_the_lower_triangle_and_overwrites_it(dtype, m):
    """A batch of column-major lower triangles (NaN above) becomes the lower factors of
    the symmetric matrices they define, in the same memory; the NaN above the diagonal,
    left there or zeroed, is never read by a solve (at an order LAPACK's potrf is
    called directly on, too), and a matrix that is not positive definite is flagged."""
    torch.manual_seed(1)
    B = torch.randn(3, m, 2 * m, dtype=dtype)
    A = B @ B.mT / m + torch.eye(m, dtype=dtype)  # cond(A) < 30
    buffer = column_major(3, m, m, like=A)
    buffer.copy_(A.tril() + torch.full_like(A, float("nan")).triu(1))
    address = buffer.data_ptr()
    chol = cholesky_in_place(buffer)
    assert chol.factor.data_ptr() == address and chol.factor.shape == (3, m, m)
    assert not chol.failed.any()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    L = chol.factor.tril()
    assert rel_error(L @ L.mT, A) < tol
    one = cholesky_in_place(A[1].clone().mT)  # symmetric: its transpose is column-major
    # the same factor alone (MKL's kernels may round differently at another alignment;
    # a NaN read from above the diagonal would not be close)
    assert rel_error(one.factor.tril(), L[1]) < tol
    indefinite = A.clone()
    indefinite[1].diagonal()[m // 2] = -1.0
    assert cholesky_in_place(indefinite.mT.contiguous().mT).failed.tolist() == [0, 1, 0]
    b = torch.randn(3, m, dtype=dtype)
    # one matrix at a time: a batched LU runs MKL inside torch's parallel loop, which can
    # hang once torch.set_num_threads has turned MKL's dynamic threading off
    expected = torch.stack([torch.linalg.solve(a, c) for a, c in zip(A, b, strict=True)])
    assert rel_error(chol.solve(b), expected) < tol
    assert rel_error(chol[2].solve(b[2]), expected[2]) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lapack_potrf_called_directly_equals_torch_cholesky(dtype):
    """On the CPU the in-place Cholesky calls LAPACK's ``?potrf`` from torch's own library
    (where torch exports it): the same factor as ``torch.linalg.cholesky``, bit for bit,
    and LAPACK's ``info`` (the order of the first non-positive pivot) on failure."""
    potrf = woodbury._lapack_potrf(dtype)
    if potrf is None:
        pytest.skip("this torch build does not export LAPACK's potrf")
    torch.manual_seed(2)
    B = torch.randn(2, 5, 6, dtype=dtype)
    A = B @ B.mT + torch.eye(5, dtype=dtype)
    A[1, 3, 3] = -50.0  # the 4th leading minor is not positive definite
    buffer = A.mT.contiguous().mT
    info = potrf(buffer)
    assert info.tolist() == [0, 4]
    assert torch.equal(buffer[0].tril(), torch.linalg.cholesky(A[0]))
    assert woodbury._lapack_potrf(torch.float16) is None


def test_a_gram_buffer_given_back_is_reused_for_the_same_shape_only():
    """The buffer a thread gave back serves its next Gram of the same shape, dtype and
    device; another shape drops it; another thread never sees it."""
    woodbury.release_workspace()
    like = torch.empty(0)
    buffer, _ = padded_gram(3, 10, 10, like=like)
    woodbury.give_back(buffer)
    again, _ = padded_gram(3, 10, 10, like=like)
    assert again.data_ptr() == buffer.data_ptr()
    woodbury.give_back(again)
    other, _ = padded_gram(2, 10, 10, like=like)  # another shape: a fresh one, kept dropped
    assert other.data_ptr() != buffer.data_ptr() and woodbury._workspace.buffer is None
    woodbury.give_back(other)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(woodbury._workspace.buffer))
    thread.start()
    thread.join()
    assert seen == [None] and woodbury._workspace.buffer is other
    woodbury.release_workspace()
    woodbury.give_back(torch.empty(woodbury.WORKSPACE_BYTES // 4 + 1))  # too large: not kept
    assert woodbury._workspace.buffer is None


def test_release_workspace_frees_every_tensor_kept_for_the_next_calls():
    """The Gram buffer, the mirror sharpen_condition fills, and the masks and start vectors
    made once per size are all freed by release_workspace (the masks, up to 32 d x d, were
    kept before)."""
    woodbury.release_workspace()
    g = torch.randn(3, 12, 4, dtype=torch.float64)
    grams = (g @ g.mT + torch.eye(12, dtype=torch.float64)).contiguous()
    blocks = woodbury.probe_block_estimates(grams, 4)  # a 4 x 4 mask, start vectors
    assert woodbury.sharpen_condition(grams, 4, blocks, 1.0, 0.0) is not None  # 12 x 12
    buffer, _ = padded_gram(3, 12, 12, like=grams)
    woodbury.give_back(buffer)
    kept = [woodbury._workspace.buffer, woodbury._workspace.mirror]
    kept += [woodbury._lower_mask(m, grams.device) for m in (4, 12)]
    kept.append(woodbury._start_vector(12, torch.float64, grams.device))
    assert woodbury._lower_mask.cache_info().currsize == 2
    assert woodbury._start_vector.cache_info().currsize > 0
    references = [weakref.ref(t) for t in kept]
    del kept, buffer
    woodbury.release_workspace()
    assert woodbury._lower_mask.cache_info().currsize == 0
    assert woodbury._start_vector.cache_info().currsize == 0
    assert [r() for r in references] == [None] * len(references)


@pytest.mark.parametrize("direct", [False, True], ids=["cholesky_ex", "direct-potrf"])
def test_a_reused_gram_buffer_leaves_no_trace_in_the_next_direction(direct, monkeypatch):
    """Directions computed after another network's, whose Grams filled the reused buffer,
    equal those computed from a fresh buffer, bit for bit, also where LAPACK's potrf,
    called directly, leaves the upper triangle as it was; memory measurements free it."""
    from riemann_core.measure.memory import host_peak_bytes

    if direct:
        monkeypatch.setattr(woodbury, "DIRECT_POTRF_ORDER", 1)
    model, x, y = Problem(depth=3).make(torch.float32)
    woodbury.release_workspace()
    fresh = rc.direction(model, x, y, damping=1e-3)
    rc.direction(model, 3 * x, y, damping=1e-3)  # other Grams, same shapes
    assert woodbury._workspace.buffer is not None
    reused = rc.direction(model, x, y, damping=1e-3)
    for name in fresh:
        assert torch.equal(fresh[name], reused[name])
    host_peak_bytes(lambda: None)
    assert woodbury._workspace.buffer is None


def test_float32_cpu_grams_of_order_89_to_128_are_factorised_at_136():
    """MKL's slower path for small float32 Choleskys (costs.factor_order); float64 and
    other devices only step off the multiples of 64."""
    f32, f64 = torch.float32, torch.float64
    assert [factor_order(m, f32, "cpu") for m in (88, 89, 100, 128, 129)] == [
        88,
        136,
        136,
        136,
        129,
    ]
    assert [factor_order(m, f64, "cpu") for m in (100, 128)] == [100, 136]
    assert [factor_order(m, f32, "cuda") for m in (100, 128)] == [100, 136]
    assert factor_order(100) == 100  # no dtype or device: the multiples of 64 alone
    buffer, gram = padded_gram(3, 100, 100, like=torch.empty(0))
    assert buffer.shape == (3, 136, 136) and gram.shape == (3, 100, 100)


def test_counted_flops_of_a_padded_float32_gram_match_the_model():
    """Batch 100, one sampled row: each Gram of order 100 is factorised at 136, counted
    and modelled alike where the model is given the dtype and device."""
    torch.manual_seed(0)
    widths, N = (12, 16, 6), 100
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
    x, y = torch.randn(N, 12), torch.randint(0, 6, (N,))
    kw = dict(method="layerwise", output_metric="sampled", damping=1e-2)
    rc.direction(model, x, y, **kw)
    with flop_counter() as counter:
        rc.direction(model, x, y, **kw)
    shape = costs.MLPShape(widths, N, 1)
    padded = costs.flops("layerwise", shape, device="cpu", dtype=torch.float32)["total"]
    assert counter.get_total_flops() == pytest.approx(padded, rel=1e-2)
    assert costs.flops("layerwise", shape, device="cpu")["total"] < 0.9 * padded


@pytest.mark.parametrize("m", [7, 64, 128])
def test_a_gram_padded_with_an_identity_solves_the_gram(m):
    """An order that is a multiple of 64 is factorised as ``A (+) I_8``; the factor solves
    ``A`` for vectors and matrices as the unpadded factor does, and a batch's members too."""
    assert factor_order(m) == (m + 8 if m % 64 == 0 else m)
    torch.manual_seed(m)
    B = torch.randn(2, m, m + 3, dtype=torch.float64)
    A = B @ B.mT + torch.eye(m, dtype=torch.float64)
    buffer, gram = padded_gram(2, m, m, like=A)
    buffer.fill_(float("nan"))  # uninitialised: whatever was there
    assert buffer.shape == (2, factor_order(m), factor_order(m)) and gram.shape == (2, m, m)
    gram.copy_(A.tril() + torch.full_like(A, float("nan")).triu(1))  # the lower triangle only
    pad_with_identity(buffer, m)
    chol = cholesky_in_place(buffer)
    assert not chol.failed.any()
    b, R = torch.randn(2, m, dtype=torch.float64), torch.randn(2, m, 3, dtype=torch.float64)
    assert rel_error(chol.solve(b), torch.linalg.solve(A, b[..., None])[..., 0]) < 1e-12
    assert rel_error(chol.solve(R), torch.linalg.solve(A, R)) < 1e-12
    assert rel_error(chol[1].solve(b[1]), torch.linalg.solve(A[1], b[1])) < 1e-12


def test_in_place_cholesky_needs_column_major_memory():
    with pytest.raises(ValueError, match="column-major"):
        cholesky_in_place(torch.eye(4))


@pytest.mark.parametrize("n", [1, 5, 40, 200, 512])
def test_largest_eigenvalue_estimate_is_a_lower_bound_within_2_5(n):
    """Three power-iteration steps from below: on Grams of random factors with decaying
    columns, between 0.4 and 1 times ``eigvalsh``'s (median within a few percent); a
    batch of matrices gets the estimates of its members."""
    matrices = []
    for seed in range(20):
        torch.manual_seed(seed)
        rank = max(n // 3, 1)
        B = torch.randn(n, rank, dtype=torch.float64) * torch.logspace(0, -3 * seed / 20, rank)
        matrices.append(B @ B.T + 1e-3 * torch.eye(n, dtype=torch.float64))
        ratio = float(largest_eigenvalue(matrices[-1]) / torch.linalg.eigvalsh(matrices[-1])[-1])
        assert 0.4 <= ratio <= 1 + 1e-12
    batched = largest_eigenvalue(torch.stack(matrices))
    torch.testing.assert_close(batched, torch.stack([largest_eigenvalue(A) for A in matrices]))
    # any batch dimensions, any layout
    grid = torch.stack(matrices[:4]).reshape(2, 2, n, n).mT
    torch.testing.assert_close(largest_eigenvalue(grid), batched[:4].reshape(2, 2))


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("b, m", [(1, 5), (1, 600), (27, 128), (3, 600)])
def test_matvec_multiplies_each_matrix_by_its_own_vector(b, m, column_major):
    """Both CPU paths (one matrix, several: by row vectors), on non-symmetric matrices in
    either layout, against an oracle summing each row's products one by one."""
    torch.manual_seed(0)
    A, v = torch.randn(b, m, m, dtype=torch.float64), torch.randn(b, m, 1, dtype=torch.float64)
    A = A.mT.contiguous().mT if column_major else A
    expected = torch.zeros(b, m, 1, dtype=torch.float64)
    for j in range(m):
        expected[:, :, 0] += A[:, :, j] * v[:, j]
    torch.testing.assert_close(woodbury.matvec(A, v), expected)


def test_a_small_cholesky_runs_mkl_on_one_thread_for_this_thread_only():
    """MKL's thread-local setting is 1 inside, restored after (also on an exception) and
    left alone for a large matrix; torch's own thread count never changes."""
    set_local = woodbury._mkl_set_num_threads_local()
    if set_local is None:
        pytest.skip("this torch exports no MKL thread-local setting")

    def setting():  # MKL's thread-local setting in force (0: the global one), unchanged
        current = set_local(1)
        set_local(current)
        return current

    threads, before = torch.get_num_threads(), setting()
    small, large = torch.eye(8), torch.empty(0, SERIAL_POTRF_ORDER, SERIAL_POTRF_ORDER)
    with woodbury._serial_if_small(small):
        assert setting() == 1
        assert torch.get_num_threads() == threads
    assert setting() == before
    with pytest.raises(ZeroDivisionError), woodbury._serial_if_small(small):
        1 / 0  # noqa: B018
    assert setting() == before
    with woodbury._serial_if_small(large):
        assert setting() == before
    torch.manual_seed(0)
    B = torch.randn(3, 40, 80, dtype=torch.float64)
    A = B @ B.mT
    chol = cholesky_in_place(A.mT.contiguous().mT)
    torch.testing.assert_close(chol.factor.tril(), torch.linalg.cholesky(A))


def test_diagonal_blocks_are_views_of_any_layout():
    A = torch.arange(2 * 36.0).reshape(2, 6, 6)
    for matrix in (A, A.mT):
        blocks = diagonal_blocks(matrix, 2)
        assert blocks.shape == (2, 3, 2, 2) and blocks.data_ptr() == matrix.data_ptr()
        for s in range(3):
            assert torch.equal(blocks[:, s], matrix[:, 2 * s : 2 * s + 2, 2 * s : 2 * s + 2])


@pytest.mark.parametrize("method", ["layerwise", "natural"], ids=lambda m: f"method={m}")
@pytest.mark.parametrize(
    "problem",
    [Problem(depth=3), Problem(loss="mse"), Problem(depth=3, act="relu", batch=8)],
    ids=lambda p: p.id,
)
def test_gram_estimate_from_diagonal_blocks_brackets_lambda_max(problem, method):
    """The Grams the methods factorise: the estimate, the sum of the probe blocks', lies
    within ``[lambda_max, r lambda_max]`` (interlacing, and ``lambda_max <= sum of the
    blocks'``) but for the power iterations' shortfall: above 0.4 ``lambda_max``."""
    model, x, y = problem.make()
    opts = Options(damping=1e-3, loss=problem.loss_name)
    built = build_problem(model, x, y, opts, needs_factor=True)
    grams = (
        [damped_gram([h], 1e-3) for h in built.handlers]
        if method == "layerwise"
        else [damped_gram(built.handlers, 1e-3)]
    )
    for G in grams:
        r = G.shape[0] // problem.batch
        exact = torch.linalg.eigvalsh(G)[-1]
        ratio = float(probe_block_estimates(G, problem.batch).sum() / exact)
        assert 0.4 <= ratio <= r * (1 + 1e-12)


@pytest.mark.parametrize(
    "problem",
    [Problem(depth=3), Problem(loss="mse", classes=5), Problem(depth=3, act="relu", batch=8)],
    ids=lambda p: p.id,
)
def test_a_sharpened_condition_lies_between_the_largest_block_and_the_sum(problem):
    """Where the blocks' sum passes ``above``: the whole Gram's estimate, never above
    ``lambda_max / mu`` (eigvalsh, float64) where it is not the largest block's, above
    0.4 of it, never below the largest block's and never above the sum; ``None`` where no
    sum passes ``above`` (no Gram read: its strict upper triangle, NaN here, never is) or
    for a Gram of one probe block."""
    mu = 1e-3
    model, x, y = problem.make()
    opts = Options(damping=mu, loss=problem.loss_name)
    built = build_problem(model, x, y, opts, needs_factor=True)
    N = problem.batch
    grams = torch.stack([damped_gram([h], mu) for h in built.handlers[:2]])
    grams += torch.full_like(grams, float("nan")).triu(1)  # only the lower triangles hold it
    exact = torch.linalg.eigvalsh(grams)[:, -1] / mu
    blocks = probe_block_estimates(grams, N)
    summed, largest = (blocks / mu).sum(-1), blocks.amax(-1) / mu
    sharp = sharpen_condition(grams, N, blocks, mu, above=0.0)
    assert (largest <= sharp).all() and (sharp <= summed).all()
    assert (sharp <= torch.maximum(largest, exact * (1 + 1e-12))).all()
    assert (sharp >= 0.4 * exact).all()
    assert (sharp < summed).any()  # the sums read high on these Grams
    above = float(summed.min())  # the lower sum is at the threshold: kept
    partial = sharpen_condition(grams, N, blocks, mu, above)
    low = int(summed.argmin())
    assert partial[low] == summed[low] and partial[1 - low] == sharp[1 - low]
    assert sharpen_condition(grams, N, blocks, mu, above=float(summed.max())) is None
    assert sharpen_condition(grams[:, :N, :N], N, blocks[:, :1], mu, above=0.0) is None


def test_cholesky_indefinite_raises_solve_error():
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    with pytest.raises(rc.SolveError, match=r"my matrix \(3 x 3.*not positive definite"):
        cholesky(A, what="my matrix")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_cholesky_non_finite_raises_solve_error(bad):
    A = torch.eye(3, dtype=torch.float64)
    A[1, 2] = A[2, 1] = bad
    with pytest.raises(rc.SolveError, match="my matrix contains NaN or inf"):
        cholesky(A, what="my matrix")


def test_cholesky_nan_on_diagonal_raises_solve_error():
    A = torch.eye(3)
    A[0, 0] = float("nan")
    with pytest.raises(rc.SolveError, match="NaN or inf"):
        cholesky(A, what="my matrix")


def test_solve_error_is_a_runtime_error():
    assert issubclass(rc.SolveError, RuntimeError)
    assert isinstance(cholesky(torch.eye(2), what="x"), Cholesky)


def test_largest_eigenvalue_of_a_float32_gram_past_the_squares_range():
    """Found by a hunt: the float32 norm of a product of 1e21 read inf (its square past
    float32's range), the next vector 0 and the estimate 0: cond(G) read 0 for float32
    layerwise on inputs of 1e10, and a direction 1.5e15 times off the oracle came back
    without a word. The norm is taken in float64: the estimate is the float64 one's."""
    torch.manual_seed(0)
    B = torch.randn(24, 8, dtype=torch.float64)
    for scale in (1e-30, 1.0, 1e21, 1e36):
        G = B @ B.T * scale
        estimate = float(largest_eigenvalue(G.float()))
        assert 0.4 <= estimate / float(torch.linalg.eigvalsh(G)[-1]) <= 1 + 1e-5, scale


def test_largest_eigenvalue_of_a_float32_gram_under_the_normal_range():
    """Found by review: with the norm cast back to float32, one under float32's smallest
    normal number (1.2e-38) was clamped to it, the next vector shrank and the estimate
    read 0 for lambda_max of 1e-40, 3% of it at 1e-38 (cond(G) read as low, the checks
    skipped). A subnormal norm divides as it is."""
    torch.manual_seed(0)
    B = torch.randn(24, 8, dtype=torch.float64)
    G0 = B @ B.T / torch.linalg.eigvalsh(B @ B.T)[-1]
    for scale in (1e-41, 1e-40, 1e-39, 1e-38, 3e-38):
        G = (G0 * scale).float()
        exact = float(torch.linalg.eigvalsh(G.double())[-1])
        assert 0.4 <= float(largest_eigenvalue(G)) / exact <= 1 + 1e-3, scale
