"""Damped solves with a low-rank Gram: the Woodbury identity, Cholesky with jitter.

For a metric ``G = mu I + K^T K`` with ``K`` of shape ``(d, n)`` and ``d << n``,

    G^{-1} v = (v - K^T (mu I_d + K K^T)^{-1} K v) / mu,

so a solve costs one ``d x d`` Cholesky (``d^3 / 3``) plus two products with ``K``
instead of an ``n x n`` factorisation.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .blas import TORCH_CPU as _TORCH_CPU
from .blas import profiled
from .costs import POWER_STEPS, factor_order

#: Relative jitter tried, in order, when a Cholesky factorisation fails.
JITTER_SCALES = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


class SolveError(RuntimeError):
    """A damped metric could not be factorised, even with jitter, or a solve did not
    solve (its relative residual exceeds the bound of its precision)."""


class AccuracyWarning(UserWarning):
    """A direction was computed, but it is less accurate than the options suggest: the
    model's dtype cannot determine it at this damping, a solve's residual cannot prove
    it within 1% even after refinement, or the Cholesky factorisation needed a jitter
    larger than a tenth of the damping (a different metric)."""


@dataclass(frozen=True)
class Cholesky:
    """Lower Cholesky factor of ``A + jitter I`` and the jitter it needed; ``factor`` may
    hold a batch of factors (``(..., m, m)``), or those of ``A`` padded with an identity,
    ``A (+) I`` (:func:`padded_gram`), which solve ``A`` for the first rows.

    Solves read only the lower triangle of ``factor``; its strict upper triangle may hold
    anything (:func:`cholesky_in_place`), so ``factor.tril()`` is the factor as a matrix.

    ``failed`` is a device boolean (one per factor) for a factor from
    :func:`cholesky_in_place` or :func:`cholesky_deferred`, whose success is read later;
    ``None`` once known.
    """

    factor: Tensor
    jitter: float
    failed: Tensor | None = None

    def solve(self, rhs: Tensor) -> Tensor:
        """``(A + jitter I)^{-1} rhs`` for ``rhs`` of shape ``(..., m)`` or ``(..., m, k)``."""
        column = rhs.ndim == self.factor.ndim - 1
        dtype = self.factor.dtype
        b = rhs if rhs.dtype == dtype else rhs.to(dtype)
        b = b[..., None] if column else b
        m, order = b.shape[-2], self.factor.shape[-1]
        if order > m:  # a factor of A (+) I: zero rows for the identity's, which stay zero
            b = torch.nn.functional.pad(b, (0, 0, 0, order - m))
        # Two triangular solves: faster than cholesky_solve on CPU for few right-hand sides.
        y = torch.linalg.solve_triangular(self.factor, b, upper=False)
        out = torch.linalg.solve_triangular(self.factor.mT, y, upper=True)
        out = out if order == m else out[..., :m, :]
        out = out if out.dtype == rhs.dtype else out.to(rhs.dtype)
        return out[..., 0] if column else out

    def __getitem__(self, i: int) -> Cholesky:
        """The ``i``-th factor of a batch."""
        failed = None if self.failed is None else self.failed[i]
        return Cholesky(self.factor[i], self.jitter, failed)


def cholesky_deferred(matrix: Tensor) -> Cholesky:
    """Cholesky of ``matrix`` (any layout; LAPACK's copy is made; a batch ``(..., m, m)``)
    without a host sync. Its failure is a device boolean per factor, read later, as for
    :func:`cholesky_in_place`."""
    factor, info = cholesky_ex(matrix)
    return Cholesky(factor, 0.0, _failed(factor, info))


def _failed(factor: Tensor, info: Tensor) -> Tensor:
    """Whether each Cholesky of a batch failed: LAPACK's ``info != 0``, or a NaN or inf
    pivot."""
    pivots = factor.diagonal(dim1=-2, dim2=-1).sum(-1)
    # p - p is NaN for a NaN or inf p and 0 otherwise, so p - p + info is nonzero (or NaN)
    # exactly where either failed: three kernels, where isfinite alone is four
    return (pivots - pivots).add_(info).ne(0)


def cholesky_in_place(matrix: Tensor) -> Cholesky:
    """Cholesky of the symmetric matrices whose lower triangles ``matrix`` holds
    (``(..., m, m)`` in column-major memory, ``matrix.mT`` contiguous; the strict upper
    triangle is not read), overwriting those lower triangles with the lower factors: no
    copy, no host sync. The strict upper triangle may be left as it was: every solve with
    the factor reads only its lower triangle (``factor.tril()`` is the factor itself).

    LAPACK works on column-major memory, so factorising in place copies nothing. On the
    CPU, from order :data:`DIRECT_POTRF_ORDER`, LAPACK's ``?potrf`` is called directly
    (:func:`potrf_`); otherwise, or where torch does not export it,
    ``torch.linalg.cholesky_ex`` with ``out`` set to ``matrix`` itself (one call for a
    batch; it zeroes the upper triangle too), on one thread below
    :data:`SERIAL_POTRF_ORDER`.
    The failure (``info != 0``, or a NaN or inf pivot) is a device boolean, read later
    with the other deferred checks; a failed factor holds garbage: redo it with
    :func:`cholesky`.
    """
    if not matrix.mT.is_contiguous():
        raise ValueError(
            "cholesky_in_place needs a matrix in column-major memory (matrix.mT contiguous); "
            "pass buffer.mT for a row-major buffer"
        )
    direct = matrix.device.type == "cpu" and matrix.shape[-1] >= DIRECT_POTRF_ORDER
    if direct and _lapack_potrf(matrix.dtype) is not None:
        info = potrf_(matrix)
    else:
        info = torch.empty(matrix.shape[:-2], dtype=torch.int32, device=matrix.device)
        cholesky_ex(matrix, out=(matrix, info))
    return Cholesky(matrix, 0.0, _failed(matrix, info))


#: The order from which :func:`cholesky_in_place` calls LAPACK directly on the CPU: the
#: call costs ~0.1 ms more than ``cholesky_ex``'s (a custom operator, ctypes), which
#: zeroing the triangle outweighs from about 500 (three factors at 520: 1.86 against 2.05
#: ms; at 264: 0.57 against 0.53 ms; at 1160: 11.4 against 14.9 ms, on a 2-core CPU).
DIRECT_POTRF_ORDER = 512

#: The order below which a CPU Cholesky runs on one thread: there MKL's threaded potrf
#: spends more on coordinating its threads than it gains (on a 2-core CPU, float32, one
#: thread took 0.52x the time of two at order 136, 0.70x at 264, 0.9x at 520, and 1.5x
#: at 776).
SERIAL_POTRF_ORDER = 512


def cholesky_ex(matrix: Tensor, **kwargs):
    """``torch.linalg.cholesky_ex(matrix, **kwargs)``, with MKL on one thread for a CPU
    matrix of order below :data:`SERIAL_POTRF_ORDER`: every Cholesky of this module goes
    through it."""
    with _serial_if_small(matrix):
        return torch.linalg.cholesky_ex(matrix, **kwargs)


@contextlib.contextmanager
def _serial_if_small(matrix: Tensor):
    """Run the block (a Cholesky of ``matrix``) with MKL on one thread when ``matrix`` is
    on the CPU and of order below :data:`SERIAL_POTRF_ORDER`.

    MKL's thread-local setting (``MKL_Set_Num_Threads_Local``, restored after, also on
    an exception): this thread's MKL calls only, not torch's own thread pool, nor other
    threads, nor MKL's dynamic threading (which ``torch.set_num_threads`` turns off for
    the whole process). Where torch does not export it (no MKL), nothing changes.
    """
    set_local = _mkl_set_num_threads_local()
    if set_local is None or matrix.device.type != "cpu" or matrix.shape[-1] >= SERIAL_POTRF_ORDER:
        yield
        return
    previous = set_local(1)  # 0: this thread followed the global setting
    try:
        yield
    finally:
        set_local(previous)


@functools.cache
def _mkl_set_num_threads_local() -> Callable[[int], int] | None:
    """MKL's ``MKL_Set_Num_Threads_Local`` (``n -> previous``) from the library torch calls
    for LAPACK on the CPU, or ``None`` where torch does not export it."""
    try:
        function = ctypes.CDLL(str(_TORCH_CPU)).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
    return function


@functools.cache
def _lapack_potrf(dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
    """``matrix -> info``: LAPACK's ``?potrf`` (lower, in place) on every column-major
    ``(..., m, m)`` matrix of ``matrix``, taken from the library torch itself calls for
    ``linalg.cholesky`` on the CPU (MKL in the x86 wheels); ``None`` where torch does not
    export it, or for another dtype.

    Called directly it skips what ``cholesky_ex`` adds after the same call: zeroing the
    upper triangle, a strided pass over the column-major matrix. On a 2-core CPU that
    pass took 3.4 ms for three 1160 x 1160 factors, against 10-11 ms for the
    factorisations themselves.
    """
    name = {torch.float32: "spotrf_", torch.float64: "dpotrf_"}.get(dtype)
    try:
        potrf = getattr(ctypes.CDLL(str(_TORCH_CPU)), name)
    except (OSError, AttributeError, TypeError):
        return None
    c_int_p = ctypes.POINTER(ctypes.c_int)
    potrf.argtypes = [ctypes.c_char_p, c_int_p, ctypes.c_void_p, c_int_p, c_int_p]
    potrf.restype = None

    def factorise(matrix: Tensor) -> Tensor:
        m = matrix.shape[-1]
        order, lda, info = ctypes.c_int(m), ctypes.c_int(max(matrix.stride(-1), 1)), ctypes.c_int()
        batch = matrix.view(-1, m, m)  # a view: LAPACK writes into matrix
        step = batch.stride(0) * batch.element_size()
        infos = torch.empty(batch.shape[0], dtype=torch.int32)
        for i in range(batch.shape[0]):
            potrf(b"L", order, batch.data_ptr() + i * step, lda, info)
            infos[i] = info.value
        return infos.view(matrix.shape[:-2])

    return factorise


@profiled
@torch.library.custom_op("riemann_core::potrf_", mutates_args=("matrix",), device_types="cpu")
def potrf_(matrix: Tensor) -> Tensor:
    """LAPACK's lower Cholesky of every column-major ``(..., m, m)`` matrix of ``matrix``,
    in place (:func:`_lapack_potrf`; CPU, where torch exports it); returns LAPACK's
    ``info`` per matrix. An operator of its own (:func:`~riemann_core.blas.profiled`), so
    that ``FlopCounterMode`` and the profiler see it (``riemann_core.measure.flops`` counts
    it as a Cholesky)."""
    factorise = _lapack_potrf(matrix.dtype)
    if factorise is None or not matrix.mT.is_contiguous():
        raise ValueError(
            f"potrf_ needs column-major {matrix.dtype} matrices (matrix.mT contiguous) and a "
            "torch that exports LAPACK's potrf; use torch.linalg.cholesky_ex otherwise"
        )
    return factorise(matrix)


@potrf_.register_fake
def _(matrix: Tensor) -> Tensor:
    return matrix.new_empty(matrix.shape[:-2], dtype=torch.int32)


#: The largest Gram buffer (bytes) a thread keeps for its next call on the CPU.
WORKSPACE_BYTES = 64 * 2**20


class _Workspace(threading.local):
    """The Gram buffer this thread gave back last (:func:`give_back`), or ``None``; and
    the matrix :func:`sharpen_condition` mirrored a Gram into last."""

    buffer: Tensor | None = None
    mirror: Tensor | None = None


_workspace = _Workspace()


def padded_gram(*shape: int, like) -> tuple[Tensor, Tensor]:
    """``(buffer, gram)``: an uninitialised column-major ``(..., M, M)`` buffer for the
    factorisation (``M = factor_order(m)`` for ``like``'s dtype and device) and its
    ``(..., m, m)`` view ``gram``. Once ``gram`` holds ``A``'s lower triangle,
    :func:`pad_with_identity` makes the buffer ``A (+) I``, whose Cholesky factor is
    ``L (+) I``, ``L`` that of ``A``;
    :meth:`Cholesky.solve` pads right-hand sides with zeros accordingly.

    The buffer given back last by this thread (:func:`give_back`) is reused when it has
    the same shape, dtype and device; one of another shape is dropped."""
    *batch, m, _ = shape
    order = factor_order(m, like.dtype, like.device)
    buffer, _workspace.buffer = _workspace.buffer, None
    if buffer is None or (
        buffer.shape != (*batch, order, order)
        or buffer.dtype != like.dtype
        or buffer.device != like.device
    ):
        buffer = column_major(*batch, order, order, like=like)
    return buffer, buffer[..., :m, :m]


def give_back(buffer: Tensor) -> None:
    """Keep a Gram buffer from :func:`padded_gram` that nothing references any more for
    this thread's next call: on the CPU, up to :data:`WORKSPACE_BYTES`.

    Fresh memory costs a page fault per 4 KiB page at its first touch, and glibc's
    ``malloc`` returns large blocks to the system when they are freed: on a 2-core CPU
    the three 1160 x 1160 Grams of 784-1024-1024-10 (16 MB) took about 5 ms of page
    faults per call, a tenth of the exact direction. (CUDA's caching allocator already
    reuses its blocks.) :func:`release_workspace` frees it."""
    if buffer.device.type == "cpu" and buffer.numel() * buffer.element_size() <= WORKSPACE_BYTES:
        _workspace.buffer = buffer


def release_workspace() -> None:
    """Free what this module keeps for its next calls: this thread's kept Gram buffer
    (:func:`give_back`, up to :data:`WORKSPACE_BYTES`) and the ``d x d`` matrix
    :func:`sharpen_condition` mirrors a Gram into (up to as much again), and, for every
    thread, the tensors made once per size: the lower-triangle masks (:func:`_lower_mask`,
    up to 32 ``d x d`` bool matrices, 1.3 MiB at ``d = 1152``, on the devices they were
    made on) and the power iteration's start vectors (:func:`_start_vector`, up to 32);
    e.g. before measuring the memory a call needs from scratch, or once preconditioning
    is done. Another thread's Gram buffer and mirror are its own: it frees them by calling
    this itself (or they go with the thread). What is freed is made again where needed."""
    _workspace.buffer = _workspace.mirror = None
    _lower_mask.cache_clear()
    _start_vector.cache_clear()


def pad_with_identity(buffer: Tensor, m: int) -> None:
    """Write the rows of ``buffer`` below its first ``m``: zeros and the identity's
    diagonal. Called after the Gram is written, so that its GEMMs, not this strided
    write, touch the fresh buffer's pages first (on CPU a first touch costs a page fault:
    about 5 ms for the three 1160 x 1160 Grams of 784-1024-1024-10)."""
    if buffer.shape[-1] > m:
        buffer[..., m:, :].zero_()
        buffer[..., m:, m:].diagonal(dim1=-2, dim2=-1).fill_(1)


def column_major(*shape: int, like, zero: bool = False) -> Tensor:
    """An uninitialised (``zero``: zero) ``(..., m, m)`` matrix in column-major memory,
    the layout :func:`cholesky_in_place` factorises without a copy, with the dtype and
    device of ``like`` (a tensor or a kernel)."""
    *batch, m, n = shape
    new = torch.zeros if zero else torch.empty
    return new(*batch, n, m, dtype=like.dtype, device=like.device).mT


def cholesky(matrix: Tensor, *, what: str) -> Cholesky:
    """Cholesky of a symmetric positive definite ``matrix``, retrying with jitter.

    A numerically indefinite float32 Gram fails the plain factorisation; we then add
    ``s * mean(diag) * I`` for the scales in :data:`JITTER_SCALES` and report the
    jitter used. ``what`` names the matrix in the error raised when every try fails.
    """
    factor, info = cholesky_ex(matrix)
    if int(info) == 0:
        return Cholesky(factor, 0.0)
    if not torch.isfinite(matrix).all():
        raise SolveError(
            f"the {what} contains NaN or inf; check the model outputs and parameters "
            "for overflow, or solve in float64 (solve_dtype=torch.float64)"
        )
    scale = float(matrix.diagonal().abs().mean())
    for s in JITTER_SCALES[1:]:
        jittered = matrix.clone()
        jittered.diagonal().add_(s * scale)
        factor, info = cholesky_ex(jittered)
        if int(info) == 0:
            return Cholesky(factor, s * scale)
    raise SolveError(
        f"the {what} ({matrix.shape[0]} x {matrix.shape[0]}, {matrix.dtype}) is not "
        f"positive definite even with jitter up to {JITTER_SCALES[-1]:g} x its mean "
        "diagonal; increase the damping or solve in float64 (solve_dtype=torch.float64)"
    )


def eigenvalues(matrix: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh(matrix)``, ascending. Under a ``TorchDispatchMode`` (the
    FLOP counter) ``eigvalsh`` cannot tell that its input needs no gradient and computes
    the eigenvectors too, 9 n^3 FLOPs instead of 4 n^3 / 3; the operator it calls, asked
    for none, computes only the eigenvalues either way."""
    return torch.ops.aten._linalg_eigh(matrix, "L", False)[0]


