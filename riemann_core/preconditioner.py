"""``RiemannianPreconditioner``: turn ``.grad`` into ``G^{-1} .grad`` beside any optimizer."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree

from . import distributed
from ._checks import Deferred, check_generator, check_model, check_refresh, tensors_of
from .capture import capturing, rng_devices, rng_state
from .direction import solve
from .factors import FactorFn
from .methods import METHODS, LayerDiagnostics, Options
from .methods.kfac import KFACState


class RiemannianPreconditioner:
    """Precondition a model's gradients with one of ``rc.METHODS``::

        pre = rc.RiemannianPreconditioner(model, method="layerwise", damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = model(x); F.cross_entropy(out, y).backward(); pre.step(); opt.step()

    ``step()`` replaces each trainable parameter's ``.grad`` by ``G^{-1} .grad``, where
    ``G`` is the metric at the batch of the model's last forward pass: a forward
    pre-hook records its positional and keyword arguments and the random state, and
    ``step`` runs one more forward pass on them from that state, so that dropout draws
    the masks the gradient was computed with (the metric is that of the same network).
    Call it between ``loss.backward()`` and ``opt.step()``: a parameter or an input
    changed in place since the forward pass is refused.
    The ``.grad`` may come from any loss; the metric is that of ``loss`` (it needs no
    targets: a custom ``output_metric`` receives ``None``). On any error ``.grad`` is
    left as it was. Options are those of ``rc.direction``; with ``diagnostics=True``
    each step's :class:`LayerDiagnostics` are kept in ``.diagnostics``. Call
    ``remove()`` (or use ``with``) to detach the hook.

    K-FAC as optimisers run it (``method="kfac"`` only): ``kfac_refresh=k`` refreshes
    the factorisations every ``k`` steps and reuses them in between, where a step then
    costs two products per block and no forward pass; ``kfac_decay=beta`` keeps running
    averages of the factors, ``F <- beta F + (1 - beta) F_batch``, updated every step
    (which then needs the forward pass and the pullback again). The state changes only
    when a step succeeds.

    Data-parallel training (docs/distributed.md): with ``process_group``, every rank
    calls ``step()`` after a forward pass on its shard, and every rank's ``.grad`` becomes
    the direction of the global batch (the shards in rank order), each block solved by
    its owner rank. The gradient of the global batch is ``sum_p (N_p / N) g_p`` of the
    ranks' ``.grad`` (each the mean loss's over its shard), or, for a model wrapped in
    ``DistributedDataParallel``, the ``.grad`` it averaged. A failure on any rank makes
    every rank raise, ``.grad`` untouched; ``timeout`` bounds every wait (seconds).
    K-FAC's ``kfac_refresh`` and ``kfac_decay`` are refused with a ``process_group``.
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
        check_coupling: bool = True,
        process_group: torch.distributed.ProcessGroup | None = None,
        timeout: float = distributed.TIMEOUT,
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
            check_coupling=check_coupling,
        )
        self._kfac = _kfac_state(method, kfac_refresh, kfac_decay)
        if process_group is not None:
            distributed.check_group(process_group, timeout)
            _check_distributed_kfac(self._kfac)
        # DistributedDataParallel's forward expects its own backward: solve on its module
        self.network = model.module if isinstance(model, DistributedDataParallel) else model
        check_model(self.network)
        self.model = model
        self.method = method
        self.process_group, self.timeout = process_group, timeout
        self.diagnostics: list[LayerDiagnostics] = []
        self._batch: tuple[tuple, dict, list[Tensor]] | None = None
        self._versions: list[tuple[str, Tensor, int]] = []
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if capturing():  # riemann_core's own forward passes are not the user's batch
            return
        args, kwargs = pytree.tree_map(
            lambda a: a.detach() if isinstance(a, Tensor) else a, (args, kwargs)
        )
        self._batch = (args, kwargs, rng_state(rng_devices(self.model)))
        # what step() relies on: the batch and the parameters as the forward pass saw them
        inputs = [("an input of the forward pass", t) for t in tensors_of((args, kwargs))]
        params = [(f"parameter {n!r}", p) for n, p in self.model.named_parameters()]
        self._versions = [(what, t, t._version) for what, t in inputs + params]

    def _check_unchanged(self) -> None:
        for what, t, version in self._versions:
            if t._version != version:
                raise RuntimeError(
                    f"{what} changed in place after the forward pass that pre.step() uses "
                    "(an optimizer step, or a new batch copied into the same tensor): call "
                    "pre.step() between loss.backward() and opt.step(), before the inputs "
                    "change"
                )

    @torch.no_grad()
    def step(self) -> None:
        """Replace every trainable ``.grad`` by the preconditioned direction."""
        with distributed.share_failure(self.process_group, self.timeout):
            if self._batch is None:
                raise RuntimeError(
                    "pre.step() needs the batch of a forward pass: call model(x) and "
                    "loss.backward() before pre.step()"
                )
            self._check_unchanged()
            checks = Deferred()
            params = check_model(self.network, checks)
            with_grad = [(n, p) for n, p in params if p.grad is not None]
            if not with_grad:
                raise RuntimeError(
                    "no parameter has a .grad; call loss.backward() before pre.step()"
                )
            device = params[0][1].device
            check_generator(self.options.generator, self.options.output_metric, device)
            for name, p in with_grad:
                checks.finite(
                    f"the .grad of {name!r}", p.grad, "the loss or its backward overflowed"
                )
        # a parameter without .grad took no part in the loss: a zero vector, left as None
        gradient = {
            n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in params
        }
        try:
            if self._kfac is not None and not self._kfac.needs_factors(gradient):
                directions, diagnostics = self._kfac.reuse(gradient, self.options, checks)
            else:
                args, kwargs, state = self._batch
                directions, diagnostics = solve(
                    self.network,
                    args,
                    None,
                    self.method,
                    self.options,
                    gradient=gradient,
                    forward_kwargs=kwargs,
                    checks=checks,
                    replay=state,
                    state=self._kfac,
                    process_group=self.process_group,
                    timeout=self.timeout,
                    global_gradient=isinstance(self.model, DistributedDataParallel),
                )
        except BaseException:
            if self._kfac is not None:
                self._kfac.discard()
            raise
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


def _check_distributed_kfac(state: KFACState | None) -> None:
    """K-FAC's state across steps lives with the factors; over a process group they are
    the owners' and are formed afresh at each step, so the state is not kept there."""
    if state is not None:
        raise ValueError(
            "kfac_refresh and kfac_decay are not supported with process_group: every "
            "data-parallel step all-reduces and factorises the factors of its own global "
            "batch; drop kfac_refresh and kfac_decay (or the process_group)"
        )
