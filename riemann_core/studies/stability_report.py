"""Figures and ``report.md`` of ``riemann-bench stability``, drawn from ``pairs.csv``."""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd

from ..measure.output import (
    derived_csv,
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
    Range,
    check_options,
    check_provenance,
    check_record,
    check_rows,
    check_whole_rows,
    first_line,
)
from .stability import STATUSES, sweep_of
from .stability_fit import (
    MAX_WIDTH,
    METRICS,
    POINT,
    PREDICTED,
    complete_points,
    exact_bootstrap,
    joint_slopes,
    local_slopes,
    point_counts,
    slopes,
)

LABELS = {
    "param_distance": "||theta_S - theta_S'||",
    "prediction_distance": "mean TV of predictions",
    "loss_gap": "mean |loss gap| on test",
}
AXES = {"damping": "damping mu", "size": "training-set size n"}
PAIR_COLUMNS = ("method", "damping", "size", "pair", "status", *METRICS, "train_loss_a")
#: what the numbers of pairs.csv can be, as stability.py writes them (a diverged pair may
#: hold an infinite loss; prediction_distance is a total-variation distance)
RANGES = {
    "damping": POSITIVE,
    "size": Range("a whole number >= 2", lambda v: (v >= 2) & (v % 1 == 0)),
    "pair": COUNT,
    "param_distance": NON_NEGATIVE,
    "prediction_distance": FRACTION,
    "loss_gap": NON_NEGATIVE,
    "train_loss_a": NON_NEGATIVE,
}
#: written in every row, diverged or not
EVERY_ROW = ("damping", "size", "pair")
#: the fields of stability.json the report reads, and their kinds
RECORD = {
    "command": "text",
    "sweep": {
        "methods": "a list of names",
        "dampings": "a list of finite numbers",
        "sizes": "a list of whole numbers >= 0",
        "pairs": "a whole number >= 0",
        "steps": "a whole number >= 0",
        "lr": "a finite number",
        "batch_size": "a whole number >= 0",
        "model": "text",
        "dtype": "text",
    },
    "environment": "an object",
    "seed": SEED,  # the bootstrap's seed too
    "pool": "a whole number >= 0",
    "test": "a whole number >= 0",
}
COMMAND = "riemann-bench stability"


def load(out: Path) -> tuple[pd.DataFrame, dict]:
    """``pairs.csv`` and ``stability.json`` of ``out``, checked."""
    keys = ("sweep", "command", "environment")
    tables = {"pairs.csv": PAIR_COLUMNS}
    numeric = {"pairs.csv": tuple(c for c in PAIR_COLUMNS if c not in ("method", "status"))}
    check_whole_rows(out / "pairs.csv", COMMAND)
    # a pair that diverged or failed has NaN distances; one marked ok has them all
    (pairs,), meta = read_study(out, tables, "stability.json", keys, COMMAND, numeric, numeric)
    check_record(meta, out / "stability.json", COMMAND, RECORD)
    check_provenance(meta, out / "stability.json", COMMAND)
    check_options(meta, "sweep", out / "stability.json", COMMAND, sweep_of)
    largest = max(meta["sweep"]["sizes"])
    if meta["pool"] <= largest:  # each pair draws a set and one more example from the pool
        raise ValueError(  # (found by a hunt: a pool of 10 beside sizes to 1200 was printed)
            f"{out / 'stability.json'}: 'pool' is {meta['pool']}, but the study draws training "
            f"sets of up to {largest} examples and one more from it: {rerun(COMMAND)}"
        )
    labels = {"method": meta["sweep"]["methods"], "status": STATUSES}
    check_rows(pairs, out / "pairs.csv", COMMAND, labels, RANGES, EVERY_ROW)
    check_design(pairs, meta, out / "pairs.csv")
    return pairs, meta


def check_design(pairs: pd.DataFrame, meta: dict, path: Path) -> None:
    """Refuse pairs the study cannot have trained (``ValueError`` naming the line): one at a
    damping or size off the recorded grid, or a pair index past the recorded number of
    pairs (found by a hunt: it changed the bootstrap's clusters), or a pair twice at a grid
    point."""
    sweep = meta["sweep"]
    index = pairs["pair"]  # 0 to pairs - 1, compared, not listed (a record may claim 10**20)
    grid = (("damping", sweep["dampings"], ~pairs["damping"].isin(sweep["dampings"])),
            ("size", sweep["sizes"], ~pairs["size"].isin([float(n) for n in sweep["sizes"]])),
            ("pair", f"0 to {sweep['pairs'] - 1}",
             ~((index >= 0) & (index < sweep["pairs"]) & (index % 1 == 0))))  # fmt: skip
    for axis, values, off in grid:
        if off.any():
            raise ValueError(
                f"{path} line {first_line(off)}: {axis} {pairs.loc[off, axis].iloc[0]:g} is not "
                f"on the study's grid {values}: {rerun(COMMAND)}"
            )
    twice = pairs.duplicated([*POINT, "pair"])
    if twice.any():
        raise ValueError(
            f"{path} line {first_line(twice)} repeats the method, damping, size and pair of an "
            f"earlier line: {rerun(COMMAND)}"
        )


