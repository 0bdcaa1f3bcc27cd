"""What dispatching a sweep to dask.distributed costs, and how it scales.

    python -m bench.cluster --out reports/cpu/cluster --results reports/cpu/quick

writes ``cluster.json`` (every timing, the environment, the command), ``cluster.md`` and
``throughput.png``. Three measurements, each repeated in rounds:

* **interleaved**: the points of the quick grid, or with ``--results DIR`` every point of
  the sweep in ``DIR`` (the grid's and those its growth added: a ``run --quick`` measures
  both), measured in one process and on one worker of the local cluster in turn (each
  round in a fresh process with a fresh cluster, both as cold as at a sweep's start),
  ``--chunk`` points at a time (through the runner, as in a sweep), the order alternating,
  so that both see the same machine within seconds (a shared machine's speed drifts by more
  than the effect over minutes); with the cluster's fixed cost (start-up with the worker's
  imports, shut-down) this gives the dask path's wall time over the in-process loop's for
  those points, and the points' timed medians on the worker over those here (whether the
  point waiting behind a running one, or the worker's event loop, disturbs its timing);
  then, on the same worker, dask's own work per point: empty points (each returns its row
  at once) through the same runner, their wall time and the CPU time they cost this
  process (client, scheduler and nanny) and the worker, which is what the points' extra
  wall time is made of where the cores are all the point's (on a CPU host); and the fixed
  cost split into the cluster's start and its shut-down;
* **end to end**: ``riemann-bench sweep --quick`` through the local cluster and with
  ``--workers 0``, each a fresh process from start to exit, in turn: what a user waits for,
  but each sweep takes minutes, so on a busy machine the ratio carries its drift. Growth
  follows the timings (two sweeps would grow to different points, and stop at the same
  time budget), so these sweeps measure the grid without growth (``--time-budget``
  :data:`NO_GROWTH`): the same points both ways, and their rates at the start, after the
  grid and at the end;
* **throughput**: points per second of simulated clusters of 1, 2 and 4 workers, each with
  one fake ``device`` resource, running points of a known duration (a sleep) through the
  sweep's own loop and runner (one point queued per device, as on GPUs: a sleep shares no
  cores with the client), against the ideal ``workers / duration``; start-up timed apart.

Not an asv benchmark: asv imports this module (it lies in the benchmark directory), so
dask is imported only when it runs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from riemann_core.measure.allocator import keep_freed_memory

WORKERS = (1, 2, 4)
#: empty points per round through the runner: dask's own work per point
EMPTY_POINTS = 100
#: the cluster's fixed cost, in the order paid (:func:`one_round`)
FIXED_PARTS = ("start_s", "close_s")
#: a time budget (seconds) that no growth fits in: the end-to-end sweeps measure the grid
NO_GROWTH = 1e-3
#: the goal: the dask path's wall time over the in-process loop's, one local worker
GOAL_RATIO = 1.05


def sleepy(seconds: float, run: dict, grid) -> dict:
    """A point of known duration: the cost model's row after ``seconds`` of sleep."""
    from riemann_core.scaling import sweep as sw

    time.sleep(seconds)
    return sw.blank_row(run)


def _warm_up() -> None:
    import riemann_core.scaling.sweep  # noqa: F401  (torch and the package)


def _cpu_seconds() -> float:
    import resource  # POSIX only, as the measurement

    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return usage.ru_utime + usage.ru_stime


def bookkeeping(client, runner, grid, points: int) -> dict:
    """Dask's own work per point: ``points`` empty points (:func:`sleepy` for no time)
    through ``runner``, their wall seconds and the CPU seconds of this process (the client,
    and the local cluster's scheduler and nanny) and of the workers, each per point."""
    runs = list(itertools.islice(itertools.cycle(grid.runs()), points))
    empty = functools.partial(sleepy, 0.0, grid=grid)
    list(runner(empty, runs[:5]))  # the code paths warm
    here, there = _cpu_seconds(), sum(client.run(_cpu_seconds).values())
    start = time.perf_counter()
    list(runner(empty, runs))
    wall = time.perf_counter() - start
    here, there = _cpu_seconds() - here, sum(client.run(_cpu_seconds).values()) - there
    return {
        "points": points,
        "wall_s": wall / points,
        "client_cpu_s": here / points,
        "worker_cpu_s": there / points,
    }


