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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_refresh
from ..kronecker import (
    Factor,
    Shifted,
    exact_condition,
    exact_solve,
    split_damping,
    unit_eigen,
)
from ..modules import PatchHandler, kronecker_handler
from ._base import LayerDiagnostics, Options, Problem, norm

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
        columns = [tensors[n].reshape(s[0], -1) for n, s in zip(self.param_names, self.shapes)]
        return torch.cat(columns, 1) if len(columns) > 1 else columns[0]

    def from_matrix(self, M: Tensor) -> dict[str, Tensor]:
        widths = [math.prod(s[1:]) for s in self.shapes]
        return {
            n: c.reshape(s)
            for n, s, c in zip(self.param_names, self.shapes, M.split(widths, 1), strict=True)
        }

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def parts_of(handler: PatchHandler, bias: str) -> list[Part]:
    """The module's blocks: one, or the weight's and the bias's apart (``"separate"``)."""
    block = handler.block
    names, shapes = tuple(block.param_names), tuple(p.shape for p in block.params)
    if bias == "separate" and handler.with_weight and handler.with_bias:
        return [
            Part(names[0], names[:1], shapes[:1], bias_only=False),
            Part(names[1], names[1:], shapes[1:], bias_only=True),
        ]
    return [Part(block.name, names, shapes, bias_only=not handler.with_weight)]


def module_factors(handler: PatchHandler, opts: Options) -> tuple[Factor, dict[str, Factor]]:
    """``Gamma`` and each part's input factor ``A`` from this batch, in the solve dtype."""
    parts = parts_of(handler, opts.kfac_bias)
    ones = handler.with_bias and len(parts) == 1
    D, R = handler.kronecker_rows(ones)
    dtype = opts.solve_dtype or D.dtype
    name = handler.block.name
    gamma = Factor.of_rows(D.to(dtype), what=f"K-FAC output factor Gamma of module {name!r}")
    A = Factor.of_rows(R.to(dtype), what=f"K-FAC input factor A of module {name!r}")
    return gamma, {p.name: A for p in parts if not p.bias_only}


class DampedBlock:
    """One part's damped Kronecker metric, factorised once: ``block(V)`` is ``G^{-1} V``.

    ``shifts`` (factored damping): the damping of ``Gamma`` and of ``A`` (``None`` for a
    part without input factor), or ``None`` when a factor is zero and the metric is
    ``mu I`` (the limit of the factored product).
    """

    def __init__(self, part: Part, gamma: Factor, A: Factor | None, opts: Options, shifts, **info):
        self.part, self.gamma, self.A, self.damping = part, gamma, A, opts.damping
        self.factored = opts.kfac_damping == "factored"
        self.info = info  # kernel and rows, for the diagnostics
        self.left: Shifted | None = None
        self.right: Shifted | None = None
        if not self.factored:
            self.eigen = (gamma.eigen(), A.eigen() if A else unit_eigen(gamma.data))
        elif shifts is not None:
            self.left = gamma.shifted(shifts[0])
            self.right = None if A is None else A.shifted(shifts[1])

    def __call__(self, V: Tensor) -> Tensor:
        if not self.factored:
            return exact_solve(V, *self.eigen, self.damping)
        if self.left is None:  # a zero factor: the metric is mu I
            return V / self.damping
        X = self.left.solve(V)
        return X if self.right is None else self.right.solve_right(X)

    def metric(self, X: Tensor) -> Tensor:
        """``G X`` with the dense factors (for the residual in the diagnostics)."""
        Gamma = self.gamma.dense()
        if not self.factored:
            GXA = Gamma @ X if self.A is None else Gamma @ X @ self.A.dense()
            return GXA + self.damping * X
        if self.left is None:
            return self.damping * X
        GX = Gamma @ X + self.left.shift * X
        return GX if self.right is None else GX @ self.A.dense() + self.right.shift * GX

    def diagnostics(self, V: Tensor, X: Tensor) -> LayerDiagnostics:
        if not self.factored:
            condition = exact_condition(*self.eigen, self.damping)
        else:
            condition = math.prod(s.condition() for s in (self.left, self.right) if s is not None)
        jitter = max((s.chol.jitter for s in (self.left, self.right) if s is not None), default=0)
        residual = (self.metric(X) - V).norm() / V.norm().clamp_min(1e-300)
        return LayerDiagnostics(
            name=self.part.name,
            method="kfac",
            kernel=self.info["kernel"],
            solver="kronecker-factored" if self.factored else "kronecker",
            rows=self.info["rows"],
            params=self.part.n_params,
            condition=condition,
            residual=float(residual),
            jitter=float(jitter),
            update_norm=norm([X]),
        )


