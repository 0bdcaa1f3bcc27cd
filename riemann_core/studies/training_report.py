"""Tables, figures and ``report.md`` of ``riemann-bench train``, drawn from its result files."""

from __future__ import annotations

import reprlib
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from ..arguments import check_distinct
from ..measure.output import (
    markdown_table,
    pyplot,
    read_study,
    rerun,
    save_figure,
    staged,
    suptitle,
    write_atomic,
)
from .results import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    check_options,
    check_provenance,
    check_record,
    check_rows,
    check_whole_rows,
    first_line,
)
from .trainer import OPTIMISERS, STATUSES
from .training import choose, plan, study_of

CURVES = (
    ("train_loss", "train loss", "log"),
    ("test_loss", "test loss", "log"),
    ("test_accuracy", "test accuracy", "linear"),
)
RUN_COLUMNS = (
    "model",
    "method",
    "lr",
    "damping",
    "seed",
    "status",
    "step",
    "time_s",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
)
TUNING_COLUMNS = (
    "model",
    "method",
    "lr",
    "damping",
    "status",
    "validation_loss",
    "validation_accuracy",
)
#: what the numbers of runs.csv and tuning.csv can be, as training.py and trainer.py write
#: them (a diverged row may hold an infinite loss)
RANGES = {
    "lr": POSITIVE,
    "damping": POSITIVE,
    "seed": COUNT,
    "step": COUNT,
    "time_s": NON_NEGATIVE,
    "train_loss": NON_NEGATIVE,
    "train_accuracy": FRACTION,
    "test_loss": NON_NEGATIVE,
    "test_accuracy": FRACTION,
    "validation_loss": NON_NEGATIVE,
    "validation_accuracy": FRACTION,
}
#: written in every row, diverged or not (the damping by the damped methods only)
EVERY_ROW = ("lr", "seed", "step", "time_s")
DAMPED = tuple(m for m, spec in OPTIMISERS.items() if spec.damped)
#: the fields of training.json the report reads, and their kinds
RECORD = {
    "command": "text",
    "study": {
        "models": "a list of names",
        "methods": "a list of names",
        "lrs": "an object of lists of finite numbers",
        "dampings": "a list of finite numbers",
        "epochs": "a finite number",
        "batch_size": "a whole number >= 0",
        "seeds": "a whole number >= 0",
        "evaluations": "a whole number >= 0",
        "target_accuracy": "a finite number",
        "dtype": "text",
    },
    "environment": "an object",
    "split": "an object of whole numbers >= 0",
    "seed": SEED,
    "tuning_seed": "a whole number >= 0",
    "seeds": "a list of whole numbers >= 0",
    "steps": "a whole number >= 0",
    "eval_every": "a whole number >= 0",
    "examples_per_run": "a whole number >= 0",
}
COMMAND = "riemann-bench train"


#: seeds per method from which a lead beyond the seeds' ranges is called the best
SPREAD_SEEDS = 3