def interleaved(rounds: int, chunk: int, results: Path | None = None) -> list[dict]:
    """Per round, in a fresh process (as a sweep starts: a process that has measured the
    points before would run them faster, with its caches warm, than the fresh worker):
    seconds of the quick grid's points (or of every point of the sweep in ``results``)
    here and on one local worker, taken ``chunk`` points at a time in turn (the order
    alternating), the local cluster's start-up and shut-down, and the median over points
    of their timed medians on the worker over those here."""
    command = [sys.executable, "-m", "bench.cluster", "--out", ".", "--chunk", str(chunk)]
    command += [] if results is None else ["--results", str(Path(results).resolve())]
    records = []
    for r in range(rounds):
        done = subprocess.run(
            [*command, "--one-round", str(r)],
            check=True,
            stdout=subprocess.PIPE,  # its stderr passes through: a failed round's traceback
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"interleaved, round {r}: {records[-1]}", file=sys.stderr)
    return records


def sweep_of(results: Path) -> dict:
    """The commands that made the sweep in ``results`` (its ``sweep.json``) and its points
    (its ``results.csv``); a ``ValueError`` naming the file that is missing, not a sweep's
    or holds no point, and how to make one."""
    from riemann_core.scaling import sweep as sw

    make = f"make one with riemann-bench run --quick --out {shlex.quote(str(results))}"
    for name in ("sweep.json", "results.csv"):  # (read_results takes a missing one as empty)
        if not (results / name).exists():
            raise ValueError(f"{results / name}: no such file; --results takes a sweep: {make}")
    try:
        record = sw.read_record(results / "sweep.json")
        points = [sw.run_of(row) for row in sw.read_results(results / "results.csv")]
    except (OSError, ValueError) as err:
        raise ValueError(f"{err}; --results takes a sweep: {make}") from err
    if not points:
        raise ValueError(
            f"{results / 'results.csv'} holds no point; --results takes a sweep: {make}"
        )
    return {
        "results_commands": [c for c in record.get("commands") or [record.get("command")] if c],
        "results_points": points,
    }


def one_round(r: int, chunk: int, results: Path | None = None) -> dict:
    """One round of :func:`interleaved`, in this process."""
    from distributed import Client

    from riemann_core.scaling import dispatch, worker
    from riemann_core.scaling import sweep as sw

    grid = sw.Grid(**sw.QUICK)
    runs = list(grid.runs())
    if results is not None:
        runs = [sw.run_of(row) for row in sw.read_results(results / "results.csv")]
    chunks = [runs[i : i + chunk] for i in range(0, len(runs), chunk)]
    start = time.perf_counter()
    cluster = dispatch.start_cluster(dispatch.local_workers("cpu"))
    client = Client(cluster, set_as_default=False)
    client.run(_warm_up)  # done already: the worker's process imports them as it starts
    started = time.perf_counter()
    runner = dispatch.DaskRunner(client, queued=dispatch.queued_for("cpu"))  # as a sweep's
    task = functools.partial(worker.measure_here, sw.measure_point, grid=grid, session=str(r))
    there = functools.partial(task, placed=True)
    seconds = {"here": 0.0, "dask": 0.0}
    timed: dict[str, dict] = {"here": {}, "dask": {}}  # point -> its timed median
    for i, part in enumerate(chunks):
        for mode in ("here", "dask") if (i + r) % 2 == 0 else ("dask", "here"):
            t = time.perf_counter()
            if mode == "here":
                outcomes = [(run, task(run)) for run in part]
            else:
                outcomes = list(runner(there, part))
            seconds[mode] += time.perf_counter() - t
            for run, outcome in outcomes:
                row = outcome[0] if isinstance(outcome, tuple) else {}
                if row.get("status") == "ok":
                    timed[mode][sw.key_of(run)] = row["time_median_s"]
    empty = bookkeeping(client, runner, grid, EMPTY_POINTS)
    closing = time.perf_counter()
    client.close()
    cluster.close()
    closed = time.perf_counter()
    fixed = started - start + closed - closing
    return {
        **seconds,
        "fixed": fixed,
        "start_s": started - start,
        "close_s": closed - closing,
        "empty_point": empty,
        "points": len(runs),
        "chunk": chunk,
        "ratio": (seconds["dask"] + fixed) / seconds["here"],
        "timed_ratio": statistics.median(
            timed["dask"][k] / timed["here"][k] for k in timed["here"].keys() & timed["dask"]
        ),
    }


