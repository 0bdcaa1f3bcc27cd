"""A solve whose matrices the allocator cannot hold, or the factor rows before it, as a
``MemoryError`` that names the matrix or the rows, their size and what to use instead (the
allocator's own message names a byte count only).

The largest matrix of each method: ``full`` the ``n x n`` metric of all ``n`` trained
parameters; ``natural`` the ``d x d`` Gram of all ``d = N r`` factor rows (``N`` samples,
``r`` rows each: ``C - 1`` for the exact cross-entropy Fisher, ``samples`` for the sampled
one); ``layerwise`` per block the smaller of its ``n_a x n_a`` metric and its ``d x d``
Gram. K-FAC's factors grow with the layers' widths alone, the euclidean method forms none.

Before any solve, every method but the euclidean one forms the output metric's factor, ``r``
rows for each of the ``N`` samples, and pulls its ``N r`` rows back through the network
(:func:`named_when_rows_too_large`): ``r`` times a backward pass's memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..modules import named_block

if TYPE_CHECKING:  # (_base names its failures with this module)
    from ._base import Options, Problem

#: The methods whose matrices grow with the parameters or the factor rows.
SIZED = ("full", "natural", "layerwise")


class TooLargeError(MemoryError, RuntimeError):
    """The allocator's failure named by :func:`named_when_too_large`: a ``MemoryError``
    that is still a ``RuntimeError``, as the allocator's own was (code that catches the
    allocator's failure by type, e.g. to retry on a smaller batch, still catches it)."""


class TooLargeOnDeviceError(TooLargeError, torch.cuda.OutOfMemoryError):
    """:class:`TooLargeError` from a device allocator's ``torch.OutOfMemoryError``: still
    one (found by review: ``riemann_core.scaling.sweep`` recorded a layerwise or natural
    point that ran out of CUDA memory as ``error``, not ``oom``, and skipped its
    ``empty_cache``)."""


