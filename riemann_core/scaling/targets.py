"""The core's performance targets, measured as ratios within one run.

* exact-Fisher ``layerwise`` on an MLP 784-1024-1024-10, batch 128, against its
  phase-wise speed of light (``costs.speed_of_light_flops``: minimal products at the GEMM
  rate plus minimal Cholesky FLOPs at the Cholesky rate, both measured in every round);
* sampled-Fisher ``layerwise`` (1 probe) against one plain forward+backward;
* ``full`` against ``layerwise`` on networks of about 4k parameters.
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

import riemann_core as rc

from .. import costs
from ..arguments import Command
from ..measure.flops import flop_counter
from ..measure.problems import mlp
from ..measure.timing import interleaved, median_ratio
from . import kfac_targets

TARGETS = {"speed_of_light": 2.0, "sampled_vs_step": 2.5, "full_vs_layerwise": 50.0}
#: About 4k parameters each: a narrow hidden layer, one and two wider ones.
SMALL_NETWORKS = ((784, 5, 10), (64, 56, 10), (64, 48, 16, 10))


def measure_targets(
    *, device="cpu", dtype=torch.float32, quick=False, seed=0, progress=None
) -> dict:
    """Measure the targets; ``progress(label)`` is called before each measurement."""
    progress = progress or (lambda label: None)
    torch.manual_seed(seed)
    rounds = 5 if quick else 11
    widths, N = (784, 1024, 1024, 10), 128

    def data(w):
        x = torch.randn(N, w[0], device=device, dtype=dtype)
        return x, torch.randint(0, w[-1], (N,), device=device)

    model = mlp(widths).to(device, dtype)
    x, y = data(widths)
    n = 2048 if quick else 4096
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    spd = a @ a.T
    spd.diagonal().add_(n)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    progress("784-1024-1024-10")
    t = interleaved(
        {
            "gemm": lambda: a @ b,
            "cholesky": lambda: torch.linalg.cholesky(spd),
            "step": step,
            "exact": lambda: rc.direction(model, x, y, method="layerwise"),
            "sampled": lambda: rc.direction(
                model, x, y, method="layerwise", output_metric="sampled"
            ),
        },
        rounds,
        device,
    )
    rates = [
        {"products": 2 * n**3 / g, "cholesky": n**3 / 3 / c}
        for g, c in zip(t["gemm"], t["cholesky"], strict=True)
    ]
    shape = costs.MLPShape(widths, N, rows=costs.minimal_rows(widths[-1]))
    sol_flops = costs.speed_of_light_flops(
        costs.MLPShape(widths, N, rows=costs.minimal_rows(widths[-1]))
    )
    sol_s = [costs.speed_of_light_seconds(sol_flops, r) for r in rates]
    progress("FLOP count")
    with flop_counter() as counter:
        rc.direction(model, x, y, method="layerwise")
    result = {
        "gemm_flops_per_s": statistics.median(r["products"] for r in rates),
        "cholesky_flops_per_s": statistics.median(r["cholesky"] for r in rates),
        "network": list(widths),
        "batch": N,
        "dtype": str(dtype).removeprefix("torch."),
        "rounds": rounds,
        "step_s": statistics.median(t["step"]),
        "layerwise_exact_s": statistics.median(t["exact"]),
        "layerwise_sampled_s": statistics.median(t["sampled"]),
        "speed_of_light_s": statistics.median(sol_s),
        "speed_of_light_flops": sol_flops,
        "counted_flops": counter.get_total_flops(),
        "modelled_flops": costs.flops("layerwise", shape)["total"],
        "ratios": {
            "speed_of_light": median_ratio(t["exact"], sol_s),
            "sampled_vs_step": median_ratio(t["sampled"], t["step"]),
        },
        "small": [],
    }
    for w in SMALL_NETWORKS[:2] if quick else SMALL_NETWORKS:
        progress(f"full vs layerwise, {'-'.join(map(str, w))}")
        m = mlp(w).to(device, dtype)
        xs, _ = data(w)
        ts = interleaved(
            {
                "layerwise": lambda m=m, xs=xs: rc.direction(m, xs, y, method="layerwise"),
                "full": lambda m=m, xs=xs: rc.direction(m, xs, y, method="full"),
            },
            max(3, rounds // 2),
            device,
        )
        result["small"].append(
            {
                "network": list(w),
                "n_params": sum(p.numel() for p in m.parameters()),
                "layerwise_s": statistics.median(ts["layerwise"]),
                "full_s": statistics.median(ts["full"]),
                "ratio": median_ratio(ts["full"], ts["layerwise"]),
            }
        )
    return result


def format_targets(result: dict) -> str:
    r = result["ratios"]
    lines = [
        f"GEMM rate {result['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s, Cholesky rate "
        f"{result['cholesky_flops_per_s'] / 1e9:.1f} GFLOP/s ({result['dtype']}); "
        f"medians of {result['rounds']} interleaved rounds, ratios taken per round",
        f"MLP {'-'.join(map(str, result['network']))}, batch {result['batch']}, cross-entropy:",
        f"  forward+backward          {result['step_s'] * 1e3:9.2f} ms",
        f"  layerwise, exact Fisher   {result['layerwise_exact_s'] * 1e3:9.2f} ms   "
        f"speed of light {result['speed_of_light_s'] * 1e3:.2f} ms -> "
        f"{r['speed_of_light']:.2f}x (target <= {TARGETS['speed_of_light']}x)",
        f"  layerwise, sampled (1)    {result['layerwise_sampled_s'] * 1e3:9.2f} ms   "
        f"{r['sampled_vs_step']:.2f}x forward+backward (target <= {TARGETS['sampled_vs_step']}x)",
        f"  FLOPs: counted {result['counted_flops'] / 1e9:.3f} G, modelled "
        f"{result['modelled_flops'] / 1e9:.3f} G, minimal "
        f"{result['speed_of_light_flops']['products'] / 1e9:.3f} G of products + "
        f"{result['speed_of_light_flops']['cholesky'] / 1e9:.3f} G of Cholesky",
        "full vs layerwise at about 4k parameters (exact Fisher, batch "
        f"{result['batch']}; target >= {TARGETS['full_vs_layerwise']}x):",
    ]
    for s in result["small"]:
        lines.append(
            f"  {'-'.join(map(str, s['network'])):>14} ({s['n_params']} params): layerwise "
            f"{s['layerwise_s'] * 1e3:8.2f} ms, full {s['full_s'] * 1e3:8.2f} ms -> {s['ratio']:.1f}x"
        )
    return "\n".join(lines)


HELP = "measure the core's performance targets as ratios within one run"
DESCRIPTION = (
    "Time the exact-Fisher layerwise direction of an MLP 784-1024-1024-10 (batch 128, "
    "float32, cross-entropy) against its phase-wise speed of light (minimal products at the "
    "GEMM rate plus minimal Cholesky FLOPs at the Cholesky rate, measured in the same "
    "rounds), the sampled-Fisher direction (1 probe) against one "
    "forward+backward, and full against layerwise on networks of about 4k parameters. "
    "Then every K-FAC variant against the same variant of curvlinops (when installed: "
    'pip install "riemann-bench[compare]") on MLPs 784-1024-1024-10 and 64-512-512-10; '
    "exits 1 when one is slower. With --out, writes targets.json and kfac.md."
)
EXAMPLE = "targets --out reports/cpu/targets"


def run(args) -> int:
    if args.out is not None:  # fail on an unusable --out before the work, not after
        args.out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    from ..measure.environment import environment
    from ..measure.output import write_atomic, write_json

    steps = 2 + (2 if args.quick else len(SMALL_NETWORKS)) + len(kfac_targets.NETWORKS)
    with tqdm(total=steps, desc="targets", unit="step", leave=False, file=sys.stderr) as bar:

        def progress(label):
            bar.set_postfix_str(label)
            bar.update(1)

        options = dict(device=args.device, quick=args.quick, seed=args.seed, progress=progress)
        result = measure_targets(**options)
        kfac = kfac_targets.measure_kfac(**options)
    print(format_targets(result))
    print("\n" + kfac_targets.format_kfac(kfac))
    if args.out is not None:
        command = "riemann-bench targets" + (" --quick" if args.quick else "")
        payload = {"command": command, "environment": environment(args.device), **result}
        print(f"\nwrote {write_json(args.out, 'targets.json', {**payload, 'kfac': kfac})}")
        page = kfac_targets.markdown_kfac(kfac, command)
        print(f"wrote {write_atomic(args.out / 'kfac.md', page)}")
    missed = kfac_targets.missed(kfac)
    if missed:
        print(f"\nK-FAC slower than curvlinops: {'; '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


COMMAND = Command("targets", run, HELP, DESCRIPTION, EXAMPLE)
