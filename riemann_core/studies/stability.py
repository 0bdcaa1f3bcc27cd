"""``riemann-bench stability``: how far one replaced training example moves the trained model.

The paper bounds the algorithmic stability of training with the layerwise metric by
``O(kappa^2 L / (xi mu sqrt(n)))``: distances between models trained on neighbouring
training sets ``S`` and ``S'`` (one example replaced) should fall like ``mu^-1`` in the
damping and ``n^-1/2`` in the training-set size. For every damping ``mu``, size ``n`` and
pair seed this trains two models with one seed (same initialisation, same batch positions,
same Fisher samples) on ``S`` and ``S'`` and measures

- ``param_distance``: ``||theta_S - theta_S'||_2`` over all parameters;
- ``prediction_distance``: mean over the test split of the total-variation distance
  ``0.5 ||p_S(x) - p_S'(x)||_1`` between the predicted class probabilities;
- ``loss_gap``: mean over the test split of ``|l(theta_S; z) - l(theta_S'; z)|`` (the
  quantity uniform stability bounds).

A pair in which either run ends with more than half its initial training loss (it failed to
train) is recorded with status ``not trained``, its distances kept, and left out of the fits.

It then fits log-log slopes in ``mu`` (at each ``n``) and in ``n`` (at each ``mu``) with
bootstrap intervals over the pairs, and a joint ``log D = a + b log mu + c log n``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..arguments import (
    Command,
    check_at_most,
    check_choices,
    check_distinct,
    check_report_only,
    default_out,
    floats,
    ints,
    names,
)
from . import digits
from .stability_fit import METRICS
from .trainer import DIVERGED, OPTIMISERS, Config, train
from .trainer import STATUSES as RUN_STATUSES
from .training import DTYPES, check_dampings_hold

HELP = "distance between models trained on neighbouring data sets, against damping and size"
DESCRIPTION = (
    "Train pairs of models with one seed on training sets that differ in one example, "
    "over a grid of damping mu and training-set size n; measure the distance between "
    "their parameters and their predictions, fit log-log slopes with bootstrap intervals "
    "and set them beside the stability bound's mu^-1 and n^-1/2. Writes pairs.csv, "
    "slopes.csv, figures and report.md to reports/<device>/stability/ "
    "(reports/<device>/quick/stability/ with --quick)."
)
EXAMPLE = "stability --quick --dampings 0.01,0.1,1 --sizes 150,300,600"

#: damped methods only: the damping axis is what the bound is about
METHODS = tuple(m for m, spec in OPTIMISERS.items() if spec.damped)
TEST_SHARE = 0.2
#: a pair's status: its runs' (the first that is not ok), or "not trained" (kept, not fitted)
STATUSES = (*RUN_STATUSES, "not trained")
#: The most pair seeds per grid point: the default sweep's 5 take 10 minutes on 2 CPU
#: cores, these about 33 hours (and the report resamples them).
MAX_PAIRS = 1000
#: The most training steps per run: the default sweep's 300 take 10 minutes on 2 CPU cores,
#: these about 55 hours.
MAX_STEPS = 100_000


@dataclass(frozen=True)
class Sweep:
    methods: tuple[str, ...]
    dampings: tuple[float, ...]
    sizes: tuple[int, ...]
    pairs: int  # pair seeds per (method, mu, n)
    steps: int
    lr: float
    batch_size: int
    model: str
    dtype: str


DEFAULT = Sweep(
    methods=("layerwise", "natural"),
    dampings=(1e-3, 1e-2, 1e-1, 1.0),
    sizes=(150, 300, 600, 1200),
    pairs=5,
    steps=300,
    lr=0.1,
    batch_size=32,
    model="mlp",
    dtype="float64",
)
QUICK = Sweep(
    **{
        **asdict(DEFAULT),
        "methods": ("layerwise",),
        "sizes": (150, 300, 600),
        "pairs": 3,
        "steps": 200,
    }
)


#: the options that describe the sweep (``--report-only`` reads the recorded one)
SWEEP_OPTIONS = ("methods", "dampings", "sizes", "pairs", "steps", "lr", "batch_size", "model",
                 "dtype")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sweep (defaults: the default sweep, or the quick one)")
    group.add_argument(
        "--methods", type=names, help=f"comma-separated subset of {', '.join(METHODS)}"
    )
    group.add_argument("--dampings", type=floats, metavar="A,B,..", help="values of mu")
    group.add_argument("--sizes", type=ints, metavar="A,B,..", help="training-set sizes n")
    group.add_argument(
        "--pairs",
        type=int,
        help="pairs (seeds) per point: at least 5 for an interval (a verdict), at most "
        f"{MAX_PAIRS}",
    )
    group.add_argument(
        "--steps",
        type=int,
        help=f"training steps per run, the same for every n (at most {MAX_STEPS})",
    )
    group.add_argument("--lr", type=float, help="learning rate, the same for every point")
    group.add_argument("--batch-size", type=int, help="examples per step")
    group.add_argument("--model", choices=digits.MODELS, help="the network trained")
    group.add_argument("--dtype", choices=tuple(DTYPES), help="parameter and data dtype")
    group.add_argument(
        "--report-only",
        action="store_true",
        help="fit the slopes again (slopes.csv, joint_slopes.csv) and redraw the figures and "
        "report.md from the results in --out, without training",
    )


def sweep_from(args: argparse.Namespace) -> Sweep:
    """The sweep the options describe; a bad option raises ``ValueError`` before any work."""
    spec = asdict(QUICK if args.quick else DEFAULT)
    for name in spec:
        if getattr(args, name, None) is not None:
            spec[name] = getattr(args, name)
    return check_work(check_sweep(Sweep(**spec)))


def sweep_of(record: dict) -> Sweep:
    """The sweep ``stability.json`` records (``asdict`` of a :class:`Sweep`), checked as the
    command checks its options."""
    lists = {k: tuple(v) for k, v in record.items() if isinstance(v, list)}
    return check_sweep(Sweep(**{**record, **lists}))


def check_sweep(sweep: Sweep) -> Sweep:
    """``sweep``, or ``ValueError`` naming the option it may not hold and the fix."""
    check_choices("method", sweep.methods, METHODS)
    check_choices("model", (sweep.model,), digits.MODELS)
    check_choices("dtype", (sweep.dtype,), tuple(DTYPES))
    largest = torch.finfo(DTYPES[sweep.dtype]).max  # (past it: a traceback, found by a hunt)
    if not sweep.dampings or not all(0 < mu <= largest for mu in sweep.dampings):
        raise ValueError(
            f"every damping must be positive and at most the largest {sweep.dtype} "
            f"({largest:.3g}), got {list(sweep.dampings)}"
        )
    if not sweep.sizes or min(sweep.sizes) < 2:
        raise ValueError(f"every training-set size must be at least 2, got {list(sweep.sizes)}")
    check_distinct("--dampings", sweep.dampings)
    check_distinct("--sizes", sweep.sizes)
    if sweep.pairs < 1 or sweep.steps < 1:
        raise ValueError(
            f"--pairs and --steps must be positive, got {sweep.pairs} and {sweep.steps}"
        )
    if not 0 < sweep.lr <= largest:
        raise ValueError(
            f"--lr must be positive and at most the largest {sweep.dtype} ({largest:.3g}), "
            f"got {sweep.lr}"
        )
    if not 1 <= sweep.batch_size <= min(sweep.sizes):
        raise ValueError(
            f"--batch-size must be between 1 and the smallest size {min(sweep.sizes)}, "
            f"got {sweep.batch_size}"
        )
    return sweep


def check_work(sweep: Sweep) -> Sweep:
    """``sweep``, or ``ValueError`` where it could not finish: more pairs or steps than its
    bounds, dampings that are 0 in its dtype. Options of a new sweep only: a record of one
    that ran past them (written before they were set) finished, and is redrawn (found by
    review)."""
    check_dampings_hold(sweep.dampings, sweep.dtype)
    # (found by a hunt: 10**20 pairs were killed for memory, 10**20 steps ran without end)
    check_at_most("--pairs", sweep.pairs, MAX_PAIRS, "the most pair seeds a sweep trains")
    check_at_most(
        "--steps",
        sweep.steps,
        MAX_STEPS,
        "the most steps a sweep trains a run for "
        f"({MAX_STEPS} steps: about 55 hours of the default sweep on 2 CPU cores)",
    )
    return sweep


def out_dir(args: argparse.Namespace) -> Path:
    return default_out(args, "stability")


def report_table(args: argparse.Namespace) -> Path:
    """The table ``--report-only`` needs last: written after the first pair, beside the
    record written before."""
    return out_dir(args) / "pairs.csv"


@dataclass(frozen=True)
class Pool:
    """Standardised examples to draw training sets from, and a fixed test split."""

    features: np.ndarray
    labels: np.ndarray
    test: digits.Examples


def load_pool(seed: int, device: torch.device, dtype: torch.dtype) -> Pool:
    """The digits minus a stratified test split; standardised with the pool's statistics,
    so that replacing one training example leaves the inputs' scaling unchanged."""
    features, labels = digits.load_digits_arrays()
    test, pool = digits.stratified_split(labels, (TEST_SHARE,), seed)
    scale = digits.standardiser(features[pool])
    return Pool(
        scale(features[pool]),
        labels[pool],
        digits.to_examples(scale(features[test]), labels[test], device, dtype),
    )


