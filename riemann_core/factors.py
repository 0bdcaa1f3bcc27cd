"""Output-metric factors and their pullback through the network.

A factor is a tensor ``F`` of shape ``(N, r, C)``: ``r`` rows per sample whose Gram
``F_b^T F_b`` is that sample's metric ``M_b`` on the (flattened) output ``z_b``. The
stacked factor of the mean loss is ``L_o = F / sqrt(N)`` with ``d = N r`` rows, so that
``L_o^T L_o = (1/N) sum_b M_b``, the loss Hessian's output part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

LOSSES = ("cross_entropy", "mse")
OUTPUT_METRICS = ("exact", "sampled")

#: ``(outputs, targets) -> (N, r, C)``, a user-supplied per-sample factor.
FactorFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy_factor(logits: Tensor) -> Tensor:
    """Exact softmax Fisher with ``r = C - 1`` rows: ``F_b = H' diag(s)``, ``s = sqrt(p)``.

    ``M_b = diag(p) - p p^T = diag(s) (I - s s^T) diag(s)`` has rank ``C - 1`` (it
    annihilates the ones vector), so ``C - 1`` rows suffice. The Householder reflection
    ``H = I - v v^T / (1 + s_k)``, ``v = s + e_k`` (``|v|^2 = 2 (1 + s_k) >= 2``: stable
    for every ``p``), maps ``s`` to ``-e_k``, so its rows other than ``k`` are an
    orthonormal basis ``H'`` of the complement of ``s`` and
    ``F_b^T F_b = diag(s) H'^T H' diag(s) = diag(s) (I - s s^T) diag(s) = M_b``.
    ``k = C - 1`` (fixed, so no data-dependent choice). ``C = 1`` gives one zero row.
    """
    p = torch.softmax(logits, dim=1)
    C = p.shape[1]
    if C == 1:
        return torch.zeros_like(p)[:, None, :]
    s = p.sqrt()
    k = C - 1
    vs = p.clone()  # v_j s_j = p_j + [j = k] s_k
    vs[:, k] += s[:, k]
    head = s[:, :k]  # v_i = s_i for the kept rows i != k
    return torch.diag_embed(s)[:, :k] - head[:, :, None] * (vs / (1 + s[:, k:]))[:, None, :]


#: The most logits (``N C``) whose probabilities are drawn from in float64 (32 MiB), with
#: one search (:func:`sampled_cross_entropy_factor`); more are drawn from in their own
#: dtype (float32 at least), with two.
FLOAT64_DRAW_ENTRIES = 2**22


def sampled_cross_entropy_factor(logits: Tensor, samples: int, generator=None) -> Tensor:
    """Monte Carlo Fisher: rows ``(e_y - p) / sqrt(S)`` with ``y ~ Cat(p)``, ``r = S``.

    Unbiased: ``E[(e_y - p)(e_y - p)^T] = diag(p) - p p^T``. ``y`` is drawn by inverting
    the cumulative distribution at float64 uniform draws (``N S`` numbers;
    ``torch.multinomial`` reads values back to the host on a GPU to check them). Up to
    :data:`FLOAT64_DRAW_ENTRIES` logits (and float64 ones), ``p`` and its cumulative sum
    are float64: class ``c`` is drawn at ``p_c`` up to float64's rounding of the total
    (the rows are formed in float32 at least, as beyond).
    Beyond, ``p`` keeps the logits' dtype (float32 at least: no float64 copy of large
    logits), and ``u < 1/2`` is searched in the cumulative sum, ``u >= 1/2`` (as
    ``1 - u``) in the reversed one, the survival function: class ``c`` is drawn at
    ``p_c`` up to that dtype's rounding of the smaller of the mass up to ``c`` and the
    mass from ``c`` on, relative to ``p_c`` at the ends of the distribution and, with one
    dominant class, to the mass of the others, the metric's own size. (Found by review:
    float32 uniforms are multiples of ``2^-24``, and one float32 forward sum is ``eps``
    off of the total after a dominant class, so classes below ``6e-8`` were drawn at the
    wrong rate or never: at a logit gap of 18 over 10 classes the expected metric was 58%
    off. The two searches cost the 64-32-32-10 network's sampled step 3.5%, one search
    in float64 1.0%.)
    """
    if logits.dtype == torch.float64 or logits.numel() <= FLOAT64_DRAW_ENTRIES:
        p = torch.softmax(logits, dim=1, dtype=torch.float64)
        y = _draw(p, samples, generator)
    else:
        # float32 at least: bfloat16's uniforms took 128 values in [0.5, 1), and classes
        # between them were never drawn (found by review: 634 of 2000 in 16384 draws)
        p = torch.softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
        y = _draw_from_both_ends(p, samples, generator)
    # the rows in float32 at least, as before the float64 draw: float64 ones would be S
    # times the bound on p and copied again on the way out (found by review)
    p = p.to(torch.promote_types(logits.dtype, torch.float32))
    # one-hot by scatter (F.one_hot reads the class range back to the host), in place
    # throughout: a call of a few us each, on 1280 entries at batch 128
    rows = p.new_zeros(p.shape[0], samples, p.shape[1]).scatter_(2, y[..., None], 1.0)
    rows.sub_(p[:, None, :])
    if samples > 1:
        rows.div_(math.sqrt(samples))
    return rows.to(logits.dtype)


def _draw(p: Tensor, samples: int, generator) -> Tensor:
    """``samples`` classes per row of float64 ``p``, by one search in its cumulative sum."""
    cdf = p.cumsum(1)
    u = torch.rand((p.shape[0], samples), dtype=p.dtype, device=p.device, generator=generator)
    return torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).clamp_max_(p.shape[1] - 1)


def _draw_from_both_ends(p: Tensor, samples: int, generator) -> Tensor:
    """``samples`` classes per row of ``p`` (float32: too large for a float64 copy), the
    lower half of the uniforms searched in the cumulative sum, the upper in the reversed
    one (see :func:`sampled_cross_entropy_factor`)."""
    last = p.shape[1] - 1
    u = torch.rand((p.shape[0], samples), dtype=torch.float64, device=p.device, generator=generator)
    head = u < 0.5
    # the distance to the nearer end (exact: u is a multiple of 2^-53), scaled by each
    # sum's own total and rounded to its dtype: a relative rounding, as fine as the sum's.
    # The sums in turn, each of N C entries, and no float64 copy of them.
    w = torch.where(head, u, 1 - u)
    cdf = p.cumsum(1)
    y = torch.searchsorted(cdf, (w * cdf[:, -1:]).to(p.dtype), right=True).clamp_max_(last)
    del cdf
    # tail[:, j] the mass of the last j + 1 classes: 1 - u in [tail[j-1], tail[j]) draws
    # class C - 1 - j
    tail = p.flip(1).cumsum_(1)
    y_tail = torch.searchsorted(tail, w.mul_(tail[:, -1:]).to(p.dtype), right=True)
    del tail
    return torch.where(head, y, last - y_tail.clamp_max_(last))


#: The most entries the exact factor of a token-level cross-entropy may hold
#: (:func:`positions_cross_entropy_factor`; 2 GiB in float64), beyond which the sampled
#: metric is the way.
EXACT_POSITIONS_ENTRIES = 2**28


def positions_cross_entropy_factor(
    logits: Tensor, sampled: bool, samples: int = 1, generator=None
) -> Tensor:
    """Cross-entropy averaged over every position of ``(N, ..., C)`` logits (classes along
    the last dimension, as ``F.cross_entropy(logits.reshape(-1, C), targets.reshape(-1))``),
    as a factor ``(N, r, P C)`` of each sample's ``P`` positions flattened.

    A sample's metric is ``(1/P) blockdiag_t(diag(p_t) - p_t p_t^T)``. Exact: the factors of
    :func:`cross_entropy_factor` on the block diagonal, over ``sqrt(P)``: ``r = P (C - 1)``.
    Sampled: each probe one row holding every position's ``(e_y_t - p_t) / sqrt(P S)``,
    ``r = S``, unbiased: draws at different positions are independent with mean zero, so
    the blocks between positions vanish in expectation. ``P = 1`` is the ``(N, C)`` case.
    """
    N, C = logits.shape[0], logits.shape[-1]
    flat = logits.reshape(-1, C)
    P = flat.shape[0] // N
    if sampled:
        F = sampled_cross_entropy_factor(flat, samples, generator)
        if P == 1:
            return F
        return F.reshape(N, P, samples, C).transpose(1, 2).reshape(N, samples, P * C) / math.sqrt(P)
    F = cross_entropy_factor(flat)
    if P == 1:
        return F
    r = F.shape[1]
    entries = N * P * r * P * C
    if entries > EXACT_POSITIONS_ENTRIES:
        raise ValueError(
            f"the exact metric of cross-entropy over {P} positions of {C} classes keeps "
            f"{P * r} rows of {P * C} entries per sample: {entries:.2e} entries for {N} "
            f"samples (over {EXACT_POSITIONS_ENTRIES:.1e}), and as many rows to pull back. "
            "Pass output_metric='sampled' (one row per probe, a draw at every position)"
        )
    blocks = F.new_zeros(N, P, r, P, C)
    at = torch.arange(P, device=F.device)
    # advanced indices split by a slice come first: (P, N, r, C)
    blocks[:, at, :, at, :] = F.reshape(N, P, r, C).transpose(0, 1)
    return blocks.reshape(N, P * r, P * C) / math.sqrt(P)


def mse_factor(outputs: Tensor) -> Tensor:
    """``mse_loss`` (mean over all ``N C`` entries): ``M_b = (2 / C) I``, ``F_b = sqrt(2/C) I``."""
    N, C = outputs.shape
    eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device)
    return (math.sqrt(2.0 / C) * eye).expand(N, C, C)


def sampled_mse_factor(outputs: Tensor, samples: int, generator=None) -> Tensor:
    """Rows ``sqrt(2 / C) eps / sqrt(S)``, ``eps ~ N(0, I)``: unbiased for ``(2 / C) I``.

    ``eps`` is drawn in float32 at least and rounded to the outputs' dtype: torch draws
    half-precision normals by another algorithm, not the float32 draws rounded, so under
    autocast the same generator gave other rows (found on torch 2.8-2.11, where K-FAC's
    float16 direction came back 5-9% off the float32 one, another Monte Carlo draw; on
    2.12-2.13 wherever ``N S C`` is not a multiple of 16)."""
    N, C = outputs.shape
    drawn = torch.promote_types(outputs.dtype, torch.float32)
    eps = torch.randn((N, samples, C), dtype=drawn, device=outputs.device, generator=generator)
    return (eps * math.sqrt(2.0 / (C * samples))).to(outputs.dtype)


def output_factor(
    outputs: Tensor,
    targets: Tensor,
    *,
    loss: str,
    output_metric: str | FactorFn,
    samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample factor ``(N, r, C)`` of the output metric for ``loss``, ``C`` the size
    of one sample's outputs.

    ``outputs`` is ``(N, ...)`` and detached; for cross-entropy the classes lie along the
    last dimension (:func:`positions_cross_entropy_factor`). A callable ``output_metric``
    receives ``(outputs, targets)``, the outputs flattened to ``(N, C)``, and returns its
    own factor; its shape is checked here, its finiteness by the caller.
    """
    sampled = output_metric == "sampled"
    if loss == "cross_entropy" and not callable(output_metric):
        if outputs.shape[-1] == 1:
            raise ValueError(
                "loss='cross_entropy' on outputs of one class (last dimension 1): the softmax "
                "of one logit is constant, so its Fisher is zero and every direction would "
                "be the gradient over the damping. For one logit per label trained with "
                "binary cross-entropy (the mean BCEWithLogits over C labels), give the "
                "preconditioner its Bernoulli Fisher's factor, RiemannianPreconditioner(model, "
                "output_metric=lambda z, y: torch.diag_embed((torch.sigmoid(z) * "
                "torch.sigmoid(-z) / z.shape[1]).sqrt())), and your loss: "
                "pre.backward(F.binary_cross_entropy_with_logits(z, y)) (rc.direction takes "
                "only the losses of its `loss` option: there, give the model two logits)"
            )
        return positions_cross_entropy_factor(outputs, sampled, samples, generator)
    outputs = outputs.reshape(outputs.shape[0], -1)
    if callable(output_metric):
        # copies: a factor written with in-place operations (z.sub_(z.max()), exp_()) must
        # change neither the outputs the loss is formed from nor the caller's tensors
        # (found by a hunt: rc.direction took the gradient at the edited outputs, 0.07
        # off; pre.backward changed the user's logits)
        try:
            F = output_metric(
                outputs.clone(), targets.clone() if isinstance(targets, Tensor) else targets
            )
        except Exception as err:
            if targets is not None:
                raise
            # (found by review: torch.func's own error, about vmap over a None, was all a
            # factor that reads the targets got under pre.backward)
            raise ValueError(
                "the custom output_metric raised while called with targets=None: "
                "RiemannianPreconditioner never sees the targets (pre.backward takes the "
                "loss, pre.step() the gradient), so its output_metric must compute the "
                "factor from the outputs alone (the exact Fisher of the model's predictive "
                f"distribution needs none); it raised {type(err).__name__}: {err}"
            ) from err
        N, C = outputs.shape
        if (
            not isinstance(F, Tensor)
            or F.ndim != 3
            or F.shape[0] != N
            or F.shape[2] != C
            or not F.shape[1]
        ):
            shape = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
            raise ValueError(
                f"a custom output_metric must return a factor of shape (N, r, C) = "
                f"({N}, r, {C}) with r >= 1; it returned {shape}"
            )
        if not F.dtype.is_floating_point:  # (found by a hunt: a complex one was cast to
            # real, its imaginary part dropped, the direction 23-108x off)
            raise ValueError(
                f"a custom output_metric must return a real floating-point factor, got "
                f"{F.dtype}: for a complex F with F^H F = M, return the real factor "
                "torch.cat([F.real, F.imag], dim=1), whose F^T F is the same M"
            )
        return F.to(outputs.dtype)
    if sampled:
        return sampled_mse_factor(outputs, samples, generator)
    return mse_factor(outputs)


