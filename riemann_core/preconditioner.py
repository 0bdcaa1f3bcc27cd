"""``RiemannianPreconditioner``: turn ``.grad`` into ``G^{-1} .grad`` beside any optimizer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_finite, check_model
from .direction import solve
from .factors import FactorFn
from .methods import METHODS, LayerDiagnostics, Options


class RiemannianPreconditioner:
    """Precondition a model's gradients with one of ``rc.METHODS``::

        pre = rc.RiemannianPreconditioner(model, method="layerwise", damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = model(x); F.cross_entropy(out, y).backward(); pre.step(); opt.step()

    ``step()`` replaces each trainable parameter's ``.grad`` by ``G^{-1} .grad``, where
    ``G`` is the metric at the batch of the model's last forward pass (recorded by a
    forward pre-hook; ``step`` runs one more forward pass on it, so with dropout the
    metric sees other masks). The ``.grad`` may come from any loss; the metric is that
    of ``loss`` (it needs no targets: a custom ``output_metric`` receives ``None``).
    On any error ``.grad`` is left as it was. Options are those of ``rc.direction``;
    with ``diagnostics=True`` each step's :class:`LayerDiagnostics` are kept in
    ``.diagnostics``. Call ``remove()`` (or use ``with``) to detach the hook.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str = "layerwise",
        damping: float = 1e-3,
        loss: str = "cross_entropy",
        output_metric: str | FactorFn = "exact",
        samples: int = 1,
        kernel: str = "structured",
        solve_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        refine: int = 0,
        diagnostics: bool = False,
    ):
        self.options = Options.checked(
            method,
            METHODS,
            damping=damping,
            loss=loss,
            output_metric=output_metric,
            samples=samples,
            kernel=kernel,
            solve_dtype=solve_dtype,
            refine=refine,
            diagnostics=diagnostics,
            generator=generator,
        )
        check_model(model)
        self.model = model
        self.method = method
        self.diagnostics: list[LayerDiagnostics] = []
        self._inputs: Tensor | None = None
        self._stepping = False
        self._hook = model.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        if not self._stepping and args and isinstance(args[0], Tensor):
            self._inputs = args[0].detach()

    @torch.no_grad()
    def step(self) -> None:
        """Replace every trainable ``.grad`` by the preconditioned direction."""
        if self._inputs is None:
            raise RuntimeError(
                "pre.step() needs the batch of a forward pass: call model(x) and "
                "loss.backward() before pre.step()"
            )
        params = check_model(self.model)
        with_grad = [(n, p) for n, p in params if p.grad is not None]
        if not with_grad:
            raise RuntimeError("no parameter has a .grad; call loss.backward() before pre.step()")
        for name, p in with_grad:
            check_finite(f"the .grad of {name!r}", p.grad, "the loss or its backward overflowed")
        # a parameter without .grad took no part in the loss: a zero vector, left as None
        gradient = {
            n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in params
        }
        self._stepping = True
        try:
            directions, diagnostics = solve(
                self.model, self._inputs, None, self.method, self.options, gradient=gradient
            )
        finally:
            self._stepping = False
        for name, p in with_grad:  # every direction exists before any .grad changes
            if name in directions:
                p.grad.copy_(directions[name])
        self.diagnostics = diagnostics

    def remove(self) -> None:
        """Detach the forward pre-hook from the model."""
        self._hook.remove()

    def __enter__(self) -> RiemannianPreconditioner:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
