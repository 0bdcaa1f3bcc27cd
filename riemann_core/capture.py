"""The forward pass as the metrics see it: every call of a module that owns trainable
parameters, with its arguments and its output, safe from later in-place operations.

A forward hook keeps a module's output tensor; an in-place operation after the module
(``nn.ReLU(inplace=True)``, ``out += identity``) would rebase that tensor, and the
pullback would then reach the wrong point of the graph. Every captured tensor's
``_version`` is recorded when it is captured and compared after the forward pass: if
one changed, the forward pass runs again with the affected modules captured through
copies (the module passes a clone of its output on, so the in-place operation changes
the clone; its inputs are copied on entry). Which modules need copies is remembered per
model, so the second forward pass is paid once.

Forward passes run eagerly (``torch.compiler.set_stance("force_eager")``): a compiled
model runs its submodules inside a compiled graph where hooks do not fire.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import random
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_pre_hooks,
)
from torch.nn.parameter import is_lazy
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from ._precision import precision_as, product_eps
from .draws import Generators
from .modules import (
    Block,
    attributes_of,
    call_attributes,
    folded_mask,
    graph_batch_dims,
    is_container,
    joined_output,
    named_module,
    output_batch_dims,
    output_index,
    output_of_joined,
    own_parameters,
    replayed_attributes,
    restored_attributes,
    sequence_first,
    time_first_modules,
    training,
)

_LOCAL = threading.local()

#: torch's own types with structured kernels, whose forward reads no plain attribute
_TORCH_STRUCTURED = (nn.Linear, nn.Conv2d)

#: What :meth:`Capture.stale` and :attr:`ModelNotes.clone` call the model's own output
#: (a module's name holds no angle brackets): changed in place after the forward pass
#: (``logits /= T``), it is passed on as a copy from the next forward pass on.
MODEL_OUTPUT = "<output>"


def capturing() -> bool:
    """Whether the current thread is inside one of riemann_core's own forward passes."""
    return getattr(_LOCAL, "depth", 0) > 0


@contextlib.contextmanager
def _own_forward():
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1


def eager():
    """Run ``torch.compile``'d code eagerly, so that module hooks fire."""
    return torch.compiler.set_stance("force_eager")


def eager_when_traced(function: Callable) -> Callable:
    """``function``, run as Python where ``torch.compile`` traces a call of it (a training
    step compiled whole, ``pre.backward`` or ``pre.step()`` inside; an :class:`OwnHook`
    of a compiled model): the compiled graph breaks there and the call runs eagerly, its
    checks, hooks and solves as in any other call. Traced, it failed inside torch
    (``Attempt to trace forbidden callable``). The check costs a fraction of a
    microsecond; ``torch.compiler.disable`` is looked up only under torch.compile
    (importing torch's compiler takes seconds)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(function)(*args, **kwargs)
        return function(*args, **kwargs)

    return run


@dataclass
class ModelNotes:
    """What has been learnt about a model, kept between calls.

    ``clone``: modules whose captured tensors an in-place operation changed, and
    :data:`MODEL_OUTPUT` where it was the model's output. ``probed``: what the
    batch-coupling probe's passes hold for, the last :data:`PROBED_KEYS` structures
    (see :func:`riemann_core.coupling.probe_key`; a model switched between training and
    evaluation, or called with two kernels, is not probed at every switch);
    ``inconclusive``: probes in a row since that saw only zeros somewhere, at other
    parameter values each, the last at ``inconclusive_at`` (its key and the parameters'
    versions; see :func:`riemann_core.coupling.register`). ``splits``: per module (held
    weakly), the patterns of arguments split into samples whose Jacobian check passed,
    the last :data:`SPLIT_PATTERNS` (:func:`riemann_core.coupling.register_splits`).
    """

    clone: set[str] = field(default_factory=set)
    probed: list[tuple] = field(default_factory=list)
    inconclusive: int = 0
    inconclusive_at: tuple | None = None
    splits: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    def split_passed(self, module: nn.Module, pattern: tuple) -> None:
        """A pattern of ``module``'s splits passed its Jacobian check: kept, its oldest
        dropped past :data:`SPLIT_PATTERNS`."""
        kept = self.splits.get(module, [])
        if pattern not in kept:
            self.splits[module] = kept[1 - SPLIT_PATTERNS :] + [pattern]

    def passed(self, key: tuple) -> None:
        """A probe passed for ``key``: kept, the oldest dropped past :data:`PROBED_KEYS`."""
        if key not in self.probed:
            self.probed = self.probed[1 - PROBED_KEYS :] + [key]
        self.inconclusive, self.inconclusive_at = 0, None


#: How many structures' passed probes a model's notes keep (:class:`ModelNotes`).
PROBED_KEYS = 8
#: How many patterns of arguments split into samples a model's notes keep per module (its
#: calls have one or two: at ``T != N`` and at ``T = N``).
SPLIT_PATTERNS = 8


_NOTES: weakref.WeakKeyDictionary[nn.Module, ModelNotes] = weakref.WeakKeyDictionary()


def notes_for(model: nn.Module) -> ModelNotes:
    if model not in _NOTES:
        _NOTES[model] = ModelNotes()
    return _NOTES[model]


def _detached(value, copy: bool):
    def leaf(a):
        if not isinstance(a, Tensor):
            return a
        return a.detach().clone() if copy else a.detach()

    return pytree.tree_map(leaf, value)


def _call_leaves(args: tuple, kwargs: dict) -> tuple:
    """The objects a call passes (``args`` itself for tensors only, the usual case)."""
    if not kwargs and all(isinstance(a, Tensor) for a in args):
        return args
    return tuple(pytree.tree_leaves((args, kwargs)))


def _same_objects(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def hooked_before(hooks: dict, hook_id: int) -> bool:
    """Whether a hook other than riemann_core's own (:class:`OwnHook`, which leave the
    values as they are) runs before the hook ``hook_id`` among a module's ``hooks`` (its
    ``_forward_hooks`` or ``_forward_pre_hooks``, in the order they run)."""
    for key, hook in hooks.items():
        if key == hook_id:
            return False
        if not isinstance(hook, OwnHook):
            return True
    return False


def hooked_after(hooks: dict, hook_id: int) -> bool:
    """Whether a hook other than riemann_core's own runs after the hook ``hook_id``."""
    return hooked_before(dict(reversed(hooks.items())), hook_id)


#: Serial numbers of the :class:`Capture` objects: each stamps under a key of its own.
_CAPTURES = itertools.count()


def mark_pass(output, key: str, token: object) -> None:
    """Stamp the autograd node of each tensor of a forward pass's ``output`` with the
    pass's ``token`` under the capture's ``key`` (a node's ``metadata`` keeps no tensor
    alive; another model's capture stamps under its own key), so that a walk of a graph
    (``riemann_core.coupling.loss_paths``, :func:`reaches_pass`) tells an earlier pass's
    output; the outputs of the pass's module calls are stamped alike (a loss on an earlier
    pass's hidden features)."""
    for t in (output,) if isinstance(output, Tensor) else pytree.tree_leaves(output):
        if isinstance(t, Tensor) and t.grad_fn is not None:
            t.grad_fn.metadata[key] = token


def calls_under_way(module: nn.Module) -> int:
    """Calls of ``module`` on this thread's stack, the one whose hook asks included. Hooks
    count a module's nested calls, and an interrupt (``KeyboardInterrupt``, which
    ``always_call`` hooks do not see) would leave such a count stuck: read where it says
    nested, to tell."""
    code, count = nn.Module._call_impl.__code__, 0
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and frame.f_locals.get("self") is module:
            count += 1
        frame = frame.f_back
    return count


def autograd_nodes(roots) -> Iterator:
    """Every node of the autograd graph under ``roots`` (``grad_fn`` s; ``None`` is
    skipped) once, depth first, as autograd's own backward would reach them."""
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def pullback_dtype(outputs: Tensor, module_outputs, dtype: torch.dtype):
    """The least precise of ``dtype`` (the rows' at the modules' outputs) and the dtypes
    the backward pass from ``outputs`` to ``module_outputs`` runs in: those of every
    autograd node on a path between them. A frozen half-precision module between trained
    float32 ones rounds the rows pulled back through it to its precision, though they reach
    every trained module in float32 (found by a hunt: a bfloat16 Linear between two float32
    ones, `full` 41% off the oracle with no warning, and the coupling probe blamed a hook
    for the rounding); so does a bare cast (``h.to(torch.bfloat16)``) where the model holds
    no half-precision tensor (found by review: the hook blamed again). Walked on every
    call: 1.7 ms of a 0.58 s ``layerwise`` step on a 200-layer float32 MLP (0.3%)."""
    targets = {t.grad_fn for t in module_outputs if t.grad_fn is not None}
    # post-order over the graph under the outputs: a node is on a path where it is a
    # module's output or one of its next nodes is (the graph is acyclic)
    on_path, stack = {}, [(outputs.grad_fn, False)]
    while stack:
        node, done = stack.pop()
        if done:
            nexts = (n for n, _ in node.next_functions if n is not None)
            on_path[node] = node in targets or any(on_path[n] for n in nexts)
        elif node is not None and node not in on_path:
            on_path[node] = False  # (until done)
            stack.append((node, True))
            stack.extend((n, False) for n, _ in node.next_functions if n not in on_path)
    dtypes = {dtype} | {
        m.dtype
        for node, on in on_path.items()
        if on
        for m in getattr(node, "_input_metadata", ())  # the gradients' dtypes there
        if m.dtype.is_floating_point
    }
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def raising_since(handled: BaseException | None) -> bool:
    """Whether an exception other than ``handled`` (the one the caller was handling when a
    forward pass began: a pass run inside an ``except`` block) is being handled now: a
    hook that torch calls as that pass raises, in its forward or in a later hook."""
    error = sys.exc_info()[1]
    return error is not None and error is not handled


