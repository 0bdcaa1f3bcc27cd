"""The forward passes whose gradients a preconditioner's ``.grad`` hold.

:class:`Differentiated` tells whether a gradient flowed back through a pass's output at
all (``pre.step()`` takes the metric at the last pass, which must be the one the loss
went through); :class:`Accumulations`, which ``.grad`` a backward pass accumulated into
since a pass started (a ``.grad`` none did holds no gradient of that pass), and what the
accumulations since a direction was written found there (the direction, not zeroed, and
each later one straight onto the one before). :class:`Passes` keeps, for a data-parallel
``pre.step()`` (a ``process_group``), what its combination of the ranks' ``.grad`` relies
on and cannot see in them. That combination is ``sum_p (N_p / N) g_p`` (under
``DistributedDataParallel``, its equal-weight average of the micro-batches accumulated
in ``no_sync()``, whose shares are checked alike, the loss not: any loss's average is its
own), which is the global batch's gradient only where

* each pass is split between the ranks alike: rank ``p``'s share ``N_pk / N_k`` of pass
  ``k`` is the same for every pass whose gradient ``.grad`` holds (micro-batches), which
  :func:`check_shares` checks on every rank's sizes;
* each ``g_p`` is the gradient of the mean cross-entropy over every output row of the
  shard. For that loss the gradient at outputs ``z`` of ``R`` rows and ``C`` classes is
  ``g = (softmax(z) - q) / R``, ``q`` the targets' distribution (one-hot, smoothed or
  soft), so ``softmax(z) - R g = q`` has no negative entry. A summed loss leaves
  ``(1 - R) softmax(z)`` off the targets, a class weight ``w_y`` above the batch's mean
  ``(1 - R w_y / W) softmax(z)``, ignore_index or a loss on some rows only
  ``(1 - R / R') softmax(z)``, all negative: :meth:`Passes.check_mean` refuses where an
  entry lies below :func:`tolerance` (a loss that equals the mean one on this batch, or
  a model certain of every row, passes: nothing then tells them apart). A rank's share
  of the global mean, ``c`` times its mean (``N_p / N`` or ``1 / P``), leaves nothing
  negative and would be weighted twice: with hard targets, ``R g = c (softmax(z) - e_y)``
  reads ``c`` (:func:`hard_scale`), and a rank whose passes' factors add up to less than
  1 is refused (``loss / K`` over ``K`` micro-batches adds up to 1).

A pass counts once a backward pass that accumulates into ``.grad`` went through its
output, from the first pass after a step or after every ``.grad`` was set to ``None`` or
zero (``opt.zero_grad()``), read as a forward pass starts and as a backward pass first
reaches a recorded output: each backward pass is told apart (the autograd engine's graph
task), so a zeroing between ``model(x)`` and ``loss.backward()`` drops what earlier
backward passes left, never what the running one adds (a loss over two passes), and a
``torch.autograd.grad`` through the output, which accumulates into no ``.grad``, counts for
nothing. A parameter whose gradient the backward pass accumulates before it reaches a
recorded output (an auxiliary head evaluated after the output, a parameter used in the
loss only) is read as that pass first reaches it, before its accumulation (a hook on the
parameter, :class:`_BeforeAccumulation`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.autograd.graph import get_gradient_edge

from .capture import ours, some


class Differentiated:
    """Whether a gradient flowed back through a forward pass's output tensors (``outputs``):
    a pre-hook on the autograd node of each that requires grad, and of a view's base (a
    view changed in place afterwards, ``logits[:, :C] /= T``, is rebased and its own node
    left out of the graph: found by review). The hooks go with the graph. ``seen`` is true
    from the start where there is nothing to watch: no tensor requires grad, or one is a
    leaf (a hook on it would stay for good). ``returned``: the ids of the parameters whose
    gradient a backward pass seen returned (``torch.autograd.grad``), which may be written
    into ``.grad`` by hand, in place; ``True`` where it cannot tell which (all). Every
    backward pass through the outputs counts, not only the first (found by review: after
    ``loss.backward(inputs=head)``, the body's gradient from ``torch.autograd.grad`` copied
    into its zeroed ``.grad`` was refused as unreached; and a pass returning the head's
    gradient alone let an in-place clip pass the body's stale zeros, silently)."""

    __slots__ = ("seen", "returned", "task", "watching", "listeners", "model", "muted")

    def __init__(self, outputs: list[Tensor], model: nn.Module | None = None) -> None:
        self.listeners: list = []  # called as a gradient reaches the outputs
        # given: only a backward pass that takes the gradient of one of its trainable
        # parameters counts (see __call__)
        self.model = None if model is None else weakref.ref(model)
        tensors = [t for t in outputs if t.requires_grad]
        tensors += [t._base for t in tensors if t._is_view() and t._base.requires_grad]
        nodes = {t.grad_fn for t in tensors}
        self.seen = not tensors or None in nodes
        self.returned: frozenset[int] | bool = frozenset()
        self.task = None  # the backward pass (graph task) read last
        self.muted = False  # riemann_core's own backward passes under way (see own_passes)
        self.watching = not self.seen
        if self.watching:
            for node in nodes:
                ours(node.register_prehook(self))

    def __call__(self, grad_outputs) -> None:
        # not a backward pass that takes no parameter's gradient (torch.autograd.grad with
        # respect to the inputs: a saliency map, an adversarial example; found by a hunt:
        # one on another batch between loss.backward() and pre.step() passed for it, and the
        # earlier batch's gradient was preconditioned with this batch's metric, 1.4-2.6 off)
        model = None if self.model is None else self.model()
        task = _graph_task()
        if not self.muted and (
            not self.seen or (self.returned is not True and task not in (None, self.task))
        ):
            # (the walk over the parameters costs up to ~4 ms: read once a backward pass,
            # however many outputs it reaches; in full only where torch.autograd.grad
            # returns a parameter's gradient)
            self.task = task
            taken = "returns" if model is None else _takes_a_parameter_gradient(model)
            self.seen = self.seen or taken is not None
            if taken == "returns":
                returned = True if model is None else _returned_parameters(model)
                if returned is True or self.returned is True:
                    self.returned = True
                else:
                    self.returned = self.returned | returned
        for listener in self.listeners:
            listener()

    def spend(self) -> None:
        """A step used the gradient that flowed back: the next step needs another."""
        self.seen, self.returned, self.task = not self.watching, frozenset(), None

    @contextlib.contextmanager
    def own_passes(self) -> Iterator[None]:
        """Inside the block, riemann_core's own backward passes through the outputs
        (``pre.backward(loss)``'s, which write ``.grad`` themselves) are not read: the walk
        over the parameters for each took 4% of a small network's step."""
        self.muted = True
        try:
            yield
        finally:
            self.muted = False

    def returns(self, p: Tensor) -> bool:
        """Whether a backward pass seen returned the gradient of ``p``."""
        return self.returned is True or id(p) in self.returned


class Accumulations:
    """When a backward pass last accumulated into the ``.grad`` of each parameter hooked
    (:meth:`hook`): a post-accumulate-grad hook per parameter notes a tick of one counter,
    which :meth:`tick` also reads as a forward pass starts, so that :meth:`since` tells
    whether a backward pass accumulated into a ``.grad`` after that start. Unlike the
    ``.grad``'s version, no other write moves it: an in-place clip
    (``clip_grad_norm_``), or any write into a flat buffer the ``.grad`` are views of
    (``DistributedDataParallel(gradient_as_bucket_view=True)``).

    From :meth:`mark` on (a direction written into ``.grad``), the hooks also note what the
    accumulations into each ``.grad`` found (:meth:`onto`). A gradient hook on the
    parameter (``Tensor.register_hook``, :class:`_BeforeAccumulated`), which runs just
    before autograd adds into ``.grad``, reads the ``.grad`` the first of them adds onto,
    the tensor written or any other (``None`` is read as zero): its least and largest
    entry, device scalars read at the step. Zero tells a zeroing since (in place,
    ``opt.zero_grad(set_to_none=False)``, or a zero tensor assigned) from whatever else was
    left there: the direction, also where a clip or decay written into it since moved its
    version as a zeroing does, or replaced it by a new tensor (``p.grad = p.grad * c``).
    At each accumulation after the first, it reads whether the ``.grad`` is still the
    tensor the one before left, at the version its backward pass left at its end
    (:class:`_Ended`, after ``DistributedDataParallel``'s write of the averaged gradient
    into ``.grad``) as the running one first reached it, or a view of the same flat buffer
    (``gradient_as_bucket_view=True``: views share the buffer's version, which the
    accumulations into the others move); where it is, its extremes too: zeros there leave
    none of what the first found (a zeroing through ``.data``, which moves no version,
    after another loss's pass landed on the direction). The post-accumulate-grad hook
    notes the ``.grad`` and its version as the accumulation returns, before
    ``DistributedDataParallel``'s own hook on the parameter. A
    ``torch.autograd.grad`` with respect to the parameter runs the gradient hook and
    accumulates nothing: the post hook takes what the last gradient hook found, which ran
    for its own accumulation."""

    def __init__(self) -> None:
        self._ticks = itertools.count()
        self._last: dict[int, int] = {}  # {id(parameter): tick of its last accumulation}
        self._hooks: dict[int, tuple[weakref.ref, tuple]] = {}
        # the ids of the parameters whose .grad hold a direction since mark()
        self._written: set[int] = set()
        # {id(parameter): what the gradient hook found, for the accumulation under way}
        self._before: dict[int, tuple] = {}
        # {id(parameter): [accumulations, the first's reading (None where it added onto
        # None), every later one onto the .grad the one before left, that .grad after the
        # last (weakly), its version at the end of its backward pass]} since mark()
        self._onto: dict[int, list] = {}
        # {id(a .grad, or of the flat buffer it is a view of): (the backward pass that
        # first reached it, its version then)} since mark()
        self._reached: dict[int, tuple[int, int]] = {}
        # {graph task: the parameters whose .grad to note again at its end} (:class:`_Ended`)
        self._ending: dict[int, list[Tensor]] = {}

    def tick(self) -> int:
        """A tick after every accumulation noted so far."""
        return next(self._ticks)

    def hook(self, params) -> None:
        """Hook each of ``params`` not hooked yet (a parameter replaced since, too)."""
        for p in params:
            kept = self._hooks.get(id(p))
            if kept is None or kept[0]() is not p:
                before = _BeforeAccumulated(p, self)
                after = _Accumulated(self)
                handles = ours(p.register_hook(before), p.register_post_accumulate_grad_hook(after))
                self._hooks[id(p)] = (weakref.ref(p), handles)

    def since(self, p: Tensor, tick: int) -> bool:
        """Whether a backward pass accumulated into ``p.grad`` after ``tick``."""
        return self._last.get(id(p), -1) > tick

    def mark(self, written: list[Tensor]) -> None:
        """Note from now on what the accumulations into each ``.grad`` hooked find,
        forgetting what earlier ones found; ``written``: the parameters whose ``.grad`` now
        hold a direction (none: nothing to note, after a step skipped), hooked already
        (:meth:`hook`), so that the first accumulation since is seen (a ``.grad`` set to
        ``None`` may come back a tensor before the next forward pass: a bucket view
        ``DistributedDataParallel`` assigns again)."""
        for notes in (self._onto, self._before, self._written, self._reached, self._ending):
            notes.clear()
        self._written.update(id(p) for p in written)

    def onto(
        self, p: Tensor
    ) -> tuple[int, tuple[Tensor, Tensor] | None, bool, Tensor | None] | None:
        """What the accumulations into ``p.grad`` since :meth:`mark` found: ``(their
        number, the least and the largest entry of the .grad the first added onto (device
        scalars; zeros where a later one found zeros, :func:`_unless_zero`; None where it
        added onto None, and the later ones are not followed),
        whether each later one added onto the .grad at the version the one before or the
        end of its backward pass left, the .grad the last left)``; ``None`` where none
        accumulated."""
        seen = self._onto.get(id(p))
        return None if seen is None else (seen[0], seen[1], seen[2], seen[3]())

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for ref, handles in self._hooks.values():
            for handle in handles:
                handle.remove()
            unhooked(ref())
        self._hooks.clear()


class _BeforeAccumulated:
    """A gradient hook of :class:`Accumulations` on a parameter (``Tensor.register_hook``,
    run before autograd adds the gradient into ``.grad``): notes what the accumulation
    about to run finds, where a direction was written (:meth:`Accumulations.mark`). Holds
    the parameter weakly; changes no gradient."""

    __slots__ = ("param", "notes")
    __torch_unserializable__ = True  # (dropped by torch.save like any hook, silently)

    def __init__(self, param: Tensor, notes: Accumulations) -> None:
        self.param, self.notes = weakref.ref(param), notes

    def __call__(self, _: Tensor) -> None:
        notes = self.notes
        if not notes._written:
            return
        param = self.param()
        if param is None:
            return
        key, grad = id(param), param.grad
        if grad is not None and grad._is_view():  # (its buffer reached: as it is now)
            _version_as_reached(grad, notes._reached)
        seen = notes._onto.get(key)
        if seen is not None:  # a later accumulation: onto what the one before left?
            if seen[1] is not None:  # (followed only where the first added onto a tensor)
                onto = (
                    grad is not None
                    and seen[3]() is grad
                    and _version_as_reached(grad, notes._reached) == seen[4]
                )
                # read as the first is where that may tell: zeros there were zeroed through
                # .data, which moves no version (after another loss's pass landed on the
                # direction)
                read = onto and seen[2] and _may_not_be_zero(seen[1])
                notes._before[key] = (onto, _extremes(grad.detach()) if read else None)
            return
        if grad is None or key not in notes._written:
            notes._before[key] = (None,)
        else:  # zero where zeroed since the direction (device scalars, no sync)
            notes._before[key] = (_extremes(grad.detach()),)


def _version_as_reached(grad: Tensor, reached: dict[int, tuple[int, int]]) -> int:
    """The version of ``grad`` as the running backward pass first reached it, or a view of
    the same flat buffer (``reached``, by the id of the buffer): views share its version,
    which the accumulations into the others, and ``DistributedDataParallel``'s division of
    each view in a synced pass, move on the way."""
    key = id(grad._base) if grad._is_view() else id(grad)
    task = torch._C._current_graph_task_id()
    first = reached.get(key)
    if first is None or first[0] != task:
        first = reached[key] = (task, grad._version)
    return first[1]


def _extremes(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The least and the largest entry of ``grad`` (of its real parts and imaginary parts
    where complex; zeros where it has none): both zero where every entry is, NaN where one
    is. One reduction, ``torch.aminmax``: ``vector_norm(grad, inf)`` took 20x as long on
    the CPU (3.2 ms a 1024x1024 .grad, 5% of a 784-1024-1024-10 step: found by review)."""
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    if grad.numel() == 0:
        zero = grad.new_zeros(())
        return zero, zero
    return tuple(torch.aminmax(grad))


def _may_not_be_zero(extremes: tuple[Tensor, Tensor]) -> bool:
    """Whether ``extremes`` (:func:`_extremes`) may be other than both zero: read where they
    lie on the CPU, which costs no sync (a later accumulation's reading then only where it
    may tell: 3.5% of a 64-32-32-10 step of two micro-batches zeroed in place, read each
    time), taken as so on other devices (read at the step)."""
    low, high = extremes
    return low.device.type != "cpu" or bool(low) or bool(high)


def _unless_zero(first: tuple[Tensor, Tensor], later: tuple[Tensor, Tensor]):
    """The extremes ``first`` an accumulation found, or zeros where a later one onto the
    same tensor at the same version found zeros (:func:`_extremes`, device scalars): a
    zeroing through ``.data`` between them, which moves no version, left none of what the
    first found."""
    kept = torch.logical_or(*later)  # (NaN reads as kept)
    return tuple(torch.where(kept, r, 0) for r in first)


class _Accumulated:
    """A post-accumulate-grad hook of :class:`Accumulations`: notes the tick at which a
    backward pass accumulated into the parameter's ``.grad``, and, from a mark on, what
    the gradient hook found before it and the ``.grad`` and its version after it
    (:meth:`Accumulations.onto`), noted again at the end of the backward pass
    (:class:`_Ended`); changes nothing."""

    __slots__ = ("notes",)

    def __init__(self, notes: Accumulations) -> None:
        self.notes = notes

    def __call__(self, param: Tensor) -> None:
        notes, key = self.notes, id(param)
        notes._last[key] = next(notes._ticks)
        if not notes._written:
            return
        found = notes._before.pop(key, None)
        if found is None:  # (nothing to follow)
            return
        seen = notes._onto.get(key)
        if seen is None and found[0] is None:  # (the first, onto None or no direction)
            notes._onto[key] = _NOT_ONTO
            return
        grad = param.grad  # (None where a hook before this one took it)
        after = _dead if grad is None else weakref.ref(grad)
        version = -1 if grad is None else grad._version
        if seen is None:
            seen = notes._onto[key] = [1, found[0], True, after, version]
        else:
            seen[0] += 1
            seen[2] = seen[2] and found[0] is True
            seen[3], seen[4] = after, version
            if seen[2] and found[1] is not None:
                seen[1] = _unless_zero(seen[1], found[1])
        task = torch._C._current_graph_task_id()
        # (traced by compiled autograd, whose backward takes no callback: not noted again)
        if seen[2] and task != -1 and not torch.compiler.is_compiling():
            ending = notes._ending.get(task)
            if ending is None:
                ending = notes._ending[task] = []
                Variable._execution_engine.queue_callback(_Ended(notes, task))
            ending.append(param)


class _Ended:
    """The end of a backward pass that accumulated into ``.grad`` followed by
    :class:`Accumulations`: notes again each ``.grad`` and its version, after the callbacks
    queued before (``DistributedDataParallel``'s, which writes the averaged gradient into
    ``.grad`` at the end of a synced backward pass: a version on, which read as a write
    between two accumulations, and a forgotten zeroing before two synced micro-batches
    was taken; found by review). Queued as a callback of the backward pass, it queues
    itself once more so as to run after those queued later (DDP's is queued as its last
    bucket is ready). Freed unrun, as after an exception inside the pass, it drops the
    pass's parameters (they stayed noted until the next step, one list a failed pass)."""

    __slots__ = ("notes", "task", "queued", "__weakref__")

    def __init__(self, notes: Accumulations, task: int) -> None:
        self.notes, self.task, self.queued = notes, task, False
        weakref.finalize(self, notes._ending.pop, task, None)

    def __call__(self) -> None:
        if not self.queued:
            self.queued = True
            Variable._execution_engine.queue_callback(self)
            return
        notes = self.notes
        for param in notes._ending.pop(self.task, ()):
            seen = notes._onto.get(id(param))
            grad = param.grad
            if seen is not None and seen[1] is not None and seen[2]:
                seen[3] = _dead if grad is None else weakref.ref(grad)
                seen[4] = -1 if grad is None else grad._version


def _dead() -> None:
    """A dead reference's answer: no tensor."""
    return None


#: the record of a ``.grad`` whose first accumulation since the mark added onto ``None``:
#: what later ones find is not followed
_NOT_ONTO = (1, None, False, _dead, -1)


def tolerance(dtype: torch.dtype) -> float:
    """How far below zero an entry of ``softmax(z) - R g`` may lie from rounding: ``R g``
    carries the relative rounding of ``g``'s dtype on entries of at most 1 in magnitude."""
    return max(1e-4, 16 * torch.finfo(dtype).eps)


#: Passes, and zeroings of ``.grad``, kept between steps at most (a loop that never steps,
#: or evaluates with gradients enabled, would add one per forward pass for good; found by
#: review). More micro-batches than this between two steps are checked on the last ones.
MAX_PASSES = 256


#: Entries of the outputs whose gradient is read at a time (:meth:`_Pass.watch_mean`).
CHUNK = 2**22


class _Pass:
    """One forward pass: its samples and their shape (its first output's) and, for each
    backward pass through it that ``.grad`` may hold (by number, :class:`Passes`), the most
    negative entry of ``softmax(z) - R g`` and the :func:`scale_figures` where read
    (tensors: read at the step, not in the backward)."""

    __slots__ = ("shape", "differentiated", "rows", "dtype", "backward")

    def __init__(self, shape: tuple[int, ...], differentiated: Differentiated, number: int):
        self.shape, self.differentiated = shape, differentiated
        self.rows, self.dtype = 0, None
        # {backward pass: [lowest, scale figures]}; a pass with nothing to watch counts
        # from its forward pass on, as if differentiated by the last backward pass
        self.backward: dict[int, list] = {} if differentiated.watching else {number: [None, None]}

    def watch_mean(self, z: Tensor, arrived) -> None:
        """Note the lowest entry of ``softmax(z) - R g`` whenever ``g`` comes back to ``z``
        (a hook on ``z``, gone with the graph), for the backward pass ``arrived(self)``
        numbers, at ``z``'s values then (changed in place since: those); each backward pass
        apart (found by review: a summed loss, then the mean one through the same output,
        was read at the last)."""
        values = z.detach()

        def hook(g: Tensor) -> None:
            number = arrived(self)
            if number is None:  # (a backward pass that accumulates nothing)
                return
            entry = self.backward[number]
            if not g.numel():  # an empty shard: named at the step (found by review:
                return  # amin() raised inside the user's backward)
            dtype = torch.promote_types(values.dtype, torch.float32)
            C = max(g.shape[-1], 1)
            self.rows = R = g.numel() // C
            # by chunks of rows: a language model's outputs (N T x V) would otherwise need
            # two more tensors of their size in the backward pass
            chunks = zip(
                values.reshape(R, C).split(CHUNK // C or 1),
                g.reshape(R, C).split(CHUNK // C or 1),
                strict=True,
            )
            lows, figures = [], []
            for v, d in chunks:
                p, Rg = torch.softmax(v.to(dtype), -1), R * d.to(dtype)
                lows.append((p - Rg).amin())
                figures.append(scale_figures(p, Rg))
            entry[:] = torch.stack(lows).amin(), _merged(figures)
            self.dtype = g.dtype

        hook._riemann_core_reads = True  # (not a user's: user_hook_ids)
        ours(z.register_hook(hook))


#: The least softmax entry whose ratio ``R g / p`` :func:`scale_figures` reads (below,
#: the rounding of ``p`` and of ``R g`` in their own dtypes may dominate the ratio).
LEAST_READ = 1e-6


def scale_figures(p: Tensor, Rg: Tensor) -> Tensor:
    """``(rows, rows with one negative entry, least and largest p, least and largest
    R g / p)`` over the entries of ``R g`` above zero (and ``p`` of at least
    :data:`LEAST_READ`), for rows ``p = softmax(z)`` and ``R g`` (``R x C``): what tells
    ``c`` times the mean cross-entropy's gradient with hard targets, ``R g = c (p -
    e_y)`` (one negative entry per row, ``R g / p = c`` at every other), from label
    smoothing ``eps``, whose ratios ``1 - eps / (C p_j)`` vary with ``p`` (read by
    :func:`hard_scale`)."""
    read = (Rg > 0) & (p >= LEAST_READ)
    ratio = Rg / p.clamp_min(LEAST_READ)
    inf = p.new_tensor(math.inf)
    return torch.stack(
        [
            p.new_tensor(float(p.shape[0])),
            (Rg < 0).sum(-1).eq(1).sum().to(p.dtype),
            torch.where(read, p, inf).amin(),
            torch.where(read, p, -inf).amax(),
            torch.where(read, ratio, inf).amin(),
            torch.where(read, ratio, -inf).amax(),
        ]
    )


def _merged(figures: list[Tensor]) -> Tensor:
    """:func:`scale_figures` of chunks of rows, as of all their rows."""
    f = torch.stack(figures)
    return torch.cat(
        [f[:, :2].sum(0), f[:, 2:3].amin(0), f[:, 3:4].amax(0), f[:, 4:5].amin(0), f[:, 5:].amax(0)]
    )


#: How much more the largest ``p`` read must be than the least for :func:`hard_scale` to
#: tell label smoothing, whose ``1 - R g / p`` then spread by a third of their size at least.
SPREAD = 1.5


def hard_scale(figures: list[float], tol: float) -> float | None:
    """``c`` where :func:`scale_figures` show ``c`` times the mean cross-entropy's gradient
    with hard targets (``1`` for the mean itself); ``None`` where they do not (label
    smoothing, probability targets) or cannot tell: a row without one negative entry (a
    model certain of it), ``p`` read spread less than :data:`SPREAD` times (two classes in
    one row, a uniform softmax: smoothing reads alike there), ratios apart by more than the
    rounding ``tol``, or a ``tol`` of half precision. Smoothing's ratios fall short of 1
    by ``d_j = eps / (C p_j)``, which spread by ``d / 3`` at least where ``p`` spreads by
    :data:`SPREAD`: read as alike only where ``d <= 3 tol``, so a sum of such factors
    stays within ``3 tol`` of the mean's; in float32 (``tol = 1e-4``) that is within
    :data:`SHARE_MARGIN`, in bfloat16 (``0.125``) not (found by review: bfloat16
    smoothing over 2 micro-batches was refused as a share)."""
    rows, single, least_p, most_p, low, high = figures
    if 3 * tol >= SHARE_MARGIN:  # half precision: smoothing may read as a factor
        return None
    if single != rows or not math.isfinite(low) or most_p < SPREAD * least_p:
        return None
    return high if high - low <= tol * high else None


class _BeforeAccumulation:
    """A gradient hook on a trainable parameter (``Tensor.register_hook``, run before the
    gradient is accumulated into ``.grad``): notes, for the backward pass under way, what
    ``.grad`` held before it first reached the parameter (:meth:`Passes._before`). Holds
    the parameter and the record weakly; changes no gradient."""

    __slots__ = ("param", "passes")
    # (torch.save, torch.multiprocessing: dropped like any hook, without a warning per
    # parameter, as torch.utils.hooks.unserializable_hook marks one)
    __torch_unserializable__ = True

    def __init__(self, param: Tensor, passes: Passes) -> None:
        self.param, self.passes = weakref.ref(param), weakref.ref(passes)

    def __call__(self, grad: Tensor) -> None:
        passes = self.passes()
        if passes is None:
            return
        # (the backward pass reached a recorded output already: read there; also in a
        # backward pass run inside it, a reentrant checkpoint's, whose task comes later)
        task = torch._C._current_graph_task_id()
        if task == passes._task or (passes._running[0] and task > passes._task):
            return
        param = self.param()
        if param is not None:
            passes._before(param)


class _End:
    """Queued on a backward pass through a recorded output: clears the pass's own
    ``running`` cell when the engine runs it at the end, or frees it, as after an
    exception inside the pass, whose queued callbacks never run (found by review: the pass
    stayed under way, and a retry of ``backward`` on the retained graph after
    ``zero_grad()`` noted nothing before the output, its parameters' hooks reading it as a
    reentrant checkpoint's pass inside the first; the failed pass counted). A cell of its
    own, so that a late end touches no later pass."""

    __slots__ = ("running", "__weakref__")

    def __init__(self, running: list[bool]) -> None:
        self.running = running
        weakref.finalize(self, running.__setitem__, 0, False)

    def __call__(self) -> None:
        self.running[0] = False


def unhooked(p: Tensor | None) -> None:
    """Leave ``p`` without a gradient hook dict where its last hook was taken off: an
    empty dict still has autograd call into Python at every accumulation into ``p.grad``
    (a few microseconds a parameter per backward pass, for good after ``pre.remove()``)."""
    if p is not None and getattr(p, "_backward_hooks", None) == {}:
        p._backward_hooks = None


def user_hooks_on(p: Tensor) -> bool:
    """Whether ``p`` has gradient hooks (``Tensor.register_hook``) other than those
    :class:`Passes` and :class:`Accumulations` register, which change no gradient."""
    return bool(user_hook_ids(p))


def user_hook_ids(p: Tensor) -> tuple:
    """The ids of ``p``'s gradient hooks (``Tensor.register_hook``) other than those
    :class:`Passes`, :class:`Accumulations` and :meth:`_Pass.watch_mean` register, which
    change no gradient: each registration has its own, never reused."""
    hooks = getattr(p, "_backward_hooks", None)
    if not hooks:  # most tensors' (no dict at all)
        return ()
    own = (_BeforeAccumulation, _BeforeAccumulated)
    return tuple(
        i
        for i, h in hooks.items()
        if not isinstance(h, own) and not getattr(h, "_riemann_core_reads", False)
    )


def accumulate_hooks_on(p: Tensor) -> bool:
    """Whether ``p`` has post-accumulate-grad hooks other than :class:`Accumulations`'."""
    hooks = getattr(p, "_post_accumulate_grad_hooks", None) or {}
    return any(not isinstance(h, _Accumulated) for h in hooks.values())


class Passes:
    """The passes since the last step whose gradients ``.grad`` may hold (module
    docstring), for a data-parallel ``pre.step()``."""

    def __init__(self) -> None:
        # the .grad each parameter held at the end of the last backward pass through a
        # recorded output, and its version (:meth:`_note_grads`)
        self._held: dict[int, tuple[weakref.ref, int] | None] = {}
        self._passes: deque[_Pass] = deque(maxlen=MAX_PASSES)
        # (whether every .grad was zero, per device; the backward passes before it, by
        # number; whether a .grad changed since the last backward pass) at a forward
        # pass's start, or as a backward pass first reaches a recorded output
        self._zeroings: deque[tuple[list[Tensor], int, bool]] = deque(maxlen=MAX_PASSES)
        # a .grad changed between two backward passes, and not zeroed since (read with the
        # zeroings' flags: a change that leaves every .grad zero is a zeroing)
        self._edited = False
        # more passes than MAX_PASSES since the last step: the first ones are not kept
        self._truncated = False
        # the backward passes through recorded outputs: the number of the last, the autograd
        # engine's graph task it ran as, whether it accumulates into .grad, and the model
        # whose .grad it accumulates into
        self._number, self._task, self._accumulates = 0, None, True
        self._network: nn.Module | None = None
        self._grads_watched = False
        # each trainable parameter of the network's hook (:class:`_BeforeAccumulation`):
        # {id: (the parameter, weakly; the hook's handle)}
        self._hooks: dict[int, tuple[weakref.ref, object]] = {}
        # the model whose parameters were hooked; whether since the last step
        self._hooked: nn.Module | None = None
        self._rehooked = False
        # what each parameter's .grad held before the first backward pass since the last one
        # through a recorded output accumulated into it (:meth:`_before`), by id
        self._early: dict[int, tuple[bool, Tensor | bool]] = {}
        # the last backward pass (graph task) that noted each: a later one's note of the same
        # parameter adds whether .grad was zero then (a zeroing after the first note)
        self._early_task: dict[int, int] = {}
        # whether the backward pass through a recorded output (self._task) still runs: a
        # cell of its own (_End)
        self._running = [False]
        # the last forward pass ran inside a DistributedDataParallel wrapper of the model
        # (the preconditioner built on its .module): the advice to wrap it is wrong there
        self.ddp_forward = False

    def wrap_advice(self) -> str:
        """How to hand the averaging of the ``.grad`` to ``DistributedDataParallel``."""
        if self.ddp_forward:
            return (
                "pass the DistributedDataParallel wrapper the forward pass runs through to "
                "RiemannianPreconditioner, not its .module (built on the module inside, the "
                "preconditioner sees DistributedDataParallel average the .grad after the "
                "backward pass as a change to this rank's .grad, and would weight the "
                "averaged gradient again)"
            )
        return (
            "wrap the model in DistributedDataParallel and pass the wrapper to "
            "RiemannianPreconditioner (its averaged .grad is taken as the global gradient)"
        )

    def forward_starts(self, model: nn.Module) -> None:
        """Before a forward pass: the passes already differentiated contributed nothing
        where every trainable ``.grad`` is ``None`` (``opt.zero_grad()``) or zero
        (``zero_grad(set_to_none=False)``: a device flag, read at the step)."""
        if _in_backward():
            return
        self._running = [False]
        if any(r.backward for r in self._passes):
            self._zeroing(model, self._number + 1, edits=True)

    def _zeroing(
        self,
        model: nn.Module,
        number: int,
        edits: bool,
        early: dict[int, tuple[bool, Tensor | bool]] | None = None,
        earlier: set[int] = frozenset(),
    ) -> None:
        """Note whether every trainable ``.grad`` of ``model`` is ``None`` or zero now, which
        drops what the backward passes numbered below ``number`` left; with ``edits``,
        whether a ``.grad`` changed since the last backward pass. ``early``: the parameters
        the running backward pass accumulated into already, read as they were before
        (:meth:`_before`); ``earlier``: those of them noted by another backward pass only,
        which the running one has not reached yet, also read as they are now (zeroed since
        the note: found by review, a regulariser's own backward before zero_grad() hid the
        zeroing after it)."""
        early = early or {}
        zero = []
        by_id = {id(p): p for p in model.parameters()} if earlier else {}
        for key, (_, nonzero) in early.items():
            if nonzero is False:  # (None before it)
                continue
            if key in earlier and key in by_id:
                grad = by_id[key].grad
                if grad is None:  # (set to None since)
                    continue
                zero.append(nonzero.logical_not() | grad.eq(0).all())
            else:
                zero.append(nonzero.logical_not())
        params = [
            p
            for p in model.parameters()
            if p.requires_grad and p.grad is not None and id(p) not in early
        ]
        if not params and not zero:
            self._drop(number)
            return
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in params:
            by_device.setdefault(p.grad.device, []).append(p.grad)
        zero += [torch.stack(torch._foreach_norm(gs)).eq(0).all() for gs in by_device.values()]
        if len(self._zeroings) == MAX_PASSES:  # (one host read per MAX_PASSES zeroings)
            self._settle()
        self._zeroings.append((zero, number, edits and bool(self._changed(params))))

    def _drop(self, number: int) -> None:
        """Every ``.grad`` was zero once the backward passes below ``number`` had run: what
        they left is gone."""
        for r in self._passes:  # (kept: a later backward pass may go through it again)
            for k in [k for k in r.backward if k < number]:
                del r.backward[k]
        self._edited = self._truncated = False

    def forward_ends(
        self,
        outputs: list[Tensor],
        differentiated: Differentiated,
        mean_ce: bool,
        grads_of: nn.Module | None = None,
        network: nn.Module | None = None,
    ) -> None:
        """After a forward pass with gradients: note it and each backward pass through it;
        with ``mean_ce``, watch its gradient at a single output tensor of logits (classes
        last); with ``grads_of``, note the ``.grad`` of its parameters after each backward
        pass through the outputs (:meth:`check_grads_kept`). ``network`` (``grads_of``
        where not given): the model whose ``.grad`` are read for zeroings as a backward
        pass starts. A pass inside a backward pass (a checkpoint's recomputation of the
        whole model) is none: found by review, its zeroing dropped the running backward
        pass, 0.5 off."""
        if _in_backward():
            return
        self._network = network if network is not None else grads_of
        self._grads_watched = grads_of is not None
        network = self._network
        if network is not None and (
            self._hooked is not network
            or (not self._rehooked and any(r.backward for r in self._passes))
        ):
            self._hook_parameters(network)
        first = outputs[0] if outputs else None
        shape = tuple(first.shape) if first is not None and first.dim() else (0,)
        record = _Pass(shape, differentiated, self._number)
        differentiated.listeners.append(lambda: self._arrived(record))
        # a pass a gradient came back through pushed out (found by review: 300 evaluations
        # with gradients enabled, pushed out, turned the check off for the next step)
        full = len(self._passes) == MAX_PASSES
        self._truncated |= full and bool(self._passes[0].backward)
        if (
            mean_ce
            and len(outputs) == 1
            and first.requires_grad
            and first.grad_fn is not None
            and first.dim() >= 2
            and first.is_floating_point()
        ):
            record.watch_mean(first, self._arrived)
        self._passes.append(record)

    def _arrived(self, record: _Pass) -> int | None:
        """A gradient reached ``record``'s outputs: the number of the backward pass under
        way, which starts here if this is the first recorded output it reaches; ``None``
        where it accumulates into no ``.grad`` of the model (``torch.autograd.grad``:
        found by review, it counted as a backward pass, its share added to the loss's)."""
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._task, self._number = task, self._number + 1
            network = self._network
            self._accumulates = network is None or _accumulates(network)
            self._running = [True]  # (the hooks read nothing until it ends)
            Variable._execution_engine.queue_callback(_End(self._running))
            # what .grad held before the backward passes since the last one through an
            # output accumulated into it (found by review: a parameter accumulated before
            # the output was reached read as not zeroed, the skipped pass counted)
            # (the first note of each parameter since the last backward pass through an
            # output: this pass's, a reentrant checkpoint's run inside it, or one of a
            # backward pass that reached no output, found by review: a regulariser's own
            # backward between the zeroing and loss.backward() hid the zeroing)
            early, self._early = self._early, {}
            # (noted by another backward pass only: it accumulated into them since, and a
            # zeroing after its note is read from .grad now)
            earlier = {k for k, t in self._early_task.items() if t != task}
            self._early_task = {}
            if (
                network is not None
                and any(r.backward for r in self._passes)
                and (earlier or self._moved(early))
            ):
                # (found by a hunt: a zeroing between model(x) and loss.backward() after a
                # skipped iteration; read at a torch.autograd.grad too, found by review:
                # the .grad noted at its end, a zeroing before it was not seen after)
                self._zeroing(network, self._number, edits=False, early=early, earlier=earlier)
            if self._grads_watched:
                Variable._execution_engine.queue_callback(self._note_grads)
        if not self._accumulates:
            return None
        record.backward.setdefault(self._number, [None, None])
        return self._number

    def _moved(self, early: dict[int, tuple[bool, Tensor | bool]] | None = None) -> bool:
        """Whether a trainable ``.grad`` may have changed since the end of the last backward
        pass (by identity and version: no device read; always where they are not noted,
        under DDP): where none did, no zeroing came between. ``early``: the parameters the
        running backward pass accumulated into already, as they were before."""
        if not self._grads_watched:
            return True
        held, early = self._held, early or {}
        for p in self._network.parameters():
            if id(p) in early:
                if early[id(p)][0]:
                    return True
            elif p.requires_grad:
                h = held.get(id(p), p)  # (p: never noted)
                if h is p or (h is None) != (p.grad is None):
                    return True
                if h is not None and not _held_still(h, p.grad):
                    return True
        return False

    def _before(self, p: Tensor) -> None:
        """A backward pass is about to accumulate into ``p.grad``: where it has not reached a
        recorded output yet, note whether ``p.grad`` moved since the end of the last backward
        pass (:meth:`_moved`) and whether it held anything: ``False`` where it was ``None``,
        else a device flag of a nonzero entry (read at the step, with the zeroing's). A later
        backward pass's note of the same parameter (once per pass) marks it moved and keeps
        whether it was zero at either. Only where a zeroing may be read (a pass
        differentiated since the last step)."""
        early, key = self._early, id(p)
        noted = early.get(key)
        if noted is not None:
            # a later backward pass (task) reaching it: a zeroing since the first note is
            # read too (found by review: a regulariser's own backward before zero_grad(),
            # its note first, hid the zeroing); the same one reaches it once
            task = torch._C._current_graph_task_id()
            if self._early_task.get(key) == task:
                return
            self._early_task[key] = task
            if noted[1] is not False:  # (False: None at the first note, zero already read)
                grad = p.grad
                if grad is None:
                    early[key] = (True, False)
                elif _executes(p):
                    early[key] = (True, noted[1] & grad.detach().any())
            return
        if not (self._network is not None and any(r.backward for r in self._passes)):
            return
        grad = p.grad
        h = self._held.get(key, p) if self._grads_watched else p  # (p: never noted)
        if grad is None:
            early[key] = (h is not None, False)
        elif _executes(p):  # (torch.autograd.grad accumulates nothing: no device read)
            still = h is not p and h is not None and _held_still(h, grad)
            early[key] = (not still, grad.detach().any())
        else:
            return
        self._early_task[key] = torch._C._current_graph_task_id()

    def _hook_parameters(self, model: nn.Module) -> None:
        """Hook each trainable parameter of ``model`` not hooked yet
        (:class:`_BeforeAccumulation`); forget those gone. Run at the first forward pass
        through ``model``, and between two steps at the first whose backward pass may read
        a zeroing (a pass differentiated before it): a parameter made trainable or replaced
        since is hooked there (no walk over the parameters in a loop of one pass per step,
        where no backward pass reads a zeroing)."""
        self._hooked, self._rehooked, hooks, count = model, True, self._hooks, 0
        for p in model.parameters():
            if p.requires_grad:
                count += 1
                kept = hooks.get(id(p))
                if kept is None or kept[0]() is not p:
                    hooks[id(p)] = (
                        weakref.ref(p),
                        ours(p.register_hook(_BeforeAccumulation(p, self))),
                    )
        if len(hooks) > 2 * count + 8:
            for key in [k for k, (ref, _) in hooks.items() if ref() is None]:
                del hooks[key]

    def remove(self) -> None:
        """Take the hooks off the parameters (the preconditioner is removed)."""
        for ref, handle in self._hooks.values():
            handle.remove()
            unhooked(ref())
        self._hooks.clear()
        self._hooked = None

    def _note_grads(self) -> None:
        """Note each trainable ``.grad`` (weakly) and its version, or ``None``, once every
        ``.grad`` of the backward pass is accumulated (a callback queued on the autograd
        engine), for :meth:`check_grads_kept`."""
        self._held = {
            id(p): None if p.grad is None else (weakref.ref(p.grad), p.grad._version)
            for p in self._network.parameters()
            if p.requires_grad
        }

    def _changed(self, params: list[Tensor]) -> list[int]:
        """The positions of ``params`` whose ``.grad`` changed (in place, or replaced)
        since the end of the last backward pass through the model's outputs; one written
        where there was none only if not zero (a host sync, on suspicion only: found by
        review, zeros filled in for an unused layer's gradient are its gradient)."""
        held = self._held
        return [
            i
            for i, p in enumerate(params)
            if p.grad is not None
            and id(p) in held
            and (
                bool(p.grad.any()) if held[id(p)] is None else not _held_still(held[id(p)], p.grad)
            )
        ]

    def check_grads_kept(self, named: list[tuple[str, Tensor]]) -> None:
        """Refuse ``.grad`` changed since the end of the last backward pass through the
        model's outputs, or between two such passes where it did not leave every ``.grad``
        zero (one host read for the flags)."""
        changed = [named[i][0] for i in self._changed([p for _, p in named])]
        self._differentiated()  # (reads the zeroings: an edit zeroed since is none)
        if changed or self._edited:
            when = (
                f"of {some(changed)} changed after the backward pass"
                if changed
                else "changed between two backward passes, other than to zero"
            )
            if self.ddp_forward:  # DistributedDataParallel's average changed them
                raise ValueError(
                    f"the .grad {when}: the forward pass ran through a "
                    "DistributedDataParallel wrapper, which averages the ranks' .grad at the "
                    "end of the backward pass, while this preconditioner was built on the "
                    "model inside it. Pass the wrapper itself: "
                    "RiemannianPreconditioner(ddp_model, process_group=...) (its averaged "
                    ".grad is then taken as the global gradient)"
                )
            raise ValueError(
                f"the .grad {when} (a clip of this rank's own gradient, a weight decay or "
                "a scale added to it, a regulariser's own backward pass, a .grad written "
                "by hand?): pre.step() with a process_group combines the "
                "ranks' .grad as the gradients of each shard's mean loss, so a change to one "
                "rank's .grad acts on its shard's gradient, not on the global batch's (each "
                "rank's clip scales its own part). Call pre.step() right after "
                "loss.backward() and clip or decay the direction it writes (or use the "
                "optimizer's weight_decay; add a regulariser into the loss), or "
                "wrap the model in DistributedDataParallel and pass the wrapper to "
                "RiemannianPreconditioner (its .grad are averaged before your change)"
            )

    def clear(self) -> None:
        """A step used them."""
        self._held, self._rehooked, self._early, self._early_task = {}, False, {}, {}
        self._edited = self._truncated = False
        self._passes.clear()
        self._zeroings.clear()

    def _settle(self) -> None:
        """Apply the zeroings noted so far (one host read for their flags)."""
        if self._zeroings:
            flags = torch.stack([f.cpu() for zero, *_ in self._zeroings for f in zero]).tolist()
            for zero, number, edited in self._zeroings:
                mine, flags = flags[: len(zero)], flags[len(zero) :]
                if all(mine):
                    self._drop(number)
                elif edited:
                    self._edited = True
            self._zeroings.clear()

    def _differentiated(self) -> list[_Pass]:
        """The passes whose gradients ``.grad`` holds: differentiated by a backward pass
        that accumulated into ``.grad``, and not zeroed since."""
        self._settle()
        return [r for r in self._passes if r.backward]

    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The output shape of each pass differentiated, in order: its samples first."""
        return tuple(r.shape for r in self._differentiated())

    def check_mean(self) -> None:
        """Refuse a pass whose output gradient is not that of the mean cross-entropy over
        its rows (module docstring); one host read for all passes."""
        watched = [
            (r, low, scales)
            for r in self._differentiated()
            for low, scales in r.backward.values()
            if low is not None
        ]
        if not watched:
            return
        lowest = torch.stack([low.float().cpu() for _, low, _ in watched]).tolist()
        figures = torch.stack([s for *_, s in watched]).double().cpu().tolist()
        for (r, *_), low in zip(watched, lowest, strict=True):
            if not low >= -tolerance(r.dtype):  # (NaN: refused too)
                raise ValueError(
                    f"this rank's gradient at the model's outputs is not that of the mean "
                    f"cross-entropy over its {r.rows} output rows (softmax(z) - {r.rows} g "
                    f"reaches {low:.3g}, where the mean loss leaves the targets' "
                    "distribution): pre.step() with a process_group combines the ranks' "
                    ".grad as the gradients of each shard's mean loss, weighted by N_p / N, "
                    "which a summed loss, class weights, ignore_index or masked rows, or a "
                    "loss on some outputs only would make wrong (an extra term on the "
                    "outputs, a scale or a temperature applied outside the model are refused "
                    "too: the check cannot tell them apart). Use F.cross_entropy(model(x), y) "
                    "with its mean over every output row, or " + self.wrap_advice()
                )
        # each backward pass's c where it reads c times the mean's gradient (hard targets)
        cs = [hard_scale(f, tolerance(r.dtype)) for (r, *_), f in zip(watched, figures)]
        if cs and None not in cs and not self._truncated and sum(cs) < 1 - SHARE_MARGIN:
            raise ValueError(
                f"this rank's .grad holds {sum(cs):.3g} times the gradient of the mean "
                f"cross-entropy over its shard ({len(cs)} backward pass(es) through the "
                f"model's outputs, at {some([float(f'{c:.3g}') for c in cs])} times the mean's "
                "gradient each): "
                "pre.step() with a process_group combines the ranks' .grad as the gradients "
                "of each shard's mean loss, weighted by N_p / N, so each rank's share of the "
                "global mean (a summed loss divided by the global batch's size, or a mean "
                "divided by the number of ranks) would be weighted twice. Use "
                "F.cross_entropy(model(x), y), the mean over the rank's own rows (over K "
                "micro-batches, each divided by K at most: their factors must add up to 1 or "
                "more; a constant factor below 1 is refused too, as the check cannot tell "
                "it from a share), or " + self.wrap_advice()
            )


def _held_still(held: tuple[weakref.ref, int], grad: Tensor) -> bool:
    """Whether ``grad`` is the ``.grad`` noted as ``held`` (:meth:`Passes._note_grads`), at
    the version noted: the same tensor, not changed in place since."""
    return held[0]() is grad and held[1] == grad._version


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (the autograd engine's graph task)."""
    return torch._C._current_graph_task_id() != -1


def _executes(p: Tensor) -> bool:
    """Whether the running backward pass accumulates into ``p.grad``."""
    try:
        return torch._C._will_engine_execute_node(get_gradient_edge(p).node)
    except RuntimeError:  # (inside torch.autograd.grad)
        return False


def _takes_a_parameter_gradient(model: nn.Module) -> str | None:
    """How the running backward pass takes the gradient of a trainable parameter of
    ``model``: ``"accumulates"`` it into ``.grad``, ``"returns"`` it (``torch.autograd.grad``
    with respect to it, whose result may be written into ``.grad`` by hand), or ``None``."""
    for p in model.parameters():
        if not p.requires_grad:
            continue
        try:
            if torch._C._will_engine_execute_node(get_gradient_edge(p).node):
                return "accumulates"
        except RuntimeError:  # asked of a leaf that torch.autograd.grad returns the
            return "returns"  # gradient of
        except Exception:  # (under a torch.func transform, whose tensors have no edge
            return "returns"  # to read: taken as a gradient, as before)
    return None


def _graph_task() -> int | None:
    """The id of the running backward pass (``None`` where torch does not tell)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else current()


def _returned_parameters(model: nn.Module) -> frozenset[int] | bool:
    """The ids of the trainable parameters of ``model`` whose gradient the running
    backward pass returns (``torch.autograd.grad`` with respect to them); ``True`` where it
    cannot tell (under a ``torch.func`` transform: all, as before)."""
    returned = set()
    for p in model.parameters():
        if not p.requires_grad:
            continue
        try:
            torch._C._will_engine_execute_node(get_gradient_edge(p).node)
        except RuntimeError:  # (a leaf torch.autograd.grad returns the gradient of)
            returned.add(id(p))
        except Exception:
            return True
    return frozenset(returned)


def _accumulates(model: nn.Module) -> bool:
    """Whether the running backward pass accumulates into a trainable parameter's ``.grad``
    of ``model`` (``torch.autograd.grad`` into none; ``backward(inputs=...)`` into some)."""
    try:
        return any(
            torch._C._will_engine_execute_node(get_gradient_edge(p).node)
            for p in model.parameters()
            if p.requires_grad
        )
    except RuntimeError:  # asked of a leaf inside torch.autograd.grad, which accumulates
        return False  # into no .grad


#: How far below 1 the factors of a rank's passes (:func:`hard_scale`) may add up to:
#: a rank's share of the global mean is at most ``1 / P``, ``1 / 2`` or less on one rank.
SHARE_MARGIN = 0.01


def check_shares(sizes: list[list[int]], ddp: bool = False) -> None:
    """Refuse passes split between the ranks otherwise than the last one: ``sizes[p][k]``
    is rank ``p``'s samples in pass ``k`` (every rank the same number of passes); ``ddp``:
    the ``.grad`` are DistributedDataParallel's average (the advice differs)."""
    last = [row[-1] for row in sizes]
    total = sum(last)
    for k in range(len(sizes[0])):
        column = [row[k] for row in sizes]
        if any(n * total != n_last * sum(column) for n, n_last in zip(column, last, strict=True)):
            raise ValueError(
                f"the ranks' .grad hold the gradients of {len(sizes[0])} forward passes split "
                f"between the ranks in other proportions ({sizes} samples per rank and "
                "pass): pre.step() with a process_group weighs each rank's .grad by its "
                f"share of the last pass, N_p / N = {last} / {total}, which gives the global "
                "batch's gradient only where every pass is split alike. Give each rank the "
                "same share of every micro-batch"
                + (
                    " (DistributedDataParallel averages the micro-batches accumulated in "
                    "no_sync() with equal weights)"
                    if ddp
                    else ", or wrap the model in DistributedDataParallel (its averaged .grad "
                    "is taken as the global gradient)"
                )
            )
