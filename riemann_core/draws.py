"""The random numbers a module evaluated whole draws, recorded on the batch and replayed
one sample at a time.

The generic kernel evaluates a module one sample at a time under ``torch.func.vmap``,
where a draw cannot give the values the batch call drew. A call that moved the random
state (:attr:`~riemann_core.modules.Block.rng`) is run again on the batch from the state
it started from, and :class:`Recording` keeps what each draw gave, in order (dropout's
mask, drawn as dropout draws it: on ``ones_like`` of its input, so from the same
generator state the same values); :class:`Replaying` then gives the ``k``-th draw of
each sample's evaluation the ``k``-th recorded tensor's row of that sample (filling the
tensor of an in-place draw with it). A generator a module holds is drawn from as the call
found it (its state is one of the module's attributes); :class:`Generators` sees those no
module holds.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: Dropouts (which scale their input by a mask) and the one that draws the same mask
#: without acting in place; ``F``'s take ``inplace``, torch's in-place ones end in ``_``.
DROPOUTS = {
    F.dropout: F.dropout,
    F.dropout1d: F.dropout1d,
    F.dropout2d: F.dropout2d,
    F.dropout3d: F.dropout3d,
    torch.dropout: torch.dropout,
    torch.dropout_: torch.dropout,
    torch.feature_dropout: torch.feature_dropout,
    torch.feature_dropout_: torch.feature_dropout,
}

#: Operations whose result is the draw (in place: the tensor they fill).
DRAWS = (
    torch.bernoulli,
    Tensor.bernoulli,
    Tensor.bernoulli_,
    torch.rand,
    torch.randn,
    torch.rand_like,
    torch.randn_like,
    Tensor.uniform_,
    Tensor.normal_,
)

#: Those of :data:`DRAWS` that fill their tensor in place.
FILLED = (Tensor.bernoulli_, Tensor.uniform_, Tensor.normal_)

#: What the refusals name as replayed.
REPLAYED = (
    "dropout (F.dropout, nn.Dropout, Dropout1d-3d), bernoulli, rand, randn, uniform_, normal_"
)


def _dropout(func, args, kwargs) -> tuple[Tensor, float, bool, bool]:
    """``(input, p, training, inplace)`` of a call of one of :data:`DROPOUTS`."""
    if func in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
        named = dict(zip(("input", "p", "training", "inplace"), args)) | kwargs
        return (
            named["input"],
            named.get("p", 0.5),
            named.get("training", True),
            named.get("inplace", False),
        )
    named = dict(zip(("input", "p", "train"), args)) | kwargs
    return named["input"], named["p"], named["train"], func is not DROPOUTS[func]


def _draws_mask(p: float, training: bool, x: Tensor) -> bool:
    """Whether dropout draws (torch returns the input, or zeros, without drawing else)."""
    return bool(training) and 0 < p < 1 and x.numel() > 0


def _masked(func, args, kwargs, mask_of) -> Tensor:
    """A call of one of :data:`DROPOUTS` as its input times ``mask_of(input, p)`` (the
    scaled mask), in place where the call is; the call as it is where it draws nothing."""
    x, p, training, inplace = _dropout(func, args, kwargs)
    if not _draws_mask(p, training, x):
        return func(*args, **kwargs)
    mask = mask_of(x, p)
    return x.mul_(mask) if inplace else x * mask


def _shape(func, args, kwargs) -> tuple[int, ...]:
    """The shape of what a call of one of :data:`DRAWS` draws."""
    if func in (torch.rand, torch.randn):
        size = kwargs.get("size", args[0] if len(args) == 1 else args)
        return tuple(size if not isinstance(size, int) else (size,))
    return tuple(args[0].shape)


class Recording(TorchFunctionMode):
    """Runs the draws as they are, keeping each one's values (``draws``, in order)."""

    def __init__(self):
        super().__init__()
        self.draws: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DROPOUTS:
            return _masked(
                func,
                args,
                kwargs,
                lambda x, p: self._kept(DROPOUTS[func](torch.ones_like(x), p, True)),
            )
        out = func(*args, **kwargs)
        if func in DRAWS:
            self.draws.append(out.clone())  # (the forward may scale it in place)
        return out

    def _kept(self, mask: Tensor) -> Tensor:
        self.draws.append(mask)
        return mask


