"""``riemann-bench report``: scaling plots and ``report.md`` from a sweep's results.

Every figure is drawn from ``results.csv`` and ``sweep.json`` in the output directory,
and ``report.md`` names the command that regenerates it. Each method and kernel keeps
one colour in every figure (:func:`colour`).
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ..measure.environment import git_commit
from ..measure.output import markdown_table, pyplot, save_figure, staged, suptitle, write_atomic
from . import devices, fit, grow, validate
from .sweep import AXES, GENERIC_METHODS, METHODS, SPREAD_LIMIT, unfinished_note

#: Axis -> (label, [(exponent, line style, what the guide stands for)]).
GUIDES = {
    "width": ("width w (n ~ depth w^2)", [(2, "--", "w^2: O(n)"), (6, ":", "w^6: O(n^3)")]),
    "depth": ("hidden layers (L = depth + 1 modules)", [(1, "--", "linear")]),
    "out_dim": ("output dimension C (d = N C)", [(3, "--", "C^3: the d^3 term")]),
    "batch": ("batch N (d = N C)", [(2, "--", "N^2: n d^2"), (3, ":", "N^3: d^3")]),
}
METRICS = {
    "time_median_s": "time per direction [s]",
    "flops": "counted FLOPs",
    "peak_bytes": "peak memory [bytes]",
}


def colour(label: str):
    """The colour of ``"method (kernel)"``, the same in every figure of every report."""
    import seaborn as sns

    labels = [f"{m} (structured)" for m in METHODS] + [f"{m} (generic)" for m in GENERIC_METHODS]
    palette = sns.color_palette("tab10", len(labels))
    return palette[labels.index(label)] if label in labels else "0.3"


def load(out: Path) -> tuple[pd.DataFrame, dict]:
    """``results.csv`` (checked) with a ``label`` column, and ``sweep.json``."""
    df, meta = fit.read_sweep(out)
    df["label"] = df["method"] + " (" + df["kernel"] + ")"
    return df, meta


def along(df: pd.DataFrame, base: dict, axis: str) -> pd.DataFrame:
    """Ok rows that vary ``axis`` with the other axes at the base point."""
    return fit.axis_points(df, base, axis)


def _lines(ax, data: pd.DataFrame, x: str, y: str, **style) -> None:
    for label, group in data.groupby("label", sort=True):
        group = group.sort_values(x)
        ax.plot(group[x], group[y], color=colour(label), label=label, **style)


def _guides(ax, data: pd.DataFrame, axis: str, metric: str) -> str:
    """Slope guides over the upper half of the axis, ending at the geometric mean of the
    series at the largest value; returns their legend for the panel's title."""
    xs = np.sort(data[axis].unique())
    if len(xs) < 2:
        return ""
    tail = xs[len(xs) // 2 :] if len(xs) > 3 else xs
    y_end = float(np.exp(np.log(data.loc[data[axis] == xs[-1], metric]).mean()))
    for exponent, style, _ in GUIDES[axis][1]:
        ax.plot(tail, y_end * (tail / tail[-1]) ** exponent, ls=style, lw=0.9, color="0.4")
    return ", ".join(f"{style} {text}" for _, style, text in GUIDES[axis][1])


def scaling_figure(df: pd.DataFrame, meta: dict, metric: str, path: Path) -> Path:
    """Log-log ``metric`` against each axis, one panel per axis, a line per method; for
    memory the cost model's estimate (``peak_bytes_model``) dashed beside the measurement."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for ax, axis in zip(axes.flat, AXES, strict=True):
        data = along(df, meta["base"], axis)
        shown = data.dropna(subset=[metric])
        shown = shown[shown[metric] > 0]
        _lines(ax, shown, axis, metric, marker="o", ms=3)
        guides = ""
        if metric == "peak_bytes":
            _lines(ax, data, axis, "peak_bytes_model", ls="--", lw=0.9)
            guides = "-- the cost model's estimate"
        elif not shown.empty:
            guides = _guides(ax, shown, axis, metric)
        values = shown[metric]
        if metric == "peak_bytes":
            values = pd.concat([values, data["peak_bytes_model"]])
        if not values.empty:
            ax.set_ylim(values[values > 0].min() / 3, values.max() * 3)
        ax.set(xscale="log", yscale="log", xlabel=GUIDES[axis][0], ylabel=METRICS[metric])
        _axis_ticks(ax, np.sort(data[axis].unique()))
        ax.set_title(f"{axis}" + (f"  ({guides})" if guides else ""), fontsize=9)
        ax.grid(True, lw=0.3)
    _figure_legend(fig, df)
    base = ", ".join(f"{k}={v}" for k, v in meta["base"].items())
    suptitle(fig, f"{METRICS[metric]} (one axis varied, others at {base})")
    return save_figure(fig, path)


def _axis_ticks(ax, values: np.ndarray, most: int = 8) -> None:
    """The axis's own values as plain tick labels, thinned to at most ``most``."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if len(values):
        step = -(-len(values) // most)
        ax.set_xticks(values[::-step][::-1])  # keep the largest value
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())


def _figure_legend(fig, df: pd.DataFrame) -> None:
    """One legend for the figure, below the panels, a colour per method and kernel."""
    from matplotlib.lines import Line2D

    labels = sorted(df["label"].unique())
    handles = [Line2D([], [], color=colour(label), marker="o", ms=3) for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.set_layout_engine("tight", rect=(0, 0.05, 1, 0.97))


def crossover_figure(df: pd.DataFrame, meta: dict, path: Path) -> Path:
    """Layerwise, natural and full along the width axis, and the full / layerwise ratio."""
    plt = pyplot()
    data = along(df, meta["base"], "width")
    data = data[data["method"].isin(("layerwise", "full", "natural"))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _lines(left, data, "n_params", "time_median_s", marker="o", ms=3)
    left.set(xscale="log", yscale="log", xlabel="parameters n", ylabel="time [s]")
    left.set_title("layerwise vs full along width", fontsize=10)
    left.legend(fontsize=7, loc="upper left")
    pivot = data[data["kernel"] == "structured"].pivot_table(
        index="n_params", columns="method", values="time_median_s"
    )
    if {"full", "layerwise"} <= set(pivot.columns):
        ratio = (pivot["full"] / pivot["layerwise"]).dropna()
        right.plot(ratio.index, ratio.values, marker="o", color=colour("full (structured)"))
        right.axhline(1.0, color="0.5", ls="--", lw=0.8)
    right.set(
        xscale="log", yscale="log", xlabel="parameters n", ylabel="time full / time layerwise"
    )
    right.set_title("crossover: above 1 layerwise wins", fontsize=10)
    right.xaxis.set_minor_formatter(plt.NullFormatter())  # under a decade they overlap
    return save_figure(fig, path)


def rate_figure(rates: pd.DataFrame, device: dict[str, float], path: Path) -> Path:
    """Achieved FLOP/s of every point against its counted FLOPs, beside the device's GEMM
    and Cholesky rates; and layerwise's time over its phase-wise speed of light."""
    plt = pyplot()
    ok = rates[rates["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, group in ok.groupby("label", sort=True):
        left.scatter(group["flops"], group["flops_per_s"], s=8, color=colour(label), label=label)
    for kind, style in (("products", "--"), ("cholesky", ":")):
        if kind in device:
            left.axhline(device[kind], color="0.3", ls=style, lw=0.9)
    left.set(xscale="log", yscale="log", xlabel="counted FLOPs", ylabel="achieved FLOP/s")
    left.set_title("achieved rate (-- device GEMM, : device Cholesky)", fontsize=10)
    left.legend(fontsize=7, loc="lower right")
    layerwise = ok[ok["method"] == "layerwise"]
    for label, group in layerwise.groupby("label", sort=True):
        right.scatter(group["flops"], group["time_over_sol"], s=8, color=colour(label), label=label)
    right.axhline(1.0, color="0.5", ls="--", lw=0.8)
    right.set(xscale="log", yscale="log", xlabel="counted FLOPs", ylabel="time / speed of light")
    right.set_title("layerwise against its phase-wise speed of light", fontsize=10)
    if not layerwise.empty:
        right.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def time_model_figure(df: pd.DataFrame, path: Path) -> Path:
    """Measured time against the time model's, a panel per method and kernel; hollow
    markers where the overhead is more than the stated fraction of the time, crosses where
    the call took a slow path (left out of the fit: its work is not the cost model's)."""
    plt = pyplot()
    models = fit.time_models(df)
    keys = list(models)
    cols = min(len(keys), 3) or 1
    nrows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        model = models[key]
        rows = df[(df["status"] == "ok") & (df["method"] == key[0]) & (df["kernel"] == key[1])]
        predicted = model.predict(rows)
        bound = fit.overhead_fraction(rows, model) <= fit.OVERHEAD_TARGET
        slow = fit.took_slow_path(rows).to_numpy()
        c = colour(f"{key[0]} ({key[1]})")
        t = rows["time_median_s"].to_numpy(float)
        ax.scatter(predicted[bound & ~slow], t[bound & ~slow], s=10, color=c)
        ax.scatter(predicted[~bound & ~slow], t[~bound & ~slow], s=10, facecolors="none",
                   edgecolors=c)  # fmt: skip
        ax.scatter(predicted[slow], t[slow], s=14, marker="x", color=c)
        low, high = min(t.min(), predicted.min()), max(t.max(), predicted.max())
        ax.plot([low, high], [low, high], color="0.5", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="time model [s]", ylabel="measured [s]")
        overhead = f"t0 {model.t0 * 1e3:.2g} ms + {model.t_module * 1e3:.2g} ms x L"
        ax.set_title(f"{key[0]} ({key[1]}): {overhead}", fontsize=9)
    return save_figure(fig, path)


def figures(
    df: pd.DataFrame,
    meta: dict,
    rates: pd.DataFrame,
    out: Path,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """The report's figures in ``out``, by name; ``progress(name)`` after each."""
    draw = {
        "time": lambda: scaling_figure(df, meta, "time_median_s", out / "time.png"),
        "flops": lambda: scaling_figure(df, meta, "flops", out / "flops.png"),
        "memory": lambda: scaling_figure(df, meta, "peak_bytes", out / "memory.png"),
        "crossover": lambda: crossover_figure(df, meta, out / "crossover.png"),
        "rate": lambda: rate_figure(rates, fit.sweep_rates(df, meta), out / "achieved_rate.png"),
        "time_model": lambda: time_model_figure(df, out / "time_model.png"),
    }
    paths = {}
    for name, figure in draw.items():
        paths[name] = figure()
        if progress is not None:
            progress(f"{name} figure")
    return paths


CAPTIONS = {
    "time": "Time per direction against each axis; grey lines: the claimed slopes.",
    "flops": "Counted FLOPs (FlopCounterMode with its own table of linear-algebra counts).",
    "memory": "Peak memory of one direction after a warm-up call (CUDA: the allocator's "
    "peak; host: the rise of resident memory once the allocator's free memory is returned, "
    "which can read above the live tensors' peak where freed memory is kept); dashed: the "
    "cost model's estimate.",
    "crossover": "Layerwise against full along the width axis, and their time ratio.",
    "rate": "Achieved FLOP/s against the device's rates measured in the same run, and "
    "layerwise's time over its phase-wise speed of light.",
    "time_model": "Measured time against the time model t0 + t_module L + sum F_kind / "
    "R_kind; hollow: points where the overhead is more than "
    f"{fit.OVERHEAD_TARGET:.0%} of the time; crosses: calls that took a slow path (a "
    "condition estimated again, jitter, float64 residual, refinement), left out of the fit.",
}


def write_report(
    out: Path, *, seed: int = 0, progress: Callable[[str], None] | None = None
) -> Path:
    """Figures and ``report.md`` for the sweep in ``out`` (fits and claims recomputed), all
    written or, on a failure, none; ``progress(label)`` after each figure and each claim on
    time of each device.

    A sweep over several devices gets one report per device in ``devices/<name>/`` (fits
    and claims never mix devices) and an index of them in ``report.md``.
    """
    df, meta = load(out)
    with staged(out) as stage:
        _write_reports(df, meta, out, stage, seed=seed, progress=progress)
    return out / "report.md"


def _write_reports(
    df: pd.DataFrame, meta: dict, out: Path, stage: Path, *, seed: int, progress
) -> None:
    """:func:`write_report`'s files, written in ``stage`` as they will lie in ``out``."""
    contributed = markdown_table(devices.summary(df, meta))
    parts = list(devices.by_device(df, meta))
    if len(parts) == 1:
        _, rows, device = parts[0]
        device_report(rows, device, stage, out, contributed, seed=seed, progress=progress)
        return
    lines = [
        f"# Scaling report: {len(parts)} devices",
        "",
        f"Produced by {produced_by(meta)} (sweep), then "
        f"`riemann-bench fit`, `validate` and `report` on `{out}` (the claims judged by the "
        f"code at commit {git_commit()}); regenerate the reports "
        f"from `results.csv` with `{regenerate_command(out, seed)}`.",
        "",
        *unfinished_lines(meta, out),
        "## Devices",
        "",
        contributed,
        "",
        "Fits and claims never mix devices: each has its own report.",
        "",
    ]
    slugs: set[str] = set()
    for name, rows, device in parts:
        # one directory per device: names that differ in case or punctuation only, or
        # with no letter or digit, share a slug (found by a hunt: one report overwrote
        # the other, or landed in devices/ itself)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"
        slug = next(
            s for i in itertools.count(1) if (s := slug + (f"-{i}" if i > 1 else "")) not in slugs
        )
        slugs.add(slug)
        directory = stage / "devices" / slug
        directory.mkdir(parents=True, exist_ok=True)
        path = device_report(
            rows, device, directory, out, contributed, seed=seed, progress=progress
        )
        lines.append(f"- [{name}]({path.relative_to(stage)})")
    write_atomic(stage / "report.md", "\n".join(lines) + "\n")


def unfinished_lines(meta: dict, out: Path) -> list[str]:
    """The banner of a sweep that did not finish (:func:`sweep.unfinished_note`), if so."""
    note = unfinished_note(meta, out)
    return [f"**An unfinished sweep**: {note[0].upper()}{note[1:]}.", ""] if note else []


def regenerate_command(out: Path, seed: int) -> str:
    """The command that draws the report again: with the seed, on which the claims'
    bootstrap intervals depend, where it is not the default."""
    return f"riemann-bench report --out {shlex.quote(str(out))}" + (
        f" --seed {seed}" if seed else ""
    )


def produced_by(meta: dict) -> str:
    """The sweep commands that filled the directory, in order (a resume adds its own)."""
    commands = meta.get("commands") or [meta.get("command", "riemann-bench run")]
    first, *resumes = [f"`{c}`" for c in commands]
    return first + "".join(f", resumed by {c}" for c in resumes)


def device_report(
    df: pd.DataFrame,
    meta: dict,
    directory: Path,
    out: Path,
    contributed: str,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Figures and ``report.md`` in ``directory`` for the rows of one device of the sweep
    in ``out`` (``meta``: the sweep's record with that device's rates and environment);
    ``contributed``: the table of the devices of the sweep."""
    rates = fit.achieved_rates(df, fit.sweep_rates(df, meta))
    paths = figures(df, meta, rates, directory, progress)
    claims = validate.validate(df, meta, seed=seed, progress=progress)
    env = meta.get("environment", {})
    regenerate = regenerate_command(out, seed)
    verdicts = pd.Series([c.verdict for c in claims]).value_counts()
    lines = [
        f"# Scaling report: {env.get('device_name', 'unknown device')}",
        "",
        f"Produced by {produced_by(meta)} (sweep), then "
        f"`riemann-bench fit`, `validate` and `report` on `{out}` (the claims judged by the "
        f"code at commit {git_commit()}). Regenerate the figures and "
        f"this file from `results.csv` with `{regenerate}`.",
        "",
        *unfinished_lines(meta, out),
        "## Claims",
        "",
        ", ".join(f"{n} {v}" for v, n in verdicts.items()) + f" of {len(claims)} claims.",
        "",
        markdown_table(
            pd.DataFrame([c.to_dict() for c in claims])[
                ["id", "verdict", "basis", "measured", "low", "high", "expected", "detail"]
            ]
        ),
        "",
        "Complexity claims are checked on counted FLOPs (exact, the same on every device), "
        "time against the counted FLOPs through the time model; the rules are in "
        "`docs/measuring.md` and `riemann_core/scaling/validate.py`.",
        "",
        *_rates_section(meta, df),
        *_growth_section(meta),
        *_flagged_section(df),
        "## Time model (`time_model.csv`)",
        "",
        *_left_out_lines(df),
        _table(fit.time_model_table(df)),
        "",
        "## Exponents per axis (`fits.csv`)",
        "",
        _table(fit.fit_table(df, meta, seed=seed)),
        "",
        "## Environment",
        "",
        markdown_table(pd.DataFrame([env])) if env else "(not recorded)",
        "",
        "Where the points were measured (fits and claims never mix devices):",
        "",
        contributed,
        "",
        f"Grid: one axis varied at a time around the base point {meta['base']}; axes "
        f"{meta['axes']}, grown as above. Status counts: {df['status'].value_counts().to_dict()}.",
        "",
        "## Figures",
        "",
    ]
    for key, path in paths.items():
        lines += [f"![{key}]({path.name})", "", f"{CAPTIONS[key]} Regenerate: `{regenerate}`.", ""]
    return write_atomic(directory / "report.md", "\n".join(lines))


def _table(frame: pd.DataFrame) -> str:
    return markdown_table(frame) if not frame.empty else "(too few points)"


def _rates_section(meta: dict, df: pd.DataFrame) -> list[str]:
    dtype = fit.ok_dtype(df)
    measured = fit.device_rates(meta, dtype)
    spread = fit.rate_spread(meta, dtype)
    sessions = fit.rate_medians(meta, dtype)
    records = [
        {
            "kind": kind,
            "median GFLOP/s": np.median(v) / 1e9,
            "min": min(v) / 1e9,
            "max": max(v) / 1e9,
            "spread": spread[kind],
            "measurements": len(sessions[kind]),
            "samples": len(v),
        }
        for kind, v in measured.items()
    ]
    moved = [k for k, s in spread.items() if s > SPREAD_LIMIT]
    stand = (
        "The claims on counted FLOPs stand, and so do the passes on points timed in the same "
        "interleaved rounds (basis: interleaved time)."
    )
    if any(math.isnan(s) for s in spread.values()):
        warning = (
            "**The rates were measured once** (the sweep stopped before it measured them "
            "again), so whether the device's speed held during the sweep is not known, and "
            f"the claims on time of points measured one after another read too noisy; resume "
            f"the sweep. {stand}"
        )
    elif moved:
        warning = (
            f"**The device's speed moved during the sweep** ({', '.join(moved)} spread over "
            f"{SPREAD_LIMIT:.0%}: other load on the machine?), so the claims on time of points "
            f"measured one after another are too noisy to judge; rerun on a quiet machine. "
            f"{stand}"
        )
    else:
        warning = "The rates held steady during the sweep."
    # a load the rates' spread does not show (validate.unsteady_reasons)
    signs = [validate.points_flagged_for_load(df), validate.cpus_taken_by_others(meta)]
    if loaded := "; and ".join(sign.why for sign in signs if sign is not None):
        steady = warning == "The rates held steady during the sweep."
        head = "The rates held steady, but" if steady else warning.removesuffix(f" {stand}")
        warning = (
            f"{head} **{'t' if steady else 'T'}he machine was loaded during the sweep**: "
            f"{loaded}; so the claims on time of points measured one after another are too "
            f"noisy to judge; rerun on a quiet machine. {stand}"
        )
    size = meta.get("grid", {}).get("rate_size", "?")
    return [
        f"## Device rates ({dtype or 'all dtypes'}, size {size}, during the sweep)",
        "",
        _table(pd.DataFrame.from_records(records)),
        "",
        warning,
        "",
    ]


def _growth_section(meta: dict) -> list[str]:
    growth = meta.get("growth", {})
    if not growth:
        return []
    frame = pd.DataFrame(
        [{"method/kernel/axis": k, "growth": v} for k, v in sorted(growth.items())]
    )
    seconds = meta.get("sweep_s")
    took = f" The sweep measured for {seconds:.0f} s." if seconds is not None else ""
    # the rule of the code that ran the sweep, as it recorded it
    rule = meta.get("growth_rule") or (
        "Width and batch grew per method by the growth rule of the version that ran the "
        "sweep, which the sweep did not record. This version's rule: "
        + grow.rule(meta.get("grid", {}).get("overhead_target", fit.OVERHEAD_TARGET))
    )
    # decisions kept by a resume from an earlier run grew by that run's rule (found by
    # review: a resume by a later version said its own rule had made them)
    by_rule: dict[str | None, list[str]] = {}
    for name, earlier in sorted(meta.get("earlier_growth_rules", {}).items()):
        if name in growth:
            by_rule.setdefault(earlier, []).append(name)
    earlier_lines = [
        f" The decisions of {', '.join(names)} were kept from an earlier run into this "
        "directory, which grew "
        + (
            f"by its own rule: {earlier}"
            if earlier
            else "by the rule of the version that ran it, which it did not record."
        )
        for earlier, names in by_rule.items()
    ]
    return [
        "## Growth of the grid",
        "",
        f"{rule}{''.join(earlier_lines)}{took} Each decision was read from the times as they "
        "stood when growth stopped, before outliers were measured again and the top pairs "
        "timed again interleaved: the claims and the exponents above judge the final times, "
        "so their figures may differ from these.",
        "",
        markdown_table(frame),
        "",
    ]


def _left_out_lines(df: pd.DataFrame) -> list[str]:
    """A line saying how many points the time model and the fits left out, and why."""
    count = int(((df["status"] == "ok") & fit.stretches_disagree(df)).sum())
    return [_left_out_sentence(count), ""] if count else []


def _left_out_sentence(count: int) -> str:
    """What became of the points whose stretches of time disagree (``count`` of them)."""
    return (
        f"{count} point{'' if count == 1 else 's'} timed in stretches of time whose medians "
        f"disagree by more than {SPREAD_LIMIT:.0%} (`stretch_spread`: the slowest "
        "stretch's median over the fastest's, less 1; flagged `stretches`) "
        f"{'was' if count == 1 else 'were'} left out of the time model, the exponents per "
        "axis and the claims on time (a depth line holding one gets no verdict from its "
        "times): such a "
        "point's median pools two states of the machine and is no time of the point."
    )


def _flagged_section(df: pd.DataFrame) -> list[str]:
    slow_paths = df["slow_paths"] if "slow_paths" in df else pd.Series("", index=df.index)
    df = df.assign(slow_paths=slow_paths.fillna(""), flops_vs_model=df["flops"] / df["flops_model"])
    df = df.assign(stretch_spread=fit.stretch_spreads(df))
    apart = (df["status"] == "ok") & fit.stretches_disagree(df)
    flagged = df[(df["flag"] != "") | (df["remeasured"] > 0) | (df["slow_paths"] != "") | apart]
    columns = ["method", "kernel", *AXES, "time_median_s", "spread", "remeasured", "flag"]
    columns += ["stretch_spread", "slow_paths", "flops_vs_model"]
    text = (
        f"Points whose repeats spread over {SPREAD_LIMIT:.0%} of their median, that were "
        "timed while other processes kept busy more CPUs than they left free, or whose "
        "median was far from both neighbours, were measured once more (`remeasured`); "
        "`flag` says which still are (`spread`, `loaded`, `outlier`; a line timed again is "
        "flagged `loaded` where the load read around its rounds was, and not timed once "
        "more for it). `slow_paths` names the "
        "data-dependent slow paths a point's solves took (a Gram's condition estimated again "
        "from the whole Gram, a float64 residual, "
        "refinement, a Cholesky redone with jitter): their work is in "
        "the point's time and counted FLOPs (`flops_vs_model`) but in no cost model, so every "
        "claim leaves such points out."
        + (f" {_left_out_sentence(n)}" if (n := int(apart.sum())) else "")
    )
    return [
        "## Re-measured and flagged points",
        "",
        text,
        "",
        markdown_table(flagged[columns]) if not flagged.empty else "(none)",
        "",
    ]
