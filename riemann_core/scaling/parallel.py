"""``riemann-bench distributed``: data-parallel directions measured over the world size.

For each world size ``P`` of ``--ranks``, ``P`` processes (torch.multiprocessing, a gloo
process group on loopback, or NCCL with one GPU per rank under ``--device cuda``) each
take ``1/P`` of one global batch and compute ``rc.direction(..., process_group=...)``
for every method. Each rank stands for one device: it gets ``--threads`` threads, so
``P`` ranks need ``P x threads`` cores to run side by side. Per method and rank the run
records, with :class:`riemann_core.measure.phases.PhaseRecorder`:

* the end-to-end time of a direction (every rank starts each repeat at a barrier);
* the seconds of its phases: ``local`` (forward and pullback on the shard), ``agree``
  (waiting for every rank to finish its local work), ``exchange`` and ``broadcast``
  (packing, the collectives, unpacking; the broadcast waits for the slowest owner),
  ``solve`` (the rank's own blocks);
* FLOPs counted per phase in one more call, beside the cost model's
  (:func:`riemann_core.costs.distributed_flops`);
* bytes through the collectives, beside :func:`riemann_core.costs.communication_bytes`;
* the GEMM rate each rank reaches while every rank runs one: below the rate of one rank
  alone, the ranks do not have their cores to themselves;
* before each timed direction, the rate of one such GEMM on every rank at once: read at
  the moments the directions are timed, it tells load from outside during the timing
  (other work that starts once the run is under way slows the timed directions and this
  reading alike, and no reading taken before or after them; at one rank, beside the
  tiny network's too; under ``--device cuda`` it reads the GPU, not load on the host);
* on one rank, the solve phase of the same depth of layers on a tiny network and batch
  (:data:`SMALL`): its time is the overhead of the time model.

``results.csv`` holds one row per world size, method and rank and ``run.json`` the
environment; :mod:`riemann_core.scaling.parallel_report` judges the claims
(``claims.json``) and writes ``report.md`` with its figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

import riemann_core as rc

from .. import costs, distributed
from ..arguments import (
    MAX_REPEATS,
    Command,
    check_at_most,
    check_choices,
    check_distinct,
    check_report_only,
    default_out,
    ints,
    names,
    positive_int,
    positive_seconds,
)
from ..measure.environment import environment
from ..measure.output import (
    check_not_foreign,
    results_directory,
    set_aside,
    write_atomic,
    write_json,
)
from ..measure.phases import PhaseRecorder
from ..measure.problems import mlp
from ..measure.timing import device_rates
from ..methods._solve import recording_slow_paths

METHODS = ("layerwise", "natural", "kfac")
#: the network: five blocks, four of equal cost, so that P = 2 and 4 can split them
DEFAULT = {"widths": (512, 512, 512, 512, 512, 10), "batch": 128, "repeats": 7}
QUICK = {"widths": (128, 256, 256, 256, 256, 10), "batch": 64, "repeats": 5}
DAMPING = 1e-3
#: size of the GEMM whose rate tells whether the ranks have their cores to themselves
GEMM_SIZE = {"cpu": 1024, "cuda": 8192}
#: hidden width and batch of the network whose solve time is the overhead of the time model
SMALL = {"width": 4, "batch": 2}
#: columns of ``results.csv``
COLUMNS = (
    "ranks", "rank", "method", "threads", "batch", "gemm_concurrent_flops_per_s",
    "gemm_timed_flops_per_s", "owned_blocks",
    "step_median_s", "step_iqr_s", "local_s", "agree_s", "exchange_s", "solve_s", "broadcast_s",
    "step_times_s", "solve_times_s", "solve_small_s", "flops_solve_small",
    "flops_local", "flops_solve", "flops_local_model", "flops_solve_model",
    "bytes_sent", "bytes_received", "bytes_sent_model", "bytes_received_model", "slow_paths",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    """What every rank measures."""

    widths: tuple[int, ...]
    batch: int
    methods: tuple[str, ...]
    repeats: int
    threads: int
    device: str
    dtype: str
    seed: int
    timeout: float

    @property
    def shape(self) -> costs.MLPShape:
        # cross-entropy's exact Fisher: C - 1 rows per sample
        return costs.MLPShape(self.widths, self.batch, rows=costs.minimal_rows(self.widths[-1]))


# -------------------------------------------------------------------- on every rank


def _rank_main(config: Config, rank: int, world: int, rendezvous: str, out) -> None:
    """One rank: join the group, measure every method, send the rows to the parent."""
    try:
        rows = _measure_rank(config, rank, world, rendezvous, out)
        out.put(("rows", rows))
    except BaseException:
        out.put(("error", f"rank {rank} of {world}:\n{traceback.format_exc()}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _measure_rank(config: Config, rank: int, world: int, rendezvous: str, out) -> list[dict]:
    import torch.distributed as dist

    torch.set_num_threads(config.threads)
    cuda = config.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=config.timeout),
    )
    dtype = getattr(torch, config.dtype)
    torch.manual_seed(config.seed)
    model = mlp(config.widths).to(device, dtype)
    x = torch.randn(config.batch, config.widths[0], device=device, dtype=dtype)
    y = torch.randint(0, config.widths[-1], (config.batch,), device=device)
    dist.barrier()  # every rank at once: the rate a rank gets while the others compute too
    concurrent = gemm_rate(device, dtype)
    n = GEMM_SIZE[device.type]
    # random operands, as the reading at the start (a GPU runs constant data at higher
    # clocks, which would read a drop as smaller: found by review)
    operands = torch.randn(2, n, n, device=device, dtype=dtype)
    gemm = functools.partial(one_gemm_rate, *operands)
    shard = slice(rank * config.batch // world, (rank + 1) * config.batch // world)
    x, y = x[shard], y[shard]
    tiny_widths = (SMALL["width"],) * (len(config.widths) - 1) + (config.widths[-1],)
    tiny_model = mlp(tiny_widths).to(device, dtype)
    tiny = (
        torch.randn(SMALL["batch"], tiny_widths[0], device=device, dtype=dtype),
        torch.arange(SMALL["batch"], device=device) % config.widths[-1],
    )
    shape = config.shape
    itemsize = torch.finfo(dtype).bits // 8
    rows = []
    for method in config.methods:

        def call(x=x, y=y, method=method, model=model):
            return rc.direction(
                model, x, y, method=method, damping=DAMPING, process_group=dist.group.WORLD,
                timeout=config.timeout,
            )  # fmt: skip

        times, phase, flops, traffic, slow, gemm_rates = _timed(call, config.repeats, device, gemm)
        small = (float("nan"), float("nan"))
        timed_rate = statistics.median(gemm_rates)
        if world == 1:  # the overhead of the solve: as many blocks, almost no work
            _, small_phase, small_flops, *_, small_rates = _timed(
                functools.partial(call, *tiny, model=tiny_model), config.repeats, device, gemm
            )
            small = (statistics.median(small_phase["solve"]), small_flops.get("solve", 0))
            # its times give the time model's t0: read beside them too (found by review:
            # two processes busy only while they were timed read its solve 14.8 ms against
            # 1.6, t0 9x, "regime not reached" on overhead, no reading flagged it)
            timed_rate = min(timed_rate, statistics.median(small_rates))
        model_flops = costs.distributed_flops(method, shape, world, config.device, dtype)[rank]
        model_bytes = costs.communication_bytes(method, shape, world, itemsize)[rank]
        quartiles = (
            statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [0, 0, 0]
        )
        rows.append(
            {
                "ranks": world,
                "rank": rank,
                "method": method,
                "threads": config.threads,
                "batch": config.batch,
                "gemm_concurrent_flops_per_s": concurrent,
                "gemm_timed_flops_per_s": timed_rate,
                "owned_blocks": sum(o == rank for o in traffic.owners),
                "step_median_s": statistics.median(times),
                "step_iqr_s": quartiles[2] - quartiles[0],
                **{f"{p}_s": statistics.median(v) for p, v in phase.items()},
                "step_times_s": json.dumps(times),
                "solve_times_s": json.dumps(phase["solve"]),
                "solve_small_s": small[0],
                "flops_solve_small": small[1],
                "flops_local": flops.get("local", 0),
                "flops_solve": flops.get("solve", 0),
                "flops_local_model": model_flops["local"],
                "flops_solve_model": model_flops["solve"],
                "bytes_sent": sum(traffic.sent.values()),
                "bytes_received": sum(traffic.received.values()),
                "bytes_sent_model": model_bytes["sent"],
                "bytes_received_model": model_bytes["received"],
                "slow_paths": " ".join(slow),
            }
        )
        if rank == 0:
            out.put(("progress", method))
    return rows


def gemm_rate(device, dtype: torch.dtype) -> float:
    """The median GEMM rate (FLOP/s) at :data:`GEMM_SIZE` on ``device``."""
    n = GEMM_SIZE[torch.device(device).type]
    return statistics.median(device_rates(device, dtype, n=n)["products"])


def one_gemm_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """The rate (FLOP/s) of one GEMM ``a @ b`` of square operands: short enough to read
    beside every timed direction."""
    synchronize = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    a @ b
    synchronize()
    return 2 * a.shape[0] ** 3 / (time.perf_counter() - start)


def _timed(call, repeats: int, device, gemm):
    """A warm-up call (the first for a model also probes the network), ``repeats`` timed
    calls started together at a barrier, each after a ``gemm()`` rate read on every rank
    at once, one FLOP-counted call: the end-to-end times, each phase's times, the counted
    FLOPs by phase, the bytes, the slow paths the counted call took (their work is not the
    cost model's) and the GEMM rates."""
    import torch.distributed as dist

    call()
    timed, times, rates = PhaseRecorder(device), [], []
    with distributed.observing(timed):
        for _ in range(repeats):
            dist.barrier()
            rates.append(gemm())
            dist.barrier()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    counted = PhaseRecorder(device, count_flops=True)
    with distributed.observing(counted), recording_slow_paths() as slow:
        call()
    (step,) = counted.steps
    phase = {p: [s.seconds.get(p, 0.0) for s in timed.steps] for p in distributed.PHASES}
    return times, phase, step.flops, step.traffic, slow, rates


# ------------------------------------------------------------------------ the parent


def _context():
    import torch.multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "riemann_core"])
    return context