def factor_cotangents(factor: Tensor) -> Tensor:
    """The stacked factor ``L_o = F / sqrt(N)`` as ``r`` cotangents of shape ``(N, C)``:
    cotangent ``s`` holds every sample's row ``s``."""
    return factor.transpose(0, 1) / math.sqrt(factor.shape[0])


#: The half-precision dtypes of autocast.
HALF = (torch.float16, torch.bfloat16)
#: words of torch's errors for an operation that a batched backward pass cannot batch
UNBATCHABLE = ("Batching rule not implemented", "vmap: ")
#: the start of torch's error for an ``autograd.Function`` applied under ``vmap`` without
#: ``setup_context``: a module's backward hooks (torch's own such Function) or the user's,
#: in a checkpointed segment whose forward pass the batched backward runs again (found by
#: a hunt: torch's message, naming neither the hook nor the checkpoint)
UNBATCHABLE_FUNCTION = "In order to use an autograd.Function with functorch transforms"
#: words of torch's errors for a random draw under ``vmap`` (one for some operations, the
#: other for others: found by review, dropout raised the second with 4 classes or more): a
#: checkpointed segment's dropout, drawn again when the batched backward runs its forward
RANDOM_UNDER_VMAP = ("random operations inside of vmap", "called random operation while in")
#: the start of torch's error for a batched gradient written onto a tensor outside ``vmap``:
#: a tensor of the forward pass given ``retain_grad()`` (the debugging idiom
#: ``h.retain_grad(); self.h = h``), whose ``.grad`` torch accumulates in every backward
#: pass, ``torch.autograd.grad``'s batched ones too (found by review: ``rc.direction``
#: raised torch's message from the coupling probe, naming neither)
ESCAPED_FROM_VMAP = "Either your tensor may have escaped from inside a function being vmapped"
#: torch's error for a backward pass under ``vmap`` that asks whether a tensor is laid out
#: channels-last: ``GroupNorm``'s, on an input in that layout (a transpose reshaped back, as
#: diffusers' attention blocks leave their output: found by a hunt of its UNet2DModel,
#: torch's message at every call, naming neither)
CHANNELS_LAST_UNDER_VMAP = "querying is_contiguous inside of vmap for memory_format"


