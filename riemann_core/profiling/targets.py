"""The core's performance targets, measured as ratios within one run.

* exact-Fisher ``layerwise`` on an MLP 784-1024-1024-10, batch 128, against its speed
  of light (``costs.speed_of_light_flops`` / the GEMM rate measured here);
* sampled-Fisher ``layerwise`` (1 probe) against one plain forward+backward;
* ``full`` against ``layerwise`` on networks of about 4k parameters.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import riemann_core as rc

from .. import costs
from .flops import flop_counter
from .timing import gemm_rate, measure

TARGETS = {"speed_of_light": 2.0, "sampled_vs_step": 2.5, "full_vs_layerwise": 50.0}
SMALL_NETWORKS = ((784, 5, 10), (64, 56, 10), (64, 48, 16, 10))


def mlp(widths, activation=nn.Tanh) -> nn.Sequential:
    layers = []
    for f_in, f_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(f_in, f_out), activation()]
    return nn.Sequential(*layers[:-1])


def measure_targets(
    *, device="cpu", dtype=torch.float32, quick=False, seed=0, progress=None
) -> dict:
    """Measure the targets; ``progress(label)`` is called before each measurement."""
    progress = progress or (lambda label: None)
    progress("GEMM rate")
    torch.manual_seed(seed)
    repeats = 3 if quick else 7
    widths, N = (784, 1024, 1024, 10), 128

    def data(w):
        x = torch.randn(N, w[0], device=device, dtype=dtype)
        return x, torch.randint(0, w[-1], (N,), device=device)

    rate = gemm_rate(device, dtype, n=2048 if quick else 4096)
    model = mlp(widths).to(device, dtype)
    x, y = data(widths)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def time_direction(m, xx, **kw):
        return measure(lambda: rc.direction(m, xx, y, **kw), repeats=repeats, device=device)

    progress("forward+backward")
    t_step = measure(step, repeats=repeats, device=device).median
    progress("layerwise, exact Fisher")
    t_exact = time_direction(model, x, method="layerwise").median
    progress("layerwise, sampled Fisher")
    t_sampled = time_direction(model, x, method="layerwise", output_metric="sampled").median
    shape = costs.MLPShape(widths, N, rows=widths[-1])
    progress("FLOP count")
    with flop_counter() as counter:
        rc.direction(model, x, y, method="layerwise")
    sol = costs.speed_of_light_flops(shape) / rate
    result = {
        "gemm_flops_per_s": rate,
        "network": list(widths),
        "batch": N,
        "dtype": str(dtype).removeprefix("torch."),
        "step_s": t_step,
        "layerwise_exact_s": t_exact,
        "layerwise_sampled_s": t_sampled,
        "speed_of_light_s": sol,
        "speed_of_light_flops": costs.speed_of_light_flops(shape),
        "counted_flops": counter.get_total_flops(),
        "modelled_flops": costs.flops("layerwise", shape)["total"],
        "ratios": {"speed_of_light": t_exact / sol, "sampled_vs_step": t_sampled / t_step},
        "small": [],
    }
    for w in SMALL_NETWORKS[:2] if quick else SMALL_NETWORKS:
        progress(f"full vs layerwise, {'-'.join(map(str, w))}")
        m = mlp(w).to(device, dtype)
        xs, _ = data(w)
        t_l = time_direction(m, xs, method="layerwise").median
        t_f = time_direction(m, xs, method="full").median
        result["small"].append(
            {
                "network": list(w),
                "n_params": sum(p.numel() for p in m.parameters()),
                "layerwise_s": t_l,
                "full_s": t_f,
                "ratio": t_f / t_l,
            }
        )
    result["ratios"]["full_vs_layerwise"] = max(s["ratio"] for s in result["small"])
    return result


def format_targets(result: dict) -> str:
    r = result["ratios"]
    lines = [
        f"GEMM rate {result['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s ({result['dtype']})",
        f"MLP {'-'.join(map(str, result['network']))}, batch {result['batch']}, cross-entropy:",
        f"  forward+backward          {result['step_s'] * 1e3:9.2f} ms",
        f"  layerwise, exact Fisher   {result['layerwise_exact_s'] * 1e3:9.2f} ms   "
        f"speed of light {result['speed_of_light_s'] * 1e3:.2f} ms -> "
        f"{r['speed_of_light']:.2f}x (target <= {TARGETS['speed_of_light']}x)",
        f"  layerwise, sampled (1)    {result['layerwise_sampled_s'] * 1e3:9.2f} ms   "
        f"{r['sampled_vs_step']:.2f}x forward+backward (target <= {TARGETS['sampled_vs_step']}x)",
        f"  FLOPs: counted {result['counted_flops'] / 1e9:.3f} G, modelled "
        f"{result['modelled_flops'] / 1e9:.3f} G, speed-of-light formula "
        f"{result['speed_of_light_flops'] / 1e9:.3f} G",
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
    "float32, cross-entropy) against its speed of light (minimal FLOPs / the GEMM rate "
    "measured in the same run), the sampled-Fisher direction (1 probe) against one "
    "forward+backward, and full against layerwise on networks of about 4k parameters."
)
EXAMPLE = "targets --out reports/cpu/targets"


def run(args) -> int:
    from tqdm import tqdm

    from .environment import environment
    from .output import write_json

    steps = 5 + (2 if args.quick else len(SMALL_NETWORKS))
    with tqdm(total=steps, desc="targets", unit="step", leave=False, file=sys.stderr) as bar:

        def progress(label):
            bar.set_postfix_str(label)
            bar.update(1)

        result = measure_targets(
            device=args.device, quick=args.quick, seed=args.seed, progress=progress
        )
    print(format_targets(result))
    if args.out is not None:
        command = "riemann-bench targets" + (" --quick" if args.quick else "")
        payload = {"command": command, "environment": environment(args.device), **result}
        print(f"\nwrote {write_json(args.out, 'targets.json', payload)}")
    return 0
