"""FLOP counting by kind of operation: torch's ``FlopCounterMode`` plus its own table of the
dense linear algebra that ``FlopCounterMode`` counts as zero.

``FlopCounterMode`` counts matrix products (``2 m k n``) and convolutions but not Cholesky,
triangular solves, eigendecompositions, QR, LU solves, inverses or matrix-vector products:
exactly the ``d^3`` and ``n^3`` terms this project measures. :data:`LINALG` gives each of
them a standard operation count (leading terms, as in Golub & Van Loan and LAPACK's
operation counts), independent of the cost model in :mod:`riemann_core.costs`, so that
counted and modelled FLOPs are two separate figures:

=====================================  ==============================================
operation                              FLOPs (kind)
=====================================  ==============================================
Cholesky, LAPACK's ``potrf``           ``n^3 / 3`` per matrix (cholesky)
triangular solve                       ``n^2 k`` for ``k`` right-hand sides (triangular)
``cholesky_solve``                     ``2 n^2 k`` (triangular)
``cholesky_inverse``                   ``2 n^3 / 3`` (triangular)
``eigh``                               ``9 n^3`` with vectors, ``4 n^3 / 3`` without (eigh)
QR (Householder)                       ``2 m n^2 - 2 n^3 / 3`` for R, plus Q's (qr)
``linalg.solve`` (LU), inverse         ``2 n^3 / 3 + 2 n^2 k``; ``2 n^3`` (lu)
matrix-vector product                  ``2 m n`` (products)
in-place and accumulating products     as their plain forms: ``addmm_``, ``baddbmm_``,
                                       ``addbmm(_)``, ``addmv_``; ``addr(_)`` ``2 m n``
                                       (products; ``FlopCounterMode`` counts ``addmm``,
                                       ``baddbmm`` by name, not these)
BLAS ``syrk``, ``R R^T`` one triangle  ``d^2 k`` for ``R`` ``d x k`` (products)
=====================================  ==============================================

Operations the package does not call stay at zero: ``lu_factor`` / ``lu_solve``, the
legacy ``triangular_solve``, ``lstsq``, ``svd``; and ``eigvalsh`` is counted as ``eigh``
with vectors, which torch computes under the counter (the package's eigenvalues go through
``riemann_core.woodbury.eigenvalues``).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import blas, woodbury  # noqa: F401  (define torch.ops.riemann_core.syrk_, potrf_)

aten = torch.ops.aten

#: Kinds of operation, each with its own rate on a device.
KINDS = ("products", "cholesky", "triangular", "eigh", "qr", "lu")


def _batch(shape) -> int:
    return math.prod(shape[:-2])


def _cholesky(a_shape, *args, out_shape=None, **kwargs) -> int:
    n = a_shape[-1]
    return int(_batch(a_shape) * n**3 / 3)


def _broadcast_batch(*batches) -> int:
    """The number of matrices the broadcast batch dimensions ``batches`` give."""
    return math.prod(torch.broadcast_shapes(*(tuple(b) for b in batches)))


def _solve_triangular(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    left = kwargs.get("left", args[1] if len(args) > 1 else True)
    k = b_shape[-1] if left else b_shape[-2]
    return _broadcast_batch(a_shape[:-2], b_shape[:-2]) * a_shape[-1] ** 2 * k


def _cholesky_solve(b_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    return _broadcast_batch(a_shape[:-2], b_shape[:-2]) * 2 * a_shape[-1] ** 2 * b_shape[-1]


def _eigh(a_shape, *args, out_shape=None, **kwargs) -> int:
    vectors = kwargs.get("compute_v", args[1] if len(args) > 1 else True)
    n = a_shape[-1]
    return int(_batch(a_shape) * (9 * n**3 if vectors else 4 * n**3 / 3))


def _lu_solve(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    n = a_shape[-1]
    # torch.linalg.solve's rule: B is a (batch of) vector(s) if it has A's shape but one
    # dimension less, or is 1-D
    vectors = len(b_shape) == 1 or tuple(b_shape) == tuple(a_shape[:-1])
    if vectors:
        k, batch = 1, _broadcast_batch(a_shape[:-2], b_shape[:-1])
    else:
        k = b_shape[-1] if kwargs.get("left", True) else b_shape[-2]
        batch = _broadcast_batch(a_shape[:-2], b_shape[:-2])
    return int(batch * (2 * n**3 / 3 + 2 * n * n * k))


def _inverse(a_shape, *args, out_shape=None, **kwargs) -> int:
    return _batch(a_shape) * 2 * a_shape[-1] ** 3


def _cholesky_inverse(a_shape, *args, out_shape=None, **kwargs) -> int:
    # L^{-1} (n^3 / 3), then L^{-T} L^{-1} (n^3 / 3)
    return int(_batch(a_shape) * 2 * a_shape[-1] ** 3 / 3)


def _qr(a_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape[-2], a_shape[-1]
    mode = kwargs.get("mode", args[0] if args else "reduced")
    q = min(m, n)
    flops = 2 * max(m, n) * q * q - 2 * q**3 / 3  # R by Householder reflections
    if mode != "r":  # Q accumulated from the q reflections: c = q (reduced) or m columns
        c = m if mode == "complete" else q
        flops += 4 * m * c * q - 2 * (m + c) * q * q + 4 * q**3 / 3
    return int(_batch(a_shape) * flops)


def _mv(a_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _syrk(rows_shape, matrix_shape, *args, out_shape=None, **kwargs) -> int:
    d, k = rows_shape
    return d * d * k  # one triangle of R R^T: half of the product's 2 d^2 k


def _addmv(bias_shape, a_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _dot(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


def _addmm(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _batched_addmm(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # (b, m, k) (b, k, n)


def _addr(bias_shape, u_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * u_shape[0] * v_shape[0]


#: Operation -> (kind, FLOPs from the argument shapes), for what ``FlopCounterMode`` skips.
LINALG = {
    aten.linalg_cholesky_ex: ("cholesky", _cholesky),
    torch.ops.riemann_core.potrf_: ("cholesky", _cholesky),  # LAPACK's, called directly (CPU)
    aten.linalg_solve_triangular: ("triangular", _solve_triangular),
    aten.cholesky_solve: ("triangular", _cholesky_solve),
    aten._linalg_eigh: ("eigh", _eigh),
    aten.linalg_qr: ("qr", _qr),
    aten._linalg_solve_ex: ("lu", _lu_solve),
    aten.linalg_inv_ex: ("lu", _inverse),
    aten.cholesky_inverse: ("triangular", _cholesky_inverse),
    aten.mv: ("products", _mv),
    aten.addmv: ("products", _addmv),
    aten.dot: ("products", _dot),
    aten.vdot: ("products", _dot),
    # (found by a hunt: FlopCounterMode matches operations by name, so these read 0)
    aten.addmm_: ("products", _addmm),
    aten.baddbmm_: ("products", _batched_addmm),
    aten.addbmm: ("products", _batched_addmm),
    aten.addbmm_: ("products", _batched_addmm),
    aten.addmv_: ("products", _addmv),
    aten.addr: ("products", _addr),
    aten.addr_: ("products", _addr),
    torch.ops.riemann_core.syrk_: ("products", _syrk),  # BLAS's, called directly (CPU)
}
_KIND_OF = {str(op): kind for op, (kind, _) in LINALG.items()}


def flop_counter(**kwargs) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the linear algebra in :data:`LINALG`."""
    kwargs.setdefault("display", False)
    mapping = {op: formula for op, (_, formula) in LINALG.items()}
    return FlopCounterMode(custom_mapping=mapping, **kwargs)


def flops_by_kind(counter: FlopCounterMode) -> dict[str, int]:
    """The FLOPs ``counter`` counted, summed per kind of :data:`KINDS` (all kinds present)."""
    out = dict.fromkeys(KINDS, 0)
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        out[_KIND_OF.get(str(op), "products")] += flops
    return out
