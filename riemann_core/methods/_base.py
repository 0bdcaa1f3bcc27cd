"""What every method shares: the forward capture, the gradient, the pulled-back factor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_outputs
from ..factors import FactorFn, output_factor, pullback
from ..modules import Block, Handler, handler_for


@dataclass(frozen=True)
class Options:
    damping: float
    loss: str = "cross_entropy"
    output_metric: str | FactorFn = "exact"
    samples: int = 1
    kernel: str = "structured"
    solve_dtype: torch.dtype | None = None
    diagnostics: bool = False
    generator: torch.Generator | None = None


@dataclass
class LayerDiagnostics:
    """What one solve did. ``name`` is the block's module name (``"(all)"`` for a
    whole-network solve); ``rows`` the factor rows ``d``; ``params`` the unknowns;
    ``condition`` the 2-norm condition number of the factorised matrix (for Woodbury
    solves the damped ``d x d`` Gram); ``residual`` ``||G x - v|| / ||v||`` of the
    whole metric; ``jitter`` added to its diagonal; ``update_norm`` ``||x||``."""

    name: str
    method: str
    kernel: str
    rows: int
    params: int
    condition: float
    residual: float
    jitter: float
    update_norm: float


@dataclass
class Problem:
    """A batch seen by the network, ready for any method.

    ``gradient[i]`` lists the vectors to precondition for ``blocks[i]`` (by default
    the mean loss's gradient), in the order of ``blocks[i].params``.
    """

    blocks: list[Block]
    gradient: list[list[Tensor]]
    handlers: list[Handler] = field(default_factory=list)


def capture_blocks(model: nn.Module, run: Callable[[], Tensor]) -> tuple[Tensor, list[Block]]:
    """Run ``run()`` (a forward pass of ``model``) recording each block's call."""
    blocks: dict[str, Block] = {}
    hooks = []

    def recorder(name, module, own):
        def hook(mod, args, output):
            if name in blocks:
                raise ValueError(
                    f"module {name!r} was called twice in one forward pass; shared modules "
                    "(weight tying) are not supported: give each call its own module"
                )
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"module {name!r} ({type(mod).__name__}) returns {type(output).__name__}, "
                    "not a tensor; only modules with a single tensor output are supported"
                )
            inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            blocks[name] = Block(
                name=name,
                module=mod,
                param_names=[f"{name}.{n}" if name else n for n, _ in own],
                params=[p for _, p in own],
                inputs=inputs,
                output=output,
            )

        return hook

    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            hooks.append(module.register_forward_hook(recorder(name, module, own)))
    try:
        with torch.enable_grad():
            try:
                outputs = run()
            except (RuntimeError, IndexError) as err:
                raise ValueError(
                    f"the model's forward pass failed on these inputs: {err}. Check that the "
                    "inputs have the shape and dtype the model expects"
                ) from err
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(outputs, Tensor):
        raise ValueError(f"the model must return a tensor of outputs, got {type(outputs).__name__}")
    return outputs, list(blocks.values())


def mean_loss(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """The mean loss as torch defines it (``reduction="mean"``)."""
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets.long())
    return F.mse_loss(outputs, targets)


def build_problem(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    opts: Options,
    *,
    needs_factor: bool,
    gradient: dict[str, Tensor] | None = None,
) -> Problem:
    """Forward pass, the loss gradient (unless ``gradient`` maps parameter names to the
    vectors to precondition) and, if needed, the pulled-back factor. ``targets`` may be
    ``None`` when ``gradient`` is given (they then reach only a custom output metric).

    Uses ``torch.autograd.grad`` throughout, so no ``.grad`` is touched.
    """
    outputs, blocks = capture_blocks(model, lambda: model(inputs))
    if targets is not None:
        check_outputs(outputs, targets, opts.loss)
    if gradient is None:
        loss = mean_loss(outputs, targets, opts.loss)
        params = [p for b in blocks for p in b.params]
        flat = torch.autograd.grad(loss, params, retain_graph=needs_factor, allow_unused=True)
        gradient = {
            name: torch.zeros_like(p) if g is None else g
            for name, p, g in zip((n for b in blocks for n in b.param_names), params, flat,
                                  strict=True)
        }
    gradient = [[gradient[n] for n in b.param_names] for b in blocks]
    problem = Problem(blocks, gradient)
    if needs_factor:
        z = outputs.reshape(outputs.shape[0], -1)
        factor = output_factor(
            z.detach(), targets, loss=opts.loss, output_metric=opts.output_metric,
            samples=opts.samples, generator=opts.generator,
        )
        deltas = pullback(z, factor, [b.output for b in blocks])
        for b, delta in zip(blocks, deltas, strict=True):
            b.delta = delta.detach()
            b.output = None  # release the graph
        problem.handlers = [handler_for(b, opts.kernel) for b in blocks]
    return problem


def norm(tensors: list[Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def woodbury_diagnostics(name, method, opts: Options, solver, v, x, *, kernel, params):
    """Diagnostics of a Woodbury solve ``x = (mu I + K^T K)^{-1} v`` (costs one more
    product pair with ``K`` and an eigendecomposition of the ``d x d`` Gram)."""
    v_list = [v] if isinstance(v, Tensor) else v
    x_list = [x] if isinstance(x, Tensor) else x
    Gx = solver.K_tmv(solver.K_mv(x))
    Gx = [Gx] if isinstance(Gx, Tensor) else Gx
    residual = norm([opts.damping * a + b - c for a, b, c in zip(x_list, Gx, v_list, strict=True)])
    L = solver.inner.factor
    eigs = torch.linalg.eigvalsh(L @ L.T)
    return LayerDiagnostics(
        name=name, method=method, kernel=kernel, rows=L.shape[0], params=params,
        condition=float(eigs[-1] / eigs[0]), residual=residual / max(norm(v_list), 1e-300),
        jitter=solver.inner.jitter, update_norm=norm(x_list),
    )
