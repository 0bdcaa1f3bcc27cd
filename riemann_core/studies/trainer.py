"""One training run with one optimiser, shared by ``riemann-bench train`` and ``stability``.

The preconditioned methods take a plain SGD step along ``G^{-1} g``: ``pre.backward(loss)``
of a ``RiemannianPreconditioner`` in place of ``loss.backward()`` (one backward pass, no
second forward), then ``torch.optim.SGD``. Their learning rate is the step length along the
metric's direction and the damping ``mu`` is the mass of ``G = mu I + K^T K``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import riemann_core as rc

from ..measure.timing import synchronize
from .digits import Examples

#: a loss this many times its initial value counts as divergence (saturated tanh networks
#: keep the loss finite however far the parameters run away)
DIVERGED = 1e3
#: the statuses a run ends with (see :class:`Run`)
STATUSES = ("ok", "diverged", "solver failed")


@dataclass(frozen=True)
class Optimiser:
    """A method of the studies: the ``torch.optim`` rule and, if any, the metric before it."""

    rule: str  # "sgd" or "adam"
    metric: str | None = None  # one of rc.METHODS, None for the plain rules
    output_metric: str = "exact"
    kfac_damping: str = "exact"
    kfac_bias: str = "joint"

    @property
    def damped(self) -> bool:
        return self.metric is not None


OPTIMISERS: dict[str, Optimiser] = {
    "sgd": Optimiser("sgd"),
    "adam": Optimiser("adam"),
    "layerwise": Optimiser("sgd", "layerwise"),
    "layerwise-sampled": Optimiser("sgd", "layerwise", "sampled"),
    "natural": Optimiser("sgd", "natural"),
    "kfac": Optimiser("sgd", "kfac"),
    # the K-FAC users run: one-sample Monte Carlo Fisher, factored damping, bias apart
    "kfac-default": Optimiser("sgd", "kfac", "sampled", "factored", "separate"),
}


@dataclass(frozen=True)
class Config:
    """A method with its learning rate and (for the preconditioned ones) damping ``mu``."""

    method: str
    lr: float
    damping: float | None = None

    def __post_init__(self):
        if self.method not in OPTIMISERS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(OPTIMISERS)}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"learning rate must be positive and finite, got {self.lr}")
        damped = OPTIMISERS[self.method].damped
        if damped and not (self.damping is not None and 0 < self.damping < float("inf")):
            raise ValueError(
                f"method {self.method!r} needs a positive finite damping, got {self.damping}"
            )
        if not damped and self.damping is not None:
            raise ValueError(f"method {self.method!r} takes no damping, got {self.damping}")

    @property
    def label(self) -> str:
        mu = "" if self.damping is None else f", mu={self.damping:g}"
        return f"{self.method} (lr={self.lr:g}{mu})"


@dataclass
class Run:
    """What one run recorded: ``records`` (one dict per evaluation) and its ``status``."""

    records: list[dict] = field(default_factory=list)
    #: "diverged": NaN or inf (loss, gradient, direction or parameters), or a loss above
    #: DIVERGED x its start; "solver failed": the metric could not be factorised
    status: str = "ok"
    reason: str = ""


def evaluate(model: nn.Module, examples: Examples) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``examples``."""
    with torch.no_grad():
        logits = model(examples.inputs)
        loss = F.cross_entropy(logits, examples.targets)
        accuracy = (logits.argmax(dim=1) == examples.targets).float().mean()
    return float(loss), float(accuracy)


def batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Index batches of ``batch_size`` from successive random permutations of ``range(n)``.

    Drawn on the CPU from ``seed`` alone, so two runs with one seed see the same positions
    in the same order on every device (a batch may straddle two epochs).
    """
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch size must be between 1 and the {n} training examples, got {batch_size}"
        )
    generator = torch.Generator().manual_seed(seed)
    stream = torch.empty(0, dtype=torch.long)
    while True:
        while stream.numel() < batch_size:
            stream = torch.cat([stream, torch.randperm(n, generator=generator)])
        yield stream[:batch_size]
        stream = stream[batch_size:]


def train(
    model: nn.Module,
    data: Examples,
    config: Config,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int,
    evaluate_on: Mapping[str, Examples],
) -> Run:
    """Train ``model`` in place for ``steps`` mini-batch steps of ``config``'s method.

    Every ``eval_every`` steps (and at steps 0 and ``steps``) the loss and accuracy on each
    of ``evaluate_on`` are recorded with ``time_s``: the wall-clock spent in training steps
    so far (CUDA synchronised; evaluations not counted). A run whose loss, gradient or
    parameters become NaN or inf, or whose evaluated loss exceeds ``DIVERGED`` times its
    initial value, stops there with status ``diverged``; one whose metric cannot be
    factorised (:class:`rc.SolveError`) stops with ``solver failed``. Either way the
    reason is kept in ``Run.reason`` and the records so far are returned.
    """
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be positive, got {steps} and {eval_every}")
    spec = OPTIMISERS[config.method]
    device = data.inputs.device
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.rule == "adam":
        optimiser = torch.optim.Adam(params, lr=config.lr)
    else:
        optimiser = torch.optim.SGD(params, lr=config.lr)
    preconditioner = None
    if spec.damped:
        preconditioner = rc.RiemannianPreconditioner(
            model,
            method=spec.metric,
            damping=config.damping,
            output_metric=spec.output_metric,
            kfac_damping=spec.kfac_damping,
            kfac_bias=spec.kfac_bias,
            generator=torch.Generator(device).manual_seed(seed),
        )
    run = Run()
    elapsed = 0.0

    def record(step: int) -> bool:
        """Evaluate at ``step``; False, with the reason kept, where the run diverged."""
        row = {"step": step, "examples": step * batch_size, "time_s": elapsed}
        for name, examples in evaluate_on.items():
            row[f"{name}_loss"], row[f"{name}_accuracy"] = evaluate(model, examples)
        run.records.append(row)
        start = run.records[0]
        losses = [k for k in row if k.endswith("_loss")]
        if not all(_finite(v) for v in row.values()) or not _parameters_finite(params):
            run.reason = f"the loss or the parameters are NaN or inf at step {step}"
        elif blown := [k for k in losses if row[k] > DIVERGED * start[k]]:
            run.reason = (
                f"the {blown[0]} {row[blown[0]]:.3g} exceeds {DIVERGED:g} times its initial "
                f"{start[blown[0]]:.3g} at step {step}"
            )
        else:
            return True
        return False

    try:
        if not record(0):
            raise ValueError("the model's initial loss or parameters are not finite")
        order = batches(len(data), batch_size, seed)
        for step in range(1, steps + 1):
            rows = next(order).to(device)
            synchronize(device)
            start = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            x, y = data.inputs[rows], data.targets[rows]
            loss = F.cross_entropy(model(x), y)
            if preconditioner is None:
                loss.backward()
            else:
                try:  # one backward pass leaves G^{-1} g in .grad
                    preconditioner.backward(loss)
                except rc.SolveError as err:  # the metric could not be factorised
                    run.status, run.reason = "solver failed", str(err)
                    break
                except (ValueError, FloatingPointError) as err:
                    finite = (
                        _finite(loss.item())
                        and _parameters_finite(params)
                        and _gradient_finite(F.cross_entropy(model(x), y), params)
                    )
                    if isinstance(err, ValueError) and finite:
                        raise  # not a divergence: a real error
                    run.status, run.reason = "diverged", str(err)
                    break
            optimiser.step()
            synchronize(device)
            elapsed += time.perf_counter() - start
            if (step % eval_every == 0 or step == steps) and not record(step):
                run.status = "diverged"
                break
    finally:
        if preconditioner is not None:
            preconditioner.remove()
    return run


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _parameters_finite(params: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def _gradient_finite(loss: Tensor, params: list[Tensor]) -> bool:
    """Whether ``loss``'s plain gradient is finite: a refused non-finite one (the
    preconditioner leaves ``.grad`` as it was) is a divergence, as SGD's run records it."""
    gradients = torch.autograd.grad(loss, params, allow_unused=True)
    return all(g is None or bool(torch.isfinite(g).all()) for g in gradients)
