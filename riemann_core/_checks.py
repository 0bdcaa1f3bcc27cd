"""Validation of options and data: every error names the problem and the fix."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn

from .factors import LOSSES, OUTPUT_METRICS
from .modules import KERNELS


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_options(
    *, method, methods, loss, damping, output_metric, samples, kernel, solve_dtype, refine=0
) -> None:
    """Options that can be checked before any work."""
    check_choice("method", method, methods)
    check_choice("loss", loss, LOSSES)
    check_choice("kernel", kernel, KERNELS)
    if not callable(output_metric):
        check_choice("output_metric", output_metric, OUTPUT_METRICS)
    if isinstance(damping, bool) or not isinstance(damping, Real):
        raise TypeError(f"damping must be a positive real number, got {type(damping).__name__}")
    if not math.isfinite(damping) or damping <= 0:
        raise ValueError(
            f"damping must be positive and finite (it is mu in mu I + K^T K), got {damping!r}; "
            "use e.g. damping=1e-3"
        )
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer (probes per sample), got {samples!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(
            f"refine must be a non-negative integer (refinement steps), got {refine!r}"
        )
    if solve_dtype is not None and solve_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"solve_dtype must be None, torch.float32 or torch.float64, got {solve_dtype}"
        )


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
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(
            f"kfac_refresh must be a positive integer (steps between factorisations), "
            f"got {refresh!r}"
        )
    if isinstance(decay, bool) or not isinstance(decay, Real) or not 0 <= decay < 1:
        raise ValueError(
            f"kfac_decay must be a number in [0, 1) (the running average's weight on past "
            f"factors; 0 uses each step's own), got {decay!r}"
        )


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite; a sum (no mask allocated) decides the usual case."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())  # the sum may overflow with finite entries


def check_finite(what: str, tensor: Tensor, fix: str) -> None:
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} contains {bad} NaN or inf entries; {fix}")


def check_model(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters, after checking the model can be handled at all."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        # Batch statistics couple the samples; the pullback treats them as independent.
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or not module.track_running_stats
        ):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) normalises with batch statistics, "
                "which couples the samples; the metrics here need a network that treats samples "
                "independently. Call model.eval() (running statistics), or use "
                "LayerNorm/GroupNorm"
            )
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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
    for name, p in params:
        check_finite(f"parameter {name!r}", p.detach(), "reset or reinitialise the model")
    return params


def check_inputs(inputs, targets) -> None:
    """Data checks that need no forward pass."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs hold an empty batch (shape {tuple(inputs.shape)}); pass at least one sample"
        )
    if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"targets (shape {tuple(targets.shape)}) must have one entry per sample: "
            f"inputs have a batch of {inputs.shape[0]}"
        )
    check_finite("inputs", inputs, "clean or impute the data before computing a direction")
    check_finite("targets", targets, "clean the targets before computing a direction")


def check_outputs(outputs: Tensor, targets: Tensor | None, loss: str) -> None:
    """Checks of the model's outputs and, when given, of the targets against them."""
    check_finite(
        "the model's outputs", outputs.detach(), "the forward pass overflowed; check the model"
    )
    N = outputs.shape[0]
    if loss == "cross_entropy" and outputs.ndim != 2:
        raise ValueError(
            f"loss='cross_entropy' needs outputs of shape (N, C) (logits), got {tuple(outputs.shape)}"
        )
    if targets is None:
        return
    if loss == "cross_entropy":
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(
                f"loss='cross_entropy' needs integer class indices as targets, got dtype {targets.dtype}; "
                "convert with targets.long() (probability targets are not supported)"
            )
        if targets.shape != (N,):
            raise ValueError(
                f"loss='cross_entropy' needs targets of shape (N,) = ({N},), got {tuple(targets.shape)}"
            )
        C = outputs.shape[1]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= C:
            raise ValueError(
                f"class indices must lie in [0, {C - 1}] for a model with {C} outputs; "
                f"targets range over [{low}, {high}]"
            )
    else:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"loss='mse' needs targets of the outputs' shape {tuple(outputs.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        if not targets.is_floating_point():
            raise ValueError(f"loss='mse' needs floating-point targets, got dtype {targets.dtype}")
