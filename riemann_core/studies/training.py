"""``riemann-bench train``: every method trained on handwritten digits, tuned alike, timed alike.

For each model and method, every configuration of a small learning-rate (and damping) grid
is trained once on the training split with a tuning seed; the one with the lowest final
validation loss is then trained with ``--seeds`` other seeds, the methods interleaved seed
by seed so that machine noise falls on all of them alike. Every run sees the same budget
of examples. Results go to ``runs.csv`` (curves), ``tuning.csv`` (the grid) and
``training.json`` (configuration, split, environment, command); ``report.md`` and the
figures are drawn from them (``--report-only`` redraws them without training).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._checks import damping_vanishes
from ..arguments import (
    Command,
    check_at_most,
    check_choices,
    check_distinct,
    check_report_only,
    default_out,
    floats,
    names,
)
from . import digits
from .trainer import OPTIMISERS, Config, train

if TYPE_CHECKING:  # pandas is imported where it is used: `riemann-bench` runs without it
    import pandas as pd

HELP = "train every method on handwritten digits: curves, time-to-target, report"
DESCRIPTION = (
    "Train an MLP and a small CNN on scikit-learn's handwritten digits with sgd, adam, "
    "layerwise (exact and sampled Fisher), natural, kfac (exact Fisher, exact damping) and "
    "kfac-default (what K-FAC users run: one-sample Monte Carlo Fisher, factored damping, "
    "bias apart). Each method's learning rate "
    "(and damping) is chosen on a validation split; the chosen configuration is then "
    "trained with several seeds on the same budget of examples. Writes the curves of "
    "train/test loss and accuracy against steps and wall-clock, steps- and time-to-target "
    "tables with their spread over seeds, figures and report.md to "
    "reports/<device>/training/ (reports/<device>/quick/training/ with --quick)."
)
EXAMPLE = "train --quick --models mlp --methods sgd,layerwise,natural"

METHODS = tuple(OPTIMISERS)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: test and validation shares of the 1,797 digits (stratified); the rest is the training split
SPLIT = (0.2, 0.2)
#: The most seeds a study trains the chosen configurations with: each one more run of every
#: model and method, about a minute of the default study on 2 CPU cores (16 hours for all).
MAX_SEEDS = 1000
#: The longest budget, in epochs: the default study's 20 take 13 minutes on 2 CPU cores, these
#: about 11 hours (a smaller --batch-size takes more steps for as many epochs).
MAX_EPOCHS = 1000


@dataclass(frozen=True)
class Study:
    """What ``train`` runs: models x methods x grid, then ``seeds`` runs of each choice."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    lrs: dict[str, tuple[float, ...]]
    dampings: tuple[float, ...]
    seeds: int
    epochs: float
    batch_size: int
    evaluations: int  # evaluations per run, evenly spaced in steps
    target_accuracy: float
    dtype: str

    def configs(self, method: str) -> list[Config]:
        mus = self.dampings if OPTIMISERS[method].damped else (None,)
        return [Config(method, lr, mu) for lr in self.lrs[method] for mu in mus]


_LRS = {
    "sgd": (0.1, 0.3, 1.0, 3.0),
    "adam": (1e-3, 3e-3, 1e-2, 3e-2),
    "damped": (0.03, 0.1, 0.3, 1.0),
}
DEFAULT = Study(
    models=digits.MODELS,
    methods=METHODS,
    lrs={m: _LRS["damped" if s.damped else m] for m, s in OPTIMISERS.items()},
    dampings=(1e-2, 1e-1, 1.0),
    seeds=5,
    epochs=20,
    batch_size=32,
    evaluations=40,
    target_accuracy=0.95,
    dtype="float32",
)
_QUICK_LRS = {"sgd": (0.3, 1.0, 3.0), "adam": (3e-3, 1e-2, 3e-2), "damped": (0.1, 0.3, 1.0)}
QUICK = Study(
    **{
        **asdict(DEFAULT),
        "lrs": {m: _QUICK_LRS["damped" if s.damped else m] for m, s in OPTIMISERS.items()},
        "dampings": (1e-1, 1.0),
        "seeds": 3,
        "epochs": 8,
        "evaluations": 20,
    }
)


