"""Full float32 precision while a direction is computed, whatever the user enabled.

TF32 (``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
``torch.set_float32_matmul_precision("high")``, and cuDNN convolutions by default)
rounds products to a 10-bit mantissa, and autocast runs them in half precision: the
Grams and solves here would lose about three digits, which small dampings amplify.
:func:`full_precision` sets every float32 precision knob that reads reduced to IEEE and
disables autocast for the duration of a call, then restores the user's settings (those it
changed; see :func:`_restore` for the one case torch leaves ambiguous).

A forward pass of the user's that is run again for the metric (``pre.step()``) runs in
the precisions it ran in (:func:`precision_state`, :func:`precision_as`): products of a
pass under ``torch.set_float32_matmul_precision("medium")`` are bfloat16 ones on a CPU
with bfloat16 units (TF32 on CUDA for ``"high"``), and in IEEE float32 the pass would give
another output (found on a CPU with AVX512-BF16: 1.6e-3 off, refused as another path).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch


@functools.cache
def precision_knobs() -> tuple[tuple[str, object], ...]:
    """``(name, backend)`` for every backend operation with an ``fp32_precision``: objects
    that live as long as torch, so found once (their values are read live, ~6 us a walk
    that ran several times a step)."""
    b = torch.backends
    candidates = [
        ("cuda.matmul", getattr(b.cuda, "matmul", None)),
        ("cudnn.conv", getattr(b.cudnn, "conv", None)),
        ("cudnn.rnn", getattr(b.cudnn, "rnn", None)),
        ("mkldnn.matmul", getattr(b.mkldnn, "matmul", None)),
        ("mkldnn.conv", getattr(b.mkldnn, "conv", None)),
        ("mkldnn.rnn", getattr(b.mkldnn, "rnn", None)),
    ]
    return tuple((n, k) for n, k in candidates if hasattr(k, "fp32_precision"))


@contextlib.contextmanager
def full_precision(device_types: set[str]) -> Iterator[None]:
    """IEEE float32 products and no autocast on ``device_types`` inside the block."""
    knobs = precision_knobs()
    with contextlib.ExitStack() as stack:
        # (no autocast on the meta device: a frozen, unused submodule left there raised
        # torch's "unsupported scalarType" here, found by review)
        for device_type in sorted((device_types - {"meta"}) | {"cpu"}):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        if knobs:  # torch >= 2.9: one knob per backend operation ("none": the default, IEEE)
            reads = [k.fp32_precision for _, k in knobs]
            ieee = [v if v in ("ieee", "none") else "ieee" for v in reads]
            stack.callback(_restore, _switch(knobs, ieee))
        else:  # the legacy switches
            saved_matmul = torch.get_float32_matmul_precision()
            stack.callback(torch.set_float32_matmul_precision, saved_matmul)
            torch.set_float32_matmul_precision("highest")
            cudnn = torch.backends.cudnn
            stack.enter_context(
                cudnn.flags(
                    enabled=cudnn.enabled,
                    benchmark=cudnn.benchmark,
                    deterministic=cudnn.deterministic,
                    allow_tf32=False,
                )
            )
        yield


#: Machine epsilon of float32 products under each reduced ``fp32_precision``.
REDUCED_EPS = {"bf16": float(torch.finfo(torch.bfloat16).eps), "tf32": 2.0**-10}


def product_eps(device_type: str, conv: bool = False) -> float:
    """The machine epsilon float32 matrix products (``conv``: and convolutions) on
    ``device_type`` round to now where a precision knob reduces them (bfloat16's, TF32's;
    a CPU without bfloat16 units computes in IEEE anyway: a bound), 0 where they are IEEE.
    (cuDNN's convolutions take TF32 by default: a Linear's products on CUDA stay IEEE.)"""
    knobs, cpu = dict(precision_knobs()), device_type == "cpu"
    names = ("mkldnn.matmul", "mkldnn.conv") if cpu else ("cuda.matmul", "cudnn.conv")
    values = [knobs[n].fp32_precision for n in names[: 1 + conv] if n in knobs]
    if not knobs:  # torch < 2.9: the legacy switches (reading them once the knobs were
        # set raises on later versions)
        matmul = torch.get_float32_matmul_precision()
        if cpu:
            values = ["bf16" if matmul == "medium" else None]
        else:
            reduced = matmul != "highest" or (conv and torch.backends.cudnn.allow_tf32)
            values = ["tf32" if reduced else None]
    return max((REDUCED_EPS.get(v, 0.0) for v in values), default=0.0)


def precision_state() -> tuple:
    """The float32 precision knobs now: each backend operation's ``fp32_precision``
    (torch >= 2.9), else the legacy matmul precision and cuDNN's TF32 switch."""
    knobs = precision_knobs()
    if knobs:
        return tuple(k.fp32_precision for _, k in knobs)
    return (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def precision_as(state: tuple | None) -> Iterator[None]:
    """The float32 precision knobs set to ``state`` (:func:`precision_state`) inside the
    block, restored after; ``None``: as they are."""
    if state is None:
        yield
        return
    knobs = precision_knobs()
    if knobs:
        changed = _switch(knobs, state)
        try:
            yield
        finally:
            _restore(changed)
        return
    saved = precision_state()  # the legacy switches
    try:
        _set_legacy(state)
        yield
    finally:
        _set_legacy(saved)


def _set_legacy(state: tuple) -> None:
    torch.set_float32_matmul_precision(state[0])
    torch.backends.cudnn.allow_tf32 = state[1]


def _switch(knobs, values) -> list[tuple[object, str]]:
    """Each knob set to its value in ``values`` where it reads another; ``(knob, what it
    read)`` for those changed (the others are left alone: a knob the user pinned keeps its
    pin, found by review)."""
    changed = []
    for (_, k), value in zip(knobs, values, strict=True):
        if k.fp32_precision != value:
            changed.append((k, k.fp32_precision))
            k.fp32_precision = value
    return changed


def _restore(changed: list[tuple[object, str]]) -> None:
    """Each changed knob back to what it read, inheriting it (``"none"``: from its
    backend's knob or the global one) where that gives the value: written out, an inherited
    value would stop following them (found by a hunt: after a call under
    ``torch.backends.mkldnn.fp32_precision = "bf16"``, setting that back to ``"ieee"`` left
    every mkldnn operation in bfloat16). Torch reads an operation's inherited value as its
    own, so a reduced value the user pinned equal to its backend's is then inherited too
    (it reads the same, and follows the backend from then on)."""
    for k, value in reversed(changed):
        k.fp32_precision = "none"
        if k.fp32_precision != value:
            k.fp32_precision = value