@contextmanager
def batched_backward() -> Iterator[None]:
    """A backward pass that pulls several rows back at once (``torch.func.vmap``,
    ``is_grads_batched``): torch's error for an operation of the graph it cannot batch (a
    gradient hook that reads a value to the host, a custom ``autograd.Function`` whose
    backward does) raised as one that names the cause and the fix (found by a hunt: a
    grad-norm logging hook failed every step with "Batching rule not implemented for
    aten::item"). Under ``torch.autograd.set_detect_anomaly(True)`` the pass runs with
    anomaly mode's NaN check off (its traces kept): that check reads every gradient to the
    host, which torch cannot batch (found by a hunt: every call was refused, blaming a
    hook), and every direction's NaN is checked here anyway."""
    anomaly = torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled()
    try:
        if anomaly:
            with torch.autograd.set_detect_anomaly(True, check_nan=False):
                yield
        else:
            yield
    except RuntimeError as err:
        if str(err).startswith(UNBATCHABLE_FUNCTION):
            raise ValueError(
                "the backward pass cannot run batched, as riemann_core runs it to pull the "
                "metric's factor rows back several at once (torch.func.vmap): an "
                "autograd.Function without a setup_context staticmethod is applied inside it, "
                "where torch cannot run one. A segment under torch.utils.checkpoint runs its "
                "forward pass again there, with a module's backward hook "
                "(register_full_backward_hook or register_full_backward_pre_hook: torch's own "
                "such Function) or your own Function in it; or a custom Function's backward "
                "applies one. Remove the hook while preconditioning, call that module outside "
                "the checkpointed segment, or give the Function a setup_context (torch: "
                f"{str(err).splitlines()[0]})"
            ) from err
        # (found by a hunt: a checkpointed dropout was blamed on hooks or .item())
        if any(words in str(err) for words in RANDOM_UNDER_VMAP):
            raise ValueError(
                "the backward pass cannot run batched, as riemann_core runs it to pull the "
                "metric's factor rows back several at once (torch.func.vmap): a segment under "
                "torch.utils.checkpoint draws random numbers (dropout, a random layer) in its "
                "forward pass, which the backward pass runs again, where torch cannot draw "
                "them; or a gradient hook of yours draws them (gradient noise, "
                "h.register_hook(lambda g: g + s * torch.randn_like(g)), registered in "
                "forward: it runs on the metric's rows too). Call the random module outside "
                "the checkpointed segment (dropout after it, or before), or checkpoint a "
                "segment without one; model.eval() turns dropout off; remove such a hook "
                "and add the noise to the direction after pre.backward or pre.step() "
                f"(torch: {str(err).splitlines()[0]})"
            ) from err
        if CHANNELS_LAST_UNDER_VMAP in str(err):
            raise ValueError(
                "the backward pass cannot run batched, as riemann_core runs it to pull the "
                "metric's factor rows back several at once (torch.func.vmap): a module's "
                "backward (nn.GroupNorm's) meets an input in channels-last memory format (a "
                "transpose reshaped back: diffusers' attention blocks leave their output so), "
                "where torch cannot batch it. Give such modules contiguous inputs, e.g. for "
                "each nn.GroupNorm m of the model, m.register_forward_pre_hook(lambda m, a: "
                "(a[0].contiguous(),)) (the same values: the direction is exact) (torch: "
                f"{str(err).splitlines()[0]})"
            ) from err
        if str(err).startswith(ESCAPED_FROM_VMAP):
            raise ValueError(
                "the backward pass cannot run batched, as riemann_core runs it to pull the "
                "metric's factor rows back several at once (torch.func.vmap): a tensor of the "
                "forward pass keeps its gradient (h.retain_grad(), as for a plot: "
                "self.h = h), and torch writes every backward pass's gradient into its .grad, "
                "a batched one too, which cannot be stored there (or a gradient hook of yours "
                "stores the gradient it is given elsewhere). Call retain_grad() only in the "
                "forward passes whose gradient you read, behind a flag of your own that is off "
                "while rc.direction runs; "
                "loss.backward() then pre.step() preconditions the .grad of a pass with "
                f"retain_grad() (torch: {str(err).splitlines()[0]})"
            ) from err
        if not any(word in str(err) for word in UNBATCHABLE):
            raise
        raise ValueError(
            "the backward pass cannot run batched, as riemann_core runs it to pull the "
            "metric's factor rows back several at once (torch.func.vmap): a gradient hook on "
            "it (a module's register_full_backward_hook or register_full_backward_pre_hook, "
            "a tensor's register_hook) or a custom autograd.Function's backward calls an "
            "operation that cannot be batched (.item(), float(), .tolist(), .detach(), a "
            "printed value). Read gradients after the call instead (each parameter's .grad "
            "after pre.backward(loss) or pre.step()), or remove the hook while "
            f"preconditioning (torch: {str(err).splitlines()[0]})"
        ) from err