def damped_blocks(handler: PatchHandler, opts: Options, factors=None) -> list[DampedBlock]:
    """The module's parts, each with its damped metric factorised from ``factors``
    (``(Gamma, {part: A})``; default: this batch's, :func:`module_factors`).

    Factored damping splits ``mu`` by the weight's factors; a bias apart shares the
    weight's damped ``Gamma + pi sqrt(mu) I`` (one Cholesky for both), and alone (a
    frozen weight, or a zero factor) has ``Gamma + mu I``.
    """
    gamma, inputs = factors or module_factors(handler, opts)
    parts = parts_of(handler, opts.kfac_bias)
    split = None
    if opts.kfac_damping == "factored" and not parts[0].bias_only:
        split = split_damping(gamma, inputs[parts[0].name], opts.damping)
    bias_shift = (opts.damping if split is None else split[0], None)
    info = dict(kernel=type(handler).__name__, rows=handler.d)
    return [
        DampedBlock(
            p, gamma, inputs.get(p.name), opts, bias_shift if p.bias_only else split, **info
        )
        for p in parts
    ]


def apply(blocks: list[DampedBlock], gradient: dict[str, Tensor], opts: Options):
    """``G^{-1}`` of each block on ``gradient`` (``{name: tensor}``): the directions by
    name, and the diagnostics when asked for."""
    directions, diagnostics = {}, []
    for block in blocks:
        V = block.part.to_matrix(gradient)
        dtype = block.gamma.data.dtype
        X = block(V.to(dtype))
        directions.update(block.part.from_matrix(X.to(V.dtype)))
        if opts.diagnostics:
            diagnostics.append(block.diagnostics(V.to(dtype), X))
    return directions, diagnostics


def solve(problem: Problem, opts: Options, state: KFACState | None = None):
    """Each block's direction; with ``state``, the preconditioner's cached factorisations."""
    directions, diagnostics = [], []
    for handler, g in zip(problem.handlers, problem.gradient, strict=True):
        handler = kronecker_handler(handler)  # the factors need the layer structure
        blocks = damped_blocks(handler, opts) if state is None else state.blocks(handler, opts)
        names = handler.block.param_names
        by_name, diags = apply(blocks, dict(zip(names, g, strict=True)), opts)
        directions.append([by_name[n] for n in names])
        diagnostics += diags
    return directions, diagnostics


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
        self.refresh, self.decay = refresh, float(decay)
        self.steps = 0
        self._averages: dict[str, Tensor] = {}  # running factors by "module:Gamma", "part:A"
        self._blocks: dict[str, list[DampedBlock]] = {}  # by module
        self.discard()

    @property
    def due(self) -> bool:
        """Whether this step refreshes the factorisations."""
        return self.steps % self.refresh == 0

    def needs_factors(self, names) -> bool:
        """Whether a step on the parameters ``names`` needs this batch's factors."""
        cached = {n for blocks in self._blocks.values() for b in blocks for n in b.part.param_names}
        return self.decay > 0 or self.due or cached != set(names)

    def blocks(self, handler: PatchHandler, opts: Options) -> list[DampedBlock]:
        """The module's blocks for this step: refactorised from this batch's (averaged)
        factors when due or not cached for these parameters, else the cached ones."""
        name, names = handler.block.name, handler.block.param_names
        old = self._blocks.get(name, [])
        cached = not self.due and [n for b in old for n in b.part.param_names] == names
        if not cached or self.decay > 0:
            gamma, inputs = module_factors(handler, opts)
        if self.decay > 0:
            gamma = self._average(f"{name}:Gamma", gamma)
            inputs = {p: self._average(f"{p}:A", A) for p, A in inputs.items()}
        blocks = old if cached else damped_blocks(handler, opts, (gamma, inputs))
        self._pending_blocks[name] = blocks
        return blocks

    def _average(self, key: str, factor: Factor) -> Factor:
        batch = factor.dense()
        old = self._averages.get(key)
        if old is not None and old.shape == batch.shape and old.dtype == batch.dtype:
            batch = torch.lerp(batch, old, self.decay)  # decay old + (1 - decay) batch
        self._pending_averages[key] = batch
        return Factor(matrix=batch, what=factor.what)

    def reuse(self, gradient: dict[str, Tensor], opts: Options):
        """The cached blocks applied to ``gradient``, as :func:`apply`."""
        self._pending_blocks = self._blocks
        return apply([b for blocks in self._blocks.values() for b in blocks], gradient, opts)

    def commit(self) -> None:
        """Keep what the step computed (the blocks of the modules it saw) and count it."""
        self._averages.update(self._pending_averages)
        self._blocks = self._pending_blocks
        self.steps += 1
        self.discard()

    def discard(self) -> None:
        """Forget what a failed step computed."""
        self._pending_averages: dict[str, Tensor] = {}
        self._pending_blocks: dict[str, list[DampedBlock]] = {}