def end_to_end(rounds: int, extra: list[str]) -> list[dict]:
    """Seconds of ``riemann-bench sweep --quick`` in one process and on one local worker."""
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(rounds):
            seconds = {}
            for mode in ("here", "dask") if r % 2 == 0 else ("dask", "here"):
                command = [sys.executable, "-m", "riemann_core.cli", "sweep", "--quick"]
                command += ["--out", str(Path(scratch) / f"{mode}-{r}"), *extra]
                command += ["--time-budget", str(NO_GROWTH)]
                command += ["--workers", "0"] if mode == "here" else []
                start = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                seconds[mode] = time.perf_counter() - start
            records.append({**seconds, "ratio": seconds["dask"] / seconds["here"]})
            print(f"end to end, round {r}: {records[-1]}", file=sys.stderr)
    return records


def throughput(rounds: int, seconds: float) -> list[dict]:
    """Points per second of the quick grid's runs, each a ``seconds`` sleep, through the
    sweep's loop on a simulated cluster of each size in :data:`WORKERS` (one round: the
    sleeps have no times to grow by)."""
    from distributed import Client

    from riemann_core.scaling import dispatch
    from riemann_core.scaling import sweep as sw

    grid = sw.Grid(**{**sw.QUICK, "grow": {}})
    points = len(list(grid.runs()))
    measure = functools.partial(sleepy, seconds)
    records = []
    for r in range(rounds):
        for workers in WORKERS:
            start = time.perf_counter()
            specs = [dispatch.WorkerSpec(threads=1)] * workers  # fake devices, unpinned
            with dispatch.start_cluster(specs) as cluster, Client(cluster) as client:
                client.wait_for_workers(workers)
                client.run(_warm_up)  # imports: part of start-up, as in a long sweep
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as out:
                    # one point queued per device, as on GPUs: a sleep shares no cores
                    runner = dispatch.DaskRunner(client, queued=1)
                    sw.sweep(grid, Path(out), runner=runner, measure=measure, progress=False)
                done = time.perf_counter()
            records.append(
                {
                    "round": r,
                    "workers": workers,
                    "points": points,
                    "startup_s": started - start,
                    "seconds": done - started,
                    "points_per_s": points / (done - started),
                    "ideal_points_per_s": workers / seconds,
                }
            )
            print(f"throughput: {records[-1]}", file=sys.stderr)
    return records


def _spread(records: list[dict]) -> dict | None:
    ratios = [r["ratio"] for r in records]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def summary(record: dict) -> dict:
    """Median and range of each overhead ratio; median throughput per cluster size."""
    sizes = {}
    for workers in WORKERS:
        mine = [r for r in record["throughput"] if r["workers"] == workers]
        if mine:
            sizes[workers] = {
                "points_per_s": statistics.median(r["points_per_s"] for r in mine),
                "ideal_points_per_s": mine[0]["ideal_points_per_s"],
                "efficiency": statistics.median(
                    r["points_per_s"] / r["ideal_points_per_s"] for r in mine
                ),
                "startup_s": statistics.median(r["startup_s"] for r in mine),
            }
    chunks = record["interleaved"]

    def median(value) -> float | None:
        return statistics.median(value(r) for r in chunks) if chunks else None

    return {
        "interleaved_ratio": _spread(chunks),
        "fixed_s": median(lambda r: r["fixed"]),
        **{part: median(lambda r, part=part: r[part]) for part in FIXED_PARTS},
        "extra_per_point_s": median(lambda r: (r["dask"] - r["here"]) / r["points"]),
        "empty_point": {
            part: median(lambda r, part=part: r["empty_point"][part])
            for part in ("wall_s", "client_cpu_s", "worker_cpu_s")
        },
        "points_only_ratio": _spread([{"ratio": r["dask"] / r["here"]} for r in chunks]),
        "timed_ratio": _spread([{"ratio": r["timed_ratio"]} for r in chunks]),
        "end_to_end_ratio": _spread(record["end_to_end"]),
        "throughput": sizes,
    }


