"""``RiemannianPreconditioner``: turn ``.grad`` into ``G^{-1} .grad`` beside any optimizer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_finite, check_model, check_refresh
from .direction import check_directions, solve
from .factors import FactorFn
from .methods import METHODS, LayerDiagnostics, Options
from .methods.kfac import KFACState


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

    K-FAC as optimisers run it (``method="kfac"`` only): ``kfac_refresh=k`` refreshes
    the factorisations every ``k`` steps and reuses them in between, where a step then
    costs two products per block and no forward pass; ``kfac_decay=beta`` keeps running
    averages of the factors, ``F <- beta F + (1 - beta) F_batch``, updated every step
    (which then needs the forward pass and the pullback again).
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
        kfac_damping: str = "exact",
        kfac_bias: str = "joint",
        kfac_refresh: int = 1,
        kfac_decay: float = 0.0,
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
            kfac_damping=kfac_damping,
            kfac_bias=kfac_bias,
            diagnostics=diagnostics,
            generator=generator,
        )
        self._kfac = _kfac_state(method, kfac_refresh, kfac_decay)
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
            if self._kfac is not None and not self._kfac.needs_factors(gradient):
                directions, diagnostics = self._kfac.reuse(gradient, self.options)
                check_directions(self.method, directions)
            else:
                directions, diagnostics = solve(
                    self.model,
                    self._inputs,
                    None,
                    self.method,
                    self.options,
                    gradient=gradient,
                    state=self._kfac,
                )
        except BaseException:
            if self._kfac is not None:
                self._kfac.discard()
            raise
        finally:
            self._stepping = False
        for name, p in with_grad:  # every direction exists before any .grad changes
            if name in directions:
                p.grad.copy_(directions[name])
        self.diagnostics = diagnostics
        if self._kfac is not None:
            self._kfac.commit()

    def remove(self) -> None:
        """Detach the forward pre-hook from the model."""
        self._hook.remove()

    def __enter__(self) -> RiemannianPreconditioner:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _kfac_state(method: str, refresh, decay) -> KFACState | None:
    """K-FAC's state across steps, when ``kfac_refresh`` or ``kfac_decay`` asks for one."""
    check_refresh(refresh, decay)
    if refresh == 1 and decay == 0:
        return None
    if method != "kfac":
        raise ValueError(
            f"kfac_refresh and kfac_decay are options of method='kfac', not of "
            f"method={method!r}; drop them, or pass method='kfac'"
        )
    return KFACState(refresh, decay)
