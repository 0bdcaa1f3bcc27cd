"""The symmetric rank-k product ``C = R R^T`` (BLAS ``?syrk``), which torch has no
operator for, called from the BLAS torch itself links on the CPU (MKL in the x86 wheels).

``syrk`` writes one triangle of ``R R^T`` for ``d^2 k`` FLOPs (``R`` is ``d x k``), half a
GEMM's, at a GEMM's rate: the Gram ``K K^T`` of every Woodbury solve is such a product.
Without it the lower triangle takes one GEMM per block-row of the rows
(``d^2 k (1 + 1/b)`` FLOPs for ``b`` blocks), whose thin GEMMs run slower: on a 2-core
CPU, float32, ``d = 1152``, ``k = 1024``, nine blocks, ``syrk`` took 0.67-0.85x their
time (``k = 10``: 0.34x).

MKL exports its BLAS only under its internal names (``mkl_blas_ssyrk``: the reference
BLAS's arguments, by pointer, its integers 64-bit), so :func:`_blas_syrk` checks small
products in every layout against ``torch.mm`` before it is trusted; where torch is built
without MKL, the symbol is missing or a check fails (other builds of torch, other CPUs,
CUDA), :func:`symmetric_product_applies` is false and callers take their GEMMs.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

#: The library of torch's CPU operators (and, in the x86 wheels, of MKL's BLAS and LAPACK).
TORCH_CPU = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"

_SYRK = {
    torch.float32: ("mkl_blas_ssyrk", ctypes.c_float),
    torch.float64: ("mkl_blas_dsyrk", ctypes.c_double),
}


@functools.cache
def _blas_syrk(dtype: torch.dtype) -> Callable[[Tensor, Tensor, float], None] | None:
    """``(rows, out, beta)``: ``out <- rows rows^T + beta out`` on the lower triangle of
    ``out`` (strict upper triangle untouched), by BLAS ``?syrk``; ``None`` where torch's
    library does not export it for ``dtype``, or it fails the check on a small product.

    ``rows`` and ``out`` may be row- or column-major with any leading dimension: BLAS
    reads a row-major matrix as the transpose of a column-major one, so the transposition
    (of ``rows``) and the triangle (of ``out``) are chosen to match.
    """
    name, scalar = _SYRK.get(dtype, (None, None))
    if name is None or not torch.backends.mkl.is_available():
        return None
    try:
        syrk = getattr(ctypes.CDLL(str(TORCH_CPU)), name)
    except (OSError, AttributeError, TypeError):
        return None
    int_p, scalar_p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(scalar)
    syrk.argtypes = [ctypes.c_char_p, ctypes.c_char_p, int_p, int_p, scalar_p,
                     ctypes.c_void_p, int_p, scalar_p, ctypes.c_void_p, int_p]  # fmt: skip
    syrk.restype = None

    def product(rows: Tensor, out: Tensor, beta: float) -> None:
        d, k = rows.shape
        (rows_major, lda), (out_major, ldc) = _layout(rows), _layout(out)
        # column-major rows are R itself ("N"); row-major ones BLAS reads as R^T ("T")
        trans = b"N" if rows_major == "column" else b"T"
        # BLAS's lower triangle of a row-major out is its upper one
        uplo = b"L" if out_major == "column" else b"U"
        integer = ctypes.c_int64
        syrk(uplo, trans, integer(d), integer(k), scalar(1), rows.data_ptr(), integer(lda),
             scalar(beta), out.data_ptr(), integer(ldc))  # fmt: skip

    return product if _passes_check(product, dtype) else None


def _passes_check(product, dtype: torch.dtype) -> bool:
    """Whether ``product`` (:func:`_blas_syrk`'s) writes exactly the lower triangle of
    ``R R^T + beta C`` for small ``R`` and ``C``, row- and column-major, ``beta`` 0 and 1
    (the values are small integers: the products are exact in any precision)."""
    R = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=dtype)
    C = torch.tensor([[2.0, 7.0, 7.0], [1.0, -3.0, 7.0], [4.0, 5.0, 6.0]], dtype=dtype)
    upper = torch.ones(3, 3, dtype=torch.bool).triu(1)
    for rows in (R, R.T.contiguous().T):
        for beta in (0.0, 1.0):
            for out in (C.clone(), C.T.contiguous().T):
                expected = torch.where(upper, C, R @ R.T + beta * C)
                try:
                    product(rows, out, beta)
                except (OSError, ValueError, ctypes.ArgumentError):
                    return False
                if not torch.equal(out, expected):
                    return False
    return True


def _layout(matrix: Tensor) -> tuple[str, int] | None:
    """``("row" or "column", leading dimension)``: how BLAS reads the 2-d ``matrix`` as it
    lies in memory (the stride of a dimension of size 1 does not matter), or ``None``."""
    m, n = matrix.shape
    row, column = matrix.stride()
    if column == 1 or n == 1:
        lead = row if m > 1 else n
        if lead >= max(n, 1):
            return "row", lead
    if row == 1 or m == 1:
        lead = column if n > 1 else m
        if lead >= max(m, 1):
            return "column", lead
    return None


def symmetric_product_applies(rows: Tensor, out: Tensor) -> bool:
    """Whether :func:`syrk_` can write ``rows rows^T`` into ``out`` without copying
    either: CPU, float32 or float64, each row- or column-major (any leading dimension), no
    gradient to record, and a ``syrk`` that passed its check."""
    return (
        rows.device.type == "cpu"
        and out.device.type == "cpu"
        and rows.dim() == 2
        and rows.dtype == out.dtype
        and rows.shape[0] == out.shape[0] == out.shape[1]
        and rows.shape[1] > 0
        and _layout(rows) is not None
        and _layout(out) is not None
        and not (torch.is_grad_enabled() and (rows.requires_grad or out.requires_grad))
        and _blas_syrk(rows.dtype) is not None
    )


def symmetric_products(
    device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> bool:
    """Whether :func:`syrk_` runs on ``device`` for ``dtype`` (``None``: for float32 and
    float64): the cost model counts a Gram's lower triangle as ``d^2 k`` there, by
    block-rows elsewhere."""
    dtypes = _SYRK if dtype is None else (dtype,)
    cpu = torch.device(device).type == "cpu"
    return cpu and all(_blas_syrk(t) is not None for t in dtypes)


def profiled(op):
    """``op``, a ``torch.library.custom_op`` of this package, with its calls routed through
    torch's C++ dispatcher, which records each call as an operation of its own for
    ``torch.profiler`` (``riemann_core.measure.breakdown`` times its kernel by that name).

    From torch 2.14, ``custom_op`` calls a Python kernel on a fast path that skips the
    dispatcher ("PyObject dispatch"), and with it the profiler's record of the call: under
    torch 2.14.1 ``potrf_`` ran unseen, so ``time_by_kind`` (and the ``time_by_kind`` rows
    of ``targets.json``) counted the time of every Cholesky LAPACK ran directly as
    overhead (``FlopCounterMode``, a dispatch mode, still saw it). The fast path saves only
    dispatch overhead, small against the BLAS and LAPACK kernels these operators run.
    Where torch has no such path (before 2.14), ``op`` is left as it is."""
    overload = getattr(op, "_opoverload", None)
    enable = getattr(overload, "_enable_pyobj_dispatch", None)
    if enable is not None:
        enable(False)
    return op


@profiled
@torch.library.custom_op("riemann_core::syrk_", mutates_args=("out",), device_types="cpu")
def syrk_(rows: Tensor, out: Tensor, beta: float) -> None:
    """``out <- rows rows^T + beta out`` on the lower triangle of the ``d x d`` matrix
    ``out`` (its strict upper triangle is left as it was), ``rows`` ``d x k``: BLAS
    ``?syrk`` (:func:`_blas_syrk`; check :func:`symmetric_product_applies` first). An
    operator of its own (:func:`profiled`), so that ``FlopCounterMode`` and the profiler
    see it (``riemann_core.measure.flops`` counts ``d^2 k``)."""
    if not symmetric_product_applies(rows, out):
        raise ValueError(
            f"syrk_ needs CPU float32 or float64 rows ({tuple(rows.shape)}) and out "
            f"({tuple(out.shape)}) of one dtype, each row- or column-major, and a torch whose "
            "BLAS exports syrk; use torch.mm otherwise"
        )
    _blas_syrk(rows.dtype)(rows, out, beta)


@syrk_.register_fake
def _(rows: Tensor, out: Tensor, beta: float) -> None:
    return None