def _attribution(result: dict) -> list[str]:
    """Where the dask path's extra time goes (medians over rounds)."""
    empty = result["empty_point"]
    cpu = empty["client_cpu_s"] + empty["worker_cpu_s"]
    return [
        "Where it goes (medians over rounds): the fixed cost is the cluster's start "
        f"({result['start_s']:.1f} s: the scheduler, and the worker's process, which imports "
        f"torch and the package) and its shut-down ({result['close_s']:.1f} s). The "
        f"points take {1e3 * result['extra_per_point_s']:.1f} ms more each on the worker; "
        f"dask's own work on an empty point (its row returned at once) through the same "
        f"runner on the same worker takes {1e3 * empty['wall_s']:.1f} ms of wall time and "
        f"{1e3 * cpu:.1f} ms of CPU time ({1e3 * empty['client_cpu_s']:.1f} in this process: "
        f"client, scheduler and nanny; {1e3 * empty['worker_cpu_s']:.1f} in the worker). "
        "On a CPU host a point's torch threads own every core, so that CPU time is taken "
        "from the points whether a point waits on the worker or not.",
        "",
    ]


def _verdict(ratio: float, points: float) -> str:
    """The dask path against :data:`GOAL_RATIO`, and whether the points alone meet it."""
    if ratio <= GOAL_RATIO:
        return f"Goal (<= {GOAL_RATIO:.2f}): **met** ({ratio:.3f})."
    alone = "meet it" if points <= GOAL_RATIO else f"miss it too ({points:.3f})"
    return (
        f"Goal (<= {GOAL_RATIO:.2f}): **missed** ({ratio:.3f}); the points alone {alone}. "
        "Where the difference goes:"
    )


