"""What dispatching a sweep to dask.distributed costs, and how it scales.

    python -m bench.cluster --out reports/cpu/cluster

writes ``cluster.json`` (every timing, the environment, the command), ``cluster.md`` and
``throughput.png``:

* **overhead**: wall time of ``riemann-bench sweep --quick`` through the local cluster (one
  worker) over the same sweep in this process (``--workers 0``), each a fresh process from
  start to exit. The two run in turn, in alternating order, ``--rounds`` times; the ratio
  is taken within each round (minutes apart, not tens of minutes: the speed of a shared
  machine drifts) and reported as the median and range over the rounds.
* **throughput**: points per second of a simulated cluster of 1, 2 and 4 workers, each with
  one fake ``device`` resource, running points of a known duration (a sleep) through the
  sweep's own loop and runner; the ideal is ``workers / duration``. Cluster start-up
  (with the workers' first imports of torch and riemann_core) is timed apart.

Not an asv benchmark: asv imports this module (it lies in the benchmark directory), so
dask is imported only when it runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKERS = (1, 2, 4)


def sleepy(seconds: float, run: dict, grid) -> dict:
    """A point of known duration: the cost model's row after ``seconds`` of sleep."""
    from riemann_core.scaling import sweep as sw

    time.sleep(seconds)
    return sw.blank_row(run, grid)


def _warm_up() -> None:
    import riemann_core.scaling.sweep  # noqa: F401  (torch and the package)


def overhead(rounds: int, extra: list[str]) -> list[dict]:
    """Seconds of ``riemann-bench sweep --quick`` in this process and on one local worker."""
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(rounds):
            order = ("here", "dask") if r % 2 == 0 else ("dask", "here")
            seconds = {}
            for mode in order:
                out = Path(scratch) / f"{mode}-{r}"
                command = [sys.executable, "-m", "riemann_core.cli", "sweep", "--quick"]
                command += ["--out", str(out), *extra]
                command += ["--workers", "0"] if mode == "here" else []
                start = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                seconds[mode] = time.perf_counter() - start
            records.append({**seconds, "ratio": seconds["dask"] / seconds["here"]})
            print(f"round {r}: {records[-1]}", file=sys.stderr)
    return records


def throughput(rounds: int, seconds: float) -> list[dict]:
    """Points per second of the quick grid's runs, each a ``seconds`` sleep, through the
    sweep's loop on a simulated cluster of each size in :data:`WORKERS`."""
    from distributed import Client

    from riemann_core.scaling import dispatch
    from riemann_core.scaling import sweep as sw

    grid = sw.Grid(**sw.QUICK)
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
                    runner = dispatch.DaskRunner(client)
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
            print(f"throughput {records[-1]}", file=sys.stderr)
    return records


def summary(over: list[dict], through: list[dict]) -> dict:
    """Median and range of the overhead ratio; median efficiency per cluster size."""
    ratios = [r["ratio"] for r in over]
    sizes = {}
    for workers in WORKERS:
        mine = [r for r in through if r["workers"] == workers]
        if mine:
            sizes[workers] = {
                "points_per_s": statistics.median(r["points_per_s"] for r in mine),
                "ideal_points_per_s": mine[0]["ideal_points_per_s"],
                "efficiency": statistics.median(
                    r["points_per_s"] / r["ideal_points_per_s"] for r in mine
                ),
                "startup_s": statistics.median(r["startup_s"] for r in mine),
            }
    return {
        "overhead_ratio": statistics.median(ratios) if ratios else None,
        "overhead_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "throughput": sizes,
    }


def write(out: Path, record: dict) -> None:
    from riemann_core.measure.output import pyplot, save_figure, write_atomic

    result = record["summary"]
    lines = [
        "# Dispatching sweeps to dask.distributed",
        "",
        f"Produced by `{record['command']}` on {record['environment']['device_name']} "
        f"({record['environment']['threads']} torch threads, commit "
        f"{record['environment']['commit']}); every timing is in `cluster.json`.",
        "",
    ]
    if result["overhead_ratio"] is not None:
        low, high = result["overhead_ratio_range"]
        lines += [
            "## Overhead on the quick grid",
            "",
            "Wall time of `riemann-bench sweep --quick` on the local cluster (one worker) "
            "over the same sweep in one process (`--workers 0`), each a fresh process, in "
            f"{len(record['overhead'])} interleaved rounds: median ratio "
            f"**{result['overhead_ratio']:.3f}** (range {low:.3f} to {high:.3f} over rounds).",
            "",
        ]
    rows = [
        f"| {w} | {v['points_per_s']:.2f} | {v['ideal_points_per_s']:.2f} | "
        f"{v['efficiency']:.3f} | {v['startup_s']:.1f} |"
        for w, v in result["throughput"].items()
    ]
    lines += [
        "## Throughput of a simulated cluster",
        "",
        f"The quick grid's {record['through'][0]['points'] if record['through'] else 0} runs, "
        f"each a {record['point_seconds']:g} s sleep, through the sweep's loop on workers with "
        "one fake device each (medians over rounds; start-up apart):",
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
    sizes = list(result["throughput"])
    ax.plot(sizes, [result["throughput"][w]["ideal_points_per_s"] for w in sizes], "--",
            color="0.5", label="ideal: workers / duration")  # fmt: skip
    for r in record["through"]:
        ax.plot(r["workers"], r["points_per_s"], "o", color="C0", alpha=0.5)
    ax.plot(sizes, [result["throughput"][w]["points_per_s"] for w in sizes], "-", color="C0",
            label="measured (median; dots: rounds)")  # fmt: skip
    ax.set(xlabel="workers (one fake device each)", ylabel="points per second", xticks=sizes)
    ax.legend(fontsize=7)
    ax.grid(True, lw=0.3)
    save_figure(fig, out / "throughput.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--point-seconds", type=float, default=0.2, help="duration of a simulated point"
    )
    parser.add_argument("--skip-overhead", action="store_true", help="throughput only")
    parser.add_argument(
        "sweep_options",
        nargs="*",
        help="options for both overhead sweeps after --, e.g. -- --methods layerwise",
    )
    args = parser.parse_args(argv)
    from riemann_core.measure.environment import environment

    over = [] if args.skip_overhead else overhead(args.rounds, args.sweep_options)
    through = throughput(args.rounds, args.point_seconds)
    record = {
        "command": " ".join(["python -m bench.cluster", *(argv or sys.argv[1:])]),
        "environment": environment("cpu"),
        "point_seconds": args.point_seconds,
        "overhead": over,
        "through": through,
        "summary": summary(over, through),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(record, indent=2) + "\n")
    write(args.out, record)
    print(json.dumps(record["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
