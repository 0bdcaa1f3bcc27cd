"""What every method shares: the forward capture, the gradient, the pulled-back factor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import KFAC_OPTIONS, check_kfac_options, check_options, check_outputs
from ..factors import FactorFn, factor_cotangents, output_factor, pullback
from ..modules import Block, Handler, PatchHandler, handler_for


@dataclass(frozen=True)
class Options:
    """The options of ``rc.direction`` after validation (see :meth:`checked`)."""

    damping: float
    loss: str = "cross_entropy"
    output_metric: str | FactorFn = "exact"
    samples: int = 1
    kernel: str = "structured"
    solve_dtype: torch.dtype | None = None
    diagnostics: bool = False
    generator: torch.Generator | None = None
    refine: int = 0
    kfac_damping: str = "exact"
    kfac_bias: str = "joint"

    @classmethod
    def checked(cls, method: str, methods, **options) -> Options:
        """Validate ``method`` and ``options`` (naming any bad one and its fix)."""
        unchecked = ("diagnostics", "generator", *KFAC_OPTIONS)
        check_options(
            method=method,
            methods=methods,
            **{k: v for k, v in options.items() if k not in unchecked},
        )
        check_kfac_options(method, **{k: options[k] for k in KFAC_OPTIONS if k in options})
        return cls(**{**options, "damping": float(options["damping"])})


@dataclass
class LayerDiagnostics:
    """What one solve did. ``name`` is the block's module name (``"(all)"`` for a
    whole-network solve); ``rows`` the factor rows ``d``; ``params`` the unknowns;
    ``solver`` the algebra used (``"woodbury"``: the damped ``d x d`` Gram;
    ``"dense"``: the ``n x n`` metric; ``"kronecker"``: K-FAC eigenbases);
    ``condition`` the 2-norm condition number of the factorised matrix; ``residual``
    ``||G x - v|| / ||v||`` of the whole metric; ``jitter`` added to its diagonal;
    ``update_norm`` ``||x||``."""

    name: str
    method: str
    kernel: str
    solver: str
    rows: int
    params: int
    condition: float
    residual: float
    jitter: float
    update_norm: float


class Problem:
    """A batch seen by the network, ready for any method.

    ``gradient[i]`` lists the vectors to precondition for ``blocks[i]``, in the order of
    ``blocks[i].params``. When they are the mean loss's gradient, ``output_grads[i]`` is
    ``Lambda_a``, that gradient at the block's output; for 2-D Linear blocks
    ``g = Lambda^T Xt`` is then never needed as such (see :meth:`K_gradient`).
    """

    def __init__(self, blocks, handlers=(), gradient=None, output_grads=None):
        self.blocks: list[Block] = blocks
        self.handlers: list[Handler] = list(handlers)
        self.output_grads: list[Tensor] | None = output_grads
        self._gradient: list[list[Tensor] | None] = gradient or [None] * len(blocks)

    @property
    def gradient(self) -> list[list[Tensor]]:
        return [self.gradient_of(i) for i in range(len(self.blocks))]

    def gradient_of(self, i: int) -> list[Tensor]:
        """``blocks[i]``'s vectors, formed from ``Lambda`` on first use."""
        if self._gradient[i] is None:
            self._gradient[i] = self.handlers[i].gradient_from_output(self.output_grads[i])
        return self._gradient[i]

    def _factored(self, i: int) -> bool:
        return self.output_grads is not None and self.handlers[i].factored_gradient

    def K_gradient(self, i: int) -> Tensor:
        """``K_a g_a`` (``d``), through ``Lambda_a`` where the handler can."""
        if self._factored(i):
            return self.handlers[i].K_mv_output_grad(self.output_grads[i])
        return self.handlers[i].K_mv(self.gradient_of(i))

    def gradient_minus_K_tmv(self, i: int, t: Tensor, scale: float = 1.0) -> list[Tensor]:
        """``scale (g_a - K_a^T t)``; one GEMM ``(scale (Lambda - U))^T Xt`` where the
        handler can (the scale then touches ``N x f_out`` entries, not ``n_a``)."""
        if self._factored(i):
            return self.handlers[i].output_grad_minus_K_tmv(self.output_grads[i], t, scale)
        Kt = self.handlers[i].K_tmv(t)
        return [(g - k) * scale for g, k in zip(self.gradient_of(i), Kt, strict=True)]


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