def largest_eigenvalue(matrix: Tensor, steps: int = POWER_STEPS) -> Tensor:
    """An estimate of ``lambda_max`` of symmetric PSD matrices (``(..., m, m)``, every
    entry read; one device scalar per matrix).

    ``steps`` power iterations from a fixed vector without sign structure; ``||A v||``
    for the last unit ``v`` never exceeds ``lambda_max``. With three steps it is within
    a few percent of it when the top eigenvalue stands out, and above ``0.4 lambda_max``
    on random Grams (tests/test_woodbury.py): enough for an order of magnitude of the
    condition number. ``2 m^2`` FLOPs per step, no host sync.

    A float32 product's norm is taken in float64 (``||w||^2`` leaves float32's range once
    ``||w||`` exceeds 1.8e19, or falls under 1e-19; the norm, cast back, may be
    subnormal): in float32 the norm of a Gram's product of 1e21 read inf, the next vector
    0 and the estimate 0, so that ``cond(G)`` read 0 and no accuracy check ran (found by
    a hunt: float32 ``layerwise`` on inputs of 1e10, a direction 1.5e15 times off the
    float64 oracle, without a word).
    """
    m = matrix.shape[-1]
    A = matrix.reshape(-1, m, m)  # one product per step, whatever the batch dimensions
    v = _start_vector(m, matrix.dtype, matrix.device).expand(A.shape[0], m, 1)
    wide = torch.float64 if matrix.dtype == torch.float32 else None
    info = torch.finfo(matrix.dtype)
    # a float32 norm under float32's smallest normal number is subnormal, not 0 (its
    # smallest subnormal, tiny * eps): clamped at tiny, the next vector shrank and the
    # estimate of Grams whose lambda_max was under 1e-37 read 0 (1e-40) or 3% (1e-38)
    tiny, largest = info.tiny * info.eps if wide else info.tiny, info.max
    for step in range(steps):
        w = matvec(A, v)
        # (the norm fits float32 up to 3.4e38, only its sum of squares needs float64; past
        # that it reads inf, and the next vector, divided by the largest number, not 0)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=wide).to(matrix.dtype)
        if step < steps - 1:
            v = w / norm.clamp(tiny, largest)
    return norm.reshape(matrix.shape[:-2])