def run_world(config: Config, world: int, progress=None) -> list[dict]:
    """The rows of every rank of one world size; a rank that fails ends the run with
    its traceback."""
    context = _context()
    messages = context.Queue()
    with tempfile.TemporaryDirectory(prefix="riemann-bench-") as tmp:
        rendezvous = str(Path(tmp) / "rendezvous")
        processes = [
            context.Process(target=_rank_main, args=(config, rank, world, rendezvous, messages))
            for rank in range(world)
        ]
        for p in processes:
            p.start()
        rows, finished = [], 0
        try:
            while finished < world:
                try:
                    kind, payload = messages.get(timeout=1.0)
                except queue.Empty:
                    dead = [(r, p.exitcode) for r, p in enumerate(processes) if p.exitcode]
                    if dead:
                        raise RuntimeError(
                            f"ranks {dead} (rank, exit code) of {world} died"
                        ) from None
                    continue
                if kind == "error":
                    raise RuntimeError(payload)
                if kind == "progress" and progress is not None:
                    progress(world, payload)
                if kind == "rows":
                    rows += payload
                    finished += 1
        except KeyboardInterrupt:  # Ctrl-C, or a SIGTERM sent to this process alone (kill,
            # timeout): its ranks, which may have had none, stop now, not at the joins
            for p in processes:
                if p.is_alive():
                    p.terminate()
            raise
        finally:
            for p in processes:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return sorted(rows, key=lambda r: (r["method"], r["rank"]))