class Replaying(TorchFunctionMode):
    """Gives the ``k``-th draw the ``k``-th of ``draws``: each sample's rows (a vmapped
    slice, ``per_sample``) or the batch's. ``what`` names the module in the refusals of
    draws other than the recorded ones."""

    def __init__(self, draws: list[Tensor], what: str, *, per_sample: bool):
        super().__init__()
        self.draws, self.what, self.per_sample, self.k = draws, what, per_sample, 0
        # tensors an in-place draw could not fill, with the draw's name and number
        self.unfilled: list[tuple[Tensor, str, int]] = []

    def _next(self, shape: tuple[int, ...]) -> Tensor:
        if self.k == len(self.draws):
            self._refuse(f"more than the {len(self.draws)} draws")
        draw = self.draws[self.k]
        expected = (1, *draw.shape) if self.per_sample else tuple(draw.shape)
        if tuple(shape) != expected:
            self._refuse(f"draw {self.k} of shape {tuple(shape)}, not {expected}")
        self.k += 1
        return draw.unsqueeze(0) if self.per_sample else draw

    def _refuse(self, found: str) -> None:
        raise ValueError(
            f"kernel='generic' evaluates {self.what} one sample at a time with the random "
            f"numbers its call drew on the batch, and one sample's evaluation made {found} "
            "drawn on the batch: its draws must be one row per sample (a mask of shape "
            "(N, ...)), in the same number and order however many samples it is called "
            "on. Draw per sample, call model.eval(), or hold the module's own parameters in "
            "a small module of their own, so that the draws lie outside it"
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.unfilled:
            self._check_unread(args, kwargs)
        if func in DROPOUTS:
            return _masked(func, args, kwargs, lambda x, p: self._next(tuple(x.shape)))
        if func in DRAWS:
            draw = self._next(_shape(func, args, kwargs))
            return self._filled(func, args[0], draw) if func in FILLED else draw.clone()
        return func(*args, **kwargs)

    def _filled(self, func, target: Tensor, draw: Tensor) -> Tensor:
        """``target`` filled with ``draw`` in place, as the draw fills it: a forward that
        ignores what ``m.bernoulli_(q)`` returns reads ``m`` (found by a hunt: left as it
        was, refused as a module that couples the samples, or as parameters outside their
        modules). One sample at a time a tensor made afresh (``torch.ones(n, 1)``) holds
        no sample's dimension and cannot take each sample's values: the draw is returned,
        and a later read of the tensor refused (:meth:`_check_unread`)."""
        try:
            return target.copy_(draw)
        except RuntimeError:  # (vmap: a tensor without the samples' dimension)
            self.unfilled.append((target, func.__name__, self.k - 1))
            return draw.clone()

    def _check_unread(self, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                for target, name, k in self.unfilled:
                    if t is target:
                        raise ValueError(
                            f"kernel='generic' evaluates {self.what} one sample at a time "
                            f"with the random numbers its call drew on the batch, and its "
                            f"{name} (draw {k}) fills in place a tensor made afresh "
                            "(torch.ones(n, 1), torch.empty(...)), which holds no sample's "
                            "dimension there and cannot take each sample's values; the "
                            "forward reads that tensor, not what the draw returns. Use what "
                            "it returns (m = m.bernoulli_(q)), or make the tensor from the "
                            "input (torch.empty_like(x), x.new_empty(...))"
                        )

    def __exit__(self, kind, value, traceback):
        super().__exit__(kind, value, traceback)
        if kind is None and self.k != len(self.draws):
            self._refuse(f"{self.k} of the {len(self.draws)} draws")


class Generators(TorchFunctionMode):
    """Notes each ``torch.Generator`` passed to a call (``generator=G``) with its state at
    first sight, but torch's default ones (whose states a replay forks) and those of
    ``held`` (ids: the modules' own, which a replay starts as the pass did, and
    ``rc.direction`` refuses by name): :meth:`moved` tells whether the calls moved one,
    :meth:`restore` puts them back. A replay cannot start such a generator where the
    recorded pass found it (nothing recorded it), and its draws went unseen: the caller's
    generator moved on, and ``rc.direction`` gave a direction of one draw (found by a
    hunt). Held by weak reference: one the forward pass makes and drops
    (``g = torch.Generator().manual_seed(0)``, gone when the pass returns) starts afresh at
    every pass, draws the same again, and is no cause (found by review: refused, where it
    had been exact)."""

    def __init__(self, held: set[int]):
        super().__init__()
        self.found: dict[int, tuple[weakref.ref, Tensor]] = {}
        self.held = held

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = kwargs.get("generator")
        if isinstance(g, torch.Generator) and id(g) not in self.held and not _default(g):
            seen = self.found.get(id(g))
            if seen is None or seen[0]() is not g:  # (an id of one gone may come again)
                self.found[id(g)] = weakref.ref(g), g.get_state()
        return func(*args, **kwargs)

    def _alive(self):
        return [(g, s) for ref, s in self.found.values() if (g := ref()) is not None]

    def moved(self) -> bool:
        return any(not torch.equal(g.get_state(), s) for g, s in self._alive())

    def restore(self) -> None:
        for g, s in self._alive():
            g.set_state(s)


def _default(g: torch.Generator) -> bool:
    """Whether ``g`` is torch's default generator of the CPU or of a CUDA device."""
    if g is torch.default_generator:
        return True
    return g.device.type == "cuda" and g is torch.cuda.default_generators[g.device.index or 0]


def replaying(draws: list[Tensor], what: str, *, per_sample: bool):
    """:class:`Replaying` ``draws``; nothing where there are none (no mode on the path of
    every module that draws nothing)."""
    return Replaying(draws, what, per_sample=per_sample) if draws else contextlib.nullcontext()


def recorded(call, rng: tuple[list[int], list[Tensor]], N: int, what: str) -> list[Tensor]:
    """The draws of ``call()`` (:class:`Recording`) run from the random state ``rng``
    (``(CUDA devices, states)``, the CPU generator's first), the caller's left as it was;
    each must hold the ``N`` samples in its first dimension."""
    devices, states = rng
    with torch.random.fork_rng(devices=devices), torch.no_grad(), Recording() as recording:
        torch.random.set_rng_state(states[0])
        for d, s in zip(devices, states[1:], strict=True):
            torch.cuda.set_rng_state(s, d)
        call()
    for draw in recording.draws:
        if draw.ndim == 0 or draw.shape[0] != N:
            raise ValueError(
                f"kernel='generic' evaluates {what} one sample at a time, and its call draws "
                f"random numbers of shape {tuple(draw.shape)}, not one row per sample (the "
                f"batch, {N}, first; torchvision's StochasticDepth(mode='batch') draws one "
                "for the batch), which cannot be split into samples. Draw per sample "
                "(mode='row'), call model.eval(), or hold the module's own parameters in a "
                "small module of their own, so that the draws lie outside it"
            )
    return recording.draws
