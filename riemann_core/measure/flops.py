"""FLOP counting: torch's ``FlopCounterMode`` plus the dense linear algebra it skips.

``FlopCounterMode`` counts matrix products (``2 m k n``) and convolutions but counts
Cholesky, QR, triangular solves, eigendecompositions, ``solve``, ``inverse``,
``cholesky_inverse`` and matrix-vector products as zero: exactly the ``d^3`` and ``n^3``
terms this project measures. :func:`flop_counter` passes formulas for them (the ones in
:mod:`riemann_core.costs`) through the counter's own ``custom_mapping``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import costs

aten = torch.ops.aten


def _batch(shape) -> int:
    return math.prod(shape[:-2])


def _cholesky(a_shape, *args, out_shape=None, **kwargs) -> int:
    return int(_batch(a_shape) * costs.cholesky_flops(a_shape[-1]))


def _solve_triangular(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    left = kwargs.get("left", args[1] if len(args) > 1 else True)
    k = b_shape[-1] if left else b_shape[-2]
    return int(_batch(b_shape) * costs.triangular_solve_flops(a_shape[-1], k))


def _cholesky_solve(b_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    return int(_batch(b_shape) * 2 * costs.triangular_solve_flops(a_shape[-1], b_shape[-1]))


def _eigh(a_shape, *args, out_shape=None, **kwargs) -> int:
    vectors = kwargs.get("compute_v", args[1] if len(args) > 1 else True)
    return int(_batch(a_shape) * costs.eigh_flops(a_shape[-1], vectors))


def _solve(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    k = 1 if len(b_shape) == 1 else b_shape[-1]
    return int(_batch(a_shape) * costs.lu_solve_flops(a_shape[-1], k))


def _inverse(a_shape, *args, out_shape=None, **kwargs) -> int:
    return int(_batch(a_shape) * costs.inverse_flops(a_shape[-1]))


def _cholesky_inverse(a_shape, *args, out_shape=None, **kwargs) -> int:
    return int(_batch(a_shape) * costs.cholesky_inverse_flops(a_shape[-1]))


def _qr(a_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape[-2], a_shape[-1]
    return int(_batch(a_shape) * costs.qr_flops(max(m, n), min(m, n)))


def _mv(a_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


#: Formulas for the ops ``FlopCounterMode`` counts as zero.
LINALG_FORMULAS = {
    aten.linalg_cholesky_ex: _cholesky,
    aten.linalg_solve_triangular: _solve_triangular,
    aten.cholesky_solve: _cholesky_solve,
    aten._linalg_eigh: _eigh,
    aten._linalg_solve_ex: _solve,
    aten.linalg_inv_ex: _inverse,
    aten.cholesky_inverse: _cholesky_inverse,
    aten.linalg_qr: _qr,
    aten.mv: _mv,
}


def flop_counter(**kwargs) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the linear algebra in ``LINALG_FORMULAS``."""
    kwargs.setdefault("display", False)
    return FlopCounterMode(custom_mapping=LINALG_FORMULAS, **kwargs)