def allocator_failed(error: BaseException) -> bool:
    """Whether ``error`` is the CPU or CUDA allocator's failure to allocate."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


@contextlib.contextmanager
def named_when_too_large(problem: Problem, method: str) -> Iterator[None]:
    """Inside the block, the allocator's failure in a solve of ``method`` on ``problem``
    becomes a ``MemoryError`` (:func:`too_large`); any other error passes as it was."""
    try:
        yield
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one too
        if method not in SIZED or not problem.handlers or not allocator_failed(error):
            raise
        raise named(error, too_large(problem, method)) from error


@contextlib.contextmanager
def named_when_rows_too_large(
    outputs: torch.Tensor,
    opts: Options,
    r: int | None = None,
    pulled: Sequence[torch.Tensor] = (),
    converted: torch.dtype | None = None,
) -> Iterator[None]:
    """Inside the block, the allocator's failure becomes a ``MemoryError`` naming the rows
    and the fix (found by a hunt: ``samples=10**12`` gave the allocator's byte count only).
    The block forms the output metric's factor of ``outputs`` (its cotangents included);
    with ``pulled`` (the module outputs), pulls its ``r`` rows back to them (``r`` known:
    a custom metric's); with ``converted``, converts the pulled-back rows to that dtype
    (``solve_dtype``, or the parameters' from autocast's half precision)."""
    try:
        yield
    except RuntimeError as error:
        if not allocator_failed(error):
            raise
        raise named(error, rows_too_large(error, outputs, opts, r, pulled, converted)) from error


def rows_too_large(error, outputs, opts, r, pulled, converted) -> str:
    """The message of :func:`named_when_rows_too_large`: what ran out of memory, the rows'
    sizes (the allocator's own count beside them: one far from both points elsewhere, e.g.
    a backward hook of the user's; found by review) and the fix."""
    N, C = outputs.shape[0], outputs[:1].numel()
    known, why = factor_rows(outputs, opts)
    r = known if r is None else r
    if converted is not None:
        doing = f"converting the pulled-back rows to {converted}"
    elif pulled:
        doing = "pulling the output metric's factor back through the network"
    else:
        doing = "forming the output metric's factor"
    sizes = [f"{N} samples x {'r' if r is None else f'r = {r}'} rows ({why})"]
    if r is not None:
        dtype = outputs.dtype
        if opts.loss == "cross_entropy" and opts.output_metric == "sampled":
            dtype = torch.promote_types(dtype, torch.float32)  # (drawn in float32 at least)
        sizes.append(f"the factor {gib(N * r * C * dtype.itemsize)} in {dtype}")
        if pulled:  # (the loss gradient rides along as one more row)
            dtype = converted or pulled[0].dtype
            rows = (r + 1) * sum(t.numel() for t in pulled) * dtype.itemsize
            sizes.append(
                f"its {r + 1} rows at the modules' outputs at least {gib(rows)} in {dtype}"
            )
    fixes = ["solve_dtype=None"] if converted is not None and opts.solve_dtype == converted else []
    if r is None or r > 1:  # (at r = 1 fewer rows is no fix: found by review)
        fixes.append("output_metric='sampled' with few samples (r = samples, 1 by default)")
    fixes.append("a smaller batch")
    fix = ", ".join(fixes[:-1]) + (", or " if len(fixes) > 1 else "") + fixes[-1]
    allocator = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"the {outputs.device} device ran out of memory {doing}: {'; '.join(sizes)}; use "
        f"{fix} (the allocator: {allocator})"
    )


def gib(bytes_: int) -> str:
    """``bytes_`` in GiB, or MiB under 0.1 GiB (found by review: "0.0 GiB")."""
    if bytes_ < 2**30 / 10:
        return f"{bytes_ / 2**20:.3g} MiB"
    return f"{bytes_ / 2**30:.1f} GiB"


def factor_rows(outputs: torch.Tensor, opts: Options) -> tuple[int | None, str]:
    """The rows ``r`` of each sample's factor of the output metric of ``outputs`` (``None``
    for a custom one's, unknown before it returns), and whence."""
    if callable(opts.output_metric):
        return None, "the custom output_metric's rows"
    if opts.output_metric == "sampled":
        return opts.samples, f"samples={opts.samples}"
    if opts.loss == "mse":
        C = outputs[:1].numel()
        return C, f"C = {C} outputs per sample for the exact metric of squared error"
    C = outputs.shape[-1]
    P = outputs[:1].numel() // C
    if P == 1:
        return C - 1, "C - 1 for the exact cross-entropy Fisher"
    return P * (C - 1), f"T (C - 1) for the exact cross-entropy Fisher of T = {P} positions"


def named(error: RuntimeError, message: str) -> TooLargeError:
    """The allocator's ``error`` as :class:`TooLargeError` (from a device, as
    :class:`TooLargeOnDeviceError`) with ``message``."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return TooLargeOnDeviceError(message)
    return TooLargeError(message)


def too_large(problem: Problem, method: str) -> str:
    """What ``method`` forms on ``problem`` that the allocator could not hold, and what
    to use instead."""
    h0 = problem.handlers[0]

    def where(h) -> str:
        return f"the {h.device} device could not allocate it"

    def square(m: int, h) -> str:
        return f"{gib(m * m * h.dtype.itemsize)} in {h.dtype}"

    if method == "full":
        n = sum(h.block.n_params for h in problem.handlers)
        return (
            f"method='full' forms the {n} x {n} metric of all {n} trained parameters "
            f"({square(n, h0)}) and {where(h0)}; use method='layerwise' (a metric block per "
            "layer) or method='kfac', or train fewer parameters"
        )

    def rows(h) -> str:
        return (
            f"d = N r = {h.N} x {h.r} factor rows ({h.N} samples, {h.r} rows each: C - 1 "
            "for the exact cross-entropy Fisher, T (C - 1) for (N, T, C) token outputs, at "
            "most `samples` for the sampled one)"
        )

    fix = (
        "use output_metric='sampled' with few samples (r = samples, 1 by default), a "
        "smaller batch, or method='kfac' (factors of each layer's widths, whatever the batch)"
    )
    if method == "natural":
        d = h0.d
        return (
            f"method='natural' forms the {d} x {d} Gram of all {rows(h0)} ({square(d, h0)}) and "
            f"{where(h0)}; {fix}"
        )
    # (the order each block is solved at, n_a or d, is the cheaper one; blocks of equal d
    # are factorised together: the size is the least the solve needs, found by review)
    h = max(problem.handlers, key=lambda h: min(h.block.n_params, h.d))
    m, n = min(h.block.n_params, h.d), h.block.n_params
    return (
        f"method='layerwise' solves each block through its n_a x n_a metric or its Gram of "
        f"{rows(h)}; the largest, {named_block(h.block.name)} ({n} parameters), needs at least "
        f"a {m} x {m} matrix ({square(m, h)}) and {where(h)}; {fix}"
    )
