"""``RiemannianPreconditioner``: turn gradients into ``G^{-1} g`` beside any optimizer."""

from __future__ import annotations

import bisect
import contextlib
import functools
import random
import sys
import weakref
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parameter import is_lazy
from torch.utils import _pytree as pytree

from . import coupling, distributed
from ._checks import (
    OVERFLOW_FIX,
    PARAMETER_FIX,
    Deferred,
    DirectionOverflow,
    GradientOverflow,
    call_tensors,
    check_classes_last,
    check_damping,
    check_damping_fits,
    check_generator,
    check_inputs,
    check_model,
    check_no_frequency_scaling,
    check_one_output,
    check_refresh,
    check_samples_taken,
    classes_along_positions,
    reads_softmax_fisher,
    tensors_of,
    unprobed,
)
from ._precision import precision_state
from ._warn import HookWarning, warn
from .capture import (
    KEPT_ACROSS_PASSES,
    MODEL_OUTPUT,
    MODULE_HOOK_NODE,
    BufferStart,
    BufferStates,
    Capture,
    OwnHook,
    Replay,
    ReplayDiffers,
    autocast_state,
    backward_hooked,
    buffers_kept,
    calls_under_way,
    capturing,
    cast_of_leaves,
    compiled_frames,
    eager_when_traced,
    hooked_after,
    hooked_before,
    hooks_mark,
    hooks_registered,
    moved_since,
    notes_for,
    ours,
    placement,
    raising_since,
    reaches_pass,
    recomputes,
    rng_devices,
    rng_state,
    sequence_now,
    some,
    tracked_ids,
    version_of,
)
from .direction import check_autograd, run_solver, solve
from .factors import FactorFn, reentrant_checkpoint_refused
from .methods import (
    METHODS,
    SOLVERS,
    LayerDiagnostics,
    Options,
    kfac_checkpoint,
    problem_from_graph,
)
from .methods._base import check_batch_dimension, check_output_batch, group_calls, marked_model
from .methods.kfac import KFACState, in_larger_storage
from .modules import (
    Block,
    check_kronecker,
    evaluated_per_sample,
    own_parameters,
    replayed_attributes,
    shows_parameters,
    training,
)
from .passes import (
    Accumulations,
    Differentiated,
    Passes,
    accumulate_hooks_on,
    user_hook_ids,
    user_hooks_on,
)


