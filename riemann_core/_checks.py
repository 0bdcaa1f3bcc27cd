"""Validation of options and data: every error names the problem and the fix.

Checks of values on the device (finiteness, class indices) are *deferred*: each is a
device scalar registered with a :class:`Deferred`, and :meth:`Deferred.run` reads them
all back in one transfer, so that a direction costs a couple of host synchronisations
instead of one per tensor. Only a failing check takes the slow path that re-examines
the data and names the culprit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from numbers import Integral, Real

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.nn.parameter import is_lazy

from .factors import LOSSES, OUTPUT_METRICS
from .modules import KERNELS, STRUCTURED, forward_replaced, named_module

#: The most refinement steps: each costs a float64 residual, and the iteration either
#: converges in a few or not at all (``eps(solve dtype) cond(G) >= 1``).
MAX_REFINE = 100


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_damping(damping) -> None:
    if isinstance(damping, bool) or not isinstance(damping, Real):
        raise TypeError(f"damping must be a positive real number, got {type(damping).__name__}")
    try:
        finite = math.isfinite(damping)
    except OverflowError:  # an integer past float's range
        finite = False
    if not finite or damping <= 0:
        raise ValueError(
            f"damping must be positive and finite (it is mu in mu I + K^T K), got {damping!r}; "
            "use e.g. damping=1e-3"
        )


def damping_vanishes(damping: float, dtype: torch.dtype) -> bool:
    """Whether ``damping`` is 0 in ``dtype``: half its smallest subnormal, or less, rounds
    to 0 (shared with the studies, which refuse such a damping before they train)."""
    info = torch.finfo(dtype)
    return damping <= info.smallest_normal * info.eps / 2


def check_damping_fits(damping: float, params, solve_dtype: torch.dtype | None) -> None:
    """Refuse a ``damping`` past the largest number of the dtype the metric is formed in
    (``solve_dtype``, else each parameter's): ``mu I`` would be inf there (found by a
    hunt: a float32 model at damping 1e39 gave SolveError naming NaN in the Gram, a raw
    LinAlgError under ``full``, and under ``kfac`` a zero direction)."""
    dtypes = {solve_dtype} if solve_dtype is not None else {p.dtype for _, p in params}
    for dtype in sorted(dtypes, key=lambda d: torch.finfo(d).max):
        if damping_vanishes(damping, dtype):  # (found by a hunt: 1e-46 in float32 was
            raise ValueError(  # refused by the solve, after the backward pass)
                f"damping {damping:g} is 0 in {dtype} (below its smallest subnormal), the "
                "dtype the metric mu I + K^T K is formed in: mu I would vanish. Use a damping "
                "the model's dtype holds (or solve_dtype=torch.float64)"
            )
        if damping > torch.finfo(dtype).max:
            raise ValueError(
                f"damping {damping:g} exceeds the largest {dtype} ({torch.finfo(dtype).max:.3g}), "
                "the dtype the metric mu I + K^T K is formed in: it would be inf there. Use a "
                "damping the model's dtype holds (or solve_dtype=torch.float64)"
            )


def check_options(
    *,
    method,
    methods,
    loss,
    damping,
    output_metric,
    samples,
    kernel,
    solve_dtype,
    refine=0,
    check_coupling=True,
) -> None:
    """Options that can be checked before any work."""
    check_choice("method", method, methods)
    check_choice("loss", loss, LOSSES)
    check_choice("kernel", kernel, KERNELS)
    if not callable(output_metric):
        check_choice("output_metric", output_metric, OUTPUT_METRICS)
    check_damping(damping)
    if isinstance(samples, bool) or not isinstance(samples, Integral) or samples < 1:
        raise ValueError(f"samples must be a positive integer (probes per sample), got {samples!r}")
    if (
        isinstance(refine, bool)
        or not isinstance(refine, Integral)
        or not 0 <= refine <= MAX_REFINE
    ):
        raise ValueError(
            f"refine must be a non-negative integer of at most {MAX_REFINE} (refinement "
            f"steps; a few suffice where refinement converges at all), got {refine!r}"
        )
    if refine and method in ("euclidean", "kfac"):
        raise ValueError(
            f"refine={refine} does not apply to method={method!r} (refinement is of the "
            "solves of layerwise, full and natural; euclidean solves nothing and K-FAC's "
            "Kronecker solves are not refined): drop refine, or use one of those methods"
        )
    if solve_dtype is not None and solve_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"solve_dtype must be None, torch.float32 or torch.float64, got {solve_dtype}"
        )
    if not (isinstance(check_coupling, bool) or check_coupling == "always"):
        error = ValueError if isinstance(check_coupling, str) else TypeError
        raise error(
            f"check_coupling must be True (probe when the structure changes), 'always' (every "
            f"call) or False, got {check_coupling!r}"
        )


# ------------------------------------------------------------------ deferred checks


def to_host(scalars: list[Tensor]) -> list[float]:
    """The values of device scalars, read with one transfer per device (a host sync each)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(scalars):
        by_device.setdefault(t.device, []).append(i)
    values = [math.nan] * len(scalars)
    with torch.no_grad():
        for indices in by_device.values():
            # stack promotes the dtypes (booleans, counts, float32 and float64 values) to
            # one; a one-element tensor of another shape is read as its single entry
            joined = torch.stack([_scalar(scalars[i]) for i in indices])
            for i, v in zip(indices, joined.tolist(), strict=True):
                values[i] = v
    return values


def _scalar(t: Tensor) -> Tensor:
    return t if t.ndim == 0 else t.reshape(())


class Reading:
    """A device scalar's value on the host, once :meth:`Deferred.run` has read it."""

    value: float = math.nan