def matvec(A: Tensor, v: Tensor) -> Tensor:
    """``A_i v_i`` for every matrix of ``A`` (``(b, m, m)``) and column of ``v``
    (``(b, m, 1)``), as ``(b, m, 1)``.

    One ``bmm``; for more than one CPU matrix as ``(v_i^T A_i^T)^T``, a row vector times
    the transposed matrices: MKL's ``bmm`` with one column is slow there, with one row it
    streams the memory of a column-major ``A`` (the Grams') row by row (torch 2.13, 2-core
    CPU, three column-major matrices: 5 against 25 us at order 136, 137 us against 2.2 ms
    at 1160; row-major ones 2.5-5x faster too; one matrix: the same).
    """
    if A.device.type != "cpu" or A.shape[0] == 1:
        return torch.bmm(A, v)
    return torch.bmm(v.mT, A.mT).mT


@functools.lru_cache(maxsize=32)
def _start_vector(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The power iteration's fixed unit start vector ``(m, 1)`` (made once per size; only
    read)."""
    v = torch.cos(torch.arange(m, dtype=dtype, device=device) * 2.399963)
    return (v / v.norm())[:, None]


def diagonal_blocks(matrix: Tensor, size: int) -> Tensor:
    """The ``size x size`` diagonal blocks of ``(..., m, m)`` matrices, as a view
    ``(..., m / size, size, size)``."""
    *batch, m, _ = matrix.shape
    *outer, row, column = matrix.stride()
    return matrix.as_strided(
        (*batch, m // size, size, size),
        (*outer, size * (row + column), row, column),
        matrix.storage_offset(),
    )


def probe_block_estimates(gram: Tensor, samples: int, steps: int = POWER_STEPS) -> Tensor:
    """``(..., r)``: estimates of ``lambda_max`` of the ``N x N`` diagonal blocks of damped
    Grams ``(..., d, d)`` whose ``d = r N`` rows are probe-major (``N = samples``): the
    Gram of one probe's rows each (one probe: the whole Gram's). Their sum estimates
    ``lambda_max(G)``, never below it but by the power iterations' shortfall.

    For PSD blocks ``max_s lambda_max(G_ss) <= lambda_max(G) <= sum_s lambda_max(G_ss)``
    (interlacing; Cauchy-Schwarz on ``x^T G x``), so the sum lies within
    ``[lambda_max(G), r lambda_max(G)]``. The largest block alone can read ``r`` times
    low: where a sample's rows are correlated (an MSE output with nearly equal rows of
    the last weight) it read 47x low, and float32 directions 1-9% off passed unwarned.
    The blocks are ``r N^2`` entries instead of ``r^2 N^2``: cheap before the
    factorisation overwrites the Gram. Only their lower triangles are read (``syrk``
    writes no more). Where the sum sends a solve to the float64 residual,
    :func:`sharpen_condition` reads the whole Gram.
    """
    if gram.shape[-1] == samples:  # one probe: the whole product (modules.lower_gram)
        return largest_eigenvalue(gram, steps)[..., None]
    blocks = diagonal_blocks(gram, samples)
    # the blocks in full from their lower triangles: one copy, not one per step
    full = torch.where(_lower_mask(samples, gram.device), blocks, blocks.mT)
    return largest_eigenvalue(full, steps)


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor on ``device`` back to the host costs no synchronisation
    (on the CPU): a choice made on the host from computed values is then free."""
    return device.type == "cpu"