def neighbours(pool_size: int, n: int, seed: int) -> tuple[np.ndarray, int, int]:
    """A training set of ``n`` pool rows, the position replaced and the row replacing it."""
    if not 2 <= n < pool_size:
        raise ValueError(f"training-set size must be between 2 and {pool_size - 1}, got {n}")
    rng = np.random.default_rng(seed)
    rows = rng.permutation(pool_size)
    return rows[:n], int(rng.integers(n)), int(rows[n])


def pair_distance(
    pool: Pool,
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    config: Config,
    *,
    model: str,
    seed: int,
    steps: int,
    batch_size: int,
) -> dict:
    """Train one model on each of the row sets with one seed; their distances and statuses."""
    device, dtype = pool.test.inputs.device, pool.test.inputs.dtype
    trained = []
    for rows in (rows_a, rows_b):
        net = digits.build_model(model, seed, device, dtype)
        examples = digits.to_examples(pool.features[rows], pool.labels[rows], device, dtype)
        run = train(
            net,
            examples,
            config,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            eval_every=steps,
            evaluate_on={"train": examples},
        )
        trained.append((net, run))
    (net_a, run_a), (net_b, run_b) = trained
    row = {
        "status": run_a.status if run_a.status != "ok" else run_b.status,
        "train_loss_a": run_a.records[-1]["train_loss"],
    }
    if row["status"] != "ok":
        return {**row, **dict.fromkeys(METRICS, math.nan)}
    if any(r.records[-1]["train_loss"] > r.records[0]["train_loss"] / 2 for r in (run_a, run_b)):
        # the bound is about training that converges; such a pair is kept but not fitted
        row["status"] = "not trained"
    with torch.no_grad():
        theta = [torch.cat([p.reshape(-1) for p in n.parameters()]) for n in (net_a, net_b)]
        logits_a, logits_b = net_a(pool.test.inputs), net_b(pool.test.inputs)
        tv = 0.5 * (logits_a.softmax(1) - logits_b.softmax(1)).abs().sum(1)
        loss_a = F.cross_entropy(logits_a, pool.test.targets, reduction="none")
        loss_b = F.cross_entropy(logits_b, pool.test.targets, reduction="none")
        distances = {
            "param_distance": float((theta[0] - theta[1]).norm()),
            "prediction_distance": float(tv.mean()),
            "loss_gap": float((loss_a - loss_b).abs().mean()),
        }
        # a run whose training loss saturated while its parameters ran away (found by a hunt:
        # at --lr 1e30 pairs 1e33 apart, test losses ~1e32, trained to a loss of 0, were
        # fitted, and their damping slope "agreed with the bound"): its test loss is above
        # DIVERGED times the initial one, as the training study's divergence check counts it
        start = F.cross_entropy(digits.build_model(model, seed, device, dtype)(pool.test.inputs),
                                pool.test.targets)  # fmt: skip
        blown = max(float(loss_a.mean()), float(loss_b.mean())) > DIVERGED * float(start)
    if row["status"] == "ok" and blown:
        return {**row, "status": "diverged", **dict.fromkeys(METRICS, math.nan)}
    if not all(map(math.isfinite, distances.values())):  # parameters blown up (found by a
        # hunt: --lr 1e300 wrote an ok pair at distance inf, which its own report refused)
        return {**row, "status": "diverged", **dict.fromkeys(METRICS, math.nan)}
    return {**row, **distances}