class Deferred:
    """Checks decided on the device and read back together, one host sync per :meth:`run`.

    A check is a device scalar and a callback that receives its host value; a failing
    check's callback re-examines the data exactly (it may sync) and raises the error that
    names the cause. Callbacks run in the order the checks were registered, so data
    errors come before the errors they would cause further on.
    """

    def __init__(self):
        self._pending: list[tuple[Tensor | None, Callable[[float | None], None]]] = []

    def require(self, ok: Tensor, explain: Callable[[], None]) -> None:
        """``explain()`` is called when ``ok`` (a 0-dim boolean) is false."""

        def callback(value: float) -> None:
            if not value:
                explain()

        self._pending.append((ok, callback))

    def finite(self, what: str, tensor: Tensor, fix: str, error: type = ValueError) -> None:
        """``tensor`` has no NaN or inf; the message names ``what`` and the ``fix``."""
        if tensor.is_floating_point():
            # its sum is read (no mask allocated): NaN and inf carry over, and a sum that
            # overflows with finite entries is re-checked exactly
            def callback(value: float) -> None:
                if not math.isfinite(value):
                    check_finite(what, tensor, fix, error)

            value = tensor.detach()
            self._pending.append((value if value.numel() == 1 else value.sum(), callback))

    def no_nan(self, what: str, tensor: Tensor, fix: str, positive_inf: bool = False) -> None:
        """``tensor`` has no NaN, and no ``+inf`` where ``positive_inf`` (``inf`` otherwise
        allowed: an additive attention mask's ``-inf``, a distance of unreachable nodes);
        read as :meth:`finite` reads, its entries examined only where the sum is not
        finite."""
        if tensor.is_floating_point():

            def callback(value: float) -> None:
                if math.isfinite(value):
                    return
                bad = tensor.isnan() | tensor.isposinf() if positive_inf else tensor.isnan()
                count = int(bad.sum())
                if count:
                    kinds = "NaN or +inf" if positive_inf else "NaN"
                    raise ValueError(f"{what} contains {count} {kinds} entries; {fix}")

            value = tensor.detach()
            self._pending.append((value if value.numel() == 1 else value.sum(), callback))

    def finite_all(
        self,
        items: list[tuple[str, Tensor]],
        fix: str,
        error: type = ValueError,
        shown_in: list[Tensor] | None = None,
    ) -> None:
        """Every tensor of ``items`` (``(what, tensor)``) has no NaN or inf: one reading per
        device (the sum of their sums; a sum that overflows is re-checked exactly), the culprit
        named on failure. Per-tensor sums run on all cores; on a 2-core CPU they took
        0.5-0.8x the time of ``foreach`` 2-norms for the parameters of MLPs with 6 to 82
        tensors (0.29 against 0.59 ms for 784-1024-1024-10). ``shown_in``: tensors read in
        their place, which every NaN or inf of theirs makes non-finite
        (:func:`~riemann_core.modules.shows_parameters`); the items are examined only where
        those read non-finite, and an error raised only for a non-finite item.

        One reading per device, not one per tensor: :func:`to_host` stacks the readings of
        a :meth:`run`, booleans among them, and a stack of mixed dtypes is not one batched
        copy (CUDA's ``cat`` then copies every entry on its own: a launch per tensor, where
        the stack and sum here are two; on the CPU a run's checks took 1.25x the time with
        42 readings in place of one, found by review of 037bd16)."""
        shown = [t for _, t in items] if shown_in is None else shown_in
        tensors = [t for t in shown if t.is_floating_point()]
        if not tensors:
            return
        examined = False

        def callback(value: float) -> None:
            nonlocal examined  # one callback per device: the items examined once
            if not (examined or math.isfinite(value)):
                examined = True
                for what, tensor in items:
                    check_finite(what, tensor, fix, error)

        by_device: dict[torch.device, list[Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        with torch.no_grad():  # parameters: no graph for their sums
            for group in by_device.values():  # one reading per device
                self._pending.append((torch.stack([t.sum() for t in group]).sum(), callback))

    def read(self, value: Tensor) -> Reading:
        """A :class:`Reading` whose ``value`` is set by the next :meth:`run`."""
        reading = Reading()
        self._pending.append((value, lambda v: setattr(reading, "value", v)))
        return reading

    def then(self, action: Callable[[], None]) -> None:
        """``action()`` runs once every check registered before it has passed."""
        self._pending.append((None, lambda _: action()))

    def run(self) -> None:
        """Read every pending check in one transfer, then call the callbacks in order."""
        pending, self._pending = self._pending, []
        values = iter(to_host([t for t, _ in pending if t is not None]))
        for t, callback in pending:
            callback(None if t is None else next(values))


#: K-FAC's variants: damping of the Kronecker product, and where the bias goes.
KFAC_OPTIONS = {"kfac_damping": ("exact", "factored"), "kfac_bias": ("joint", "separate")}


def check_kfac_options(method: str, **options) -> None:
    """K-FAC's options take one of their values, and only with ``method="kfac"``."""
    for name, value in options.items():
        check_choice(name, value, KFAC_OPTIONS[name])
        if method != "kfac" and value != KFAC_OPTIONS[name][0]:
            raise ValueError(
                f"{name}={value!r} is an option of method='kfac', not of method={method!r}; "
                f"drop it, or pass method='kfac'"
            )


def check_refresh(refresh, decay) -> None:
    """The preconditioner's K-FAC schedule: decompositions every ``refresh`` steps,
    factors averaged with weight ``decay`` on the past."""
    if isinstance(refresh, bool) or not isinstance(refresh, Integral) or refresh < 1:
        raise ValueError(
            f"kfac_refresh must be a positive integer (steps between factorisations), "
            f"got {refresh!r}"
        )
    if isinstance(decay, bool) or not isinstance(decay, Real) or not 0 <= decay < 1:
        raise ValueError(
            f"kfac_decay must be a number in [0, 1) (the running average's weight on past "
            f"factors; 0 uses each step's own), got {decay!r}"
        )


#: What a non-finite parameter asks of the caller.
PARAMETER_FIX = "reset or reinitialise the model"

#: What a non-finite gradient asks of the caller.
OVERFLOW_FIX = (
    "the loss or its backward overflowed (a loss scaled by torch.amp.GradScaler: pass the "
    "scaler to the RiemannianPreconditioner as grad_scaler, and the scaler skips the step)"
)


class GradientOverflow(FloatingPointError):
    """The gradient of a loss scaled by an enabled ``torch.amp.GradScaler`` overflowed:
    raised by the checks of a preconditioner built with ``grad_scaler``, which hands the
    step to the scaler to skip instead of refusing it."""


class DirectionOverflow(FloatingPointError):
    """A solve gave a direction with NaN or inf entries (or entries past the parameters'
    dtype). Beside a ``torch.amp.GradScaler`` at a scale above 1 it is the scaled
    direction ``S G^{-1} g`` that overflowed, with a finite scaled gradient (a scale grown
    over a long bfloat16 run, a float16 model's narrow range): the preconditioner hands the
    step to the scaler to skip, which lowers the scale, as for an overflowed gradient."""


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite; a sum (no mask allocated) decides the usual case."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())  # the sum may overflow with finite entries


def check_finite(what: str, tensor: Tensor, fix: str, error: type = ValueError) -> None:
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise error(f"{what} contains {bad} NaN or inf entries; {fix}")


# ----------------------------------------------------------------------- the model


def _check_not_scripted(name: str, module: nn.Module) -> None:
    """Refuse TorchScript that hides trainable modules' calls (found by a hunt: torch's raw
    refusal of a hook; by review: a traced container's submodules run inside its graph,
    and their missing calls were blamed on the user's code). A traced leaf (its own
    parameters only) is called, and hooked, like any module."""
    if not isinstance(module, torch.jit.ScriptModule):  # (no walk: it runs at every call)
        return
    scripted = isinstance(module, torch.jit.RecursiveScriptModule)
    traced = not scripted
    inner = [p for child in module.children() for p in child.parameters()]
    if (scripted and any(p.requires_grad for p in module.parameters())) or (
        traced and any(p.requires_grad for p in inner)
    ):
        how = "torch.jit.script" if scripted else "torch.jit.trace of a module with submodules"
        raise TypeError(
            f"{named_module(name)} is TorchScript ({how}), whose trainable modules run without "
            "Python hooks, so their calls cannot be seen: pass the original nn.Module "
            "(torch.compile'd modules are fine; a traced leaf such as a traced nn.Linear "
            "works with kernel='auto'), or set requires_grad=False on each of its parameters"
        )


def unprobed(opts) -> str | None:
    """``check_model``'s ``unprobed_kernel`` for options ``opts``."""
    return None if opts.check_coupling else opts.kernel


def _check_forward_probed(name: str, module: nn.Module) -> None:
    """Refuse, where the coupling probe is skipped, a trained module of a structured kernel
    whose ``forward`` was replaced on the instance: the kernel assumes its class's forward
    (``W x + b``, a norm's ``xhat * w + b``), which nothing then checks (found by a hunt: with check_coupling=False a
    Linear whose forward doubled its weight was 0.26 off, silently). The probe checks it
    (accelerate's device hooks pass, a scaled weight is refused)."""
    if type(module) not in STRUCTURED or "forward" not in vars(module):  # (per call: cheap first)
        return
    trained = any(p.requires_grad for p in module.parameters(recurse=False))
    if trained and forward_replaced(module):
        raise ValueError(
            f"{named_module(name, module)} has a forward replaced on the "
            "instance, and check_coupling=False skips the probe that checks it computes what "
            "the structured kernel assumes (its class's forward): keep check_coupling=True "
            "(the default), or pass kernel='auto' (the generic kernel for such a module; not "
            "with method='kfac', whose factors assume its class's forward)"
        )


def check_model(
    model: nn.Module,
    checks: Deferred | None = None,
    shown: Collection[int] = (),
    unprobed_kernel: str | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters, after checking the model can be handled at all.

    Their finiteness is registered with ``checks`` (checked at once without it), but for
    the parameters whose ids are in ``shown``, which the caller reads off their modules'
    outputs (:meth:`Deferred.finite_all`'s ``shown_in``). ``unprobed_kernel``: the kernel
    option of a call that skips the coupling probe (``check_coupling=False``): under
    ``"structured"`` a forward replaced on the instance is refused (:func:`_check_forward_probed`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}), which runs its submodules "
            "without Python hooks, so no module call can be seen; pass the original nn.Module "
            "(torch.compile'd modules are fine)"
        )
    for name, module in model.named_modules():
        _check_not_scripted(name, module)
        if unprobed_kernel == "structured":
            _check_forward_probed(name, module)
        # (buffers too: a LazyBatchNorm1d(affine=False) has no parameters, and a direction's
        # passes copied its buffers, which raised inside torch; found by a hunt)
        lazy = [
            what
            for what, tensors in (("parameters", module._parameters), ("buffers", module._buffers))
            if any(is_lazy(t) for t in tensors.values())
        ]
        if lazy:
            raise ValueError(
                f"{named_module(name, module)} has uninitialized {lazy[0]} (a "
                "lazy module, shaped by its first call): run the model once, model(x), "
                "before constructing the preconditioner or computing a direction"
            )
        # (parametrize registers its ModuleDict as a submodule: looked up there, not by
        # is_parametrized's getattr, which raises and catches for every other module)
        parametrized = "parametrizations" in module._modules
        if (
            parametrized
            and isinstance(module.parametrizations, nn.ModuleDict)
            and any(p.requires_grad for p in module.parametrizations.parameters())
        ):
            raise ValueError(
                f"{named_module(name, module)} is parametrized "
                f"({', '.join(module.parametrizations)} computed by "
                "torch.nn.utils.parametrize, e.g. weight_norm): its trainable parameters reach "
                "the output through the parametrization, which no kernel sees. Remove it "
                "(parametrize.remove_parametrizations) or freeze its parameters"
            )
        hooked = [type(h).__name__ for h in module._forward_pre_hooks.values()]
        hooked = [h for h in hooked if h in ("WeightNorm", "SpectralNorm")]
        if hooked and any(p.requires_grad for p in module.parameters(recurse=False)):
            raise ValueError(
                f"{named_module(name, module)} has a {hooked[0]} hook "
                "(torch.nn.utils.weight_norm or spectral_norm): a pre-hook computes its weight "
                "from other parameters before every call, a path no kernel sees. Remove it "
                "(torch.nn.utils.remove_weight_norm / remove_spectral_norm) or freeze the "
                "module's parameters"
            )
        if (
            isinstance(module, nn.Embedding | nn.EmbeddingBag)
            and module.scale_grad_by_freq
            and module.weight.requires_grad
        ):
            raise ValueError(
                f"{named_module(name, module)} has scale_grad_by_freq=True: its "
                "backward divides each row's gradient by the token's count in the batch, so "
                "the gradient is not the derivative of the loss (and couples the samples), "
                "and no metric matches it. Build it with scale_grad_by_freq=False"
            )
        embedding = isinstance(module, nn.Embedding | nn.EmbeddingBag)
        if embedding and module.sparse and module.weight.requires_grad:  # (found by a hunt:
            raise ValueError(  # the euclidean method raised torch's own error)
                f"{named_module(name, module)} has sparse=True: its gradient is "
                "a sparse tensor, and every method writes a dense direction (the euclidean "
                "one too). Build it with sparse=False"
            )
        if embedding and module.max_norm is not None:  # (frozen too: its weight changes)
            raise ValueError(
                f"{named_module(name, module)} has max_norm={module.max_norm:g}: "
                "it renormalises its weight in place at every forward pass, so the parameters "
                "change under the metric taken at them (and torch.func cannot run it). Drop "
                "max_norm, or renormalise the weight outside the forward pass (after opt.step)"
            )
        # Batch statistics couple the samples; the pullback treats them as independent.
        # Without parameters of its own the probe decides: before every parameter such a
        # normalisation is data preparation.
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (module.training or not module.track_running_stats)
            and any(p.requires_grad for p in module.parameters(recurse=False))
        ):
            # (found by a hunt: eval() was advised where it could not help)
            fix = (
                "Call model.eval() (running statistics)"
                if module.track_running_stats
                else "It keeps no running statistics (track_running_stats=False), so it "
                "normalises with batch statistics in eval mode too: build it with "
                "track_running_stats=True and call model.eval()"
            )
            raise ValueError(
                f"{named_module(name, module)} normalises with batch statistics, "
                "which couples the samples; the metrics here need a network that treats samples "
                f"independently. {fix}, or use LayerNorm/GroupNorm"
            )
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    meta = [n for n, p in params if p.is_meta]
    if meta:  # (found by a hunt: torch's "Cannot copy out of meta tensor" from a check)
        raise ValueError(
            f"parameters {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the meta device "
            "(shapes without values, e.g. a model built under torch.device('meta')): there is "
            "no point to take a metric at. Materialise the model first, "
            "model.to_empty(device='cpu') then load or initialise its weights"
        )
    low = sorted({str(p.dtype) for _, p in params if p.dtype not in (torch.float32, torch.float64)})
    if low:
        raise ValueError(
            f"parameters in {', '.join(low)}: the solves here need float32 or float64 "
            "(torch has no half-precision Cholesky/QR on CPU); convert with model.float()"
        )
    if not params:
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True); nothing to solve"
        )
    other = [n for n, p in params if getattr(p, "grad_dtype", p.dtype) not in (None, p.dtype)]
    if other:  # (found by review: autograd's gradients in another dtype broke the checks)
        raise ValueError(
            f"parameters {other} have a grad_dtype other than their own dtype: the metrics' "
            "algebra runs in the parameters' dtype and writes .grad in it; set "
            "p.grad_dtype = p.dtype (or keep float64 parameters for float64 gradients)"
        )
    now = checks is None
    checks = Deferred() if now else checks
    checks.finite_all(
        [(f"parameter {name!r}", p) for name, p in params if id(p) not in shown], PARAMETER_FIX
    )
    if now:
        checks.run()
    return params


