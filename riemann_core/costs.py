"""Analytic FLOP and memory models of each method, for MLPs (chains of Linear layers).

Convention: a matrix product ``(m x k)(k x n)`` costs ``2 m k n`` FLOPs (torch's
``FlopCounterMode``); elementwise work is not counted. Dense linear algebra uses the
standard counts below; the FLOP counter of :mod:`riemann_core.measure.flops` keeps its own
table, so counted and modelled FLOPs are independent figures.

The models follow the implementation step by step (``flops`` returns them by phase);
``speed_of_light_flops`` is the minimal count by kind of operation, the yardstick, and
``speed_of_light_seconds`` weighs it by the rates a device reaches (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blas import symmetric_products
from .ownership import assign


def cholesky_flops(n: int) -> float:
    """``n^3 / 3``: Cholesky of an ``n x n`` matrix."""
    return n**3 / 3


#: Float32 CPU orders factorised at :data:`SMALL_PATH_ORDER` instead (:func:`factor_order`).
SMALL_PATH = range(89, 129)
SMALL_PATH_ORDER = 136


def factor_order(m: int, dtype: torch.dtype | None = None, device=None) -> int:
    """The order at which an ``m x m`` Gram is factorised: ``m``, or ``m + 8`` for a
    multiple of 64. LAPACK's Cholesky (MKL's, measured on a 2-core AVX-512 CPU) runs
    1.2-3x slower at such orders than a few rows larger (three of 128 x 128: 0.33 against
    0.11 ms; of 1024 x 1024: 33 against 21 ms), the usual cost of leading dimensions that
    map columns onto the same cache sets; the 8 rows more cost ``(1 + 8 / m)^3 - 1`` in
    FLOPs (20% at ``m = 128``, 2% at 1024).

    In float32 on the CPU (``dtype``, ``device``), an order in :data:`SMALL_PATH` (89 to
    128) is factorised at 136: MKL's ``spotrf`` takes a slower path up to order 128 (one
    thread, AMD EPYC, torch 2.13: 85 us at 128 against 36 at 129 and 31 at 136; 35 at 92,
    32 at 88, where the step ends). Its float64 ``dpotrf`` has no such step."""
    cpu = device is not None and torch.device(device).type == "cpu"
    if cpu and dtype == torch.float32 and m in SMALL_PATH:
        return SMALL_PATH_ORDER
    return m + 8 if m % 64 == 0 else m


#: The parameters of a Linear block from which the bound pays on the CPU (:func:`bound_pays`).
BOUND_PARAMS = 2**17


def bound_pays(n_params: int, N: int, f_out: int, device) -> bool:
    """Whether a layerwise direction ``x = scale M^T Xt`` of a block of ``n_params``
    parameters on ``device`` has its 2-norm bounded by ``|scale| ||M||_F ||Xt||_F`` (five
    kernels, reading ``M``'s ``N f_out`` entries and ``N`` more) rather than read off ``x``
    itself (``_solve._norm_bound``: one ``foreach`` kernel for every such block). On the
    CPU where ``x`` has :data:`BOUND_PARAMS` entries or more and more than the bound reads,
    a read costing the memory's time (one thread, 2-core CPU, read against bound, in us: at
    batch 128 6.7 against 9.8 at 256 x 256, 11.0 against 9.9 at 256 x 512, 148 against 16
    at 1024 x 1024; at batch 1024 and 4096 the bound 77-728 against a read of 13-147);
    never on a GPU, where each kernel costs the host a launch of microseconds and ``x``
    was just written by its GEMM (15 kernels fewer a step at 64-32-32-10)."""
    read_more = n_params >= max(BOUND_PARAMS, N * (f_out + 1))
    return torch.device(device).type == "cpu" and read_more


#: The least order at which K-FAC's factored damping factorises at :func:`factor_order`.
SHIFTED_PAD_ORDER = 512


def shifted_order(m: int, dtype: torch.dtype | None = None, device=None) -> int:
    """The order at which K-FAC's factored damping factorises an ``m x m`` damped factor
    (or a thin factor's damped Gram): on the CPU :func:`factor_order`'s from
    :data:`SHIFTED_PAD_ORDER` on, else ``m`` (other devices were not measured). Its
    solves take as many right-hand sides as the other factor has columns (hundreds), and
    on the padded order cost ``(1 + 8 / m)^2 - 1`` more (13% at 128, 3% at 512), where
    below 512 the Cholesky they would speed up is a few percent of them: thin Grams of 128
    padded to 136 made the one-sample Monte Carlo K-FAC on 784-1024-1024-10 at batch 128
    1.01-1.04x as slow (2-core CPU, float32), dense factors of 1024 padded to 1032 made it
    0.88-0.90x as slow at batch 1024."""
    cpu = device is not None and torch.device(device).type == "cpu"
    return factor_order(m, dtype, device) if cpu and m >= SHIFTED_PAD_ORDER else m


def eigen_order(m: int, device=None) -> int:
    """The order at which an ``m x m`` symmetric matrix is eigendecomposed: on a CPU with
    MKL ``m + 8`` for a multiple of 256 from 768 on (the block sits beside an 8 x 8
    diagonal below its spectrum, which LAPACK splits off exactly), else ``m``. MKL's
    ``syevd`` (measured on a 2-core AVX-512 CPU, torch 2.13) runs slower at those orders,
    the cache-set cost that :func:`factor_order` avoids for Cholesky: float32 at 768,
    1024, 1536, 2048 took 1.10, 1.23, 1.10 and 1.34 times as long as 8 rows more (float64:
    1.03-1.09); from 128 to 640 the 8 rows cost up to 10% and gain nothing. Other LAPACKs
    were not measured: their orders stay."""
    cpu = device is not None and torch.device(device).type == "cpu"
    mkl = cpu and torch.backends.mkl.is_available()
    return m + 8 if mkl and m >= 768 and m % 256 == 0 else m


def triangular_solve_flops(n: int, k: int = 1) -> float:
    """``n^2 k``: one triangular solve with ``k`` right-hand sides."""
    return n * n * k


def eigh_flops(n: int, vectors: bool = True) -> float:
    """``9 n^3`` with eigenvectors, ``4 n^3 / 3`` without (Golub & Van Loan, 8.3)."""
    return 9 * n**3 if vectors else 4 * n**3 / 3


#: Power-iteration steps of the conditioning estimate (``woodbury.largest_eigenvalue``).
POWER_STEPS = 3


def power_flops(n: int) -> float:
    """``2 n^2`` per power-iteration step on an ``n x n`` matrix: the estimate of a
    dense factorised matrix's largest eigenvalue (``woodbury.largest_eigenvalue``)."""
    return 2 * n * n * POWER_STEPS


def gram_power_flops(d: int, blocks: int) -> float:
    """``2 m^2`` per step on each of the ``blocks`` diagonal ``m x m`` blocks of a
    ``d x d`` Gram (``m = d / blocks``): its estimate of the largest eigenvalue
    (the sum of ``woodbury.probe_block_estimates``)."""
    m = d // blocks
    return 2 * m * m * blocks * POWER_STEPS


def lower_gram_flops(d: int, blocks: int, k: int, symmetric: bool = False) -> float:
    """The lower triangle of ``R R^T`` for ``R`` of shape ``d x k`` in ``blocks`` row
    blocks (``modules.lower_gram``): ``d^2 k`` by BLAS ``syrk`` (``symmetric``: where
    :func:`riemann_core.blas.symmetric_products` holds), else ``d^2 k (1 + 1 / blocks)``,
    one GEMM per block-row; ``2 d^2 k``, the whole product, for one block."""
    if symmetric and blocks > 1:
        return d * d * k
    return d * d * k * (1 + 1 / blocks)


def qr_flops(m: int, n: int) -> float:
    """``2 m n^2 - 2 n^3 / 3``: Householder QR of ``m x n`` (``m >= n``), ``R`` only."""
    return 2 * m * n * n - 2 * n**3 / 3


#: Cholesky runs well below the GEMM rate (measured here: ~55 against ~200 GFLOP/s
#: at d = 1280 on a 2-core CPU), so its FLOPs weigh this much more in choices.
FACTORISATION_WEIGHT = 3.0


def dense_is_cheaper(n: int, d: int, gram_flops: float, metric_flops: float) -> bool:
    """Layerwise block rule: factorise ``mu I + K^T K`` (``n x n``) rather than the
    ``d x d`` Gram when ``metric_flops + w n^3 / 3 < gram_flops + w d^3 / 3``, with ``w``
    :data:`FACTORISATION_WEIGHT` (both algebras are exact; this only picks the faster).
    ``metric_flops``: those of ``K^T K`` (``Handler.metric_flops``)."""
    w = FACTORISATION_WEIGHT
    return metric_flops + w * cholesky_flops(n) < gram_flops + w * cholesky_flops(d)


@dataclass(frozen=True)
class MLPShape:
    """Linear layers ``widths[a] -> widths[a+1]``, batch ``N``, ``rows`` = ``r`` per sample."""

    widths: tuple[int, ...]
    batch: int
    rows: int
    bias: bool = True

    @property
    def layers(self) -> list[tuple[int, int]]:
        return list(zip(self.widths[:-1], self.widths[1:], strict=True))

    @property
    def d(self) -> int:
        return self.batch * self.rows

    def patch(self, f_in: int) -> int:
        """``P = f_in + 1`` with bias (the ``xt`` width), else ``f_in``."""
        return f_in + int(self.bias)

    def block_params(self) -> list[int]:
        return [f_out * self.patch(f_in) for f_in, f_out in self.layers]

    @property
    def n_params(self) -> int:
        return sum(self.block_params())


def flops(
    method: str,
    shape: MLPShape,
    kernel: str = "structured",
    *,
    kfac_damping: str = "exact",
    kfac_bias: str = "joint",
    device: str | None = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Modelled FLOPs of ``rc.direction(method=..., kernel=...)`` on ``device`` by phase,
    plus ``total``.

    Phases: ``forward``; ``pullback`` (``r`` factor rows and the loss gradient through
    the layers above the first); ``gradient`` (parameter gradient where it is formed;
    the generic kernel runs each module's forward again for its ``vjp``); ``jacobian``
    (generic kernel: ``K_a`` by ``vmap``/``vjp``); ``gram`` (K-FAC: its factors, or a
    thin factor's Gram); ``factorisation``; ``solve`` (products with ``K`` and
    triangular solves); ``checks`` (the estimate of each factorised ``m x m`` matrix's
    largest eigenvalue, :func:`power_flops`). The slow paths of ill-conditioned solves
    (residuals in float64, refinement) are not modelled. ``kfac_damping`` and
    ``kfac_bias`` pick K-FAC's variant. ``device`` matters where BLAS ``syrk`` runs
    (:func:`riemann_core.blas.symmetric_products`): a Gram's lower triangle costs less
    there (:func:`lower_gram_flops`), which can also tip a layerwise block from Woodbury to
    its dense metric (:func:`dense_is_cheaper`); ``None`` models no ``syrk`` anywhere, a
    plan that does not depend on the build of torch. It also picks the constants of
    ``full``'s rule between ``K^T K`` and the blocks (:func:`block_costs`: a CUDA device's,
    else, ``None`` included, the CPU's). ``dtype`` and ``device`` set the
    order each Gram is factorised at (:func:`factor_order`; ``None``: the multiples of 64
    alone).
    """
    N, d, layers = shape.batch, shape.d, shape.layers
    symmetric = device is not None and symmetric_products(device)
    k = shape.rows + 1  # the loss gradient rides along in the pullback
    matmul = sum(2 * N * f_in * f_out for f_in, f_out in layers)  # one forward's GEMMs
    above_first = sum(2 * N * f_in * f_out for f_in, f_out in layers[1:])
    cost = {"forward": matmul}
    generic = kernel == "generic"
    if method == "euclidean":
        cost["gradient"] = matmul + above_first
        return _total(cost)
    cost["pullback"] = k * above_first
    P = [shape.patch(f_in) for f_in, _ in layers]
    f_ins = [f_in for f_in, _ in layers]
    f_outs = [f_out for _, f_out in layers]
    n_a = shape.block_params()
    if generic:  # gradient by a forward and vjp per module; K by per-sample vjps
        cost["gradient"] = 2 * matmul
        if method in ("full", "natural"):
            cost["jacobian"] = matmul + shape.rows * matmul
    if method == "natural":
        cost["gram"] = sum(
            _gram(shape, kernel, i, f, n, symmetric)
            for i, f, n in zip(f_ins, f_outs, n_a, strict=True)
        )
        cost["factorisation"] = cholesky_flops(d)
        cost["checks"] = gram_power_flops(d, shape.rows)
        cost["solve"] = sum(
            _products(shape, kernel, i, f, n) for i, f, n in zip(f_ins, f_outs, n_a, strict=True)
        )
        cost["solve"] += 2 * triangular_solve_flops(d)
    elif method == "layerwise":
        cost.update(gram=0, factorisation=0, solve=0, checks=0)
        for (f_in, f), p, n in zip(layers, P, n_a, strict=True):
            m = min(shape.rows, f)  # rows per sample after compress_rows
            if generic:
                cost["jacobian"] = cost.get("jacobian", 0) + 2 * N * (1 + m) * f_in * f
            if m < shape.rows:
                cost["factorisation"] += N * qr_flops(shape.rows, f)
            block = MLPShape((p - int(shape.bias), f), N, m, shape.bias)
            gram = _gram(block, kernel, f_in, f, n, symmetric)
            metric = _metric(block, kernel, f_in, f, n)
            if dense_is_cheaper(n, block.d, gram, metric):
                if not generic:
                    cost["gradient"] = cost.get("gradient", 0) + 2 * N * f * f_in
                cost["gram"] += metric
                cost["factorisation"] += cholesky_flops(n)
                cost["checks"] += power_flops(n)
                cost["solve"] += 2 * triangular_solve_flops(n)
            else:
                order = factor_order(block.d, dtype, device)  # padded with an identity
                cost["gram"] += gram
                cost["factorisation"] += cholesky_flops(order)
                cost["checks"] += gram_power_flops(block.d, m)
                cost["solve"] += _products(block, kernel, f_in, f, n) + 2 * triangular_solve_flops(
                    order
                )
    elif method == "full":
        n = shape.n_params
        if not generic:
            cost["gradient"] = sum(2 * N * f * i for i, f in zip(f_ins, f_outs, strict=True))
        pairs = full_pairs(shape, kernel, device)
        by_blocks = (2 * N * f * g * (shape.rows + P * Q) for f, P, g, Q in pairs or ())
        cost["gram"] = sum(by_blocks) if pairs else 2 * n * n * d
        cost["factorisation"] = cholesky_flops(n)
        cost["checks"] = power_flops(n)
        cost["solve"] = 2 * triangular_solve_flops(n)
    elif method == "kfac":
        if not generic:
            cost["gradient"] = sum(2 * N * f * i for i, f in zip(f_ins, f_outs, strict=True))
        cost.update(gram=0, factorisation=0, solve=0, checks=0)
        for f_in, f in layers:
            variant = kfac_damping, kfac_bias
            kfac = _kfac(N, d, f_in, f, shape.bias, *variant, device=device, dtype=dtype)
            for phase, flops_ in kfac.items():
                cost[phase] += flops_
    else:
        raise ValueError(f"unknown method {method!r}")
    return _total(cost)


def _kfac(
    N: int, d: int, f_in: int, f: int, bias: bool, damping: str, where: str, dense=False,
    device=None, dtype=None,
) -> dict:  # fmt: skip
    """One Linear layer's K-FAC (``riemann_core.kronecker``): factors with ``m`` rows and
    ``n < m`` columns formed (``2 m n^2``), thinner ones kept as rows (Gram ``2 m^2 n``);
    exact damping: eigendecompositions (a thin factor's of its Gram, and ``B = R^T U``)
    and the two basis changes, each the cheaper order of a ``multi_dot``; factored
    damping: Choleskys, the estimate of each damped factor's largest eigenvalue, and the
    solves (thin: by Woodbury). ``dense``: every factor formed as its ``n x n`` matrix
    (the data-parallel step, whose factors are summed over the ranks). ``device`` and
    ``dtype``: the order each eigendecomposition runs at (:func:`eigen_order`) and each
    Cholesky, with its triangular solves (:func:`shifted_order`)."""
    separate = bias and where == "separate"
    P = f_in + int(bias and not separate)
    cost = {"gram": 0.0, "factorisation": 0.0, "solve": 0.0, "checks": 0.0}
    sides = [(d, f), (N, P)]  # (rows, columns) of Gamma and A
    for m, n in sides:
        cost["gram"] += 2 * m * m * n if m < n and not dense else 2 * m * n * n
    if dense:  # past the Gram, a dense factor costs what one with n rows would
        sides = [(max(m, n), n) for m, n in sides]
    if damping == "exact":
        k = []
        for m, n in sides:
            order = eigen_order(min(m, n), device)
            cost["factorisation"] += eigh_flops(order) + (2 * n * m * m if m < n else 0)
            k.append(min(m, n))
        parts = [(P, k[1])] + ([(1, 1)] if separate else [])
        for p, k_A in parts:
            cost["solve"] += _multi_dot(k[0], f, p, k_A) + _multi_dot(f, k[0], k_A, p)
        return cost
    orders = [shifted_order(min(m, n), dtype, device) for m, n in sides]
    for (m, n), order in zip(sides, orders, strict=True):
        cost["factorisation"] += cholesky_flops(order)
        cost["checks"] += power_flops(min(m, n))
    ((d, _), (N, _)), (order_G, order_A) = sides, orders
    for k in [P] + ([1] if separate else []):  # Gamma's side: P right-hand sides
        cost["solve"] += _shifted_solve(d, f, k, order_G)
    cost["solve"] += _shifted_solve(N, P, f, order_A)  # A's side: f right-hand sides
    return cost


def _multi_dot(a: int, b: int, c: int, e: int) -> float:
    """``(a x b)(b x c)(c x e)`` in the cheaper order, as ``torch.linalg.multi_dot``."""
    return 2 * min(a * b * c + a * c * e, b * c * e + a * b * e)


def _shifted_solve(m: int, n: int, k: int, order: int) -> float:
    """``(R^T R + c I)^{-1} Y`` for ``R`` ``m x n``, ``Y`` ``n x k``: Cholesky solves of
    ``F + c I`` (dense), or of ``c I + R R^T`` between two products with ``R`` (thin),
    each factorised at ``order`` (:func:`shifted_order` of ``min(m, n)``)."""
    if m < n:
        return 4 * m * n * k + 2 * triangular_solve_flops(order, k)
    return 2 * triangular_solve_flops(order, k)


def _gram(shape: MLPShape, kernel: str, f_in: int, f: int, n: int, symmetric: bool) -> float:
    """``K_a K_a^T`` (lower triangle, :func:`lower_gram_flops`): ``(Delta Delta^T) * (X X^T +
    1)`` structured, ``K K^T`` generic."""
    d, N, r = shape.d, shape.batch, shape.rows
    if kernel == "generic":
        return lower_gram_flops(d, r, n, symmetric)
    return 2 * N * N * f_in + lower_gram_flops(d, r, f, symmetric)


def _metric(shape: MLPShape, kernel: str, f_in: int, f: int, n: int) -> float:
    """``K_a^T K_a``: ``2 N r f^2 + 2 N f^2 P^2`` structured where :func:`samples_metric`
    holds (each sample's ``Delta_b^T Delta_b``, then their sum with ``xt_b xt_b^T``,
    ``LinearHandler.metric``), else ``2 n^2 d`` (from ``K``); ``method='full'``'s blocks
    ``K_a^T K_b``: :func:`full_pairs`."""
    N, r = shape.batch, shape.rows
    if kernel == "generic" or not samples_metric(f, shape.patch(f_in), r):
        return 2 * n * n * shape.d
    return 2 * N * f * f * (r + shape.patch(f_in) ** 2)


def samples_metric(f: int, P: int, r: int, f_b: int | None = None, P_b: int | None = None) -> bool:
    """Whether a Linear block's ``K^T K`` (with ``f_b, P_b``: its product ``K^T K_b`` with
    another Linear block on the same rows) is formed from the samples' Grams
    (``LinearHandler.metric``) rather than from ``K``: where that takes fewer FLOPs
    (``r + P P_b < r P P_b``; for one block: two rows per sample or more, ``P > 1``) and
    its ``N f f_b`` Gram entries are no more than either ``K``'s ``N r f P`` (for one block:
    ``f <= r P``). One row per sample (a sampled Fisher, a scalar MSE output) or a wide
    output on a narrow input read 36-90x slower and 30-85x larger (a 2 -> 512 layer at
    batch 8192: 8.2 GB against 96 MB)."""
    f_b, P_b = (f, P) if f_b is None else (f_b, P_b)
    return P * P_b * (r - 1) > r and f * f_b <= r * min(f * P, f_b * P_b)


def metric_units(N: int, f: int, P: int, g: int, Q: int) -> int:
    """Output units of a block of ``f`` on ``P`` inputs (bias included) that
    ``LinearHandler.metric_into`` forms by one GEMM over the ``N`` samples against a block
    of ``g`` on ``Q``: counting up from the most whose result fits ``2^20`` entries (at
    least one; copied into parameter order from the cache rather than from memory), the
    fewest for which the operands formed again for each group, ``N P min(Q, units g)``
    entries a group, add up to no more than the block's ``f g P Q``; else the whole block
    at once. ``K^T K`` at batch 128 (784-5-10, 64-56-10) took 32.6 and 42.3 ms with such
    groups against 57.7 and 49.9 whole; at batch 1024-2048 groups of ``2^20`` entries were
    1.1-1.75x slower than whole blocks, the operands formed again up to 20 times over
    (float32, 2-core CPU)."""
    rebuilt = lambda units: -(-f // units) * N * P * min(Q, units * g)  # noqa: E731
    for units in range(max(1, min(f, 2**20 // (g * P * Q))), f):
        if rebuilt(units) <= f * g * P * Q:
            return units
    return f


def samples_chunk(N: int, m: int, P: int, Q: int) -> tuple[bool, int]:
    """How ``LinearHandler.metric_into`` forms ``sum_b A[b, k] X[b, p] Y[b, q]`` (``m``
    entries ``k`` a sample, ``P`` and ``Q`` inputs): by the samples' input products
    (operands ``m`` and ``P Q`` a sample, where ``m >= Q``) or else by ``A_b x X_b``
    against ``Y_b`` (``m P`` and ``Q``), and the samples a GEMM takes: as many as keep the
    formed operand within the result ``m P Q``, or more, up to ``ceil(N / 16)``, while it
    stays within ``A``'s ``N m`` (chunks of 4 samples, a 1 -> 2 layer at batch 2048, ran 512
    GEMMs, 90x slower)."""
    by_inputs = m >= Q
    width = P * Q if by_inputs else m * P
    return by_inputs, max(m if by_inputs else Q, min(-(-N // 16), N * m // width))


def _metric_operands(N: int, f: int, P: int, g: int, Q: int) -> int:
    """Entries ``LinearHandler.metric_into`` holds beside its result: the samples'
    ``f x g`` Grams, one GEMM's result (``m = units g`` rows, :func:`metric_units`) and its
    formed operand (:func:`samples_chunk`)."""
    m = metric_units(N, f, P, g, Q) * g
    by_inputs, chunk = samples_chunk(N, m, P, Q)
    return N * f * g + m * P * Q + min(chunk, N) * (P * Q if by_inputs else m * P)


@dataclass(frozen=True)
class BlockCosts:
    """What ``method='full'`` forming its metric block by block costs beyond the blocks'
    FLOPs, and ``K^T K`` beyond its ``2 n^2 d``, in FLOPs at the rate of ``K^T K``'s GEMM:
    per entry of a block, per pair of blocks, per GEMM over the samples (a group of output
    units, :func:`metric_units`), per pair and sample, and once for ``K^T K``."""

    entry: float
    pair: float
    group: float = 0  # (integers: the CPU's rule stays in exact integer arithmetic)
    pair_sample: float = 0
    product: float = 0


#: On a CPU: a GEMM over the samples has only ``2 N`` FLOPs an entry of its result and runs
#: at about half the rate of ``K^T K``'s, then the copies into parameter order and into the
#: mirrored block; per pair, Python and small operations. Fitted on a 2-core Xeon (float32,
#: 22 MLPs of 2 to 40 layers, batch 8 to 8192): about 1.2 ns an entry where ``K^T K`` ran
#: 275 GFLOP/s, and 0.2-1 ms a pair; with these the rule picked the faster form in each, or
#: one within 10% of it.
CPU_BLOCK_COSTS = BlockCosts(entry=320, pair=2**26)

#: On a GPU the blocks' time is the host's: about 50 us a pair and 100 us a group of
#: output units (launches of small kernels), 64 ns a pair and sample (the batched products
#: of the samples' rows), where ``K^T K`` runs at 48 TFLOP/s after 160 us of its own.
#: Fitted on an H100 (float32, ``K^T K`` and the blocks timed each way on 31 MLPs of 2 to
#: 40 layers, batch 8 to 8192; ``tests/data/full_metric_h100.csv``): the rule picks the
#: faster form on each, also fitted without it (leave one out). The CPU's constants picked
#: the blocks on 20 of them, 1.17-12.7x slower on 11 (small networks at batch 128: 784-5-10
#: 1.17x, 64-48-16-10 2.5x; 8-8-8-10 at batch 4096 12.7x); the blocks were 1.4-7.2x
#: faster at batch 256-2048 on 9 MLPs of 4k-13k parameters. The closest call, 784-5-10 at
#: batch 128, lies 7% inside the boundary (a wrong pick there costs about 17%); one H100 in
#: float32: another GPU's launch cost and GEMM rate would move the constants.
CUDA_BLOCK_COSTS = BlockCosts(entry=0, pair=2.5e9, group=5e9, pair_sample=3e6, product=8e9)


def block_costs(device=None) -> BlockCosts:
    """:data:`CUDA_BLOCK_COSTS` on a CUDA device, else :data:`CPU_BLOCK_COSTS`."""
    cuda = device is not None and torch.device(device).type == "cuda"
    return CUDA_BLOCK_COSTS if cuda else CPU_BLOCK_COSTS


def metric_groups(N: int, f: int, P: int, g: int, Q: int) -> int:
    """The GEMMs over the samples that form a block (:func:`metric_units`)."""
    return -(-f // metric_units(N, f, P, g, Q))


def metric_by_blocks(
    blocks: list[tuple[float, int, int]], n: int, d: int, N: int, device=None
) -> bool:
    """Whether ``method='full'`` forms its ``n x n`` metric block by block, each block
    ``(flops, entries, groups)`` (``K_a^T K_b`` from the samples' Grams, ``b <= a``, by
    ``groups`` GEMMs over the ``N`` samples), rather than as ``K^T K`` in one product
    (``2 n^2 d`` FLOPs): where the blocks cost less, with the device's
    :func:`block_costs` added."""
    c = block_costs(device)
    per_pair = c.pair + c.pair_sample * N
    work = sum(f + c.entry * m + c.group * k + per_pair for f, m, k in blocks)
    return work < 2 * n * n * d + c.product


def full_pairs(shape: MLPShape, kernel: str, device=None) -> list[tuple[int, int, int, int]] | None:
    """The pairs of layers ``(f_a, P_a, f_b, P_b)``, ``b <= a``, whose blocks ``K_a^T K_b``
    ``method='full'`` forms from the samples' Grams (``2 N f_a f_b (r + P_a P_b)`` FLOPs
    each, ``riemann_core.methods.full.blockwise``: every pair satisfies
    :func:`samples_metric`); ``None`` where it forms ``K^T K`` in one product."""
    blocks = [(f, shape.patch(f_in)) for f_in, f in shape.layers]
    pairs = [(*blocks[a], *blocks[b]) for a in range(len(blocks)) for b in range(a + 1)]
    if kernel == "generic" or not all(samples_metric(*p[:2], shape.rows, *p[2:]) for p in pairs):
        return None
    N, r, n = shape.batch, shape.rows, shape.n_params
    work = [
        (2 * N * f * g * (r + P * Q), f * P * g * Q, metric_groups(N, f, P, g, Q))
        for f, P, g, Q in pairs
    ]
    return pairs if metric_by_blocks(work, n, shape.d, N, device) else None


def _products(shape: MLPShape, kernel: str, f_in: int, f: int, n: int) -> float:
    """``K_a g_a`` and ``g_a - K_a^T t`` (structured: through ``Lambda``, one GEMM; the
    rows' products with ``Xt Xt^T Lambda``, ``2 d f``, are a batched GEMM for several rows
    per sample, elementwise and not counted for one; those with ``t`` are elementwise)."""
    d, N = shape.d, shape.batch
    if kernel == "generic":
        return 4 * d * n
    rows = 2 * d * f if shape.rows > 1 else 0
    return 2 * N * N * f + 2 * N * f * f_in + rows


def _total(cost: dict[str, float]) -> dict[str, float]:
    cost["total"] = sum(cost.values())
    return cost


def minimal_rows(
    out_dim: int, loss: str = "cross_entropy", output_metric: str = "exact", samples: int = 1
) -> int:
    """Factor rows per sample that suffice for the output metric: ``C - 1`` for the exact
    softmax Fisher (its rank: the factor annihilates the ones vector), ``C`` for squared
    error, ``samples`` for a sampled metric."""
    if output_metric == "sampled":
        return samples
    return out_dim - 1 if loss == "cross_entropy" else out_dim


def speed_of_light_flops(
    shape: MLPShape, rates: dict[str, float] | None = None
) -> dict[str, float]:
    """Minimal FLOPs of the exact layerwise direction by kind (docs/methods.md, "The speed
    of light"), with ``r = shape.rows`` rows per sample (:func:`minimal_rows`); block ``a``
    keeps ``r_a = min(r, f_out)`` rows, ``d_a = N r_a``, and has ``n_a = f_out P`` parameters
    (``P = f_in + 1`` with bias, else ``f_in``: :meth:`MLPShape.patch`; ``f_in + 1`` below).
    Each layer takes the cheaper of its two exact routes (the direction picks between them
    too, :func:`dense_is_cheaper`): in products and Cholesky FLOPs together, or, given the
    device's ``rates`` (FLOP/s by kind, as :func:`speed_of_light_seconds` takes them), in
    time at those rates. Only the latter makes :func:`speed_of_light_seconds` a minimum:
    where Cholesky runs slower than products, the route of fewer FLOPs can take longer
    (75 -> 3 at batch 128 by the recorded H200 rates: Woodbury's 7.19 MFLOP, 0.51 us,
    against the dense route's 7.34 MFLOP, 0.40 us)::

        products   2 N r sum_{a > 1} f_in f_out                        pullback
        Woodbury   per layer  N^2 (f_in + 1)                            X X^T (symmetric)
                              + d_a^2 f_out                             Delta Delta^T (symmetric)
                              + 2 N^2 f_out                             K g from Lambda
                              + 2 N f_out (f_in + 1)                    g - K^T t, one GEMM
                   cholesky   d_a^3 / 3
        dense      per layer  N r_a f_out^2                             each sample's
                                                                        Delta_b^T Delta_b
                                                                        (symmetric)
                              + N n_a^2 / 2                             K^T K = sum_b
                                                                        (Delta_b^T Delta_b) (x)
                                                                        (xt_b xt_b^T): both
                                                                        factors symmetric,
                                                                        n_a^2 / 4 sums of N
                              + 2 N f_out (f_in + 1)                    g = Lambda^T Xt
                   cholesky   n_a^3 / 3

    Triangular solves with one right-hand side (``2 d_a^2``, ``2 n_a^2``) are left out, and
    elementwise products (``(Delta Delta^T) * (Xt Xt^T)``, ``xt_b xt_b^T``) are not counted.
    """
    N, r = shape.batch, shape.rows
    products = sum(2 * N * r * f_in * f_out for f_in, f_out in shape.layers[1:])
    cholesky = 0.0
    for f_in, f_out in shape.layers:
        r_a, p = min(r, f_out), shape.patch(f_in)
        d_a, n_a = N * r_a, f_out * p
        woodbury = (
            N * N * p + d_a * d_a * f_out + 2 * N * N * f_out + 2 * N * f_out * p,
            d_a**3 / 3,
        )
        dense = (N * r_a * f_out**2 + N * n_a**2 / 2 + 2 * N * f_out * p, n_a**3 / 3)
        if rates is None:
            route = dense if sum(dense) < sum(woodbury) else woodbury
        else:
            route = min(woodbury, dense, key=lambda f: _seconds(f, rates))
        products += route[0]
        cholesky += route[1]
    return {"products": products, "cholesky": cholesky}


def _seconds(route: tuple[float, float], rates: dict[str, float]) -> float:
    """A layer's (products, Cholesky) FLOPs at ``rates``."""
    return speed_of_light_seconds({"products": route[0], "cholesky": route[1]}, rates)


def speed_of_light_seconds(flops: dict[str, float], rates: dict[str, float]) -> float:
    """``sum over kinds flops[kind] / rates[kind]``: the time of the minimal work at the
    best rate a device reaches for each kind of operation (FLOP/s, measured)."""
    missing = [k for k, f in flops.items() if f and not rates.get(k, 0) > 0]
    if missing:
        raise ValueError(f"no positive rate for {missing}; measure the device rates first")
    return sum(f / rates[k] for k, f in flops.items() if f)


def peak_bytes(
    method: str,
    shape: MLPShape,
    kernel: str = "structured",
    itemsize: int = 4,
    *,
    device: str | None = "cpu",
) -> float:
    """Estimate of the peak extra memory of one direction: the dominant terms of the
    tensors alive together at its peak (read off the methods' code). Used to skip
    infeasible sizes; it errs high rather than low (within 2x of the allocator's live
    peak on float32 MLPs of depth 1-16, width 16-512, batch 8-256 on a CPU,
    ``tests/test_costs.py``).

    Block ``a`` keeps ``d_a = N min(r, f_out)`` rows and has ``n_a`` parameters;
    ``d = N r``. Every method holds the activations and pulled-back rows
    ``(r + 2) N sum f``, the output factor's rows as formed and scaled ``2 r N f_L``, and
    the gradient and direction ``2 n``; layerwise also each block's compressed rows
    ``d_a f_a`` beside its pulled-back ones where ``d_a < d``; then::

        layerwise  sum_a M_a^2                 Woodbury blocks: the Grams of all the
                                               blocks of one d_a are written into one
                                               buffer and factorised in place
                                               (M_a = factor_order(d_a))
                   + max(sum_a d_a N,          then their condition estimates: the
                         max_a d_a^2)          diagonal N x N probe blocks copied, or
                                               a Gram mirrored whole
                   or, where larger,           a block solved before them through its
                   max_a (n_a^2 + O_aa)        dense metric (dense_is_cheaper; ``device``
                                               as in flops): K_a^T K_a and, formed from
                                               the samples' Grams (samples_metric), its
                                               operands O_ab (_metric_operands); else
                                               2 d_a n_a: K_a and K_a^T K_a; generic:
                                               n_a^2, K_a cached above
        natural    2 d^2                       the Gram and the product each block adds
                                               into it; then the Gram and its mirror
        full       n^2 + max_{a >= b} O_ab     block by block (full_pairs): the metric
                                               and the operands of one block K_a^T K_b
                   or d n + max(d n, n^2)      K (every K_a, then their concatenation),
                                               then K and the n x n metric
        kfac       per layer and side          a factor F = R^T R with m rows and
                   3 n^2 (m >= n)              n columns: F, its eigenvectors and
                   2 m n + 2 m^2 (m < n)       eigh's copy; thin: R, its Gram and
                                               eigenvectors, R^T U; Gamma: m = d,
                                               n = f_out; A: m = N, n = P

    and the generic kernel (layerwise, natural, full) caches every block's ``K_a``
    until the direction is formed and makes each through two more copies (per-sample
    vector-Jacobian products, then flattened): ``sum_a d_a n_a + 2 d max_a n_a``; the
    structured one every layer's input Gram ``Xt Xt^T`` (``N^2``; layerwise: of the blocks
    solved by Woodbury, the dense metric needs none).
    """
    N, r, d, n = shape.batch, shape.rows, shape.d, shape.n_params
    n_a = shape.block_params()
    elems = (r + 2) * N * sum(shape.widths) + 2 * r * N * shape.widths[-1] + 2 * n
    generic = kernel == "generic"
    d_a = [N * min(r, f) for _, f in shape.layers]
    if method == "layerwise":
        elems += sum(da * f for da, (_, f) in zip(d_a, shape.layers, strict=True) if da < d)
    if generic and method in ("layerwise", "natural", "full"):
        elems += sum(da * na for da, na in zip(d_a, n_a, strict=True)) + 2 * d * max(n_a)
    elif method == "natural":
        elems += len(n_a) * N * N
    if method == "layerwise":
        dtype = {4: torch.float32, 8: torch.float64}.get(itemsize)
        symmetric = device is not None and symmetric_products(device)
        grams, probes, mirror, dense = 0.0, 0.0, 0.0, 0.0
        for (f_in, f), da, na in zip(shape.layers, d_a, n_a, strict=True):
            block = MLPShape((f_in, f), N, da // N, shape.bias)
            gram = _gram(block, kernel, f_in, f, na, symmetric)
            if dense_is_cheaper(na, da, gram, _metric(block, kernel, f_in, f, na)):
                samples = not generic and samples_metric(f, block.patch(f_in), da // N)
                p = block.patch(f_in)
                extra = _metric_operands(N, f, p, f, p) if samples else 2 * da * na
                dense = max(dense, na * na + (0 if generic else extra))
            else:
                elems += 0 if generic else N * N
                grams += factor_order(da, dtype, device) ** 2
                probes, mirror = probes + da * N, max(mirror, da * da)
        elems += max(grams + max(probes, mirror), dense)
    elif method == "natural":
        elems += 2 * d * d
    elif method == "full":
        pairs = full_pairs(shape, kernel, device)
        if pairs:
            elems += n * n + max(_metric_operands(N, *pair) for pair in pairs)
        else:
            elems += d * n + max(d * n, n * n)
    elif method == "kfac":
        for f_in, f in shape.layers:
            for m, k in ((d, f), (N, shape.patch(f_in))):
                elems += 2 * m * k + 2 * m * m if m < k else 3 * k * k
    return elems * itemsize


# ------------------------------------------------------------------- data-parallel solves

#: Phases of :func:`flops` that every rank runs on its own shard of the batch in a
#: data-parallel step (:mod:`riemann_core.distributed`); the others are the owners'.
LOCAL_PHASES = {
    "euclidean": ("forward", "gradient"),
    "layerwise": ("forward", "pullback"),
    "natural": ("forward", "pullback"),
    "full": ("forward", "pullback"),
    "kfac": ("forward", "pullback", "gram", "gradient"),
}

#: Methods solved block by block on the blocks' owners; the others' solve is one job.
BLOCKWISE = ("layerwise", "kfac")

#: Entries of the table every rank contributes to the agreement of a step (int64):
#: failed, samples, signature of the blocks, forward passes the gradient sums, and the
#: bits of the float64 checksums of the parameters (weighted sums of their entries and of
#: their magnitudes).
AGREEMENT_SLOTS = 6


def block_solve_flops(
    method: str,
    f_in: int,
    f_out: int,
    batch: int,
    rows: int,
    bias=True,
    device: str | None = "cpu",
    dtype: torch.dtype | None = None,
    **kfac_variant,
) -> float:
    """Modelled FLOPs of the owner's solve of one Linear block (structured kernel) on
    ``batch`` samples: :func:`flops` of the one-layer network without its
    :data:`LOCAL_PHASES`; layerwise rows are kept per sample as ``min(rows, f_out)``
    (compressed before they are sent, so no QR here); K-FAC's factors are dense
    (summed over the ranks), ``kfac_variant`` its ``kfac_damping`` and ``kfac_bias``;
    ``device`` and ``dtype`` as in :func:`flops`."""
    if method not in BLOCKWISE:
        raise ValueError(f"method={method!r} is not solved block by block; use {BLOCKWISE}")
    if method == "kfac":
        variant = _kfac_variant(**kfac_variant)
        cost = _kfac(
            batch, batch * rows, f_in, f_out, bias, *variant, dense=True, device=device, dtype=dtype
        )
        return sum(v for k, v in cost.items() if k not in LOCAL_PHASES[method])
    if method == "layerwise":
        rows = min(rows, f_out)
    shape = MLPShape((f_in, f_out), batch, rows, bias)
    phases = flops(method, shape, device=device, dtype=dtype)
    return sum(v for k, v in phases.items() if k != "total" and k not in LOCAL_PHASES[method])


def generic_block_solve_flops(n: int, d: int) -> float:
    """The layerwise solve of a block with a materialised ``K`` (``d x n``): the cheaper
    of Woodbury (``2 d^2 n + d^3 / 3 + 4 d n``) and the dense metric (``2 n^2 d + n^3 / 3``)."""
    woodbury = 2 * d * d * n + cholesky_flops(d) + 4 * d * n
    return min(woodbury, 2 * n * n * d + cholesky_flops(n))


def _kfac_variant(kfac_damping: str = "exact", kfac_bias: str = "joint") -> tuple[str, str]:
    return kfac_damping, kfac_bias


def owners(method: str, shape: MLPShape, world: int, **kfac_variant) -> list[int]:
    """The owner rank of each layer's block in a data-parallel step on ``world`` ranks
    (the greedy plan of :mod:`riemann_core.ownership` over :func:`block_solve_flops`;
    ``natural`` and ``full`` solve every block on rank 0)."""
    if method not in BLOCKWISE:
        return [0] * len(shape.layers)
    costs = [
        block_solve_flops(
            method, f_in, f_out, shape.batch, shape.rows, shape.bias, None, **kfac_variant
        )
        for f_in, f_out in shape.layers
    ]  # device None: every rank plans alike, whatever build of torch it runs
    return assign(costs, world)


def _shard(shape: MLPShape, world: int) -> MLPShape:
    if world < 1 or shape.batch % world:
        raise ValueError(
            f"the model of a data-parallel step needs equal shards: a batch of {shape.batch} "
            f"does not split over {world} ranks"
        )
    return MLPShape(shape.widths, shape.batch // world, shape.rows, shape.bias)


def distributed_flops(
    method: str,
    shape: MLPShape,
    world: int,
    device: str | None = "cpu",
    dtype: torch.dtype | None = None,
    **kfac_variant,
) -> list[dict[str, float]]:
    """Modelled FLOPs of each rank in a data-parallel direction (structured kernel,
    equal shards of ``shape.batch``): ``local`` (forward and pullback on its shard, the
    :data:`LOCAL_PHASES`; layerwise also the QR that keeps ``min(r, f_out)`` rows per
    sample, before they are sent; K-FAC its dense factors) and ``solve`` (its owned
    blocks on the global batch), plus ``total``. One rank runs the single-process
    direction. ``kfac_variant``: K-FAC's ``kfac_damping`` and ``kfac_bias``; ``device`` and
    ``dtype`` as in :func:`flops`."""
    shard = _shard(shape, world)
    variant = _kfac_variant(**kfac_variant)
    local_phases = flops(
        method, shard, kfac_damping=variant[0], kfac_bias=variant[1], device=device, dtype=dtype
    )
    if world == 1:  # the single-process direction: the forward pass, then the solve
        built = ("forward", "gradient") if method == "euclidean" else ("forward", "pullback")
        local = sum(local_phases.get(k, 0) for k in built)
        total = local_phases["total"]
        return [{"local": local, "solve": total - local, "total": total}]
    local = sum(local_phases.get(k, 0) for k in LOCAL_PHASES[method] if k != "gram")
    if method == "kfac":  # the factors summed over the ranks are formed dense
        N, d = shard.batch, shard.d
        local += sum(
            _kfac(N, d, i, f, shape.bias, *variant, dense=True)["gram"] for i, f in shape.layers
        )
    if method == "layerwise":
        local += sum(
            shard.batch * qr_flops(shape.rows, f) for _, f in shape.layers if f < shape.rows
        )
    solve = [0.0] * world
    if method in BLOCKWISE:
        plan = owners(method, shape, world, **kfac_variant)
        for (f_in, f_out), owner in zip(shape.layers, plan, strict=True):
            solve[owner] += block_solve_flops(
                method,
                f_in,
                f_out,
                shape.batch,
                shape.rows,
                shape.bias,
                device,
                dtype,
                **kfac_variant,
            )
    elif method != "euclidean":
        whole = flops(method, shape, device=device, dtype=dtype)
        solve[0] = sum(
            v for k, v in whole.items() if k != "total" and k not in LOCAL_PHASES[method]
        )
    return [{"local": local, "solve": s, "total": local + s} for s in solve]


def agreement_flops(n_params: int, world: int) -> int:
    """``4 n``: the counted FLOPs of a data-parallel step's agreement on the parameters,
    two dot products over their ``n`` entries (``distributed._checksum``); none on one
    rank, which has no other to agree with."""
    return 4 * n_params if world > 1 else 0


def communication_bytes(
    method: str, shape: MLPShape, world: int, itemsize: int = 4, **kfac_variant
) -> list[dict[str, float]]:
    """Modelled bytes each rank sends and receives in a data-parallel direction
    (structured kernel, equal shards, the loss gradient formed from ``Lambda``, one
    forward pass, as :mod:`riemann_core.distributed` counts them; all zero on one rank):

    * the agreement: an all-reduce of ``P x`` :data:`AGREEMENT_SLOTS` int64;
    * ``layerwise``, ``natural``, ``full``: an all-to-all that sends each block's rows to
      its owner, per sample ``m f_out + f_in + f_out`` numbers (the factor rows, the input,
      ``Lambda``; ``m = min(r, f_out)`` for layerwise, ``r`` otherwise);
    * ``kfac``: an all-reduce of every block's ``Gamma`` (``f_out^2``), ``A`` (``P^2``,
      without the bias's column for ``kfac_bias="separate"``) and gradient (``n_a``);
      ``euclidean``: of the gradient;
    * the directions: each owner broadcasts its blocks' (and one status number); a
      broadcast counts its size once per receiver, as sent by the owner.

    An all-reduce counts its size both ways.
    """
    P = world
    shard = _shard(shape, world)
    zero = {"sent": 0.0, "received": 0.0}
    if P == 1:
        return [dict(zero) for _ in range(P)]
    agreement = P * AGREEMENT_SLOTS * 8
    out = [{"sent": float(agreement), "received": float(agreement)} for _ in range(P)]
    n_a = shape.block_params()
    if method in ("kfac", "euclidean"):
        size = sum(n_a)
        if method == "kfac":
            apart = shape.bias and _kfac_variant(**kfac_variant)[1] == "separate"
            size += sum(f * f + (shape.patch(i) - apart) ** 2 for i, f in shape.layers)
        for rank in out:
            rank["sent"] += size * itemsize
            rank["received"] += size * itemsize
        if method == "euclidean":
            return out
    else:
        owner = owners(method, shape, world)
        for (f_in, f), o in zip(shape.layers, owner, strict=True):
            rows = min(shape.rows, f) if method == "layerwise" else shape.rows
            per_rank = shard.batch * (rows * f + f_in + f) * itemsize
            for p, rank in enumerate(out):
                if p == o:
                    rank["received"] += (P - 1) * per_rank
                else:
                    rank["sent"] += per_rank
    owner = owners(method, shape, world, **kfac_variant)
    broadcast = [1 + sum(n for n, o in zip(n_a, owner) if o == p) for p in range(P)]
    for p, rank in enumerate(out):
        rank["sent"] += (P - 1) * broadcast[p] * itemsize
        rank["received"] += sum(b for q, b in enumerate(broadcast) if q != p) * itemsize
    return out