#: the start of torch's error for a reentrant checkpoint's backward under autograd.grad
REENTRANT_CHECKPOINT = "When use_reentrant=True, torch.utils.checkpoint is incompatible"


@contextmanager
def reentrant_checkpoint_refused() -> Iterator[None]:
    """torch's error for a backward pass through ``torch.utils.checkpoint`` with
    ``use_reentrant=True`` inside the model raised as one that names it and the fix (found
    by a hunt: torch's message speaks of ``.grad()``, which the user never called)."""
    try:
        yield
    except RuntimeError as err:
        # torch's own message only: another rank's failure, shared with this one as a
        # DistributedError, quotes it and must reach the caller as it is (found by review)
        if not str(err).startswith(REENTRANT_CHECKPOINT):
            raise
        raise ValueError(
            "the model's forward pass runs torch.utils.checkpoint with use_reentrant=True, "
            "whose backward torch runs only inside loss.backward(), not for "
            "torch.autograd.grad, with which riemann_core pulls the metric's factor rows "
            "back: pass use_reentrant=False to checkpoint (the variant torch recommends; "
            "it recomputes the same activations)"
        ) from err


def pullback(
    roots: Sequence[Tensor],
    seeds: Sequence[Tensor],
    targets: Sequence[Tensor],
    retain_graph: bool = True,
    batched: bool = True,
) -> list[Tensor]:
    """Pull ``k`` cotangents back from ``roots`` to each of ``targets``: cotangent ``j``
    seeds ``roots[i]`` with ``seeds[i][j]`` (shape ``(k, *roots[i].shape)``).

    ``L_{a-1} = L_a A_a`` is backprop with the factor rows as cotangents. For a network
    that treats samples independently, row ``s`` of every sample can share one backward
    pass, so this runs ``r`` backward passes, not ``d = N r``: vectorised with
    ``torch.func.vmap`` (``batched``: one product of ``k N`` rows per layer), or one after
    another (fewer tensor operations than vmap's batching adds, which matters only for
    small networks). Returns, per target, a tensor ``(k, *target.shape)``; a target outside
    the autograd graph of the roots (computed under ``torch.no_grad``), or one they do not
    reach (a module's output that is discarded), gets zeros.
    """
    reached = [t for t in targets if t.requires_grad]
    unreached: set[int] = set()  # positions in reached of targets the roots do not reach

    def backward(*cotangents, retain=retain_graph):
        grads = torch.autograd.grad(
            roots, reached, cotangents, retain_graph=retain, allow_unused=True
        )
        # a module whose output is discarded: vmap returns tensors only, so a placeholder
        unreached.update(i for i, g in enumerate(grads) if g is None)
        return tuple(
            torch.zeros_like(t) if g is None else g for t, g in zip(reached, grads, strict=True)
        )

    # torch.func.vmap: batching rules for the backward ops (is_grads_batched's older vmap
    # loops over the rows for some, e.g. tanh_backward). Not for a graph that ran under
    # autocast: vmap's rules for a norm's backward fed half-precision inputs fail on the
    # mixed dtypes, where is_grads_batched's do not (found by a hunt: LayerNorm, eval
    # BatchNorm under bfloat16 autocast raised torch's "expected scalar type")
    k = seeds[0].shape[0]
    if batched and any(t.dtype in HALF for t in reached):
        with batched_backward():
            grads = torch.autograd.grad(
                roots, reached, seeds, retain_graph=retain_graph, allow_unused=True,
                is_grads_batched=True,
            )  # fmt: skip
        unreached.update(i for i, g in enumerate(grads) if g is None)
    elif batched:
        with batched_backward():
            grads = torch.func.vmap(backward)(*seeds)
    else:  # the graph kept for every pass but the last, unless the caller keeps it
        each = [
            backward(*(s[j] for s in seeds), retain=retain_graph or j < k - 1) for j in range(k)
        ]
        grads = [torch.stack(g) for g in zip(*each, strict=True)]
    found = {
        id(t): g for i, (t, g) in enumerate(zip(reached, grads, strict=True)) if i not in unreached
    }
    return [
        g.detach()  # autograd.grad hands a root's own seed back for a root among the targets
        if (g := found.get(id(t))) is not None
        else torch.zeros((k,) + t.shape, dtype=t.dtype, device=t.device)
        for t in targets
    ]