def write(out: Path, record: dict) -> None:
    from riemann_core.measure.output import pyplot, save_figure, write_atomic

    result = record["summary"]
    env = record["environment"]
    lines = [
        "# Dispatching sweeps to dask.distributed",
        "",
        f"Produced by `{record['command']}` on {env['device_name']} ({env['threads']} torch "
        f"threads, torch {env['torch']}, commit {env['commit']}); every timing is in "
        "`cluster.json`. The goal: the "
        f"dask path at most {GOAL_RATIO - 1:.0%} slower than the in-process loop with one "
        "local worker.",
        "",
    ]
    if result["interleaved_ratio"]:
        ratio, points = result["interleaved_ratio"], result["points_only_ratio"]
        timed = result["timed_ratio"]
        chunks = record["interleaved"]
        made = "; ".join(f"`{c}`" for c in record.get("results_commands") or [])
        listed = "; the points are listed in `cluster.json`" if "results_points" in record else ""
        source = record["results"] and (
            f"the sweep in `{record['results']}` (grown ones included"
            f"{', made by ' + made if made else ''}{listed})"
        )
        lines += [
            "## Overhead",
            "",
            f"The {chunks[0]['points']} points of {source or 'the quick grid'} measured in one "
            "process and on one "
            f"worker of the local cluster in turn, {chunks[0]['chunk']} at a time, the order "
            f"alternating, in {len(chunks)} rounds, each in a fresh process with a fresh "
            "cluster (a process that measured the points before runs them faster, its "
            "caches warm); the dask side includes the cluster's "
            f"start-up and shut-down ({result['fixed_s']:.1f} s, median). Dask path over "
            f"in-process loop: **{ratio['median']:.3f}** (median; {ratio['min']:.3f} to "
            f"{ratio['max']:.3f} over rounds); the points alone: {points['median']:.3f} "
            f"({points['min']:.3f} to {points['max']:.3f}). The points' own timed medians "
            "on the worker over those in this process (the median over points): "
            f"{timed['median']:.3f} ({timed['min']:.3f} to {timed['max']:.3f} over rounds).",
            "",
            _verdict(ratio["median"], points["median"]),
            "",
            *_attribution(result),
        ]
    if result["end_to_end_ratio"]:
        ratio = result["end_to_end_ratio"]
        lines += [
            f"End to end (`riemann-bench sweep --quick --time-budget {NO_GROWTH:g}`: the quick "
            "grid without growth, the same points both ways; each a fresh process, "
            f"{len(record['end_to_end'])} rounds in turn): **{ratio['median']:.3f}** "
            f"({ratio['min']:.3f} to {ratio['max']:.3f}); each sweep takes minutes, so this "
            "ratio also carries the machine's drift between them.",
            "",
        ]
    rows = [
        f"| {w} | {v['points_per_s']:.2f} | {v['ideal_points_per_s']:.2f} | "
        f"{v['efficiency']:.3f} | {v['startup_s']:.1f} |"
        for w, v in result["throughput"].items()
    ]
    points = record["throughput"][0]["points"] if record["throughput"] else 0
    lines += [
        "## Throughput of a simulated cluster",
        "",
        f"The quick grid's {points} runs, each a {record['point_seconds']:g} s sleep, through "
        "the sweep's loop on workers with one fake device each, one point queued behind "
        "the running one as on GPUs (medians over "
        f"{len({r['round'] for r in record['throughput']})} rounds; start-up apart):",
        "",
        "| workers | points/s | ideal | efficiency | start-up [s] |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "![throughput](throughput.png)",
        "",
    ]
    write_atomic(out / "cluster.md", "\n".join(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    # cluster sizes as numbers: read back from cluster.json (--report-only) the summary's
    # keys are text, which matplotlib draws as categories at 0, 1, 2 beside the rounds'
    # dots at 1, 2, 4 (found by redrawing the committed report)
    sizes = [int(w) for w in result["throughput"]]
    ideal = [v["ideal_points_per_s"] for v in result["throughput"].values()]
    ax.plot(sizes, ideal, "--", color="0.5", label="ideal: workers / duration")
    ax.plot(
        [r["workers"] for r in record["throughput"]],
        [r["points_per_s"] for r in record["throughput"]],
        "o",
        color="C0",
        alpha=0.5,
        label="measured, one dot per round",
    )
    measured = [v["points_per_s"] for v in result["throughput"].values()]
    ax.plot(sizes, measured, "-", color="C0", label="median")
    ax.set(xlabel="workers (one fake device each)", ylabel="points per second", xticks=sizes)
    ax.legend(fontsize=7)
    ax.grid(True, lw=0.3)
    save_figure(fig, out / "throughput.png")


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # the in-process side under the workers' allocator policy
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the interleaved and throughput runs"
    )
    parser.add_argument(
        "--chunk", type=int, default=10, help="points at a time in the interleaved run"
    )
    parser.add_argument(
        "--end-to-end-rounds", type=int, default=2, help="rounds of whole sweeps (0: none)"
    )
    parser.add_argument(
        "--point-seconds", type=float, default=0.2, help="duration of a simulated point"
    )
    parser.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        help="interleave every point of the sweep in DIR (its results.csv) instead of the "
        "quick grid's, e.g. a run --quick's, grown points included",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write cluster.md and throughput.png again from --out's cluster.json, measuring "
        "nothing",
    )
    parser.add_argument("--one-round", type=int, help=argparse.SUPPRESS)  # see interleaved
    args = parser.parse_args(argv)
    if args.report_only:
        recorded = args.out / "cluster.json"
        try:
            record = json.loads(recorded.read_text())
            write(args.out, record)
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.error(
                f"cannot report {recorded}: {err!r}; measure it first "
                f"(python -m bench.cluster --out {args.out})"
            )
        return 0
    if args.one_round is not None:
        print(json.dumps(one_round(args.one_round, args.chunk, args.results)))
        return 0
    swept = {}
    if args.results is not None:  # before any work (found by review: a bare traceback)
        try:
            swept = sweep_of(args.results)
        except ValueError as err:
            parser.error(f"--results: {err}")
    from riemann_core.measure.environment import environment
    from riemann_core.measure.output import write_atomic

    record = {
        "command": " ".join(["python -m bench.cluster", *(sys.argv[1:] if argv is None else argv)]),
        "environment": environment("cpu"),
        "point_seconds": args.point_seconds,
        "results": None if args.results is None else str(args.results),
        # what made the points of --results and which they are, kept here: that directory
        # is not part of the report (found by an audit: the committed report named a
        # sweep in /tmp, gone with its points)
        **swept,
        "interleaved": interleaved(args.rounds, args.chunk, args.results),
        "end_to_end": end_to_end(args.end_to_end_rounds, []),
        "throughput": throughput(args.rounds, args.point_seconds),
    }
    record["summary"] = summary(record)
    write_atomic(args.out / "cluster.json", json.dumps(record, indent=2) + "\n")
    write(args.out, record)
    print(json.dumps(record["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