def check_generator(generator: torch.Generator | None, output_metric, device: torch.device) -> None:
    """A generator for ``output_metric="sampled"`` must live where the outputs are drawn
    (another output metric draws nothing and ignores it)."""
    if generator is None or output_metric != "sampled":
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    here = generator.device
    if here.type != device.type or (
        here.index is not None and device.index is not None and here.index != device.index
    ):
        raise ValueError(
            f"the generator draws on {here} but the model is on {device}; the sampled output "
            f"metric draws on the model's device: pass torch.Generator(device={str(device)!r})"
        )


# ------------------------------------------------------------------------ the data


def tensors_of(value) -> Iterable[Tensor]:
    """Every tensor in a nest of tuples, lists and dicts."""
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return (leaf for leaf in leaves if isinstance(leaf, Tensor))


def call_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """Every tensor of a call's ``(args, kwargs)``, in order: the arguments themselves
    where they are tensors alone (no pytree walk, a step's per-call cost)."""
    if not kwargs and all(isinstance(a, Tensor) for a in args):
        return list(args)
    return list(tensors_of((args, kwargs)))


def forward_arguments(inputs, forward_kwargs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model call: a tuple of ``inputs`` is the positional
    arguments, a tensor the single one. Inference tensors (made under
    ``torch.inference_mode``) are copied, since autograd cannot record them."""
    if not isinstance(inputs, (Tensor, tuple)):
        raise TypeError(
            "inputs must be a torch.Tensor (or a tuple of the model's positional arguments), "
            f"got {type(inputs).__name__}"
        )
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if forward_kwargs is None:
        forward_kwargs = {}
    if not isinstance(forward_kwargs, dict):
        raise TypeError(
            f"forward_kwargs must be a dict of keyword arguments, got "
            f"{type(forward_kwargs).__name__}"
        )
    keys = [k for k in forward_kwargs if not isinstance(k, str)]
    if keys:  # (found by a hunt: "got dict" named the type that was right)
        raise TypeError(
            f"forward_kwargs must be a dict of keyword arguments, whose keys are the "
            f"argument names as strings; got the key {keys[0]!r}. Pass positional arguments "
            "in inputs, a tuple"
        )
    return torch.utils._pytree.tree_map(
        lambda a: a.clone() if isinstance(a, Tensor) and a.is_inference() else a,
        (args, dict(forward_kwargs)),
    )


def check_inputs(args: tuple, kwargs: dict, targets, checks: Deferred) -> None:
    """Data checks that need no forward pass; finiteness is registered with ``checks``.

    The batch is the first dimension of the first positional tensor argument (when
    there is one; the outputs' first dimension is checked against the targets later). The
    data, the first tensor (of the positional arguments, else of the keywords) where it is
    floating, must be finite. Beside token ids or indices (a first tensor that is not
    floating), the first floating tensor of the batch, else the first floating tensor, may
    hold -inf (an additive mask, per sample or not), not +inf; other tensors (masks,
    distances) may hold inf, not NaN.
    """
    if targets is not None and not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if first is not None:
        if first.ndim == 0 or first.shape[0] == 0:
            raise ValueError(
                f"inputs hold an empty batch (shape {tuple(first.shape)}); pass at least one sample"
            )
        if targets is not None and (targets.ndim == 0 or targets.shape[0] != first.shape[0]):
            N = first.shape[0]
            flattened = targets.ndim > 0 and targets.shape[0] > N and targets.shape[0] % N == 0
            # 1-D ids with offsets (nn.EmbeddingBag) hold every sample's ids on one axis
            # (found by review: the message left the fix to guess)
            bags = (
                first.ndim == 1
                and not first.is_floating_point()
                and targets.ndim > 0
                and targets.shape[0] < N
            )
            # (found by a hunt: an nn.GRU's (T, N, f) input read as a batch of T)
            sequence_first = (
                first.ndim >= 3 and targets.ndim > 0 and targets.shape[0] == first.shape[1]
            )
            raise ValueError(
                f"targets (shape {tuple(targets.shape)}) must have one entry per sample: "
                f"inputs have a batch of {N}"
                + (
                    f" (if the model flattens its outputs to ({N} * T, C), return them as "
                    f"({N}, T, C) and pass targets of shape ({N}, T): cross-entropy reads "
                    "them per position)"
                    if flattened
                    else ""
                )
                + (
                    " (the batch is the first dimension of the first positional tensor: where "
                    "it holds every sample's ids on one axis, as nn.EmbeddingBag's 1-D ids with "
                    "offsets do, pass the bags as a 2-D (N, length) tensor of ids, shorter bags "
                    "padded with padding_idx)"
                    if bags
                    else ""
                )
                + (
                    f" (the batch is the first dimension of the first positional tensor, "
                    f"whose second is {first.shape[1]}, as the targets': for sequence-first "
                    "inputs (T, N, ...), as nn.RNN, nn.GRU, nn.LSTM, nn.MultiheadAttention and "
                    "the Transformer modules take them by default, pass (N, T, ...): build "
                    "those modules with batch_first=True, or transpose to (T, N, ...) inside "
                    "forward)"
                    if sequence_first
                    else ""
                )
            )
    fix = "clean or impute the data before computing a direction"
    tensors = call_tensors(args, kwargs)
    if any(t.is_meta for t in [*tensors, *([] if targets is None else [targets])]):
        raise ValueError(
            "inputs or targets are on the meta device (shapes without values): a direction "
            "needs the data's values; pass tensors on the model's device"
        )
    # the data: the first tensor, positional first, where it is floating. Beside token ids
    # or indices, the first floating tensor (of the batch, if one is) may be the data (node
    # features beside the indices of the samples: found by review, unchecked) or a mask (a
    # causal T x T one, or a per-sample key padding mask: found by a hunt, refused as data
    # holding inf): no NaN and no +inf
    batch = None if first is None else first.shape[0]
    floating = [t for t in tensors if t.is_floating_point()]
    data = tensors[0] if tensors and tensors[0].is_floating_point() and tensors[0].ndim else None
    of_batch = [t for t in floating if t.ndim > 0 and batch in (None, t.shape[0])]
    either = None if data is not None or not floating else (of_batch or floating)[0]
    for i, t in enumerate(tensors):
        what = "inputs" if len(args) == 1 and not kwargs else f"input tensor {i}"
        if t is data:
            checks.finite(what, t, fix)
        elif t is either:
            checks.no_nan(what, t, fix, positive_inf=True)
        else:  # a mask may hold -inf (attention: nn.Transformer's causal mask)
            checks.no_nan(what, t, fix)
    if targets is not None:
        checks.finite("targets", targets, "clean the targets before computing a direction")


def reads_softmax_fisher(loss: str, output_metric) -> bool:
    """Whether the output metric reads the outputs as cross-entropy logits ``(N, ..., C)``,
    the classes along the last dimension."""
    return loss == "cross_entropy" and not callable(output_metric)


def classes_along_positions(outputs: Tensor, loss: str, output_metric) -> bool:
    """Whether the output metric reads ``outputs`` as cross-entropy logits ``(N, ..., C)``
    with positions: the classes are then taken along the last dimension."""
    return reads_softmax_fisher(loss, output_metric) and outputs.ndim > 2


#: Autograd's nodes of ``F.nll_loss`` (the last step of ``F.cross_entropy`` with class
#: indices): their saved targets, ``ignore_index`` and class weights say which samples
#: the loss takes.
NLL_NODES = ("NllLossBackward0", "NllLoss2DBackward0")
#: Autograd's nodes of a softmax (``F.cross_entropy`` with probability targets, ``F.kl_div``
#: of a ``log_softmax``) or of a ``logsumexp`` (a cross-entropy written
#: ``z.logsumexp(-1) - z.gather(...)``, ``Categorical(logits=z).log_prob``): their saved
#: tensor and dimensions say over how many classes.
SOFTMAX_NODES = ("LogSoftmaxBackward0", "SoftmaxBackward0", "LogsumexpBackward0")


def _samples_left_out(
    loss: Tensor, outputs: Tensor
) -> tuple[list[Tensor], set[int], list[tuple], list]:
    """For each ``nll_loss`` node of ``loss``'s graph whose input is computed from
    ``outputs`` (an auxiliary head's is not), how many of its targets it leaves out (equal
    to its ``ignore_index``, or of a class weighted zero); the numbers of classes of those
    nodes and of the softmax and ``logsumexp`` nodes computed from ``outputs``; each of
    these nodes with the tensor it reads its classes from, their dimensions and their
    number (:func:`_logits`); and the nodes computed from ``outputs``, the loss's graph
    above them (whose :func:`_structure` :func:`check_samples_taken` probes once)."""
    stop = outputs.grad_fn
    counts, classes, logits = [], set(), []
    nodes, computed = _computed_from(loss, stop)
    for node in nodes:
        kind = type(node).__name__
        if kind not in NLL_NODES and kind not in SOFTMAX_NODES:
            continue
        if node not in computed:
            continue
        tensor, dims = _logits(node)
        count = math.prod(tensor.shape[d] for d in dims) if tensor.ndim else 1
        classes.add(count)
        logits.append((node, tensor, dims, count))
        if kind in NLL_NODES:
            target = node._saved_target
            ignored = _signed(node._saved_ignore_index)
            left = target == ignored
            weight = node._saved_weight
            if weight is not None:
                left |= weight[target.clamp(0, weight.numel() - 1)] == 0
            counts.append(left.sum())
    return counts, classes, logits, [node for node in nodes if node in computed]


#: For each kind of autograd node, the names of its saved integer arguments (:func:`_structure`).
_SAVED_INTEGERS: dict[type, tuple[str, ...]] = {}


def _saved_integers(node) -> tuple[str, ...]:
    """The names of ``node``'s saved integer arguments (dimensions, shifts, a slice's
    bounds, ``keepdim``), read once for its kind: not its saved tensors (those with a
    ``_raw_saved_`` twin, left packed: a saved-tensor hook's unpacking may copy or
    recompute), nor sizes, strides or counts of entries, which another length of the batch
    or of the sequences changes."""
    saved = _SAVED_INTEGERS.get(type(node))
    if saved is not None:
        return saved
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        return ()  # (a custom Function's: its class may be made anew at every call)
    names = set(dir(node))
    saved = _SAVED_INTEGERS[type(node)] = tuple(
        name
        for name in sorted(names)
        if name.startswith("_saved_")
        and "_raw" + name not in names
        and not name.endswith(("sizes", "strides", "numel", "storage_offset"))
        and _is_integers(getattr(node, name))
    )
    return saved


def _is_integers(value) -> bool:
    return isinstance(value, int) or (
        isinstance(value, tuple) and all(isinstance(v, int) for v in value)
    )


def _structure(nodes: list, stop) -> tuple:
    """The structure of a loss's graph above the outputs (``nodes``, computed from
    ``stop``, the outputs' node): each node's kind, saved integer arguments and the nodes
    its inputs come from. Two losses of one structure take each row of their logits from
    the same samples, unless their saved tensors or scalars differ (a mask of
    ``torch.where``, a factor of zero): the kinds alone did not tell ``z + z.roll(0, 0)``
    from ``z + z.roll(1, 0)``, ``z - z.mean(1, keepdim=True)`` from ``z - z.mean(0)``, nor
    ``z.flip(0) + 3 * z.flip(0)`` from ``u.flip(0) + 3 * u`` of ``u = z.flip(0)`` (found by
    review: the second of each, which mixes the samples, was taken after the first)."""
    index = {node: i for i, node in enumerate(nodes)}
    return tuple(
        (
            type(node).__name__,
            tuple(getattr(node, name) for name in _saved_integers(node)),
            () if node is stop else tuple((index.get(n, -1), nr) for n, nr in node.next_functions),
        )
        for node in nodes
    )


def _logits(node) -> tuple[Tensor, tuple[int, ...]]:
    """The tensor in the graph that a cross-entropy's node (:data:`NLL_NODES`,
    :data:`SOFTMAX_NODES`) reads its classes from, and their dimensions: a softmax's
    result (its rows are its input's), a ``logsumexp``'s input over its dimensions, an
    ``nll_loss``'s log-probabilities ``(N, C, ...)`` or ``(C,)``."""
    kind = type(node).__name__
    if kind == "LogsumexpBackward0":
        tensor = node._saved_self
        return tensor, tuple(sorted({_signed(d) % max(tensor.ndim, 1) for d in node._saved_dim}))
    if kind in SOFTMAX_NODES:
        tensor = node._saved_result
        return tensor, (_signed(node._saved_dim) % tensor.ndim,)
    tensor = node._saved_self
    return tensor, (1 if tensor.ndim > 1 else 0,)


#: Autograd's nodes that keep every entry where it was in the row-major order of the
#: tensor they take (views and reshapes, squeezes, copies and casts): rows of ``C``
#: entries along the last dimension reached from the outputs through these alone are
#: the outputs' positions, one sample's each.
IN_ORDER_NODES = (
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "AliasBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "UnsqueezeBackward0",
)


def _in_order(node, outputs: Tensor) -> bool:
    """Whether ``node``'s input is ``outputs`` through :data:`IN_ORDER_NODES` alone."""
    target = (outputs.grad_fn, outputs.output_nr)
    edge = node.next_functions[0] if node.next_functions else (None, 0)
    while edge[0] is not None:
        if edge[0] is target[0] and edge[1] == target[1]:
            return True
        if type(edge[0]).__name__ not in IN_ORDER_NODES or not edge[0].next_functions:
            return False
        edge = edge[0].next_functions[0]
    return False


#: Autograd's nodes of a softmax: each row of their result along their dimension is a
#: function of that row of their input alone (:func:`_rows`).
ROW_NODES = ("LogSoftmaxBackward0", "SoftmaxBackward0")


def _rows(
    node, like: Tensor, dims: tuple[int, ...], stop
) -> tuple[GradientEdge, Tensor, tuple[int, ...]]:
    """The edge of the tensor whose rows a probe of a cross-entropy's ``node`` reads
    (:func:`_mixes_samples`), a tensor as it and the dimensions of its rows, from
    ``node``'s logits ``like`` (:func:`_logits`) and their ``dims``: its input (a
    softmax's or ``logsumexp``'s logits, an ``nll_loss``'s log-probabilities), or, below
    it through reshapes and casts that keep its rows (:data:`IN_ORDER_NODES`: the view of
    token logits an ``nll_loss`` takes), the input of a softmax over those rows
    (``F.cross_entropy``'s ``log_softmax``), as far down as that goes. A row of a softmax
    depends on no sample its input's row does not, so the probe's double backward leaves
    the softmax out (through a ``log_softmax`` at a temperature, token logits
    ``(16, 64, 32000)`` took 3.3 s on one thread and +1.25 GB, ten times the logits: found
    by review), and an ``nll_loss`` of a ``log_softmax`` is probed as that alone. Not below
    ``stop``, the outputs' node."""
    edge = node.next_functions[0]
    while True:
        below = edge
        while below[0] is not stop and type(below[0]).__name__ in IN_ORDER_NODES:
            below = below[0].next_functions[0]
        if below[0] is stop or type(below[0]).__name__ not in ROW_NODES or len(dims) != 1:
            return GradientEdge(*edge), like, dims
        result = below[0]._saved_result
        dim = _signed(below[0]._saved_dim) % result.ndim
        # the same rows: as many classes, after as many entries in the row-major order
        softmax_rows = (result.shape[dim], result.shape[:dim].numel())
        if softmax_rows != (like.shape[dims[0]], like.shape[: dims[0]].numel()):
            return GradientEdge(*edge), like, dims
        edge, like, dims = below[0].next_functions[0], result, (dim,)


def _mixes_samples(
    rows: GradientEdge, like: Tensor, dims: tuple[int, ...], outputs: Tensor
) -> bool | None:
    """Whether a row of the logits at the edge ``rows`` (a tensor as ``like``; its entries
    along the classes' ``dims``) depends on more than one sample of ``outputs``. Forward
    derivatives ``J t`` (the backward pass from ``rows`` differentiated in its cotangent)
    of random tangents ``t`` on the samples whose index has bit ``k`` set, and on the
    others: a row that both reach depends on two samples, and any two differ in some bit
    (``2 ceil(log2 N)`` passes through the loss's graph above the outputs, as the coupling
    probe tells samples apart). A NaN is no derivative (``0 / 0`` where a ``relu`` stops a
    ``sqrt``'s infinite one at zero, the loss's gradient finite). ``None`` where no row is
    reached (every derivative zero at these outputs, as where a clamp saturates): nothing
    is told. Where the loss's graph has no second derivative, nothing is refused. Held at
    once: ``J^T`` of the cotangent and the tangent, of the outputs' size, and one pass's
    masked tangent and ``J t`` (four to six times the logits, where ten were)."""
    N = outputs.shape[0]
    # (a zero expanded: a leaf to differentiate in, without a tensor of the logits' size;
    # in the dtype the edge takes, which a softmax's result may not have: CUDA's float16
    # softmax to float32, half_to_float, keeps a float16 input)
    dtype = _gradient_dtype(rows, like.dtype)
    cotangent = torch.zeros((), dtype=dtype, device=like.device).expand(like.shape)
    cotangent.requires_grad_()
    try:
        # a copy of its own to the loss's graph: a custom Function's backward or a tensor
        # hook may write into the gradient it is given, which the leaf refuses (found by
        # review: the RuntimeError took a loss centring the batch as one without a second
        # derivative, and it passed)
        (back,) = torch.autograd.grad(
            rows,
            outputs,
            cotangent.clone(),
            retain_graph=True,
            create_graph=True,
            allow_unused=True,
        )
    except RuntimeError:
        return False
    if back is None or not back.requires_grad:  # (no derivative in the outputs)
        return False
    generator = torch.Generator().manual_seed(0)  # (the caller's random state untouched)
    # (in the logits' dtype: a float64 draw doubled the host memory of a float32 one)
    tangent = torch.randn(outputs.shape, generator=generator, dtype=back.dtype)
    tangent = tangent.to(device=outputs.device)
    bit = torch.arange(N, device=outputs.device).reshape(N, *[1] * (outputs.ndim - 1))
    both = torch.zeros((), dtype=torch.bool, device=outputs.device)
    for k in range(max(1, (N - 1).bit_length())):
        side = (bit >> k) & 1 == 1
        reached = []
        for samples in (side, ~side):
            try:
                reached.append(_rows_reached(back, cotangent, tangent, samples, dims))
            except RuntimeError:  # (a backward pass without a derivative of its own)
                return False
        if k == 0:  # (every sample is on one side or the other)
            seen = (reached[0] | reached[1]).any()
        both |= (reached[0] & reached[1]).any()
    seen, mixes = torch.stack([seen, both]).tolist()  # (one read of the device)
    return mixes if seen else None


def _gradient_dtype(edge: GradientEdge, otherwise: torch.dtype) -> torch.dtype:
    """The dtype of the gradient ``edge``'s node takes there, from autograd's metadata of
    its inputs (``otherwise`` where torch keeps none)."""
    try:
        return edge.node._input_metadata[edge.output_nr].dtype
    except (AttributeError, IndexError):
        return otherwise


def _rows_reached(
    back: Tensor, cotangent: Tensor, tangent: Tensor, samples: Tensor, dims: tuple[int, ...]
) -> Tensor:
    """The rows along ``dims`` where ``J (tangent * samples)`` (``back``, ``J^T`` of
    ``cotangent``, differentiated in it) has an entry neither zero nor NaN. A function of
    its own, so that its tensors of the logits' size are freed before the next pass (held
    over into it, they were a third more memory: 750 MiB for 564 at token logits
    ``(16, 64, 32000)``)."""
    (forward,) = torch.autograd.grad(back, cotangent, tangent * samples, retain_graph=True)
    nonzero = forward.nan_to_num_(0.0) != 0  # (in place: no copy of the logits)
    return nonzero.any(dim=dims) if dims else nonzero


def _computed_from(loss: Tensor, stop) -> tuple[list, set]:
    """The nodes of ``loss``'s graph (not below ``stop``), and those of them computed from
    ``stop`` (at or above it), in one walk down and one up: linear in the graph (a walk
    down from each softmax was quadratic in a deep model whose loss reaches its layers
    beside its outputs, a softmax in each: an auxiliary load-balancing or deep-supervision
    loss, 259 ms at 128 layers in place of 4)."""
    nodes = list(_graph_nodes([loss.grad_fn], stop))
    users: dict = {}  # node -> the nodes of the loss's graph that take its output
    for node in nodes:
        if node is not stop:
            for n, _ in node.next_functions:
                if n is not None:
                    users.setdefault(n, []).append(node)
    computed, stack = set(), [stop] if stop is not None else []
    while stack:
        node = stack.pop()
        if node not in computed:
            computed.add(node)
            stack.extend(users.get(node, ()))
    return nodes, computed


def _signed(saved: int) -> int:
    """A node's saved int64 as it was given (autograd reads it back unsigned: -1 as
    2**64 - 1)."""
    return saved - 2**64 if saved >= 2**63 else saved


#: Structures of losses' graphs above the outputs that :func:`check_samples_taken` keeps as
#: probed, at most.
MAX_PROBED = 64


def check_samples_taken(
    loss: Tensor, outputs: Tensor, checks: Deferred, probed: set | None = None
) -> None:
    """Refuse (registered with ``checks``) a cross-entropy with class indices that leaves
    samples of ``outputs`` out: a target equal to its ``ignore_index`` or of a class
    weighted zero, read from the ``nll_loss`` nodes between ``loss`` and ``outputs``. The
    metric, the mean over every sample, would still weigh those samples. Refuse a loss
    none of whose cross-entropies (``nll_loss``, softmax or ``logsumexp`` nodes computed
    from the outputs) is over as many classes as ``outputs`` have along their last
    dimension: the outputs are then not its logits (found by a hunt: probability targets
    on some of the classes, 0.22 off the loss's metric, on token outputs 0.34). At once,
    or, where the count is that of the second dimension of token outputs, once the checks
    before it are read (:func:`check_classes_last` names an ``(N, C, ...)`` layout). Refuse
    at once a loss none of whose cross-entropies over that many classes takes each row of
    its logits from one sample (:func:`_mixes_samples`: outputs centred by the batch's
    mean; a contrastive ``z @ z.T`` or a softmax over the batch where the batch is as large
    as the classes are many): the metric takes each sample's outputs as its logits.
    A cross-entropy reached from the outputs through views alone is not probed; another
    is probed once for each structure of the loss's graph above the outputs (kept in
    ``probed``; :func:`_structure`), and again where the probe saw no derivative. A zero
    gradient alone is no sign: a hinge or clamped loss, or a softmax the loss sharpens,
    has zeros at samples it takes.
    """
    counts, classes, logits, above = _samples_left_out(loss, outputs)

    def not_logits():
        raise ValueError(
            f"the loss's cross-entropy is over {sorted(classes)} classes, and the model's "
            f"outputs {tuple(outputs.shape)} have {outputs.shape[-1]} along the last "
            "dimension, where the metric takes them as the loss's logits: they are not (a "
            "head outside the preconditioned model, a loss on some of the outputs, or "
            "logits mixed across samples, as a contrastive loss's z @ z.T), "
            "and the cross-entropy metric at them is not the loss's. Precondition the "
            "model whose outputs the loss takes as logits, or pass an output_metric"
        )

    C = outputs.shape[-1]
    # (found by a hunt: an encoder preconditioned alone; a coarse term beside is fine)
    if classes and C not in classes:
        if outputs.shape[1] not in classes:
            not_logits()
        # token outputs (N, C, ...) with the classes along dimension 1, which
        # check_classes_last, registered before, names; or a cross-entropy over as many
        # classes as positions, or beside a softmax over them (found by review: passed)
        checks.then(not_logits)
    elif classes and outputs.shape[0] > 1:
        # over C classes, but of logits that mix the samples (found by a hunt: outputs
        # centred by the batch's mean, and where the batch was as large as the classes are
        # many a contrastive loss or a softmax over the batch, refused at any other batch
        # size, took the softmax Fisher at the outputs); a term beside the outputs' is fine
        over = [(node, t, dims) for node, t, dims, count in logits if count == C and t.ndim]
        in_order = any(dims == (t.ndim - 1,) and _in_order(node, outputs) for node, t, dims in over)
        key = (_structure(above, outputs.grad_fn), outputs.ndim) if over and not in_order else None
        if key is not None and (probed is None or key not in probed):
            # (an nll_loss of a log_softmax reads the rows the log_softmax does: probed once)
            rows = {}
            for node, t, dims in over:
                edge, like, dims = _rows(node, t, dims, outputs.grad_fn)
                rows.setdefault((edge.node, edge.output_nr, dims), (edge, like))
            found = set()
            for (*_, dims), (edge, like) in rows.items():
                found.add(_mixes_samples(edge, like, dims, outputs))
                if False in found:  # (one cross-entropy of each sample's own logits)
                    break
            if found == {True}:
                raise ValueError(
                    f"the loss's cross-entropy over the {C} classes of the model's outputs "
                    f"{tuple(outputs.shape)} takes logits that mix the samples of the batch "
                    "(a contrastive loss's z @ z.T, a softmax over the batch, outputs "
                    "centred by the batch's mean), where the metric takes each sample's "
                    "outputs as its logits, and the cross-entropy metric at them is not "
                    "the loss's. Add such a term beside a cross-entropy of the outputs "
                    "themselves, or pass an output_metric (a per-sample factor) to "
                    "precondition it with that"
                )
            if probed is not None and None not in found:  # (else probed again next call)
                if len(probed) >= MAX_PROBED:  # (a loop whose loss changes at every step)
                    probed.clear()
                probed.add(key)
    if not counts:
        return
    count = counts[0] if len(counts) == 1 else torch.stack(counts).sum()
    N = outputs.shape[0]
    # on token outputs (N, ..., C) the targets are positions (found by review: there only
    # the zero gradient was read, and a term over every position beside a cross-entropy
    # with ignore_index hid the positions it left out)
    positions = outputs.shape[:-1].numel() if outputs.ndim > 2 else None

    def explain():
        left = (
            f"{int(count)} of the {positions} positions"
            if positions
            else f"{int(count)} sample(s) of the batch of {N}"
        )
        raise ValueError(
            f"the loss leaves out {left} (targets equal to ignore_index, or of a class "
            "weighted zero, which label smoothing takes in its smoothing term alone), "
            "while the metric is that of the mean over every "
            f"{'position' if positions else 'sample'}. Leave those out of the batch before "
            "the forward pass, or pass an output_metric that weighs them"
        )

    checks.require(count == 0, explain)


#: The largest scale of a float16 loss's seed in :func:`check_classes_last` (a power of two,
#: well inside float16's 65504).
HALF_SCALE = 2**14


def check_classes_last(
    loss: Tensor, outputs: Tensor, checks: Deferred, *, loss_scale: float = 1.0
) -> Tensor | None:
    """``loss`` is a cross-entropy over every position of ``outputs`` ``(N, ..., C)`` with
    the classes last, as the token-level metric reads it (registered with ``checks``; one
    backward pass from the loss to the outputs, the graph kept, whose gradient is returned
    for the pullback to reuse: ``None`` where it was read scaled, or is not there):

    - its gradient sums to zero over the last dimension at every position, as
      ``softmax - one-hot`` does, and no softmax reading the outputs in their order runs
      along another dimension alone (:func:`_softmax_elsewhere`: where every position is
      confident the sums cannot tell): ``F.cross_entropy(out, y)`` on ``(N, C, L)``
      outputs, whose classes lie along dimension 1, would otherwise be read wrongly,
      silently;
    - no position is left out (a zero gradient where the softmax is not saturated:
      ``ignore_index``, padding by ``ignore_index`` or by a mask that multiplies a
      per-token loss, a shifted language-model loss), which the metric, the mean over
      every position, would still weigh. A per-token loss clamped or sharpened to a zero
      gradient is refused too: its zeros cannot be told from a mask's (the loss's
      ``nll_loss`` takes every position either way), and masks are the common padding.

    Float16 gradients are read scaled by the number of positions, at most :data:`HALF_SCALE`
    (a float16 seed past 65504 is inf, and its gradient was read as unreadable: nothing was
    refused): the mean's ``p / (N T)`` underflows there for large vocabularies. A loss
    a ``GradScaler`` multiplied by ``loss_scale`` is read at the same scale (scaled again by
    the positions, it overflowed and nothing was refused; read as it is at a small scale,
    it underflowed and a valid loss was refused).
    """
    positions = outputs.shape[:-1].numel()
    half = outputs.dtype == torch.float16
    scale = float(min(positions, HALF_SCALE)) / loss_scale if half else 1.0
    seed = torch.full_like(loss, scale)
    (gradient,) = torch.autograd.grad(loss, outputs, seed, retain_graph=True, allow_unused=True)
    if gradient is None:  # the loss does not reach the outputs: nothing to read
        return None
    wide = torch.promote_types(gradient.dtype, torch.float32)  # half precision: in float32
    dz = gradient.detach().to(wide)
    _, above = _computed_from(loss, outputs.grad_fn)
    loss_dtype = _loss_dtype(above, outputs)
    precision = torch.finfo(loss_dtype)
    largest = dz.abs().amax()
    reach = min(positions, HALF_SCALE) if half else 1
    nominal = reach / positions  # the mean's k, the scale of a position's k (p - y)
    # saturated: a position the loss takes has a zero gradient only where k p_j underflows
    # for every class but the likeliest, its gradient k (p - y) (found by review: read as
    # p.amax() above 1 - sqrt(eps), a mask at positions predicted at 0.99 passed a bfloat16
    # loss, at 0.9999 a float32 one, 0.2 off the loss's metric). k is the mean's
    # scale / positions, or less where the loss is scaled down, read as dz_j / p_j <= k
    # (y_j >= 0; found by a hunt: a loss divided by the micro-batches it accumulates over
    # was refused, a float16 one at logit margins of 16-17). It underflows below the
    # smallest subnormal, or the smallest normal where the arithmetic flushes denormals
    # (found by a hunt: torch.set_flush_denormal(True) refused a float32 loss); twice that
    # for the rounding of p and k.
    p = torch.softmax(outputs.detach().to(wide), dim=-1)
    second = p.topk(2, dim=-1).values[..., 1] if p.shape[-1] > 1 else torch.zeros_like(p[..., 0])
    readable = (dz >= precision.tiny) & (p > 0)  # (normal: dz_j's rounding is eps)
    ratio = torch.where(readable, dz / torch.where(readable, p, 1), 0).amax()
    # one-hot targets, one entry of dz below zero at every position: soft targets y_j > 0
    # lower dz_j / p_j below k, and a position they take has k y_j in its gradient, never
    # zero (found by review: label smoothing read k at 5e-3 of the mean's, and a float16
    # mask at padding predicted at 1 - 1e-5 passed, 1 - 1e-9 at k itself, 0.2-0.6 off)
    one_hot = (dz < 0).sum(-1).amax() <= 1
    k = torch.where((ratio > 0) & one_hot, ratio.clamp(max=nominal), nominal)
    # a row sums to zero up to the rounding of its entries and of p_y, about eps k: where
    # every position is predicted with near certainty the largest entry is only k p_j, and
    # sqrt(eps) of it alone refused a correct float32 loss at logit margins of 10 (found by
    # review). k is the loss's own: the largest dz_j / p_j where above the mean's (found by
    # review: reduction='sum' and loss * 8 were refused at margins of 12), at most the
    # sum's (a mislaid layout's ratio grows without bound). There the sums no longer tell
    # a mislaid classes' dimension: the graph does (_softmax_elsewhere)
    rounding = torch.where(one_hot, ratio.clamp(min=nominal, max=reach), nominal)
    sums = dz.sum(-1).abs().amax()
    summed = (sums <= precision.eps**0.5 * largest + 4 * precision.eps * rounding) & (
        not _softmax_elsewhere(above, outputs)
    )
    # flushing read from the arithmetic itself (found by review: read as flushing always,
    # a mask at float32 logit margins of 86-103 passed, 0.2 off, its subnormal zeros a sign)
    arithmetic = torch.promote_types(loss_dtype, torch.float32)
    smallest = torch.full((), torch.finfo(arithmetic).tiny, dtype=arithmetic, device=dz.device)
    flushed = smallest / 2 == 0
    underflow = torch.where(flushed, smallest, 0).clamp(min=precision.tiny * precision.eps)
    saturated = (second * k < 2 * underflow) & one_hot
    left_out = ((dz == 0).all(-1) & ~saturated).sum()
    # unreadable (a float16 gradient overflowed by the scale): nothing is refused
    ok = ~torch.isfinite(largest) | (summed & (left_out == 0))
    shape = tuple(outputs.shape)

    def explain():
        if not bool(summed):
            raise ValueError(
                f"the loss's gradient at the model's outputs {shape} does not sum to zero "
                "over the last dimension at every position, as a cross-entropy's does with "
                "the classes there, or its softmax of them runs along another dimension: "
                "with loss='cross_entropy' the classes of (N, ..., C) outputs lie along "
                "the last dimension. For outputs (N, C, L), return out.movedim(1, -1) and "
                "take F.cross_entropy(out.reshape(-1, C), targets.reshape(-1)); a loss other than a cross-entropy of these outputs "
                "needs its own output_metric"
            )
        count = int(left_out)
        raise ValueError(
            f"the loss leaves out {count} of the {positions} positions of the outputs {shape} "
            "(ignore_index, padding, or a shifted language-model loss), while the metric is "
            "that of the mean over every position. Return from forward only the positions "
            "the loss takes (e.g. logits[:, :-1] for next-token prediction), or pass an "
            "output_metric that weighs them"
        )

    checks.require(ok, explain)
    return gradient if scale == 1.0 else None


#: Autograd's nodes of elementwise arithmetic: with one operand a constant (no edge, as a
#: temperature, ``2 * z`` or ``z / t``) and the result of its input's shape, every entry
#: stays where it was in the row-major order.
ELEMENTWISE_NODES = ("MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0", "NegBackward0")


def _elementwise_in_order(node, outputs: Tensor) -> bool:
    """Whether ``node``'s input is ``outputs`` through :data:`IN_ORDER_NODES` and
    :data:`ELEMENTWISE_NODES` of one operand alone (:func:`_softmax_elsewhere`: found by
    review, ``F.cross_entropy(z / 2, y)`` on ``(N, C, L)`` outputs under a bfloat16 or
    float16 loss passed, 0.7 off, silently)."""
    edge = node.next_functions[0] if node.next_functions else (None, 0)
    while edge[0] is not None:
        if edge[0] is outputs.grad_fn and edge[1] == outputs.output_nr:
            return True
        kind, edges = type(edge[0]).__name__, [e for e in edge[0].next_functions if e[0]]
        if kind in ELEMENTWISE_NODES and len(edges) == 1:
            result = edge[0]._input_metadata[0].shape
            source = edges[0][0]._input_metadata[edges[0][1]].shape
            if result != source:
                return False
        elif kind not in IN_ORDER_NODES or not edge[0].next_functions:
            return False
        edge = edges[0] if kind in ELEMENTWISE_NODES else edge[0].next_functions[0]
    return False


def _softmax_elsewhere(above: set, outputs: Tensor) -> bool:
    """Whether the loss's softmaxes (or ``logsumexp``) that read ``outputs`` in their
    row-major order (:func:`_elementwise_in_order`: ``F.cross_entropy(out, y)`` on
    ``(N, C, L)``, or through a reshape, a cast or a temperature) take the classes along
    another of their dimensions than the first (the batch's), and none along their last
    one, of ``outputs``'s ``C`` entries."""
    C, last, elsewhere = outputs.shape[-1], False, False
    for node in above:
        if type(node).__name__ in SOFTMAX_NODES and _elementwise_in_order(node, outputs):
            tensor, dims = _logits(node)
            if dims == (tensor.ndim - 1,) and tensor.shape[-1] == C:
                last = True
            elif 0 not in dims:  # (over the batch: the samples mixed, refused elsewhere)
                elsewhere = True
    return elsewhere and not last


def _loss_dtype(above: set, outputs: Tensor) -> torch.dtype:
    """The least precise of the outputs' dtype and those the loss's graph ``above`` them
    (:func:`_computed_from`) runs in: Hugging Face's losses take float64 logits to float32
    (``logits.float()``), whose gradient sums to zero over the classes only to float32's
    rounding (found by a hunt: such a loss over every position was refused as holding the
    classes along another dimension, and a shifted one named ``movedim`` in place of the
    positions it leaves out)."""
    dtypes = {outputs.dtype} | {
        m.dtype
        for node in above
        for m in getattr(node, "_input_metadata", ())  # the gradients' dtypes there
        if m.dtype.is_floating_point
    }
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


#: Autograd's nodes of embedding lookups: their saved ``scale_grad_by_freq`` divides the
#: weight's gradient by each token's count in the batch.
EMBEDDING_NODES = ("EmbeddingBackward0", "EmbeddingBagBackward0")


def check_no_frequency_scaling(outputs: Tensor, names: dict[int, str]) -> None:
    """Refuse an embedding lookup with ``scale_grad_by_freq=True`` on a trainable weight
    anywhere in the autograd graph of ``outputs``: ``F.embedding`` or ``F.embedding_bag``
    called in a module's ``forward`` (the option of ``nn.Embedding`` itself is refused by
    :func:`check_model`). Its backward is not the derivative of the outputs, and it couples
    the samples: the direction was 0.09 off the oracle's, silently. ``names``:
    ``{id(p): name}`` of the preconditioned parameters (a weight computed from them counts
    too; a weight that depends on none of them does not). A walk over every node of the
    graph, at every call: an option passed in ``forward`` changes nothing that the probes
    of :mod:`riemann_core.coupling` key on (about a microsecond per node)."""
    for node in _graph_nodes([outputs.grad_fn]):
        if type(node).__name__ not in EMBEDDING_NODES or not getattr(
            node, "_saved_scale_grad_by_freq", False
        ):
            continue
        below = [n for n, _ in node.next_functions]
        reached = [v for n in _graph_nodes(below) if id(v := getattr(n, "variable", None)) in names]
        if not reached:
            continue  # the weight depends on no preconditioned parameter
        direct = [
            names[id(v)] for v in reached if any(getattr(n, "variable", None) is v for n in below)
        ]
        weight = (
            f"the trainable parameter {direct[0]!r}"
            if direct
            else "a weight computed from " + ", ".join(repr(names[id(v)]) for v in reached)
        )
        raise ValueError(
            f"an embedding lookup of {weight} has scale_grad_by_freq=True: its backward "
            "divides each row's gradient by the token's count in the batch, so the gradient "
            "is not the derivative of the loss (and couples the samples), and no metric "
            "matches it. Call F.embedding (or F.embedding_bag) with scale_grad_by_freq=False"
        )


def _graph_nodes(starts, stop=None):
    """Every autograd node at or below ``starts``, once each, not below ``stop``
    (``AccumulateGrad`` nodes carry their leaf as ``variable``)."""
    seen, stack = set(), list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        if node is not stop:
            stack.extend(n for n, _ in node.next_functions)


def check_one_output(outputs) -> None:
    """Refuse a model that returns anything but one tensor: the output metric is taken at
    that tensor, and the hooks that see the forward pass record it."""
    if not isinstance(outputs, Tensor):
        raise ValueError(
            f"the model must return a tensor of outputs, got {type(outputs).__name__}: the "
            "output metric is taken at one tensor. Return the main output from forward (an "
            "auxiliary head whose loss is added can be a module called inside forward, its "
            "output kept as an attribute for the loss), or wrap the model in a module that "
            "returns one tensor"
        )


def check_outputs(outputs: Tensor, targets: Tensor | None, loss: str, checks: Deferred) -> None:
    """Checks of the model's outputs and, when given, of the targets against them."""
    if outputs.ndim == 0:
        raise ValueError(
            "the model returns a scalar; the metrics need its outputs, one row per sample "
            "(N, ...): return the outputs, and leave the loss to the loss option"
        )
    if not outputs.is_floating_point():
        raise ValueError(
            f"the model returns {outputs.dtype} outputs; the metrics need floating-point "
            "outputs (logits for cross_entropy)"
        )
    if not outputs.requires_grad:
        raise ValueError(
            "the model's outputs are not in an autograd graph of its parameters (detached, or "
            "computed under torch.no_grad() or from frozen parameters only): return outputs "
            "computed from the trainable parameters"
        )
    checks.finite(
        "the model's outputs",
        outputs,
        "the forward pass overflowed, or masked outputs with -inf (logits.masked_fill(mask, "
        "float('-inf'))): the metrics need finite outputs; check the model, and mask logits "
        "with a large finite negative instead (e.g. -1e4), whose softmax is 0 there as well",
    )
    if loss == "cross_entropy" and outputs.ndim < 2:
        raise ValueError(
            f"loss='cross_entropy' needs outputs of shape (N, C) or (N, ..., C) (logits, the "
            f"classes along the last dimension), got {tuple(outputs.shape)}"
        )
    if targets is None:
        return
    if loss == "cross_entropy":
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(
                f"loss='cross_entropy' needs integer class indices as targets, got dtype {targets.dtype}; "
                "convert with targets.long() (probability targets are not supported)"
            )
        if targets.shape != outputs.shape[:-1]:
            expected = tuple(outputs.shape[:-1])
            channels = outputs.ndim > 2 and targets.shape == outputs.shape[:1] + outputs.shape[2:]
            raise ValueError(
                f"loss='cross_entropy' needs one class index per sample and position, targets "
                f"of shape {expected} for outputs {tuple(outputs.shape)} (the classes along the "
                f"last dimension), got {tuple(targets.shape)}"
                + (  # (found by a hunt: per-pixel logits as F.cross_entropy takes them)
                    "; outputs with the classes along dimension 1, as F.cross_entropy takes "
                    "them: return out.movedim(1, -1) from forward"
                    if channels
                    else ""
                )
            )
        C = outputs.shape[-1]

        def explain():
            low, high = int(targets.min()), int(targets.max())
            ignored = (  # (found by a hunt: padding targets were told of the range only)
                f" ({low} is cross_entropy's ignore_index: every position is taken; return "
                "only the positions the loss takes, with their targets)"
                if low == -100
                else ""
            )
            raise ValueError(
                f"class indices must lie in [0, {C - 1}] for a model with {C} outputs; "
                f"targets range over [{low}, {high}]{ignored}"
            )

        checks.require(((targets >= 0) & (targets < C)).all(), explain)
    else:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"loss='mse' needs targets of the outputs' shape {tuple(outputs.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        if not targets.is_floating_point():
            raise ValueError(f"loss='mse' needs floating-point targets, got dtype {targets.dtype}")
