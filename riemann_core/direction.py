"""``direction``: the preconditioned direction ``G^{-1} g`` of any method, side-effect free."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed
from ._checks import (
    Deferred,
    check_damping_fits,
    check_generator,
    check_inputs,
    check_model,
    forward_arguments,
    tensors_of,
    unprobed,
)
from ._precision import full_precision
from .capture import GRAPH_FREED, KEPT_ACROSS_PASSES, Replay, eager_when_traced
from .factors import FactorFn, reentrant_checkpoint_refused
from .methods import METHODS, SOLVERS, LayerDiagnostics, Options, build_problem, finish
from .methods.memory import named_when_too_large


@eager_when_traced
def direction(
    model: nn.Module,
    inputs: Tensor | tuple,
    targets: Tensor,
    *,
    loss: str = "cross_entropy",
    method: str = "layerwise",
    damping: float = 1e-3,
    output_metric: str | FactorFn = "exact",
    samples: int = 1,
    kernel: str = "structured",
    solve_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    refine: int = 0,
    kfac_damping: str = "exact",
    kfac_bias: str = "joint",
    return_diagnostics: bool = False,
    forward_kwargs: dict | None = None,
    check_coupling: bool | str = True,
    process_group: torch.distributed.ProcessGroup | None = None,
    timeout: float = distributed.TIMEOUT,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[LayerDiagnostics]]:
    """``G^{-1} g`` for the mean loss's gradient ``g`` on the batch ``(inputs, targets)``.

    ``G`` depends on ``method`` (see ``rc.METHODS``): ``euclidean`` ``I``; ``layerwise``
    ``mu I + K_a^T K_a`` per block (block-diagonal damped GGN, Woodbury per block);
    ``full`` ``mu I + K^T K`` dense; ``natural`` the same matrix through a data-space
    Woodbury solve; ``kfac`` ``Gamma_a (x) A_a + mu I`` per module. ``K_a = L_a B_a``
    is the output-metric factor pulled back to block ``a`` times its parameter
    Jacobian, and ``mu = damping``. A block is a module that owns trainable parameters,
    or the modules that share one (weight tying, a module called twice).

    Args:
        inputs: the model's input, or a tuple of its positional arguments; the model is
            called as ``model(*inputs, **forward_kwargs)``.
        loss: ``"cross_entropy"`` (class-index targets) or ``"mse"``; the gradient is
            that of ``F.cross_entropy`` / ``F.mse_loss`` with ``reduction="mean"``. For
            cross-entropy on outputs ``(N, ..., C)`` the classes lie along the last
            dimension, targets are ``(N, ...)`` and the loss is the mean over every
            position.
        output_metric: ``"exact"`` (softmax Fisher / MSE Hessian), ``"sampled"``
            (``samples`` Monte Carlo probes per sample) or a callable
            ``(outputs, targets) -> (N, r, C)`` returning a per-sample factor ``F_b``
            with ``F_b^T F_b = M_b`` (it is scaled by ``1 / sqrt(N)`` here).
        kernel: ``"structured"`` (Linear, Conv2d, LayerNorm, RMSNorm, GroupNorm and
            Embedding kernels, error on other modules with parameters), ``"generic"``
            (``torch.func``, ``K_a`` materialised) or ``"auto"`` (structured where
            possible, generic elsewhere).
        solve_dtype: dtype of everything after the pullback (Grams, factorisations,
            products with ``K``), e.g. ``torch.float64`` for a float32 model at a small
            damping; default the model's dtype.
        generator: random generator for ``output_metric="sampled"``, on the model's
            device.
        refine: steps of mixed-precision iterative refinement (``layerwise``,
            ``full``, ``natural``; refused with the others): the residual ``g - G x`` in
            float64, its correction with the solve's factor. ``(g - K^T t) / mu`` cancels
            when ``mu`` is tiny against the curvature (residual ``~ eps cond(G)``);
            refinement converges while ``eps(solve_dtype) cond(G) < 1``.
        kfac_damping: ``method="kfac"`` only: ``"exact"`` (``Gamma (x) A + mu I``, in the
            factors' eigenbases) or ``"factored"`` (``(Gamma + pi sqrt(mu) I) (x)
            (A + sqrt(mu) / pi I)``, ``pi`` from the factors' traces, by Cholesky).
        kfac_bias: ``method="kfac"`` only: ``"joint"`` (weight and bias in one Kronecker
            block) or ``"separate"`` (the bias its own block ``Gamma``, damped like the
            weight's ``Gamma``).
        return_diagnostics: also return a list of :class:`LayerDiagnostics`.
        forward_kwargs: keyword arguments of the model call.
        check_coupling: probe, on the first call for a model (and after a change of a
            module's training flag or hooks, a module swapped for another, a parameter
            frozen or unfrozen, another ``kernel``, or other arguments of ``forward`` than
            tensors), that the network treats samples independently and
            that parameters reach the output only through their modules' calls. A path
            chosen by other state (an attribute read in ``forward``, Python's ``random``,
            a global module hook added later) is probed as first taken; a probe that
            saw only zeros (a head initialised at zero) runs again on the next call;
            ``"always"`` probes every call (one more batched backward pass of
            ``2 ceil(log2 N) + 1`` rows; ``pre.backward`` then also runs the forward pass
            again), ``False`` never.
        process_group: a ``torch.distributed`` process group whose every rank calls this
            with its shard of the batch: each gets the direction of the global batch
            (the shards concatenated in rank order), its blocks solved by their owner
            ranks (docs/distributed.md); with ``return_diagnostics``, those of the
            blocks this rank solved.
        timeout: seconds any rank waits in a collective before raising
            :class:`~riemann_core.distributed.DistributedError` (``process_group`` only).

    Returns:
        ``{name: direction}`` for every trainable parameter (names as in
        ``model.named_parameters()``), each of that parameter's shape and dtype. The
        model, its parameters, their ``.grad`` and its buffers (those a module updates as
        it runs are put back) are left untouched.

    Raises:
        ValueError / TypeError: bad options or data, or a network whose direction cannot
            be computed exactly (docs/api.md lists them), naming the module and the fix.
        SolveError: a metric that cannot be factorised, or a solve whose relative
            residual exceeds the bound of its dtype.

    Warns:
        AccuracyWarning: when the model's dtype determines the direction only to a
            worst-case relative error ``eps cond(G)`` above 0.005 at this damping (the
            rows' half precision's ``eps`` under autocast), a Woodbury or dense solve's
            float64 residual bounds its error (``||G x - g|| / (mu ||x||)``) only above 1%
            after refinement, or a Cholesky factorisation needed jitter above a tenth of
            the damping.

    Example:
        >>> import torch, riemann_core as rc
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> d = rc.direction(model, x, y, method="layerwise", damping=1e-2)
        >>> n = rc.direction(model, x, y, method="natural", damping=1e-2)
        >>> bool(torch.allclose(d["weight"], n["weight"]))  # one module: same matrix
        True
    """
    if process_group is not None:
        distributed.check_group(process_group)
    # a bad option on one rank meets the others at the agreement: they would wait it out
    with distributed.share_failure(process_group, timeout):
        distributed.check_timeout(timeout)
        opts = Options.checked(
            method,
            METHODS,
            damping=damping,
            loss=loss,
            output_metric=output_metric,
            samples=samples,
            kernel=kernel,
            solve_dtype=solve_dtype,
            refine=refine,
            kfac_damping=kfac_damping,
            kfac_bias=kfac_bias,
            diagnostics=return_diagnostics,
            generator=generator,
            check_coupling=check_coupling,
        )
        check_autograd()
        if not isinstance(targets, Tensor):
            raise TypeError(
                "targets must be a torch.Tensor (class indices for cross_entropy, values "
                f"for mse), got {type(targets).__name__}"
            )
        checks = Deferred()
        params = check_model(model, checks, unprobed_kernel=unprobed(opts))
        check_damping_fits(opts.damping, params, opts.solve_dtype)
        args, kwargs = forward_arguments(inputs, forward_kwargs)
        check_inputs(args, kwargs, targets, checks)
        check_generator(opts.generator, opts.output_metric, params[0][1].device)
    with reentrant_checkpoint_refused():
        directions, diagnostics = solve(
            model,
            args,
            targets,
            method,
            opts,
            forward_kwargs=kwargs,
            checks=checks,
            process_group=process_group,
            timeout=timeout,
            # the targets' shape beyond the samples (positions of token outputs): ranks
            # whose samples hold other numbers of positions are refused at the agreement,
            # as in pre.step() (found by a hunt: euclidean and kfac weighted each shard by
            # its sequences, N_p / N, where the loss is the mean over every position,
            # 0.47 and 0.40 off)
            passes=(tuple(targets.shape),) if process_group is not None else (),
        )
    # a parameter the forward pass did not reach has a zero gradient, hence direction
    result = {
        name: directions[name].detach().to(p.dtype) if name in directions else torch.zeros_like(p)
        for name, p in params
    }
    return (result, diagnostics) if return_diagnostics else result


def check_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "riemann_core needs autograd, which torch.inference_mode() switches off; "
            "compute the direction outside the inference_mode block"
        )


def solve(
    model,
    inputs,
    targets,
    method: str,
    opts: Options,
    gradient=None,
    *,
    forward_kwargs: dict | None = None,
    checks: Deferred | None = None,
    replay: Replay | None = None,
    state=None,
    process_group: torch.distributed.ProcessGroup | None = None,
    timeout: float = distributed.TIMEOUT,
    global_gradient: bool = False,
    absent: tuple[str, ...] = (),
    passes: tuple[tuple[int, ...], ...] = (),
    found: dict[int, Tensor] | None = None,
):
    """Run ``method``; ``gradient`` (``{name: vector}``) replaces the loss gradient;
    ``state`` is K-FAC's state across a preconditioner's steps (``method="kfac"``).

    Returns ``({name: direction}, diagnostics)`` for the parameters seen in the forward
    pass. Raises before returning anything if a check fails (``checks`` holds those of
    the caller still to be read); ``replay``: see :class:`riemann_core.capture.Replay`.
    With ``process_group``, the direction of the global batch on every rank
    (:func:`riemann_core.distributed.solve`; ``global_gradient``: ``gradient`` is
    already the global batch's; ``absent``: the names whose ``gradient`` entry stands for
    a ``.grad`` this rank lacks, which every rank must lack alike; ``passes``: the output
    shape of each forward pass whose gradient ``gradient`` sums, :mod:`riemann_core.passes`;
    ``found``: the buffers as the replayed pass found them, :func:`distributed.model_state`).
    """
    with distributed.share_failure(process_group, timeout):
        check_autograd()
    checks = Deferred() if checks is None else checks
    devices = {p.device.type for p in model.parameters()}
    devices |= {t.device.type for t in tensors_of((inputs, forward_kwargs))}

    def build():
        return build_problem(
            model,
            inputs,
            targets,
            opts,
            needs_factor=SOLVERS[method].NEEDS_FACTOR,
            gradient=gradient,
            forward_kwargs=forward_kwargs,
            checks=checks,
            replay=replay,
        )

    try:
        return run_solver(
            build,
            method,
            opts,
            checks,
            devices,
            state,
            process_group=process_group,
            timeout=timeout,
            global_gradient=global_gradient,
            absent=absent,
            passes=passes,
            model=model,
            found=found,
        )
    except RuntimeError as err:
        # torch's own words, from a graph freed before this pass (found by a hunt: a cache
        # kept on a module, which the replay's own check names where a record is kept; not
        # another rank's DistributedError, which quotes it)
        if type(err) is not RuntimeError or GRAPH_FREED not in str(err):
            raise
        raise ValueError(
            "the metric's backward pass through the model's forward pass reached an "
            f"autograd graph already freed: the forward pass uses {KEPT_ACROSS_PASSES}"
        ) from err


def run_solver(
    build,
    method: str,
    opts: Options,
    checks: Deferred,
    devices: set[str],
    state=None,
    *,
    process_group: torch.distributed.ProcessGroup | None = None,
    timeout: float = distributed.TIMEOUT,
    global_gradient: bool = False,
    absent: tuple[str, ...] = (),
    passes: tuple[tuple[int, ...], ...] = (),
    model: torch.nn.Module | None = None,
    found: dict[int, Tensor] | None = None,
):
    """``build()`` a :class:`Problem`, solve it with ``method`` (``state``: K-FAC's across
    a preconditioner's steps; ``process_group``: see :func:`solve`, ``model`` its network
    and ``found`` its buffers)
    and check the solves, in full float32 precision on ``devices``. Returns ``({name: direction}, diagnostics)``
    for the parameters seen in the forward pass; on an error, the pending ``checks`` are
    read first (a failing check of the data explains the error better)."""
    extra = () if state is None else (state, checks)

    def checked_build():
        try:
            return build()
        except Exception:
            checks.run()
            raise

    with full_precision(devices):
        if process_group is not None:
            return distributed.solve(
                checked_build,
                method,
                opts,
                checks,
                process_group,
                timeout=timeout,
                global_gradient=global_gradient,
                absent=absent,
                passes=passes,
                model=model,
                found=found,
            )
        problem = checked_build()
        with named_when_too_large(problem, method):
            try:
                solves = SOLVERS[method].solve(problem, opts, *extra)
            except Exception:
                checks.run()
                raise
            per_block, diagnostics = finish(problem, solves, opts, checks, method)
    directions = {
        name: x
        for block, dirs in zip(problem.blocks, per_block, strict=True)
        for name, x in zip(block.param_names, dirs, strict=True)
    }
    return directions, diagnostics