def reaches_pass(tensors, key: str, token: object) -> bool:
    """Whether the autograd graph of ``tensors`` holds an output stamped under ``key``:
    a forward pass fed with an earlier pass's output (``model(model(x))``). Called once
    per preconditioned loss, on the inputs that carry a graph (the usual batch has none)."""
    roots = (t.grad_fn for t in tensors if isinstance(t, Tensor))
    return any(node.metadata.get(key, token) is not token for node in autograd_nodes(roots))


def _versions(value) -> list[tuple[Tensor, int]]:
    leaves, _ = pytree.tree_flatten(value)
    return [(a, a._version) for a in leaves if isinstance(a, Tensor)]


#: The record of a forward pass (persistent :class:`Capture`), kept from the last complete
#: pass while one runs.
_RECORD = (
    "calls",
    "output",
    "inputs",
    "substituted",
    "remarked",
    "token",
    "threaded",
    "hooks_mark",
    "hooked_in_forward",
    "_stale",
    "_watched",
)


def convolves(module: nn.Module) -> bool:
    """Whether ``module`` is or holds a convolution (whose products have knobs of their own)."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _without_no_grad_repeats(calls: list[Block]) -> list[Block]:
    """``calls`` less those made under ``no_grad`` (an output that does not require grad)
    of parameters that a call with gradients also uses: a target or statistics pass inside
    forward, which adds nothing to the metric (found by a hunt: K-FAC refused the layer as
    parameters several calls share). A module called only under ``no_grad`` stays (the
    forward of a reentrant checkpoint, whose refusal depends on it)."""
    trained = {id(p) for c in calls if c.output.requires_grad for p in c.params}
    return [
        c for c in calls if c.output.requires_grad or not any(id(p) in trained for p in c.params)
    ]


class Capture:
    """Hooks recording each call of the modules of ``model`` that own trainable parameters.

    Use as a context manager around one of riemann_core's own forward passes; ``calls``
    are then the calls in the order they finished, and :meth:`stale` names the modules
    whose captured tensors changed afterwards. Modules named in ``clone`` are captured
    through copies.

    With ``persistent=True`` the hooks stay until :meth:`remove` and record the user's
    own forward passes instead: each call of ``model`` itself with gradients enabled
    starts a new record (``calls`` and the model's ``output``); riemann_core's own
    forward passes, calls under ``torch.no_grad()`` and calls of submodules outside a
    call of ``model`` are not recorded.
    """

    def __init__(self, model: nn.Module, clone: set[str], *, persistent: bool = False):
        self.calls: list[Block] = []
        self.output: Tensor | None = None
        self.token: object | None = None  # of the pass recorded last (persistent)
        self.key = f"riemann_core.forward_pass.{next(_CAPTURES)}"  # see mark_pass
        self.inputs: list[Tensor] = []  # the recorded pass's inputs that carry a graph
        # a module of the recorded pass called in another thread than the model (a branch
        # run by a thread pool): autograd numbers each thread's nodes apart, so its nodes'
        # numbers say nothing of the pass's start (see sequence_now)
        self.threaded = False
        # hooks_mark() as the recorded pass ended (persistent): where a hook (a tensor's,
        # a node's, a module's) other than riemann_core's was registered since
        # (hooks_registered), it was after the pass (in the loss's code); None: not known
        self.hooks_mark: int | None = None
        # whether the recorded pass registered hooks other than riemann_core's (a tensor's
        # register_hook in forward, a module's backward hook's, the model's own too): they
        # run on the metric's rows too (HookWarning)
        self.hooked_in_forward = False
        self._mark_at_begin: int | None = None
        self._frames_at_begin = 0  # (compiled_frames(): see _end)
        self._thread: int | None = None  # the thread that called the model
        # modules that ran with other tensors in place of their parameters
        self.substituted: list[str] = []
        # modules whose parameters rc.read_by_holder's marks moved since the hooks were
        # installed (one of its submodules marked or unmarked before the pass)
        self.remarked: list[str] = []
        self._clone = clone
        self._stale: set[str] = set()
        self._misordered = False  # a user's hook runs between ours and the forward
        self._product_eps: dict[str, tuple[float, float]] = {}  # this pass's, see _eps
        self._watched: list[tuple[str, list[tuple[Tensor, int]]]] = []
        self._hooks = []
        self._recording = not persistent
        self._persistent = persistent
        # (persistent) a module watched here last called with gradients enabled outside a
        # call of the model (checkpoint_sequential(model, ...), model[0](x)): named where a
        # pass is missing
        self.outside: str | None = None
        self._depth = 0  # calls of the model under way (it may call itself)
        # (module, held weakly, and its hooks' stack of its calls under way) per module
        # watched (see _begin)
        self._entered: list[tuple[weakref.ref, list]] = []
        self._previous = {a: getattr(self, a) for a in _RECORD}
        self._handled: BaseException | None = None
        self._model = weakref.ref(model)
        self._modules: frozenset[int] | None = None  # the model's, see _registered
        if persistent:
            self._end_hook = ours(
                model.register_forward_hook(OwnHook(model, self._end), always_call=True)
            )
            self._hooks += [
                ours(
                    model.register_forward_pre_hook(
                        OwnHook(model, self._begin), prepend=True, with_kwargs=True
                    )
                ),
                self._end_hook,
            ]
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        found = owners(model)
        time_first = time_first_modules(model)
        # held weakly: a module swapped out of the model (and its parameters) is freed
        self._owners = tuple(
            (name, weakref.ref(module), tuple(weakref.ref(p) for p in own))
            for name, module, own in found
        )
        try:
            for name, module, own in found:
                self._watch(
                    name, module, [names[id(p)] for p in own], list(own), id(module) in time_first
                )
        except BaseException:  # no hook left behind on the user's model
            self.remove()
            raise

    def hooks_current(self, model: nn.Module) -> bool:
        """Whether the hooks still watch every module of ``model`` that owns trainable
        parameters, with those parameters: not after a parameter was frozen or unfrozen,
        replaced, or its module swapped for another since they were installed, nor after a
        hook registered since then ran between them and a module's forward (then the
        recorded call is not the one the module made; hooks installed anew run nearest
        the forward again)."""
        return not self._misordered and self.owners_current(model)

    def owners_current(self, model: nn.Module) -> bool:
        """Whether the hooks still watch every module of ``model`` that owns trainable
        parameters, with those parameters (:meth:`hooks_current` less the order of the
        hooks: a hook registered since that runs between them and a forward leaves what
        they found of the module's parameters as it was)."""
        now = owners(model)
        if len(now) != len(self._owners):
            return False
        for (name, module, own), (kept, module_ref, refs) in zip(now, self._owners, strict=True):
            # by identity: a tensor's == compares its entries
            if name != kept or module is not module_ref() or len(own) != len(refs):
                return False
            if not all(p is ref() for p, ref in zip(own, refs, strict=True)):
                return False
        return True

    def end_last(self, model: nn.Module) -> None:
        """Run the hook that records the model's output after every other forward hook of
        ``model`` (one registered since that changes the output would run after it)."""
        if hooked_after(model._forward_hooks, self._end_hook.id):
            self._end_hook.remove()
            self._hooks.remove(self._end_hook)
            self._end_hook = ours(
                model.register_forward_hook(OwnHook(model, self._end), always_call=True)
            )
            self._hooks.append(self._end_hook)

    def reset(self) -> None:
        """Forget the recorded forward pass (its tensors are then freed with the graph)."""
        self.calls, self.output, self.inputs, self.substituted = [], None, [], []
        self.remarked = []
        self._stale, self._watched, self.threaded = set(), [], False
        self.hooks_mark, self.hooked_in_forward = None, False

    def _begin(self, module, args, kwargs) -> None:
        if self._depth and calls_under_way(module) < 2:
            self._depth = 0  # a call interrupted (KeyboardInterrupt) never ended: not nested
            # nor did its modules' calls, whose entries (their inputs and the graph that
            # made them) torch's always_call hooks never dropped (found by review: one
            # batch held more at every interrupt, for as long as the model lived)
            for hooked, entered in self._entered:
                del entered[calls_under_way(hooked()) if hooked() is not None else 0 :]
        if self._depth:
            self._depth += 1
        elif not capturing() and torch.is_grad_enabled():
            self._previous = {a: getattr(self, a) for a in _RECORD}  # back if this raises
            self._handled = sys.exc_info()[1]  # a pass run inside the caller's except
            self.reset()
            self._modules = None  # (modules registered since: read again)
            self._depth, self._recording = 1, True
            self.outside = None
            self.token = object()  # this pass's, see mark_pass
            self._mark_at_begin, self._frames_at_begin = hooks_mark(), compiled_frames()
            self._thread = threading.get_ident()
            self._product_eps = {}
            # kept to walk only if a loss is preconditioned (reaches_pass), every leaf
            plain = not kwargs and all(isinstance(a, Tensor) for a in args)
            leaves = args if plain else pytree.tree_leaves((args, kwargs))  # nested: walked
            self.inputs = [t for t in leaves if isinstance(t, Tensor) and t.grad_fn is not None]

    def _registered(self) -> frozenset[int]:
        """The ids of the model's modules (once a pass, where a module holds one
        unregistered: see :func:`~riemann_core.modules.call_attributes`); by identity, not
        by a set of the modules, whose ``__eq__`` and ``__hash__`` a module may override
        (found by review: one equal to a registered one was taken for it, its counter moved
        by the generic kernel's evaluations, 1.8 off silently)."""
        if self._modules is None:
            model = self._model()
            self._modules = frozenset(() if model is None else map(id, model.modules()))
        return self._modules

    def _end(self, module, args, output):
        if not self._depth:
            return None
        self._depth -= 1
        if self._depth:
            return None
        self._recording = False
        previous, handled = self._previous, self._handled
        self._previous, self._handled = {}, None  # (the last pass's graph freed)
        if raising_since(handled):  # the pass raised (caught by the caller): the last
            for attribute, value in previous.items():  # complete pass stands
                setattr(self, attribute, value)
            return None
        self.output = output
        self.hooks_mark = hooks_mark()
        # (not counted in a pass that torch.compile compiled: AOTAutograd registers hooks
        # on the graph it traces, found by review, a false HookWarning at a compiled
        # model's first pass; the next pass counts. The hooks torch's module tracker
        # registers in every module's call (FlopCounterMode's) are not counted either: found
        # by CI, 18 false warnings in the benchmark suite; a pass it follows is counted all
        # the same, found by review: skipped whole, a Grad-CAM hook counted at every step
        # was never warned of. The model's own backward hooks, and the
        # global ones, torch registers on its output after its forward hooks, after this:
        # found by review, a saved grad_output 2.1-2.5x off dL/dz, not warned of)
        self.hooked_in_forward = (
            compiled_frames() == self._frames_at_begin
            and hooks_registered(self._mark_at_begin, self.hooks_mark, tracked=True)
        ) or backward_hooked(module)
        self.calls = _without_no_grad_repeats(self.calls)
        mark_pass(output, self.key, self.token)
        watched = [(output, output._version)] if isinstance(output, Tensor) else None
        self._watched.append((MODEL_OUTPUT, watched or _versions(output)))
        if MODEL_OUTPUT in self._clone:  # the caller's in-place edits change a copy
            return pytree.tree_map(lambda a: a.clone() if isinstance(a, Tensor) else a, output)
        return None

    def _watch(self, name, module, param_names, params, time_first: bool = False) -> None:
        """Record each call of ``module`` (``time_first``: one of
        :func:`~riemann_core.modules.time_first_modules`)."""
        entered: list[tuple[tuple, dict, list] | None] = []

        def pre_hook(mod, args, kwargs):
            # a call under inference_mode inside forward (a target pass) adds nothing to
            # the metric, and its tensors track no versions to watch (found by a hunt: it
            # was refused as inputs of the wrong shape)
            if not self._recording or torch.is_inference_mode_enabled():
                if (
                    self._persistent
                    and not self._recording
                    and not capturing()
                    and torch.is_grad_enabled()
                    and not torch.is_inference_mode_enabled()
                    and torch._C._current_graph_task_id() == -1  # (not a checkpoint's
                ):  # recomputation, inside a backward pass)
                    self.outside = name
                entered.append(None)
                return
            # the arguments as the forward receives them (unless a pre-hook registered
            # later replaces them: checked at the output, see hook)
            copy = name in self._clone
            received = _call_leaves(args, kwargs)  # a dict edited in place is seen too
            # its attributes as the call found them, for the generic kernel's evaluation
            # (not of torch's own Linear and Conv2d, whose forward reads none that a
            # training loop changes: 1.5-3 us a call kept off the hot path; but of one whose
            # forward was replaced on the instance, which kernel='auto' evaluates with the
            # generic kernel, and of a type registered with rc.register_handler, which
            # kernel='generic' does: found by review, a counter there was 0.56-0.89 off)
            attributes = (
                None
                if type(mod) in _TORCH_STRUCTURED and "forward" not in mod.__dict__
                else call_attributes(mod, self._registered)
            )
            # and the random state it starts from, for the generic kernel to draw again
            # what the call draws (riemann_core.draws)
            rng = None if attributes is None else _rng_of(params)
            # called by a sequence-first transformer layer on (T, N, E): recorded as the
            # call on the batch moved first, which acts on each position alike
            transposed = (
                time_first
                and not kwargs
                and len(args) == 1
                and isinstance(args[0], Tensor)
                and args[0].ndim == 3
            )
            if not kwargs and all(isinstance(a, Tensor) for a in args):  # no pytree walks
                graph = tuple(a for a in args if a.requires_grad)
                dims = (1,) * len(graph) if transposed else graph_batch_dims(mod, args, {})
                live = graph, dims
                args = tuple(a.detach().clone() if copy else a.detach() for a in args)
                if transposed:
                    args = (args[0].movedim(1, 0),)
                versions = [(a, a._version) for a in args]
                handled = sys.exc_info()[1]  # (see hook)
                record = (args, kwargs, live, versions, received, copy, attributes, rng)
                entered.append((*record, transposed, handled))
                return
            leaves, _ = pytree.tree_flatten((args, kwargs))
            live = (
                tuple(a for a in leaves if isinstance(a, Tensor) and a.requires_grad),
                graph_batch_dims(mod, args, kwargs),
            )
            args, kwargs = _detached((args, kwargs), copy)
            versions = _versions((args, kwargs))
            handled = sys.exc_info()[1]  # (see hook)
            entered.append(
                (args, kwargs, live, versions, received, copy, attributes, rng, False, handled)
            )

        # (always called: where the forward raises, torch calls it with no output, and the
        # call's entry is dropped; found by a hunt: a training loop that skipped a batch
        # whose forward raised kept that call's inputs here, one more at every failure)
        def hook(mod, args, kwargs, output):
            # a pre-hook that ran before pre_hook raised: torch calls this one still, with
            # no output, and the call has no entry (found by review: its IndexError was
            # warned about; and where the module called itself and caught that error of
            # its inner call, the entry of the outer call was taken for it, and dropped:
            # its parameters were refused as reaching the loss without their module being
            # called). Each call in its forward has one: fewer than the calls under way
            if output is None and (not entered or len(entered) < calls_under_way(mod)):
                return None
            record = entered.pop()
            if record is None:
                return None
            *record, handled = record
            if output is None and raising_since(handled):  # the forward raised
                return None
            (
                recorded_args,
                recorded_kwargs,
                (live, live_dims),
                versions,
                received,
                copied,
                attributes,
                rng,
                transposed,
            ) = record
            if (
                not _same_objects(received, _call_leaves(args, kwargs))
                or (copied and hooked_after(mod._forward_pre_hooks, handles[0].id))
                or hooked_before(mod._forward_hooks, handles[1].id)
            ):
                # a hook registered after these ones, which runs between them and the
                # forward (a pre-hook that replaces the arguments, or edits in place those
                # copied before it ran, a prepended hook that may replace the output):
                # this record may not be the module's call (found by a hunt: a pre-hook's
                # args[0].mul_(2) left the copy taken before it, pre.backward 0.29 off from
                # its second call). A record that is no copy holds the objects the forward
                # received, edits through .data included (one the versions show makes
                # the module's next records copies, see stale); so a pre-hook that only
                # reads, registered anew at every step, costs no slow path (found by
                # review: 1.11-1.16x a step with check_coupling=False)
                self._misordered = True
            args, kwargs = recorded_args, recorded_kwargs
            if threading.get_ident() != self._thread:  # (see threaded)
                self.threaded = True
            if any(t._version != v for t, v in versions):  # the module changed its input
                self._stale.add(name)
            held = [q for _, q in own_parameters(mod)]
            if not all(any(p is q for q in held) for p in params):
                # torch.func.functional_call's tensors, or the parameters of a submodule
                # whose mark changed (found by review: blamed on functional_call)
                inside = list(mod.parameters())
                moved = all(any(p is q for q in inside) for p in params)
                (self.remarked if moved else self.substituted).append(name)
            folded = folded_mask(mod, args, kwargs)
            if folded is not None:  # (found by review: refused, told of its parameters)
                raise ValueError(f"{named_module(name, mod)} {folded}")
            index, dims = output_index(output), None
            if index is False or sequence_first(mod, args, kwargs):
                dims = output_batch_dims(mod, args, kwargs, output)
                if isinstance(dims, str):
                    raise ValueError(
                        f"{named_module(name, mod)} returns {type(output).__name__}, and "
                        f"{dims}; a module with trainable parameters must return one tensor, "
                        "or a tuple (or list) of tensors, each holding the batch (the output "
                        "of nn.RNN, nn.GRU, nn.LSTM called on a batch with their final "
                        "states); a wrapper that picks an output does not help: the "
                        "parameters stay this module's. Freeze it with requires_grad_(False) "
                        "otherwise"
                    )
            whole = output
            if dims is not None:  # one tensor in the graph that the whole tuple comes from
                output = joined_output(whole, dims)
            elif index is not None:
                output = output[index]
            elif transposed:  # (T, N, ...): the block's output is the batch first
                output = output.movedim(1, 0)
            block = Block(
                name=name,
                module=mod,
                param_names=param_names,
                params=params,
                inputs=args,
                kwargs=kwargs,
                output=output,
                output_index=index,
                output_dims=dims,
                graph_inputs=live,
                graph_dims=live_dims,
                product_eps=self._eps(output.device.type, mod),
                attributes=attributes,
                rng=_drew(rng, attributes),
            )
            self.calls.append(block)
            self._watched.append((name, versions + [(output, output._version)]))
            # see mark_pass; not a node of the inputs' (a module passing its input on)
            node = output.grad_fn
            if (
                self.token is not None
                and node is not None
                and all(a.grad_fn is not node for a in live)
            ):
                node.metadata[self.key] = self.token
            if dims is not None:  # the tuple the network reads, from the joined tensor
                whole = output_of_joined(output, whole, dims)
                refs = [weakref.ref(a) for a in pytree.tree_leaves(whole) if a is not None]
                block.returned = lambda: tuple(ref() for ref in refs)
                return whole
            if transposed:  # the network reads it sequence-first, a copy
                copied = output.movedim(0, 1).clone(memory_format=torch.contiguous_format)
                ref = weakref.ref(copied)
                block.returned = lambda: (ref(),)
                return copied
            # what the rest of the network changes in place is then a copy
            if name not in self._clone:
                return None
            # (held for pre.backward's check of a retained gradient: found by review, a
            # module's output given retain_grad() after an in-place edit was the copy)
            copied = output.clone()
            ref = weakref.ref(copied)
            block.returned = lambda: (ref(),)
            if index is None:
                return copied
            items = [copied if i == index else a for i, a in enumerate(whole)]
            return type(whole)(*items) if hasattr(whole, "_fields") else type(whole)(items)

        handles = ours(
            module.register_forward_pre_hook(OwnHook(module, pre_hook), with_kwargs=True),
            module.register_forward_hook(
                OwnHook(module, hook), with_kwargs=True, prepend=True, always_call=True
            ),
        )
        self._hooks += handles
        self._entered.append((weakref.ref(module), entered))

    def _eps(self, device_type: str, module: nn.Module) -> float:
        """:func:`~riemann_core._precision.product_eps` of ``module``'s call as the pass
        found the knobs (or autocast's dtype's eps, where coarser), read once per pass (its replay runs under the knobs as they were
        at its start); whether it holds a convolution only where the knobs tell them
        apart (a walk of its submodules at every call otherwise)."""
        if device_type not in self._product_eps:
            eps = product_eps(device_type), product_eps(device_type, conv=True)
            self._product_eps[device_type] = eps
        plain, conv = self._product_eps[device_type]
        eps = plain if plain == conv else (conv if convolves(module) else plain)
        if torch.is_autocast_enabled(device_type):  # its products run in autocast's dtype,
            # whatever the output's: a GRU's float32 output from bfloat16 products
            return max(eps, torch.finfo(torch.get_autocast_dtype(device_type)).eps)
        return eps

    def stale(self) -> set[str]:
        """Modules whose captured inputs or outputs were changed in place, and
        :data:`MODEL_OUTPUT` if the recorded model's output was."""
        changed = {n for n, watched in self._watched if any(t._version != v for t, v in watched)}
        return self._stale | changed

    def remove(self) -> None:
        """Detach every hook."""
        for h in self._hooks:
            h.remove()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class OwnHook:
    """A module hook that runs ``hook`` for its own module alone, which it holds weakly;
    ``hook`` may be a :class:`weakref.WeakMethod` (a preconditioner's: the model does not
    keep it alive), and the hook does nothing once that is dead.

    ``copy.deepcopy`` and pickling of a model copy its hooks: a bound method or a closure
    would take the preconditioner along (with the graph of a forward pass, which cannot be
    copied) or keep it and the original model alive from the copy. A copy of this hook is
    :func:`inert` instead, so the copy of the model is a plain model, and ``torch.save`` of
    the model works. A shallow copy shares the hooks, whose calls for it pass through."""

    __slots__ = ("target", "hook")

    def __init__(self, module: nn.Module, hook):
        self.target, self.hook = weakref.ref(module), hook

    # eager where torch.compile traces it (found by a hunt: a compiled model called inside
    # a training step compiled whole failed inside torch, dynamo tracing this hook)
    @eager_when_traced
    def __call__(self, module, *args):
        hook = self.hook() if isinstance(self.hook, weakref.WeakMethod) else self.hook
        return hook(module, *args) if hook is not None and module is self.target() else None

    def __deepcopy__(self, memo):
        return inert

    def __reduce__(self):
        return _inert_hook, ()


def inert(module, *args) -> None:
    """The hook a copy of an :class:`OwnHook` becomes: it changes nothing."""
    return None


def _inert_hook():
    return inert


def owners(model: nn.Module) -> tuple[tuple[str, nn.Module, tuple[Tensor, ...]], ...]:
    """``(name, module, parameters)`` of each module of ``model`` with trainable parameters
    of its own (:func:`~riemann_core.modules.own_parameters`): the modules a
    :class:`Capture` hooks."""
    found = []
    for name, module in model.named_modules():
        if is_container(module):  # never called: its holder owns them
            continue
        own = tuple(dict.fromkeys(p for _, p in own_parameters(module) if p.requires_grad))
        if own:
            found.append((name, module, own))
    return tuple(found)


@contextlib.contextmanager
def buffers_kept(
    model: nn.Module, start: dict[str, Tensor] | None = None, modules: list | None = None
):
    """Run riemann_core's own forward passes on copies of the model's buffers and put the
    originals back afterwards: a module may update its buffers as it runs (quantisation
    observers, spectral_norm's power iteration), and the model must be left as it was,
    also by a call that fails. The originals are never written, so a copy the forward
    saved for the backward pass stays intact. Costs a copy of the buffers per forward.

    ``start`` (qualified name -> tensor, :class:`BufferStates`): the copies are of these
    instead, the buffers as a recorded forward pass found them, for its replay.
    ``modules``: ``(qualified name, module)`` of ``model`` to do it for (all by default)."""
    start = start or {}
    named = model.named_modules() if modules is None else modules
    kept = [(prefix, module, dict(module._buffers)) for prefix, module in named]
    for prefix, module, buffers in kept:
        for name, b in buffers.items():
            if isinstance(b, Tensor):
                b = start.get(f"{prefix}.{name}" if prefix else name, b)
                module._buffers[name] = b.clone()
    try:
        yield
    finally:
        for _, module, buffers in kept:  # also drops buffers the forward registered
            # key by key: a traced module's buffers (torch.jit's wrapper) have no clear()
            # (found by a hunt: the restore stopped there, later modules kept the copies)
            for name in [n for n in module._buffers.keys() if n not in buffers]:
                del module._buffers[name]
            for name, b in buffers.items():
                module._buffers[name] = b


#: Buffers of at least this many bytes are copied before a recorded forward pass only
#: once a pass has been seen to change them (:class:`BufferStates`).
LARGE_BUFFER_BYTES = 2**20


@dataclass
class BufferStart:
    """The buffers as one forward pass found them (:class:`BufferStates`): ``copies`` by
    qualified name, and ``copied``, the tensor and version each was copied from;
    ``large``, ``(name, tensor, version, copied)`` of the large buffers at its start;
    ``uncopied_changes``, large buffers it changed without a copy."""

    copies: dict[str, Tensor]
    large: list[tuple[str, Tensor, int, bool]]
    uncopied_changes: list[str] = field(default_factory=list)
    copied: dict[str, tuple[Tensor, int | None]] = field(default_factory=dict)

    def as_found(self, model: nn.Module) -> dict[int, Tensor]:
        """``{id(buffer): its copy}`` for the buffers of ``model`` changed since the pass
        started (written in place, or replaced): what the pass, and its replay, read
        instead of them."""
        found = {}
        for name, b in model.named_buffers():
            start = self.copied.get(name)
            if start is not None and (start[0] is not b or start[1] != version_of(b)):
                found[id(b)] = self.copies[name]
        return found


class BufferStates:
    """The buffers as each recorded forward pass of a model found them (:class:`BufferStart`):
    what a pass that updates them (observers, counters, a queue) starts from, for its
    :class:`Replay` (:func:`buffers_kept` takes the present tensor for a name left out).

    Copying every buffer at every pass costs as much as a causal mask or a positional
    table (twelve 1024 x 1024 masks: 50 MB per forward pass), which no pass changes. So a
    buffer of :data:`LARGE_BUFFER_BYTES` or more is copied on the first pass that meets it,
    which compares it with its copy afterwards (a write through ``.data``, or a kernel
    such as batch norm's on its running statistics, does not move the version counter),
    and from then on only once a pass has changed it: moved its version counter, assigned
    a new tensor, or changed it in that first comparison. Smaller ones are always copied.
    A large buffer that a pass changes for the first time (or later through ``.data``)
    starts the replay where that pass left it: the replay's check of the output tells,
    :meth:`changes` names it, and :meth:`distrust` has it copied from then on.
    """

    def __init__(self) -> None:
        self._changing: set[str] = set()  # large buffers some pass changed
        self._seen: set[str] = set()  # large buffers met by a pass

    def before_pass(self, model: nn.Module) -> BufferStart:
        """Copies of the buffers the pass about to run may change."""
        copies, large, copied = {}, [], {}
        for name, b in model.named_buffers():
            if is_lazy(b):  # no values yet: its lazy module's first call, this pass, gives them
                continue
            is_large = b.numel() * b.element_size() >= LARGE_BUFFER_BYTES
            copy = not is_large or name in self._changing or name not in self._seen
            if copy:
                copies[name] = b.detach().clone()
                copied[name] = b, version_of(b)
            if is_large:
                large.append((name, b, version_of(b), copy))
        return BufferStart(copies, large, copied=copied)

    def after_pass(self, model: nn.Module, start: BufferStart) -> None:
        """Learn which large buffers the pass that ran from ``start`` changed."""
        if not start.large:
            return
        now = dict(model.named_buffers())
        for name, b, version, copied in start.large:
            changed = now.get(name) is not b or version_of(b) != version
            if not changed and name not in self._seen:  # its first pass: by value too
                changed = not torch.equal(b, start.copies[name])
            self._seen.add(name)
            if changed:
                self._changing.add(name)
                if not copied:
                    start.uncopied_changes.append(name)

    def distrust(self, start: BufferStart) -> None:
        """A replay from ``start`` gave another output: copy the large buffers it did not
        copy from now on (a pass may change them unseen, through ``.data``)."""
        self._changing.update(name for name, _, _, copied in start.large if not copied)

    @staticmethod
    def changes(model: nn.Module, start: BufferStart) -> str:
        """What a replay from ``start`` that gives another output should name about
        buffers: those its pass changed without a copy, changed since, or not copied
        (``""``: none)."""
        now = dict(model.named_buffers()) if start.large else {}
        uncopied = [name for name, _, _, copied in start.large if not copied]
        since = [
            name
            for name, b, version, copied in start.large
            if not copied
            and name not in start.uncopied_changes
            and (now.get(name) is not b or version_of(b) != version)
        ]
        unseen = [n for n in uncopied if n not in start.uncopied_changes and n not in since]
        said = []
        if start.uncopied_changes:
            said.append(
                f"buffers {some(start.uncopied_changes)} changed during that pass for the "
                "first time, and the replay started from their new values (they are copied "
                "before every pass from now on): run the forward pass again"
            )
        if since:
            said.append(
                f"buffers {some(since)} changed after that pass, and the replay started "
                "from their new values: compute the direction before changing them"
            )
        if unseen:
            said.append(
                f"buffers {some(unseen)} were not copied before that pass (no pass had "
                "changed them); if it writes them through .data, which no version counter "
                "shows, the replay started from their new values: they are copied before "
                "every pass from now on, run the forward pass again"
            )
        return "; ".join(said)


def version_of(tensor: Tensor) -> int | None:
    """``tensor._version``, or ``None`` for an inference tensor (made under
    ``torch.inference_mode()``), which keeps no version counter (a lazy module's
    uninitialised parameter, which refuses every function, has one)."""
    return None if not is_lazy(tensor) and tensor.is_inference() else tensor._version


#: the ids of riemann_core's own hook handles, the latest (:func:`ours`): each appended
#: whole (thread-safe); one dropped from the front reads as the user's (a second forward
#: pass, never a hook unseen)
_own_ids: collections.deque[int] = collections.deque(maxlen=4096)


def ours(*handles):
    """``handles``, hook handles riemann_core registers (the one, or a tuple of them),
    told apart from the others' by their ids (:func:`hooks_registered`)."""
    _own_ids.extend([h.id for h in handles])
    return handles[0] if len(handles) == 1 else handles


def hooks_mark() -> int:
    """torch's next hook handle id: every handle (of a tensor's hook, a node's, a
    module's) is numbered by one counter, ``RemovableHandle.next_id``; compare a later
    mark with :func:`hooks_registered`."""
    return RemovableHandle.next_id


def compiled_frames() -> int:
    """The frames torch.compile has compiled in this process (0 where it never ran; not
    cleared by a reset)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else utils.counters["frames"]["total"]


def module_trackers() -> list:
    """The ``ModuleTracker`` instances (``torch.utils.module_tracker``; the one
    ``FlopCounterMode`` enters) that follow the modules' calls now: in each call one
    registers gradient hooks that only note which module's backward runs. Found by their
    bound method among the global forward pre-hooks, read at once (found by review: read
    item by item, another thread registering a hook raised out of the user's forward; a
    hook object whose ``__getattr__`` raised did too)."""
    tracker = sys.modules.get("torch.utils.module_tracker")
    if tracker is None:
        return []
    return [
        hook.__self__
        for hook in tuple(_global_forward_pre_hooks.values())
        if type(hook) is types.MethodType and issubclass(type(hook.__self__), tracker.ModuleTracker)
    ]


def tracked_ids(since: int, until: int) -> set[int]:
    """The ids of the hook handles numbered from ``since`` to ``until`` (:func:`hooks_mark`)
    that the module trackers following the calls now registered (:func:`module_trackers`;
    each keeps them until it exits). Where torch keeps them otherwise, none is found:
    the tracker's hooks are then taken as the user's (a false warning, or a pass run again:
    never a hook unseen)."""
    found: set[int] = set()
    for tracker in module_trackers():
        ids = [
            getattr(h, "id", None)
            for h in (
                getattr(tracker, "_fw_pre_handle", None),
                getattr(tracker, "_fw_post_handle", None),
            )
        ]
        found.update(i for i in ids if isinstance(i, int) and since <= i < until)
        kept = getattr(tracker, "_hooks", None)
        for multi in reversed(kept) if isinstance(kept, list) else ():  # (newest last)
            ids = [getattr(h, "id", -1) for h in getattr(multi, "handles", (multi,))]
            if ids and max(ids) < since:
                break
            found.update(i for i in ids if since <= i < until)
    return found


#: The type name of the autograd node torch adds for a module's backward hooks
#: (``register_full_backward_hook``, ``register_full_backward_pre_hook``, global ones) on
#: its inputs and outputs (``torch.utils.hooks.BackwardHookFunction``).
MODULE_HOOK_NODE = "BackwardHookFunctionBackward"

#: The names of the saved tensors of each type of autograd node (``_raw_saved_*``).
_SAVED_NAMES: dict[type, tuple[str, ...]] = {}

_UNKNOWN = object()


def recomputes(roots) -> bool:
    """Whether a backward pass from ``roots`` (``grad_fn`` s) runs part of the forward pass
    again: a node of the graph holds a tensor saved under saved-tensor hooks other than
    ``torch.autograd.graph.save_on_cpu``'s, as a segment under
    ``torch.utils.checkpoint(..., use_reentrant=False)`` saves them (its forward runs
    again as they are unpacked, and in the batched backward pass under
    ``torch.func.vmap``, where a module's backward hook cannot run). ``save_on_cpu`` runs
    nothing again (found by review: with it around the whole forward, a model with a
    backward hook took the autograd path, one more forward pass, at every step); torch
    applies only the innermost hooks, so a ``save_on_cpu`` inside a segment hides the
    checkpoint where it alone saved. Hooks of another kind count. True where torch does
    not say which hooks saved a tensor (``SavedTensor.unpack_hook``, which torch 2.8 lacks).
    Walks every node until one is found: called only where the graph holds a module's
    backward hook (:data:`MODULE_HOOK_NODE`)."""
    for node in autograd_nodes(roots):
        names = _SAVED_NAMES.get(type(node))
        if names is None:
            names = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
            _SAVED_NAMES[type(node)] = names
        for name in names:
            saved = getattr(node, name)
            for tensor in saved if isinstance(saved, tuple | list) else (saved,):
                unpack = getattr(tensor, "unpack_hook", _UNKNOWN)
                if unpack is _UNKNOWN or (unpack is not None and not _saves_on_cpu(unpack)):
                    return True
    return False


def _saves_on_cpu(hook) -> bool:
    """Whether ``hook`` is a saved-tensor hook of ``torch.autograd.graph.save_on_cpu``."""
    return getattr(hook, "__module__", None) == "torch.autograd.graph" and getattr(
        hook, "__qualname__", ""
    ).startswith("save_on_cpu.")


def backward_hooked(module: nn.Module) -> bool:
    """Whether torch registers backward hooks on ``module``'s output as its call returns
    (its own, ``register_full_backward_hook`` and the like, or global ones)."""
    return bool(
        module._backward_hooks
        or module._backward_pre_hooks
        or _global_backward_hooks
        or _global_backward_pre_hooks
    )


def hooks_registered(since: int | None, until: int, *, tracked: bool = False) -> bool:
    """Whether a hook handle other than riemann_core's was registered between the marks
    ``since`` and ``until`` (:func:`hooks_mark`; ``since`` None: not known, True).
    riemann_core's own are told apart by id, not counted: one registered by another
    thread as the mark ``since`` was read, or counted late, has an id below it or is
    not found (found by review: a count of them, read between another thread's
    registration and its count, hid the user's hook that followed). Process-wide:
    another thread's registrations count too. ``tracked``: nor are those of torch's module
    trackers (:func:`tracked_ids`)."""
    if since is None:
        return True
    own = 0
    try:
        for i in reversed(_own_ids):  # (in order, but for threads' races: those missed count)
            if i < since:
                break
            own += since <= i < until
    except RuntimeError:  # (changed by another thread while read: those not read count)
        pass
    if tracked and until - since > own:  # (nor torch's module trackers', :func:`tracked_ids`)
        own += len(tracked_ids(since, until))
    return until - since > own


def some(items: list) -> str:
    """The first 3 of ``items`` as a list, for a message (``...`` where there are more)."""
    return f"{items[:3]}{' ...' if len(items) > 3 else ''}"


def rng_devices(model: nn.Module) -> list[int]:
    """CUDA devices holding the model's parameters (whose generators a forward may use);
    none where CUDA was never initialised (no walk of the parameters at every forward)."""
    if not torch.cuda.is_initialized():
        return []
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


#: Modules that draw random numbers in training mode, and when they do.
STOCHASTIC: list[tuple[type, Callable[[nn.Module], bool]]] = [
    (nn.modules.dropout._DropoutNd, lambda m: m.p > 0),
    # (torch draws the noise even where lower == upper)
    (nn.RReLU, lambda m: True),
    (nn.MultiheadAttention, lambda m: m.dropout > 0),
]


def stochastic_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` that draw random numbers as they are now (training mode)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if training(module) and any(isinstance(module, t) and on(module) for t, on in STOCHASTIC)
    ]


def _refuse_drawn(called: list[tuple[str, nn.Module]]) -> None:
    """Refuse a forward pass that drew from the global random generators, naming the first
    module of :data:`STOCHASTIC` it called in training mode, if any (a dropout the pass
    did not call is no cause: a model holding one unused is accepted)."""
    if called:
        name, module = called[0]
        which = f"module {name!r}" if name else "the model"
        raise ValueError(
            f"{which} ({type(module).__name__}) draws random numbers in training mode "
            "(dropout), so two calls would give different directions of different networks. "
            "Call model.eval() before rc.direction (RiemannianPreconditioner.step replays the "
            "masks of the training forward pass instead)"
        )
    raise ValueError(
        "the model's forward pass draws random numbers (e.g. F.dropout, torchvision's "
        "StochasticDepth, or noise in a forward method), so two calls would give different "
        "directions of different networks; call model.eval() or make the forward pass "
        "deterministic (RiemannianPreconditioner.step and .backward replay the random "
        "numbers of the training forward pass instead)"
    )


def _held_generators(attributes: list) -> set[int]:
    """The ids of the generators the modules of ``attributes`` hold
    (:func:`~riemann_core.modules.attributes_of`)."""
    return {id(g) for _, _, held in attributes for g, _ in held if type(g) is torch.Generator}


def _refuse_generator(replayed: bool) -> None:
    """Refuse a forward pass that drew from a ``torch.Generator`` of the user's that no
    module holds, passed as ``generator=`` (:class:`~riemann_core.draws.Generators`)."""
    what = (
        ": pre.step() and pre.backward(loss) run the pass again and cannot start it from "
        "the state the recorded pass found it in, so its draws would differ. Hold the "
        "generator as an attribute of the module that draws from it (self.gen = "
        "torch.Generator()), or draw from torch's default generator (no generator=; seeded "
        "by torch.manual_seed): the pass run again starts those from the states the "
        "recorded pass found"
        if replayed
        else ", so two calls would give different directions of different networks; make "
        "the forward pass deterministic (e.g. draw nothing in eval mode, and call model.eval())"
    )
    raise ValueError(
        "the model's forward pass draws random numbers from a torch.Generator passed as "
        "generator= that no module holds as an attribute (a global one, one in a list or "
        f"dict, or one passed to forward; left as it was){what}"
    )


def _rng_of(params: list[Tensor]) -> tuple[list[int], list[Tensor]]:
    """The CUDA devices of ``params`` (none where CUDA was never initialised) and
    :func:`rng_state` of those."""
    devices = (
        sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        if torch.cuda.is_initialized()
        else []
    )
    return devices, rng_state(devices)


def _drew(
    rng: tuple[list[int], list[Tensor]] | None, attributes: list | None
) -> tuple[list[int], list[Tensor]] | None:
    """``rng``, a call's :func:`_rng_of` at its start, where the call moved the random
    state since, or a generator its modules hold (in ``attributes``, its
    :func:`~riemann_core.modules.call_attributes`, with its state then), else ``None``."""
    if rng is None:
        return None
    devices, start = rng
    now = rng_state(devices)
    if not all(torch.equal(a, b) for a, b in zip(start, now, strict=True)):
        return rng
    held = (entry for _, _, entries in attributes for entry in entries)
    return rng if any(_moved(g, s) for g, s in held if type(g) is torch.Generator) else None


def _moved(generator: torch.Generator, state: Tensor) -> bool:
    return not torch.equal(generator.get_state(), state)


def rng_state(devices: list[int]) -> list[Tensor]:
    """The CPU generator's state and those of the CUDA ``devices``."""
    return [torch.random.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]


def set_rng_state(state: list[Tensor], devices: list[int]) -> None:
    torch.random.set_rng_state(state[0])
    for d, s in zip(devices, state[1:], strict=True):
        torch.cuda.set_rng_state(s, d)


def autocast_state(device_types: set[str]) -> dict[str, torch.dtype]:
    """``{device type: dtype}`` of the autocast regions enabled now, among ``device_types``
    and the CPU's (a forward pass under ``torch.autocast``), for :class:`Replay`. Device
    types autocast does not know (``meta``) have none."""
    found = {}
    for t in sorted(device_types | {"cpu"}):
        try:
            if torch.is_autocast_enabled(t):
                found[t] = torch.get_autocast_dtype(t)
        except RuntimeError:  # not a device type autocast knows
            continue
    return found


@dataclass(frozen=True)
class Replay:
    """A forward pass of the user's to run again (``RiemannianPreconditioner.step``): the
    random state it started from (:func:`rng_state`), the buffers as it found them
    (:class:`BufferStates`; a name left out, or ``None``: as they are now), the autocast
    regions it ran in (:func:`autocast_state`) and its float32 precision knobs
    (:func:`~riemann_core._precision.precision_state`), so that the pass run again
    computes in the same precisions, Python's ``random`` state and the modules' plain
    attributes as it started (``python``: a call counter, a flag, a running average, the
    state of a ``torch.Generator`` held as one; see
    :func:`~riemann_core.modules.replayed_attributes`, put back after), and, where
    recorded, the tensors of its output, which the pass run again must give again.

    Other Python state the forward pass reads (an attribute of an object that is not a
    module, or of a module reached only through one, a global or one of torch's own
    modules: one held unregistered by a module replayed is replayed; the items of a
    container inside a container, a global, numpy's random generator (a torch.Generator
    that no module holds as an attribute is refused, see :func:`forward`), a numpy array or a
    tensor that is not a buffer changed in place, a training mode or a hook changed since)
    is not replayed; a pass that took another path gives another output, while the same
    operations on the same data agree to rounding (GPU atomics, kernels chosen by
    alignment): a floating tensor may differ by ``sqrt(eps)`` of its dtype (float32:
    3.5e-4) times its largest entry, any other must be equal."""

    state: list[Tensor]
    output: list[Tensor] | None = None
    buffers: dict[str, Tensor] | None = None
    autocast: dict[str, torch.dtype] = field(default_factory=dict)
    precision: tuple | None = None
    # names a likely cause of another output, known to the caller ("": none), called only on
    # a refusal (found by review: naming it before every replay walked every module, 1.3 ms
    # for 2.8k modules)
    cause: Callable[[], str] | None = None
    # the ids of the parameters whose modules' outputs the recorded output depended on, of
    # those it reached as leaves (None: a compiled graph), and of those it could have
    # (:meth:`check_reach`; empty: not known)
    reached: frozenset[int] = frozenset()
    leaves: frozenset[int] | None = None
    considered: frozenset[int] = frozenset()
    # the autograd nodes of the recorded output's graph that are no leaf's (empty: not
    # known), which the pass run again must not reach (:meth:`check_kept`)
    recorded: frozenset = frozenset()
    # whether an autocast region of the recorded pass was still open where the pass is run
    # again (the caller's): only then can autocast's cache hold casts of that pass
    cached_casts: bool = False
    # (dtype, device) of the model's first parameter at the recorded pass (None: not known)
    placed: tuple | None = None
    # called with the output and the calls of the pass run again, raises where a parameter
    # without .grad is coupled with one that has a .grad (None: nothing to check; see
    # RiemannianPreconditioner._grads_coupled)
    coupled: Callable[[Tensor, list[Block]], None] | None = None
    # Python's random state (random.getstate()) and the plain attributes of the model's
    # modules (replayed_attributes) as the recorded pass started (None: as they are now)
    python: tuple[tuple, list] | None = None

    def check(self, outputs, checks) -> None:
        """Register with ``checks`` (a :class:`~riemann_core._checks.Deferred`) that
        ``outputs`` are the recorded output (NaN and inf are left to the checks of the
        outputs). No host sync; another structure raises at once."""
        if not self.output:  # (none recorded: an output torch's pytree does not open, a
            return  # dataclass, is refused by the outputs' own check, found by a hunt)
        new = [t.detach() for t in pytree.tree_leaves(outputs) if isinstance(t, Tensor)]
        if [(t.shape, t.dtype) for t in new] != [(t.shape, t.dtype) for t in self.output]:
            _replay_differs(new, self.output, self.cause)
        alike = torch.stack([~_differ(a, b) for a, b in zip(new, self.output, strict=True)])
        checks.require(alike.all(), lambda: _replay_differs(new, self.output, self.cause))

    def check_reach(self, on: tuple[set[int], set[int] | None], calls) -> None:
        """Refuse a pass run again whose output depends on other parameters, through their
        modules' outputs, than the recorded output did (``on``: their ids, and those it
        reaches as leaves, :func:`riemann_core.coupling.reached_parameters`; leaves are
        compared where neither graph is compiled): a ``.detach()`` or
        ``torch.no_grad()`` taken on a path chosen by state not replayed gives the same
        values (found by hunts: a counter freezing a backbone after warm-up, the metric of
        the frozen network, 1.6-6 off; a module detaching its own weight by a counter, under
        the generic kernel 14-40x off; one using it only from its second pass, the metric
        with it and the gradient without, 0.3-2 off). Of the parameters of its ``calls``
        that trained in the recorded pass (one frozen or unfrozen since is not a block's
        there); a module whose output reaches the output partly detached is not seen, nor a
        parameter that reaches it partly detached."""
        modules, leaves = on
        lost, gained = self.reached - modules, set()
        if self.leaves is not None and leaves is not None:
            lost |= self.leaves - leaves
            gained = (leaves & self.considered) - self.leaves
        for missing, depends, recorded in (
            (lost, "does not depend", "did"),
            (gained, "depends", "did not"),
        ):
            names = sorted({c.name for c in calls if any(id(p) in missing for p in c.params)})
            if names:
                raise ReplayDiffers(
                    "the model's forward pass, run again on the recorded batch for the "
                    f"metric, gave an output that {depends} on "
                    f"{', '.join(map(named_module, names))} (through its output or its "
                    "parameters), which the output of the pass the gradient came from "
                    f"{recorded}: the pass took another path (a .detach() or torch.no_grad() "
                    "chosen by state that is not replayed: a counter or a flag kept outside "
                    "the model's modules, in a global or an object that is not a module; "
                    "the modules' own attributes and Python's random module are replayed). "
                    "pre.step() runs the pass again, and so does "
                    "pre.backward(loss) on its first call for a model: keep such state fixed "
                    "until the direction is computed (change it after pre.step(), or at the "
                    "start of a step from a count of your own)"
                )

    def check_kept(self, nodes: set, calls) -> None:
        """Refuse a pass run again whose graph (``nodes``: those that are no leaf's) holds
        a node of the recorded pass's on a path to parameters of its ``calls``: a tensor
        computed from them in an earlier pass and kept since (a cache built once, or until
        the weight changes, on a module; a recurrent state carried over without
        ``.detach()``). Its graph is that pass's, freed by the backward pass through it
        (found by a hunt: torch's "Trying to backward through the graph a second time"
        surfaced from pre.step(); where its nodes saved nothing, the parameters were
        refused as used outside their modules' calls, or, after such a refusal, the
        direction was 0.7-0.96 off, the generic kernel evaluating the module through the
        kept tensor, silently)."""
        kept = self.recorded & nodes
        if kept and self.autocast and self.cached_casts:  # autocast's cast of a parameter,
            # cached by torch for its region (the replay runs inside the caller's: found by
            # the tests), saves nothing and is at the weights of now. Torch empties that
            # cache as the outermost region closes: a cast reached from outside the caller's
            # region is one kept by the model (found by review: a cache of self.W.double()
            # was exempted under autocast, its direction at the weights it was made at)
            kept = {node for node in kept if not cast_of_leaves(node)}
        if not kept:
            return
        names = {id(p): n for c in calls for p, n in zip(c.params, c.param_names, strict=True)}
        reached = sorted(
            {
                names[id(node.variable)]
                for node in autograd_nodes(kept)
                if id(getattr(node, "variable", None)) in names
            }
        )
        if reached:
            raise ValueError(
                "the model's forward pass, run again on the recorded batch for the metric "
                "(pre.step() runs it again, and so does pre.backward(loss) on its first call "
                f"for a model), reaches parameters {reached} through a tensor computed from "
                f"them in an earlier forward pass and kept since: {KEPT_ACROSS_PASSES}"
            )


def cast_of_leaves(node) -> bool:
    """Whether autograd ``node`` is a dtype cast of leaf tensors (what autocast caches)."""
    return type(node).__name__ == "ToCopyBackward0" and all(
        n is None or hasattr(n, "variable") for n, _ in node.next_functions
    )


def sequence_now() -> int:
    """The sequence number of the next autograd node this thread makes: autograd numbers
    the nodes each thread makes in order, so a node numbered below it was made before now
    (a leaf's ``AccumulateGrad`` takes the largest number, made when first needed). Read
    without making a node (torch's own reader, since torch 2.1): 0.4 us. Each thread
    numbers its own: a node made in another thread is not ordered by it
    (:attr:`Capture.threaded`)."""
    return torch.autograd._get_sequence_nr()


#: What a tensor kept with its graph from an earlier forward pass is, and the fix.
KEPT_ACROSS_PASSES = (
    "a tensor derived from parameters kept across forward passes (a cache built once on a "
    "module, self.cache = self.weight * 2, or rebuilt only when the weight changes; a "
    "recurrent state carried over without .detach()): its autograd graph is that of the "
    "pass that made it, freed by the backward pass through it and made at the weights of "
    "then, so the metric cannot be taken through it. Compute such a tensor inside forward "
    "at every pass, from the parameters as they are; one that no gradient should flow "
    "through can be kept detached, as a buffer refreshed after opt.step() (under "
    "torch.no_grad())"
)

#: The start of torch's error for a backward pass through a graph already freed.
GRAPH_FREED = "Trying to backward through the graph a second time"


def _differ(new: Tensor, old: Tensor) -> Tensor:
    """A device boolean: ``new`` is not ``old`` up to rounding (see :class:`Replay`)."""
    if not old.is_floating_point():
        return new.ne(old).any()
    tolerance = torch.finfo(old.dtype).eps ** 0.5
    return (new - old).abs().amax() > tolerance * old.abs().amax()


class ReplayDiffers(ValueError):
    """The model's forward pass, run again on a recorded batch, gave another output."""


def _replay_differs(new: list[Tensor], old: list[Tensor], name_cause=None) -> None:
    cause = name_cause() if name_cause is not None else ""
    if [t.shape for t in new] == [t.shape for t in old]:
        error = max(float((a - b).abs().max()) for a, b in zip(new, old))
        seen = f"entries differ by up to {error:.3g}"
    else:
        seen = f"shapes {[tuple(t.shape) for t in new]} against {[tuple(t.shape) for t in old]}"
    if cause:
        raise ReplayDiffers(
            "the model's forward pass, run again on the recorded batch for the metric, gave "
            f"another output than the pass the gradient came from ({seen}): {cause}"
        )
    raise ReplayDiffers(
        "the model's forward pass, run again on the recorded batch from the recorded random "
        f"state for the metric, gave another output than the pass the gradient came from "
        f"({seen}). pre.step() runs the pass again, and so does pre.backward(loss) on its "
        "first call for a model (and until one succeeds); this forward pass depends on state "
        "that is not replayed (a global, an attribute of an object that is not a module or "
        "of a module reached only through one, a container held inside another (a list "
        "in a dict), a numpy array changed in place, numpy's random generator, a global hook "
        "changed since; the modules' own attributes and __slots__, the items of a list, "
        "dict, set or deque they hold, the modules they hold unregistered, and Python's "
        "random module are replayed as the recorded pass found them): draw random choices "
        "with torch's or Python's generator, keep such state in "
        "the modules' own attributes (a number, a flag, a list, dict, set or deque of its "
        "own), or keep it fixed until the direction is computed; a tensor the pass changes in "
        "place for the next (a recurrent state, self.h.copy_(h)) can be held as a buffer "
        "(self.register_buffer('h', ..., persistent=False)), which the pass run again starts "
        "from as the recorded pass found it, or passed to forward as an argument"
    )


#: How many entries of a module's list, tuple and dict attributes (and of those inside
#: them, two levels deep) are searched for generators, in all: a large container (a
#: vocabulary) is not read at every call.
GENERATOR_SEARCH_ENTRIES = 256

_CONTAINERS = (list, tuple, dict)

#: The attributes every module has (its parameters, buffers, submodules and hooks, in
#: containers torch keeps): never a user's generator, and the 14 containers among the 17
#: were most of the search's time (0.9 ms a call for 34 modules on a 2-core CPU).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _own_generators(model: nn.Module) -> list[tuple[str, torch.Generator]]:
    """``(name, generator)`` of every ``torch.Generator`` a module of ``model`` holds as an
    attribute (``self.gen = torch.Generator()``) or in a list, tuple or dict attribute
    (``self.gens = [...]``, named ``gens[0]``; see :data:`GENERATOR_SEARCH_ENTRIES`):
    the global generators' states do not show its draws."""
    found = []
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in _MODULE_INTERNALS:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(value, torch.Generator):
                found.append((name, value))
            elif isinstance(value, _CONTAINERS):
                found += [(name + path, g) for path, g in _generators_in(value)]
    return found


def _generators_in(container) -> list[tuple[str, torch.Generator]]:
    """``(path, generator)`` in ``container`` and the containers in it (two levels), up
    to :data:`GENERATOR_SEARCH_ENTRIES` entries read; paths formatted for finds only."""
    found, budget = [], GENERATOR_SEARCH_ENTRIES
    level = [((), container)]
    for depth in range(2):
        inner = []
        for keys, value in level:
            if len(value) > budget:
                return found
            budget -= len(value)
            entries = value.items() if isinstance(value, dict) else enumerate(value)
            for key, entry in entries:
                if isinstance(entry, torch.Generator):
                    found.append(("".join(f"[{k!r}]" for k in (*keys, key)), entry))
                elif depth == 0 and isinstance(entry, _CONTAINERS):
                    inner.append(((*keys, key), entry))
        level = inner
    return found


def placement(model: nn.Module) -> tuple | None:
    """``(dtype, device)`` of ``model``'s first floating-point parameter (``model.double()``
    and ``model.to(...)`` move them all; an integer one keeps its dtype), ``None`` for a
    model without one."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return None if first is None else (first.dtype, first.device)


def moved_since(model: nn.Module, placed: tuple | None) -> str:
    """What to say of a replay where ``model`` was moved since the recorded pass, whose
    :func:`placement` was ``placed`` (``""``: not moved, or not known). Found by a hunt:
    ``model.double()`` before ``pre.step()`` was told to check its inputs, or that its
    pass depends on state not replayed."""
    now = placement(model)
    if placed is None or now is None or now == placed:
        return ""
    return (
        "the model was moved since its last forward pass (its first parameter from "
        f"{placed[0]} on {placed[1]} to {now[0]} on {now[1]}: model.double(), model.to(...)), "
        "and the "
        "replay runs on that pass's inputs: run the forward pass again after moving the "
        "model, on inputs moved with it"
    )


@contextlib.contextmanager
def _python_as(model: nn.Module, random_state: tuple, attributes: list):
    """Python's ``random`` module at ``random_state`` and the modules of ``attributes``
    with the plain attributes they held then (:func:`restored_attributes`), for a replay;
    the caller's ``random`` state and the attributes as they are now (of those modules,
    one taken out of the model since included, and of ``model``'s others) put back
    afterwards, so that the replay moves no counter and no running average."""
    recorded = {id(m) for m, _, _ in attributes}
    found: list = []  # (modules held unregistered: of the others, those found too)
    current = [attributes_of(m, found) for m, _, _ in attributes]
    others = [m for m in model.modules() if id(m) not in recorded]
    current += replayed_attributes(others, recorded.union(map(id, others)), found)
    caller_random = random.getstate()
    try:
        random.setstate(random_state)
        restored_attributes(attributes)
        yield
    finally:
        restored_attributes(current)
        random.setstate(caller_random)


def forward(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    replay: Replay | None = None,
) -> tuple[Tensor, list[Block]]:
    """Run ``model(*args, **kwargs)`` and capture every call of a module with parameters.

    The forward pass must not draw random numbers, unless ``replay`` is given: every pass
    then starts from its random state and buffers, so dropout draws the masks it drew
    then, and the caller's random state is restored afterwards (:meth:`Replay.check` then
    tells whether the pass took the recorded path). Without ``replay``, a pass refused or
    failing leaves the caller's random state as it was too. Either way a draw from a
    ``torch.Generator`` passed as ``generator=`` that no module holds as an attribute
    (which a replay cannot start where the recorded pass did) is refused, each such
    generator left as the pass found it; one the pass makes and drops is not (it draws the
    same at every pass, :class:`~riemann_core.draws.Generators`).

    Without ``replay`` every pass runs on copies of the argument tensors: a forward that
    changes its input in place (``x.mul_(2)``) leaves the caller's tensors as they were,
    and a second pass (below) starts from the values the first did. (A replayed batch is
    the preconditioner's, which refuses such a forward.)
    """
    notes = notes_for(model)
    devices = rng_devices(model)
    own = [] if replay is not None else _own_generators(model)
    # the modules that may draw, to name the one a refused pass called
    stochastic = [] if replay is not None else stochastic_modules(model)
    # the generators passed as generator= are watched, except those the modules hold: a
    # replay starts them as the pass did and puts them back, and without one they are
    # refused by name (own, below)
    generators_held = {id(g) for _, g in own} | _held_generators(
        replay.python[1] if replay is not None and replay.python is not None else []
    )
    given = args, kwargs
    for _ in range(2):
        if replay is None:
            args, kwargs = pytree.tree_map(
                lambda a: a.clone() if isinstance(a, Tensor) else a, given
            )
        with contextlib.ExitStack() as stack:
            stack.enter_context(buffers_kept(model, replay and replay.buffers))
            if replay is not None:
                stack.enter_context(torch.random.fork_rng(devices=devices))
                set_rng_state(replay.state, devices)
                for device_type, dtype in replay.autocast.items():
                    stack.enter_context(torch.autocast(device_type, dtype=dtype))
                stack.enter_context(precision_as(replay.precision))
                if replay.python is not None:  # before each pass, and put back after
                    stack.enter_context(_python_as(model, *replay.python))
            before = None if replay is not None else rng_state(devices)
            if before is not None:  # the caller's draws stay as they were, whatever follows
                # (found by review: a dropout beside a module's own generator, refused for
                # the generator, or a forward failing after a dropout, advanced them)
                stack.callback(set_rng_state, before, devices)
            own_before = [g.get_state() for _, g in own]
            for (_, g), state in zip(own, own_before, strict=True):
                # the caller's draws stay as they were, whatever follows (found by review:
                # rc.direction's pass failing, or refused for a parameter changed in place,
                # after a draw from self.gen left it moved on)
                stack.callback(g.set_state, state)
            called = []
            for name, module in stochastic:
                hook = ours(
                    module.register_forward_pre_hook(
                        lambda *_, entry=(name, module), called=called: called.append(entry)
                    )
                )
                stack.callback(hook.remove)
            capture = stack.enter_context(Capture(model, notes.clone))
            stack.enter_context(eager())
            stack.enter_context(_own_forward())
            generators = Generators(generators_held)
            stack.callback(generators.restore)
            stack.enter_context(generators)
            versions = [(n, p, version_of(p)) for n, p in model.named_parameters()]
            try:
                outputs = model(*args, **kwargs)
            except (RuntimeError, IndexError, TypeError) as err:
                held = [*model.named_parameters(), *model.named_buffers()]
                inference = [n for n, t in held if not is_lazy(t) and t.is_inference()]
                if inference and "Inference tensors cannot be saved" in str(err):
                    # (found by review: frozen parameters loaded under inference_mode work in
                    # the user's pass, whose inputs need no gradient; the metric's passes
                    # differentiate the inputs of every module, saving its weights)
                    raise ValueError(
                        f"the model holds {some(inference)}, made under torch.inference_mode(), "
                        "which autograd cannot save for the backward passes the metric runs "
                        "through every module: make them ordinary tensors (load the weights "
                        "outside inference mode, or under torch.no_grad())"
                    ) from err
                meta = [n for n, t in held if t.is_meta]
                hint = (
                    f"; the model holds {meta[:3]}{' ...' if len(meta) > 3 else ''} on the "
                    "meta device (frozen parameters or buffers, shapes without values): "
                    "materialise them (model.to_empty(device=...), then load the weights)"
                    if meta
                    else f"; {moved}"
                    if replay is not None and (moved := moved_since(model, replay.placed))
                    else ""
                )
                raise ValueError(
                    f"the model's forward pass failed on these inputs: {err}. Check that the "
                    f"inputs have the shape and dtype the model expects{hint}"
                ) from err
            moved = before is not None and not all(
                torch.equal(a, b) for a, b in zip(before, rng_state(devices), strict=True)
            )
            apart = generators.moved()
            drawn = [
                n
                for (n, g), s in zip(own, own_before, strict=True)
                if not torch.equal(g.get_state(), s)
            ]
        changed = [n for n, p, v in versions if version_of(p) != v]
        if changed:
            raise ValueError(
                f"the model's forward pass changed parameters {changed} in place, so the "
                "metric would be taken at parameters other than the gradient's (and every "
                "call here changes them again). Make such updates outside forward, e.g. "
                "after opt.step()"
            )
        if drawn:
            raise ValueError(
                f"the model's forward pass draws random numbers from the generators {drawn} "
                "of its modules, so two calls would give different directions of different "
                "networks; make the forward pass deterministic (e.g. draw nothing in eval "
                "mode, and call model.eval())"
            )
        if apart:
            _refuse_generator(replay is not None)
        if moved:
            _refuse_drawn(called)
        stale = capture.stale()
        if not stale:
            return outputs, _without_no_grad_repeats(capture.calls)
        notes.clone |= stale
    raise ValueError(  # pragma: no cover - captured copies cannot change
        f"modules {sorted(stale)} had their captured tensors changed in place even when copied"
    )
