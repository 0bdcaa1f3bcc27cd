"""``direction``: the preconditioned direction ``G^{-1} g`` of any method, side-effect free."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import all_finite, check_inputs, check_model
from .factors import FactorFn
from .methods import METHODS, SOLVERS, LayerDiagnostics, Options, build_problem


def direction(
    model: nn.Module,
    inputs: Tensor,
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
) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[LayerDiagnostics]]:
    """``G^{-1} g`` for the mean loss's gradient ``g`` on the batch ``(inputs, targets)``.

    ``G`` depends on ``method`` (see ``rc.METHODS``): ``euclidean`` ``I``; ``layerwise``
    ``mu I + K_a^T K_a`` per module (block-diagonal damped GGN, Woodbury per block);
    ``full`` ``mu I + K^T K`` dense; ``natural`` the same matrix through a data-space
    Woodbury solve; ``kfac`` ``Gamma_a (x) A_a + mu I`` per module. ``K_a = L_a B_a``
    is the output-metric factor pulled back to module ``a`` times its parameter
    Jacobian, and ``mu = damping``.

    Args:
        loss: ``"cross_entropy"`` (class-index targets) or ``"mse"``; the gradient is
            that of ``F.cross_entropy`` / ``F.mse_loss`` with ``reduction="mean"``.
        output_metric: ``"exact"`` (softmax Fisher / MSE Hessian), ``"sampled"``
            (``samples`` Monte Carlo probes per sample) or a callable
            ``(outputs, targets) -> (N, r, C)`` returning a per-sample factor ``F_b``
            with ``F_b^T F_b = M_b`` (it is scaled by ``1 / sqrt(N)`` here).
        kernel: ``"structured"`` (Linear / Conv2d kernels, error on other modules with
            parameters), ``"generic"`` (``torch.func``, ``K_a`` materialised) or
            ``"auto"`` (structured where possible, generic elsewhere).
        solve_dtype: dtype of the inner factorisations (e.g. ``torch.float64`` for a
            float32 model with a small damping); default the model's dtype.
        generator: random generator for ``output_metric="sampled"``.
        refine: steps of iterative refinement of the Woodbury solves (``layerwise``,
            ``natural``). ``(g - K^T t) / mu`` cancels when ``mu`` is tiny against the
            curvature (relative residual ``~ eps / mu``); one step restores a
            backward-stable solve for two more products with ``K`` per block.
        kfac_damping: ``method="kfac"`` only: ``"exact"`` (``Gamma (x) A + mu I``, in the
            factors' eigenbases) or ``"factored"`` (``(Gamma + pi sqrt(mu) I) (x)
            (A + sqrt(mu) / pi I)``, ``pi`` from the factors' traces, by Cholesky).
        kfac_bias: ``method="kfac"`` only: ``"joint"`` (weight and bias in one Kronecker
            block) or ``"separate"`` (the bias its own block ``Gamma``, damped like the
            weight's ``Gamma``).
        return_diagnostics: also return a list of :class:`LayerDiagnostics`.

    Returns:
        ``{name: direction}`` for every trainable parameter (names as in
        ``model.named_parameters()``), each of that parameter's shape and dtype. The
        model, its parameters and their ``.grad`` are left untouched.

    Example:
        >>> import torch, riemann_core as rc
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> d = rc.direction(model, x, y, method="layerwise", damping=1e-2)
        >>> n = rc.direction(model, x, y, method="natural", damping=1e-2)
        >>> bool(torch.allclose(d["weight"], n["weight"]))  # one module: same matrix
        True
    """
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
    )
    params = check_model(model)
    check_inputs(inputs, targets)
    directions, diagnostics = solve(model, inputs, targets, method, opts)
    # a parameter the forward pass did not reach has a zero gradient, hence direction
    result = {
        name: directions[name].detach().to(p.dtype) if name in directions else torch.zeros_like(p)
        for name, p in params
    }
    return (result, diagnostics) if return_diagnostics else result


def solve(model, inputs, targets, method: str, opts: Options, gradient=None, state=None):
    """Run ``method``; ``gradient`` (``{name: vector}``) replaces the loss gradient;
    ``state`` is K-FAC's state across a preconditioner's steps (``method="kfac"``).

    Returns ``({name: direction}, diagnostics)`` for the parameters seen in the forward
    pass. Raises before returning anything if a direction is not finite.
    """
    solver = SOLVERS[method]
    problem = build_problem(
        model, inputs, targets, opts, needs_factor=solver.NEEDS_FACTOR, gradient=gradient
    )
    extra = () if state is None else (state,)
    per_block, diagnostics = solver.solve(problem, opts, *extra)
    directions = {
        name: x
        for block, dirs in zip(problem.blocks, per_block, strict=True)
        for name, x in zip(block.param_names, dirs, strict=True)
    }
    check_directions(method, directions)
    return directions, diagnostics


def check_directions(method: str, directions: dict[str, Tensor]) -> None:
    """Raise :class:`FloatingPointError` if a direction is not finite."""
    for name, x in directions.items():
        if not all_finite(x):
            raise FloatingPointError(
                f"method={method!r} produced a non-finite direction for {name!r}; "
                "increase the damping or pass solve_dtype=torch.float64"
            )