#: What a study writes into its ``--out`` (a new one sets an earlier one's aside).
STUDY_FILES = ("stability.json", "pairs.csv", "slopes.csv", "joint_slopes.csv", "report.md",
               "distance_vs_*.png")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from .stability_report import write_report

    out = out_dir(args)
    if args.report_only:
        check_report_only(args, "sweep", SWEEP_OPTIONS, "stability")
        print(f"wrote {write_report(out)}")
        return 0
    sweep = sweep_from(args)
    from tqdm import tqdm

    from ..measure.environment import environment
    from ..measure.output import (
        check_not_foreign,
        results_directory,
        set_aside,
        write_atomic,
        write_json,
    )

    device = torch.device(args.device)
    env = environment(device)  # now: the code that runs, whatever happens to the tree later
    pool = load_pool(args.seed, device, DTYPES[sweep.dtype])
    if max(sweep.sizes) >= len(pool.labels):
        raise ValueError(
            f"--sizes may be at most {len(pool.labels) - 1} (the digits outside the test "
            f"split, less one replacement), got {max(sweep.sizes)}"
        )
    check_not_foreign(out, "stability.json")
    # made now, so that an unusable --out fails before training; removed again (with the
    # parents made for it) if the sweep fails or is interrupted before writing into it
    with results_directory(out):
        meta = {
            "command": args.command_line,
            "sweep": asdict(sweep),
            "seed": args.seed,  # also the bootstrap seed of the fits
            "pool": len(pool.labels),
            "test": len(pool.test),
            "environment": env,
        }
        # not beside an earlier sweep's record, pairs, slopes, figures or report: those kept apart
        earlier = set_aside(out, STUDY_FILES)
        if earlier is not None:
            print(f"the earlier study in {out} moved to {earlier}", file=sys.stderr)
        write_json(out, "stability.json", meta)
        points = [
            (p, n, method, mu)
            for p in range(sweep.pairs)
            for n in sweep.sizes
            for method in sweep.methods
            for mu in sweep.dampings
        ]
        rows = []
        for p, n, method, mu in tqdm(points, desc="stability", unit="pair", file=sys.stderr):
            seed = args.seed + p
            # one neighbouring pair per (pair seed, n), shared by every method and mu
            train_rows, position, replacement = neighbours(len(pool.labels), n, seed * 7919 + n)
            replaced = train_rows.copy()
            replaced[position] = replacement
            result = pair_distance(
                pool,
                train_rows,
                replaced,
                Config(method, sweep.lr, mu),
                model=sweep.model,
                seed=seed,
                steps=sweep.steps,
                batch_size=sweep.batch_size,
            )
            rows.append(
                {
                    "method": method,
                    "damping": mu,
                    "size": n,
                    "pair": p,
                    "seed": seed,
                    "replaced_row": int(train_rows[position]),
                    "replacement_row": replacement,
                    **result,
                }
            )
            # after every pair, so that an interrupted sweep keeps what it measured
            write_atomic(out / "pairs.csv", pd.DataFrame(rows).to_csv(index=False))
    print(f"wrote {write_report(out)}")
    return 0


COMMAND = Command(
    "stability", run, HELP, DESCRIPTION, EXAMPLE, add_arguments, report_table=report_table
)
