"""One solve ``x = G^{-1} v`` of a method and its checks: did the factorisation succeed,
did the solve solve, and can the model's dtype determine ``x`` at this damping?

Every method hands back :class:`Solve` records; :func:`finish` reads all their device
verdicts in one host sync (:class:`riemann_core._checks.Deferred`) and takes a slow path
only where one needs it:

* a Cholesky that failed is redone with jitter (:func:`riemann_core.woodbury.cholesky`),
  with an :class:`AccuracyWarning` when the jitter exceeds a tenth of the damping;
* where ``eps(solve dtype) * cond(G)`` exceeds a quarter of :data:`RESIDUAL_BOUND` (on
  the CPU, for a Gram of several probe blocks, the whole Gram's estimate decides:
  ``Solve.residual_condition``), or jitter was needed, the relative residual
  ``||G x - v|| / ||v||`` is evaluated in float64 on the solve's own data (a Woodbury or
  Cholesky solve leaves about ``eps * cond(G)``; for 2-D Linear blocks from ``N``-sized
  factors where that pays, :meth:`Solve.residual_settled`); above the bound, up to
  :data:`AUTO_REFINE` steps of mixed-precision refinement follow (a float32 Woodbury
  solve of 2-D Linear blocks first up to as many in its rows, :meth:`Solve.refine_rows`),
  and a residual still above it raises :class:`SolveError`;
* for a Woodbury solve or a Cholesky of ``G`` itself (``full``, dense blocks),
  wherever that check evaluates the residual it also bounds the error of ``x`` itself:
  ``G`` has no eigenvalue below ``mu``, so ``||x - G^{-1} v|| <= ||G x - v|| / mu``;
  where that bound exceeds :data:`FORWARD_LEVEL` times ``||x||`` the same refinement
  follows until it does not, and an :class:`AccuracyWarning` gives the bound if it still
  does. A Woodbury solve of a ``v`` along ``G``'s top eigenvectors loses up to ``eps
  cond(G)^2``: ``(g - K^T t) / mu`` cancels ``||g||`` down to ``mu ||x||``. A float32
  Cholesky of ``G`` is backward stable, but lost 1.5-2.2x ``eps cond(G)`` (found by a
  hunt), more than the warning below allows for; the bound read 1.2-2x that error.
  K-FAC's eigendecomposition or Cholesky of its factors, whose bound reads 100-1700x
  high, is held to the residual's bound alone;
* where ``eps(model dtype) * cond(G)`` exceeds :data:`ACCURACY_LEVEL`, the rounding of
  the model's own data (factor rows, inputs, gradient) may change the direction by that
  much: an :class:`AccuracyWarning` gives the figure;
* where the norm bound of every ``x`` (read with the verdicts) leaves room for it, a
  direction among the subnormal numbers of the model's dtype, which their rounding can
  change by more than :data:`ACCURACY_LEVEL` (a damping near the largest number the
  metric's dtype holds), gets an :class:`AccuracyWarning` (:func:`_check_underflow`).

``cond(G)`` is estimated as ``lambda_max / mu`` (``mu I + K^T K`` has no eigenvalue
below ``mu``) with a few power iterations on the factorised matrix. A record keeps no
factorised matrix or factor past its own block (memory as for a block-by-block solve):
a slow path builds them again from the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._checks import Deferred, DirectionOverflow, all_finite
from .._warn import warn
from ..modules import named_block
from ..woodbury import (
    AccuracyWarning,
    Cholesky,
    SolveError,
    cholesky,
    eigenvalues,
    probe_block_estimates,
    sharpen_condition,
)
from ._base import LayerDiagnostics, Options, Problem, norm

#: Relative residual ``||G x - v|| / ||v||`` above which a solve for a model of that
#: dtype did not solve.
RESIDUAL_BOUND = {torch.float32: 1e-3, torch.float64: 1e-6}

#: Refinement steps taken, at most, when a solve's residual exceeds the bound.
AUTO_REFINE = 3

#: ``eps(model dtype) * cond(G)``, ``cond(G)`` as estimated, above which the direction is
#: reported as undetermined by the model's precision: every error above 1% warns. The
#: estimate reads low by up to 2.5x (a few power iterations; a Gram's is the sum over its
#: probe blocks, never below its ``lambda_max`` but by that), and on small float32
#: networks the error reached 2/3 of ``eps cond(G)`` (tests/test_accuracy.py), where the
#: gradient is rounded to a few ``eps`` of itself: one whose samples' terms cancel is
#: rounded to ``eps`` times that cancellation, which no figure here includes (docs/api.md).
ACCURACY_LEVEL = 0.005

#: The a-posteriori bound ``||G x - v|| / (mu ||x||)`` on the relative error of a
#: Woodbury or dense Cholesky solve's ``x``, read with its residual, above which ``x`` is
#: refined (and, where that falls short, the bound is given in an
#: :class:`AccuracyWarning`).
FORWARD_LEVEL = 0.01


def gram_conditions(
    problem: Problem, opts: Options, grams: Tensor, samples: int
) -> tuple[Tensor, Tensor | None]:
    """``(condition, residual_condition)`` (:class:`Solve`) of damped Grams ``(..., d, d)``
    of probe-major rows of ``samples`` samples: the sum of the probe blocks' estimates
    (``woodbury.probe_block_estimates``) over the damping and, where it sends a
    solve to the float64 residual, the whole Gram's (``woodbury.sharpen_condition``,
    recorded as the slow path ``"condition"``); ``None`` where there is nothing to decide
    (refinement and the diagnostics evaluate the residual anyway)."""
    blocks = probe_block_estimates(grams, samples)
    # each divided first: summed first, near the largest float they overflowed
    condition = (blocks / opts.damping).sum(-1)
    if opts.refine or opts.diagnostics:
        return condition, None
    above = residual_checked_above(problem, grams.dtype)
    decisive = sharpen_condition(grams, samples, blocks, opts.damping, above)
    if decisive is not None:
        took("condition")
    return condition, decisive


def residual_checked_above(problem: Problem, factor_dtype: torch.dtype) -> float:
    """The estimate of ``cond(G)`` above which :func:`finish` evaluates the float64
    residual of a solve of ``problem`` factorised in ``factor_dtype``
    (:func:`_check_residual`: ``eps cond(G) > bound / 4``)."""
    model_dtype = problem.blocks[0].params[0].dtype
    return RESIDUAL_BOUND[model_dtype] / 4 / torch.finfo(factor_dtype).eps


#: the names of the slow paths (:func:`recording_slow_paths`)
SLOW_PATHS = ("condition", "jitter", "residual", "refine")
#: the slow paths taken inside :func:`recording_slow_paths` (None outside it)
_slow_paths: ContextVar[list[str] | None] = ContextVar("slow_paths", default=None)


@contextmanager
def recording_slow_paths() -> Iterator[list[str]]:
    """Collect the slow paths that the solves of calls made inside take, in order:
    ``"condition"`` (a Gram's condition estimated again from the whole Gram,
    ``woodbury.sharpen_condition``), ``"jitter"`` (a Cholesky redone with jitter),
    ``"residual"`` (the residual evaluated in float64) and ``"refine"`` (one refinement
    step). Their work depends on the data
    (on ``cond(G)``), so the cost models of :mod:`riemann_core.costs` leave it out; a
    measurement that compares counted FLOPs with a model tells such calls apart."""
    taken: list[str] = []
    token = _slow_paths.set(taken)
    try:
        yield taken
    finally:
        _slow_paths.reset(token)


def took(path: str) -> None:
    """Record the slow path ``path`` (:data:`SLOW_PATHS`) where it is being recorded."""
    taken = _slow_paths.get()
    if taken is not None:
        taken.append(path)


def _norm(tensors: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def _norm_bound(solves: list[Solve]) -> Tensor:
    """An upper bound on the 2-norm of every solve's ``x`` together (a float64 device
    scalar): each solve's ``x_bound`` where it has one, else ``x``'s own 2-norm (one
    ``foreach`` kernel, whatever the number of tensors; the 1-norm's took 2.7x as long
    for the parameters of 784-1024-1024-10 on a 2-core CPU). NaN or inf when an ``x`` is
    not finite, or the bound overflows."""
    bounds = [s.x_bound for s in solves if s.x_bound is not None]
    rest = [a for s in solves if s.x_bound is None for a in s.x]
    if rest:
        bounds.extend(torch._foreach_norm(rest))
    return torch.linalg.vector_norm(torch.stack(bounds).double())  # stack promotes dtypes


def _proves_finite(bound: float, solves: list[Solve], model_dtype: torch.dtype) -> bool:
    """Whether a 2-norm ``bound`` of every ``x`` proves each entry finite in its own dtype
    and in the model's, which the directions are returned in: every entry is at most the
    norm, and a computed product ``M^T Xt`` at most ``(1 + N eps)`` times
    ``||M|| ||Xt||``, so a bound under half the smallest largest value leaves a margin for
    the rounding of the bound itself (a NaN bound compares false)."""
    dtypes = {model_dtype, *(a.dtype for s in solves for a in s.x)}
    return bound < min(torch.finfo(d).max for d in dtypes) / 2


#: How far above the rounding it would notice :func:`_may_underflow` looks at each ``x``
#: (a margin for a bound ``x_bound`` that reads above ``||x||``).
UNDERFLOW_MARGIN = 1e6


def _underflow_error(norm_x: float, entries: int, dtype: torch.dtype) -> float:
    """The largest relative error that rounding ``entries`` entries of a vector of 2-norm
    ``norm_x`` to the subnormal numbers of ``dtype`` can leave: half their spacing (the
    smallest subnormal) each, ``sqrt(entries) tiny eps / 2`` in all."""
    info = torch.finfo(dtype)
    if not norm_x > 0:
        return math.inf
    return math.sqrt(entries) * info.tiny * info.eps / 2 / norm_x


def _scaled_norm(tensors: list[Tensor]) -> float:
    """The 2-norm in float64, scaled by the largest entry so that no square underflows
    (a float64 direction of norm 1e-165, normal, read 0 through :func:`_norm`). Host read."""
    tensors = [t.double() for t in tensors if t.numel()]
    if not tensors:
        return 0.0
    top = float(torch.stack([t.abs().max() for t in tensors]).max())
    if not top > 0 or not math.isfinite(top):
        return top
    return top * float(_norm([t / top for t in tensors]))


def _may_underflow(bound: float, solves: list[Solve], model_dtype: torch.dtype) -> bool:
    """Whether a 2-norm ``bound`` of every ``x`` together leaves room for a direction so
    small that the subnormal numbers of its dtype (or the model's, which it is returned
    in) round it by more than :data:`ACCURACY_LEVEL` (then :func:`_check_underflow`
    examines each solve; a NaN bound compares false, and the finiteness checks take it)."""
    entries = sum(a.numel() for s in solves for a in s.x)
    dtypes = {model_dtype, *(a.dtype for s in solves for a in s.x)}
    level = max(_underflow_error(1.0, entries, d) for d in dtypes) / ACCURACY_LEVEL
    return bound < level * UNDERFLOW_MARGIN


def _check_underflow(s: Solve, problem: Problem, opts: Options, model_dtype) -> None:
    """Warn where the direction of ``s`` lies so far below the smallest normal number of
    the model's dtype that its rounding there can change it by more than
    :data:`ACCURACY_LEVEL`: ``x = G^{-1} g`` of a nonzero gradient is at most
    ``||g|| / mu``, and at a damping near the largest number of the dtype the metric is
    formed in it falls among the subnormal numbers, or to 0 (found by a hunt: a float32
    model at damping 1e50 with ``solve_dtype=torch.float64`` got a zero direction from
    every method, without a word). Read on the host: this runs only where the norm
    bound of every ``x`` leaves room for it (:func:`_may_underflow`)."""
    entries = sum(a.numel() for a in s.x)
    norm_x = _scaled_norm(s.x)  # (squares of a float64 x below 1e-162 are 0: found by review)
    rounded = _scaled_norm([a.to(model_dtype).double() - a.double() for a in s.x])
    dtypes = {model_dtype, *(a.dtype for a in s.x)}
    subnormal = max(_underflow_error(norm_x, entries, d) for d in dtypes)
    error = rounded / norm_x + subnormal if norm_x > 0 else math.inf
    if error <= ACCURACY_LEVEL or _scaled_norm(s.rhs(problem)) == 0:
        return  # a zero gradient's direction is 0 exactly
    info = torch.finfo(model_dtype)
    size = f"0 in {model_dtype}" if norm_x == 0 else f"of norm {norm_x:.1e}"
    warn(
        f"the direction of {named_block(s.name)} underflows {model_dtype}: it is {size}, "
        f"below its smallest normal number {info.tiny:.1e}, so rounding to its subnormal "
        f"numbers can change it by a relative error of up to "
        f"{min(error, 1.0):.0e} (damping {opts.damping:g}). Use a smaller damping, or "
        "scale the loss up",
        AccuracyWarning,
    )


def _representable(tensors: list[Tensor], dtype: torch.dtype) -> bool:
    """Whether every entry is finite, also once converted to ``dtype`` (a float64 solve
    of a float32 model: 1e39 is finite, but not in float32)."""
    return all(all_finite(t.to(dtype)) for t in tensors)


@dataclass
class Solve:
    """``x = G^{-1} v`` for the blocks ``indices`` of a problem (``x``: their parameters
    in order, in the solve dtype), with what its checks need.

    ``rebuild()`` returns the damped matrix that was factorised and ``factor_solver``
    makes ``G^{-1}`` (a function of a list of tensors) from a Cholesky factor of it;
    ``failed`` and ``condition`` are device scalars: whether the factorisation failed,
    and an estimate of ``cond(G)``; ``residual_condition``, where set, a lower one that
    decides on the float64 residual alone (``woodbury.sharpen_condition``). Records
    without them (``euclidean``) are only checked for finiteness. ``x_bound``, a device
    scalar, bounds ``||x||`` from above (computed from factors of ``x`` smaller than
    ``x``); it stands for ``x``'s own norm
    in the finiteness check until ``x`` changes. ``t`` (``d``), where set, is the rows'
    solution of a Woodbury solve of 2-D Linear blocks, ``x = (g - K^T t) / mu`` (formed
    from their ``Lambda``, or from the gradient where it is given): refinement can work on
    it (:meth:`refine_rows`). ``residual``,
    where evaluated, is ``||G x - v|| / ||v||`` in float64 and ``forward_scale`` (set with
    it) ``mu ||x|| / ||v||``: a residual under ``e`` times it proves
    ``||x - G^{-1} v|| <= e ||x||``.
    """

    name: str
    kernel: str
    solver: str
    indices: list[int]
    x: list[Tensor]
    x_bound: Tensor | None = None
    rows: int = 0
    params: int = 0
    what: str = ""
    rebuild: Callable[[], Tensor] | None = None
    factor_solver: Callable[[Cholesky], Callable] | None = None
    condition: Tensor | None = None
    residual_condition: Tensor | None = None
    failed: Tensor | None = None
    jitter: float = 0.0
    t: Tensor | None = None
    residual: Tensor | None = None
    forward_scale: Tensor | None = None
    #: held to the forward-error goal (:meth:`goal`): set where the checks read the residual
    #: on their own account (not only for the diagnostics, or refinement asked for)
    forward_goal: bool = False
    matrix_condition: Tensor | None = None
    #: the dtype the factorised matrix's rows were pulled back in, where it is not the
    #: problem's (K-FAC's blocks cached at an earlier step, under autocast or not)
    data_dtype: torch.dtype | None = None
    factor_dtype: torch.dtype = field(init=False)  # x may turn float64 in refinement

    def __post_init__(self):
        self.factor_dtype = self.x[0].dtype

    def settle(
        self,
        problem: Problem,
        opts: Options,
        chol: Cholesky,
        condition: Tensor,
        residual_condition: Tensor | None = None,
    ) -> Solve:
        """What needs the factor, done before the method moves on: the failure flag and
        the condition estimates ``condition`` and ``residual_condition`` (device scalars,
        see the class), refinement and the diagnostics' figures (when asked for; they
        rebuild the factorised matrix)."""
        self.condition, self.residual_condition = condition, residual_condition
        self.failed = chol.failed
        if opts.refine and self.refines_in_rows():  # keeps t for the checks' refinement
            self.refine_rows(problem, opts.damping, opts.refine, chol=chol, direct=True)
        elif opts.refine:
            self.refine(problem, opts.damping, opts.refine, self.factor_solver(chol))
        elif opts.diagnostics:
            self.evaluate_residual(problem, opts.damping)
        if opts.diagnostics:
            self.matrix_condition = _condition(self.rebuild(), chol.jitter, opts.damping)
        return self

    def rhs(self, problem: Problem) -> list[Tensor]:
        return [a for i in self.indices for a in problem.gradient_of(i)]

    def metric64(self, problem: Problem, damping: float) -> Callable:
        """``x -> G x`` in float64 on the solve's own data."""
        return problem.metric64(self.indices, damping)

    def residual_of(
        self, problem: Problem, damping: float, x: list[Tensor] | None = None
    ) -> Tensor:
        """``||G x - v|| / ||v||`` in float64 (a device scalar), of ``x`` (this solve's
        by default)."""
        return self._residual_and_scale(problem, damping, x)[0]

    def evaluate_residual(self, problem: Problem, damping: float) -> Tensor:
        """Set ``residual`` and ``forward_scale`` (see the class) of this solve's ``x``,
        evaluated directly; returns ``residual``."""
        self.residual, self.forward_scale = self._residual_and_scale(problem, damping)
        return self.residual

    def _residual_and_scale(
        self, problem: Problem, damping: float, x: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        v = problem.gradient64(self.indices)
        x = [a.double() for a in (self.x if x is None else x)]
        r = [a - b for a, b in zip(v, self.metric64(problem, damping)(x), strict=True)]
        v_norm = _norm(v).clamp_min(torch.finfo(torch.float64).tiny)
        return _norm(r) / v_norm, damping * _norm(x) / v_norm

    def residual_settled(self, problem: Problem, damping: float, bound: float) -> float | None:
        """``||G x - v|| / ||v||`` evaluated from the blocks' ``N``-sized factors
        (:meth:`Problem.residual_squared`) when that settles on which side of
        ``goal(bound)`` it lies, rounding included, and then set as ``residual`` (with
        ``forward_scale``); ``None`` otherwise, or where that evaluation does not pay
        (:meth:`Problem.residual_from_factors_pays`). One host read."""
        if not problem.residual_from_factors_pays(self.indices, bound):
            return None
        terms = problem.residual_squared(self.indices, self.x, damping)
        q, error, scale_squared = torch.stack(terms).tolist()
        goal = self.goal(bound, math.sqrt(scale_squared))
        if not (q + error <= goal**2 or q - error > goal**2):  # NaN or inf: neither
            return None
        value = math.sqrt(max(q, 0.0))
        self.residual = torch.tensor(value, dtype=torch.float64)
        self.forward_scale = torch.tensor(math.sqrt(scale_squared), dtype=torch.float64)
        return value

    def goal(self, bound: float, forward_scale: float | None = None) -> float:
        """The relative residual this solve must reach: ``bound``, and for a Woodbury or
        dense Cholesky solve held to it (``forward_goal``) also ``FORWARD_LEVEL
        forward_scale`` (this solve's by default), under which its error is proven below
        :data:`FORWARD_LEVEL`."""
        if self.solver not in ("woodbury", "dense") or not self.forward_goal:
            return bound
        scale = float(self.forward_scale) if forward_scale is None else forward_scale
        return min(bound, FORWARD_LEVEL * scale)

    def refine(self, problem: Problem, damping: float, steps: int, apply: Callable) -> None:
        """Mixed-precision iterative refinement: ``x`` and the residual ``v - G x`` in
        float64, the correction solved by ``apply`` in the solve dtype. It converges
        while ``eps(solve dtype) * cond(G) < 1``; the iterate with the smallest residual
        is kept (chosen on the device, without a host sync)."""
        v = problem.gradient64(self.indices)
        G = self.metric64(problem, damping)
        v_norm = _norm(v).clamp_min(torch.finfo(torch.float64).tiny)

        def residual(x):
            r = [a - b for a, b in zip(v, G(x), strict=True)]
            return r, _norm(r) / v_norm

        x = best = [a.double() for a in self.x]
        r, best_residual = residual(x)
        for _ in range(steps):
            correction = apply([a.to(self.factor_dtype) for a in r])
            x = [a + c.double() for a, c in zip(x, correction, strict=True)]
            r, size = residual(x)
            better = size < best_residual
            best = [torch.where(better, a, b) for a, b in zip(x, best, strict=True)]
            best_residual = torch.where(better, size, best_residual)
        self.x, self.x_bound, self.residual, self.t = best, None, best_residual, None
        self.forward_scale = damping * _norm(best) / v_norm

    def refines_in_rows(self) -> bool:
        """Whether :meth:`refine_rows` applies: the solve keeps ``t`` and ran below float64
        (in float64 the rows' residual and ``x`` would be no more precise than the solve)."""
        return self.t is not None and self.factor_dtype != torch.float64

    def refine_rows(
        self,
        problem: Problem,
        damping: float,
        steps: int,
        bound: float = 0.0,
        chol: Cholesky | None = None,
        direct: bool = False,
    ) -> int:
        """Refinement in the rows, for a solve that keeps ``t`` (2-D Linear blocks whose
        rows ``K = [K_1 .. K_L]`` share): ``G x - g = K^T rho / mu`` for
        ``x = (g - K^T t) / mu``, with ``rho = K g - (mu I + K K^T) t`` in the rows
        (``K g = sum_a K_a g_a``, ``K K^T = sum_a K_a K_a^T``), so each step is
        ``t += (mu I + K K^T)^{-1} rho``: ``rho`` in float64 from ``N``-sized factors
        (``K K^T t = K (U^T Xt)`` through ``Xt Xt^T``; ``K g`` so too where ``g = Lambda^T
        Xt``, else from the given ``g``, one float64 GEMM of the forward's size, found by a
        hunt: at float32 damping 1e-7 every ``pre.step()`` of a sampled MSE MLP raised
        ``SolveError`` where the fused ``pre.backward`` met the bound), the correction by the
        Gram's factor ``chol`` in the solve dtype (factorised again when ``None``), ``x``
        formed again from ``t`` in float64 as refinement leaves it (one GEMM; formed in
        float32, its own rounding stalled the residual near 1e-3 at ``eps cond(G) ~ 0.1``)
        and its residual evaluated (:meth:`residual_settled`, else, or with ``direct``,
        directly). Up to ``steps`` steps, until the residual is within :meth:`goal` of
        ``bound`` (formed again with each ``x``); a step that does not lower it is undone
        and ends the refinement. Returns the steps taken; ``residual`` is set (evaluated
        first where it is not)."""
        handlers = [problem.handler64(i) for i in self.indices]
        if chol is None:
            _, _, chol = self.refactorise()
        if self.residual is None:
            self.evaluate_residual(problem, damping)
        Kg = sum(problem.K_gradient64(i) for i in self.indices)
        t = self.t.double()
        value, taken = float(self.residual), 0
        while value > self.goal(bound) and taken < steps:
            taken += 1
            KKt = sum(h.K_mv_output_grad(h.rows_combination(t)) for h in handlers)
            t = t + chol.solve(Kg - damping * t - KKt).double()
            before = (self.x, self.x_bound, self.residual, self.forward_scale)
            parts = [problem.gradient_minus_K_tmv64(i, t, 1 / damping) for i in self.indices]
            self.x = [a for part, _ in parts for a in part]
            bounds = [b for _, b in parts]
            self.x_bound = None if None in bounds else torch.linalg.vector_norm(torch.stack(bounds))
            if direct or self.residual_settled(problem, damping, bound) is None:
                self.evaluate_residual(problem, damping)
            if not float(self.residual) < value:  # no better (or NaN): keep the last x
                self.x, self.x_bound, self.residual, self.forward_scale = before
                break
            value, self.t = float(self.residual), t
        return taken

    def refactorise(self) -> tuple[Callable, Tensor, Cholesky]:
        """Slow path: the damped matrix again, factorised with jitter if need be."""
        matrix = self.rebuild()
        chol = cholesky(matrix, what=self.what)
        return self.factor_solver(chol), matrix, chol

    def corrector(self) -> Callable | None:
        """``r -> G^{-1} r`` in the solve dtype, for refinement on the slow path (the
        matrix factorised again), or ``None`` for a record that cannot refine."""
        if self.factor_solver is None:
            return None
        apply, _, _ = self.refactorise()
        return apply

    def redo(self, problem: Problem, opts: Options) -> None:
        """Slow path after a failed factorisation: factorise again with jitter."""
        took("jitter")
        apply, matrix, chol = self.refactorise()
        self.jitter = chol.jitter
        self.condition = (eigenvalues(matrix)[-1] + chol.jitter) / opts.damping
        self.residual_condition = None  # (the redone metric's condition is exact)
        self.x, self.x_bound, self.t = apply(self.rhs(problem)), None, None
        self.residual = self.forward_scale = None
        if opts.refine:
            self.refine(problem, opts.damping, opts.refine, apply)
        if opts.diagnostics:
            self.matrix_condition = _condition(matrix, chol.jitter, opts.damping)


def _condition(matrix: Tensor, jitter: float, damping: float) -> Tensor:
    """The 2-norm condition number of ``matrix + jitter I`` (an eigendecomposition of its
    lower triangle, in float64) for a damped ``matrix``, whose eigenvalues are at least
    ``damping``: rounding that reads its smallest below that (float32 at damping 1e-10:
    below zero, a negative condition, found by a hunt) is taken at ``damping``. A matrix
    with a NaN or inf (an overflowed Gram, which the solve's checks then refuse by name)
    reads NaN: LAPACK's eigendecomposition of it raised its own error first (found by a
    review: ``return_diagnostics=True`` on inputs of 1e30). No host read: a device
    ``where``."""
    matrix = matrix.double()
    finite = torch.isfinite(matrix).all()
    eigs = eigenvalues(torch.where(finite, matrix, 0.0))
    condition = (eigs[-1] + jitter) / (eigs[0].clamp_min(damping) + jitter)
    return torch.where(finite, condition, math.nan)


def finish(
    problem: Problem, solves: list[Solve], opts: Options, checks: Deferred, method: str
) -> tuple[list[list[Tensor]], list[LayerDiagnostics]]:
    """Check every solve (one host sync, then slow paths where needed, see the module
    docstring) and return the directions per block of ``problem`` and the diagnostics."""
    for handler in problem.handlers:
        for ok, explain in handler.deferred_checks():
            checks.require(ok, explain)
    readings = [
        [
            checks.read(t) if t is not None else None
            for t in (s.failed, s.condition, s.residual, s.residual_condition)
        ]
        for s in solves
    ]
    # one reading for every solve's x; only when it proves nothing is each x examined
    norm_x = checks.read(_norm_bound(solves))
    checks.run()
    model_dtype = problem.blocks[0].params[0].dtype
    all_finite_x = _proves_finite(norm_x.value, solves, model_dtype)
    maybe_underflows = _may_underflow(norm_x.value, solves, model_dtype)
    diagnostics = []
    for s, (failed, condition, residual, decisive) in zip(solves, readings, strict=True):
        condition = condition.value if condition is not None else None
        decisive = decisive.value if decisive is not None else condition
        if failed is not None and failed.value:
            s.redo(problem, opts)
            residual = None
            if s.condition is not None:  # the redone metric's (K-FAC: defined now)
                condition = decisive = float(s.condition)
            finite_now = _representable(s.x, model_dtype)
        else:
            finite_now = all_finite_x or _representable(s.x, model_dtype)
        # redone now, or factorised at an earlier step (K-FAC's cached blocks)
        # (found by a hunt: float64 advised to a solve already in float64; by review: x
        # refined in float64 is not a float64 factorisation)
        fix = "increase the damping" + (
            "" if s.factor_dtype == torch.float64 else " or pass solve_dtype=torch.float64"
        )
        if s.jitter > opts.damping / 10:
            warn(
                f"the Cholesky factorisation of the {s.what} needed a jitter of "
                f"{s.jitter:.1e} on its diagonal, more than a tenth of the damping "
                f"{opts.damping:g}: the direction is that of a larger damping. "
                f"{fix.capitalize()}",
                AccuracyWarning,
            )
        if not finite_now:
            raise DirectionOverflow(
                f"method={method!r} produced a non-finite direction for {named_block(s.name)}; "
                f"{_overflow_fix(s, problem, opts, condition, fix)}"
            )
        if s.condition is not None:
            _check_residual(s, problem, opts, condition, residual, model_dtype, decisive)
            data_dtype = s.data_dtype or problem.data_dtype or model_dtype
            _check_accuracy(s, opts, condition, data_dtype)
            if maybe_underflows:
                _check_underflow(s, problem, opts, model_dtype)
            if opts.diagnostics:
                diagnostics.append(_diagnostics(s, problem, opts, method))
    return assemble(problem, solves), diagnostics


def _overflow_fix(s: Solve, problem: Problem, opts: Options, condition, fix: str) -> str:
    """What a non-finite direction asks of the caller: ``fix`` (more damping, or float64)
    where the damping can help, that is where the overflow comes from a division by it (a
    near-singular metric, or a direction past the dtype's range); float64 or smaller data
    where the solve's products overflow whatever the damping: those of the rows and the
    gradient, ``||K|| ||g||`` (``||K||^2 ~ lambda_max(G) - mu`` from the condition
    estimate), near the solve dtype's largest value (found by a hunt: float32 ``layerwise``
    on inputs of 1e15 at damping 1e27, ``cond(G)`` 1.9e3, was told to increase the
    damping, which overflowed at every damping; float64 solved it). Read on the host: this
    runs only on the way to the error."""
    if condition is None:
        return fix
    mu = opts.damping
    # (an estimate read inf or NaN: a damping so small that lambda_max / mu overflowed,
    # which the damping's own advice answers; a Gram that overflowed was refused before)
    rows_squared = condition * mu - mu
    gradient = float(_norm(s.rhs(problem)))
    largest = torch.finfo(s.factor_dtype).max
    if not math.isfinite(rows_squared) or math.sqrt(max(rows_squared, 0.0)) * gradient < (
        largest / 64
    ):
        return fix
    if s.factor_dtype == torch.float64:
        remedy = "rescale the inputs, targets or loss nearer 1"
    else:
        remedy = (
            "pass solve_dtype=torch.float64 (or use a float64 model), or rescale the "
            "inputs, targets or loss nearer 1"
        )
    return (
        f"the products of its rows (||K|| ~ {math.sqrt(rows_squared):.1e}) and its "
        f"gradient (||g|| ~ {gradient:.1e}) overflow {s.factor_dtype} whatever the "
        f"damping: {remedy}"
    )


def _check_residual(
    s: Solve, problem, opts, condition: float, residual, model_dtype, decisive: float
) -> None:
    """The float64 residual where ``eps(solve dtype) decisive > bound / 4`` (``decisive``:
    the solve's ``residual_condition``, or its ``condition``) or a jitter was needed;
    refinement where it exceeds the bound or, for a Woodbury or dense solve checked so, the
    forward-error bound it gives exceeds :data:`FORWARD_LEVEL` (:meth:`Solve.goal`);
    ``SolveError`` where the residual stays above the bound, an ``AccuracyWarning`` where
    the forward-error bound stays above its level. A residual read for the diagnostics or
    refinement alone is held to the bound alone: asking for them does not change which
    solves are refined (found by review: the diagnostics changed a direction by 2.7e-3)."""
    bound = RESIDUAL_BOUND[model_dtype]
    s.forward_goal = s.jitter > 0 or torch.finfo(s.factor_dtype).eps * decisive > bound / 4
    if residual is not None:
        value = residual.value
    elif s.forward_goal or opts.diagnostics:
        # read for the diagnostics where no settle read it (K-FAC's): refined and held as
        # a Woodbury solve's (found by a hunt: K-FAC's overflowed thin algebra reported a
        # residual of 9.6e2 at cond(G) ~ 1e3, and the direction came back without a word)
        if s.forward_goal:
            took("residual")
        # diagnostics report the direct evaluation; otherwise it decides only what the
        # evaluation from small factors leaves open (too close to the bound to tell)
        value = None if opts.diagnostics else s.residual_settled(problem, opts.damping, bound)
        if value is None:
            value = float(s.evaluate_residual(problem, opts.damping))
    else:
        return
    target = s.goal(bound)
    steps = 0
    if not value <= target and s.refines_in_rows():  # first in the rows: no pass over x
        steps = s.refine_rows(problem, opts.damping, AUTO_REFINE, bound, direct=opts.diagnostics)
        value, target = float(s.residual), s.goal(bound)
        for _ in range(steps):
            took("refine")
    apply = None if value <= target else s.corrector()
    if apply is not None:  # refinement of x, with a budget of its own
        for _ in range(AUTO_REFINE):
            if value <= target:
                break
            took("refine")
            s.refine(problem, opts.damping, 1, apply)
            value, steps, target = float(s.residual), steps + 1, s.goal(bound)
    if not value <= bound:
        requested = f" ({opts.refine} requested, {steps} more)" if opts.refine else ""
        raise SolveError(
            f"the solve of {named_block(s.name)} did not solve: relative residual "
            f"||G x - g|| / ||g|| = {value:.1e} exceeds {bound:g} after {opts.refine + steps} "
            f"steps of refinement{requested} (cond(G) ~ {condition:.0e} at damping "
            f"{opts.damping:g}, factorised in {s.factor_dtype}). {_remedy(s.factor_dtype)}"
        )
    if not value <= target:
        forward = value / float(s.forward_scale) if float(s.forward_scale) > 0 else math.inf
        warn(
            f"the direction of {named_block(s.name)} is known only to within a relative error of "
            f"{forward:.1e} (||G x - g|| / (damping ||x||), the bound its residual "
            f"{value:.1e} gives, after {opts.refine + steps} steps of refinement; cond(G) ~ "
            f"{condition:.0e} at damping {opts.damping:g}, factorised in {s.factor_dtype}). "
            f"{_remedy(s.factor_dtype)}",
            AccuracyWarning,
        )


def _remedy(factor_dtype: torch.dtype) -> str:
    """What to pass where a solve's residual falls short: float64 where the metric was
    factorised in another dtype, else only a larger damping (found by a hunt: a float64
    solve was told to pass solve_dtype=torch.float64)."""
    if factor_dtype == torch.float64:
        return "Use a larger damping (the metric was formed and factorised in float64 already)"
    return (
        "Pass solve_dtype=torch.float64 (forms and factorises the metric in float64) or use "
        "a larger damping"
    )


def _check_accuracy(s: Solve, opts, condition: float, data_dtype: torch.dtype) -> None:
    """Warn where ``eps cond(G)`` of the data (the model's, or the rows pulled back in half
    precision under autocast: found by a hunt, bfloat16 rows 6% off without a word; or
    through a frozen half-precision module between trained float32 ones, found by another:
    41% off without a word; or
    those rounded to a ``solve_dtype`` of larger eps: found by review, a float64 model
    solved in float32 came back 4-13% off without a word) exceeds :data:`ACCURACY_LEVEL`."""
    rounded = opts.solve_dtype is not None and (
        torch.finfo(opts.solve_dtype).eps > torch.finfo(data_dtype).eps
    )
    dtype = opts.solve_dtype if rounded else data_dtype
    bound = torch.finfo(dtype).eps * condition
    if bound > ACCURACY_LEVEL:
        half = dtype in (torch.float16, torch.bfloat16)
        if rounded:
            data, fix = f"model's data rounded to solve_dtype={dtype}", "solve_dtype=None"
        elif half:
            data, fix = (
                f"{dtype} rows of the forward pass under autocast (or pulled back through "
                f"a module in {dtype})",
                f"run the forward pass outside autocast, with no module in {dtype} between "
                "the outputs and the trained ones",
            )
        else:
            data, fix = f"model's {dtype} data", "a float64 model"
        warn(
            f"the direction of {named_block(s.name)} is determined by the {data} only to a "
            f"relative error of up to ~{bound:.0e} (eps x cond(G), cond(G) ~ "
            f"{condition:.0e} at damping {opts.damping:g}, estimated; the error may be that "
            f"large). Use a larger damping or {fix}",
            AccuracyWarning,
        )


def _diagnostics(s: Solve, problem, opts, method) -> LayerDiagnostics:
    # of the direction returned, in the parameters' dtype: a float64 solve of a float32
    # model, or a refined one, keeps x in float64 until it is written (found by a hunt:
    # a residual of 3.5e-14 reported for a direction whose residual was 1.0e-7)
    params = [p for i in s.indices for p in problem.blocks[i].params]
    returned = [a.to(p.dtype) for a, p in zip(s.x, params, strict=True)]
    if any(a.dtype != b.dtype for a, b in zip(returned, s.x, strict=True)):
        residual = s.residual_of(problem, opts.damping, returned)
    else:
        if s.residual is None:
            s.evaluate_residual(problem, opts.damping)
        residual = s.residual
    condition = s.matrix_condition if s.matrix_condition is not None else s.condition
    return LayerDiagnostics(
        name=s.name,
        method=method,
        kernel=s.kernel,
        solver=s.solver,
        rows=s.rows,
        params=s.params,
        condition=float(condition),
        residual=float(residual),
        jitter=s.jitter,
        update_norm=norm(returned),
    )


def assemble(problem: Problem, solves: list[Solve]) -> list[list[Tensor]]:
    """The solves' ``x`` split back into the blocks of ``problem``."""
    out: list[list[Tensor]] = [[] for _ in problem.blocks]
    for s in solves:
        it = iter(s.x)
        for i in s.indices:
            out[i] = [next(it) for _ in problem.blocks[i].params]
    return out