#: the options that describe the study (``--report-only`` reads the recorded one)
STUDY_OPTIONS = ("models", "methods", "lrs", "dampings", "seeds", "epochs", "batch_size",
                 "evaluations", "target_accuracy", "dtype")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("study (defaults: the default study, or the quick one)")
    group.add_argument(
        "--models", type=names, help=f"comma-separated subset of {', '.join(digits.MODELS)}"
    )
    group.add_argument(
        "--methods", type=names, help=f"comma-separated subset of {', '.join(METHODS)}"
    )
    group.add_argument(
        "--lrs", type=floats, metavar="A,B,..", help="learning-rate grid for every method"
    )
    group.add_argument(
        "--dampings",
        type=floats,
        metavar="A,B,..",
        help="damping grid of the preconditioned methods",
    )
    group.add_argument(
        "--seeds",
        type=int,
        help=f"seeds per chosen configuration (at least 3 for a spread, at most {MAX_SEEDS})",
    )
    group.add_argument(
        "--epochs",
        type=float,
        help=f"budget in passes over the training split, the same for all (at most {MAX_EPOCHS})",
    )
    group.add_argument("--batch-size", type=int, help="examples per step")
    group.add_argument("--evaluations", type=int, help="evaluations per run (points on each curve)")
    group.add_argument(
        "--target-accuracy", type=float, help="test accuracy for steps- and time-to-target"
    )
    group.add_argument("--dtype", choices=tuple(DTYPES), help="parameter and data dtype")
    group.add_argument(
        "--report-only",
        action="store_true",
        help="redraw the figures and report.md from the results in --out, without training",
    )


def study_from(args: argparse.Namespace) -> Study:
    """The study the options describe; a bad option raises ``ValueError`` before any work."""
    spec = asdict(QUICK if args.quick else DEFAULT)
    for name in (
        "models",
        "methods",
        "dampings",
        "seeds",
        "epochs",
        "batch_size",
        "evaluations",
        "target_accuracy",
        "dtype",
    ):
        if getattr(args, name, None) is not None:
            spec[name] = getattr(args, name)
    if getattr(args, "lrs", None) is not None:
        spec["lrs"] = dict.fromkeys(METHODS, args.lrs)
    return check_work(check_study(Study(**spec)))


def study_of(record: dict) -> Study:
    """The study ``training.json`` records (``asdict`` of a :class:`Study`), checked as the
    command checks its options."""
    lists = {k: tuple(v) for k, v in record.items() if isinstance(v, list)}
    lrs = {m: tuple(v) for m, v in record["lrs"].items()}
    return check_study(Study(**{**record, **lists, "lrs": lrs}))


def check_study(study: Study) -> Study:
    """``study``, or ``ValueError`` naming the option it may not hold and the fix."""
    check_choices("model", study.models, digits.MODELS)
    check_choices("method", study.methods, METHODS)
    check_choices("dtype", (study.dtype,), tuple(DTYPES))
    lacking = [m for m in study.methods if m not in study.lrs]
    if lacking:
        raise ValueError(f"no learning rates for method(s) {lacking}")
    # at most the dtype's largest number (found by a hunt: 1e300 crashed the study, exit 3)
    largest = torch.finfo(DTYPES[study.dtype]).max
    for option, values in (("--lrs", sum(study.lrs.values(), ())), ("--dampings", study.dampings)):
        bad = list(dict.fromkeys(v for v in values if not 0 < v <= largest))  # once each
        if bad or not values:
            raise ValueError(
                f"{option} must be positive and at most the largest {study.dtype} "
                f"({largest:.3g}), got {bad or list(values)}"
            )
    for values in study.lrs.values():
        check_distinct("--lrs", values)
    check_distinct("--dampings", study.dampings)
    if study.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {study.seeds}")
    if not 0 < study.epochs < math.inf:
        raise ValueError(f"--epochs must be positive and finite, got {study.epochs}")
    if study.batch_size < 1 or study.evaluations < 1:
        raise ValueError(
            f"--batch-size and --evaluations must be positive, got {study.batch_size} "
            f"and {study.evaluations}"
        )
    if not 0 < study.target_accuracy <= 1:
        raise ValueError(f"--target-accuracy must lie in (0, 1], got {study.target_accuracy}")
    return study