#: Power-iteration steps of :func:`sharpen_condition` on a whole Gram: twice the blocks'
#: (three read 0.28 of ``lambda_max`` on a random MLP, found by a hunt; six 0.75-1.0 on the
#: MLPs of tests/test_woodbury.py).
SHARPEN_STEPS = 2 * POWER_STEPS


def sharpen_condition(
    grams: Tensor, samples: int, blocks: Tensor, damping: float, above: float
) -> Tensor | None:
    """For damped Grams ``(..., d, d)`` (lower triangles) of ``r`` probe blocks whose
    estimates ``blocks / damping`` (:func:`probe_block_estimates`, ``(..., r)``) sum past
    ``above``: a lower estimate of their condition, to decide on the float64 residual
    (``None`` where none is made: on a GPU, for one probe block, or where no sum passes
    ``above``; the sum itself is kept elsewhere).

    The sum over the probe blocks reads up to ``r`` times high (2-10x on MLPs with the
    exact cross-entropy factor, ``r = C - 1``), and past ``above`` it sends a solve to the
    float64 residual (7 of 59 ms for the exact direction of 784-1024-1024-10 at batch 128,
    where both Grams it sent there had a ``cond`` under the threshold). Power iterations on
    the whole Gram (its lower triangle mirrored into a ``d x d`` matrix this thread keeps,
    as it keeps the Gram buffer: 0.6 ms there, 2 ms in fresh memory at ``d = 1152``) never
    read above ``lambda_max``, but a start vector nearly orthogonal to its eigenvector can
    read it far low (a hunt built a Gram read 12x low): the estimate is floored at the
    largest block's, never below ``1 / r`` of the sum (interlacing: ``lambda_max(G) >=
    max_s lambda_max(G_ss)``), and capped at the sum. On the CPU only, where reading the
    sums back costs no host sync.
    """
    d = grams.shape[-1]
    if not reads_are_free(grams.device) or d == samples:
        return None
    condition = (blocks / damping).sum(-1)
    flat, estimates = grams.reshape(-1, d, d), condition.reshape(-1)
    high = (estimates > above).nonzero().flatten().tolist()
    if not high:
        return None
    whole = _workspace.mirror
    if whole is None or whole.shape != (d, d) or whole.dtype != grams.dtype:
        whole = torch.empty(d, d, dtype=grams.dtype, device=grams.device)
    if whole.numel() * whole.element_size() <= WORKSPACE_BYTES:
        _workspace.mirror = whole
    floor = blocks.reshape(-1, blocks.shape[-1]).amax(-1) / damping
    sharp, lower = estimates.clone(), _lower_mask(d, grams.device)
    for i in high:
        torch.where(lower, flat[i], flat[i].mT, out=whole)
        estimate = torch.maximum(largest_eigenvalue(whole, SHARPEN_STEPS) / damping, floor[i])
        sharp[i] = torch.minimum(sharp[i], estimate)
    return sharp.reshape(condition.shape)


