"""``method='full'``'s metric both ways on one device: ``K^T K`` in one product against the
blocks from the samples' Grams (``riemann_core.methods.full.metric(..., by_blocks=...)``),
medians of interleaved rounds with the device synchronised around each call, and which
form ``costs.metric_by_blocks`` picks. The data behind its per-device constants
(``tests/data/full_metric_h100.csv``, read by ``tests/test_costs.py``).

    python bench/full_metric_forms.py --device cuda --csv tests/data/full_metric_h100.csv
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

import riemann_core as rc
from riemann_core.measure.environment import environment, summary
from riemann_core.measure.timing import synchronize
from riemann_core.methods import full

#: (widths, batch): MLPs of 2 to 40 layers, batch 8 to 8192; the second list on a GPU only
SHAPES = [
    ((4, 4, 3), 8), ((10, 8, 6, 5), 16), ((10, 8, 6, 5), 128), ((16,) * 12 + (10,), 32),
    ((8,) * 25 + (10,), 32), ((4,) * 40 + (3,), 16), ((8, 8, 8, 10), 4096),
    ((4, 4, 4, 3), 8192), ((16, 16, 10), 8192), ((64, 32, 3), 128), ((128, 64, 3), 64),
    ((32, 32, 100), 16), ((8, 64, 10), 256), ((784, 5, 10), 128), ((64, 56, 10), 128),
    ((64, 48, 16, 10), 128), ((64, 48, 16, 10), 8), ((32, 32, 32, 10), 64),
    ((64, 64, 10), 32), ((128, 128, 3), 32), ((256, 32, 3), 256),
]  # fmt: skip
GPU_SHAPES = [
    ((784, 5, 10), 1024), ((64, 56, 10), 2048), ((128, 64, 10), 512), ((256, 32, 10), 1024),
    ((784, 16, 10), 512), ((64,) * 4 + (10,), 256), ((32,) * 8 + (10,), 1024),
    ((512, 24, 10), 2048), ((100, 100, 10), 256),
]  # fmt: skip


def handlers(widths, batch, device, samples=None):
    """The blocks' handlers of a tanh MLP's ``full`` direction (its solve intercepted)."""
    torch.manual_seed(0)
    layers = [m for a, b in zip(widths[:-1], widths[1:]) for m in (nn.Linear(a, b), nn.Tanh())]
    model = nn.Sequential(*layers[:-1]).to(device)
    x = torch.randn(batch, widths[0], device=device)
    y = torch.randint(0, widths[-1], (batch,), device=device)
    seen, solve = [], full.solve
    full.solve = lambda problem, opts: seen.append(problem.handlers) or solve(problem, opts)
    kw = {} if samples is None else dict(output_metric="sampled", samples=samples)
    try:
        rc.direction(model, x, y, method="full", damping=1e-2, **kw)
    finally:
        full.solve = solve
    return seen[0]


def forms_seconds(hs, device, rounds):
    """Median seconds of ``K^T K`` and of the blocks, interleaved, after one untimed round
    (not named ``time_*``: asv, whose benchmark_dir is bench/, would take it for a
    benchmark, and ``asv check`` fail on its arguments)."""
    times = {False: [], True: []}
    for i in range(rounds + 1):
        for by_blocks in times:
            synchronize(device)
            start = time.perf_counter()
            G = full.metric(hs, by_blocks=by_blocks)
            synchronize(device)
            if i:
                times[by_blocks].append(time.perf_counter() - start)
            del G
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--csv", help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = [(w, N, None) for w, N in SHAPES + (GPU_SHAPES if device.type == "cuda" else [])]
    cases.append(((64, 48, 16, 10), 128, 4))  # the sampled Fisher, 4 probes
    rows = []
    for widths, N, samples in cases:
        hs = handlers(widths, N, device, samples)
        name = "-".join(map(str, widths))
        if not all(h.samples_metric_with(g) for a, h in enumerate(hs) for g in hs[: a + 1]):
            print(f"{name} N={N}: a pair of blocks does not qualify")
            continue
        ktk, blocks = forms_seconds(hs, device, args.rounds)
        rows.append(f"{name},{N},{hs[0].r},{ktk * 1e3:.3f},{blocks * 1e3:.3f}")
        picks = "blocks" if full.blockwise(hs) else "K^T K"
        print(f"{name:22.22s} N={N:5d} r={hs[0].r:3d}  K^T K {ktk * 1e3:8.3f} ms  "
              f"blocks {blocks * 1e3:8.3f} ms  ({blocks / ktk:5.2f}x)  rule: {picks}", flush=True)  # fmt: skip
    if args.csv:
        with open(args.csv, "w") as f:
            f.write(f"# {summary(environment(device))}, float32; written by\n")
            f.write(
                f"# python bench/full_metric_forms.py --device {args.device} --csv {args.csv}\n"
            )
            f.write("widths,batch,rows,ktk_ms,blocks_ms\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