def check_work(study: Study) -> Study:
    """``study``, or ``ValueError`` where it could not finish: more seeds or epochs than
    its bounds, dampings that are 0 in its dtype. Options of a new study only: a record of
    one that ran past them (written before they were set) finished, and is redrawn
    (found by review)."""
    check_dampings_hold(study.dampings, study.dtype)
    # (found by a hunt: 10**20 seeds were killed for memory, 1e300 epochs ran without end)
    check_at_most(
        "--seeds",
        study.seeds,
        MAX_SEEDS,
        "the most a study trains (each one more run of every model and method)",
    )
    check_at_most(
        "--epochs",
        study.epochs,
        MAX_EPOCHS,
        "the longest budget a study trains for "
        f"({MAX_EPOCHS} epochs: about 11 hours of the default study at its batch size on 2 "
        "CPU cores)",
    )
    return study


def check_dampings_hold(dampings: tuple[float, ...], dtype: str) -> None:
    """``ValueError`` naming the ``dampings`` that are 0 in ``dtype``, the dtype a study
    trains in, and the fix (found by a hunt: ``--dampings 1e-320`` in float32 passed, and
    the preconditioner refused it at the first damped run, after the earlier study in
    ``--out`` was set aside and other runs were trained)."""
    if vanishing := [mu for mu in dampings if damping_vanishes(mu, DTYPES[dtype])]:
        info = torch.finfo(DTYPES[dtype])
        raise ValueError(
            f"--dampings {vanishing} round to 0 in {dtype}, the dtype the study trains in "
            f"(its smallest subnormal is {info.smallest_normal * info.eps:.3g}): mu I would "
            "vanish; pass larger --dampings, or --dtype float64"
        )


def plan(study: Study, seed: int, train_size: int) -> dict:
    """What the study derives from its options, ``--seed`` and the training split's size,
    under the names ``training.json`` records them with (its report checks them against)."""
    steps = math.ceil(study.epochs * train_size / study.batch_size)
    return {
        "tuning_seed": seed + study.seeds,  # not one of the seeds the results are reported for
        "seeds": [seed + i for i in range(study.seeds)],
        "steps": steps,
        "eval_every": max(1, math.ceil(steps / study.evaluations)),
        "examples_per_run": steps * study.batch_size,
    }


def load_split(seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, digits.Examples]:
    """Stratified train / validation / test split of the digits, standardised on train."""
    features, labels = digits.load_digits_arrays()
    test, validation, train_rows = digits.stratified_split(labels, SPLIT, seed)
    scale = digits.standardiser(features[train_rows])
    return {
        name: digits.to_examples(scale(features[rows]), labels[rows], device, dtype)
        for name, rows in (("train", train_rows), ("validation", validation), ("test", test))
    }


def out_dir(args: argparse.Namespace) -> Path:
    return default_out(args, "training")


def report_table(args: argparse.Namespace) -> Path:
    """The table ``--report-only`` needs last: written after the first round of seeds,
    beside the record and tuning table written before."""
    return out_dir(args) / "runs.csv"


#: What a study writes into its ``--out`` (a new one sets an earlier one's aside).
STUDY_FILES = ("training.json", "tuning.csv", "runs.csv", "report.md", "curves_*.png",
               "tuning_*.png")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from .training_report import write_report

    out = out_dir(args)
    if args.report_only:
        check_report_only(args, "study", STUDY_OPTIONS, "training")
        print(f"wrote {write_report(out)}")
        return 0
    from ..measure.output import check_not_foreign, results_directory

    check_not_foreign(out, "training.json")
    # made now, so that an unusable --out fails before training; removed again (with the
    # parents made for it) if the study fails or is interrupted before writing into it
    with results_directory(out):
        _study(args, out)
    print(f"wrote {write_report(out)}")
    return 0


