"""``riemann-bench report``: scaling plots and ``report.md`` from a sweep's results.

Every figure is drawn from ``results.csv`` in the output directory, and ``report.md``
names the command that regenerates it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from ..measure.output import markdown_table, pyplot, save_figure
from .sweep import AXES

#: Axis -> ``(label, [(exponent, guide label)])``: theoretical slopes drawn as guides.
GUIDES = {
    "width": (
        "width w (n ~ depth w^2)",
        [(2, "w^2: layerwise generic, O(n) at fixed d"), (6, "w^6: full, O(n^3)")],
    ),
    "depth": ("hidden layers (L = depth + 1 modules)", [(1, "linear: all but full")]),
    "out_dim": ("output dimension C (d = N C)", [(3, "C^3: the d^3 term")]),
    "batch": ("batch N (d = N C)", [(2, "N^2: n d^2"), (3, "N^3: d^3")]),
}
METRICS = {
    "time_median_s": "time per direction [s]",
    "flops": "counted FLOPs",
    "peak_bytes": "peak memory above baseline [bytes]",
}


def load(out: Path) -> tuple[pd.DataFrame, dict]:
    df = pd.read_csv(out / "results.csv")
    meta = json.loads((out / "sweep.json").read_text())
    df["label"] = df["method"] + " (" + df["kernel"] + ")"
    return df, meta


def along(df: pd.DataFrame, base: dict, axis: str) -> pd.DataFrame:
    """Ok rows that vary ``axis`` with the other axes at the base point."""
    mask = df["status"] == "ok"
    for other in AXES:
        if other != axis:
            mask &= df[other] == base[other]
    return df[mask]


def _guides(ax, data: pd.DataFrame, axis: str, metric: str) -> None:
    """Dashed slope guides over the upper half of the axis (the asymptotic range the fits
    use), ending at the geometric mean of the series at the largest value."""
    import numpy as np

    xs = np.sort(data[axis].unique())
    if len(xs) < 2:
        return
    tail = xs[len(xs) // 2 :] if len(xs) > 3 else xs
    y_end = float(np.exp(np.log(data.loc[data[axis] == xs[-1], metric]).mean()))
    for exponent, text in GUIDES[axis][1]:
        ax.plot(tail, y_end * (tail / tail[-1]) ** exponent, ls="--", lw=0.9, color="0.4")
        ax.annotate(
            text,
            (tail[0], y_end * (tail[0] / tail[-1]) ** exponent),
            fontsize=6,
            color="0.3",
            ha="right",
            va="center",
        )


def scaling_figure(df: pd.DataFrame, meta: dict, metric: str, path: Path) -> Path:
    """Log-log ``metric`` against each axis, one panel per axis, a line per method."""
    plt = pyplot()
    import seaborn as sns

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    order = sorted(df["label"].unique())
    for ax, axis in zip(axes.flat, AXES, strict=True):
        data = along(df, meta["base"], axis).dropna(subset=[metric])
        data = data[data[metric] > 0]
        if data.empty:
            ax.set_title(f"{axis}: no data")
            continue
        sns.lineplot(
            data=data,
            x=axis,
            y=metric,
            hue="label",
            hue_order=order,
            marker="o",
            ax=ax,
            legend=axis == "width",
        )
        ax.set(xscale="log", yscale="log", xlabel=GUIDES[axis][0], ylabel=METRICS[metric])
        low, high = data[metric].min(), data[metric].max()
        if metric != "peak_bytes":
            _guides(ax, data, axis, metric)
        ax.set_ylim(low / 3, high * 3)  # guides may not stretch the data's range
        ax.grid(True, which="both", lw=0.3)
    base = ", ".join(f"{k}={v}" for k, v in meta["base"].items())
    fig.suptitle(f"{METRICS[metric]} (one axis varied, others at {base})")
    return save_figure(fig, path)


def crossover_figure(df: pd.DataFrame, meta: dict, path: Path) -> Path:
    """Layerwise against full along the width axis, with their time ratio."""
    plt = pyplot()

    data = along(df, meta["base"], "width")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, group in data.groupby("label"):
        if label.split()[0] in ("layerwise", "full", "natural"):
            group = group.sort_values("n_params")
            left.plot(group["n_params"], group["time_median_s"], marker="o", label=label)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="parameters n",
        ylabel="time [s]",
        title="layerwise vs full along width",
    )
    left.legend(fontsize=7)
    pivot = data[data["kernel"] == "structured"].pivot_table(
        index="n_params", columns="method", values="time_median_s"
    )
    if {"full", "layerwise"} <= set(pivot.columns):
        ratio = (pivot["full"] / pivot["layerwise"]).dropna()
        right.plot(ratio.index, ratio.values, marker="o")
        right.axhline(1.0, color="0.5", ls="--", lw=0.8)
    right.set(
        xscale="log",
        yscale="log",
        xlabel="parameters n",
        ylabel="time full / time layerwise",
        title="crossover: above 1 layerwise wins",
    )
    return save_figure(fig, path)


def rate_figure(df: pd.DataFrame, meta: dict, path: Path) -> Path:
    """Achieved FLOP/s as a fraction of the GEMM rate measured in the same run."""
    plt = pyplot()
    import seaborn as sns

    data = along(df, meta["base"], "width").copy()
    data["fraction"] = data["flops"] / data["time_median_s"] / meta["gemm_flops_per_s"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=data, x="width", y="fraction", hue="label", marker="o", ax=ax)
    ax.set(
        xscale="log",
        xlabel="width w",
        ylabel="achieved FLOP/s / GEMM rate",
        title=f"GEMM rate {meta['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s (same run)",
    )
    ax.grid(True, which="both", lw=0.3)
    return save_figure(fig, path)


def figures(df: pd.DataFrame, meta: dict, out: Path) -> dict[str, Path]:
    return {
        "time": scaling_figure(df, meta, "time_median_s", out / "time.png"),
        "flops": scaling_figure(df, meta, "flops", out / "flops.png"),
        "memory": scaling_figure(df, meta, "peak_bytes", out / "memory.png"),
        "crossover": crossover_figure(df, meta, out / "crossover.png"),
        "rate": rate_figure(df, meta, out / "achieved_rate.png"),
    }


def write_report(out: Path, *, seed: int = 0) -> Path:
    """Figures and ``report.md`` for the sweep in ``out`` (fits and claims recomputed).

    A sweep over several devices gets one report per device in ``devices/<name>/`` (fits
    and claims never mix devices) and an index of them in ``report.md``.
    """
    from ..measure.output import write_atomic
    from . import devices

    df, meta = load(out)
    contributed = markdown_table(devices.summary(df, meta))
    parts = list(devices.by_device(df, meta))
    if len(parts) == 1:
        _, rows, device = parts[0]
        return device_report(rows, device, out, out, contributed, seed=seed)
    lines = [
        f"# Scaling report: {len(parts)} devices",
        "",
        f"Produced by `{meta.get('command', 'riemann-bench run')}` (sweep), then "
        f"`riemann-bench fit`, `validate` and `report` on `{out}`; regenerate the reports "
        f"from `results.csv` with `riemann-bench report --out {out}`.",
        "",
        "## Devices",
        "",
        contributed,
        "",
        "Fits and claims never mix devices: each has its own report.",
        "",
    ]
    for name, rows, device in parts:
        directory = out / "devices" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        directory.mkdir(parents=True, exist_ok=True)
        path = device_report(rows, device, directory, out, contributed, seed=seed)
        lines.append(f"- [{name}]({path.relative_to(out)})")
    return write_atomic(out / "report.md", "\n".join(lines) + "\n")


def device_report(
    df: pd.DataFrame, meta: dict, directory: Path, out: Path, contributed: str, *, seed: int = 0
) -> Path:
    """Figures and ``report.md`` in ``directory`` for the rows of one device of the sweep
    in ``out``; ``contributed``: the table of the devices of the sweep."""
    from ..measure.output import write_atomic
    from . import fit, validate

    paths = figures(df, meta, directory)
    fits = fit.fit_table(df, meta, seed=seed)
    joint = fit.joint_fit(df)
    claims = validate.validate(df, meta, seed=seed)
    env = meta.get("environment", {})
    regenerate = f"riemann-bench report --out {out}"
    counts = df["status"].value_counts().to_dict()
    lines = [
        f"# Scaling report: {env.get('device_name', 'unknown device')}",
        "",
        f"Produced by `{meta.get('command', 'riemann-bench run')}` (sweep), then "
        f"`riemann-bench fit`, `validate` and `report` on `{out}`. Regenerate the figures and "
        f"this file from `results.csv` with `{regenerate}`.",
        "",
        "## Environment",
        "",
        markdown_table(pd.DataFrame([env])) if env else "(not recorded)",
        "",
        "Where the points were measured (fits and claims never mix devices):",
        "",
        contributed,
        "",
        f"GEMM rate measured in the sweep: {meta['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s "
        "(float32). Grid: one axis varied at a time around the base point "
        f"{meta['base']}; axes {meta['axes']}. Status counts: {counts}.",
        "",
        "## Claims",
        "",
        markdown_table(
            pd.DataFrame([c.to_dict() for c in claims])[
                ["id", "verdict", "expected", "measured", "low", "high", "detail"]
            ]
        ),
        "",
        "Verdicts: `pass` when the estimate lies in the expected band and its 95% interval "
        f"is at most {validate.MAX_INTERVAL_WIDTH:g} wide, `fail` when the interval lies "
        "outside the band, `inconclusive` otherwise (see "
        "`riemann_core/scaling/validate.py`).",
        "",
        "## Fitted slopes (asymptotic range, bootstrap 95% interval)",
        "",
        markdown_table(fits) if not fits.empty else "(too few points)",
        "",
        "## Joint fit `time ~ a n d^2 + b d^3 + c` (non-negative least squares)",
        "",
        markdown_table(joint) if not joint.empty else "(too few points)",
        "",
        "## Figures",
        "",
    ]
    captions = {
        "time": "Time per direction against each axis; dashed lines: theoretical slopes.",
        "flops": "Counted FLOPs (FlopCounterMode plus the linear-algebra formulas).",
        "memory": "Peak memory of one direction: CUDA allocator peak, or on the host the rise "
        "of resident memory (a lower bound: reused allocator memory does not show).",
        "crossover": "Layerwise against full along the width axis, and their time ratio.",
        "rate": "Achieved FLOP/s as a fraction of the GEMM rate of the same run.",
    }
    for key, path in paths.items():
        lines += [f"![{key}]({path.name})", "", f"{captions[key]} Regenerate: `{regenerate}`.", ""]
    return write_atomic(directory / "report.md", "\n".join(lines))
