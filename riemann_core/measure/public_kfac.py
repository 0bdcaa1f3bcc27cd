"""The public K-FAC we measure ours against: curvlinops, variant for variant.

curvlinops (``pip install -e ".[compare]"``) is a widely used K-FAC for PyTorch:
``KFACLinearOperator`` builds the factors, ``KFACInverseLinearOperator`` damps and
inverts them. Its defaults are a one-sample Monte Carlo Fisher and weight and bias
apart. A :class:`Variant` names the same K-FAC in both:

==================  ======================================  ==============================
ours                ``output_metric="exact"``               ``fisher_type="type-2"``
                    ``output_metric="sampled"`` (1 probe)   ``fisher_type="mc"``,
                                                            ``mc_samples=1``
                    ``kfac_damping="exact"``                ``use_exact_damping=True``
                    ``kfac_damping="factored"``             ``use_heuristic_damping=True``,
                                                            ``min_damping=0``
                    ``kfac_bias="joint"``                   ``separate_weight_and_bias=False``
                    ``kfac_bias="separate"``                ``separate_weight_and_bias=True``
==================  ======================================  ==============================

curvlinops floors each factor's share of the factored damping at ``min_damping``
(``1e-8`` by default); ours splits ``mu`` as Martens & Grosse do, unfloored, so the
comparison passes ``min_damping=0`` (found by a hunt: with the floor, a layer whose output
factor is small against its input factor, ``pi sqrt(mu) < 1e-8``, as before a head of
small weights or in a confident classifier, got another metric, 0.6 off in the direction).

Both calls run from scratch: the loss gradient, the factors of the batch, their
damped inverses and the product with the gradient. curvlinops takes the gradient from
the caller, so its call includes one more forward and backward pass for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import riemann_core as rc

INSTALL = 'python -m pip install -c constraints.txt -e ".[compare]" (in the repository root)'


@dataclass(frozen=True)
class Variant:
    """One K-FAC: its Fisher, its damping and where the bias goes."""

    output_metric: str  # "exact" (type-2) or "sampled" (one-sample Monte Carlo)
    damping: str  # "exact" or "factored"
    bias: str  # "joint" or "separate"

    @property
    def name(self) -> str:
        fisher = "type2" if self.output_metric == "exact" else "mc"
        return f"{fisher}-{self.damping}-{self.bias}"

    def options(self) -> dict:
        """Its options of ``rc.direction``."""
        return dict(
            method="kfac",
            output_metric=self.output_metric,
            kfac_damping=self.damping,
            kfac_bias=self.bias,
        )


VARIANTS = tuple(
    Variant(fisher, damping, bias)
    for fisher in ("exact", "sampled")
    for damping in ("exact", "factored")
    for bias in ("joint", "separate")
)
#: What K-FAC users run: curvlinops' defaults (Monte Carlo Fisher, weight and bias
#: apart) with the damping of Martens & Grosse, factored by the traces.
DEFAULT = Variant("sampled", "factored", "separate")


def available() -> bool:
    """Whether curvlinops can be imported."""
    try:
        _curvlinops()
    except ImportError:
        return False
    return True


def _curvlinops():
    """curvlinops, imported without the warning its dependency linear_operator raises at
    import (it calls ``torch.jit.script``, which torch 2.13 deprecates: a
    DeprecationWarning there, a FutureWarning, shown by default, from torch 2.14): a note
    on that library's internals, which a user of the comparison cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
        import curvlinops
    return curvlinops


def ours(
    model: nn.Module, inputs: Tensor, targets: Tensor, variant: Variant, *, damping: float,
    loss: str = "cross_entropy", seed: int = 0,
) -> Callable[[], dict[str, Tensor]]:  # fmt: skip
    """A call of ``rc.direction`` in ``variant`` (a generator seeded by ``seed``)."""
    device = inputs.device

    def call():
        generator = torch.Generator(device).manual_seed(seed)
        return rc.direction(
            model, inputs, targets, loss=loss, damping=damping, generator=generator,
            **variant.options(),
        )  # fmt: skip

    return call


def public(
    model: nn.Module, inputs: Tensor, targets: Tensor, variant: Variant, *, damping: float,
    loss: str = "cross_entropy", seed: int = 0,
) -> Callable[[], dict[str, Tensor]]:  # fmt: skip
    """A call of curvlinops' K-FAC in ``variant`` on the gradient, from scratch.

    Raises ``ImportError`` naming the install command when curvlinops is absent.
    """
    try:
        curvlinops = _curvlinops()
    except ImportError as err:
        raise ImportError(
            f"the public K-FAC comparison needs curvlinops; install it with {INSTALL}"
        ) from err
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    loss_fn = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    mean_loss = F.cross_entropy if loss == "cross_entropy" else F.mse_loss

    def call():
        gradient = torch.autograd.grad(mean_loss(model(inputs), targets), params)
        kfac = curvlinops.KFACLinearOperator(
            model,
            loss_fn,
            params,
            [(inputs, targets)],
            check_deterministic=False,
            seed=seed,
            fisher_type="type-2" if variant.output_metric == "exact" else "mc",
            mc_samples=1,
            separate_weight_and_bias=variant.bias == "separate",
            num_data=inputs.shape[0],
            num_per_example_loss_terms=1,
        )
        inverse = curvlinops.KFACInverseLinearOperator(
            kfac,
            damping=damping,
            use_exact_damping=variant.damping == "exact",
            use_heuristic_damping=variant.damping == "factored",
            min_damping=0.0,  # Martens & Grosse's split, unclamped, as ours
        )
        directions = inverse @ list(gradient)
        return {n: d for (n, _), d in zip(named, directions, strict=True)}

    return call
