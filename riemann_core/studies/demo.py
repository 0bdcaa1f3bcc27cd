"""``riemann-bench demo``: every method's direction on a batch of handwritten digits."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ..arguments import Command
from ..measure.environment import environment
from ..measure.output import results_directory, set_aside, write_json
from ..measure.problems import mlp
from ..measure.timing import measure
from .digits import standardiser

HELP = "compare every method's direction on a small digits classifier"
DESCRIPTION = (
    "Compute the direction of every method in riemann_core.METHODS (layerwise with both "
    "kernels) for one batch of scikit-learn's handwritten digits and a tanh MLP in "
    "float64 with cross-entropy, and print each method's median time and its relative "
    "difference and cosine similarity to the full damped Gauss-Newton direction. With "
    "--out, also writes them to demo.json there (an earlier one moved into "
    "earlier-<UTC time>/ first)."
)
EXAMPLE = "demo --quick --seed 1 --out results/demo"


@dataclass(frozen=True)
class _DemoSize:
    widths: tuple[int, ...]  # layer widths, input first
    batch: int
    repeats: int  # timed calls per method, after one warm-up call


_DEMO = _DemoSize(widths=(64, 32, 32, 10), batch=128, repeats=5)
_DEMO_QUICK = _DemoSize(widths=(64, 16, 10), batch=64, repeats=3)
_DEMO_DAMPING = 1e-3
_DEMO_EXPLANATION = (
    "full and natural solve the same damped Gauss-Newton system, so they must agree to round-off.",
    "layerwise (its diagonal blocks) and kfac (Kronecker-factored blocks) are approximations of full.",
    "euclidean is the plain gradient: the baseline without a metric.",
)


def _batch(
    features: np.ndarray, labels: np.ndarray, batch: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` distinct samples, features standardised over the whole data set."""
    features = standardiser(features)(features)
    rows = np.random.default_rng(seed).choice(len(labels), size=batch, replace=False)
    inputs = torch.as_tensor(features[rows], dtype=torch.float64, device=device)
    targets = torch.as_tensor(labels[rows], dtype=torch.long, device=device)
    return inputs, targets


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        return _demo(args)
    # an unusable --out fails before the work; one made for a demo that fails or is
    # interrupted is removed again (found by a hunt: an empty directory was left)
    with results_directory(args.out):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    try:
        from sklearn.datasets import load_digits
        from tqdm import tqdm
    except ImportError as err:
        # exit code 2, a missing extra, not SystemExit(message)'s 1, which reads as a finding
        print(
            f"riemann-bench demo: error: it needs the 'demo' extra ({err}); install it with: "
            'python -m pip install -c constraints.txt -e ".[demo]"',
            file=sys.stderr,
        )
        raise SystemExit(2) from err
    import riemann_core as rc

    size = _DEMO_QUICK if args.quick else _DEMO
    device = args.device
    inputs, targets = _batch(*load_digits(return_X_y=True), size.batch, args.seed, device)
    torch.manual_seed(args.seed)
    model = mlp(size.widths).to(device=device, dtype=torch.float64)
    names = [name for name, _ in model.named_parameters()]
    n_params = sum(p.numel() for p in model.parameters())

    runs = []
    for method in rc.METHODS:
        runs.append((method, "structured"))
        if method == "layerwise":
            runs.append((method, "generic"))

    directions, times = {}, {}
    progress = tqdm(runs, desc="directions", unit="method", leave=False, file=sys.stderr)
    for method, kernel in progress:
        progress.set_postfix_str(f"{method} ({kernel})")

        def call(method=method, kernel=kernel):
            return rc.direction(
                model,
                inputs,
                targets,
                loss="cross_entropy",
                method=method,
                damping=_DEMO_DAMPING,
                kernel=kernel,
            )

        direction = call()  # also the warm-up call
        times[method, kernel] = measure(call, repeats=size.repeats, warmup=0, device=device)
        directions[method, kernel] = torch.cat([direction[n].reshape(-1) for n in names])

    reference = directions["full", "structured"]
    results = []
    for method, kernel in runs:
        vector = directions[method, kernel]
        results.append(
            {
                "method": method,
                "kernel": kernel,
                "time_ms": times[method, kernel].median * 1e3,
                "iqr_ms": times[method, kernel].iqr * 1e3,
                "times_ms": [t * 1e3 for t in times[method, kernel].times],
                "rel_diff_to_full": ((vector - reference).norm() / reference.norm()).item(),
                "cosine_to_full": torch.nn.functional.cosine_similarity(
                    vector, reference, dim=0
                ).item(),
            }
        )

    architecture = "-".join(map(str, size.widths))
    print(
        f"digits (scikit-learn), MLP {architecture} tanh, {n_params:,} parameters, "
        f"batch {size.batch}, float64, cross-entropy, damping {_DEMO_DAMPING:g}, "
        f"device {device}, seed {args.seed}"
    )
    print(f"times: median of {size.repeats} calls after one warm-up call\n")
    print(
        f"{'method':<10} {'kernel':<10} {'time [ms]':>10} {'rel. diff to full':>18} "
        f"{'cosine to full':>15}"
    )
    for row in results:
        print(
            f"{row['method']:<10} {row['kernel']:<10} {row['time_ms']:>10.2f} "
            f"{row['rel_diff_to_full']:>18.2e} {row['cosine_to_full']:>15.6f}"
        )
    print()
    print("\n".join(_DEMO_EXPLANATION))

    if args.out is not None:
        payload = {
            "command": args.command_line,
            "config": {
                "dataset": "sklearn.datasets.load_digits, standardised",
                "widths": list(size.widths),
                "activation": "tanh",
                "parameters": n_params,
                "batch": size.batch,
                "dtype": "float64",
                "loss": "cross_entropy",
                "output_metric": "exact",
                "damping": _DEMO_DAMPING,
                "repeats": size.repeats,
                "quick": args.quick,
                "seed": args.seed,
                "device": str(device),
            },
            "environment": environment(device),
            "results": results,
        }
        # a demo again into its --out: the earlier record kept, apart (found by a hunt)
        earlier = set_aside(args.out, ("demo.json",))
        path = write_json(args.out, "demo.json", payload)
        print(
            f"\nwrote {path}" + (f" (the earlier demo.json moved to {earlier})" if earlier else "")
        )
    return 0


COMMAND = Command("demo", run, HELP, DESCRIPTION, EXAMPLE)
