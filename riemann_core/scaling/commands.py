"""The scaling study's subcommands: ``sweep``, ``fit``, ``validate``, ``report`` and ``run``.

All read and write one directory (``--out``, default ``reports/<device>[/quick]``):
``results.csv`` and ``sweep.json`` (sweep), ``fits.csv``, ``time_model.csv`` and
``rates.csv`` (fit), ``claims.json`` (validate), the figures and ``report.md`` (report).
``fit``, ``validate`` and ``report`` analyse what the sweep measured: for them ``--device``
and ``--quick`` only choose the default directory, and are refused beside ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from contextlib import contextmanager

from ..arguments import MAX_REPEATS, Command, check_distinct, default_out, ints, names
from . import sweep as sw


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("grid (defaults: the default grid, or the quick one)")
    for axis, dest in sw.AXIS_OPTIONS.items():
        flag = "--" + dest.replace("_", "-")
        group.add_argument(flag, dest=dest, type=ints, metavar="A,B,..", help=f"values of {axis}")
    group.add_argument(
        "--base", type=ints, metavar="W,L,C,N", help="base point: width, depth, out_dim, batch"
    )
    group.add_argument(
        "--methods",
        type=names,
        metavar="M,..",
        help=f"comma-separated subset of {','.join(sw.METHODS)} (default: all); kfac-default "
        "is K-FAC as its users run it (one-sample Monte Carlo Fisher, factored damping, "
        "weight and bias apart)",
    )
    group.add_argument("--kernels", type=names, help="structured and/or generic")
    group.add_argument("--dtypes", type=names, help="float32 or float64 (one per --out)")
    group.add_argument("--output-metric", choices=("exact", "sampled"))
    group.add_argument("--repeats", type=int, help=f"timed calls per point (at most {MAX_REPEATS})")
    group.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="seconds the grid and its growth may take (the axes stop growing before it runs "
        "out); the re-measurements and rate measurements come on top",
    )
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
    spec = sw.default_grid(str(args.device), args.quick)
    spec["axes"] = dict(spec["axes"])
    for axis, dest in sw.AXIS_OPTIONS.items():
        values = getattr(args, dest, None)
        if values is not None:
            check_distinct(f"--{dest.replace('_', '-')}", values)  # as a method twice is
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
    if getattr(args, "time_budget", None) is not None:
        spec["time_budget_s"] = args.time_budget
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
            'python -m pip install -c constraints.txt -e ".[bench]", or pass --workers 0 to measure '
            "in this process"
        ) from err
    options = dispatch.ClusterOptions(args.workers, args.threads_per_worker, args.scheduler)
    with dispatch.runner(options, args.device) as runner:
        yield runner


def run_sweep(args) -> int:
    from ..measure.output import check_not_foreign, results_directory
    from ..measure.timing import device_rates

    grid = grid_from(args)
    check_cluster_options(args)
    out = default_out(args)
    # a corrupted file, another version's, another sweep's or another command's stops us
    # before any cluster, and so does an --out we cannot write to
    check_not_foreign(out, "sweep.json")
    rows = sw.read_results(out / "results.csv")
    sw.resumable_record(out, rows, grid)
    sw.check_same_model([r for r in rows if r["status"] == "ok"], out / "results.csv")
    sw.check_can_write(out)  # its files too (an immutable results.csv), not only the directory
    rates = functools.partial(device_rates, n=grid.rate_size)
    with results_directory(out), points_runner(args) as runner:
        result = sw.sweep(
            grid,
            out,
            meta={"command": args.command_line},
            runner=runner,
            rates=rates,
            retime=sw.time_lines,
        )
    print(
        f"{out / 'results.csv'}: {result.measured} points measured, {result.resumed} "
        "already there"
        + (f", {result.again} measured once more as outliers" if result.again else "")
        + (
            f", {result.retimed} timed again in lines of one stretch (their times replaced)"
            if result.retimed
            else ""
        )
        + f"; status counts {result.statuses}"
    )
    for axis, decision in result.growth.items():
        print(f"  growth {axis}: {decision}")
    return 0


def _analysed_out(args):
    """``--out`` of fit, validate and report, refusing the options they would ignore, and
    checked writable before their work."""
    from ..measure.output import check_writable

    if args.command in ("fit", "validate", "report") and args.out is not None:
        ignored = [
            option
            for option, given in (
                ("--quick", args.quick),
                ("--device", getattr(args, "device_given", False)),  # even the default, cpu
            )
            if given
        ]
        if ignored:
            raise ValueError(
                f"{' and '.join(ignored)} only choose{'s' if len(ignored) == 1 else ''} the "
                "default directory of "
                f"'{args.command}', which analyses what the sweep in --out measured; "
                f"drop {'it' if len(ignored) == 1 else 'them'} or drop --out"
            )
    out = default_out(args)
    if out.is_dir():  # a sweep to analyse (else reading it says what is missing)
        check_writable(out)
    return out


def run_fit(args) -> int:
    from ..measure.output import derived_csv, progress_bar, staged, write_atomic
    from . import devices, fit

    out = _analysed_out(args)
    df, meta = fit.read_sweep(out)
    _say_if_unfinished(meta, out)
    df = devices.named(df, meta)
    with progress_bar("fit", unit="fit") as progress:
        table = fit.fit_table(df, meta, seed=args.seed, progress=progress)
    models = fit.time_model_table(df)
    rates = devices.achieved_rates(df, meta)
    with staged(out) as stage:  # all three, or none
        write_atomic(stage / "fits.csv", derived_csv(table))
        write_atomic(stage / "time_model.csv", derived_csv(models))
        write_atomic(stage / "rates.csv", derived_csv(rates))
    with _pandas_display():
        for frame in (table, models):
            print(frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"), end="\n\n")
    for name, device_rows, device in devices.by_device(df, meta):
        for dtype in sorted(device_rows["dtype"].unique()):
            best = fit.best_rates(device, dtype)
            measured = ", ".join(f"{kind} {rate / 1e9:.1f}" for kind, rate in best.items())
            print(
                f"{dtype} rates of {name} during the sweep (GFLOP/s, median): {measured or 'none'}"
            )
    apart = (df["status"] == "ok") & fit.stretches_disagree(df)
    if apart.any():
        print(
            f"left out of the time model and the fits: {int(apart.sum())} point(s) timed in "
            f"stretches of time whose medians disagree by more than {sw.SPREAD_LIMIT:.0%} "
            "(their pooled median is no time of the point; rerun the sweep on a quiet "
            "machine): "
            + ", ".join(
                f"{r.method} ({r.kernel}) {'/'.join(str(int(getattr(r, a))) for a in sw.AXES)}"
                for r in df[apart].itertuples()
            )
        )
    print(
        f"wrote fits.csv (exponents of FLOPs and time per axis), time_model.csv (overhead "
        f"and achieved rates per method) and rates.csv (FLOP/s and time / speed of light "
        f"per point) in {out}"
    )
    return 0


def _say_if_unfinished(meta: dict, out) -> None:
    if note := sw.unfinished_note(meta, out):
        print(f"note: {note}", file=sys.stderr)


def run_validate(args) -> int:
    from ..measure.environment import git_commit
    from ..measure.output import progress_bar
    from . import devices, fit, validate

    out = _analysed_out(args)
    df, meta = fit.read_sweep(out)
    _say_if_unfinished(meta, out)
    for _, rows, device in devices.by_device(devices.named(df, meta), meta):
        fit.sweep_rates(rows, device)  # the claims on time need them, as fit does
    with progress_bar("validate", unit="claim") as progress:
        pairs = devices.claims(df, meta, seed=args.seed, progress=progress)
    names = [name for name, _ in pairs]
    claims = [claim for _, claim in pairs]
    provenance = {  # found by a hunt: the claims named nothing of what produced them
        "command": args.command_line,
        "seed": args.seed,
        "sweep": meta.get("sweep"),
        "sweep_commands": meta.get("commands") or [meta.get("command")],
        "commit": git_commit(),  # of the code that judged (found by review: only the sweep's)
    }
    validate.write_claims(claims, out / "claims.json", device_names=names, provenance=provenance)
    for name, c in pairs:
        unknown = c.low is None or math.isnan(c.low)  # (too few repeat times: no interval)
        interval = "" if unknown else f" [{c.low:.3g}, {c.high:.3g}]"
        measured = "" if c.measured is None else f" {c.measured:.3g}{interval}"
        where = f"{name}: " if len(set(names)) > 1 else ""
        print(f"{c.verdict:>18}  {where}{c.id:<32}{measured}")
    return validate.exit_code(claims)


def run_report(args) -> int:
    from ..measure.output import progress_bar
    from .fit import require_sweep
    from .report import write_report

    out = _analysed_out(args)
    require_sweep(out)  # refused before a progress bar is drawn
    with progress_bar("report", unit="step") as progress:
        path = write_report(out, seed=args.seed, progress=progress)
    print(f"wrote {path}")
    return 0


def run_all(args) -> int:
    """Sweep, fit, validate, report; the exit code is validate's (1 when a claim fails),
    once the report is written."""
    check_cluster_options(args)
    run_sweep(args)
    run_fit(args)
    code = run_validate(args)
    run_report(args)
    return code


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
        "Measure every method (layerwise also with the generic kernel, K-FAC also as its "
        "users run it by default: kfac-default) on MLPs varying one "
        "of width, depth, output dimension and batch at a time around a base point: "
        "median and IQR of wall-clock, counted FLOPs by kind, peak memory and a status per "
        "point. Width and batch grow, per method, until the per-call overhead is a small "
        "part of the time or a budget ends. The points run on a local dask cluster (one "
        "worker per device), on a running one (--scheduler) or in this process (--workers "
        "0); each device's GEMM, Cholesky and triangular-solve rates are measured where its "
        "points run, at the start, after the grid and at the end. Points already in "
        "results.csv are kept; this process alone rewrites the file, atomically.",
        "sweep --quick --methods layerwise,full --widths 8,16,32,64",
        add_sweep_arguments,
    ),
    Command(
        "fit",
        run_fit,
        "exponents of counted FLOPs, the time model and achieved rates",
        "Fit, per method and axis, the local exponents of the counted and the modelled "
        "FLOPs and the exponent of time against the modelled compute time; per method the "
        "time model t = t0 + t_module L + sum F_kind / R_kind (overhead and achieved "
        "rates); per point the FLOP rate and time / speed of light. --device and --quick "
        "only choose the default directory.",
        "fit --out reports/cpu",
        runs_on_device=False,
    ),
    Command(
        "validate",
        run_validate,
        "check the complexity claims; non-zero exit when one fails",
        "Check the complexity claims on counted FLOPs (each method's cost model, the "
        "paper's exponents where the leading terms dominate, linear in depth) and on time "
        "(explained by the FLOPs at stable rates, the crossover width, structured vs "
        "generic), and write claims.json: pass, fail, regime not reached, not measured or "
        "too noisy, each with its reason. --device and --quick only choose the default "
        "directory.",
        "validate --out reports/cpu",
        runs_on_device=False,
    ),
    Command(
        "report",
        run_report,
        "scaling plots and report.md from a sweep",
        "Draw time, FLOPs and memory against every axis (log-log, theoretical slopes as "
        "guides, the memory model beside the measurement), the layerwise/full crossover "
        "and the achieved rates against the device's and the speed of light, and write "
        "report.md with the verdicts, tables, environment and regenerating commands. "
        "--device and --quick only choose the default directory.",
        "report --out reports/cpu",
        runs_on_device=False,
    ),
    Command(
        "run",
        run_all,
        "the main job: sweep, fit, validate and report on the default grid",
        "Sweep the default grid (or the quick one) of the device, fit, validate and "
        "report, under reports/<device>/ unless --out says otherwise; exit code 1 when a "
        "claim fails.",
        "run --quick",
        add_sweep_arguments,
    ),
)
