"""Run a function on ``P`` processes joined by a gloo process group: a file rendezvous in
a temporary directory (no network beyond loopback) and a deadline on joining them.

The processes fork from a server that has imported torch, its compiler stack (which
``riemann_core`` enters on its first call) and the package once, so a rank starts in
a fraction of a second instead of the seconds of those imports.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world: int, tmp: Path, *args, deadline: float = 120.0) -> list:
    """``[fn(rank, world, *args) for every rank]``, each run in its own process with
    ``torch.distributed`` initialised (gloo, one thread). ``fn`` must be importable by
    name and return something ``torch.save`` can write. Fails the calling test, naming
    the rank, when a rank raises, crashes or is still running at ``deadline`` seconds."""
    context = _context()
    rendezvous = tmp / "rendezvous"
    processes = [
        context.Process(target=_main, args=(fn, rank, world, str(rendezvous), str(tmp), args))
        for rank in range(world)
    ]
    for p in processes:
        p.start()
    end = time.monotonic() + deadline
    for p in processes:
        p.join(max(0.0, end - time.monotonic()))
    late = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for rank in late:
        processes[rank].kill()
        processes[rank].join()
    assert not late, f"ranks {late} of {world} were still running after {deadline:g} s"
    results = []
    for rank, p in enumerate(processes):
        path = tmp / f"rank{rank}.pt"
        assert path.is_file(), (
            f"rank {rank} of {world} ended (exit code {p.exitcode}) without a result"
        )
        result = torch.load(path, weights_only=False)
        assert not isinstance(result, _Failure), f"rank {rank} of {world} raised:\n{result.text}"
        results.append(result)
    return results


#: imported once by the server the ranks fork from
PRELOAD = ["torch", "torch._dynamo", "torch.func", "riemann_core", "riemann_core.measure.phases"]


def _context():
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


class _Failure:
    def __init__(self, text: str):
        self.text = text


def _main(fn, rank, world, rendezvous, out, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = fn(rank, world, *args)
    except BaseException:
        result = _Failure(traceback.format_exc())
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()