@functools.lru_cache(maxsize=32)
def _lower_mask(m: int, device: torch.device) -> Tensor:
    """``True`` on and below the diagonal of an ``m x m`` matrix (made once per size)."""
    return torch.ones(m, m, dtype=torch.bool, device=device).tril_()


@dataclass(frozen=True)
class WoodburySolve:
    """Solver for ``(mu I + K^T K) x = v`` given ``v -> K v``, ``t -> K^T t`` and the
    Cholesky factor of ``mu I + K K^T``.

    ``K_mv`` and ``K_tmv`` work on whatever vector type the caller uses: a flat tensor,
    or a list of per-parameter tensors.
    """

    inner: Cholesky
    damping: float
    K_mv: Callable
    K_tmv: Callable

    def coefficients(self, v) -> Tensor:
        """``t = (mu I + K K^T)^{-1} K v``, the data-space coefficients of ``v``."""
        return self.inner.solve(self.K_mv(v))

    def __call__(self, v):
        """``(mu I + K^T K)^{-1} v``, for any ``v`` (not only gradients)."""
        t = self.coefficients(v)
        return _axpy(-1.0, self.K_tmv(t.to(_dtype_of(v))), v, scale=1.0 / self.damping)


def _dtype_of(v) -> torch.dtype:
    return v.dtype if isinstance(v, Tensor) else v[0].dtype


def _axpy(a: float, x, y, scale: float = 1.0):
    """``scale (a x + y)`` for tensors or lists of tensors."""
    if isinstance(x, Tensor):
        return (a * x + y) * scale
    return [(a * xi + yi) * scale for xi, yi in zip(x, y, strict=True)]
