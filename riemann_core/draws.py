"""The random numbers a module evaluated whole draws, recorded on the batch and replayed
one sample at a time.

The generic kernel evaluates a module one sample at a time under ``torch.func.vmap``,
where a draw cannot give the values the batch call drew. A call that moved the random
state (:attr:`~riemann_core.modules.Block.rng`) is run again on the batch from the state
it started from, and :class:`Recording` keeps what each draw gave, in order (dropout's
mask, drawn as dropout draws it: on ``ones_like`` of its input, so from the same
generator state the same values); :class:`Replaying` then gives the ``k``-th draw of
each sample's evaluation the ``k``-th recorded tensor's row of that sample.
"""

from __future__ import annotations

import contextlib

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
        if func in DROPOUTS:
            return _masked(func, args, kwargs, lambda x, p: self._next(tuple(x.shape)))
        if func in DRAWS:
            return self._next(_shape(func, args, kwargs)).clone()
        return func(*args, **kwargs)

    def __exit__(self, kind, value, traceback):
        super().__exit__(kind, value, traceback)
        if kind is None and self.k != len(self.draws):
            self._refuse(f"{self.k} of the {len(self.draws)} draws")


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