def measure(config: Config, ranks: tuple[int, ...], progress=None) -> tuple[list[dict], dict]:
    """Every world size's rows, and the GEMM rates of ``threads`` threads measured
    before, between and after them (their spread tells a loaded machine: the world sizes
    run one after another, and load between two of them would read as their speedup;
    found by a hunt, a fail on a busy machine whose rates before and after agreed)."""
    torch.set_num_threads(config.threads)
    dtype = getattr(torch, config.dtype)
    rates = [gemm_rate(config.device, dtype)]
    rows = []
    for world in ranks:
        rows += run_world(config, world, progress)
        rates.append(gemm_rate(config.device, dtype))
    return rows, {"gemm_flops_per_s": rates}


def write_results(rows: list[dict], out: Path) -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return write_atomic(out / "results.csv", frame.to_csv(index=False))


# ------------------------------------------------------------------------ the command


def cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("world sizes and problem")
    group.add_argument("--ranks", type=ints, metavar="P,..",
                       help="world sizes, one run each (default: 1,2,4)")  # fmt: skip
    group.add_argument("--methods", type=names, metavar="M,..",
                       help=f"methods (default: {','.join(METHODS)})")  # fmt: skip
    group.add_argument("--widths", type=ints, metavar="W,..",
                       help="the MLP's layer widths (default: 512,512,512,512,512,10; "
                       "quick: 128,256,256,256,256,10)")  # fmt: skip
    group.add_argument("--batch", type=positive_int, help="global batch (default: 128; quick: 64)")
    group.add_argument("--repeats", type=positive_int,
                       help=f"timed directions per method (default: 7; quick: 5; at most "
                       f"{MAX_REPEATS})")  # fmt: skip
    group.add_argument("--threads", type=positive_int,
                       help="threads per rank (default: CPU cores // largest P, at least 1)")  # fmt: skip
    group.add_argument("--dtype", choices=("float32", "float64"),
                       help="the parameters' and data's dtype (default: float32)")  # fmt: skip
    group.add_argument("--timeout", type=positive_seconds,
                       help="seconds a rank waits in a collective (default: 600)")  # fmt: skip
    group.add_argument("--report-only", action="store_true",
                       help="judge the claims and redraw report.md and the figure from the "
                       "results in --out, measuring nothing")  # fmt: skip


