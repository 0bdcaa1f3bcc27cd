"""A probe of what the metrics assume of a network, on the autograd graph of a call.

*Samples are independent.* The factor rows of every sample are pulled back through the
network together, and each block's ``K_a`` is assembled sample by sample. A module
that couples samples (batch statistics, centring over the batch, attention across the
batch) breaks both. Probe: cotangents supported on a set ``S`` of samples, pulled back
to every captured module output and input, must leave the rows of the samples outside
``S`` exactly zero (autograd propagates such structural zeros exactly). With ``S_k``
the samples whose ``k``-th bit is set, and its complement, for ``k < ceil(log2 N)``,
every pair of distinct samples is told apart by some probe: ``2 ceil(log2 N)`` rows of
one batched backward pass. A probe pulled back to NaN or inf (an overflow in half
precision, where ``inf - inf`` is NaN) proves nothing either way: it is refused first,
naming where.

*Parameters enter only through their modules.* A trainable parameter used outside the
calls of the modules that own it (``F.linear(h, self.emb.weight)`` beside a call of
``self.emb``) reaches the loss through a path no kernel sees. Probe: the gradient of a
cotangent on all samples through the captured calls must equal autograd's. For a loss
the user formed (``RiemannianPreconditioner.backward``), which may add terms of its own
(weight decay written into the loss), :func:`loss_paths` walks its graph down to the
network: structural and exact, a few nodes.

*The backward pass is linear in its cotangent.* A hook that changes gradients (a tensor
hook registered in ``forward`` that clamps, a module's full backward hook that clips) runs
on every row pulled back, and no metric matches what it leaves. Probe: the row on every
sample, pulled back once more scaled by :data:`LINEARITY_SCALE`, must come back as that
multiple of its pullback, and with another pattern added, as the sum of the two
pullbacks. A hook that only reads passes; a tensor hook that clips only beyond the values the
probe's call reached passes too (``check_coupling="always"`` checks every call).

*Module backward hooks only read.* A module's backward hook (``register_full_backward_hook``,
``register_full_backward_pre_hook``, ``register_backward_hook``, or a global one) runs on
every row pulled back through the module, so one that changes gradients, even linearly (a
scale) as the probe above passes, changes the metric's Jacobian with the gradient, and no
direction is exact (found by a hunt: a hook doubling a module's input gradient left
layerwise 0.21 off the network's direction, with no error). Probe: the forward pass that
is probed runs each such hook through :func:`watching_backward_hooks`, which notes one
that returns anything but ``None`` or the gradients it was given, or writes into them (a
hook that clips is refused so even where the clip does not bite). A tensor hook
registered in ``forward`` or a custom ``autograd.Function`` is part of the network's
backward pass instead: the Jacobian is the one autograd's backward pass applies. A hook
registered during the probed forward pass itself, or on a module the model does not hold
as a submodule, is not watched.

All four are structural, so they run on the first call for a model and again when what
may choose the forward pass's path changes (:func:`probe_key`: a module's training flag
or hooks, a module swapped for another, a parameter frozen or unfrozen, the kernel, an
argument of ``forward`` other than a tensor, the precision: autocast, the dtypes of the
parameters, buffers and input tensors; ``check_coupling=False`` skips them); their verdicts join the deferred checks. A path
chosen by state outside these (an attribute set on a module, Python's ``random``, a
global module hook added later) is probed as first taken; ``check_coupling="always"``
probes every call. A probe that saw only zeros (a layer downstream initialised at zero:
every Jacobian upstream of it is exactly zero, whatever the structure) proves nothing, and
runs again on the next call, until it has seen only zeros at :data:`INCONCLUSIVE_PROBES`
sets of parameter values (then a warning). Only on a failure is the forward pass run once
more with every module hooked, to name the module that couples the samples.
"""

from __future__ import annotations

import contextlib
import enum
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_backward_hooks, _global_backward_pre_hooks
from torch.utils import _pytree as pytree

from ._checks import Deferred
from ._warn import warn
from .capture import ModelNotes, OwnHook, autocast_state, autograd_nodes, ours
from .factors import batched_backward
from .modules import (
    Block,
    GenericHandler,
    Handler,
    SharedHandler,
    floating_dtypes,
    forward_replaced,
    is_container,
    is_read_by_holder,
    lowest_precision_eps,
    named_module,
    registered,
    training,
)
from .passes import user_hook_ids, user_hooks_on


@dataclass(frozen=True)
class Probe:
    """The probe to run on a call's graph: what its verdict holds for (:func:`probe_key`)
    and ``rerun()``, the forward pass run again for the slow path that names a module."""

    key: tuple
    rerun: Callable[[], Tensor]
    #: what :func:`watching_backward_hooks` noted of the probed forward pass's graph
    changing: list[str] = field(default_factory=list)