def _study(args: argparse.Namespace, out: Path) -> None:
    """Tune and train as :func:`run` describes, writing the tables into ``out``."""
    import pandas as pd

    study = study_from(args)
    from tqdm import tqdm

    from ..measure.environment import environment
    from ..measure.output import set_aside, write_atomic, write_json

    device = torch.device(args.device)
    env = environment(device)  # now: the code that runs, whatever happens to the tree later
    data = load_split(args.seed, device, DTYPES[study.dtype])
    if study.batch_size > len(data["train"]):
        raise ValueError(
            f"--batch-size may be at most the {len(data['train'])} training examples, "
            f"got {study.batch_size}"
        )
    derived = plan(study, args.seed, len(data["train"]))
    steps, eval_every = derived["steps"], derived["eval_every"]
    tune_seed, seeds = derived["tuning_seed"], derived["seeds"]
    n_runs = sum(len(study.configs(m)) for m in study.methods) * len(study.models)
    n_runs += len(study.models) * len(study.methods) * study.seeds
    # not beside an earlier study's record, tables, figures or report: those kept apart
    earlier = set_aside(out, STUDY_FILES)
    if earlier is not None:
        print(f"the earlier study in {out} moved to {earlier}", file=sys.stderr)
    progress = tqdm(total=n_runs, desc="train", unit="run", file=sys.stderr)
    # closed on an error too: the message is not written onto the bar's line
    try:

        def one_run(model_name, config, seed, evaluate_on, every):
            progress.set_postfix_str(f"{model_name} {config.label} seed {seed}")
            model = digits.build_model(model_name, seed, device, DTYPES[study.dtype])
            result = train(
                model,
                data["train"],
                config,
                steps=steps,
                batch_size=study.batch_size,
                seed=seed,
                eval_every=every,
                evaluate_on=evaluate_on,
            )
            progress.update()
            base = {
                "model": model_name,
                "method": config.method,
                "lr": config.lr,
                "damping": config.damping,
                "seed": seed,
                "status": result.status,
                "reason": result.reason,
            }
            return [{**base, **r} for r in result.records]

        tuning, chosen = [], {}
        for model_name in study.models:
            for method in study.methods:
                for config in study.configs(method):
                    last = one_run(
                        model_name, config, tune_seed, {"validation": data["validation"]}, steps
                    )[-1]
                    tuning.append(last)
                chosen[model_name, method] = choose(pd.DataFrame(tuning), model_name, method)
        write_atomic(out / "tuning.csv", pd.DataFrame(tuning).to_csv(index=False))
        if all(c is None for c in chosen.values()):
            raise ValueError(
                f"every configuration diverged in tuning (see {out / 'tuning.csv'}); try smaller "
                "--lrs or larger --dampings"
            )
        meta = {
            "command": args.command_line,
            "study": asdict(study),
            "seed": args.seed,
            "tuning_seed": tune_seed,
            "seeds": seeds,
            "split": {name: len(ex) for name, ex in data.items()},
            "steps": steps,
            "eval_every": eval_every,
            "examples_per_run": derived["examples_per_run"],
            "chosen": {
                f"{m}/{meth}": None if c is None else asdict(c) for (m, meth), c in chosen.items()
            },
            "environment": env,
        }
        write_json(out, "training.json", meta)

        curves = []
        for seed in seeds:  # seeds outermost: methods interleaved in time
            for model_name in study.models:
                for method in study.methods:
                    config = chosen[model_name, method]
                    if config is None:  # every configuration diverged in tuning
                        progress.update()
                        continue
                    sets = {"train": data["train"], "test": data["test"]}
                    curves += one_run(model_name, config, seed, sets, eval_every)
            # after every round of seeds, so that an interrupted study keeps what it measured
            write_atomic(out / "runs.csv", pd.DataFrame(curves).to_csv(index=False))
    finally:
        progress.close()


def choose(tuning: pd.DataFrame, model: str, method: str) -> Config | None:
    """The configuration with the lowest final validation loss (None if all diverged)."""
    import pandas as pd

    rows = tuning[(tuning["model"] == model) & (tuning["method"] == method)]
    rows = rows[(rows["status"] == "ok") & rows["validation_loss"].notna()]
    if rows.empty:
        return None
    best = rows.loc[rows["validation_loss"].idxmin()]
    damping = None if pd.isna(best["damping"]) else float(best["damping"])
    return Config(method, float(best["lr"]), damping)


COMMAND = Command(
    "train", run, HELP, DESCRIPTION, EXAMPLE, add_arguments, report_table=report_table
)