def _check_reached(model, blocks, outputs, targets, opts, gradient) -> None:
    """Refuse trainable parameters that the loss depends on but whose module was not
    called (``F.linear(h, self.emb.weight)``: tying through a functional call), since no
    kernel sees them; parameters that take no part at all get a zero direction."""
    seen = {id(p) for b in blocks for p in b.params}
    unreached = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen
    ]
    if not unreached:
        return
    if gradient is not None:
        used = [n for n, _ in unreached if n in gradient and bool(gradient[n].ne(0).any())]
    else:
        grads = torch.autograd.grad(
            mean_loss(outputs, targets, opts.loss),
            [p for _, p in unreached],
            retain_graph=True,
            allow_unused=True,
        )
        used = [n for (n, _), g in zip(unreached, grads, strict=True) if g is not None]
    if used:
        raise ValueError(
            f"parameters {used} enter the loss without their module being called (e.g. weight "
            "tying through F.linear); no kernel sees them. Call the owning module, or freeze "
            "them with requires_grad_(False)"
        )


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

    With the factor, the loss gradient at the network output rides along as one more
    cotangent row of the pullback, which yields ``Lambda_a`` at every block output.
    Uses ``torch.autograd.grad`` throughout, so no ``.grad`` is touched; runs with
    gradients enabled even when called under ``torch.no_grad()``.
    """
    with torch.enable_grad():
        return _build_problem(model, inputs, targets, opts, needs_factor, gradient)


def _build_problem(model, inputs, targets, opts, needs_factor, gradient) -> Problem:
    outputs, blocks = capture_blocks(model, lambda: model(inputs))
    check_outputs(outputs, targets, opts.loss)
    for b in blocks:
        if b.output.shape[:1] != outputs.shape[:1]:
            raise ValueError(
                f"module {b.name!r} returns shape {tuple(b.output.shape)}, whose first dimension "
                f"is not the batch of {outputs.shape[0]} samples; the metrics need every module "
                "with parameters to map samples along dimension 0 (no reshaping of the batch "
                "into other dimensions around it)"
            )
    if not blocks:
        raise ValueError(
            "no module with trainable parameters took part in the forward pass; "
            "nothing to precondition"
        )
    _check_reached(model, blocks, outputs, targets, opts, gradient)
    given = None if gradient is None else [[gradient[n] for n in b.param_names] for b in blocks]
    if not needs_factor:
        if given is None:
            params = [p for b in blocks for p in b.params]
            flat = torch.autograd.grad(
                mean_loss(outputs, targets, opts.loss), params, allow_unused=True
            )
            flat = [
                torch.zeros_like(p) if g is None else g for g, p in zip(flat, params, strict=True)
            ]
            given = [[flat.pop(0) for _ in b.params] for b in blocks]
        return Problem(blocks, gradient=given)

    z = outputs.reshape(outputs.shape[0], -1)
    factor = output_factor(
        z.detach(),
        targets,
        loss=opts.loss,
        output_metric=opts.output_metric,
        samples=opts.samples,
        generator=opts.generator,
    )
    cotangents = factor_cotangents(factor)
    if given is None:
        loss = mean_loss(z.view_as(outputs), targets, opts.loss)
        (dz,) = torch.autograd.grad(loss, z, retain_graph=True)
        cotangents = torch.cat([dz[None].detach(), cotangents])
    rows = pullback(z, cotangents, [b.output for b in blocks])
    output_grads = None
    if given is None:
        output_grads = [r[0] for r in rows]
        rows = [r[1:] for r in rows]
    for b, delta in zip(blocks, rows, strict=True):
        b.delta = delta
    problem = Problem(blocks, [handler_for(b, opts.kernel) for b in blocks], given, output_grads)
    if given is None:  # blocks without the layer structure need g now, while the graph lives
        for i, (b, h) in enumerate(zip(blocks, problem.handlers, strict=True)):
            if not isinstance(h, PatchHandler):
                problem._gradient[i] = list(
                    torch.autograd.grad(b.output, b.params, output_grads[i], retain_graph=True)
                )
    for b in blocks:
        b.output = None  # release the graph
    return problem


def norm(tensors: list[Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def solve_diagnostics(name, method, kernel, solver, *, rows, params, chol, v, x, Gx):
    """Diagnostics of one solve ``x = G^{-1} v`` given ``Gx = G x`` (lists of tensors).

    The condition number is that of the factorised matrix ``L L^T`` (an extra
    eigendecomposition: diagnostics cost about one more factorisation).
    """
    residual = norm([a - b for a, b in zip(Gx, v, strict=True)]) / max(norm(v), 1e-300)
    L = chol.factor
    eigs = torch.linalg.eigvalsh(L @ L.mT)
    return LayerDiagnostics(
        name=name,
        method=method,
        kernel=kernel,
        solver=solver,
        rows=rows,
        params=params,
        condition=float(eigs[-1] / eigs[0]),
        residual=residual,
        jitter=chol.jitter,
        update_norm=norm(x),
    )