def missing(pairs: pd.DataFrame, meta: dict) -> str | None:
    """How many grid points an interrupted study lacks pairs at, or None when complete."""
    sweep = meta["sweep"]
    planned = len(sweep["methods"]) * len(sweep["dampings"]) * len(sweep["sizes"])
    counts = point_counts(pairs)
    short = int((counts["pairs"] < sweep["pairs"]).sum()) + planned - len(counts)
    if short == 0:
        return None
    return (
        f"{short} of the {planned} grid points have fewer than the {sweep['pairs']} planned "
        f"pairs ({len(pairs)} pairs of {planned * sweep['pairs']})"
    )


def distance_figure(pairs: pd.DataFrame, axis: str, path: Path) -> Path:
    """Each metric against ``axis``, one line per value of the other axis (median over pairs,
    bars min to max), per method; dashed: the bound's slope through the first median."""
    plt = pyplot()
    import seaborn as sns

    other = "size" if axis == "damping" else "damping"
    ok = complete_points(pairs)
    methods = list(dict.fromkeys(ok["method"]))
    fig, axes = plt.subplots(
        len(METRICS),
        len(methods),
        figsize=(4.6 * len(methods) + 1, 3.3 * len(METRICS)),
        squeeze=False,
    )
    levels = sorted(ok[other].unique())
    colours = dict(zip(levels, sns.color_palette("viridis", len(levels))))
    for col, method in enumerate(methods):
        for row, metric in enumerate(METRICS):
            ax = axes[row, col]
            for level in levels:
                data = ok[(ok["method"] == method) & (ok[other] == level) & (ok[metric] > 0)]
                stats = data.groupby(axis)[metric].agg(["median", "min", "max"])
                if stats.empty:
                    continue
                x = stats.index.to_numpy(float)
                ax.errorbar(
                    x,
                    stats["median"],
                    yerr=[stats["median"] - stats["min"], stats["max"] - stats["median"]],
                    marker="o",
                    capsize=2,
                    color=colours[level],
                    label=f"{other} {level:g}",
                )
                if level == levels[0]:
                    guide = stats["median"].iloc[0] * (x / x[0]) ** PREDICTED[axis]
                    ax.plot(
                        x,
                        guide,
                        "k--",
                        linewidth=1,
                        label=f"bound: {AXES[axis].split()[-1]}^{PREDICTED[axis]:g}",
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(AXES[axis])
            ax.set_ylabel(LABELS[metric])
            ax.set_title(method, fontsize="medium")
        axes[0, col].legend(fontsize="x-small")
    suptitle(
        fig,
        f"neighbouring runs against {AXES[axis]}\n(median over pairs, bars min to max; "
        "grid points where every pair trained)",
    )
    return save_figure(fig, path)


def write_report(out: Path) -> Path:
    """The slopes, figures and ``report.md`` of the study in ``out``: all of them or, on a
    failure, none (the earlier ones left as they were)."""
    pairs, meta = load(out)
    with staged(out) as stage:
        _write_files(pairs, meta, out, stage)
    return out / "report.md"


def _write_files(pairs: pd.DataFrame, meta: dict, out: Path, stage: Path) -> None:
    """:func:`write_report`'s files, written in ``stage`` as they will lie in ``out``."""
    seed = meta["seed"]  # the study's seed: a redraw resamples the bootstrap alike
    sweep, env, command = meta["sweep"], meta["environment"], meta["command"]
    redraw = f"riemann-bench stability --report-only --out {shlex.quote(str(out))}"
    per_point = slopes(pairs, seed=seed)
    joint = joint_slopes(pairs, seed=seed)
    local = local_slopes(pairs)
    local_table = (
        local.pivot_table(
            index=["method", "axis", "from", "to"], columns="metric", values="slope", sort=False
        ).reset_index()
        if not local.empty
        else local
    )
    write_atomic(stage / "slopes.csv", derived_csv(per_point))
    write_atomic(stage / "joint_slopes.csv", derived_csv(joint))
    counts = pairs["status"].value_counts().to_dict()
    left_out = (
        pairs[pairs["status"] != "ok"]
        .groupby([*POINT, "status"])
        .agg(pairs=("pair", "size"), train_loss_a=("train_loss_a", "median"))
        .reset_index()
    )
    medians = (
        pairs[pairs["status"] == "ok"]
        .groupby(POINT)[[*METRICS, "train_loss_a"]]
        .median()
        .reset_index()
    )
    medians = point_counts(pairs).merge(medians, on=POINT, how="left")
    lines = [
        f"# Stability study on handwritten digits: {env.get('device_name', 'unknown device')}",
        "",
        f"Produced by `{command}`; tables and figures are drawn from its `pairs.csv` and "
        f"`stability.json` (redraw with `{redraw}`; "
        + (
            "slopes' intervals from the exact bootstrap over the pair seeds, the same for "
            "every seed)."
            if exact_bootstrap(sweep["pairs"])
            else f"slopes resampled with seed {seed}, a fit on fewer seeds exactly)."
        ),
        "",
        *(
            [
                f"**An incomplete study** (interrupted?): {gap}. The fits, tables and figures "
                "are over the pairs there are.",
                "",
            ]
            if (gap := missing(pairs, meta))
            else []
        ),
        "## Setup",
        "",
        f"- Data: scikit-learn's digits; a stratified test split of {meta['test']} images "
        f"(seed {meta['seed']}) and a pool of {meta['pool']} from which each pair draws a "
        "training set `S` of `n` images and one more image that replaces a random member "
        "of `S` to give `S'`. The pool's statistics standardise both.",
        f"- Model `{sweep['model']}`, {sweep['dtype']}, cross-entropy; {sweep['steps']} "
        f"SGD steps of {sweep['batch_size']} examples at lr {sweep['lr']:g} along "
        "`G^{-1} g`, for every `n` (so the replaced example is drawn about "
        f"`{sweep['steps']} * {sweep['batch_size']} / n` times).",
        f"- Grid: methods {sweep['methods']}, dampings {sweep['dampings']}, sizes "
        f"{sweep['sizes']}, {sweep['pairs']} pairs per point (pair seed = initialisation, "
        "batch order and data draw; the same `S`, `S'` for every method and damping). "
        f"Pair statuses: {counts}.",
        "- Metrics: " + "; ".join(f"`{m}` = {LABELS[m]}" for m in METRICS) + ".",
        "",
        "## Environment",
        "",
        markdown_table(pd.DataFrame([env])),
        "",
        "## Joint fit `log D = a + b log mu + c log n`",
        "",
        "Every fit takes the grid points where every pair trained (`points left out`: those "
        "where some did not, listed below): where only some trained, those are the ones "
        "that happened to, and their distances are no sample of the method's there. The "
        "verdicts judge the bound's rate where the method trains. "
        "Intervals: 95%, resampling the pair seeds. The bound predicts "
        f"`b = {PREDICTED['damping']:g}` and `c = {PREDICTED['size']:g}`. Verdicts: "
        "`agrees` when the interval holds the bound's exponent and is at most "
        f"{MAX_WIDTH:g} wide, `inconclusive` when it holds it but is wider, `falls faster` "
        "or `falls slower` when it lies wholly below or above. The bound limits how large "
        "the distances are, not their slope: a faster fall is consistent with it; a slower "
        "one means its rate does not describe the data on this grid (a distance that levels "
        "off is still below some C / (mu sqrt(n)) over a finite grid). The size slope also "
        "carries the training budget: every `n` gets the same steps, so the replaced example "
        "is drawn fewer times in a larger set, and a fixed number of epochs would give "
        "another slope (docs/studies.md).",
        "",
        markdown_table(joint) if not joint.empty else "(needs two dampings and two sizes)",
        "",
        "## Slopes along one axis at each value of the other",
        "",
        markdown_table(per_point) if not per_point.empty else "(no finished pairs)",
        "",
        "## Local slopes between neighbouring grid values",
        "",
        "Along mu: median over pairs and sizes of the paired log-ratio (the same `S`, `S'` at "
        "every mu); along n: between the median distances. Where these sit near the bound's "
        "exponent, the bound's rate describes the data; where they approach 0, the distance "
        "no longer depends on that axis.",
        "",
        markdown_table(local_table) if not local_table.empty else "(no finished pairs)",
        "",
        "## Pairs that did not train",
        "",
        markdown_table(left_out) if not left_out.empty else "(none: every pair trained)",
        "",
        "`not trained`: the run on `S` or on `S'` ended above half its initial training loss "
        "(`train_loss_a`: the median loss reached on `S`; above the initial loss, near "
        "log 10 = 2.3 for ten classes, the run blew up and did not come back); `diverged`: "
        "NaN or inf, or a loss above "
        "1000 times its initial value. The grid points of these pairs are left out of every "
        "fit, their other pairs too.",
        "",
        "## Median distances (and the training loss reached on `S`)",
        "",
        "Over the pairs that trained (`trained` of `pairs`); a point where not all trained is "
        "left out of the fits and the figures.",
        "",
        markdown_table(medians),
        "",
        "## Figures",
        "",
    ]
    drawn = ("damping", "size") if not complete_points(pairs).empty else ()
    if not drawn:  # (found by a hunt: the report failed, drawing nothing)
        lines += ["No grid point has every pair trained: there is nothing to draw.", ""]
    for axis in drawn:
        path = distance_figure(pairs, axis, stage / f"distance_vs_{axis}.png")
        lines += [
            f"![distance against {axis}]({path.name})",
            "",
            f"Distances against {AXES[axis]}; dashed: the bound's slope "
            f"{PREDICTED[axis]:g}, anchored at the first median. Produced by "
            f"`{command}`.",
            "",
        ]
    write_atomic(stage / "report.md", "\n".join(lines))
