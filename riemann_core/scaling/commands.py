"""The scaling study's subcommands: ``sweep``, ``fit``, ``validate``, ``report`` and ``run``.

All read and write one directory (``--out``, default ``reports/<device>``):
``results.csv`` and ``sweep.json`` (sweep), ``fits.csv`` and ``joint_fit.csv`` (fit),
``claims.json`` (validate), the figures and ``report.md`` (report).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

from ..arguments import Command, default_out, ints, names
from . import sweep as sw


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("grid (defaults: the default grid, or the quick one)")
    for axis, dest in sw.AXIS_OPTIONS.items():
        flag = "--" + dest.replace("_", "-")
        group.add_argument(flag, dest=dest, type=ints, metavar="A,B,..", help=f"values of {axis}")
    group.add_argument(
        "--base", type=ints, metavar="W,L,C,N", help="base point: width, depth, out_dim, batch"
    )
    group.add_argument("--methods", type=names, help="comma-separated subset of rc.METHODS")
    group.add_argument("--kernels", type=names, help="structured and/or generic")
    group.add_argument("--dtypes", type=names, help="float32 and/or float64")
    group.add_argument("--output-metric", choices=("exact", "sampled"))
    group.add_argument("--repeats", type=int, help="timed calls per point")
    group.add_argument(
        "--memory-budget-gib",
        type=float,
        help="skip points whose modelled peak memory exceeds this",
    )
    group.add_argument(
        "--flop-budget", type=float, help="skip points whose modelled FLOPs exceed this"
    )
    group = parser.add_argument_group(
        "where the points run (default: a local dask cluster, one worker per device)"
    )
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes of the local cluster (default: one per GPU, or one that owns "
        "all the cores of a CPU host); 0 measures in this process, without dask",
    )
    group.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="T",
        help="torch threads of each local worker, on cores of its own (default: the cores "
        "shared equally among the workers)",
    )
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS|FILE",
        help="measure on a running dask cluster: its scheduler's address (tcp://host:8786) "
        "or scheduler file; each worker declares --resources device=K for its K devices",
    )


def grid_from(args) -> sw.Grid:
    """The grid the options describe; a bad option raises ``ValueError`` before any work."""
    spec = dict(sw.QUICK if args.quick else sw.DEFAULT)
    spec["axes"] = dict(spec["axes"])
    for axis, dest in sw.AXIS_OPTIONS.items():
        values = getattr(args, dest, None)
        if values is not None:
            spec["axes"][axis] = values
    if args.base is not None:
        if len(args.base) != 4:
            raise ValueError(
                f"--base needs 4 integers (width, depth, out_dim, batch), got {args.base}"
            )
        spec["base"] = dict(zip(sw.AXES, args.base, strict=True))
    for name in ("methods", "kernels", "dtypes", "output_metric", "repeats", "flop_budget"):
        if getattr(args, name, None) is not None:
            spec[name] = getattr(args, name)
    if getattr(args, "memory_budget_gib", None) is not None:
        spec["memory_budget_bytes"] = args.memory_budget_gib * 2**30
    return sw.Grid(devices=(str(args.device),), seed=args.seed, **spec)


def check_cluster_options(args) -> None:
    """Reject contradictory or impossible cluster options before any work."""
    workers, threads, scheduler = (
        getattr(args, name, None) for name in ("workers", "threads_per_worker", "scheduler")
    )
    if workers is not None and workers < 0:
        raise ValueError(f"--workers needs 0 (this process) or more, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads-per-worker needs 1 or more, got {threads}")
    if scheduler is not None and (workers is not None or threads is not None):
        raise ValueError(
            "--scheduler measures on a running cluster; --workers and --threads-per-worker "
            "configure the local one: pass one or the other"
        )
    if workers == 0 and threads is not None:
        raise ValueError("--threads-per-worker configures the workers; --workers 0 has none")


@contextmanager
def points_runner(args):
    """The runner of the sweep's points: this process (``--workers 0``), a local dask
    cluster (the default) or a running one (``--scheduler``)."""
    if args.workers == 0:
        yield sw.InProcess()
        return
    try:
        from . import dispatch
    except ImportError as err:
        raise ValueError(
            f"a sweep runs on dask.distributed ({err}): install it with "
            "pip install 'riemann-bench[bench]', or pass --workers 0 to measure in this process"
        ) from err
    options = dispatch.ClusterOptions(args.workers, args.threads_per_worker, args.scheduler)
    with dispatch.runner(options, args.device) as runner:
        yield runner


def run_sweep(args) -> int:
    grid = grid_from(args)
    check_cluster_options(args)
    out = default_out(args)
    sw.read_results(out / "results.csv")  # a corrupted file stops us before any cluster,
    out.mkdir(parents=True, exist_ok=True)  # and so does an --out we cannot write to
    with points_runner(args) as runner:
        result = sw.sweep(
            grid,
            out,
            meta={"command": args.command_line},
            runner=runner,
            gemm_size=2048 if args.quick else 4096,
        )
    print(
        f"{out / 'results.csv'}: {result.measured} points measured, {result.resumed} "
        f"already there; status counts {result.statuses}"
    )
    return 0


def run_fit(args) -> int:
    from ..measure.output import write_atomic
    from . import devices, fit

    out = default_out(args)
    df, meta = fit.read_sweep(out)
    df = devices.named(df, meta)
    table = fit.fit_table(df, meta, seed=args.seed)
    joint = fit.joint_fit(df)
    rates = devices.achieved_rates(df, meta)
    write_atomic(out / "fits.csv", table.to_csv(index=False))
    write_atomic(out / "joint_fit.csv", joint.to_csv(index=False))
    write_atomic(out / "rates.csv", rates.to_csv(index=False))
    best = rates.groupby(["device_name", "method", "kernel"])["fraction_of_gemm"].max()
    with _pandas_display():
        for frame in (table, joint, best.rename("best fraction").reset_index()):
            print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"), end="\n\n")
    for name, _, device in devices.by_device(df, meta):
        print(f"GEMM rate of the sweep on {name}: {device['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"wrote fits.csv, joint_fit.csv and rates.csv (achieved FLOP/s per point) in {out}")
    return 0


def run_validate(args) -> int:
    from . import devices, fit, validate

    out = default_out(args)
    df, meta = fit.read_sweep(out)
    pairs = devices.claims(df, meta, seed=args.seed)
    names = [name for name, _ in pairs]
    claims = [claim for _, claim in pairs]
    validate.write_claims(claims, out / "claims.json", device_names=names)
    for name, c in pairs:
        interval = "" if c.low is None else f" [{c.low:.3g}, {c.high:.3g}]"
        measured = "n/a" if c.measured is None else f"{c.measured:.3g}"
        where = f"{name}: " if len(set(names)) > 1 else ""
        print(
            f"{c.verdict:>12}  {where}{c.id:<28} expected {c.expected}, measured "
            f"{measured}{interval}"
        )
    return validate.exit_code(claims)


def run_report(args) -> int:
    from .report import write_report

    path = write_report(default_out(args), seed=args.seed)
    print(f"wrote {path}")
    return 0


def run_all(args) -> int:
    """Sweep, fit, validate, report; the exit code is 0 once the report is written (the
    verdicts are in it; ``riemann-bench validate`` exits non-zero on a failed claim)."""
    check_cluster_options(args)
    if len(grid_from(args).dtypes) > 1:
        raise ValueError(
            "fits and claims compare one dtype at a time: run one --dtypes "
            "value per --out directory (sweep alone accepts several)"
        )
    run_sweep(args)
    run_fit(args)
    run_validate(args)
    return run_report(args)


class _pandas_display:
    def __enter__(self):
        import pandas as pd

        self._context = pd.option_context("display.width", 200, "display.max_rows", 500)
        self._context.__enter__()

    def __exit__(self, *exc):
        self._context.__exit__(*exc)


COMMANDS = (
    Command(
        "sweep",
        run_sweep,
        "time, FLOPs and memory over a grid of MLPs, resumably",
        "Measure every method (layerwise also with the generic kernel) on MLPs varying one "
        "of width, depth, output dimension and batch at a time around a base point: "
        "median and IQR of wall-clock, counted FLOPs, peak memory and a status per point. "
        "Points already in results.csv are skipped; the file is rewritten atomically.",
        "sweep --quick --methods layerwise,full --widths 8,16,32,64",
        add_sweep_arguments,
    ),
    Command(
        "fit",
        run_fit,
        "log-log slopes with bootstrap intervals and the joint n d^2 + d^3 fit",
        "Fit, per method and axis, the log-log slope of time over the asymptotic range "
        "(the larger half of the points) with a bootstrap 95% interval, and the "
        "non-negative least-squares fit time ~ a n d^2 + b d^3 + c with its R^2.",
        "fit --out reports/cpu",
    ),
    Command(
        "validate",
        run_validate,
        "check the complexity claims; non-zero exit when one fails",
        "Compare the measured scaling against the claims (layerwise linear in n at fixed "
        "d, d^2..d^3 in d, full n^2..n^3, the crossover width, structured vs generic, "
        "counted FLOPs vs the cost model) and write claims.json with verdicts.",
        "validate --out reports/cpu",
    ),
    Command(
        "report",
        run_report,
        "scaling plots and report.md from a sweep",
        "Draw time, FLOPs and memory against every axis (log-log, theoretical slopes as "
        "guides), the layerwise/full crossover and the achieved FLOP rate, and write "
        "report.md with the tables, verdicts, environment and regenerating commands.",
        "report --out reports/cpu",
    ),
    Command(
        "run",
        run_all,
        "the main job: sweep, fit, validate and report on the default grid",
        "Sweep the default grid (or the quick one), fit, validate and report, under "
        "reports/<device>/ unless --out says otherwise.",
        "run --quick",
        add_sweep_arguments,
    ),
)