@contextlib.contextmanager
def watching_backward_hooks(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, each module backward hook of ``model``'s modules (but
    riemann_core's own) and each global one (``register_module_full_backward_hook``) is
    replaced by one that calls it and notes, in the list yielded, which it was where it
    changes the gradients: returns anything but ``None`` or the very tensors it was given,
    or writes into them. A forward pass run within keeps the watching hooks in its graph
    (torch reads the hooks at the call); the hooks are put back after it."""
    changing: list[str] = []
    replaced = []
    kinds = ("full backward pre-hook", "backward hook")
    owners = [
        (f"{named_module(name)}'s", (module._backward_pre_hooks, module._backward_hooks))
        for name, module in model.named_modules()
    ]
    owners.append(("a global module", (_global_backward_pre_hooks, _global_backward_hooks)))
    for owner, dicts in owners:
        for kind, hooks in zip(kinds, dicts, strict=True):
            for i, hook in list(hooks.items()):
                if not isinstance(hook, OwnHook):
                    replaced.append((hooks, i, hook))
                    hooks[i] = _watched(hook, f"{owner} {kind}", changing)
    try:
        yield changing
    finally:
        for hooks, i, hook in replaced:
            if i in hooks:  # (a hook may remove itself)
                hooks[i] = hook


def _watched(hook: Callable, what: str, changing: list[str]) -> Callable:
    """``hook``, noting ``what`` in ``changing`` where it returns new gradients or writes
    into those it was given (torch's contract forbids it; found by review): its first
    gradient argument is what its result replaces (a backward hook's ``grad_input``, a
    pre-hook's ``grad_output``)."""

    def watched(module, given, *rest):
        versions = [g._version if isinstance(g, Tensor) else None for g in given]
        result = hook(module, given, *rest)
        written = any(
            isinstance(g, Tensor) and g._version != v for g, v in zip(given, versions, strict=True)
        )
        if result is not None:
            new = (result,) if isinstance(result, Tensor) else tuple(result)
            written |= len(new) != len(given) or any(a is not b for a, b in zip(new, given))
        if written:
            changing.append(what)
        return result

    return watched


def _register_hook_check(checks: Deferred, probe: Probe) -> None:
    """Refuse, once the probe's rows were pulled back, a module backward hook that changed
    gradients (:func:`watching_backward_hooks`)."""

    def verdict():
        if probe.changing:
            raise ValueError(
                f"{', '.join(dict.fromkeys(probe.changing))} changes gradients: it runs "
                "on every row riemann_core pulls back through the module, the metric's factor "
                "rows as well as the gradient, so it changes the metric's Jacobian with them "
                "(a scale too), and no direction is exact. Remove it while preconditioning, "
                "or make it only read (return None, write nothing); to change the gradient, "
                "change .grad before pre.step() (loss.backward() runs the hook) or the "
                "direction after"
            )

    checks.then(verdict)


def needs_probe(notes: ModelNotes, key: tuple, check: bool | str = True) -> bool:
    """Whether to probe a call with :func:`probe_key` ``key`` under the option
    ``check_coupling`` (``check``: ``True``, ``"always"`` or ``False``)."""
    return check == "always" or (check is True and key not in notes.probed)


#: The factor of the probe row pulled back a second time (a negative power of two: the
#: scaling is exact in binary floating point, barring overflow and underflow into
#: subnormals (see :func:`_register_linearity_check`), so a linear backward pass
#: returns exactly this multiple of the row's pullback; a clamp of gradients at bound ``c``
#: does not wherever the pullback exceeds ``c / 8``, a one-sided clamp or ``abs`` nowhere).
LINEARITY_SCALE = -8.0
#: Probes that saw only zeros (see :func:`register`) before the verdict is kept anyway,
#: with a warning naming the tensors the output never reached.
INCONCLUSIVE_PROBES = 8


def probe_key(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    kernel: str,
    autocast: dict[str, torch.dtype] | None = None,
) -> tuple:
    """What a passed probe's verdict holds for (the structure, not the data): each module
    by identity (weakly: the notes must not keep the model alive) with its training flag,
    its hooks (but the model's own pre-hooks), its parameters (by identity, with ``requires_grad``: a parameter
    unfrozen may reach the loss along a path the probe passed while it was frozen; and
    their dtype), its buffers' dtypes and a
    forward set on its instance (:func:`_instance_forward`), whether it is a container
    (one marked by :func:`~riemann_core.modules.read_by_holder` since is probed again); the
    forward pass's arguments other than tensors (numbers, strings, ``None`` by value, other
    objects by identity; a tensor by its place and dtype); the ``kernel`` option (the
    structured kernels assume what the generic one does not: a ``Linear`` whose
    ``forward`` was replaced is exact only under the generic one); and the autocast
    regions the forward pass ran in (``autocast``, :func:`~riemann_core.capture.autocast_state`;
    ``None``: those enabled now, for the arguments' devices). A module swapped in, a
    flag changed, a hook registered, a parameter frozen or unfrozen, or another option
    passed to ``forward`` may take another path: it is probed again; so is a pass in another
    precision (a pass in float16 is not checked for linearity,
    :func:`_register_linearity_check`: found by a hunt, a hook that a float32 call would
    have refused passed unchecked after a first call under float16 autocast, or after
    ``model.half()``, had passed for the structure; found by review, so did one after a
    first call on float16 inputs to a model whose output takes their dtype,
    ``out.to(x.dtype)``, or through a frozen module holding its weights in buffers cast with
    ``.half()``). Global module hooks
    are left out: measuring tools register them (``FlopCounterMode``), which must not
    change what a call computes."""
    if not kwargs and all(isinstance(a, Tensor) for a in args):  # (no pytree walk)
        leaves, spec = args, len(args)
    else:
        leaves, spec = pytree.tree_flatten((args, kwargs))
    arguments = tuple(
        a.dtype if isinstance(a, Tensor) else a if isinstance(a, _BY_VALUE) else (type(a), id(a))
        for a in leaves
    )
    if autocast is None:
        autocast = autocast_state({a.device.type for a in leaves if isinstance(a, Tensor)})
    modules = tuple(
        (
            weakref.ref(m),
            training(m),
            # (the model's own pre-hooks act before every parameter: data preparation)
            _user_hooks(m._forward_pre_hooks) if m is not model else (),
            _user_hooks(m._forward_hooks),
            _user_hooks(m._backward_pre_hooks),
            _user_hooks(m._backward_hooks),
            # (with its gradient hooks: one registered after a probe passed may change
            # the gradient, found by a hunt: a mask's .grad taken, 1.0 off, where a
            # mask hook there from the first call is refused)
            tuple(
                (id(p), p.requires_grad, p.dtype, user_hook_ids(p))
                for p in m._parameters.values()
                if p is not None
            ),
            # (the dtypes a frozen module computes in, where it holds its weights as buffers)
            tuple(b.dtype for b in m._buffers.values() if b is not None) if m._buffers else (),
            _instance_forward(m),
            # (a mark of rc.read_by_holder moves its parameters into its holder's block,
            # and a marked module called outside its holder is refused by the probe only:
            # found by review, a mark made after a probe passed was taken without one,
            # 0.4-2.5 off, silently)
            is_container(m),
        )
        for m in model.modules()
    )
    return modules, spec, arguments, kernel, tuple(sorted(autocast.items()))


def _instance_forward(module: nn.Module):
    """A forward set on ``module``'s instance, weakly (``None``: its class's): one set
    after a probe passed (``m.forward = ...`` between two calls) may compute other than
    what was probed, and the structured kernel assumes its class's forward."""
    f = vars(module).get("forward")
    if f is None:
        return None
    try:
        return weakref.ref(f)
    except TypeError:  # (a callable without weak references)
        return type(f), id(f)


def _user_hooks(hooks: dict) -> tuple:
    """The ids of the hooks of ``hooks`` other than riemann_core's own (:class:`OwnHook`,
    installed anew when the parameters change, which :func:`probe_key` sees already): each
    registration has its own, never reused. A hook is told by its registration: keyed by
    its code and the values it held, hooks made anew with another setting were seen, but
    not a hook object or closure whose setting changed in place (4.3x off the oracle), and
    the values held kept the model alive (found by review). A hook registered anew at every
    step is probed at every step (register it once); one that changes what it computes
    without a new registration is state outside the key, as an attribute read in forward
    (``check_coupling="always"`` probes every call)."""
    if not hooks:  # most modules' (a few microseconds a call)
        return ()
    return tuple(i for i, h in hooks.items() if not isinstance(h, OwnHook))


#: arguments that stand for their value in :func:`probe_key`
_BY_VALUE = (bool, int, float, complex, str, bytes, type(None), enum.Enum)


def probe_cotangents(z: Tensor) -> tuple[Tensor, Tensor]:
    """Cotangents ``(k, *z.shape)`` and their supports ``(k, N)``: the bit probes, then
    one row on every sample (for the parameter check)."""
    N = z.shape[0]
    samples = torch.arange(N, device=z.device)
    bits = [((samples >> k) & 1).bool() for k in range(math.ceil(math.log2(N)) if N > 1 else 0)]
    masks = torch.stack([m for b in bits for m in (b, ~b)] + [torch.ones_like(samples).bool()])
    rows = masks[..., None].to(z.dtype) * _pattern(z[0])
    return rows.reshape((len(masks),) + z.shape), masks


def _pattern(like: Tensor, phase: float = 1.0) -> Tensor:
    """A fixed pattern of ``like``'s shape and dtype without sign structure, so that no
    cancellation hides a dependence (made in float32, cast after: float16's arange reaches
    inf past 65504 entries, and a NaN probe passed the coupling check and refused every
    parameter, naming none); another ``phase``, another pattern."""
    index = torch.arange(like.numel(), device=like.device, dtype=torch.float32)
    return torch.cos(index * 2.399963 + phase).to(like.dtype).reshape(like.shape)


def _leaked(pulled: Tensor, masks: Tensor, nan: bool = True) -> Tensor:
    """Whether a pulled-back tensor ``(k, N, ...)`` is nonzero outside a probe's support
    (``nan``: a NaN counts)."""
    outside = (~masks).reshape(masks.shape + (1,) * (pulled.ndim - 2))
    nonzero = pulled != 0 if nan else pulled.abs() > 0
    return (nonzero & outside).flatten(1).any()


def graph_tensors(calls: list[Block], N: int) -> list[tuple[Block, Tensor, int]]:
    """Each call's output and the tensors of its inputs that are in the autograd graph and
    hold the ``N`` samples along their batch dimension (:attr:`Block.graph_dims`: an
    ``nn.RNNBase``'s sequence-first input and its ``hx`` along their second), with that
    dimension: not an attention mask of the positions, shared by the samples (found by
    review, its pullback crashed the probe), nor a sequence-first input whose length equals
    the batch read along its time steps (found by review: refused as coupling the samples)."""
    out = [(c, c.output, 0) for c in calls if c.output.requires_grad]
    per_sample = [
        (c, t, d)
        for c in calls
        for t, d in zip(c.graph_inputs, c.graph_dims or (0,) * len(c.graph_inputs), strict=True)
        if t.requires_grad and t.ndim > d and t.shape[d] == N
    ]
    return out + per_sample


def register(
    checks: Deferred,
    notes: ModelNotes,
    model: nn.Module,
    z: Tensor,
    calls: list[Block],
    handlers: list[Handler],
    probe: Probe,
    path_dtype: torch.dtype | None = None,
) -> None:
    """Probe the call's graph; verdicts join ``checks`` (see the module docstring), and
    once they pass, ``notes`` keep ``probe.key``. ``path_dtype``: the least precise dtype
    the backward pass to the modules runs in (:func:`~riemann_core.capture.pullback_dtype`),
    which bounds the rounding the checks allow."""
    key, rerun = probe.key, probe.rerun
    rows, masks = probe_cotangents(z)
    targets = graph_tensors(calls, z.shape[0])
    # the row on every sample once more scaled, and with another pattern alone and added:
    # a backward pass linear in its cotangent returns the scaled and the summed pullbacks
    other = _pattern(z, phase=2.0)[None]
    extra = [LINEARITY_SCALE * rows[-1:], other, rows[-1:] + other]
    with batched_backward():
        pulled = torch.autograd.grad(
            z,
            [t for _, t, _ in targets],
            torch.cat([rows, *extra]),
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
    # a tensor the output reaches with a Jacobian of exact zeros here (a layer downstream
    # initialised at zero, as classifier heads often are) shows no dependence whatever the
    # structure: the probe then proves nothing, and is run again on the next call
    reached = [(i, p[len(rows) - 1]) for i, p in enumerate(pulled) if p is not None]
    # (each with its samples on its first dimension after the probe's)
    pulled = [
        (
            torch.zeros((len(rows) + 3,) + t.shape, dtype=t.dtype, device=t.device)
            if p is None
            else p
        ).movedim(d + 1, 1)
        for (_, t, d), p in zip(targets, pulled, strict=True)
    ]
    targets = [(c, t) for c, t, _ in targets]
    again, pulled = [p[len(rows) :] for p in pulled], [p[: len(rows)] for p in pulled]
    # the roundest precision of the pass: under autocast the calls ran in half precision
    # (found by review: a hand-written layer's float32 vjp against autograd's bfloat16 one
    # was refused as a parameter used outside its module)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    tensors = [params[0], z, *(t for c in calls for t in (c.output, *c.inputs))]
    eps = lowest_precision_eps(tensors)
    eps = max(eps, torch.finfo(path_dtype).eps) if path_dtype is not None else eps
    # where the pass underflows first: the narrowest range's smallest normal number
    # (the calls' inputs may be None or numbers: found by CI)
    dtypes = floating_dtypes(tensors) | ({path_dtype} - {None})
    tiny = max((torch.finfo(d).tiny for d in dtypes), default=torch.finfo(torch.float32).tiny)
    # data (an input made to require grad for the probe, or made from one) may pull back
    # NaN that reaches no parameter (0 * inf through mask.log()): only the tensors that
    # depend on parameters must be finite, and only there is a NaN a leak
    ids = {id(p) for p in params}
    inner = [t is c.output or _depends_on(t, ids) for c, t in targets]
    checks.finite_all(
        [
            (f"the coupling probe pulled back to {_name_of(c, t)}", p)
            for (c, t), p, own in zip(targets, pulled, inner, strict=True)
            if own
        ],
        "the probe's rows on the output have entries of size 1 (the loss gradient's about "
        f"1 / N): in {z.dtype} they overflowed through this network's Jacobian, or met "
        "0 * inf (a log or a division at 0). Run the first call, which probes, in float32 "
        "(outside autocast) or on other data, or pass check_coupling=False if the network "
        "keeps the samples of a batch apart and calls each parameter's module for every use",
    )
    _register_linearity_check(checks, targets, pulled, again, eps, tiny)
    _register_hook_check(checks, probe)
    coupled = (
        torch.stack(
            [_leaked(p[:-1], masks[:-1], nan=own) for p, own in zip(pulled, inner, strict=True)]
        ).any()
        if pulled
        else None
    )
    if coupled is not None and len(masks) > 1:
        checks.require(~coupled, lambda: _explain_coupling(model, rows[:-1], masks[:-1], rerun))
    scale = _register_parameter_check(
        checks, model, z, rows[-1], calls, targets, pulled, handlers, params, eps
    )
    if z.shape[0] > 1:
        versions = tuple(p._version for p in params)
        _register_verdict(checks, notes, (key, versions), targets, reached, scale)


def _depends_on(tensor: Tensor, parameters: set[int]) -> bool:
    """Whether ``tensor``'s graph reaches one of ``parameters`` (their ``id``)."""
    nodes = autograd_nodes([tensor.grad_fn])
    return any(id(getattr(node, "variable", None)) in parameters for node in nodes)


def _register_verdict(checks, notes: ModelNotes, at, targets, reached, scale: Tensor) -> None:
    """Once every check passed: ``notes`` keep the probe's key if it saw the output reach
    every target it reaches and the parameters (:func:`register`); else it runs again on
    the next call. Where it saw only zeros at :data:`INCONCLUSIVE_PROBES` sets of parameter
    values in a row (``at``: the key and the parameters' versions, which an optimizer step
    bumps; micro-batches before a step count once), the verdict is kept with a warning: a
    branch multiplied by a zero that never moves would probe forever."""
    key, versions = at
    seen = [checks.read((p != 0).any()) for _, p in reached] + [checks.read(scale > 0)]
    names = [_name_of(*targets[i]) for i, _ in reached] + ["the parameters' gradient"]

    def verdict():
        if all(r.value for r in seen):
            notes.passed(key)
            return
        if notes.inconclusive_at is None or notes.inconclusive_at[0] != key:
            notes.inconclusive = 0  # another structure: counted afresh
        if notes.inconclusive_at != at:
            notes.inconclusive, notes.inconclusive_at = notes.inconclusive + 1, at
        if notes.inconclusive >= INCONCLUSIVE_PROBES:
            zero = [n for n, r in zip(names, seen, strict=True) if not r.value]
            warn(
                f"the batch-coupling probe saw only zeros at {', '.join(zero)} in "
                f"{notes.inconclusive} calls in a row, at other parameters each (a branch "
                "multiplied by zero?), so what it checks is unproven there; it is not run "
                "again until the structure changes (check_coupling='always' probes every "
                "call)"
            )
            notes.passed(key)

    checks.then(verdict)


def _name_of(call: Block, tensor: Tensor) -> str:
    """Which tensor of a call a probe target is, in words."""
    return f"the {'output' if tensor is call.output else 'input'} of {named_module(call.name)}"


def _register_linearity_check(checks, targets, pulled, again, eps: float, tiny: float) -> None:
    """The last probe row ``P``, pulled back once more scaled by :data:`LINEARITY_SCALE`,
    and with another pattern ``Q`` alone and added (``again``: those three pullbacks per
    target), must come back as ``LINEARITY_SCALE f(P)`` and ``f(P) + f(Q)``: the backward
    pass is linear in its cotangent, unless a hook changes gradients (scaling catches an
    elementwise clamp or ``abs``, adding a top-k). Entries that overflowed (the scaled row
    in half precision) are left out, and a pass in float16 (``eps`` its rounding, the
    lowest of the pass) is not judged: on deep networks under autocast its pullbacks reach
    float16's subnormals (1e-6 to 1e-7), where rounding alone differs by 12-60%; with the
    allowance below, ``sqrt(eps)`` is only 32 float16 roundings, and rounding alone still
    reached 1.6 times it (a 40-layer tanh network of width 8 under autocast, pullbacks of
    5e-4 to 1e-3: the sum, not the scaling) and 0.5-0.7 times it on a 12-layer GELU MLP
    of width 256-1024, growing with width, while hooks acting on pullbacks below
    ``sqrt(eps) tiny`` (2e-6) went unseen (found by a helper's measurement over 900
    networks of depth 2-40: 1 refused without a hook, 15 of 1523 clamp, abs, top-k or
    sign hooks on nonzero float16 pullbacks passed; twice the threshold refused none
    without a hook and missed 22).

    Rounding leaves ``|fl(x) - x| <= eps |x| + eps tiny`` (``tiny`` the smallest normal
    number: below it the spacing is ``eps tiny`` whatever ``|x|``), so a difference is
    judged against ``sqrt(eps) (size + tiny)``, both parts with the same margin: a deep
    float32 MLP's pullbacks vanish into float32's subnormals (1e-42 some 165 tanh layers
    below the output of 200), where they differed by 0.4-13% of their size, and it was
    refused as a hook (found by review: from 160 layers on)."""

    def wide(t: Tensor) -> Tensor:  # half precision compared in float32
        return t.to(torch.promote_types(t.dtype, torch.float32))

    if eps == torch.finfo(torch.float16).eps:  # a pass in float16: see above
        return
    residual = []
    for p, (scaled, q, both) in zip(pulled, again, strict=True):
        f_p, q = wide(p[-1]), wide(q)
        off = [
            torch.where(scaled.isfinite(), wide(scaled) - LINEARITY_SCALE * f_p, 0.0),
            wide(both) - (f_p + q),
        ]
        size = f_p.abs().max() + q.abs().max() + tiny
        residual.append(torch.stack([o.abs().max() for o in off]).max() / size)
    if not residual:
        return
    nonlinear = torch.stack([r > eps**0.5 for r in residual]).any()
    names = [_name_of(c, t) for c, t in targets]  # now: the record may change by then

    def explain():
        where = [n for n, r in zip(names, residual, strict=True) if float(r) > eps**0.5]
        raise ValueError(
            f"the backward pass is not linear in its cotangent at {', '.join(where)}: a hook "
            "changes gradients there (a tensor hook registered in forward, "
            "h.register_hook(lambda g: g.clamp(...)), or a module's full backward hook that "
            "clips). It runs on every row riemann_core pulls back, and no metric matches "
            "what it leaves. Remove the hook, or make it only read; to clip, clip the "
            "direction after pre.backward"
        )

    checks.require(~nonlinear, explain)


def _register_parameter_check(
    checks, model, z, row, calls, targets, pulled, handlers, params, eps
) -> Tensor:
    """Autograd's gradient of ``row`` against the sum of the captured calls' own; returns
    the squared norm of autograd's (zero: the check proves nothing)."""
    at_output = {id(c): p[-1] for (c, t), p in zip(targets, pulled, strict=True) if t is c.output}
    per_call = {
        id(h.block): h
        for b in handlers
        for h in (b.handlers if isinstance(b, SharedHandler) else [b])
    }
    index = {id(p): i for i, p in enumerate(params)}
    through_calls = [torch.zeros_like(p) for p in params]
    for c in calls:
        if isinstance(per_call[id(c)], GenericHandler):  # K_a's Jacobian, one sample at a time
            _register_batch_check(checks, per_call[id(c)], c.output.detach())
        if id(c) in at_output:
            grads = per_call[id(c)].gradient_from_output(at_output[id(c)])
            for p, g in zip(c.params, grads, strict=True):
                through_calls[index[id(p)]] += g.to(p.dtype)
    # calls whose output holds a user's tensor hook: what reaches that output in the pass
    # below, where it is no input and the hooks run, noted after them (a hook that only
    # reads leaves the row the probe read there; found by review: a logger on an output,
    # beside a parameter used outside its module, was named as changing the gradient)
    hooked_calls = [
        c for c in calls if c.output is not None and id(c) in at_output and user_hook_ids(c.output)
    ]
    after_hooks: dict[int, Tensor] = {}
    handles = []
    for c in hooked_calls:

        def note(g, c=c):
            after_hooks[id(c)] = g.detach().clone()

        note._riemann_core_reads = True  # (not a user's: user_hook_ids)
        handles.append(ours(c.output.register_hook(note)))
    try:
        direct = torch.autograd.grad(z, params, row, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    direct = [torch.zeros_like(p) if g is None else g for g, p in zip(direct, params, strict=True)]
    error = sum(((a - b) ** 2).sum() for a, b in zip(direct, through_calls, strict=True))
    scale = sum((a**2).sum() for a in direct)
    # noted now: the record lets the outputs go before explain() runs
    hooked_calls = [
        (named_module(c.name, c.module), set(c.param_names), at_output[id(c)], after_hooks[id(c)])
        for c in hooked_calls
        if id(c) in after_hooks
    ]

    def explain():
        hooked = [n for n, p in model.named_parameters() if p.requires_grad and user_hooks_on(p)]
        if hooked:
            raise ValueError(
                f"parameters {hooked} have gradient hooks (Tensor.register_hook), which "
                "change autograd's gradient of them but not the metric's Jacobian, so no "
                "direction is exact. Remove them; to mask or clip, apply it to .grad after "
                "pre.step() or pre.backward(loss)"
            )
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        infinite = [
            n
            for n, a, b in zip(names, direct, through_calls, strict=True)
            if not (bool(a.isfinite().all()) and bool(b.isfinite().all()))
        ]
        if infinite:  # (found by review: it read as "parameters [] reach the output ...")
            raise ValueError(
                f"the gradient of parameters {infinite} holds NaN or inf: an inf in the "
                "inputs (only an input other than the data, as an attention mask, may hold "
                "inf, where the network saturates it) or an overflow in the forward pass; "
                "clean or impute the data"
            )
        bad = [
            n
            for n, a, b in zip(names, direct, through_calls, strict=True)
            if float((a - b).norm()) > eps**0.5 * max(float(a.norm()), float(b.norm()))
        ]
        hooked_outputs = [
            n
            for n, owned, read, hooked in hooked_calls
            if owned & set(bad)
            and float((hooked - read).norm())
            > eps**0.5 * max(float(read.norm()), float(hooked.norm()))
        ]
        if hooked_outputs:  # (found by a hunt: read as parameters used outside their modules)
            raise ValueError(
                f"a tensor hook on the output of {', '.join(dict.fromkeys(hooked_outputs))} "
                "(h = self.a(x); h.register_hook(...) in forward, or in a forward hook) "
                "changes the gradient that reaches the module's parameters, but riemann_core "
                "reads the rows it pulls back at that output before the hook runs, so the "
                "metric and the gradient disagree and no direction is exact. "
                "Register the hook on a tensor computed from the output "
                "(h = torch.tanh(self.a(x)); h.register_hook(...)), or remove it"
            )
        replaced = sorted(
            {o for n in bad if forward_replaced(model.get_submodule(o := n.rpartition(".")[0]))}
        )
        if replaced:  # (found by a hunt: read as parameters used outside their modules)
            raise ValueError(
                f"modules {replaced} have a forward replaced on the instance that computes "
                "other than their class's forward, which the structured kernel assumes: pass "
                "kernel='auto' (the generic kernel for such modules, exact; not with "
                "method='kfac', whose factors assume the class's forward)"
            )
        kernels = sorted(
            {
                f"{type(h).__qualname__} of {named_module(h.block.name)} "
                f"({type(h.block.module).__name__})"
                for h in per_call.values()
                if registered(h) and set(h.block.param_names) & set(bad)
            }
        )
        if kernels:  # (found by a hunt: a registered kernel's products, all 2x, read as
            # parameters used outside their modules)
            raise ValueError(
                f"the gradient of parameters {bad} through their modules' kernels is not "
                f"autograd's: the kernels {kernels} registered by rc.register_handler do not "
                "compute what the modules' forward does (their gradient_from_output(lam) "
                "is not the gradient of the call's output against lam), or the parameters "
                "reach the output outside those calls as well. Fix the kernel and register it "
                "again (rc.register_handler(..., overwrite=True))"
            )
        raise ValueError(
            f"parameters {bad} reach the output outside the calls of the modules that own "
            "them (e.g. F.linear(h, self.emb.weight) beside a call of self.emb, a "
            "parametrization, or a global module hook that changes outputs), a path no "
            "kernel sees. Call the owning module for every use "
            "(weight tying by assignment, m2.weight = m1.weight, is exact), or freeze them "
            "with requires_grad_(False). A tensor computed from them once and kept on a "
            "module across forward passes (a cache, self.cache = self.weight.T) is such a "
            f"path too: compute it inside forward at every pass{_marked_outside(model, bad)}"
        )

    checks.require(error <= eps * scale, explain)
    return scale


def _marked_outside(model: nn.Module, names: list[str]) -> str:
    """Where the modules owning the parameters ``names`` (or the containers above them)
    are marked by :func:`~riemann_core.modules.read_by_holder`, whose calls and reads then
    count only inside their holder's: those marks named, a call outside the holder being
    such a path (found by review: a Swin V2 ``cpb_mlp`` marked as its refusal of a table
    said, but called outside its attention too, was refused without the mark named)."""
    modules = dict(model.named_modules())
    marked = []
    for n in names:
        owner = n.rpartition(".")[0]
        while owner not in marked and is_container(modules.get(owner)):
            if is_read_by_holder(modules[owner]):
                marked.append(owner)
            if not owner:
                break
            owner = owner.rpartition(".")[0]
    if not marked:
        return ""
    return (
        f". Modules {sorted(marked)} are marked by rc.read_by_holder: their parameters are their "
        "holder's, which sees them only inside its own calls, so calling or reading them "
        "outside its forward too is such a path; call them only inside it, or unmark them, "
        "rc.read_by_holder(..., marked=False)"
    )


def register_splits(checks: Deferred, notes: ModelNotes, handlers: list, probed: bool) -> None:
    """The generic kernel splits a call's argument into samples where its first dimension
    is the batch's (:meth:`~riemann_core.modules.GenericHandler.split`), a decision of
    shapes that a probe's key does not hold: a rotary table of ``T`` positions passed to
    an attention block is split only at ``T = N``, and where the module's output barely
    depends on it (a gate or LayerScale near zero) its outputs one sample at a time still
    agree. So the Jacobian check of a probe (``probed``: it runs there) also runs for every
    pattern of splits a module's calls have not passed yet, and those that pass are kept
    (found by review: first called at ``T != N``, then at ``T = N``, the layerwise
    direction was 2.5e-3 off the oracle, full and natural 5e-2)."""
    generic = [
        h
        for b in handlers
        for h in (b.handlers if isinstance(b, SharedHandler) else [b])
        if isinstance(h, GenericHandler)
    ]
    new = set()
    for h in generic:
        module, pattern = h.block.module, h.split()
        if pattern in notes.splits.get(module, ()) or (id(module), pattern) in new:
            continue
        new.add((id(module), pattern))
        if not probed:
            _register_batch_check(checks, h, h.block.output.detach())
        checks.then(lambda m=module, p=pattern: notes.split_passed(m, p))


def _register_batch_check(checks, handler: GenericHandler, output: Tensor) -> None:
    """The generic kernel's Jacobian, one sample at a time, against the batch call's
    (:meth:`~riemann_core.modules.GenericHandler.batch_mismatch`), under as many rows as
    ``K_a`` has per sample (so by the same ``vmap`` path) that vary over the samples: the
    probe's pulled back to the call may not (a linear layer above gives every sample the
    same). Both run in the module's dtype without autocast or reduced-precision products,
    so within the square root of the eps they round to
    (:meth:`~riemann_core.modules.GenericHandler.evaluation_eps`: that dtype's, or coarser
    where the module casts of its own accord), whatever precision the call ran in
    (found by review: at bfloat16's, a zero-initialised gate on ``h + 0.05 mean(h)``
    passed under autocast, the full direction 0.17 off the oracle)."""
    mismatch = handler.batch_mismatch(_pattern(output.expand(handler.r, *output.shape)))
    eps = handler.evaluation_eps()
    checks.require(mismatch <= eps**0.5, lambda: handler.refuse_batch_mismatch(mismatch))


def _explain_coupling(model: nn.Module, rows: Tensor, masks: Tensor, rerun) -> None:
    """Slow path: hook every module, pull the probes back to all of them, and name the
    innermost module whose output keeps samples apart while its input does not."""
    seen: list[tuple[str, nn.Module, list[Tensor], Tensor]] = []

    def recorder(name):
        def hook(module, args, kwargs, output):
            if isinstance(output, Tensor):
                leaves = torch.utils._pytree.tree_flatten((args, kwargs))[0]
                inputs = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]
                seen.append((name, module, inputs, output))

        return hook

    hooks = [
        ours(m.register_forward_hook(recorder(n), with_kwargs=True))
        for n, m in model.named_modules()
    ]
    try:
        z = rerun()
    finally:
        for h in hooks:
            h.remove()
    tensors = [t for _, _, inputs, out in seen for t in [out, *inputs] if t.requires_grad]
    with batched_backward():
        pulled = torch.autograd.grad(
            z,
            tensors,
            rows.reshape((len(rows),) + z.shape),
            is_grads_batched=True,
            allow_unused=True,
        )
    leaks = {id(t): p is not None and bool(_leaked(p, masks)) for t, p in zip(tensors, pulled)}
    culprits = [
        (name, module)
        for name, module, inputs, out in seen
        if not leaks.get(id(out), False) and any(leaks.get(id(t), False) for t in inputs)
    ]
    if culprits:
        name, module = max(culprits, key=lambda c: c[0].count(".") + bool(c[0]))
        # the model itself: its forward's own operations (found by a docs check: "module ''")
        where = (
            f"{named_module(name, module)}"
            if name
            else f"an operation in the forward of the model ({type(module).__name__}) itself"
        )
    else:
        where = "an operation between the modules"
    # (found by a hunt: a sequence-first module on a sequence as long as the batch passes
    # the shape check, its (T, N, E) taken for (N, ...); the recurrent modules' and the
    # attention's batch_first is read, and so the transformer layers', not nn.Transformer's)
    first = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if getattr(module, "batch_first", None) is False
        and not isinstance(module, nn.RNNBase | nn.MultiheadAttention)
    ]
    sequence_first = (
        f" Here {first[0]!r} is sequence-first (batch_first=False): its (T, N, ...) inputs "
        "and outputs are read with the sequence as the batch; build it with "
        "batch_first=True and pass it (N, T, ...)."
        if first
        else ""
    )
    raise ValueError(
        f"{where} couples the samples of the batch: an output of one sample depends on "
        "another sample's input (batch statistics, centring or attention over the batch, "
        "or the batch reordered between modules: flip(0), sorting, indexing by a "
        f"permutation).{sequence_first} The metrics here pull each sample's factor back on "
        "its own, which such a network breaks. Make the module act on each sample alone (e.g. "
        "LayerNorm/GroupNorm instead of batch statistics), reorder the batch before the "
        "model's forward pass instead of inside it, and keep the samples on dimension 0 of "
        "every input (a "
        "time-first (T, N, ...) layout mixes samples along it). A tensor shared by all "
        "samples whose first dimension happens to equal the batch size couples them too: "
        "an nn.Embedding called on torch.arange(T) when T equals the batch size; hold "
        "such a table as an nn.Parameter of the model, indexed in forward"
    )


@dataclass
class LossPaths:
    """How a loss reaches the network (:func:`loss_paths`): ``outside``, the trainable
    parameters it reaches other than through a module call; ``output``, whether it reaches
    the model's output; ``calls``, whether it reaches a module call other than through
    the output (a loss on an intermediate activation); ``earlier``, whether it reaches the
    output of an earlier forward pass of the model (:func:`~riemann_core.capture.mark_pass`)."""

    outside: list[str]
    output: bool
    calls: bool
    earlier: bool = False


def off_output(output: Tensor, calls: list[Block], names: dict[int, str]) -> list[str]:
    """The trainable parameters (``names``: ``{id(p): name}``) of the ``calls`` whose
    outputs the autograd graph of the model's ``output`` does not reach, and of no call it
    reaches: the output metric, pulled back from ``output``, is zero on them (an auxiliary
    head computed inside ``forward``)."""
    off, _ = reach(output, calls)
    return [names[i] for i in off if i in names]


def reach(output: Tensor, calls: list[Block]) -> tuple[set[int], set[int]]:
    """``(off, on)``: the ids of the parameters of the ``calls`` whose outputs the autograd
    graph of ``output`` does not reach, and of no call it reaches nor one outside the
    graph (run under ``torch.no_grad()``); and of those of the calls it reaches. The whole
    graph under ``output`` is walked (a few nodes per module), until every call's output
    is found."""
    pending: dict[object, list[Block]] = {}
    for c in calls:
        if c.output is not None and c.output.grad_fn is not None:
            pending.setdefault(c.output.grad_fn, []).append(c)
    seen, stack = set(), [output.grad_fn]
    while stack and pending:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        pending.pop(node, None)
        stack.extend(next_node for next_node, _ in node.next_functions)
    on = {id(p) for c in calls if c.output is not None and c.output.grad_fn is not None
          and c.output.grad_fn not in pending for p in c.params}  # fmt: skip
    outside = {id(p) for c in calls if c.output is not None and c.output.grad_fn is None
               for p in c.params}  # fmt: skip
    return {id(p) for cs in pending.values() for c in cs for p in c.params} - on - outside, on


#: The type name of the autograd node of a ``torch.compile``'d forward's backward.
COMPILED_BACKWARD = "CompiledFunctionBackward"


def reached_parameters(
    output: Tensor, calls: list[Block], nodes: set | None = None
) -> tuple[set[int], set[int] | None]:
    """``(on, leaves)``: the ids of the parameters of the ``calls`` whose modules' outputs
    the autograd graph of ``output`` reaches (:func:`reach`), and of those it reaches
    themselves, as leaves: a parameter its module detaches inside its forward
    (``self.w.detach()`` chosen by a call counter) is not among them, where its module's
    output is. ``leaves`` is ``None`` where the graph holds the backward of a
    ``torch.compile``'d forward, whose inputs list every parameter its code read, under
    ``torch.no_grad()`` too (found by review: a gate computed so from a module's own
    weight was taken for a weight the eager pass run again lost). Every node once; those
    that are no leaf's are added to ``nodes`` where given (see
    :meth:`~riemann_core.capture.Replay.check_kept`)."""
    on, leaves, compiled = reach(output, calls)[1], set(), False
    for node in autograd_nodes([output.grad_fn]):
        if type(node).__name__ == COMPILED_BACKWARD:
            compiled = True
            if nodes is None:
                break
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        elif nodes is not None:
            nodes.add(node)
    return on, None if compiled else on & leaves


def loss_paths(
    root: Tensor,
    output: Tensor,
    calls: list[Block],
    names: dict[int, str],
    key: str = "",
    token=None,
) -> LossPaths:
    """Walk the autograd graph of ``root`` (a loss) down to the model's ``output`` and the
    outputs of its ``calls``, recording where it meets the network (``names``:
    ``{id(p): name}`` of the trainable parameters). A call is resumed at its inputs, so
    every node outside the network's calls is seen: a few per module; the graph under
    the output is the batch-coupling probe's (:func:`register`). A node stamped by
    :func:`~riemann_core.capture.mark_pass` under ``key`` with another token than ``token``
    (that of the pass ``output`` comes from) is the output of an earlier pass."""
    calls_at: dict[object, list[Block]] = {}
    for c in calls:
        if c.output.grad_fn is not None:
            calls_at.setdefault(c.output.grad_fn, []).append(c)
    paths = LossPaths([], False, False)
    seen, stack, at_output = set(), [root.grad_fn], output.grad_fn
    while stack:
        node = stack.pop()
        if node is not None and node is at_output:
            paths.output = True
            continue
        if node is None or node in seen:
            continue
        seen.add(node)
        if key and node.metadata.get(key, token) is not token:
            paths.earlier = True
        if node in calls_at:
            paths.calls = True
            for t in (t for c in calls_at[node] for t in c.graph_inputs):
                if t.grad_fn is None and id(t) in names:  # a parameter as a module's input
                    paths.outside.append(names[id(t)])
                stack.append(t.grad_fn)
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf's gradient
        if variable is not None and id(variable) in names:
            paths.outside.append(names[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return paths