#: The defaults of the options --report-only refuses (given, they would be ignored): set
#: here, not as argparse defaults, so that an option given is told from one left out
#: (found by a hunt: ``--report-only --methods kfac --ranks 1,2`` redrew every method and
#: world size of the recorded run, silently, where ``--batch`` was refused).
RUN_DEFAULTS = {"ranks": (1, 2, 4), "methods": METHODS, "dtype": "float32", "timeout": 600.0}


def _option(args: argparse.Namespace, name: str):
    value = getattr(args, name, None)
    return RUN_DEFAULTS[name] if value is None else value


def config_from(args: argparse.Namespace) -> Config:
    """The configuration the options describe; bad options raise ``ValueError``."""
    base = QUICK if args.quick else DEFAULT
    methods = tuple(_option(args, "methods"))
    check_choices("method", methods, rc.METHODS)
    widths = tuple(args.widths or base["widths"])
    batch = args.batch or base["batch"]
    ranks = tuple(_option(args, "ranks"))
    if not ranks or min(ranks) < 1:
        raise ValueError(f"--ranks must be positive world sizes, got {ranks}")
    check_distinct("--ranks", ranks)
    if 1 not in ranks:  # (found by review: without it, the report crashed after measuring)
        raise ValueError(
            f"--ranks must include 1, the run every speedup and claim compares with, got "
            f"{','.join(map(str, ranks))}; pass e.g. --ranks 1,{','.join(map(str, ranks))}"
        )
    if any(batch % p for p in ranks):
        raise ValueError(
            f"--batch {batch} must split evenly over every world size in --ranks {ranks} "
            "(the cost model assumes equal shards)"
        )
    if batch < 2 * max(ranks):  # (found by a hunt: a claim on FLOPs failed by 72%)
        raise ValueError(
            f"--batch {batch} leaves a rank of --ranks {max(ranks)} fewer than 2 samples: on "
            "one sample a rank cannot tell whether the network couples the samples, and "
            "probes it at every call, work the cost model leaves out; pass --batch "
            f"{2 * max(ranks)} or more"
        )
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"--widths needs at least two positive widths, got {widths}")
    device = torch.device(args.device).type
    if device == "cuda" and max(ranks) > torch.cuda.device_count():
        raise ValueError(
            f"--device cuda runs one rank per GPU: {max(ranks)} ranks need as many GPUs, "
            f"{torch.cuda.device_count()} are visible"
        )
    if args.threads is not None and args.threads > cores():  # (found by a hunt: 10**20
        # started the ranks, then broke off with "Overflow when unpacking long long")
        raise ValueError(
            f"--threads {args.threads} is more than this host's {cores()} CPU cores: a rank "
            f"runs at most one thread per core; pass --threads {cores()} or fewer"
        )
    threads = args.threads or max(1, cores() // max(ranks))
    if args.repeats is not None:
        check_at_most(
            "--repeats", args.repeats, MAX_REPEATS, "the most timed directions a run takes"
        )
    config = Config(
        widths=widths,
        batch=batch,
        methods=methods,
        repeats=args.repeats or base["repeats"],
        threads=threads,
        device=device,
        dtype=_option(args, "dtype"),
        seed=args.seed,
        timeout=_option(args, "timeout"),
    )
    check_memory(config, memory_bytes(device, max(ranks)))
    return config


def memory_bytes(device: str, world: int) -> int | None:
    """The memory one rank's solve may take at most: the host's physical memory (every
    rank shares it) or the smallest of the ``world`` GPUs (one per rank); ``None`` where
    the system does not say (no ``sysconf``: Windows)."""
    if device == "cuda":
        return min(torch.cuda.get_device_properties(i).total_memory for i in range(world))
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(config: Config, available: int | None) -> None:
    """Refuse a method whose modelled peak (:func:`riemann_core.costs.peak_bytes`, by which
    ``riemann-bench run`` skips the points over its memory budget) exceeds ``available``
    bytes, before any process starts: else its solve dies in the allocator after the
    other methods' work (``full`` holds the ``n x n`` metric of the ``n`` parameters).
    Nothing is checked where ``available`` is unknown."""
    if available is None:
        return
    itemsize = torch.finfo(getattr(torch, config.dtype)).bits // 8
    shape = config.shape
    for method in config.methods:
        need = costs.peak_bytes(method, shape, itemsize=itemsize, device=config.device)
        if need > available:
            raise ValueError(
                f"method {method} needs about {need / 2**30:.1f} GiB ({config.dtype}) on the "
                f"network of widths {','.join(map(str, config.widths))} ({shape.n_params:,} "
                f"parameters) and batch {config.batch}, more than the {available / 2**30:.1f} "
                f"GiB of {'GPU' if config.device == 'cuda' else 'host'} memory; drop {method} "
                "from --methods or pass smaller --widths"
            )


#: what a run writes to its --out
RUN_FILES = ("results.csv", "run.json", "claims.json", "report.md", "scaling.png")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import parallel_report

    if args.report_only:  # (found by a review: a committed report judged by older code
        # could not be redrawn by any command)
        check_report_only(args, "run", ("ranks", "methods", "widths", "batch", "repeats",
                                        "threads", "dtype", "timeout"), "distributed")  # fmt: skip
        out = default_out(args, "distributed")
        claims = parallel_report.write(out)
        print(f"{out / 'report.md'}: verdicts {parallel_report.tally(claims)}")
        return parallel_report.exit_code(claims)
    config = config_from(args)
    out = default_out(args, "distributed")
    check_not_foreign(out, "run.json")
    ranks = tuple(_option(args, "ranks"))
    total = len(ranks) * len(config.methods)
    env = environment(args.device)  # now: the code that runs, whatever the tree does later
    # an unusable --out fails now, not after the measuring (removed again if nothing is written)
    with results_directory(out):
        with tqdm(total=total, desc="distributed", unit="method", file=sys.stderr) as bar:

            def progress(world, method):
                bar.set_postfix_str(f"P={world} {method}")
                bar.update(1)

            rows, rates = measure(config, ranks, progress)
        # a run again into its --out starts afresh: the earlier one kept whole, apart
        earlier = set_aside(out, RUN_FILES)
        if earlier is not None:
            print(f"the earlier run in {out} moved to {earlier}", file=sys.stderr)
        write_results(rows, out)
    meta = {
        "config": asdict(config),
        "ranks": list(ranks),
        "cores": cores(),
        **rates,
        "environment": env,
        "command": args.command_line,
    }
    write_json(out, "run.json", meta)
    claims = parallel_report.write(out)
    print(f"{out / 'report.md'}: {len(rows)} rows; verdicts {parallel_report.tally(claims)}")
    return parallel_report.exit_code(claims)


HELP = "data-parallel directions over world sizes: time, bytes, FLOPs per rank"
DESCRIPTION = (
    "Spawns P processes for each world size P of --ranks (a gloo process group on "
    "loopback; NCCL with one GPU per rank under --device cuda), each holding 1/P of one "
    "global batch, and measures rc.direction(..., process_group=...) for every method: "
    "end-to-end time, the time of each phase (local work, collectives, the rank's own "
    "solves), counted FLOPs and bytes per rank beside the cost model, and the speedup "
    "over P = 1 (--ranks includes 1). Writes results.csv, run.json, claims.json, report.md "
    "and figures to --out (default reports/<device>/distributed, with --quick "
    "reports/<device>/quick/distributed; an earlier run there is moved into "
    "earlier-<UTC time>/ first); exits 1 when a claim fails."
)
EXAMPLE = "distributed --ranks 1,2,4 --quick"
COMMAND = Command("distributed", run, HELP, DESCRIPTION, EXAMPLE, add_arguments)
