"""K-FAC: per module ``Gamma (x) A``, damped exactly or by factors, bias with or apart.

``Gamma = sum_{r,t} delta delta^T`` (output side: the pulled-back factor rows) and
``A = mean_{b,t} xt xt^T`` (input side); ``Gamma (x) A`` is the Kronecker approximation
of the block ``K_a^T K_a`` (exact for one sample at one position). The variants:

* ``kfac_damping="exact"`` (default): ``(Gamma (x) A + mu I)^{-1}``, the same ``mu I``
  as every other method, solved in the factors' eigenbases;
* ``kfac_damping="factored"``: ``(Gamma + pi sqrt(mu) I)^{-1} V (A + sqrt(mu)/pi I)^{-1}``
  with ``pi = sqrt((tr Gamma / f_out) / (tr A / P))`` (Martens & Grosse 2015), by Cholesky;
* ``kfac_bias="joint"`` (default): weight and bias in one block, ``xt = [x, 1]``;
* ``kfac_bias="separate"``: the weight's block ``Gamma (x) A`` with ``A = mean x x^T``,
  and the bias's own block ``Gamma`` (input factor ``1``), damped like ``Gamma`` in
  the weight's block: ``Gamma + mu I`` (exact), ``Gamma + pi sqrt(mu) I`` (factored).

The Monte Carlo Fisher is ``output_metric="sampled"``. See :mod:`riemann_core.kronecker`
for the algebra; a factor with fewer rows than columns is never formed.

Each module is one :class:`KroneckerSolve` record, checked like every method's
(:func:`riemann_core.methods._solve.finish`): its decompositions are deferred, and only
a module whose flag says that one failed (or that a factored damping is undefined: a
NaN, inf or zero trace) is factorised again on the slow path, with the checked
decompositions of :mod:`riemann_core.kronecker`. ``cond(G)`` is exact for exact damping
(from the eigenvalues) and estimated for factored damping (``cond`` of each damped
factor, from its largest eigenvalue, multiplied: ``cond`` of a Kronecker product).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .._checks import Deferred, Reading, check_refresh
from .._precision import full_precision
from ..kronecker import (
    Eigen,
    Factor,
    Shifted,
    eigen_together,
    exact_condition,
    exact_solve,
    shifted_together,
    split_damping,
    split_damping_checked,
    unit_eigen,
)
from ..modules import (
    Block,
    PatchHandler,
    has_kronecker_factors,
    kronecker_handler,
    named_module,
    own_parameters,
)
from ._base import Options, Problem
from ._solve import Solve, finish

NEEDS_FACTOR = True


@dataclass(frozen=True)
class Part:
    """Parameters that share one Kronecker block, as the matrix ``[W | b]`` (``f_out``
    rows: the weight's rows flattened, the bias a column): a module's weight and bias
    together, or each apart. ``bias_only``: the block has no input factor (``A = 1``)."""

    name: str
    param_names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    bias_only: bool

    def to_matrix(self, tensors: dict[str, Tensor]) -> Tensor:
        columns = [
            _shaped(tensors[n], (s[0], math.prod(s[1:])))
            for n, s in zip(self.param_names, self.shapes)
        ]
        return torch.cat(columns, 1) if len(columns) > 1 else columns[0]

    def from_matrix(self, M: Tensor) -> dict[str, Tensor]:
        widths = [math.prod(s[1:]) for s in self.shapes]
        columns = M.split(widths, 1) if len(widths) > 1 else [M]
        return {
            n: _shaped(c, s) for n, s, c in zip(self.param_names, self.shapes, columns, strict=True)
        }

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def _shaped(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``tensor.reshape(shape)``, or ``tensor`` itself where it has that shape (a reshape
    is an operator call: host time on a GPU, per block and call)."""
    return tensor if tensor.shape == shape else tensor.reshape(shape)


def parts_of(handler: PatchHandler, bias: str) -> list[Part]:
    """The module's blocks: one, or the weight's and the bias's apart (``"separate"``)."""
    return block_parts(handler.block, handler.with_weight, handler.with_bias, bias)


def block_parts(block: Block, with_weight: bool, with_bias: bool, bias: str) -> list[Part]:
    """:func:`parts_of` for ``block``, whose trainable parameters are its module's weight
    (``with_weight``) and bias (``with_bias``), in that order."""
    names, shapes = tuple(block.param_names), tuple(p.shape for p in block.params)
    if bias == "separate" and with_weight and with_bias:
        return [
            Part(names[0], names[:1], shapes[:1], bias_only=False),
            Part(names[1], names[1:], shapes[1:], bias_only=True),
        ]
    return [Part(block.name, names, shapes, bias_only=not with_weight)]


def module_factors(handler: PatchHandler, opts: Options) -> tuple[Factor, dict[str, Factor]]:
    """``Gamma`` and each part's input factor ``A`` from this batch (in the handler's
    dtype, which is the solve dtype)."""
    parts = parts_of(handler, opts.kfac_bias)
    ones = handler.with_bias and len(parts) == 1
    D, R = handler.kronecker_rows(ones)
    gamma_what, input_what = factor_names(handler.block.name)
    gamma = Factor.of_rows(D, what=gamma_what)
    A = Factor.of_rows(R, what=input_what)
    return gamma, {p.name: A for p in parts if not p.bias_only}


def factor_names(module: str) -> tuple[str, str]:
    """What errors call the output and the input factor of ``module``."""
    return (
        f"K-FAC output factor Gamma of {named_module(module)}",
        f"K-FAC input factor A of {named_module(module)}",
    )


class DampedBlock:
    """One part's damped Kronecker metric, factorised: ``block(V)`` is ``G^{-1} V``.

    Exact damping: ``eigen``, the eigenpairs of ``Gamma`` and of ``A`` (``A = 1`` for a
    part without input factor). Factored damping: ``left`` and ``right``, the damped
    ``Gamma`` and ``A`` (:class:`riemann_core.kronecker.Shifted`; ``right`` is ``None``
    for a part without input factor, both are ``None`` when a factor is zero and the
    metric is ``mu I``, the limit of the factored product). ``failed``: a device boolean
    (deferred decompositions; ``split_failed``: the factored damping is undefined), or
    ``None``; ``flags``, those it is or-ed from.
    """

    def __init__(
        self,
        part: Part,
        gamma: Factor,
        A: Factor | None,
        damping: float,
        *,
        eigen: tuple[Eigen, Eigen] | None = None,
        left: Shifted | None = None,
        right: Shifted | None = None,
        split_failed: Tensor | None = None,
    ):
        self.part, self.gamma, self.A, self.damping = part, gamma, A, damping
        self.eigen, self.left, self.right = eigen, left, right
        self.flags = [e.failed for e in eigen or ()] + [s.chol.failed for s in self.shifted]
        self.flags.append(split_failed)

    @functools.cached_property
    def failed(self) -> Tensor | None:
        return _any(self.flags)

    @property
    def shifted(self) -> list[Shifted]:
        return [s for s in (self.left, self.right) if s is not None]

    def __call__(self, V: Tensor) -> Tensor:
        if self.eigen is not None:
            return exact_solve(V, *self.eigen, self.damping)
        if self.left is None:  # a zero factor: the metric is mu I
            return V / self.damping
        if self.right is None:  # the bias's block: (Gamma + c I)^{-1} = (c (Gamma + c I)^{-1}) / c
            c = self.left.shift
            return self.left.solve(V) / c if isinstance(c, Tensor) else self.left.solve(V, 1 / c)
        # c_G c_A = mu: the 1 / mu rides along in a thin side's product where there is one
        if self.left.factor.thin or not self.right.factor.thin:
            return self.right.solve_right(self.left.solve(V, 1 / self.damping))
        return self.right.solve_right(self.left.solve(V), 1 / self.damping)

    def float64(self) -> DampedBlock:
        """The same metric (the same shifts) factorised in float64, checked."""
        gamma = self.gamma.float64()
        A = None if self.A is None else self.A.float64()
        if self.eigen is not None:
            eigen = (gamma.eigen(True), unit_eigen(gamma.data) if A is None else A.eigen(True))
            return DampedBlock(self.part, gamma, A, self.damping, eigen=eigen)

        def shifted(factor, s):
            c = s.shift.double() if isinstance(s.shift, Tensor) else s.shift
            return factor.shifted(c, checked=True)

        left = None if self.left is None else shifted(gamma, self.left)
        right = None if self.right is None else shifted(A, self.right)
        return DampedBlock(self.part, gamma, A, self.damping, left=left, right=right)

    def metric64(self, X: Tensor) -> Tensor:
        """``G X`` in float64 (``X`` float64), from the factors, for residuals."""
        if self.eigen is not None:
            GX = self.gamma.times64(X)
            GXA = GX if self.A is None else self.A.times64(GX.T).T
            return GXA + self.damping * X
        if self.left is None:
            return self.damping * X
        GX = self.left.times64(X)
        return GX if self.right is None else self.right.times64(GX.T).T

    def condition(self) -> Tensor:
        """``cond(G)``: exact for exact damping, estimated for factored damping (the
        product of the damped factors' :attr:`~riemann_core.kronecker.Shifted.estimate`),
        a device scalar."""
        if self.eigen is not None:
            return exact_condition(*self.eigen, self.damping)
        return _product([s.estimate for s in self.shifted], like=self.gamma.data)

    def exact_condition(self) -> Tensor:
        """``cond(G)`` exactly (factored damping: eigendecompositions; diagnostics)."""
        if self.eigen is not None:
            return self.condition()
        return _product([s.condition() for s in self.shifted], like=self.gamma.data)


def damped_blocks(
    parts: list[Part], gamma: Factor, inputs: dict[str, Factor], opts: Options, checked=False
) -> list[DampedBlock]:
    """Each part with its damped metric factorised from ``gamma`` and ``inputs``
    (``{part: A}``), deferred or ``checked``.

    Factored damping splits ``mu`` by the weight's factors; a bias apart shares the
    weight's damped ``Gamma + pi sqrt(mu) I`` (one Cholesky for both), and alone (a
    frozen weight, or a zero factor) has ``Gamma + mu I``.
    """
    return damped_modules([(parts, gamma, inputs)], opts, checked)[0]


def damped_modules(
    modules: list[tuple[list[Part], Factor, dict[str, Factor]]], opts: Options, checked=False
) -> list[list[DampedBlock]]:
    """:func:`damped_blocks` of each module ``(parts, gamma, inputs)``, the deferred
    decompositions of one order together: the eigendecompositions where
    :func:`~riemann_core.kronecker.eigen_together` batches them, the damped factors'
    Choleskys by :func:`~riemann_core.kronecker.shifted_together`."""
    mu = opts.damping
    if opts.kfac_damping == "exact":
        if not checked:
            eigen_together(f for _, gamma, inputs in modules for f in (gamma, *inputs.values()))
        return [_eigen_blocks(*module, mu, checked) for module in modules]
    shifts = [_factored_shifts(*module, mu, checked) for module in modules]
    requests = [request for wanted, _ in shifts for request in wanted]
    if checked:
        shifted = iter([factor.shifted(c, checked=True) for factor, c in requests])
    else:
        shifted = iter(shifted_together(requests))
    return [
        _factored_blocks(*module, [next(shifted) for _ in wanted], split_failed, mu)
        for module, (wanted, split_failed) in zip(modules, shifts, strict=True)
    ]


def _eigen_blocks(parts, gamma, inputs, mu, checked) -> list[DampedBlock]:
    """Exact damping's blocks, from the eigenpairs of ``Gamma`` and of each part's ``A``."""
    G = gamma.eigen(checked)

    def eigen(part):
        A = inputs.get(part.name)
        return G, unit_eigen(G.vectors) if A is None else A.eigen(checked)

    return [DampedBlock(p, gamma, inputs.get(p.name), mu, eigen=eigen(p)) for p in parts]


def _factored_shifts(parts, gamma, inputs, mu, checked) -> tuple[list[tuple], Tensor | None]:
    """The factors a module's factored damping factorises, with their shifts (``Gamma``'s
    and its weight's ``A``'s, ``mu`` split by the traces; or ``Gamma``'s alone), and
    whether the split is undefined (a device boolean, deferred)."""
    weight = None if parts[0].bias_only else inputs[parts[0].name]
    split, split_failed = None, None
    if weight is not None and checked:
        split = split_damping_checked(gamma, weight, mu)
    elif weight is not None:
        c_G, c_A, ok = split_damping(gamma, weight, mu)
        split, split_failed = (c_G, c_A), ~ok
    if split is None:  # the weight's metric is mu I; a bias has Gamma + mu I
        return ([(gamma, mu)] if parts[-1].bias_only else []), None
    return [(gamma, split[0]), (weight, split[1])], split_failed


def _factored_blocks(parts, gamma, inputs, shifted, split_failed, mu) -> list[DampedBlock]:
    """The blocks of :func:`_factored_shifts`' factors, ``shifted``."""
    if len(shifted) < 2:  # the weight's metric is mu I; a bias has Gamma + mu I
        left = shifted[0] if shifted else None
        return [
            DampedBlock(p, gamma, inputs.get(p.name), mu, left=left if p.bias_only else None)
            for p in parts
        ]
    left, right = shifted
    return [
        DampedBlock(
            p,
            gamma,
            inputs.get(p.name),
            mu,
            left=left,
            right=None if p.bias_only else right,
            split_failed=split_failed,
        )
        for p in parts
    ]


def apply(blocks: list[DampedBlock], names: list[str], gradient: list[Tensor]) -> list[Tensor]:
    """``G^{-1}`` of each block on ``gradient`` (a module's tensors in the order of
    ``names``), as such a list."""
    by_name = dict(zip(names, gradient, strict=True))
    out: dict[str, Tensor] = {}
    for block in blocks:
        out.update(block.part.from_matrix(block(block.part.to_matrix(by_name))))
    return [out[n] for n in names]


def _any(flags: list[Tensor | None]) -> Tensor | None:
    """The device booleans ``flags`` or-ed, each once (``None`` ignored; ``None`` if all
    are)."""
    flags = list({id(f): f for f in flags if f is not None}.values())
    return functools.reduce(operator.or_, flags) if flags else None


def _product(tensors: list[Tensor], like: Tensor) -> Tensor:
    return functools.reduce(operator.mul, tensors) if tensors else like.new_ones(())


def _max(tensors: list[Tensor]) -> Tensor:
    return functools.reduce(torch.maximum, tensors)  # two blocks: one kernel (stack, max: two)


@dataclass
class KroneckerSolve(Solve):
    """A module's K-FAC solve: its metric is block-diagonal over ``blocks`` (its parts),
    each a damped Kronecker product. ``factors`` (``(Gamma, {part: A})``) are what the
    slow path factorises again; ``None`` for blocks factorised at an earlier step."""

    param_names: list[str] = field(default_factory=list)
    blocks: list[DampedBlock] = field(default_factory=list)
    factors: tuple | None = None

    def metric64(self, problem, damping):
        def G(x):
            by_name = dict(zip(self.param_names, x, strict=True))
            out: dict[str, Tensor] = {}
            for b in self.blocks:
                out.update(b.part.from_matrix(b.metric64(b.part.to_matrix(by_name))))
            return [out[n] for n in self.param_names]

        return G

    def residual_settled(self, problem, damping, bound):
        return None  # the N-space evaluation is of mu I + K^T K, not of K-FAC's metric

    def corrector(self):
        """The module's metric factorised in float64 (refinement then converges while
        the float64 residual is what limits it; the float32 thin algebra loses
        ``eps cond(G)``, like a Woodbury solve)."""
        twins = [b.float64() for b in self.blocks]

        def correct(r: list[Tensor]) -> list[Tensor]:
            return apply(twins, self.param_names, [a.double() for a in r])

        return correct

    def redo(self, problem, opts) -> None:
        """Slow path: the decompositions checked one by one (float64 retry, jitter),
        errors naming the factor; a zero factor's damping by its limit."""
        gamma, inputs = self.factors
        parts = [b.part for b in self.blocks]
        self.blocks = damped_blocks(parts, gamma, inputs, opts, checked=True)
        self.x = apply(self.blocks, self.param_names, self.rhs(problem))
        self.condition = _max([b.condition() for b in self.blocks])
        self.jitter, self.what = max(
            ((s.jitter, s.what) for b in self.blocks for s in b.shifted), default=(0.0, "")
        )
        self.residual = self.forward_scale = None
        if opts.diagnostics:
            self.matrix_condition = _max([b.exact_condition() for b in self.blocks])


def kronecker_solve(
    index: int,
    block: Block,
    kernel: str,
    rows: int,
    blocks: list[DampedBlock],
    gradient: list[Tensor],
    opts: Options,
    factors: tuple | None = None,
) -> KroneckerSolve:
    """The record of ``blocks`` (block ``index`` of a problem) applied to ``gradient``,
    with the jitter their Choleskys needed (factorised at an earlier step, or just now)."""
    jitter, what = max(((s.jitter, s.what) for b in blocks for s in b.shifted), default=(0.0, ""))
    solve = KroneckerSolve(
        name=block.name,
        kernel=kernel,
        solver="kronecker" if opts.kfac_damping == "exact" else "kronecker-factored",
        indices=[index],
        x=apply(blocks, block.param_names, gradient),
        rows=rows,
        params=block.n_params,
        condition=_max([b.condition() for b in blocks]),
        failed=_any([f for b in blocks for f in b.flags]),  # a bias apart shares Gamma's
        param_names=list(block.param_names),
        blocks=blocks,
        factors=factors,
        jitter=jitter,
        what=what,
    )
    if opts.diagnostics and opts.kfac_damping == "factored":
        solve.matrix_condition = _max([b.exact_condition() for b in blocks])
    return solve


def fresh_solve(
    handler: PatchHandler,
    index: int,
    gradient: list[Tensor],
    opts: Options,
    factors: tuple,
    blocks: list[DampedBlock],
) -> KroneckerSolve:
    """The module's solve with its damped metric ``blocks`` factorised from ``factors``
    (``(Gamma, {part: A})``, :func:`module_factors`; :func:`damped_modules`)."""
    kernel = type(handler).__name__
    return kronecker_solve(index, handler.block, kernel, handler.d, blocks, gradient, opts, factors)


def solve(
    problem: Problem,
    opts: Options,
    state: KFACState | None = None,
    checks: Deferred | None = None,
) -> list[Solve]:
    """Each module's solve; with ``state``, the preconditioner's cached factorisations
    (and ``checks``, the step's, which read what it keeps).
    Every module's factors are formed first, so that those of one order are decomposed
    together (:func:`damped_modules`)."""
    handlers = [kronecker_handler(h) for h in problem.handlers]  # the layer structure
    if state is None:
        factors = [module_factors(h, opts) for h in handlers]
    else:
        factors = [state.factors(h, opts) for h in handlers]
    fresh = [(parts_of(h, opts.kfac_bias), *pair) for h, pair in zip(handlers, factors) if pair]
    blocks = iter(damped_modules(fresh, opts))
    solves = []
    for i, (handler, pair) in enumerate(zip(handlers, factors, strict=True)):
        gradient = problem.gradient_of(i)
        damped = next(blocks) if pair else None
        if state is None:
            solves.append(fresh_solve(handler, i, gradient, opts, pair, damped))
        else:
            solves.append(
                state.solve(handler, i, gradient, opts, pair, damped, checks, problem.data_dtype)
            )
    return solves


@dataclass(frozen=True)
class Cached:
    """A module's damped metric kept across steps: its parameters (``block``, without
    the batch's data), the kernel and rows it came from, its factorised parts, and the
    dtype its rows were pulled back in (half under autocast, which bounds the accuracy of
    every step that reuses them; ``None``: the parameters')."""

    block: Block
    kernel: str
    rows: int
    blocks: list[DampedBlock]
    data_dtype: torch.dtype | None = None

    def placed_for(self, opts: Options) -> bool:
        """Whether the factorisations are in the dtype, on the device and of the orders a
        solve for the block's parameters takes now: not after ``model.double()`` or
        ``model.to(device)`` moved them, nor after ``p.data = ...`` gave them other shapes
        (a layer grown in place; found by a hunt: the cached blocks were applied to the
        new shapes and raised from inside the solve)."""
        p, data = self.block.params[0], self.blocks[0].gamma.data
        shapes = dict(zip(self.block.param_names, (q.shape for q in self.block.params)))
        return (data.dtype, data.device) == (opts.solve_dtype or p.dtype, p.device) and all(
            shapes[n] == s for b in self.blocks for n, s in zip(b.part.param_names, b.part.shapes)
        )

    def solve(self, index: int, gradient: list[Tensor], opts: Options) -> KroneckerSolve:
        return kronecker_solve(
            index, self.block, self.kernel, self.rows, self.blocks, gradient, opts
        )


class KFACState:
    """K-FAC across the steps of a preconditioner, as K-FAC optimisers run it.

    Factorisations (eigendecompositions or Choleskys) are refreshed every ``refresh``
    steps and reused in between. With ``decay > 0`` the factors are running averages,
    ``F <- decay F + (1 - decay) F_batch`` (started at the first batch's), updated every
    step; with ``decay = 0`` a step between refreshes needs no factors at all, so
    :meth:`reuse` applies the cached blocks to the gradient without a forward pass.
    State changes only in :meth:`commit`, after a step succeeded.
    """

    def __init__(self, refresh: int = 1, decay: float = 0.0):
        check_refresh(refresh, decay)
        self.refresh, self.decay = int(refresh), float(decay)
        self.steps = 0
        self._averages: dict[str, Tensor] = {}  # running factors by "module:Gamma", "module:A"
        self._shapes: dict[str, tuple] = {}  # the shapes of the module each was taken for
        self._cached: dict[str, Cached] = {}  # by module
        self.discard()

    @property
    def due(self) -> bool:
        """Whether this step refreshes the factorisations."""
        return self.steps % self.refresh == 0

    def needs_factors(
        self,
        params,
        opts: Options,
        modules: Mapping[str, nn.Module],
        used: set[str] | None = None,
        shared: bool = False,
    ) -> bool:
        """Whether a step on ``params`` (the trainable ``(name, parameter)`` pairs) of the
        model whose ``modules`` are given by name with ``opts`` needs this batch's factors:
        when due, with running averages, where a cached block's parameters are not all
        among ``params`` (a parameter replaced or frozen: compared by identity, which the
        cached blocks keep) or its module is not the model's of that name (swapped, even for
        one given the same parameters: found by a hunt, the old one's blocks served it), where a
        parameter the step uses (``used``, names; by default all of ``params``) has no
        cached block (unfrozen, or its module not called at the last refresh), or where the
        blocks were factorised in another dtype or on another device (the model moved
        since). A trainable module the forward pass does not call needs nothing. So does a
        step whose structure K-FAC refuses, so that it is refused between refreshes too
        (found by review: accepted with the cached blocks until the next refresh): a
        parameter ``shared`` by several calls (a module now called twice), a cached module
        without Kronecker factors now (a convolution's padding mode changed)."""
        current = {(n, id(p)) for n, p in params}
        needed = current if used is None else {(n, i) for n, i in current if n in used}
        cached = self._cached.values()
        return (
            self.decay > 0
            or self.due
            or shared
            or not needed <= _identities(cached) <= current
            or not all(
                c.placed_for(opts)
                and modules.get(c.block.name) is c.block.module
                and has_kronecker_factors(c.block.module)
                for c in cached
            )
        )

    def factors(self, handler: PatchHandler, opts: Options) -> tuple | None:
        """The module's factors this step refactorises from, ``(Gamma, {part: A})`` of this
        batch (averaged, with a decay), when due or not cached for these parameters; else
        ``None``: the cached blocks serve (their running averages updated all the same)."""
        name = handler.block.name
        old = self._cached.get(name)
        cached = old is not None and not self.due and old.block.module is handler.block.module
        cached = cached and _identities([old]) == _identities([handler]) and old.placed_for(opts)
        if cached and self.decay == 0:
            return None
        gamma, inputs = module_factors(handler, opts)
        if self.decay > 0:
            shapes = module_shapes(handler.block.module)
            gamma = self._average(average_key(name, "Gamma"), gamma, shapes)
            # one input factor per module (its weight's), whatever the bias does: freezing
            # the bias apart from the weight keeps the weight's average
            inputs = {
                p: self._average(average_key(name, "A"), A, shapes) for p, A in inputs.items()
            }
        return None if cached else (gamma, inputs)

    def solve(
        self,
        handler: PatchHandler,
        index: int,
        gradient: list[Tensor],
        opts: Options,
        factors: tuple | None,
        blocks: list[DampedBlock] | None,
        checks: Deferred,
        data_dtype: torch.dtype | None = None,
    ) -> KroneckerSolve:
        """The module's solve for this step: refactorised from ``factors``
        (:meth:`factors`) into ``blocks``, pulled back in ``data_dtype``, or with the
        cached blocks where ``factors`` is ``None``. A refactorised module's least factor
        trace, ``min(tr Gamma, tr A_W)`` (``A_W``: its weight's block of ``A``, without the
        bias's column of ones; zero exactly where the weight's metric is ``mu I``), is read
        with ``checks`` (the step's one host sync), for :meth:`commit`."""
        name = handler.block.name
        if factors is None:
            old = self._cached[name]
            s = old.solve(index, gradient, opts)
            s.data_dtype = old.data_dtype
        else:
            s = fresh_solve(handler, index, gradient, opts, factors, blocks)
            s.data_dtype = data_dtype
            gamma, inputs = factors
            # (the ones of a joint bias keep tr A >= 1: found by review, a joint layer
            # after a zero-initialised one was cached with its weight's metric mu I)
            traces = [gamma.trace(), *(A.trace(handler.P) for A in inputs.values())]
            self._pending_traces[name] = checks.read(torch.stack(traces).amin())
        self._pending[name] = (handler, s)
        return s

    def _average(self, key: str, factor: Factor, shapes: tuple) -> Factor:
        """The running average ``key`` updated with this batch's ``factor``, continued where
        it was taken for a module of the same ``shapes`` (:func:`module_shapes`; after a
        checkpoint, those of the model it was loaded into, whose orders were checked), else
        started afresh: a factor of the same order may mean something else (found by a
        hunt: ``Linear(4, 5)`` swapped for ``Linear(5, 5, bias=False)`` averaged ``[h, 1]``
        with ``h'``, 3.3x off)."""
        batch = factor.dense()
        old = self._averages.get(key)
        same = self._shapes.get(key, shapes) == shapes and old is not None
        if same and old.shape == batch.shape:  # moved with the model: kept
            batch = torch.lerp(batch, old.to(batch), self.decay)  # decay old + (1-decay) batch
        self._pending_averages[key] = batch
        self._pending_shapes[key] = shapes
        return Factor(matrix=batch, what=factor.what)

    def mixes(self, with_grad: set[str]) -> bool:
        """Whether a cached block holds parameters both in ``with_grad`` (names) and not:
        a block the metric couples, whose parameters without a gradient only the graph of
        a forward pass can tell apart (a branch not taken, or a gradient left out)."""
        return any(
            len({n in with_grad for n in c.block.param_names}) > 1 for c in self._cached.values()
        )

    def reuse(self, gradient: dict[str, Tensor], opts: Options, checks: Deferred):
        """The cached blocks applied to ``gradient`` (``{name: tensor}``) and checked as
        :func:`riemann_core.methods._solve.finish` checks every solve (reading
        ``checks`` too): ``({name: direction}, diagnostics)``."""
        cached = list(self._cached.values())
        # each block in its own solve dtype (found by review: all in the first block's,
        # a model of float32 and float64 modules failed at every step between refreshes)
        given = [
            [gradient[n].to(c.blocks[0].gamma.data.dtype) for n in c.block.param_names]
            for c in cached
        ]
        problem = Problem([c.block for c in cached], gradient=given)
        devices = {g.device.type for g in gradient.values()}
        with full_precision(devices):
            solves = [c.solve(i, given[i], opts) for i, c in enumerate(cached)]
            for c, s in zip(cached, solves, strict=True):
                s.data_dtype = c.data_dtype
            per_block, diagnostics = finish(problem, solves, opts, checks, "kfac")
        self._pending = {c.block.name: (None, s) for c, s in zip(cached, solves, strict=True)}
        directions = {
            n: x
            for c, dirs in zip(cached, per_block, strict=True)
            for n, x in zip(c.block.param_names, dirs, strict=True)
        }
        return directions, diagnostics

    def commit(self, params, solved: set[str]) -> None:
        """Keep what the step on ``params`` (the trainable ``(name, parameter)`` pairs)
        computed, and count it: the blocks of the modules it saw; between refreshes also
        the cached blocks of modules it did not call whose parameters are all still
        trainable (found by a hunt: a branch skipped by one step was refactorised off
        schedule when it came back, with running averages), until the next refresh keeps
        only the blocks it made. A module none of whose parameters is in ``solved`` (the
        names solved for a gradient of this pass) counts as not called: its
        output did not reach the loss (an auxiliary head kept aside, a call under
        ``torch.no_grad()``), so its ``Gamma`` of this batch is zero (found by a hunt:
        cached at a refresh, the head's metric was ``mu I`` until the next one, its
        direction 5-39x the fresh one once the loss used it again; averaged, zeros weighed
        the average down). A module refactorised from a factor of zero (``tr Gamma = 0``:
        no gradient reached its output, as before a zero-initialised head; or ``tr A = 0``
        for its weight, the bias's column of ones left out: its inputs all zero, as after a
        zero-initialised layer; with a decay, the average's) is averaged, but not cached:
        its weight's metric ``mu I`` is exact for that batch's gradient, zero too, and no
        other (found by review: the layer before a zero head, cached at a refresh, took 9.8x
        the fresh direction the next step, and the loss went from 1.6 to 84 in four steps);
        it is refactorised at its next step."""
        skipped = {
            name for name, (_, s) in self._pending.items() if solved.isdisjoint(s.param_names)
        }
        zero_factor = {name for name, trace in self._pending_traces.items() if trace.value == 0}
        self._averages.update(
            (key, a) for key, a in self._pending_averages.items() if _owner(key) not in skipped
        )
        self._shapes.update(
            (key, s) for key, s in self._pending_shapes.items() if _owner(key) not in skipped
        )
        current = {(n, id(p)) for n, p in params}
        kept = {} if self.due else self._cached
        self._cached = {name: c for name, c in kept.items() if _identities([c]) <= current} | {
            name: self._cached[name] if handler is None else _cache(handler, s)
            for name, (handler, s) in self._pending.items()
            if name not in skipped | zero_factor
        }
        self.steps += 1
        self.discard()

    def restore(
        self,
        steps: int,
        averages: dict[str, Tensor],
        cached: dict[str, Cached],
        shapes: dict[str, tuple] | None = None,
    ):
        """Take the state of a checkpoint (:mod:`riemann_core.methods.kfac_checkpoint`),
        its averages taken for modules of ``shapes`` (those of the model it was loaded
        into, whose orders were checked)."""
        self.steps, self._averages, self._cached = steps, averages, cached
        self._shapes = dict(shapes or {})
        self.discard()

    def redamp(self, opts: Options) -> None:
        """The cached factorisations damped with ``opts.damping`` (the damping changed):
        the same factors, their eigendecompositions reused (exact damping) or their damped
        Choleskys taken again (factored damping); the step count and the running averages
        are kept. A factorisation that fails raises :class:`SolveError`, the cache left as
        it was."""
        redamped = {}
        devices = {c.blocks[0].gamma.data.device.type for c in self._cached.values()}
        with full_precision(devices):  # as every step factorises
            modules = [
                (
                    [b.part for b in c.blocks],
                    c.blocks[0].gamma,
                    {b.part.name: b.A for b in c.blocks if b.A is not None},
                )
                for c in self._cached.values()
            ]
            deferred = damped_modules(modules, opts)  # those of one order together, as a step
            for (name, c), module, blocks in zip(self._cached.items(), modules, deferred):
                failed = [b.failed for b in blocks if b.failed is not None]
                if failed and bool(torch.stack(failed).any()):
                    blocks = damped_blocks(*module, opts, checked=True)
                redamped[name] = replace(c, blocks=blocks)
        self._cached = redamped

    def discard(self) -> None:
        """Forget what a failed step computed."""
        self._pending_averages: dict[str, Tensor] = {}
        self._pending_shapes: dict[str, tuple] = {}
        self._pending: dict[str, tuple[PatchHandler | None, KroneckerSolve]] = {}
        self._pending_traces: dict[str, Reading] = {}  # least factor trace of those refactorised


def module_shapes(module: nn.Module) -> tuple:
    """What a running average of ``module``'s factors was taken for: its type and the
    shapes of its own parameters (trainable or not), a weight before its bias
    (:func:`~riemann_core.modules.own_parameters`: a module whose weight
    ``prune.remove`` or ``remove_weight_norm`` registered again after its bias is the
    same module; found by review, its running averages started afresh, the next
    directions 38-54% off a twin's that kept them)."""
    own = dict.fromkeys(p for n, p in own_parameters(module) if "." not in n)  # registered on it
    return type(module), tuple(p.shape for p in own)


def average_key(owner: str, factor: str) -> str:
    """The key of a running average: ``module:Gamma`` or ``module:A`` (the module's input
    factor, with a column of ones where the bias joins the weight: then another order, and
    an average of another order starts afresh)."""
    return f"{owner}:{factor}"


def _owner(key: str) -> str:
    """The module of the running average ``key`` (:func:`average_key`)."""
    return key.rsplit(":", 1)[0]


def _identities(solved) -> set[tuple[str, int]]:
    """``(name, id)`` of the parameters of each block of ``solved`` (handlers or cached
    blocks)."""
    return {(n, id(p)) for c in solved for n, p in zip(c.block.param_names, c.block.params)}


def _cache(handler: PatchHandler, s: KroneckerSolve) -> Cached:
    """What a later step needs of this one's module: its parameters, not its data (but the
    dtype that came in). Thin factors' rows are copied out of a larger buffer
    (``pre.backward``'s rows share theirs with the loss gradient's): kept, or saved by
    ``torch.save``, a view keeps it whole."""
    for damped in s.blocks:
        for factor in (damped.gamma, damped.A):
            if factor is not None and factor.thin and in_larger_storage(factor.rows):
                factor.rows = factor.rows.clone()
    b = handler.block
    block = Block(b.name, b.module, list(b.param_names), list(b.params), inputs=(), output=None)
    return Cached(block, s.kernel, s.rows, s.blocks, s.data_dtype)


def in_larger_storage(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a part of a larger storage (a slice, a view of a buffer)."""
    return tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()