def load(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``runs.csv``, ``tuning.csv`` and ``training.json`` of ``out``, checked."""
    tables = {"runs.csv": RUN_COLUMNS, "tuning.csv": TUNING_COLUMNS}
    keys = ("study", "command", "environment")
    text = ("model", "method", "status")
    numeric = {name: tuple(c for c in columns if c not in text) for name, columns in tables.items()}
    # the damping is blank by design for the methods that take none (sgd, adam)
    measured = {
        name: tuple(c for c in columns if c != "damping") for name, columns in numeric.items()
    }
    for name in tables:
        check_whole_rows(out / name, COMMAND)
    frames, meta = read_study(out, tables, "training.json", keys, COMMAND, numeric, measured)
    check_record(meta, out / "training.json", COMMAND, RECORD)
    check_provenance(meta, out / "training.json", COMMAND)
    check_options(meta, "study", out / "training.json", COMMAND, study_of)
    check_options(
        meta, "seeds", out / "training.json", COMMAND, lambda s: check_distinct("seeds", s)
    )
    split = meta["split"]
    if sorted(split) != ["test", "train", "validation"] or not split["train"]:
        # (found by a hunt: a split without a training part, or one of 0, stopped the
        # report on a KeyError or ZeroDivisionError, exit code 3)
        raise ValueError(
            f"{out / 'training.json'}: 'split' is {split}, but the study records the sizes of "
            f"its train (at least 1), validation and test splits: {rerun(COMMAND)}"
        )
    if len(meta["seeds"]) != meta["study"]["seeds"]:  # (before a list of as many is made)
        raise ValueError(
            f"{out / 'training.json'}: 'seeds' lists {len(meta['seeds'])} seeds, but the "
            f"study's --seeds is {reprlib.repr(meta['study']['seeds'])}: {rerun(COMMAND)}"
        )
    # what the study derives from its options, seed and split (found by a hunt: an
    # 'eval_every' of 0 and seeds it cannot have trained with were reported as recorded)
    derived = plan(study_of(meta["study"]), meta["seed"], split["train"])
    # a study before ec66fe2 evaluated every max(1, steps // evaluations) steps (the real
    # run committed as reports/cpu/training at 8a5bf94 records 16 where 17 is derived now);
    # its runs lie on that grid, which check_design holds them to
    older_spacing = max(1, derived["steps"] // meta["study"]["evaluations"])
    for key, value in derived.items():
        if meta[key] != value and not (key == "eval_every" and meta[key] == older_spacing):
            raise ValueError(
                f"{out / 'training.json'}: {key!r} is {reprlib.repr(meta[key])}, but the study "
                f"derives {reprlib.repr(value)} from its options, seed and split there: "
                f"{rerun(COMMAND)}"
            )
    study = meta["study"]
    labels = {"model": study["models"], "method": study["methods"], "status": STATUSES}
    for frame, (name, columns) in zip(frames, tables.items()):
        path = out / name
        ranges = {column: RANGES[column] for column in numeric[name]}
        every_row = [column for column in EVERY_ROW if column in columns]
        check_rows(frame, path, COMMAND, labels, ranges, every_row)
        # a damped method's rows record its damping, the others' leave it blank
        damped = frame["method"].isin(DAMPED)
        bad = damped == frame["damping"].isna()
        if bad.any():
            row = frame[bad].iloc[0]
            shown = "blank" if pd.isna(row["damping"]) else f"{row['damping']:g}"
            takes = "one" if row["method"] in DAMPED else "none"
            raise ValueError(
                f"{path} line {first_line(bad)}: damping is {shown}, but method "
                f"{row['method']!r} takes {takes}: {rerun(COMMAND)}"
            )
    runs, tuning = frames
    check_design(runs, tuning, meta, out)
    return runs, tuning, meta


def check_design(runs: pd.DataFrame, tuning: pd.DataFrame, meta: dict, out: Path) -> None:
    """Refuse results that the study cannot have written (``ValueError`` naming the file,
    the line or the run, and the fix): a record twice, a run at a seed ``training.json``
    does not list, a record off the evaluation grid (every ``eval_every`` steps and the
    last), a run marked ``ok`` that stops before the budget's last step, runs trained at a
    configuration that is not the one ``tuning.csv`` chooses (found by a hunt: a seed
    relabelled, or a step moved off the grid, were reported)."""
    for name, frame, key in (
        ("runs.csv", runs, ["model", "method", "seed", "step"]),
        ("tuning.csv", tuning, ["model", "method", "lr", "damping"]),
    ):
        twice = frame.duplicated(key, keep="first")
        if twice.any():
            raise ValueError(
                f"{out / name} line {first_line(twice)} repeats the {', '.join(key)} of an "
                f"earlier line: {rerun(COMMAND)}"
            )
    for bad, what in (
        (~runs["seed"].isin(meta["seeds"]), f"a seed that training.json, seeds {meta['seeds']}, "
         "does not list"),
        ((runs["step"] % max(meta["eval_every"], 1) != 0) & (runs["step"] != meta["steps"]),
         f"a step off the evaluation grid (every {meta['eval_every']} and {meta['steps']})"),
    ):  # fmt: skip
        if bad.any():
            raise ValueError(
                f"{out / 'runs.csv'} line {first_line(bad)} holds {what}: the files come from "
                f"different studies, {rerun(COMMAND)}"
            )
    # the study writes a run's status (its end) into every record of the run, so a run
    # holds one status: a record that is not ok followed by ok ones of the same run (found
    # by a hunt: it was read, and moved a steps-to-target interval) is refused, a run
    # diverged from its first record to its last is what the study writes
    mixed = runs.groupby(["model", "method", "seed"])["status"].transform("nunique") > 1
    ended = runs[mixed & (runs["status"] != "ok")].groupby(["model", "method", "seed"])["step"]
    for (model, method, seed), step in ended.min().items():
        run = runs[(runs["model"] == model) & (runs["method"] == method) & (runs["seed"] == seed)]
        later = run["step"] > step
        if later.any():
            line = first_line(runs.index.to_series().isin(run.index[later]))
            raise ValueError(
                f"{out / 'runs.csv'} line {line}: "
                f"the run {model}/{method} seed {seed} ended at step {step} (a record that is "
                f"not ok), and a run records nothing after that: {rerun(COMMAND)}"
            )
    # a run's time_s is the training time so far: 0 at step 0, never less at a later step
    # (found by a hunt: a clock that went back, or started at 5 s, was reported as measured)
    run_key = ["model", "method", "seed"]
    earlier = runs.sort_values("step", kind="stable").groupby(run_key, sort=False)["time_s"]
    back = (earlier.diff() < 0).reindex(runs.index)
    for bad, what in (
        ((runs["step"] == 0) & (runs["time_s"] != 0), "a time_s other than 0 at step 0"),
        (back, "a time_s below that of an earlier step of its run"),
    ):
        if bad.any():
            raise ValueError(
                f"{out / 'runs.csv'} line {first_line(bad)} holds {what}, which the study's "
                f"clock cannot have written: {rerun(COMMAND)}"
            )
    last = final_rows(runs)
    short = last[(last["status"] == "ok") & (last["step"] != meta["steps"])]
    if not short.empty:
        run = short.iloc[0]
        raise ValueError(
            f"{out / 'runs.csv'}: the run {run['model']}/{run['method']} seed {run['seed']} "
            f"is marked ok but its records stop at step {run['step']}, not the budget's "
            f"{meta['steps']}: {rerun(COMMAND)}"
        )
    for (model, method), group in runs.groupby(["model", "method"], sort=False):
        config = choose(tuning, model, method)
        trained = group[["lr", "damping"]].drop_duplicates()
        chosen = (config.lr, config.damping) if config is not None else None
        if chosen is None or len(trained) != 1 or not _same_config(trained.iloc[0], chosen):
            raise ValueError(
                f"{out / 'runs.csv'}: the runs of {model}/{method} were trained at "
                f"{_configs(trained)}, but {out / 'tuning.csv'} chooses "
                f"{'none (every configuration diverged)' if chosen is None else _configs(chosen)}"
                f": the two files come from different studies, {rerun(COMMAND)}"
            )


def _same_config(row: pd.Series, chosen: tuple[float, float | None]) -> bool:
    lr, damping = chosen
    same_damping = pd.isna(row["damping"]) if damping is None else row["damping"] == damping
    return bool(row["lr"] == lr and same_damping)


def _configs(configs) -> str:
    """``lr ...[, damping ...]`` of a configuration (a pair) or of each row of a frame."""
    rows = [configs] if isinstance(configs, tuple) else list(configs.itertuples(index=False))
    return " and ".join(
        f"lr {lr:g}" + ("" if damping is None or pd.isna(damping) else f", damping {damping:g}")
        for lr, damping in rows
    )


def missing(runs: pd.DataFrame, tuning: pd.DataFrame, meta: dict) -> list[str]:
    """What an interrupted study lacks of its design: configurations not tuned, seeds not
    trained (per model and method), one line each; empty for a complete study."""
    study, lines = meta["study"], []
    for model in study["models"]:
        for method in study["methods"]:
            damped = method in DAMPED
            planned = len(study["lrs"].get(method, [])) * (len(study["dampings"]) if damped else 1)
            tried = tuning[(tuning["model"] == model) & (tuning["method"] == method)]
            if len(tried) < planned:
                lines.append(f"{model}/{method}: {len(tried)} of {planned} configurations tuned")
                continue
            if choose(tuning, model, method) is None:
                continue  # every configuration diverged in tuning: nothing to train
            seeds = set(runs.loc[(runs["model"] == model) & (runs["method"] == method), "seed"])
            absent = [s for s in meta["seeds"] if s not in seeds]
            if absent:
                lines.append(f"{model}/{method}: seeds {absent} not trained")
    return lines


def spread(values: pd.Series, fmt: str = ".3g") -> str:
    """``median [min, max]`` of ``values``, or ``-`` when there are none."""
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return format(values.iloc[0], fmt)
    return f"{values.median():{fmt}} [{values.min():{fmt}}, {values.max():{fmt}}]"


def final_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The last record of every run (model, method, seed), in the order the runs appear."""
    return runs.loc[runs.groupby(["model", "method", "seed"], sort=False)["step"].idxmax()]


def chosen_table(tuning: pd.DataFrame) -> pd.DataFrame:
    """Per model and method: the configuration chosen on validation and how many diverged."""
    rows = []
    for (model, method), group in tuning.groupby(["model", "method"], sort=False):
        ok = group[(group["status"] == "ok") & group["validation_loss"].notna()]
        best = ok.loc[ok["validation_loss"].idxmin()] if not ok.empty else None
        rows.append(
            {
                "model": model,
                "method": method,
                "lr": "-" if best is None else f"{best['lr']:g}",
                "damping": "-"
                if best is None or pd.isna(best["damping"])
                else f"{best['damping']:g}",
                "validation loss": np.nan if best is None else best["validation_loss"],
                "validation accuracy": np.nan if best is None else best["validation_accuracy"],
                "configurations": len(group),
                "diverged or failed": int((group["status"] != "ok").sum()),
                "at grid edge": "-" if best is None else grid_edge(group, best),
            }
        )
    return pd.DataFrame(rows)


def grid_edge(group: pd.DataFrame, best: pd.Series) -> str:
    """Which of the winner's settings lie on the edge of the grid tried (a wider grid might
    do better there), e.g. ``lr max``; ``-`` when none."""
    edges = []
    for column, name in (("lr", "lr"), ("damping", "mu")):
        tried = group[column].dropna().unique()
        if tried.size > 1 and best[column] in (tried.min(), tried.max()):
            edges.append(f"{name} {'min' if best[column] == tried.min() else 'max'}")
    return ", ".join(edges) or "-"


def tuning_caveats(tuning: pd.DataFrame) -> list[str]:
    """What the summary's winners owe to the tuning: the chosen configurations at the edge
    of their grid (a wider grid might choose otherwise) and, where they differ, how many
    configurations each method was tuned over (more tries favour a method)."""
    chosen = chosen_table(tuning)
    edge = chosen[~chosen["at grid edge"].isin(["-"])]
    lines = []
    if not edge.empty:
        listed = "; ".join(
            f"`{r['model']}/{r['method']}` ({r['at grid edge']})" for r in edge.to_dict("records")
        )
        lines.append(
            f"- Chosen at the edge of its tuning grid (a wider grid might choose otherwise): "
            f"{listed}."
        )
    same = chosen.groupby("method")["configurations"].nunique().eq(1).all()
    for model, rows in [(None, chosen)] if same else chosen.groupby("model", sort=False):
        tried = rows.groupby("configurations")["method"].unique()
        if len(tried) < 2:
            continue
        counts = "; ".join(
            f"{n} for {', '.join(f'`{m}`' for m in dict.fromkeys(methods))}"
            for n, methods in sorted(tried.items(), reverse=True)
        )
        where = "" if model is None else f" for `{model}`"
        lines.append(
            f"- Configurations tried in tuning{where} (more tries favour a method): {counts}."
        )
    return lines


def final_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model and method: end-of-budget metrics and time per step, over seeds."""
    last = final_rows(runs)
    rows = []
    for (model, method), group in last.groupby(["model", "method"], sort=False):
        ok = group[group["status"] == "ok"]
        rows.append(
            {
                "model": model,
                "method": method,
                "seeds ok": f"{len(ok)}/{len(group)}",
                "test accuracy": spread(ok["test_accuracy"], ".4f"),
                "test loss": spread(ok["test_loss"]),
                "train loss": spread(ok["train_loss"]),
                "ms per step": spread(1e3 * ok["time_s"] / ok["step"]),
                "training time [s]": spread(ok["time_s"]),
            }
        )
    return pd.DataFrame(rows)


def to_target(runs: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per run: the first evaluation at which test accuracy reached ``target`` (NaN if it
    never did, or if the run diverged or failed: the tables count only runs that finished)."""
    rows = []
    for (model, method, seed), group in runs.groupby(["model", "method", "seed"], sort=False):
        ok = group["status"] == "ok"
        hit = group[ok & (group["test_accuracy"] >= target)].sort_values("step")
        first = hit.iloc[0] if not hit.empty else None
        rows.append(
            {
                "model": model,
                "method": method,
                "seed": seed,
                "steps": np.nan if first is None else first["step"],
                "time_s": np.nan if first is None else first["time_s"],
            }
        )
    return pd.DataFrame(rows)


def target_table(runs: pd.DataFrame, target: float) -> pd.DataFrame:
    """Steps- and time-to-target per model and method: median [min, max] over the seeds
    that reached it, and how many did."""
    hits = to_target(runs, target)
    rows = []
    for (model, method), group in hits.groupby(["model", "method"], sort=False):
        rows.append(
            {
                "model": model,
                "method": method,
                "reached": f"{int(group['steps'].notna().sum())}/{len(group)}",
                "steps to target": spread(group["steps"], ".0f"),
                "time to target [s]": spread(group["time_s"]),
            }
        )
    return pd.DataFrame(rows)


def _tied(values: pd.Series) -> str:
    """The methods (the index) at the smallest of ``values``, all of them where tied."""
    names = [f"`{m}`" for m in values.index[values == values.min()]]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def summary(runs: pd.DataFrame, target: float) -> list[str]:
    """One sentence per model: who reached the target in the fewest steps and the least time
    (medians over all seeds, a seed that never reached it counting as never: a method that
    reached it in half its seeds or fewer has no median, and one lucky seed does not decide)
    and who ended with the highest median test accuracy, every method where tied, and the
    next (medians over all seeds, one that did not finish counting as accuracy 0), called
    best only where its every seed ended above every other method's: on overlapping
    ranges no method is ahead beyond the spread over seeds (found by a hunt: a lead of one
    test image of 359 was called best)."""
    hits = to_target(runs, target)
    last = final_rows(runs)
    lines = []
    for model in dict.fromkeys(runs["model"]):
        never = hits[hits["model"] == model].fillna({"steps": np.inf, "time_s": np.inf})
        medians = never.groupby("method", sort=False)[["steps", "time_s"]].median()
        medians = medians[np.isfinite(medians["steps"])]
        parts = []
        if medians.empty:
            parts.append(f"no method reached test accuracy {target:g} in more than half its seeds")
        else:
            steps, time = medians["steps"].min(), medians["time_s"].min()
            parts.append(
                f"fewest steps to {target:g} test accuracy: {_tied(medians['steps'])} "
                f"({steps:.0f}); least time: {_tied(medians['time_s'])} ({time:.3g} s)"
            )
        final = last[last["model"] == model]
        # a seed that did not finish (diverged, solver failed) counts as accuracy 0
        per_seed = final["test_accuracy"].where(final["status"] == "ok", 0.0)
        by_method = per_seed.groupby(final["method"], sort=False)
        accuracy, lowest, highest = by_method.median(), by_method.min(), by_method.max()
        if not accuracy.empty:
            best = accuracy.max()
            leaders = accuracy.index[accuracy == best]
            others = accuracy[accuracy < best]
            # with fewer seeds than SPREAD_SEEDS the ranges show no spread to be ahead of
            # (found by a hunt: one seed called a lead of one test image the best)
            seeds = int(by_method.size().min())
            spread = seeds >= SPREAD_SEEDS
            ahead = others.empty or lowest[leaders].min() > highest[others.index].max()
            what = "best" if spread and ahead and not others.empty else "highest median"
            text = f"{what} final test accuracy: {_tied(-accuracy)} ({best:.4f}"
            if not others.empty:
                text += f"; next {_tied(-others)} {others.max():.4f}"
                if not spread:
                    text += (
                        f": {seeds} seed{'s' if seeds > 1 else ''} per method, too few to tell "
                        f"a lead from the seeds' spread ({SPREAD_SEEDS} or more)"
                    )
                elif not ahead:
                    text += ": the seeds' ranges overlap, no method is ahead beyond them"
            parts.append(text + ")")
        lines.append(
            f"- `{model}`: " + "; ".join(parts) + " (medians over all seeds, a seed that "
            "never reached the target counting as never, one that did not finish as accuracy "
            "0; the tables' are over the seeds that did)."
        )
    return lines


def curves_figure(runs: pd.DataFrame, model: str, target: float, path: Path) -> Path:
    """Loss and accuracy against steps (left) and wall-clock (right): the median over seeds,
    shaded between the minimum and the maximum."""
    plt = pyplot()
    import seaborn as sns

    data = runs[(runs["model"] == model) & (runs["status"] == "ok")]
    methods = list(dict.fromkeys(data["method"]))
    colours = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    fig, axes = plt.subplots(len(CURVES), 2, figsize=(11, 3.2 * len(CURVES)), sharex="col")
    for method in methods:
        by_step = data[data["method"] == method].groupby("step")
        time = by_step["time_s"].median()
        for row, (column, label, scale) in enumerate(CURVES):
            stats = by_step[column].agg(["median", "min", "max"])
            for col, x in enumerate((time.index.to_numpy(), time.to_numpy())):
                ax = axes[row, col]
                ax.plot(x, stats["median"], color=colours[method], label=method)
                ax.fill_between(x, stats["min"], stats["max"], color=colours[method], alpha=0.2)
                ax.set_yscale(scale)
                ax.set_ylabel(label)
    for ax in axes[-1, :1]:
        ax.set_xlabel("steps")
    axes[-1, 1].set_xlabel("wall-clock in training steps [s] (median over seeds)")
    for ax in axes[-1]:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    if methods:  # (none where every run diverged: an empty legend warned)
        axes[0, 0].legend(fontsize="small")
    suptitle(fig, f"{model}: median over the seeds that finished, shaded min to max")
    return save_figure(fig, path)


def tuning_figure(tuning: pd.DataFrame, model: str, path: Path) -> Path:
    """Final validation loss of every configuration tried, per method; one that diverged
    is a cross at the top edge (a method whose every configuration diverged showed an
    empty panel)."""
    plt = pyplot()
    from matplotlib.transforms import blended_transform_factory

    data = tuning[tuning["model"] == model]
    methods = list(dict.fromkeys(data["method"]))
    fig, axes = plt.subplots(
        1, len(methods), figsize=(2.8 * len(methods), 3), sharey=True, squeeze=False
    )
    for ax, method in zip(axes[0], methods):
        rows = data[data["method"] == method]
        for damping, group in rows.groupby(rows["damping"].fillna(0.0)):
            group = group.sort_values("lr")
            ok = group["status"] == "ok"
            label = "no damping" if damping == 0 else f"mu={damping:g}"
            (line,) = ax.plot(
                group["lr"], group["validation_loss"].where(ok), marker="o", label=label
            )
            if not ok.all():  # (an empty line would sit at the origin of the layout's box)
                top = blended_transform_factory(ax.transData, ax.transAxes)  # x: lr, y: edge
                ax.plot(group["lr"][~ok], [0.97] * int((~ok).sum()), "x",
                        color=line.get_color(), transform=top, clip_on=False)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(method, fontsize="medium")
        ax.set_xlabel("learning rate")
        ax.legend(fontsize="x-small")
    axes[0, 0].set_ylabel("final validation loss")
    suptitle(fig, f"{model}: tuning grid (x at the top: diverged or solver failed)")
    return save_figure(fig, path)


def write_report(out: Path) -> Path:
    """The figures and ``report.md`` of the study in ``out``: all of them or, on a failure,
    none (the earlier ones left as they were)."""
    runs, tuning, meta = load(out)
    with staged(out) as stage:
        _write_files(runs, tuning, meta, out, stage)
    return out / "report.md"


#: The models of the study, as the report's setup describes them.
MODELS = {
    "mlp": "`mlp` 64-64-10 tanh (4,810 parameters)",
    "cnn": "`cnn` conv 3x3 (8 ch.) tanh, conv 3x3 stride 2 (16 ch.) tanh, linear (3,818 "
    "parameters)",
}


def _write_files(
    runs: pd.DataFrame, tuning: pd.DataFrame, meta: dict, out: Path, stage: Path
) -> None:
    """:func:`write_report`'s files, written in ``stage`` as they will lie in ``out``."""
    study, env = meta["study"], meta["environment"]
    target = study["target_accuracy"]
    command = meta["command"]
    damped = any(OPTIMISERS[m].damped for m in study["methods"])
    redraw = f"riemann-bench train --report-only --out {shlex.quote(str(out))}"
    # the passes made, not --epochs: steps are whole (found by a hunt: "1e-09 passes")
    passes = meta["examples_per_run"] / meta["split"]["train"]
    lines = [
        f"# Training study on handwritten digits: {env.get('device_name', 'unknown device')}",
        "",
        f"Produced by `{command}`; every table and figure below comes from its `runs.csv`, "
        f"`tuning.csv` and `training.json` (redraw them with `{redraw}`).",
        "",
        *(
            [
                f"**An incomplete study** (interrupted?): {'; '.join(gaps)}. The tables and "
                "figures are over what was run.",
                "",
            ]
            if (gaps := missing(runs, tuning, meta))
            else []
        ),
        "## Summary",
        "",
        *summary(runs, target),
        *tuning_caveats(tuning),
        "",
        "## Setup",
        "",
        f"- Data: scikit-learn's 8x8 handwritten digits, stratified split {meta['split']} "
        f"(split seed {meta['seed']}), standardised with the training split's statistics.",
        f"- Models: {'; '.join(MODELS[m] for m in study['models'])}. "
        f"dtype {study['dtype']}, cross-entropy.",
        f"- Budget: {meta['steps']} steps of {study['batch_size']} examples "
        f"({meta['examples_per_run']} examples, {passes:.3g} "
        f"pass{'es' if passes != 1 else ''} over the training split of "
        f"{meta['split']['train']}, --epochs {study['epochs']:g} rounded up to whole steps) "
        "for every run; "
        f"evaluation every {meta['eval_every']} steps (not counted in the wall-clock).",
        "- Methods: `sgd` and `adam` are `torch.optim`; the others precondition the gradient "
        "with `rc.RiemannianPreconditioner` (metric `layerwise` with the exact or sampled "
        "Fisher, `natural` = the whole damped Gauss-Newton matrix, `kfac` with the exact "
        "Fisher and damping, `kfac-default` with the one-sample Monte Carlo Fisher, factored "
        "damping and the bias apart, as K-FAC users run it) and take an SGD "
        "step of length lr along `G^{-1} g`.",
        f"- Tuning: each configuration of the grid trained once (seed {meta['tuning_seed']}); "
        "the lowest final validation loss wins. Learning rates "
        + "; ".join(f"`{m}` {study['lrs'][m]}" for m in study["methods"])
        + (f"; dampings {study['dampings']}." if damped else "."),
        f"- Reported: the chosen configuration with seeds {meta['seeds']} (initialisation, "
        "batch order, Fisher samples), methods interleaved seed by seed.",
        "",
        "## Environment",
        "",
        markdown_table(pd.DataFrame([env])),
        "",
        "## Chosen configurations (validation split)",
        "",
        markdown_table(chosen_table(tuning), ".4g"),
        "",
        "## End of budget (test split): median [min, max] over seeds",
        "",
        markdown_table(final_table(runs)),
        "",
        f"## To target: first evaluation with test accuracy >= {target:g}",
        "",
        markdown_table(target_table(runs, target)),
        "",
        f"Median [min, max] over the seeds that reached the target; wall-clock counts "
        f"training steps only; resolution {meta['eval_every']} steps.",
        "",
        "## Figures",
        "",
    ]
    for model in dict.fromkeys(runs["model"]):
        curves = curves_figure(runs, model, target, stage / f"curves_{model}.png")
        grid = tuning_figure(tuning, model, stage / f"tuning_{model}.png")
        lines += [
            f"![{model} curves]({curves.name})",
            "",
            f"{model}: train loss, test loss and test accuracy against steps (left) and "
            f"wall-clock (right); dotted: the target accuracy. Produced by `{command}`.",
            "",
            f"![{model} tuning]({grid.name})",
            "",
            f"{model}: final validation loss of every configuration tried. Produced by "
            f"`{command}`.",
            "",
        ]
    write_atomic(stage / "report.md", "\n".join(lines))