class RiemannianPreconditioner:
    """Precondition a model's gradients with one of ``rc.METHODS``::

        pre = rc.RiemannianPreconditioner(model, method="layerwise", damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad(); pre.backward(F.cross_entropy(model(x), y)); opt.step()

    ``backward(loss)`` replaces ``loss.backward()``: one backward pass through the graph of
    the model's own forward pass carries the loss gradient and the metric's factor rows
    together, and each trainable parameter's ``.grad`` receives ``G^{-1} g`` instead of
    ``g`` (no second forward pass; dropout's masks are those of the step).

    ``step()`` preconditions a ``.grad`` already there, from any loss::

        out = model(x); F.cross_entropy(out, y).backward(); pre.step(); opt.step()

    replacing each ``.grad`` by ``G^{-1} .grad``, where ``G`` is the metric at the batch of
    the model's last forward pass with gradients enabled, the one ``loss.backward()`` went
    through (a later pass outside ``torch.no_grad()``, an evaluation, is refused: its
    batch is not the gradient's): a forward pre-hook records its positional and keyword
    arguments, the random state, the buffers, Python's ``random`` state and the modules'
    plain attributes, and ``step`` runs one more forward pass on them from that state, so
    that dropout draws the masks the gradient was computed with (and a module that updates
    its buffers or attributes as it runs, an observer, a call counter, starts from the same
    ones; the current ones are put back after). Call it between ``loss.backward()`` and
    ``opt.step()``: a parameter or an input changed in place since the forward pass is
    refused, and so is a pass run again whose output is not the recorded one (beyond
    rounding): its path depended on state that is not replayed, such as a global or a
    counter kept in an object that is not a module.

    Either way the metric is that of ``loss`` (it needs no targets: a custom
    ``output_metric`` receives ``None``), and on any error ``.grad`` is left as it was.
    Options are those of ``rc.direction``; with ``diagnostics=True`` each step's
    :class:`LayerDiagnostics` are kept in ``.diagnostics``. Call ``remove()`` (or use
    ``with``) to detach the hooks; a preconditioner no longer referenced is collected
    and its hooks detached too (the model holds it weakly).

    K-FAC as optimisers run it (``method="kfac"`` only): ``kfac_refresh=k`` refreshes
    the factorisations every ``k`` steps and reuses them in between, where a step then
    costs two products per block and no forward pass (in its place, the trainable
    parameters' data is compared with the pass's: an update written by hand through
    ``.data`` before ``pre.step()`` is refused too); ``kfac_decay=beta`` keeps running
    averages of the factors, ``F <- beta F + (1 - beta) F_batch``, updated every step
    (which then needs the forward pass and the pullback again). The state changes only
    when a step succeeds.

    Data-parallel training (docs/distributed.md): with ``process_group``, every rank of
    the group makes its preconditioner at the same point, with the same method, options,
    ``grad_scaler`` (enabled on every rank or none) and model (``DistributedDataParallel``
    on every rank or none) (a collective: one refused, or ranks that differ, make every
    rank raise there) and calls ``step()`` after a forward pass on its shard, and
    every rank's ``.grad`` becomes the direction of the global batch (the shards in rank
    order), each block solved by its owner rank. The gradient of the global batch is
    ``sum_p (N_p / N) g_p`` of the ranks' ``.grad``, ``N_p`` the samples of the last
    forward pass: each ``.grad`` must be that of the plain mean loss over the rank's
    shard, from micro-batches split between the ranks alike (:mod:`riemann_core.passes`
    checks both and refuses a summed, class-weighted or ignore_index cross-entropy and
    micro-batches split otherwise), or, for a model wrapped in
    ``DistributedDataParallel``, the ``.grad`` it averaged. A failure on any rank makes
    every rank raise, ``.grad`` untouched; ``timeout`` bounds every wait (seconds).
    K-FAC's ``kfac_refresh`` and ``kfac_decay`` are refused with a ``process_group``.

    Mixed precision with a ``torch.amp.GradScaler`` (float16 autocast): pass it as
    ``grad_scaler`` and call ``pre.backward(scaler.scale(loss))`` (or
    ``scaler.scale(loss).backward(); pre.step()``), then ``scaler.step(opt)`` and
    ``scaler.update()``. The direction of the scaled gradient is the scaled direction
    (``G`` does not depend on the loss's scale), which ``scaler.step`` unscales. Where the
    scaled gradient overflowed (NaN or inf in it, at the outputs or on the way back to a
    module), the step is the scaler's to skip, as it is without the preconditioner: no
    direction is computed, K-FAC's state is kept, the ``.grad`` of the parameters the step
    reaches hold NaN (``pre.step()``: every ``.grad``), ``pre.overflowed`` is ``True``,
    and ``scaler.step(opt)`` skips the step and ``scaler.update()`` lowers the scale. A
    disabled scaler changes nothing (an overflow is refused, as without one). With a
    ``process_group`` only for a ``DistributedDataParallel`` model, whose averaged
    ``.grad`` overflow on every rank alike, and on every rank of the group.
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
        check_coupling: bool | str = True,
        process_group: torch.distributed.ProcessGroup | None = None,
        timeout: float = distributed.TIMEOUT,
        grad_scaler: torch.amp.GradScaler | None = None,
    ):
        # every rank meets the others here, refused or not, and all raise where one is
        # or where their choices differ (found by review: the others waited out the whole
        # timeout; found by a hunt: met at the first step, DDP's gradient all-reduce
        # answered it first and gloo aborted; found by review: so it did at a step one
        # rank's GradScaler skipped)
        def meet() -> str:  # (once the checks passed)
            scaled = grad_scaler is not None and grad_scaler.is_enabled()
            wrapped = isinstance(model, DistributedDataParallel)
            return distributed.choices(method, self._options, scaled, wrapped)

        with distributed.share_failure(process_group, timeout, meet=meet):
            self._options = Options.checked(
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
            if isinstance(model, DistributedDataParallel) and process_group is None:
                raise ValueError(
                    "a DistributedDataParallel model averages the gradient over its process "
                    "group, and the metric must be the global batch's too: pass that group "
                    "as process_group (e.g. torch.distributed.group.WORLD)"
                )
            _check_grad_scaler(grad_scaler, model, process_group)
            distributed.check_timeout(timeout)  # (checked by its setter too)
            if process_group is not None:
                distributed.check_group(process_group)
                _check_distributed_kfac(self._kfac)
            # DistributedDataParallel's forward expects its own backward: solve on its module
            network = model.module if isinstance(model, DistributedDataParallel) else model
            check_damping_fits(self._options.damping, check_model(network), solve_dtype)
        # read-only (found by review: pre.method = "Full" failed with a KeyError at the next
        # step, and a K-FAC state's method changed under it could not be loaded again)
        self._model, self._network, self._method = model, network, method
        self._grad_scaler, self._process_group = grad_scaler, process_group
        self._timeout = timeout
        self._removed = False
        self.diagnostics: list[LayerDiagnostics] = []
        #: whether the last step's scaled gradient overflowed (``grad_scaler`` only)
        self.overflowed = False
        self._overflows_in_a_row = 0  # at as many scales (micro-batches share theirs)
        self._overflow_scale: float | None = None
        self._batch: tuple[tuple, dict, list, BufferStart, dict, tuple] | None = None
        self._placed: tuple | None = None
        self._versions: list[tuple[str | None, Tensor, int | None]] = []
        # each parameter's storage in the recorded pass (p.data = ... moves no version: named
        # where a replay differs), and the optimizer step taken on the model's parameters
        # since, before any direction of that pass was written (a fused one moves no version
        # either; _optimizer_stepped)
        self._storages: list[tuple[str, Tensor, tuple]] = []
        self._stepped: tuple[list[str], str] | None = None
        self._lazy_at_pass: frozenset[int] = frozenset()  # (see _record)
        # the trainable parameters' data as the recorded pass left it, where the next step
        # reuses K-FAC's cached blocks and runs no pass again to see it changed through
        # .data, which moves no version either (_data_now)
        self._data_at_pass: dict | None = None
        self._data_views: dict = {}  # what reads their data: made once (_read_data)
        # pre.step() called since pre.backward(loss) last was: only its steps read the data
        # (pre.backward's gradient comes from the pass's own graph: nothing can come before)
        self._stepping = True
        # the parameters that required grad in the recorded pass (its graph holds them)
        self._trained_at_pass: frozenset[int] = frozenset()
        # {id(parameter): (its .grad, weakly; the version)} as the recorded pass started,
        # and the tick of the accumulations into .grad then (see _unreached)
        self._grads_at_pass: dict[int, tuple] = {}
        self._tick_at_pass = -1
        self._sequence_at_pass: int | None = None
        self._hooks_warned = False  # (see _warn_hooked_forward)
        # what the model holds of this preconditioner: detached by remove(), or once the
        # caller drops the preconditioner (the hooks hold it weakly; found by review: one
        # built again on the same model, as a notebook cell run twice does, left the old
        # one recording every forward pass, its activations too)
        self._attached: dict[str, object] = {}
        self._finalizer = weakref.finalize(self, _detach, self._attached)
        # the batch as the caller passes it, before the model's own pre-hooks (a replay
        # calls the model, which runs them again); the output after its forward hooks. A
        # replay runs a DistributedDataParallel's module, not the wrapper's hooks: there
        # the batch is the one the wrapper's pre-hooks pass on
        self._attach(
            "record",
            ours(
                model.register_forward_pre_hook(
                    OwnHook(model, weakref.WeakMethod(self._record)),
                    with_kwargs=True,
                    prepend=self.network is model,
                )
            ),
        )
        self._attach(
            "record output",
            ours(
                model.register_forward_hook(
                    OwnHook(model, weakref.WeakMethod(self._record_output)), always_call=True
                )
            ),
        )
        if network is not model:  # (see _record_module_start)
            self._attach(
                "record module start",
                ours(
                    network.register_forward_pre_hook(
                        OwnHook(network, weakref.WeakMethod(self._record_module_start))
                    )
                ),
            )
        self._module_awaited = False  # a recorded pass of the wrapper whose module has not run
        # the wrapped module called by itself (ddp.module(x)) since the wrapper's last pass:
        # named where a refusal follows from that pass not being recorded
        self._module_alone = False
        self._depth = 0  # calls of the model under way (it may call itself)
        self._prehooked = False  # a pre-hook prepended since ran before the record
        self._modes: dict[int, bool] = {}  # each module's training flag in the recorded pass
        # Python's random state and the modules' plain attributes as the recorded pass
        # started (Replay.python)
        self._python_at_pass: tuple | None = None
        self._buffer_states = BufferStates()
        self._synced = True
        self._previous: dict[str, object] = {}  # the record before the pass under way
        self._handled: BaseException | None = None
        self._output: list[Tensor] | None = None
        self._output_versions: list[int] = []
        self._differentiated: Differentiated | None = None  # a gradient reached the output
        # a data-parallel step's passes (what combining the ranks' .grad relies on: their
        # number and shares; under DDP too, whose equal-weight average of micro-batches
        # accumulated in no_sync() is the global gradient only where every one is split
        # alike: found by a hunt, 0.5-1.2 off, where only the last pass's were compared)
        self._passes = Passes() if process_group is not None else None
        if self._passes is not None:  # (its gradient hooks on the parameters)
            self._attach("passes", self._passes)
        self._accumulations = Accumulations()  # (hooks on parameters holding a .grad)
        self._attach("accumulations", self._accumulations)
        self._edited_in_forward = False
        self._params_edited_in_forward: list[str] = []
        # the structures of losses' graphs found to take each sample's outputs as logits
        self._probed_losses: set = set()
        # the .grad each call wrote, their versions and fingerprints then (a second step()
        # refused)
        self._written: list[_Written] = []
        # what consumed the last forward pass's graph: None, "ran" (a pre.backward(loss)) or
        # "refused" (one refused after its backward pass)
        self._spent: str | None = None
        self._preconditioned = False  # a direction of the last forward pass written
        # pre.backward(loss) records the user's own forward passes (one process only)
        single = process_group is None and self.network is model
        try:
            if single:
                self._attach("capture", Capture(model, notes_for(model).clone, persistent=True))
        except BaseException:  # (found by a hunt: the hooks above, left on the model, broke
            self._finalizer()  # every later forward pass with gradients)
            raise
        _STEP_WATCHERS.add(self)
        _watch_optimizer_steps()
        _compile_again()

    @property
    def model(self) -> nn.Module:
        """The model as passed (a ``DistributedDataParallel`` wrapper included)."""
        return self._model

    @property
    def network(self) -> nn.Module:
        """The model whose parameters are preconditioned (a wrapper's ``module``)."""
        return self._network

    @property
    def method(self) -> str:
        return self._method

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self._grad_scaler

    @property
    def process_group(self):
        return self._process_group

    @property
    def timeout(self) -> float:
        """Seconds every wait of a data-parallel step may take (``process_group`` only)."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        # found by review: a negative, zero or text timeout set here failed mid-step
        distributed.check_timeout(seconds)
        self._timeout = seconds

    def _record(self, module, args, kwargs):
        # riemann_core's own forward passes are not the user's batch, nor are evaluations
        # under torch.no_grad(), from which no loss is differentiated
        if capturing() or not torch.is_grad_enabled():
            return
        if self._depth and calls_under_way(module) < 2:
            self._depth = 0  # a call interrupted (KeyboardInterrupt) never ended: not nested
        self._depth += 1
        if self._depth > 1:  # the model calling itself: the outermost call is the batch
            return
        self._module_alone = False
        if self.network is module:
            self._hooks_in_order(module)
        if self._passes is not None:
            self._passes.forward_starts(self.network)
            # (found by a hunt: a preconditioner on ddp.module, the pass run through the
            # wrapper, was told to wrap the model in DistributedDataParallel)
            self._passes.ddp_forward = _run_by_ddp(self.model)
        self._previous = {a: getattr(self, a) for a in _RECORD}  # back if this pass raises
        self._handled = sys.exc_info()[1]  # a pass run inside the caller's except block
        if not kwargs and all(isinstance(a, Tensor) for a in args):  # no pytree walks
            args = inputs = tuple(a.detach() for a in args)
        else:
            args, kwargs = pytree.tree_map(
                lambda a: a.detach() if isinstance(a, Tensor) else a, (args, kwargs)
            )
            inputs = tensors_of((args, kwargs))
        cuda = rng_devices(self.model)
        device_types = {t.device.type for t in inputs} | ({"cuda"} if cuda else set())
        # a DistributedDataParallel's buffers as its module's call finds them: read there
        # (_record_module_start; none until then), unless it runs the module's forward
        # without its hooks
        self._module_awaited = self.network is not self.model and not getattr(
            self.model, "_delay_all_reduce_all_params", False
        )
        self._batch = (
            args,
            kwargs,
            rng_state(cuda),
            BufferStart({}, [])
            if self._module_awaited
            else self._buffer_states.before_pass(self.network),
            autocast_state(device_types),
            precision_state(),
        )
        self._placed = placement(self.network)  # a replay that fails says it moved since
        self._output = self._differentiated = None  # until this pass returns
        modules = list(self.model.modules())  # (one walk: 1-2 us a module)
        self._modes = {id(m): training(m) for m in modules}
        # what the replay starts from too: a counter its forward moves (found by a hunt: a
        # warm-up scaling a branch's gradient alone, a * h + (1 - a) * h.detach(), whose
        # replay saw the counter one on and took another derivative, 0.17-1.57 off)
        network = modules if self.network is self.model else self.network.modules()
        self._python_at_pass = (random.getstate(), replayed_attributes(network))
        # the autograd nodes this pass makes are numbered from here: one numbered below
        # that a later pre.backward(loss) reaches is older (_walk_loss_graph); so is that of
        # a view kept on a module, made first (autograd makes it anew as it is read, once
        # its base changed in place: an optimizer step)
        _views_made(self._python_at_pass[1])
        self._sequence_at_pass = sequence_now()
        # DistributedDataParallel averages the gradients of a pass outside no_sync() only
        self._synced = getattr(self.model, "require_backward_grad_sync", True)
        self._spent = None
        self._preconditioned = False  # until a direction of this pass is written
        # what step() relies on: the batch and the parameters as the forward pass saw them
        # (named on failure only: None for an input)
        self._versions = [(None, t, version_of(t)) for t in inputs] + [
            (n, p, version_of(p)) for n, p in self.model.named_parameters()
        ]
        self._storages = [
            (n, p, (_pointer(p), p.dtype, p.device)) for n, p, _ in self._versions if n is not None
        ]
        # parameters of lazy modules not called yet, whose first call in this pass gives
        # them their data (their version and storage are read as the pass leaves them)
        self._lazy_at_pass = frozenset(id(p) for n, p, _ in self._versions if is_lazy(p))
        self._stepped = None
        self._data_at_pass = None  # until this pass returns
        self._trained_at_pass = frozenset(
            id(p) for n, p, _ in self._versions if n is not None and p.requires_grad
        )
        # each trainable .grad as the pass starts (weakly) and its version: one that no
        # backward pass since accumulated into holds no gradient of this pass (_unreached)
        # (leaves alone: under torch.func.functional_call the model's parameters are the
        # tensors passed, whose .grad torch warns about reading; found by a hunt; an
        # inference tensor has no version: refused by name at the step, _check_grad)
        held = [
            p
            for n, p, _ in self._versions
            if n is not None
            and p.requires_grad
            and p.is_leaf
            and p.grad is not None
            and not p.grad.is_inference()
        ]
        self._grads_at_pass = {id(p): (weakref.ref(p.grad), p.grad._version) for p in held}
        self._accumulations.hook(held)
        self._tick_at_pass = self._accumulations.tick()

    def _alone_note(self) -> str:
        """What a refusal for a missing or stale pass adds where the module inside a
        DistributedDataParallel wrapper was called by itself since the wrapper's last pass
        (found by a hunt: ``ddp.module(x)`` was told to call ``model(x)``, or that an
        optimizer step changed the weights, with no word of the wrapper)."""
        if not self._module_alone:
            return ""
        return (  # (a pass for a log ran alone too: the note says "if", found by review)
            " (the model's module ran by itself, outside its DistributedDataParallel "
            "wrapper, since the wrapper's last forward pass: if that was the batch to "
            "precondition, ddp.module(x) is not recorded, and DistributedDataParallel does "
            "not average the .grad of its backward pass; call the wrapper, ddp(x), as the "
            "preconditioner was given it)"
        )

    def _record_module_start(self, module, args):
        """The buffers as a DistributedDataParallel's module starts the recorded pass: the
        wrapper's forward broadcasts rank 0's buffers first (``broadcast_buffers=True``,
        the default), after its pre-hooks. The pass reads those, and so must its replay,
        which runs the module alone (found by a hunt: a running normaliser, its buffer
        updated from each rank's shard, was replayed on the other ranks from their own
        buffers and refused as a pass that depends on state not replayed)."""
        if capturing():
            return
        if (
            self._depth == 0
            and torch.is_grad_enabled()
            and torch._C._current_graph_task_id() == -1  # (not a checkpoint's recomputation)
        ):
            self._module_alone = True
        if not self._module_awaited or self._depth != 1:
            return
        self._module_awaited = False
        batch = self._batch
        self._batch = (*batch[:3], self._buffer_states.before_pass(module), *batch[4:])

    def _hooks_in_order(self, model: nn.Module) -> None:
        """Keep the record of a batch before the model's forward pre-hooks and the record of
        its output after its forward hooks, also those registered since: a pre-hook
        prepended since has already changed this pass's inputs (:meth:`_check_replayable`
        refuses to replay the pass), the next passes are recorded first."""
        self._prehooked = hooked_before(model._forward_pre_hooks, self._hook.id)
        if self._prehooked:
            self._hook.remove()
            self._attach(
                "record",
                ours(
                    model.register_forward_pre_hook(
                        OwnHook(model, weakref.WeakMethod(self._record)),
                        with_kwargs=True,
                        prepend=True,
                    )
                ),
            )
        if hooked_after(model._forward_hooks, self._output_hook.id):
            self._output_hook.remove()
            self._attach(
                "record output",
                ours(
                    model.register_forward_hook(
                        OwnHook(model, weakref.WeakMethod(self._record_output)), always_call=True
                    )
                ),
            )
        if self._capture is not None:  # after the output's record: it may pass a copy on
            self._capture.end_last(model)

    def _record_output(self, module, args, output):
        # the output a replay of this pass must give again (kept until the next pass); a
        # copy where the caller changes it in place and no capture passes a copy on
        if capturing() or not torch.is_grad_enabled() or not self._depth:
            return
        self._depth -= 1
        if self._depth:  # a nested call's end
            return
        previous, handled = self._previous, self._handled
        self._previous, self._handled = {}, None  # (the last pass's batch freed)
        if raising_since(handled):
            # the pass raised (caught by the caller: a bad batch skipped): the last
            # complete pass stays the one a loss can be formed from
            for attribute, value in previous.items():
                setattr(self, attribute, value)
        else:  # the outermost call's end
            if self._lazy_at_pass:
                self._read_shaped(self._lazy_at_pass)
            copy = self._capture is None and MODEL_OUTPUT in notes_for(self.model).clone
            tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]
            self._output = [t.detach().clone() if copy else t.detach() for t in tensors]
            self._output_versions = [t._version for t in self._output]
            self._differentiated = Differentiated(tensors, self.network)
            if self._passes is not None:  # (DDP averages any loss's .grad: no mean to check)
                softmax = reads_softmax_fisher(self._options.loss, self._options.output_metric)
                softmax = softmax and self.network is self.model
                ddp = isinstance(self.model, DistributedDataParallel)  # (averaged: kept)
                self._passes.forward_ends(
                    tensors,
                    self._differentiated,
                    softmax,
                    grads_of=None if ddp else self.model,
                    network=self.network,
                )
            self._buffer_states.after_pass(self.network, self._batch[3])
            # (as the pass left them: one that edits its own weights is its own)
            kfac = self._kfac
            if self._stepping and kfac is not None and kfac.decay == 0 and not kfac.due:
                try:
                    self._data_at_pass = self._data_now()
                except (RuntimeError, TypeError, NotImplementedError):
                    pass  # a tensor subclass that cannot be read as integers: unchecked
            # an input (x /= 255) or a parameter (a renormalisation, F.embedding's max_norm)
            # that the forward pass itself changed in place: named on refusal (found by a
            # hunt: a parameter was blamed on an optimizer step after the pass)
            edited = [n for n, t, v in self._versions if version_of(t) != v]
            self._edited_in_forward = None in edited
            self._params_edited_in_forward = [n for n in edited if n is not None]

    def _read_shaped(self, lazy: frozenset[int]) -> None:
        """The version and storage of the parameters ``lazy`` (ids) as the pass leaves them:
        their lazy modules' first calls gave them their data in it, which moved their
        versions (found by a hunt: a ``LazyLinear`` added after the preconditioner was
        built was refused as changed in place after the pass, and before that broke the
        pass itself)."""
        self._versions = [
            (n, t, version_of(t) if id(t) in lazy else v) for n, t, v in self._versions
        ]
        self._storages = [
            (n, p, (_pointer(p), p.dtype, p.device) if id(p) in lazy else at)
            for n, p, at in self._storages
        ]

    def _replayed_output(self) -> list[Tensor] | None:
        """The recorded output, for the replay to give again; ``None`` where it was changed
        in place since (``logits /= T``: then the next passes record a copy)."""
        if self._output is None or all(
            t._version == v for t, v in zip(self._output, self._output_versions, strict=True)
        ):
            return self._output
        notes_for(self.model).clone.add(MODEL_OUTPUT)
        return None

    def _check_replayable(self) -> None:
        """Before a replay of the recorded pass (a fused ``backward`` runs none)."""
        if self._prehooked:
            raise ValueError(
                "a forward pre-hook registered on the model with prepend=True after the "
                "RiemannianPreconditioner ran before it recorded the batch, so running the "
                "forward pass again for the metric would apply the hook twice: run the next "
                "forward pass (recorded before the hook from now on), or register the "
                "hook before creating the preconditioner"
            )

    def _replay_cause(self, buffers: str) -> str:
        """What a replay that gives another output should name: the modules whose training
        flag changed since the recorded pass, ``buffers`` (what :meth:`BufferStates.changes`
        said before the replay, which may change them), a compiled model (``""``: none)."""
        changed = [
            n or "(the model)"
            for n, m in self.model.named_modules()
            if self._modes.get(id(m), training(m)) != training(m)
        ]
        causes = [moved_since(self.network, self._placed), self._given_other_data(), buffers]
        if _compiled(self.model):
            causes.append(
                "the pass ran compiled (torch.compile) and the replay runs eagerly, so random "
                "numbers the compiled code drew with its own generator (inductor's dropout "
                "masks) are drawn again differently: set "
                "torch._inductor.config.fallback_random = True (or compile with "
                "backend='aot_eager'); otherwise the pass depends on state that is not "
                "replayed (a global, an attribute of an object that is not a module, a "
                "global hook changed since)"
            )
        if changed:
            causes.insert(
                0,
                f"modules {some(changed)} changed training "
                "mode (model.train() / model.eval()) since that pass: compute the direction "
                "(pre.backward(loss), or pre.step()) before switching the mode",
            )
        return "; ".join(c for c in causes if c)

    def _given_other_data(self) -> str:
        """What to say of a replay where parameters were given other data since the
        recorded pass (``p.data = ...``, which moves no version counter) while their dtype
        and device stayed (a model moved is named by :func:`moved_since`): found by a hunt
        of SAM loops, whose weights put back as ``p.data = old_p`` before ``pre.step()``
        were blamed on state not replayed (Python's random module, a counter). Where the
        fused ``pre.backward(loss)`` runs no replay, the graph keeps the pass's own data,
        and its direction is that pass's."""
        given = [
            name
            for name, p, (pointer, dtype, device) in self._storages
            if pointer is not None
            and (p.dtype, p.device) == (dtype, device)
            and _pointer(p) != pointer
        ]
        if not given:
            return ""
        return (
            f"parameters {some(given)} were given other data since that pass (p.data = ..., "
            "which moves no version counter: a weight perturbation put back as SAM "
            "implementations do, p.data = old_p, torch.nn.utils.vector_to_parameters, an "
            "average's weights swapped in), and the pass is run again at the parameters as "
            "they are now: compute the direction (pre.step()) before the weights change"
        )

    def _check_unchanged(self, call: str) -> None:
        edited = self._params_edited_in_forward
        if self._edited_in_forward:
            # (found by a hunt: where it changed parameters too, they were named only once
            # the input was fixed)
            also = (
                f"; it also changed parameters {some(edited)} in place: make such updates "
                "outside forward, e.g. after opt.step()"
                if edited
                else ""
            )
            raise RuntimeError(
                "the model's forward pass changed its input in place (x.sub_(m), x /= 255, "
                "or a forward pre-hook of the model's: args[0].sub_(m)), and "
                f"{call} may run the model again on the batch as the forward pass received "
                "it: compute into a new tensor in forward (x = x - m, x = x / 255), or "
                f"return one from the pre-hook (return (args[0] - m,)){also}"
                # (found by review: a normalising pre-hook on the model was told to change
                # a forward that edits nothing)
            )
        if edited:
            raise ValueError(
                f"the model's forward pass changed parameters {some(edited)} in place (a "
                "renormalisation under torch.no_grad(), F.embedding or F.embedding_bag with "
                "max_norm, a momentum encoder's average of the weights), so the metric "
                "would be taken at parameters other than the gradient's. Make such updates "
                "outside forward, e.g. after opt.step()"
            )
        for name, t, version in self._versions:
            if version_of(t) != version:
                what = "an input of the forward pass" if name is None else f"parameter {name!r}"
                raise RuntimeError(
                    f"{what} changed in place after the forward pass that {call} uses "
                    "(an optimizer step, a weight perturbation put back (SAM), or a new batch "
                    f"copied into the same tensor): call {call} before opt.step(), before "
                    f"the weights are put back, and before the inputs change{self._alone_note()}"
                )
        # a fused optimizer's step moves no version counter (found by a hunt)
        if self._stepped is not None:
            names, optimizer = self._stepped
            raise RuntimeError(
                f"{optimizer}.step() stepped parameters {some(names)} after the forward pass "
                f"that {call} uses, before its direction was written (a fused optimizer, "
                "fused=True, moves no version counter, so the parameters changed unseen): "
                f"call {call} before opt.step()"
            )

    def _data_now(self) -> dict:
        """The trainable parameters of the recorded pass that have storage (not torch.func's
        wrappers), by device: ``{device: ([(name, parameter, its _data_key)], their
        _data_prints)}``."""
        by_device: dict = {}
        for name, p, (pointer, _, device) in self._storages:
            if pointer and id(p) in self._trained_at_pass:
                by_device.setdefault(device, []).append((name, p, _data_key(p, pointer)))
        kept: dict = {}
        for device, params in by_device.items():
            by_device[device] = (params, _data_prints(self._read_data(params, kept)))
        self._data_views = kept  # (those of parameters gone, or given other data, dropped)
        return by_device

    def _read_data(self, params: list[tuple], kept: dict | None = None) -> list[Tensor]:
        """The :func:`_data_view` of each of ``params`` (``(name, parameter, key)``), the one
        made before where the parameter's memory and layout are those of ``key`` (kept in
        ``kept``): made once, not at every step (the prints of 64-32-32-10's six tensors
        took 1.4 us, 9 us with their views made anew)."""
        views = []
        for _, p, key in params:
            view = self._data_views.get(key)
            if view is None:
                view = _data_view(p)
                if view.data_ptr() != key[1]:  # a copy: read again at each use
                    views.append(view)
                    continue
            views.append(view)
            if kept is not None:
                kept[key] = view
        return views

    def _check_data_kept(self, checks: Deferred) -> None:
        """Refuse, at ``checks``' reading, a step that reuses K-FAC's cached blocks where a
        trainable parameter's data changed since the recorded pass: an update written by
        hand through ``.data`` before ``pre.step()`` (``p.data.add_(-lr * p.grad)``,
        ``p.data = ...``, a write to a buffer they are views of) moves no version counter,
        no optimizer's hook sees it, and no pass run again compares its output (found by a
        hunt: the step taken along the raw gradient, the direction written after it
        unused). Data of another shape is refused at once (a model moved to another dtype
        or device is factorised again, by a pass run again, and reuses nothing). Two reads
        of the weights: 0.39 ms of a 24.6 ms step of 784-1024-1024-10 (batch 128, 2-core
        CPU), 40 us of 64-32-32-10's 1.16 ms."""
        for params, then in (self._data_at_pass or {}).values():
            current = [(name, p, _data_key(p, _pointer(p))) for name, p, _ in params]
            reshaped = [
                name  # (the keys end with the shape, dtype and device)
                for (name, _, was), (_, _, key) in zip(params, current, strict=True)
                if was[3:] != key[3:]
            ]
            if reshaped:
                _refuse_data_changed(reshaped)
            views = self._read_data(current)
            now = _data_prints(views)

            def explain(params=params, views=views, now=now, then=then):
                lengths = [v.shape[0] for v in views]
                parts = zip(params, now.split(lengths), then.split(lengths), strict=True)
                _refuse_data_changed([n for (n, _, _), a, b in parts if not torch.equal(a, b)])

            checks.require(now.eq(then).all(), explain)

    @eager_when_traced
    def backward(self, loss: Tensor) -> None:
        """Add ``G^{-1} g`` to each trainable ``.grad``, ``g`` the gradient of ``loss``.

        Replaces ``loss.backward()``: a parameter whose ``.grad`` is ``None`` receives the
        direction, one with a ``.grad`` has it added (after ``opt.zero_grad()`` the
        ``.grad`` is then the direction); parameters the loss does not reach keep theirs.
        Every other leaf the loss reaches (a temperature beside the model, an input that
        requires grad, a backbone not preconditioned) gets its gradient as from
        ``loss.backward()``; gradient hooks on the preconditioned parameters are refused
        (they would not run).
        ``loss`` is any scalar formed from the outputs of the model's last forward pass
        with gradients enabled; its graph is consumed, as by ``loss.backward()``.

        One backward pass carries the gradient and the factor rows together from ``loss``
        and the outputs back to every module with parameters. Where that cannot give the
        exact direction, the gradient is taken by autograd and preconditioned as by
        :meth:`step` (one more forward pass): on the first call for a model, when the
        batch-coupling probe runs (it needs the inputs in the graph); on the first call
        after a parameter was frozen, unfrozen or replaced, a module swapped or renamed,
        or a hook registered that runs between the preconditioner's and a module's forward
        (a pre-hook that replaces the inputs or edits them in place, a prepended hook);
        when a module's output was changed in place after its call (the next forward
        passes capture it through a copy); when the loss reaches parameters other than
        through their modules' calls (a weight penalty written into the loss); when a
        tensor hook is on the model's output, or a hook was registered since the forward
        pass (in the loss's code), or a module's output or input retains its gradient
        (``retain_grad``), whose backward pass must not run batched; when a module of the
        model (or of the loss's graph) has a backward hook and the graph a segment under
        ``torch.utils.checkpoint``, which cannot run again batched with the hook; and for a compiled model
        (``torch.compile``), whose compiled backward cannot run batched.
        For cross-entropy on outputs ``(N, ..., C)`` the loss's gradient must show the
        classes along the last dimension and every position taken (see ``docs/api.md``).
        One process only: with a ``process_group`` or a ``DistributedDataParallel`` model
        it raises ``ValueError`` (use ``loss.backward()`` and :meth:`step`).
        """
        hooks_now = hooks_mark()  # (before any of ours: see hooked, below)
        self._check_not_removed("pre.backward(loss)")
        self._warn_hooked_forward()
        self._stepping = False
        if self._capture is None:  # shared: ranks in pre.step() meet it at their agreement
            # (not under DDP, whose other ranks wait in their backward's own all-reduce)
            ddp = isinstance(self.model, DistributedDataParallel)
            with distributed.share_failure(None if ddp else self.process_group, self.timeout):
                raise ValueError(
                    "pre.backward(loss) runs in one process: with a process_group or a "
                    "DistributedDataParallel model, call loss.backward() and then pre.step()"
                )
        check_autograd()  # (found by a hunt: under inference_mode the .grad were written)
        self._check_loss(loss)
        if loss.dim():  # a loss of shape (1,) as the scalar the algebra seeds
            loss = loss.reshape(())
        capture, model, opts = self._capture, self.model, self._options
        # a parameter frozen, unfrozen or replaced, a module swapped or renamed, or a hook
        # run between ours and a forward, since the hooks were installed: the recorded
        # calls miss or misname blocks, or are not the calls the modules made
        rehook = not capture.hooks_current(model)
        if self._spent == "ran":
            raise ValueError(
                "pre.backward(loss) already ran on the model's last forward pass and consumed "
                "its graph (as loss.backward() does): run model(x) again and form a new loss"
            )
        # (the fused path's outputs: found by a hunt, an AttributeError)
        if self._spent == "refused" or any(c.output is None for c in capture.calls):
            raise ValueError(f"a pre.backward(loss) {_REFUSED_AFTER_BACKWARD}")
        if capture.output is not None and not (capture.calls or rehook):
            # (found by a hunt: submodules called as module.forward(x) were told to call
            # model(x), which the user had done)
            raise ValueError(
                "no module with trainable parameters took part in the model's last forward "
                "pass; nothing to precondition (a submodule called as module.forward(x), not "
                "module(x), runs without the hooks that see it: call it as module(x))"
                f"{marked_model(self.network)}{_COMPILED_BEFORE if _compiled_anywhere() else ''}"
            )
        if capture.output is None:
            raise RuntimeError(
                "pre.backward(loss) needs the forward pass the loss was formed from: call "
                "model(x) with gradients enabled, then pre.backward(loss)"
                f"{_COMPILED_BEFORE if _compiled_anywhere() else ''}{_outside_model(capture)}"
            )
        self._check_unchanged("pre.backward(loss)")
        _check_own_parameters(capture, model, "pre.backward(loss)")
        self.overflowed = False
        checks = Deferred()
        stale = capture.stale()
        shown = [] if rehook else _showing_parameters(capture.calls, stale)
        params = check_model(
            model,
            checks,
            shown={id(p) for c in shown for p in c.params},
            unprobed_kernel=unprobed(opts),
        )
        checks.finite_all(
            [(f"parameter {n!r}", p) for c in shown for n, p in zip(c.param_names, c.params)],
            PARAMETER_FIX,
            shown_in=[c.output for c in shown],
        )
        check_damping_fits(opts.damping, params, opts.solve_dtype)
        if self._scaling:
            # a scaled loss overflows where its gradient need not (S * loss past the
            # dtype's largest number at a scale grown over a long run, the gradient S times
            # the loss's): as loss.backward() and pre.step() do, it goes on, an overflow of
            # the gradient is the scaler's to skip (found by a hunt: refused, naming the data)
            checks.no_nan("the loss", loss, "check the data and lower the learning rate")
        else:
            checks.finite("the loss", loss, "check the data and lower the learning rate")
        overflow = GradientOverflow if self._scaling else None  # the scaler's to skip
        for name, p in params:  # the direction is added to them, as loss.backward() adds
            if p.grad is not None:
                _check_grad(name, p.grad, p.dtype, checks, overflow or ValueError)
        check_generator(opts.generator, opts.output_metric, params[0][1].device)
        # the data, as pre.step() checks it (found by a hunt: an inf input that a tanh
        # saturates was refused as a damped Gram holding inf, blaming the damping)
        check_inputs(*self._batch[:2], None, checks)
        names = {id(p): n for n, p in params}
        notes = notes_for(model)
        notes.clone |= stale
        needs_factor = SOLVERS[self.method].NEEDS_FACTOR
        key = coupling.probe_key(model, *self._batch[:2], opts.kernel, self._batch[4])
        probing = needs_factor and coupling.needs_probe(notes, key, opts.check_coupling)
        called = {n for c in capture.calls for n in c.param_names}
        reaches = called  # the parameters the loss reaches, once its graph is walked
        reuse = self._kfac is not None and not self._kfac.needs_factors(
            params, opts, dict(model.named_modules()), called, shared=_shared(capture.calls)
        )
        # trainable now, not in the forward pass: its graph gives them no gradient, and
        # the metric of the pass run again is checked for coupling them with others
        since = self._trainable_since(params) if _couples(self.method, opts.kfac_bias) else None
        overflowed = False
        consumed = False  # the loss's graph, by the backward pass of the autograd path
        try:
            check_one_output(capture.output)
            if needs_factor and not rehook:  # before autograd's path consumes the graph
                # (of trainable modules: one frozen since is no call of the next pass)
                trained = [c for c in capture.calls if any(id(p) in names for p in c.params)]
                check_output_batch(trained, capture.output, self._batch[0])
                check_batch_dimension(trained, capture.output)
                if self.method == "kfac":
                    check_kronecker(trained, opts.kernel)
            paths = coupling.loss_paths(
                loss, capture.output, capture.calls, names, capture.key, capture.token
            )
            if not (paths.output or paths.calls):
                raise ValueError(
                    "the loss was not formed from the outputs of the model's last forward "
                    "pass (with gradients enabled), whose batch the metric is taken at: "
                    "call pre.backward(loss) right after the forward pass of its batch"
                    f"{_outside_model(capture)}"
                )
            foreign, reaches, compiled, kept, crossed, module_hooked = _walk_loss_graph(
                loss, names, self._sequence_at_pass, casts_cached=bool(self._batch[4])
            )
            off = []  # what the loss trains past the output, warned of once solved
            if needs_factor and paths.calls:  # the loss reaches a module past the output
                off = [n for n in _off_output(capture, names, stale) if n in reaches]

            def warned() -> None:
                _warn_off_output(off, opts.damping)

            _check_no_gradient_hooks(params)
            # loss.backward() gives every other leaf the loss reaches its gradient (a
            # temperature beside the model, an input that requires grad, a backbone not
            # preconditioned): taken first, added once the directions are written
            foreign_grads = _gradients_of(loss, foreign) if foreign else ()
            if paths.earlier or reaches_pass(capture.inputs, capture.key, capture.token):
                raise ValueError(
                    "the loss was formed from more than one forward pass of the model (a "
                    "siamese, consistency or R-Drop loss, or the model applied to its own "
                    "output), and the metric is taken at one batch: pass the batches "
                    "through one forward pass (concatenated), or call loss.backward() and "
                    "then pre.step(), which preconditions with the metric at the last pass's "
                    "batch; a state carried over from an earlier step (an RNN's hidden state) "
                    "is detached first, as truncated backpropagation through time does"
                )
            # (a compiled forward's backward cannot run under vmap: the autograd path; nor
            # can the walk order the nodes of a module called in another thread, numbered
            # by that thread: found by review, a branch run by a thread pool was refused as
            # a tensor kept across passes, exact before; the replay's check_kept reads
            # nodes by identity. An operation outside a module's call run in another
            # thread is seen in the graph, numbered at or above a node it feeds)
            threaded = capture.threaded or crossed
            # a tensor hook on the model's output, or any hook registered since the forward
            # pass ended (z.register_hook in the loss's code, on the output or on any tensor
            # of the graph, or a node's hook: torch's hook handles are numbered by one
            # counter): the fused pass would run it on the metric's rows too, and twice on
            # the gradient (found by a hunt: a logits hook g * 2 or a clamp, 0.26-0.56 off
            # from the second pre.backward on, silently; 0.96 on a hidden tensor; one
            # registered in forward on the model's output, 1.0 off); the autograd path, as
            # pre.step(), takes the gradient it leaves and the metric of the pass run
            # again. One registered in forward elsewhere runs in both alike and keeps the
            # fused path (found by review: every such model ran a second forward pass).
            # Those torch's module tracker registers (FlopCounterMode's: they only note
            # which module runs) are neither (found by review: the FLOPs a benchmark counted
            # were the autograd path's, its time the fused one's)
            on_output = user_hook_ids(capture.output)
            hooked = bool(
                on_output and set(on_output) - tracked_ids(min(on_output), hooks_now)
            ) or hooks_registered(capture.hooks_mark, hooks_now, tracked=True)
            # a module with a backward hook (one without parameters too: an nn.Tanh, a
            # container) and a segment under torch.utils.checkpoint (use_reentrant=False):
            # the batched backward pass runs the segment again under vmap, where torch
            # cannot apply the hook (found by an audit: refused from the second
            # pre.backward on; the hooked module at a segment's start with parameters,
            # then without); the autograd path pulls the rows back as pre.step() does. A
            # hooked module whose output the loss leaves out has no node in its graph, but
            # runs again with its segment all the same (found by review: refused from the
            # second call, exact before), so every module of the model is asked too. The
            # saved tensors are read only where there is such a hook
            hooked_module = module_hooked or any(backward_hooked(m) for m in model.modules())
            checkpointed = hooked_module and recomputes([loss.grad_fn])
            # a recorded tensor that retains its gradient (h.retain_grad() in forward): the
            # batched backward pass would leave a batched tensor, unreadable, in its .grad
            # (torch's "escaped from inside a function being vmapped" at the first read;
            # found by a hunt), where the autograd path leaves the loss's gradient
            retained = any(
                t.retains_grad
                for t in (
                    capture.output,
                    *(c.output for c in capture.calls),
                    # (the copies a module's call returned: of an output the network edits
                    # in place, of a tuple's tensors)
                    *(t for c in capture.calls if c.returned is not None for t in c.returned()),
                    *(t for c in capture.calls for t in c.graph_inputs),
                )
                if isinstance(t, Tensor)
            )
            fused = not (
                reuse
                or stale
                or probing
                or rehook
                or paths.outside
                or compiled
                or since
                or threaded
                or hooked
                or checkpointed
                or retained
            )
            if kept and fused:  # (the autograd path's replay refuses it: Replay.check_kept)
                raise ValueError(
                    f"the loss reaches parameters {sorted(kept)} through a tensor computed "
                    "from them before the model's last forward pass (in an earlier pass) and "
                    f"kept since: {KEPT_ACROSS_PASSES}"
                )
            if needs_factor:  # each call: a lookup's option is not seen by the probe's key
                check_no_frequency_scaling(capture.output, names)
            output_gradient = None
            if needs_factor and classes_along_positions(
                capture.output, opts.loss, opts.output_metric
            ):
                # a scaled loss: read at the scale it has (a host read; float16 outputs)
                half = capture.output.dtype == torch.float16
                scale = self.grad_scaler.get_scale() if self._scaling and half else 1.0
                output_gradient = check_classes_last(loss, capture.output, checks, loss_scale=scale)
            if needs_factor and reads_softmax_fisher(opts.loss, opts.output_metric):
                check_samples_taken(loss, capture.output, checks, self._probed_losses)
            own = (
                self._differentiated.own_passes()
                if self._differentiated
                else contextlib.nullcontext()
            )
            with own:  # (its own backward passes: no walk of the parameters for each)
                if not fused:
                    # autograd consumes the loss's graph: the data's checks first (one host
                    # sync, on a path that runs a second forward), so a refused loss keeps it
                    if not reuse:
                        self._check_replayable()
                    checks.run()
                    with reentrant_checkpoint_refused():
                        gradient = self._autograd_gradient(loss, params)
                    consumed = True
                    for name, g in gradient.items():
                        checks.finite(
                            f"the gradient of {name!r}", g, OVERFLOW_FIX, overflow or ValueError
                        )
                    coupled = None
                    if since:
                        coupled = self._coupled_check(
                            gradient, changed=since, call="pre.backward(loss)"
                        )
                    directions, diagnostics = self._transaction(
                        lambda: self._solve(gradient, params, checks, coupled), then=warned
                    )
                else:
                    directions, diagnostics = self._transaction(
                        lambda: self._fused(
                            loss, not paths.calls, params, checks, output_gradient, overflow
                        ),
                        then=warned,
                    )
                    # every called module's parameters have one, the .grad only those the loss
                    # reaches (found by review: an auxiliary head the loss leaves out got zeros,
                    # which AdamW's decay moved, and natural's coupled part)
                    directions = {n: d for n, d in directions.items() if n in reaches}
        except GradientOverflow:  # (the generator as the skipped step found it)
            overflowed = True
        except BaseException as err:
            # (the fused path's backward frees the calls' outputs as it consumes the graph)
            consumed = consumed or any(c.output is None for c in capture.calls)
            if consumed and isinstance(err, Exception):
                # found by a hunt: a retry once the cause was fixed was told the user had
                # called loss.backward(); say now that the graph is gone, and on a retry
                self._spent = "refused"
                if err.args and isinstance(err.args[0], str):
                    note = f"this pre.backward(loss) {_REFUSED_AFTER_BACKWARD}"
                    err.args = (f"{err.args[0]} ({note})", *err.args[1:])
                raise
            if isinstance(err, RuntimeError) and "backward through the graph a second" in str(err):
                raise ValueError(
                    "the loss's graph was already consumed (by loss.backward(), or an earlier "
                    "pre.backward(loss)): pre.backward(loss) replaces loss.backward(), call it "
                    "instead; to precondition a .grad already there, call pre.step(). Where "
                    "neither ran, the forward pass reached a graph freed before, through "
                    f"{KEPT_ACROSS_PASSES}"
                ) from err
            raise
        # the pass is spent: its record (and graph) freed. A refused call keeps it, for a
        # retry (or for its error, where the graph was consumed)
        capture.reset()
        self._spent = "ran"
        if rehook:  # the new hooks first: a refusal keeps the old ones (found by review)
            self._attach("capture", Capture(model, notes.clone, persistent=True))
            capture.remove()
        self._note_overflow(overflowed)
        # with gradients off, as autograd adds into .grad (found by review: a .grad that is
        # a leaf requiring grad refused the in-place add, the .grad before it written)
        with torch.no_grad():
            _accumulate(foreign, foreign_grads)
            if overflowed:  # NaN where the scaled backward's inf would be, for scaler.step
                _fill_nan([p for n, p in params if n in reaches])
        if overflowed:
            self.diagnostics, self._written = [], []
            self._accumulations.mark([])
            return
        with torch.no_grad():
            for name, p in params:  # every direction exists before any .grad changes
                if name in directions:
                    direction = directions[name].detach()
                    if p.grad is not None:
                        p.grad.add_(direction)
                    elif (
                        direction.dtype == p.dtype
                        and direction.stride() == p.stride()
                        and not in_larger_storage(direction)
                    ):
                        p.grad = direction
                    else:  # laid out as loss.backward() lays it out: fused optimizers read
                        # .grad with the parameter's strides (K-FAC's are views of [W | b]);
                        # and apart: slices of one solution (full's, a dense block's) share a
                        # version counter, which hid a backward pass added to one of them
                        # from pre.step()'s check (found by a hunt: preconditioned twice, 66x)
                        p.grad = torch.empty_like(p).copy_(direction)
        self._wrote(params, directions)
        self.diagnostics = diagnostics
        self._commit(params, set(directions))

    @staticmethod
    def _check_loss(loss) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            what = (
                f"a {loss.dtype} tensor of shape {tuple(loss.shape)}"
                if isinstance(loss, Tensor)
                else type(loss).__name__
            )
            raise TypeError(
                f"pre.backward(loss) needs the loss as a floating-point scalar tensor, got {what}"
            )
        if loss.grad_fn is None:
            raise ValueError(
                "the loss is not in an autograd graph (formed under torch.no_grad(), from "
                "detached outputs, or already a leaf): form it from model(x) with gradients "
                "enabled"
            )

    def _fused(
        self,
        loss: Tensor,
        through_output: bool,
        params,
        checks: Deferred,
        output_gradient: Tensor | None = None,
        overflow: type | None = None,
    ):
        """The direction of ``loss``'s gradient from the graph of the recorded forward
        (``through_output``: the loss reaches the network only through its output, where
        its gradient is ``output_gradient`` if already taken; ``overflow``: the error a
        non-finite gradient raises)."""
        capture = self._capture

        def build():
            with torch.enable_grad():
                return problem_from_graph(
                    self.model,
                    capture.output,
                    capture.calls,
                    None,
                    self._options,
                    checks,
                    needs_factor=SOLVERS[self.method].NEEDS_FACTOR,
                    loss=loss,
                    through_output=through_output,
                    output_gradient=output_gradient,
                    overflow=overflow,
                )

        devices = {p.device.type for _, p in params}
        devices |= {t.device.type for t in call_tensors(*self._batch[:2])}
        with self._buffers_at_start():
            return run_solver(build, self.method, self._options, checks, devices, self._kfac)

    @staticmethod
    def _autograd_gradient(loss: Tensor, params) -> dict[str, Tensor]:
        """``{name: gradient}`` of ``loss`` by autograd (``None`` where it does not reach)."""
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        return {n: g for (n, _), g in zip(params, grads, strict=True) if g is not None}

    def _solve(
        self, gradient: dict[str, Tensor], params, checks: Deferred, coupled=None, reused=None
    ):
        """The direction of ``gradient`` (a zero vector for the ``params`` it lacks) at the
        recorded batch, replayed from its random state (K-FAC between refreshes: the cached
        blocks, no forward pass); only ``gradient``'s entries. ``coupled``: the check of
        the parameters it lacks that the pass run again makes (:meth:`_grads_coupled`);
        ``reused``: what a step that runs no pass checks in its place (given ``checks``)."""
        full = {
            n: gradient[n].detach() if n in gradient else torch.zeros_like(p) for n, p in params
        }
        calls = [] if self._capture is None else self._capture.calls  # (none: DDP's)
        # a check of the parameters without .grad left to the pass run again needs that
        # pass where a cached block mixes them with parameters that have one (found by
        # review: with the hooks out of date, a bias left out beside its weight was taken
        # as zero between refreshes, silently); its factors stay the cached ones
        deferred = (
            coupled is not None and self._kfac is not None and self._kfac.mixes(set(gradient))
        )
        if (
            self._kfac is not None
            and not deferred
            and not self._kfac.needs_factors(
                params,
                self._options,
                dict(self.network.named_modules()),  # (a walk K-FAC's reuse alone needs)
                set(gradient),
                shared=_shared(calls),
            )
        ):
            if reused is not None:
                reused(checks)
            directions, diagnostics = self._kfac.reuse(full, self._options, checks)
        else:
            args, kwargs, state, buffers, autocast, precision = self._batch
            try:
                with contextlib.ExitStack() as at_start:
                    # what fails before the solve's agreement meets the others there (found
                    # by a hunt: an error in the replay's setup left them waiting out the
                    # timeout)
                    with distributed.share_failure(self.process_group, self.timeout):
                        self._check_replayable()
                        replay = Replay(
                            state,
                            self._replayed_output(),
                            buffers.copies,
                            autocast,
                            precision,
                            functools.partial(
                                self._replay_cause,
                                self._buffer_states.changes(self.network, buffers),
                            ),
                            *_reached(self._capture, self._trained_at_pass),
                            cached_casts=bool(autocast.keys() & autocast_state(set(autocast))),
                            placed=self._placed,
                            coupled=coupled,
                            python=self._python_at_pass,
                        )
                        # after the replay's record, of the buffers
                        at_start.enter_context(self._buffers_at_start())
                        found = (
                            None if self.process_group is None else buffers.as_found(self.network)
                        )
                    directions, diagnostics = solve(
                        self.network,
                        args,
                        None,
                        self.method,
                        self._options,
                        gradient=full,
                        forward_kwargs=kwargs,
                        checks=checks,
                        replay=replay,
                        state=self._kfac,
                        process_group=self.process_group,
                        timeout=self.timeout,
                        global_gradient=isinstance(self.model, DistributedDataParallel),
                        absent=tuple(n for n, _ in params if n not in gradient),
                        passes=() if self._passes is None else self._passes.shapes(),
                        found=found,
                    )
            except ReplayDiffers:
                self._buffer_states.distrust(buffers)  # the next passes copy them
                raise
        return {n: d for n, d in directions.items() if n in gradient}, diagnostics

    def _transaction(self, compute, then=None):
        """``compute()`` (and ``then()`` after it, before anything is written: the warning
        of parameters off the output, which a warnings filter can turn into an error; found
        by a hunt: raised after the solve under ``-W error``, it left the sampled metric's
        generator moved on), forgetting what K-FAC's state computed if it fails, and undoing
        the draws of the sampled metric (a ``generator`` passed): a refused or skipped call
        can be made again, or its batch skipped, as if it had never been (found by hunts:
        a refused ``pre.backward``, then a refused ``pre.step()``, moved the generator on).
        A direction that overflowed beside a scaler at a scale above 1 is the scaler's to
        skip (a :class:`GradientOverflow`): the scaled direction ``S G^{-1} g`` can
        overflow where the scaled gradient did not. At a scale of 1 or less the scale is
        not the cause, and the error stands (found by a hunt: a scale of 1e37, grown over a
        bfloat16 run, stopped training with a FloatingPointError that advised more
        damping)."""
        opts = self._options
        generator = opts.generator if opts.output_metric == "sampled" else None
        random_state = None if generator is None else generator.get_state()
        try:
            with reentrant_checkpoint_refused():
                result = compute()
            if then is not None:
                then()
            return result
        except BaseException as err:
            if random_state is not None:
                generator.set_state(random_state)
            if self._kfac is not None:
                self._kfac.discard()
            if (
                isinstance(err, DirectionOverflow)
                and self._scaling
                and self.grad_scaler.get_scale() > 1
            ):
                raise GradientOverflow(str(err)) from err
            raise

    def _buffers_at_start(self):
        """While the generic kernel evaluates modules again, one sample at a time: their
        buffers (and their submodules'), on copies, as the recorded pass found them, put
        back after. A module that updates them as it runs (a quantisation observer) then
        gives the outputs of that pass (found by a hunt: evaluated from where the pass left
        them, a QAT Linear whose observer still moved was refused as coupling the samples).
        Only those modules' buffers: copying every one at every call cost a model with four
        1024 x 1024 masks 1.6x its step (found by review)."""
        kernel = self._options.kernel
        if kernel == "structured" or self._batch is None:
            return contextlib.nullcontext()
        named = list(self.network.named_modules())
        generic = [
            prefix
            for prefix, m in named
            # (its own parameters: those of the containers and the modules marked by
            # rc.read_by_holder it holds too; found by review: a holder of such parameters
            # alone, its counter advanced by the generic kernel's calls, was refused as
            # using them outside its calls)
            if any(p.requires_grad for _, p in own_parameters(m))
            and evaluated_per_sample(m, kernel)
            and next(m.buffers(), None) is not None
        ]
        if not generic:
            return contextlib.nullcontext()
        inside = [
            (prefix, m)
            for prefix, m in named
            if any(prefix == g or prefix.startswith(f"{g}.") or not g for g in generic)
        ]
        return buffers_kept(self.network, self._batch[3].copies, inside)

    def _commit(self, params, solved: set[str]) -> None:
        """Keep K-FAC's state of a step on ``params`` (the trainable ``(name, parameter)``
        pairs) that succeeded, which solved for the gradient of the recorded pass of
        ``solved`` (names; not a ``.grad`` no backward pass since reached, whose zeros
        ``zero_grad(set_to_none=False)`` left: found by review, a branch kept aside at a
        refresh was cached with its ``Gamma`` of zero all the same, 1.3-2.9x off the fresh
        direction once the loss used it again)."""
        if self._kfac is not None:
            self._kfac.commit(params, solved)

    def _warn_hooked_forward(self) -> None:
        """Warn once (:class:`~riemann_core._warn.HookWarning`, before anything is done:
        as an error, it changes nothing) where the recorded forward pass registered gradient
        hooks: they are part of the network, and run on the metric's factor rows as on the
        gradient, so a hook that stores the gradient it is given (Grad-CAM) holds a metric
        row afterwards (found by a hunt: 1.3-18x off dL/do after pre.step(), silently)."""
        capture = self._capture
        if capture is None or self._hooks_warned or not capture.hooked_in_forward:
            return
        warn(
            "the model's forward pass registers gradient hooks (a tensor's register_hook, a "
            "module's backward hook): they are part of the network, and run on the metric's "
            "factor rows as on the gradient, so a hook that stores the gradient it is given "
            "(Grad-CAM's saved gradient) holds a metric row after pre.step() (after "
            "pre.backward(loss), a metric row or a batched tensor torch refuses to read); the "
            "direction is exact. Read such a value between loss.backward() and pre.step() "
            "(in place of pre.backward(loss)). Shown once per preconditioner; "
            "warnings.filterwarnings('ignore', category=riemann_core.HookWarning) hides it",
            HookWarning,
        )
        self._hooks_warned = True

    @eager_when_traced
    @torch.no_grad()
    def step(self) -> None:
        """Replace every trainable ``.grad`` by the preconditioned direction.

        A trainable parameter without a ``.grad`` keeps ``None`` and enters the solve as a
        zero gradient where that is exact: its module was not called in the recorded
        forward pass (a branch not taken), or the pass's output does not depend on it (an
        auxiliary head kept aside): its rows of the metric are zero; or, under
        ``layerwise`` and ``kfac``, no parameter of its module has a ``.grad`` (a block
        independent of the others). Otherwise the metric couples it with parameters that
        have a ``.grad`` and its gradient was left out (``loss.backward(inputs=...)``, a
        ``.grad`` set to ``None``, ``torch.autograd.grad``): ``ValueError`` naming them,
        every ``.grad`` as it was (freeze them with ``requires_grad_(False)`` before the
        forward pass to precondition without them). See ``docs/api.md``."""
        with distributed.share_failure(self.process_group, self.timeout):
            self._check_not_removed("pre.step()")
            self._warn_hooked_forward()
            self._stepping = True
            if self._batch is None:
                raise RuntimeError(
                    "pre.step() needs the batch of a forward pass: call model(x) and "
                    f"loss.backward() before pre.step(){_outside_model(self._capture)}"
                    f"{self._alone_note()}"
                )
            self._check_unchanged("pre.step()")
            if not self._synced:
                raise ValueError(
                    "the forward pass pre.step() uses ran inside DistributedDataParallel's "
                    "no_sync(), so each rank's .grad holds its own shard's gradient, not the "
                    "average over the ranks the global batch's direction needs: call "
                    "pre.step() after a micro-batch whose forward and backward run outside "
                    "no_sync() (DDP then averages the accumulated .grad)"
                )
            if self._capture is not None:
                _check_own_parameters(self._capture, self.model, "pre.step()")
            outputs = self._output[0] if self._output and len(self._output) == 1 else None
            metric = self._options.loss, self._options.output_metric
            if (
                SOLVERS[self.method].NEEDS_FACTOR
                and outputs is not None
                and classes_along_positions(outputs, *metric)
            ):
                raise ValueError(
                    f"pre.step() cannot tell where the classes lie in the outputs "
                    f"{tuple(outputs.shape)}: its gradient comes from a loss it does not see. Call "
                    "pre.backward(loss) instead of loss.backward() and pre.step() (it checks "
                    "the loss's gradient), or pass a callable output_metric (it receives the "
                    "outputs flattened per sample)"
                )
            checks = Deferred()
            params = check_model(self.network, checks, unprobed_kernel=unprobed(self._options))
            check_damping_fits(self._options.damping, params, self._options.solve_dtype)
            with_grad = {n: p.grad for n, p in params if p.grad is not None}
            if not with_grad:
                raise RuntimeError(
                    "no parameter has a .grad; call loss.backward() before pre.step()"
                )
            self.overflowed = False
            if self._scaling:
                _check_not_unscaled(self.grad_scaler)
            if self._scaling and _overflowed(with_grad):  # the scaler's to skip
                # NaN in every .grad, so that every optimiser's scaler.step skips (one whose
                # own .grad stayed finite would apply them unpreconditioned)
                _fill_nan([p for n, p in params if n in with_grad])
                self.diagnostics, self._written = [], []
                self._accumulations.mark([])
                self._note_overflow(True)
                return
            device = params[0][1].device
            check_generator(self._options.generator, self._options.output_metric, device)
            check_inputs(*self._batch[:2], None, checks)  # an empty shard, named
            for name, p in params:
                if name in with_grad:
                    _check_grad(name, p.grad, p.dtype, checks)
            self._check_not_preconditioned(with_grad, params, checks)
            _check_not_written_by_another(self, with_grad, params)
            if (
                self._passes is not None
                and torch.distributed.get_world_size(self.process_group) > 1
            ):
                checks.run()  # the data first: a NaN input names itself (found by a hunt:
                # it was blamed on the loss, its gradient at the outputs being NaN)
                self._passes.check_mean()  # (one rank: its gradient as it is, any loss)
                self._passes.check_grads_kept(params)
            if (
                self._differentiated is not None
                and not self._differentiated.seen
                and not self._as_written(with_grad)  # (stepped again: checked above)
            ):
                # found by a hunt: the metric at the evaluation's batch, 6x off; and (found
                # by a hunt) at the batch before, where a compiled pass ran without hooks
                raise RuntimeError(
                    "no gradient flowed back through the model's last forward pass with "
                    "gradients enabled since the last step, whose batch pre.step() takes the "
                    "metric at: a pass after the one loss.backward() went through (an "
                    "evaluation) replaced it, the pass the gradient came from was not "
                    f"recorded{_COMPILED_BEFORE if _compiled_anywhere() else ''}, the "
                    "gradient came through no forward pass (a penalty on the parameters "
                    "alone), or the only backward pass through the last one took no "
                    "parameter's gradient (torch.autograd.grad with respect to its inputs: "
                    "a saliency map, an adversarial example). Run evaluations under "
                    "torch.no_grad(), or call pre.step() before them; each pre.step() needs a "
                    "backward pass through the model's recorded output since the last one"
                    f"{_outside_model(self._capture)}{self._alone_note()}"
                )
            couples = _couples(self.method, self._options.kfac_bias)
            # (K-FAC's state too: a module whose .grad hold no gradient of this pass is not
            # called for it, its Gamma of this batch zero)
            unreached = (
                self._unreached(params) if couples or self._kfac is not None else frozenset()
            )
            reached = {n: g for n, g in with_grad.items() if n not in unreached}
            coupled = self._grads_coupled(params, reached, unreached)
        # a parameter without .grad that no .grad is coupled with (checked above, or by the
        # replay): a zero vector, left as None
        capture = self._capture

        def warned() -> None:
            if (
                capture is not None
                and SOLVERS[self.method].NEEDS_FACTOR
                and isinstance(capture.output, Tensor)
            ):
                names = {id(p): n for n, p in params}
                off = _off_output(capture, names, capture.stale())
                # a zeroed .grad (zero_grad(set_to_none=False)) is no gradient of the loss
                # (found by review); one host read, and only for such parameters
                off = [n for n in off if n in with_grad and bool(with_grad[n].ne(0).any())]
                _warn_off_output(off, self._options.damping)

        try:
            directions, self.diagnostics = self._transaction(
                lambda: self._solve(
                    {n: g.detach().clone() for n, g in with_grad.items()},
                    params,
                    checks,
                    coupled,
                    reused=self._check_data_kept,
                ),
                then=warned,
            )
        except GradientOverflow:  # the scaled direction overflowed: skipped, as above
            _fill_nan([p for n, p in params if n in with_grad])
            self.diagnostics, self._written = [], []
            self._accumulations.mark([])
            self._note_overflow(True)
            return
        if capture is not None:
            capture.reset()  # the pass is spent (a refusal keeps it, for a retry)
        for name, p in params:  # every direction exists before any .grad changes
            if name in directions:
                p.grad.copy_(directions[name])
        self._wrote(params, directions)
        self._note_overflow(False)
        self._commit(params, set(directions) - unreached)
        if self._passes is not None:
            self._passes.clear()
        if self._differentiated is not None:
            self._differentiated.spend()

    def _unreached(self, params) -> frozenset[str]:
        """The trainable ``params`` whose ``.grad`` is the tensor it was as the recorded
        forward pass started and that no backward pass accumulated into since (a hook per
        parameter, :class:`~riemann_core.passes.Accumulations`): it holds no gradient of
        that pass (found by review: after ``opt.zero_grad(set_to_none=False)`` and
        ``loss.backward(inputs=head)`` the body's zeros were taken as its gradient,
        ``full``'s head direction 9.5 in norm against 5.2 with the body frozen, silently;
        and again, by the next review, where ``clip_grad_norm_`` or a flat buffer of
        ``.grad`` views moved their versions: 17.2 against 3.1). A ``.grad`` assigned
        since is taken; one written in place is taken where a backward pass through the
        recorded output returned that parameter's gradient (``torch.autograd.grad``,
        written by hand; any of the passes, not only the first) and its version moved."""
        held, tick = self._grads_at_pass, self._tick_at_pass
        differentiated = self._differentiated
        return frozenset(
            n
            for n, p in params
            if p.grad is not None
            and id(p) in held
            and held[id(p)][0]() is p.grad
            and not self._accumulations.since(p, tick)
            and not (
                differentiated is not None
                and differentiated.returns(p)
                and p.grad._version != held[id(p)][1]
            )
        )

    def _grads_coupled(self, params, with_grad: dict[str, Tensor], unreached=frozenset()):
        """Refuse a trainable parameter without a ``.grad`` (or one no backward pass since
        the forward pass reached: ``unreached``) that the metric couples with one
        that has a ``.grad`` (:func:`_check_grads_coupled`), before any work, on the
        recorded pass's graph; where no record of it tells (with a ``process_group``, or
        hooks out of date: a parameter frozen, unfrozen or replaced since), the check for
        the pass run again (``None``: nothing to check). Nothing is read where every
        trainable parameter has a ``.grad``."""
        if len(with_grad) == len(params) or not _couples(self.method, self._options.kfac_bias):
            return None
        check = self._coupled_check(with_grad, unreached=unreached)
        capture = self._capture
        since = self._trainable_since(params)
        if since:  # (its graph holds none of them: the pass run again tells)
            return functools.partial(check, changed=since)
        if (
            capture is not None
            and isinstance(capture.output, Tensor)
            and capture.hooks_current(self.model)
            and not check(capture.output, capture.calls, alive=False)
        ):
            return None
        return functools.partial(check, alive=True)

    def _coupled_check(self, with_grad, **options):
        """:func:`_check_grads_coupled` of this preconditioner's model and method, for the
        parameters named in ``with_grad`` holding a gradient."""
        return functools.partial(
            _check_grads_coupled,
            model=self.network,
            method=self.method,
            with_grad=frozenset(with_grad),
            **options,
        )

    def _trainable_since(self, params) -> frozenset[str]:
        """The trainable ``params`` (``(name, parameter)`` pairs) that did not require grad
        in the recorded forward pass: unfrozen since, replaced, or of a module swapped in
        since. The pass's graph holds none of them, so no backward pass through it gives
        them a gradient, while the metric at the model as it is now (the pass run again)
        takes them in (found by a hunt: unfrozen between the forward pass and the step,
        ``full`` took their gradient as zero, 1.9 off the whole direction and 1.7 off the
        others' alone, silently)."""
        return frozenset(n for n, p in params if id(p) not in self._trained_at_pass)

    def _wrote(self, params, directions: dict[str, Tensor]) -> None:
        """Remember the ``.grad`` that now hold a direction, as they are now: their
        versions, and their :func:`_fingerprints` (no host sync) for writes through
        ``.data``, which leave the version as it was."""
        grads = [p.grad for name, p in params if name in directions]
        prints = _fingerprints(grads)
        # what the next backward passes add onto them, read from the first on: hooked now,
        # not at the next forward pass, before which a .grad set to None may come back a
        # tensor (a bucket view DistributedDataParallel assigns again, found by review)
        written = [p for name, p in params if name in directions]
        self._accumulations.hook(written)
        self._accumulations.mark(written)
        _note_writer(self, grads)
        self._preconditioned = True
        self._written = [
            _Written(weakref.ref(g), g._version, fingerprint, _sampled(g))
            for g, fingerprint in zip(grads, prints, strict=True)
        ]

    def _as_written(self, grads: dict[str, Tensor]) -> bool:
        """Whether every one of ``grads`` is a ``.grad`` the last call wrote, at the
        version it wrote."""
        written = {id(w.grad()): w.version for w in self._written if w.grad() is not None}
        return all(written.get(id(g)) == g._version for g in grads.values())

    def _check_not_preconditioned(self, grads: dict[str, Tensor], params, checks: Deferred) -> None:
        """Refuse ``.grad`` that hold a direction a call wrote: preconditioning them again
        would give ``G^{-2} g``. On the pass it was written for, the tensors written,
        whatever changed them since (a clip, even one that clips nothing, or a second
        backward: found by review, 57x off; a fresh ``.grad`` after ``opt.zero_grad()``,
        a new tensor, is taken); after a new forward pass, the same tensors at the same
        version and norm (a loss.backward() forgotten), or one version on where no backward
        pass accumulated into them (a gradient written in place, ``p.grad.copy_(g)``, reads
        as a backward pass added); and backward passes added to the direction
        (:meth:`_accumulated_onto`), as when accumulating micro-batches with a pre.step()
        after each (found by a hunt: 466x off), also where a clip, a decay or
        ``scaler.unscale_`` written into the direction after the step moved its version as
        a zeroing in place does (found by review: 1.6x to 8440x off, silently), or replaced
        it by a new tensor (``p.grad = p.grad * c``; found by review, 0.11x to 78x off), or
        under ``DistributedDataParallel``, whose averaged ``.grad`` written back moves it
        once more (found by review; between two synced micro-batches, by the next: 73x
        off): refused where the ``.grad`` the first of them added onto was not zero, read
        with ``checks`` (no host sync of its own), and the ``.grad`` is not zero now (read
        on refusal only: zeroed after another loss's pass landed on a head that the step's
        own pass does not reach, found by review). The norm is the
        fingerprint's (of evenly spaced entries of a large ``.grad``): one whose sampled
        entries read zero counts as a direction that may not be zero."""
        written = {id(w.grad()): w for w in self._written if w.grad() is not None}
        reached, onto = (
            (frozenset(), {}) if self._preconditioned else self._accumulated_onto(grads, params)
        )
        by_device: dict[torch.device, list[str]] = {}  # (Deferred reads a device's at once)
        for n, (_, reading) in onto.items():
            by_device.setdefault(reading[0].device, []).append(n)
        for names in by_device.values():  # (each's least and largest entry, one stack)
            readings = torch.stack([r for n in names for r in onto[n][1]])
            counts = [onto[n][0] for n in names]
            checks.require(
                readings.eq(0).all(),
                functools.partial(_refuse_added_onto, names, readings, counts, grads),
            )
        # by the version at the step, not DDP's bucket views, whose shared version counts a
        # bucket's writes (found by review), where no backward pass since added onto the
        # .grad written (what one found tells, above); a .grad zeroed and not reached since
        # is zero, preconditioned the same (host syncs, on suspicion only)
        added = [
            n
            for n, g in grads.items()
            if not self._preconditioned
            and id(g) in written
            and n not in reached
            and not g._is_view()
            and g._version == written[id(g)].version + 1
            and (written[id(g)].sampled or bool(written[id(g)].fingerprint != 0))
            and bool(g.any())
        ]
        if added:
            raise _added_error(added, several=False)

        same = [
            (n, g)
            for n, g in grads.items()
            if id(g) in written and (self._preconditioned or written[id(g)].version == g._version)
        ]
        if not same:
            return
        prints = _fingerprints([g for _, g in same])  # host syncs, on suspicion only
        # a zero direction preconditioned again is the same zero: not refused
        again = [
            n
            for (n, g), fingerprint in zip(same, prints, strict=True)
            if bool(g.any())
            and (self._preconditioned or bool(fingerprint == written[id(g)].fingerprint))
        ]
        if again:
            # on the pass it was written for, every write into the tensors written is
            # refused, a zeroing in place too (found by review: the message said
            # opt.zero_grad(set_to_none=False) before p.grad.copy_(g) would do)
            written_how = (
                "on the forward pass it was written for, a .grad it wrote is refused whatever "
                "wrote it since, opt.zero_grad(set_to_none=False) and p.grad.copy_(g) too: "
                "assign it, p.grad = g"
                if self._preconditioned
                else "a gradient written through .data is told from the direction by some "
                "of its entries, which a sparse one may leave as they were: assign it, "
                "p.grad = g; written in place, p.grad.copy_(g) reads as a backward pass "
                "added to the direction unless opt.zero_grad(set_to_none=False) zeroed it "
                "first"
            )
            raise RuntimeError(
                f"the .grad of {some(again)} still hold "
                "the direction the last pre.step() or pre.backward(loss) wrote, and another "
                "pre.step() would precondition it twice: call loss.backward() (after "
                "opt.zero_grad(), which sets them to None) before each pre.step(), and "
                "pre.step() once per backward; pre.backward(loss) needs no pre.step() "
                f"({written_how})"
            )

    def _accumulated_onto(
        self, grads: dict[str, Tensor], params
    ) -> tuple[frozenset[str], dict[str, tuple[int, Tensor]]]:
        """The ``grads`` (by name) whose first accumulation since the last direction was
        written added onto a ``.grad``, the tensor written or another
        (:meth:`~riemann_core.passes.Accumulations.onto`, whose hooks run before autograd
        adds into ``.grad`` and as it returns, and at the end of each backward pass, after
        ``DistributedDataParallel``'s write of the averaged ``.grad``); and of those,
        ``{name: (backward passes, the least and the largest entry of that .grad as the
        first added onto it, or zeros where a later one found zeros: device scalars)}``
        where each later one added onto the ``.grad`` the one before left, at the
        version it left (in place; or, under ``create_graph=True``, onto the new tensor it
        made), and the ``.grad`` is the one the last left. A zeroing in place between two,
        a clip or an unscale between two moves the version (not refused), and a ``.grad``
        set to ``None`` is seen so by the first. The reading tells a zeroing before the
        first (``opt.zero_grad(set_to_none=False)``, also through ``.data``; a zero tensor
        assigned) from anything else left there: the direction, clipped, decayed or
        unscaled, in place or assigned. Of views into one flat buffer
        (``gradient_as_bucket_view=True``), whose version counts every write into the
        buffer, each accumulation reads the buffer's version as the backward pass first
        reached it: a write into any view between two passes is one between."""
        reached = set()
        onto = {}
        for name, p in params:
            g = grads.get(name)
            seen = None if g is None else self._accumulations.onto(p)
            if seen is None or seen[1] is None:
                continue
            count, reading, intact, last = seen
            reached.add(name)
            if intact and last is g:
                onto[name] = (count, reading)
        return frozenset(reached), onto

    def _note_overflow(self, overflowed: bool) -> None:
        """Set :attr:`overflowed`; warn when the steps of :data:`OVERFLOWS_IN_A_ROW` scales
        in a row overflowed (the scale halved as often: a ``.grad`` that no optimiser
        zeroes?). Calls at one scale count once: the micro-batches of one step share it."""
        self.overflowed = overflowed
        if not overflowed:
            self._overflows_in_a_row, self._overflow_scale = 0, None
            return
        scale = self.grad_scaler.get_scale()  # a host read, on an overflow only
        if scale != self._overflow_scale:
            self._overflows_in_a_row, self._overflow_scale = self._overflows_in_a_row + 1, scale
        if self._overflows_in_a_row == OVERFLOWS_IN_A_ROW and scale == self._overflow_scale:
            warn(
                f"{OVERFLOWS_IN_A_ROW} steps in a row overflowed and were skipped: the "
                f"scale is now {scale:.1e}. A .grad that holds NaN or "
                "inf from an earlier step stays so: opt.zero_grad() zeroes its optimiser's "
                "parameters only, so freeze a trainable parameter that no optimiser holds "
                "(requires_grad_(False)) or zero its .grad. A loss infinite whatever the scale "
                "(log(0) in the data's terms) overflows at every scale too: check the data. "
                "(A preconditioned direction that "
                "overflows is skipped at every scale above 1 and refused at 1: raise the "
                "damping if it is the cause)",
                RuntimeWarning,
            )

    @property
    def _scaling(self) -> bool:
        """Whether an overflowed gradient is handed to an enabled ``grad_scaler``."""
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    @property
    def options(self) -> Options:
        """The options the preconditioner was built with (read-only: set :attr:`damping`
        to change the damping, build another preconditioner for other options)."""
        return self._options

    @property
    def damping(self) -> float:
        """The damping ``mu`` of ``(G + mu I)^{-1}``. Set it between steps, for a schedule
        or a Levenberg-Marquardt rule (checked as the constructor checks it; a data-parallel
        group must set the same on every rank, or the next step is refused). K-FAC's cached
        factorisations are damped again at once from the same factors (their
        eigendecompositions reused; with factored damping, its Choleskys taken again), so
        the refresh schedule, the step count and the running averages are kept; a value
        equal to the current one changes nothing. A checkpoint does not hold the damping:
        set it before or after :meth:`load_state_dict`, the steps that follow are the same."""
        return self._options.damping

    @damping.setter
    def damping(self, value: float) -> None:
        check_damping(value)
        trainable = [(n, p) for n, p in self._network.named_parameters() if p.requires_grad]
        check_damping_fits(float(value), trainable, self._options.solve_dtype)
        if float(value) == self._options.damping:
            return
        options = replace(self._options, damping=float(value))
        if self._kfac is not None:
            self._kfac.redamp(options)  # raises SolveError, the cache and damping kept
        self._options = options

    def __deepcopy__(self, memo):
        # the hooks are the model's modules', the record their last forward pass: a copy
        # would record nothing, or precondition with the original's batch
        raise TypeError(
            "a RiemannianPreconditioner cannot be deep-copied (its hooks belong to its "
            "model's modules, its record to their last forward pass): copy the model, build "
            "a new RiemannianPreconditioner on the copy and load_state_dict(pre.state_dict())"
        )

    def __reduce_ex__(self, protocol):
        # pickle and torch.save met a weak reference and said only that; copy.copy
        # shared the record and the hooks between two preconditioners
        raise TypeError(
            "a RiemannianPreconditioner cannot be copied, pickled or saved whole (its hooks "
            "belong to its model's modules, its record to their last forward pass): save "
            "pre.state_dict() beside the model's and the optimizer's, and load it into a new "
            "RiemannianPreconditioner (on a copy of the model, for a copy) with load_state_dict"
        )

    def state_dict(self) -> dict:
        """The state a checkpoint needs to resume the preconditioner, beside the model's
        and the optimiser's ``state_dict()``: ``{"method": ..., "kfac": ...}``.

        Only K-FAC with ``kfac_refresh > 1`` or ``kfac_decay > 0`` keeps state across
        steps: the step count, the running averages and the factors its cached
        factorisations came from (:mod:`riemann_core.methods.kfac_checkpoint`); every other
        preconditioner has none (``"kfac": None``). Plain data: ``torch.save`` writes it,
        ``torch.load(..., weights_only=True)`` reads it."""
        kfac = None if self._kfac is None else kfac_checkpoint.state_dict(self._kfac, self._options)
        return {"method": self.method, "kfac": kfac}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`'s ``state``: on the same machine the steps that
        follow are those of the run that saved it, to the bit (the cached factorisations
        are computed again from their saved factors; with ``pre.backward``, Conv2d layers
        and a ``solve_dtype`` other than the model's may differ by rounding,
        docs/api.md#checkpoints). A state of another method or other
        K-FAC options, or one that does not fit the model, is refused (``ValueError``,
        naming it) and the preconditioner left as it was."""
        if not isinstance(state, dict) or set(state) != {"method", "kfac"}:
            raise ValueError(
                "load_state_dict takes what RiemannianPreconditioner.state_dict() returned "
                f"(a dict with 'method' and 'kfac'), got {kfac_checkpoint.describe(state)}"
            )
        if not isinstance(state["method"], str) or state["method"] != self.method:
            raise ValueError(
                f"the state was saved by a method={state['method']!r} preconditioner, this one "
                f"has method={self.method!r}: build it with the saved run's method"
            )
        if (state["kfac"] is None) != (self._kfac is None):
            saved, ours = ("no", "keeps") if state["kfac"] is None else ("a", "keeps no")
            raise ValueError(
                f"the state holds {saved} K-FAC state across steps, and this preconditioner "
                f"{ours} such state: build it with the saved run's kfac_refresh and kfac_decay"
            )
        if self._kfac is not None:
            kfac_checkpoint.load(self._kfac, state["kfac"], self.network, self._options)

    def _note_step(self, optimizer: torch.optim.Optimizer, stepped: _Stepped) -> None:
        """An optimizer step took place (see :func:`_optimizer_stepped`) over the
        parameters ``stepped`` (those with a ``.grad``, which it updates, and any tensor
        whose memory they overlap):
        remembered where it updated the model's after the recorded forward pass and before
        any direction of that pass was written, which a fused optimizer's kernel does
        without moving their version counters (found by a hunt: ``opt.step()`` taken before
        ``pre.step()`` with ``fused=True`` went unrefused where the replay's check passed,
        K-FAC between refreshes always)."""
        if self._removed or self._batch is None or self._preconditioned or self._stepped:
            return
        names = [n for n, p, (at, _, device) in self._storages if stepped.updates(p, at, device)]
        if names:
            self._stepped = (names, type(optimizer).__name__)

    def _check_not_removed(self, call: str) -> None:
        """Refuse a call after :meth:`remove`: forward passes since are not recorded, so it
        would take the metric at the batch of the last one before (found by review: a step
        on a later batch's gradient, 8x off)."""
        if self._removed:
            raise RuntimeError(
                f"{call} after pre.remove() (or the end of its with block): the model's "
                "forward passes are no longer recorded; build a new RiemannianPreconditioner "
                "(load this one's state_dict() into it to keep K-FAC's state)"
            )

    def remove(self) -> None:
        """Detach the forward hooks from the model; the preconditioner is then spent (its
        ``state_dict()`` can still be saved)."""
        self._removed = True
        self._finalizer()
        # the views of the parameters' data keep their memory alive: a model moved or
        # given other data since (model.cpu(), p.data = ...) would keep its old copy for
        # as long as this preconditioner lives (found by review)
        self._data_views, self._data_at_pass = {}, None
        # nor does the record of the last forward pass, which no step can use now: its
        # inputs, outputs and buffer copies (and the capture's graph) were kept for as long
        # as the preconditioner lived, past the end of a with block (found by a hunt)
        self._batch = self._output = self._differentiated = None
        self._previous, self._handled = {}, None
        self._versions, self._storages, self._grads_at_pass = [], [], {}
        if self._capture is not None:
            self._capture.reset()

    def _attach(self, role: str, hooks) -> None:
        """``hooks`` (a hook's handle, or a :class:`Capture`) kept to be detached, in place
        of the ones of the same role before (detached by the caller)."""
        self._attached[role] = hooks

    @property
    def _hook(self):
        """The handle of the forward pre-hook that records a batch."""
        return self._attached["record"]

    @property
    def _output_hook(self):
        """The handle of the forward hook that records the output."""
        return self._attached["record output"]

    @property
    def _capture(self) -> Capture | None:
        """The capture of the user's forward passes (``None`` where ``pre.backward(loss)``
        does not run: across processes, or on a ``DistributedDataParallel``'s module)."""
        return self._attached.get("capture")

    def __enter__(self) -> RiemannianPreconditioner:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


#: The preconditioners an optimizer step is reported to (held weakly).
_STEP_WATCHERS: weakref.WeakSet[RiemannianPreconditioner] = weakref.WeakSet()
_STEP_HOOK: list = []  # the handle of the hook on every optimizer's step, once registered


def _watch_optimizer_steps() -> None:
    """Register :func:`_optimizer_stepped` on every ``torch.optim`` optimizer's step, once
    per process."""
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK.append(ours(register_optimizer_step_post_hook(_optimizer_stepped)))


def _optimizer_stepped(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer's ``step()``: tell each preconditioner whose recorded forward
    pass still awaits its direction which parameters the step updated (those with a
    ``.grad``). Nothing is read where none awaits one, as in the order the docs give
    (``pre.step()`` or ``pre.backward(loss)`` before ``opt.step()``)."""
    waiting = [
        pre
        for pre in list(_STEP_WATCHERS)
        if pre._batch is not None and not pre._preconditioned and pre._stepped is None
    ]
    if not waiting:
        return
    stepped = _Stepped(
        [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    )
    for pre in waiting:
        pre._note_step(optimizer, stepped)


class _Stepped:
    """The parameters an optimizer step updated: those it holds with a ``.grad``, and a
    parameter whose data, where the recorded pass found it, lies inside one of them
    (found by review: the model's parameters as views of one flat buffer that the
    optimizer holds as its parameter, as contiguous parameter buffers keep them: a step
    of the buffer before ``pre.step()`` moved no version counter of theirs, fused or not,
    and K-FAC between refreshes took it silently)."""

    def __init__(self, params: list[Tensor]):
        self._params = params
        self._ids = {id(p) for p in params}
        self._spans: dict | None = None  # {device: (starts in order, running max of ends)}

    def updates(self, p: Tensor, pointer: int | None, device: torch.device) -> bool:
        """Whether ``p``, whose data lay at ``pointer`` on ``device``, was updated."""
        if id(p) in self._ids:
            return True
        if not pointer:  # no storage (torch.func's wrappers), or a meta tensor
            return False
        if self._spans is None:  # (read once a step, and only where a pass awaits)
            self._spans = _spans(self._params)
        starts, ends = self._spans.get(device, ((), ()))
        i = bisect.bisect_right(starts, pointer)  # those that start at or before it
        return i > 0 and ends[i - 1] > pointer  # one of them ends after it


def _spans(params: list[Tensor]) -> dict:
    """Where the data of ``params`` lies, by device: the first byte of each, in order, and
    the largest end (past the last byte) among those up to each."""
    by_device: dict = {}
    for p in params:
        pointer = _pointer(p)
        if not pointer or not p.numel():
            continue
        if p.is_contiguous():
            size = p.numel()
        else:
            size = 1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride(), strict=True))
        by_device.setdefault(p.device, []).append((pointer, pointer + size * p.element_size()))
    out = {}
    for device, spans in by_device.items():
        spans.sort()
        ends, most = [], 0
        for _, end in spans:
            most = max(most, end)
            ends.append(most)
        out[device] = ([s for s, _ in spans], ends)
    return out


def _pointer(p: Tensor) -> int | None:
    """Where ``p``'s data lies, ``None`` for a tensor without storage (torch.func's
    wrappers of a pass under ``functional_call``) or without data yet (a lazy module's
    parameter, which its first call, the pass under way, shapes)."""
    if is_lazy(p):
        return None
    try:
        return p.data_ptr()
    except RuntimeError:
        return None


def _refuse_data_changed(names: list[str]) -> None:
    """The refusal of :meth:`RiemannianPreconditioner._check_data_kept`."""
    raise RuntimeError(
        f"parameters {some(names)} changed after the forward pass that pre.step() uses, "
        "before its direction was written, through .data (p.data.add_(-lr * p.grad), "
        "p.data = ..., a write to a buffer they are views of), which moves no version "
        "counter, and K-FAC between refreshes runs no forward pass again that would see it "
        "(an update taken before pre.step() goes along the raw gradient, the direction "
        "unused): call pre.step() before opt.step() or the update, and before the weights "
        "are put back"
    )


def _data_key(p: Tensor, pointer: int | None) -> tuple:
    """What a :func:`_data_view` of ``p`` reads: the parameter, its memory (at ``pointer``)
    and strides, and last the layout its :func:`_data_prints` is comparable across (shape,
    dtype, device)."""
    return id(p), pointer, p.stride(), p.shape, p.dtype, p.device


#: The integers of each width that :func:`_data_view` reads entries as.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: A tensor of at most this many entries is read whole by :func:`_data_prints`.
_READ_WHOLE = 1 << 14


def _data_view(p: Tensor) -> Tensor:
    """``p``'s entries as integers of their width (their bit patterns), flattened where
    :func:`_data_prints` takes them whole (a vector, a scalar, a tensor of up to
    :data:`_READ_WHOLE` entries): a view of ``p``'s memory (a copy where such a ``p`` is
    not contiguous)."""
    if p.is_complex():
        p = torch.view_as_real(p)
    bits = p.view(_BITS[p.element_size()])
    return bits.reshape(-1) if bits.dim() < 2 or bits.numel() <= _READ_WHOLE else bits


def _data_prints(views: list[Tensor]) -> Tensor:
    """What tells the data of tensors (on one device, their :func:`_data_view`) from other
    data: one integer tensor, each one's part as long as its view. A small tensor's entries
    themselves (a copy: a bias, a norm's scale); a larger one's sums of the bit patterns
    along each slice of its first dimension (a row of a weight): a copy and its comparison
    cost 5x the sums (1.0 against 0.19 ms a step for 784-1024-1024-10 on one core).
    Integer sums are exact (modulo 2^32, 2^64 for 8-byte entries): the same data gives
    the same print whatever the order of the sum, the threads or the memory (a float sum
    need not, and ``p.data = p.data.clone()`` could be refused), and one entry changed
    changes its row's sum. Several changes escape where their changes of the bit patterns
    cancel modulo 2^32 in every row they touch: two entries swapped, every entry of a row of
    even length negated (``p.data.neg_()``: each moves by 2^31), or scaled by a power of
    two where a row holds a multiple of 512 nonzero entries (``p.data.mul_(0.5)`` on a
    1024-wide weight: each moves by 2^23; found by review; an int64 sum would catch these
    at 4.4x the sums' cost); a float
    sum, even in float64, misses far more: the output layer's gradient under
    cross-entropy sums to zero, and the float32 sum of a weight stepped along it stayed
    the same to the bit."""
    return torch.cat(
        [
            v
            if v.dim() == 1
            else v.sum(
                tuple(range(1, v.dim())),
                dtype=torch.int64 if v.element_size() == 8 else torch.int32,
            )
            for v in views
        ]
    )


def _detach(attached: dict) -> None:
    """Remove the hooks and captures a preconditioner attached to its model (removing one
    again does nothing)."""
    for hooks in attached.values():
        hooks.remove()


def _shared(calls) -> bool:
    """Whether a parameter takes part in more than one of the recorded ``calls`` (a module
    called twice, a tied weight): a block K-FAC has no Kronecker factors for."""
    names = [n for c in calls for n in c.param_names]
    return len(names) > len(set(names))


def _couples(method: str, kfac_bias: str) -> bool:
    """Whether ``method``'s metric couples parameters that a ``.grad`` left out may split:
    every method but ``euclidean`` (``G = I``) and K-FAC with the bias apart, whose blocks
    each hold one parameter."""
    return method != "euclidean" and not (method == "kfac" and kfac_bias == "separate")


def _check_grads_coupled(
    output: Tensor,
    calls: list[Block],
    model: nn.Module,
    method: str,
    with_grad: frozenset[str],
    alive: bool = True,
    changed: frozenset[str] = frozenset(),
    call: str = "pre.step()",
    unreached: frozenset[str] = frozenset(),
) -> bool:
    """Refuse trainable parameters of the ``calls`` of a forward pass without a ``.grad``
    (not in ``with_grad``) that ``method``'s metric couples with parameters that have one
    (``full`` and ``natural``: all of them; ``layerwise`` and K-FAC's joint blocks: those of
    one block), both in the autograd graph of the pass's ``output``. Autograd gives every
    leaf of a loss's graph a ``.grad``, so theirs was left out (``loss.backward(inputs=...)``,
    a ``.grad`` set to ``None``, ``torch.autograd.grad``), and taking it as zero gives
    neither the direction of all the parameters nor that of the others alone (found by a
    hunt: a head's direction 12.4 in norm after a backward restricted to it, against 5.2
    with the backbone frozen and 3.2 in the whole direction). A module not called (a branch
    not taken), a call whose output the output does not depend on (an auxiliary head kept
    aside, a call under ``torch.no_grad()``) and a parameter the call does not use have zero
    rows in the metric: taken as zero, exactly. A block wholly without ``.grad`` is
    independent of the others (``layerwise``, ``kfac``). The graph is walked only where some
    block mixes both (every node once: about 1 us each).

    A parameter the output reaches only through a custom ``torch.autograd.Function`` may
    get no gradient from ``loss.backward()`` (a backward that returns ``None`` for it: a
    non-differentiable op, a stop-gradient), and then has zero rows in the metric too
    (found by review: refused, where its zero was exact). Such a parameter is refused only
    where a backward pass of the ``output`` (``alive``: its graph not yet consumed) gives
    it a gradient; on a consumed graph, ``True``: the check is for the pass run again.
    ``changed``: the parameters that did not require grad in the user's forward pass
    (unfrozen, replaced or swapped in since; ``output`` and ``calls`` are then the pass
    run again), named as such; ``unreached``: those whose ``.grad`` no backward pass since
    the forward pass reached (not in ``with_grad``), named as such."""
    names: dict[int, str] = {}
    for c in calls:
        for n, p in zip(c.param_names, c.params, strict=True):
            if p.requires_grad:
                names.setdefault(id(p), n)
    if all(n in with_grad for n in names.values()):
        return False
    if method in ("full", "natural"):
        groups = [("", list(names))]
    else:
        groups = [
            (b.name, [id(p) for p in b.params if id(p) in names]) for b in group_calls(calls, model)
        ]
    mixed = [
        (block, ids)
        for block, ids in groups
        if any(names[i] in with_grad for i in ids) and any(names[i] not in with_grad for i in ids)
    ]
    if not mixed:
        return False
    in_graph, behind = _leaves_reached(output)
    lacking, blocks, unsure = [], [], {}
    for block, ids in mixed:
        reached = [i for i in ids if i in in_graph or i in behind]
        if any(names[i] in with_grad for i in reached):
            missing = [i for i in reached if names[i] not in with_grad]
            lacking += [names[i] for i in missing if i in in_graph]
            blocks += [block] if any(i in in_graph for i in missing) else []
            unsure |= {i: block for i in missing if i not in in_graph}
    if unsure and not lacking:
        if not alive:
            return True  # (the recorded graph is consumed: the pass run again tells)
        params = {id(p): p for c in calls for p in c.params if id(p) in unsure}
        ids = list(params)
        grads = torch.autograd.grad(
            output, [params[i] for i in ids], torch.ones_like(output),
            retain_graph=True, allow_unused=True,
        )  # fmt: skip
        for i, g in zip(ids, grads, strict=True):
            if g is not None:
                lacking.append(names[i])
                blocks += [] if unsure[i] in blocks else [unsure[i]]
    if not lacking:
        return False
    if method in ("full", "natural"):
        metric = (
            f"method={method!r} solves one metric over all the trainable parameters, which "
            "couples them with the parameters that have a .grad"
        )
        whole, fix = "all the parameters", ""
    else:
        what = "Kronecker block (kfac_bias='joint')" if method == "kfac" else "block of the metric"
        metric = (
            f"method={method!r} couples the parameters of a module (its {what}), and "
            f"modules {some(blocks)} hold parameters with a .grad too"
        )
        whole = "their modules' parameters"
        fix = (
            "; a module whose parameters all lack a .grad is left out exactly (its "
            "direction is not written)"
            + (", and kfac_bias='separate' solves a bias apart" if method == "kfac" else "")
        )
    count = f" ({len(lacking)} in all)" if len(lacking) > 3 else ""
    since = [n for n in lacking if n in changed]
    if since:
        raise ValueError(
            f"parameters {some(since)} train now but did not in the forward pass {call} "
            "takes the metric at (unfrozen with requires_grad_(True), replaced, or their "
            "module swapped in after it), so its graph gives them no gradient, while the "
            f"metric at the model as it is now takes them in. {metric}, so taking their "
            f"gradient as zero would give neither the direction of {whole} nor that of the "
            "others alone. Change the model before the forward pass: run model(x) and the "
            "backward pass again"
        )
    held = [n for n in lacking if n in unreached]
    none = [n for n in lacking if n not in unreached]
    which = " and ".join(
        ([f"{some(none)}{count if not held else ''} have no .grad"] if none else [])
        + (
            [
                f"{some(held)} hold a .grad that no backward pass since the forward pass "
                "reached (opt.zero_grad(set_to_none=False) leaves zeros there)"
            ]
            if held
            else []
        )
    )
    raise ValueError(
        f"parameters {which}, though they took part in the "
        "forward pass pre.step() takes the metric at (their modules were called and its "
        "output depends on them), and loss.backward() gives every such parameter a .grad: "
        "theirs was left out (a backward restricted with loss.backward(inputs=...), a .grad "
        "set to None by hand, gradients taken with torch.autograd.grad, or they were unfrozen "
        f"with requires_grad_(True) only after the forward pass). {metric}, so "
        f"taking their gradient as zero would give neither the direction of {whole} nor "
        "that of the others alone. To precondition without them, freeze them with "
        "requires_grad_(False) before the forward pass; otherwise give them their gradient "
        f"(loss.backward() over all the parameters, unfrozen before the forward pass){fix}"
    )


def _leaves_reached(output: Tensor) -> tuple[set[int], set[int]]:
    """``(plain, behind)``: the ids of the leaves whose gradient (``AccumulateGrad``) the
    autograd graph of ``output`` reaches by a path without a custom
    ``torch.autograd.Function`` (whose backward may return ``None``), and of those it
    reaches only through one. Every node once."""
    plain, behind = set(), set()
    custom, seen = [], set()
    for found, roots in ((plain, [output.grad_fn]), (behind, None)):
        stack = roots if roots is not None else [n for c in custom for n, _ in c.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf's gradient
            if variable is not None:
                found.add(id(variable))
            if roots is not None and isinstance(node, torch.autograd.function.BackwardCFunction):
                custom.append(node)  # walked after every plain path
                continue
            stack.extend(next_node for next_node, _ in node.next_functions)
    return plain, behind - plain


def _views_made(attributes) -> None:
    """Give each view requiring grad among the plain attributes of the modules of
    ``attributes`` (:func:`~riemann_core.modules.replayed_attributes`: a module of a type
    not torch's own, or with its forward replaced), and the lists and dicts they hold,
    the autograd node that autograd makes as the view is first read after its base
    changed in place, numbered then (a view of a weight kept across passes, self.cache =
    self.weight.t() built once, after opt.step(): found by a hunt, its node numbered
    inside the next pass, which took it for one of that pass's, 1.8-4.2x off silently)."""
    for _, state, held in attributes:
        for values in (state.values(), *(c.values() if type(c) is dict else c for _, c in held)):
            for value in values:
                try:
                    view = isinstance(value, Tensor) and value.requires_grad and value._is_view()
                except ReferenceError:  # a weakref.proxy whose object is gone: no tensor
                    continue
                if view:
                    with contextlib.suppress(RuntimeError):  # (the pass's own to raise)
                        value.grad_fn  # noqa: B018


def _walk_loss_graph(
    loss: Tensor, names: dict[int, str], start: int | None = None, casts_cached: bool = False
) -> tuple[list[Tensor], set[str], bool, set[str], bool, bool]:
    """``(foreign, reached, compiled, kept, crossed, module_hooked)``: the leaves ``loss``
    reaches that are not the preconditioned parameters (``names``: ``{id(p): name}``) and
    require a gradient (one frozen since the forward pass gets none from
    ``loss.backward()`` either: found by a hunt, torch's error where it was
    differentiated), the names of those it reaches (the
    ``.grad`` that ``loss.backward()`` would write), whether its graph holds the backward
    of a compiled forward (``torch.compile``), and the names of those it reaches through
    a node made before ``start`` (:func:`~riemann_core.capture.sequence_now` as the
    recorded pass started; ``None``: not known): a tensor derived from them in an earlier
    pass and kept since, a cache built once on a module, which the fused backward pass
    carries the gradient through and the kernels do not see (found by a hunt: from the
    second ``pre.backward(loss)`` on, 1.8-15x off, silently). A node made before the pass
    on the way to other leaves (a backbone run before the model, an input computed with
    gradients) is no such path; nor, where ``casts_cached`` (the pass ran under
    ``torch.autocast``), a cast of leaves, which autocast keeps for its region (found by
    the tests: accumulation over two passes in one region). Every node once (the nodes
    under one made before the pass are older still, walked after): about 1 us each.
    ``crossed``: whether a node is numbered at or above one it feeds, so was made in
    another thread (autograd numbers each thread's nodes apart, and a node of one thread
    above all the nodes of its inputs made there): ``start`` then orders none of that
    thread's, and ``kept`` says nothing (found by review: a ``torch.tanh`` between two
    modules run by a thread pool's worker was refused as such a tensor from the second
    ``pre.backward(loss)``, exact before). ``module_hooked``: whether the graph holds a
    module's backward hook (:data:`~riemann_core.capture.MODULE_HOOK_NODE`)."""
    foreign, reached, compiled, kept, crossed = [], set(), False, set(), False
    module_hooked = False
    seen, stack, older = set(), [(loss.grad_fn, None)], []
    for phase in (0, 1):
        while stack:
            node, above = stack.pop()  # (above: the number of the node it feeds)
            if node is None:
                continue
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf's gradient
            if phase and variable is not None and id(variable) in names:
                kept.add(names[id(variable)])
            if variable is None:
                number = node._sequence_nr()
                # made by the thread that made the node it feeds, it is numbered below it;
                # but for a view's node made anew as the view is read after its base
                # changed in place, numbered as the node it feeds is made (found by review:
                # h[:, :1] kept past a relu_ on h sent every pass to the autograd path)
                crossed = crossed or (
                    above is not None and number >= above and not _rebuilt_view(node, above)
                )
            if node in seen:
                continue
            seen.add(node)
            if variable is not None:
                if id(variable) in names:
                    reached.add(names[id(variable)])
                elif variable.requires_grad:
                    foreign.append(variable)
                continue
            kind = type(node).__name__
            compiled = compiled or kind == coupling.COMPILED_BACKWARD
            module_hooked = module_hooked or kind == MODULE_HOOK_NODE
            if (
                not phase
                and start is not None
                and number < start
                and not (casts_cached and cast_of_leaves(node))
            ):
                older.append(node)
                continue
            stack.extend((next_node, number) for next_node, _ in node.next_functions)
        stack = [(n, node._sequence_nr()) for node in older for n, _ in node.next_functions]
    return foreign, reached, compiled, kept, crossed, module_hooked


def _rebuilt_view(node, above: int) -> bool:
    """Whether ``node``, numbered at or above ``above`` (the node it feeds), is a view's
    node that autograd made anew as the view was read after its base changed in place
    (``AsStridedBackward``), from a base node numbered below ``above``: made by the same
    thread while it made the node it feeds."""
    return type(node).__name__.startswith("AsStridedBackward") and all(
        n is None or getattr(n, "variable", None) is not None or n._sequence_nr() < above
        for n, _ in node.next_functions
    )


def _gradients_of(loss: Tensor, leaves: list[Tensor]) -> tuple[Tensor, ...]:
    """The gradients of ``loss`` at ``leaves`` (outside the preconditioned model), its
    graph kept for the directions."""
    try:
        return torch.autograd.grad(loss, leaves, retain_graph=True)
    except RuntimeError as err:
        if "reentrant" not in str(err) and "checkpoint" not in str(err):
            raise
        raise ValueError(
            f"the loss reaches {len(leaves)} tensors outside the preconditioned model "
            "through torch.utils.checkpoint with use_reentrant=True, which only "
            "loss.backward() can differentiate: pass use_reentrant=False (where the "
            "checkpoint is outside the preconditioned model, loss.backward() and then "
            "pre.step() also work)"
        ) from err


def _accumulate(leaves: list[Tensor], grads) -> None:
    """Add ``grads`` into the ``.grad`` of ``leaves`` as ``loss.backward()`` does: in place
    into a ``.grad`` there, else a tensor of the leaf's own layout (autograd's may be a
    broadcast, stride 0, or shared by two leaves; found by review: in-place clips then
    failed, or scaled a shared one twice)."""
    for leaf, grad in zip(leaves, grads, strict=True):
        if leaf.grad is None:
            leaf.grad = torch.empty_like(leaf).copy_(grad)
        else:
            leaf.grad.add_(grad)


#: The record of a forward pass (:meth:`RiemannianPreconditioner._record`), kept from the
#: last complete pass while one runs.
#: A pre.backward(loss) refused after its backward pass consumed the loss's graph.
_REFUSED_AFTER_BACKWARD = (
    "was refused after its backward pass consumed the graph of the model's last forward "
    "pass: once the cause is fixed, run model(x) again and form a new loss"
)

_RECORD = (
    "_batch",
    "_placed",
    "_output",
    "_output_versions",
    "_differentiated",
    "_modes",
    "_python_at_pass",
    "_versions",
    "_storages",
    "_lazy_at_pass",
    "_stepped",
    "_data_at_pass",
    "_trained_at_pass",
    "_grads_at_pass",
    "_tick_at_pass",
    "_sequence_at_pass",
    "_spent",
    "_preconditioned",
    "_edited_in_forward",
    "_params_edited_in_forward",
    "_synced",
)


def _outside_model(capture: Capture | None) -> str:
    """What a refusal for a missing pass adds where the model's modules ran outside a call
    of the model (found by a hunt: ``checkpoint_sequential(model, 2, x)`` was told to call
    ``model(x)``, with no word of why the pass it ran was not one)."""
    name = None if capture is None else capture.outside
    if name is None:
        return ""
    return (
        f" (module {name!r} of the model ran with gradients enabled outside a call of the "
        "model itself, which the metric needs: torch.utils.checkpoint.checkpoint_sequential"
        "(model, ...) and model[i](x) call its children, not the model. Call model(x); "
        "to checkpoint segments, call checkpoint or checkpoint_sequential inside the "
        "forward of the model preconditioned, with use_reentrant=False)"
    )


#: What a refusal for a pass that was not recorded says where torch.compile ran.
_COMPILED_BEFORE = (
    " (a torch.compile'd model whose code was compiled before this preconditioner was "
    "built, or before torch.compiler.reset(), runs without its hooks: build the "
    "preconditioner before the first compiled call, or call torch.compiler.reset())"
)
#: torch.compile's count of frames it compiled at the last reset here.
_FRAMES_AT_RESET = [0]


def _compiled_frames() -> int:
    """:func:`~riemann_core.capture.compiled_frames` (a name of its own, patched by tests)."""
    return compiled_frames()


def _compiled_anywhere() -> bool:
    """Whether torch.compile has compiled code in this process."""
    return _compiled_frames() > 0


def _compile_again() -> None:
    """``torch.compiler.reset()`` where torch.compile compiled frames since the last
    reset here: code it built before a preconditioner's hooks never runs them (its guards
    skip module hooks), so it compiles again with them at the next call (found by a hunt:
    a compiled child got no direction, a compiled wrapper's pass was not recorded, 5-9x
    off). Process-wide: every compiled function compiles again."""
    frames = _compiled_frames()
    if frames > _FRAMES_AT_RESET[0]:
        torch.compiler.reset()
        _FRAMES_AT_RESET[0] = frames


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule is ``torch.compile``'d (``torch.compile(m)``'s
    wrapper, or ``m.compile()``)."""
    frames = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing compiled
    wrapper = getattr(frames, "OptimizedModule", ())
    return frames is not None and any(
        isinstance(m, wrapper) or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


def _check_own_parameters(capture: Capture, model: nn.Module, call: str) -> None:
    """Refuse a recorded pass in which modules ran with other tensors in place of their
    parameters (found by review: after ``torch.func.functional_call(model, {"2.weight":
    W}, x)`` the direction for ``W`` was written into the ``.grad`` of ``2.weight``, which
    the loss does not reach, and ``W`` got its plain gradient too). Not where the capture's
    hooks are out of date (a parameter replaced since: they are installed anew); also
    where a hook registered since runs between them and a forward (found by review: a
    read-only pre-hook registered after the preconditioner made every pre.step() blame
    state not replayed, and pre.backward consume the graph before that refusal)."""
    substituted = capture.substituted
    if capture.remarked and capture.owners_current(model):
        raise ValueError(
            f"modules {some(capture.remarked)} owned other parameters in the model's last "
            "forward pass than now: a mark of rc.read_by_holder was changed before that pass "
            f"and changed back after it. Keep the marks as they are from the forward pass to "
            f"{call}: run the "
            "forward pass again and form a new loss"
        )
    if substituted and capture.owners_current(model):
        raise ValueError(
            f"modules {some(substituted)} ran with other tensors in place of their "
            "parameters in the model's last forward pass (torch.func.functional_call, "
            f"torch.nn.utils.stateless), and {call} preconditions the model's own from that "
            "pass. If the loss comes from it, call the model itself, or precondition a model "
            "that holds those tensors as its parameters; if it was another pass, after the "
            f"loss's (per-sample gradients through torch.func for a log), run it after {call}"
        )


def _showing_parameters(calls: list[Block], stale: set[str]) -> list[Block]:
    """The recorded calls whose outputs show any NaN or inf in their parameters
    (:func:`~riemann_core.modules.shows_parameters`), read in their place: outputs as the
    calls returned them (not changed in place since, as by an in-place ReLU that zeroes
    ``-inf``; no global forward hook, which runs before the capture's and may have changed
    them: found by review, a clamp), with entries. A parameter written through ``.data``
    after the forward pass is not seen here, as no check sees such a write."""
    if torch.nn.modules.module._global_forward_hooks:
        return []
    return [
        c for c in calls if shows_parameters(c.module) and c.name not in stale and c.output.numel()
    ]


def _added_error(added: list[str], several: bool) -> RuntimeError:
    """The refusal of the ``.grad`` named in ``added``, which hold the direction the last
    call wrote with one backward pass (``several``: more) added since."""
    passes = "backward passes" if several else "one backward pass"
    return RuntimeError(
        f"the .grad of {some(added)} hold the "
        f"direction the last pre.step() or pre.backward(loss) wrote with {passes} "
        "added since, and pre.step() would precondition that direction again: "
        "call opt.zero_grad() before each step's backward passes (of an optimizer "
        "that holds these parameters: one over other parameters, a head's, leaves "
        "their .grad as they are; or freeze those it does not train), and when "
        "accumulating micro-batches, pre.step() once, after the last one's backward "
        "(a clip or decay of the direction after pre.step() leaves it there, written in "
        "place or assigned, p.grad = p.grad * c; a gradient written over it in place, "
        "p.grad.copy_(g), too: assign it, p.grad = g; and whatever a .grad holds other "
        "than zeros before the backward pass adds onto it reads as the direction, a decay "
        "or a gradient written into a .grad zeroed in place or assigned after "
        "opt.zero_grad(), p.grad = g: add it after the backward pass, p.grad += g)"
    )


def _refuse_added_onto(
    names: list[str], readings: Tensor, counts: list[int], grads: dict[str, Tensor]
) -> None:
    """Refuse the ``.grad`` of ``names`` whose first backward pass since the direction
    was written added onto a ``.grad`` that was not zero (``readings``: the least and the
    largest entry of each then, in turn, NaN too), unless that ``.grad`` (``grads``) is
    zero now; ``counts``: the backward passes added."""
    nonzero = readings.ne(0).view(-1, 2).any(1).tolist()  # (host reads, on refusal only)
    # zeroed since the last pass that reached it (in place, or through .data, which moves
    # no version), none after: it holds none of the direction (found by review: another
    # loss's pass landed on a branch that the step's own pass skipped, then zeroed)
    added = [
        (n, c)
        for n, c, bad in zip(names, counts, nonzero, strict=True)
        if bad and bool(grads[n].any())
    ]
    if added:
        raise _added_error([n for n, _ in added], any(c > 1 for _, c in added))


def _check_no_gradient_hooks(params) -> None:
    """Refuse preconditioned parameters with gradient hooks, which ``pre.backward`` could
    not run: it writes the direction into ``.grad`` itself."""
    hooked = [n for n, p in params if user_hooks_on(p) or accumulate_hooks_on(p)]
    if hooked:
        raise ValueError(
            f"parameters {hooked} have gradient hooks (Tensor.register_hook, "
            "register_post_accumulate_grad_hook). pre.backward(loss) writes the direction "
            "into .grad itself, so they would not run (a mask would not apply, an optimizer "
            "stepped from a hook would never step). Remove them; a register_hook that only "
            "reads (a logger) runs under loss.backward() and then pre.step(), which refuses "
            "one that changes the gradient (a mask or a scale: apply it to .grad after "
            "pre.backward(loss) instead) and parameters an optimizer stepped in the backward "
            "pass, and preconditions the .grad a register_post_accumulate_grad_hook leaves"
        )


def _check_grad(
    name: str, grad: Tensor, dtype: torch.dtype, checks: Deferred, error: type = ValueError
) -> None:
    """A ``.grad`` the preconditioner uses: dense, in its parameter's dtype, with an
    element of its own at every index (written in place), and finite (read with
    ``checks``; ``error`` raised otherwise)."""
    if grad.dtype != dtype:  # (grad_dtype=None lets a .grad of another dtype be set)
        raise ValueError(
            f"the .grad of {name!r} is {grad.dtype}, its parameter {dtype}: the direction "
            "is solved and written in the parameter's dtype; set it to None (opt.zero_grad())"
        )
    if grad.layout != torch.strided:
        raise TypeError(
            f"the .grad of {name!r} is {grad.layout} (an nn.Embedding(sparse=True)?): the "
            "metrics need dense gradients; build the module with sparse=False"
        )
    if any(step == 0 and size > 1 for step, size in zip(grad.stride(), grad.shape)):
        # (found by review: the directions were written into the .grad before it until
        # torch's error; loss.backward() fails on it too)
        raise ValueError(
            f"the .grad of {name!r} is a broadcast view (stride 0, e.g. made by expand): "
            "no direction can be written into it in place. Set it to None (opt.zero_grad()) "
            "or to a tensor of its own (.clone())"
        )
    if grad.is_inference():  # (torch's own error names no parameter; loss.backward()'s too)
        raise ValueError(
            f"the .grad of {name!r} is an inference tensor (made under "
            "torch.inference_mode()), which cannot be written in place: set it to None "
            "(opt.zero_grad()) or to a tensor made outside inference mode"
        )
    checks.finite(f"the .grad of {name!r}", grad, OVERFLOW_FIX, error)


#: Overflowed steps in a row after which the preconditioner warns: GradScaler halves its
#: scale at each, so its default 2^16 reaches 1 in 16.
OVERFLOWS_IN_A_ROW = 32


def _fill_nan(params) -> None:
    """NaN in each ``.grad`` of ``params`` (set where ``None``)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.full_like(p, float("nan"))
        else:
            p.grad.fill_(float("nan"))


def _grad_scaler_types() -> tuple[type, ...]:
    """GradScaler's classes in this torch (``torch.amp`` from 2.3, ``torch.cuda.amp``
    before)."""
    return tuple(
        t
        for t in (getattr(torch.amp, "GradScaler", None), torch.cuda.amp.GradScaler)
        if isinstance(t, type)
    )


def _check_not_unscaled(scaler: torch.amp.GradScaler) -> None:
    """Refuse ``pre.step()`` after ``scaler.unscale_(opt)`` of this step: the scaler has
    read that optimiser's ``.grad`` for an overflow already, so one found now would not skip
    its step. (GradScaler keeps the stage per optimiser in a private attribute; where a
    release of torch lacks it, nothing is checked.)"""
    modules = [sys.modules.get(c.__module__) for c in reversed(type(scaler).__mro__)]
    stages = [m.OptState for m in modules if hasattr(m, "OptState")]  # the base's first
    unscaled = getattr(stages[0], "UNSCALED", None) if stages else None
    states = getattr(scaler, "_per_optimizer_states", {}) if unscaled is not None else {}
    if any(isinstance(s, dict) and s.get("stage") is unscaled for s in states.values()):
        raise RuntimeError(
            "pre.step() after scaler.unscale_(opt): the scaler has already looked for an "
            "overflow in that optimiser's .grad, so an overflow found by pre.step() would not "
            "skip its step. Call pre.step() before scaler.unscale_(opt) (clipping after it "
            "then clips the preconditioned direction); before the unscale_ of every "
            "optimiser of this scaler, also one that holds none of these parameters (a "
            "second optimiser whose gradients are clipped first): the scaler keeps its "
            "optimisers by id, so which parameters one holds cannot be told"
        )


def _off_output(capture: Capture, names: dict[int, str], stale: set[str]) -> list[str]:
    """The trainable parameters of the recorded pass's calls that do not reach its output
    (:func:`coupling.off_output`), leaving out calls whose output was changed in place
    after it (``stale``): their captured tensor's node is then the in-place operation's
    (found by review: a head that reaches the output was named)."""
    calls = [c for c in capture.calls if c.name not in stale]
    return coupling.off_output(capture.output, calls, names)


def _reached(capture: Capture | None, trained: frozenset[int]) -> tuple:
    """``(reached, leaves, considered, nodes)`` of the recorded pass, for the pass run again to
    depend on exactly those (:meth:`~riemann_core.capture.Replay.check_reach`): the ids of
    the parameters of its calls whose modules' outputs its output depends on, and of those
    it reaches as leaves (:func:`coupling.reached_parameters`; ``None`` for a compiled
    graph); and of those it could have (``trained``: requiring grad in that pass). Calls
    whose output was changed in place after it are left out, as in :func:`_off_output`,
    and so are their parameters from those considered: the pass run again captures such a
    call through a copy and reaches its parameters where this walk could not (found by
    review: a weight tied between a module whose output is changed in place, ``h += x``,
    and one kept off the output was refused as gained, where the direction was exact);
    and the nodes of its graph that are no leaf's, which the pass run again must not
    reach (:meth:`~riemann_core.capture.Replay.check_kept`). Empty sets where nothing is
    known."""
    if capture is None or not isinstance(capture.output, Tensor):
        return frozenset(), None, frozenset(), frozenset()
    stale = capture.stale()
    calls = [c for c in capture.calls if c.name not in stale]
    hidden = {id(p) for c in capture.calls if c.name in stale for p in c.params}
    considered = frozenset(id(p) for c in calls for p in c.params) & trained - hidden
    nodes = set()
    on, leaves = coupling.reached_parameters(capture.output, calls, nodes)
    return (
        frozenset(on),
        None if leaves is None else frozenset(leaves),
        considered,
        frozenset(nodes),
    )


def _warn_off_output(names: list[str], damping: float) -> None:
    """Warn that the loss trains ``names``, which the metric does not see (found by a hunt:
    an auxiliary head computed inside forward, as the refusal of a model returning a tuple
    advised, stepped 1/damping times its gradient, silently)."""
    if names:
        warn(
            f"the loss trains {sorted(names)}, whose modules do not reach the model's output: "
            "the metric, pulled back from the output, is zero on them, so their direction is "
            f"their gradient over the damping ({1 / damping:.3g} times the gradient). An "
            "auxiliary head computed inside forward is such a module: keep it out of the model "
            "(a module not registered in it, applied to features the model keeps aside; its "
            "parameters then get their plain gradient, as every leaf outside the model does), "
            "or freeze it",
            UserWarning,
        )


def _overflowed(grads: dict[str, Tensor]) -> bool:
    """Whether a ``.grad`` holds NaN or inf (one host read per device)."""
    checks = Deferred()
    checks.finite_all([(n, g) for n, g in grads.items()], "", GradientOverflow)
    try:
        checks.run()
    except GradientOverflow:
        return True
    return False


class _Written(NamedTuple):
    """A ``.grad`` a call wrote a direction into, as it was then."""

    grad: weakref.ref
    version: int
    fingerprint: Tensor  # (:func:`_fingerprints`)
    sampled: bool  # the fingerprint read some of its entries, not all


#: ``{id(.grad): (the preconditioner that wrote a direction into it, the version it
#: wrote, the .grad)}``, both weakly, for every preconditioner's ``step`` to read: one does
#: not see what another wrote (found by a hunt: two on the same parameters, or one on the
#: model and one on its head, stepped one after the other gave ``G^{-2} g``, 180-420 off).
_WRITERS: dict[int, tuple[weakref.ref, int, weakref.ref]] = {}


def _note_writer(writer: RiemannianPreconditioner, grads: list[Tensor]) -> None:
    """Enter in :data:`_WRITERS` that ``writer`` wrote a direction into ``grads``."""
    for key in [k for k, (_, _, grad) in _WRITERS.items() if grad() is None]:
        del _WRITERS[key]  # (the .grad freed: its id may be another tensor's)
    _WRITERS.update({id(g): (weakref.ref(writer), g._version, weakref.ref(g)) for g in grads})


def _check_not_written_by_another(
    reader: RiemannianPreconditioner, grads: dict[str, Tensor], params
) -> None:
    """Refuse ``.grad`` that hold a direction another preconditioner wrote, as it wrote it
    or changed once since (a clip; a backward pass added, as :meth:`_check_not_preconditioned`
    refuses of its own), or with backward passes added that its own hooks saw land on it,
    as that check reads them (:meth:`~RiemannianPreconditioner._accumulated_onto`: under
    DistributedDataParallel, whose write of the averaged ``.grad`` moves the version once
    more, found by review), and not zero (zeros preconditioned again are the same zeros:
    host syncs, on suspicion only). Of DistributedDataParallel's bucket views, whose shared
    version moves once a backward pass (found by review: a fresh gradient refused), by the
    version only as written."""
    others = [
        n
        for n, g in grads.items()
        if (w := _WRITERS.get(id(g))) is not None
        and w[0]() is not reader
        and w[2]() is g
        and g._version - w[1] in ((0,) if g._is_view() else (0, 1))
        and bool(g.any())
    ]
    for writer in list(_STEP_WATCHERS):  # (their hooks follow only while not removed)
        if writer is not reader and writer._written and not writer._removed:
            _, onto = writer._accumulated_onto(grads, params)
            others += [
                n
                for n, (_, reading) in onto.items()
                if n not in others and bool(torch.stack(reading).ne(0).any() & grads[n].any())
            ]
    if others:
        raise RuntimeError(
            f"the .grad of {some(others)} hold the direction "
            "another RiemannianPreconditioner wrote (two preconditioners on the same "
            "parameters, or one on the model and one on a submodule), and this one would "
            "precondition it again, G^{-2} g: use one preconditioner per parameter (remove "
            "the other, other.remove(), or build them on disjoint submodules); to compare "
            "two on one gradient, give the second a new tensor (p.grad = g.clone(): one "
            "written back in place, p.grad.copy_(g), counts as the direction changed once)"
        )


#: A written ``.grad``'s fingerprint reads about this many runs of this many consecutive
#: entries, evenly spaced (:func:`_fingerprints`).
FINGERPRINT_RUNS, FINGERPRINT_RUN = 16, 64


def _sampled(grad: Tensor) -> bool:
    """Whether :func:`_fingerprints` reads some of ``grad``'s entries, not all."""
    return grad.numel() > FINGERPRINT_RUNS * FINGERPRINT_RUN


def _fingerprints(grads: list[Tensor]) -> list[Tensor]:
    """What tells a written ``.grad`` from one written again through ``.data``: the 2-norm
    of its entries, of evenly spaced runs of them (:data:`FINGERPRINT_RUNS`) where it has
    more: a gradient written anew changes them. Reading every entry of 784-1024-1024-10's
    six tensors took 0.16 ms of a 10 ms step, and the same number of entries one by one
    (a cache line each) half that; runs read 64x fewer lines. Not zero: the tensor is not
    zero. Too few entries for a parallel reduction, so the same entries give the same
    fingerprint at any number of threads."""
    prints = []
    for g in grads:
        flat = g.reshape(-1)
        if _sampled(g):
            runs = flat[: flat.numel() // FINGERPRINT_RUN * FINGERPRINT_RUN]
            runs = runs.view(-1, FINGERPRINT_RUN)
            flat = runs[:: runs.shape[0] // FINGERPRINT_RUNS]
        prints.append(torch.linalg.vector_norm(flat))
    return prints


def _run_by_ddp(model: nn.Module) -> bool:
    """Whether ``model`` (not itself a ``DistributedDataParallel``) runs inside the forward
    pass of a ``DistributedDataParallel`` that wraps it, which averages its ``.grad`` at the
    end of the backward pass (``_active_ddp_module``: torch's own record, absent where a
    version lacks it)."""
    if isinstance(model, DistributedDataParallel):
        return False
    active = getattr(DistributedDataParallel, "_active_ddp_module", None)
    inner = getattr(active, "module", None)
    return inner is not None and (inner is model or any(m is model for m in inner.modules()))


def _check_grad_scaler(scaler, model: nn.Module, process_group) -> None:
    """``grad_scaler`` is ``None`` or a ``torch.amp.GradScaler``; with a process group, the
    model is ``DistributedDataParallel`` (whose ``.grad`` overflow on every rank alike)."""
    if scaler is None:
        return
    if not isinstance(scaler, _grad_scaler_types()):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler (the one whose scale(loss) the "
            f"preconditioner sees), got {type(scaler).__name__}"
        )
    if process_group is not None and not isinstance(model, DistributedDataParallel):
        raise ValueError(
            "grad_scaler with a process_group needs a DistributedDataParallel model: the "
            "ranks' own .grad may overflow on some ranks only, and the step must be skipped "
            "on all of them; wrap the model in DistributedDataParallel"
        )


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
