"""Verdicts of the ``time-explained-<method>`` claims on synthetic sweeps whose compute time
follows a planted law of the counted work (not collected by pytest: a measurement of the
verdict rule, quoted in docs/measuring.md).

    python tests/scaling/planted_laws.py [--seeds 20] [--grid long-batch] [--t0 1e-3]
        [--laws linear,total^1.3,total^1.4]

Each law maps the per-kind times ``F_k / R_k`` of :class:`synthetic.Machine` to a compute
time: ``linear`` adds them (the claim should pass), ``total^p`` raises their sum to ``p``
about 10 ms (it should not pass). Per-call overhead ``t0`` plus ``t0 / 10`` per module;
5 repeats with a 3% or 5% spread (alternating by seed), every axis timed interleaved.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import AXES, Machine, make_sweep  # noqa: E402

from riemann_core.scaling import fit  # noqa: E402
from riemann_core.scaling import validate as va  # noqa: E402

#: seconds of compute where a planted power law meets the linear one
REFERENCE = 1e-2

GRIDS = {
    "test": AXES,
    "long-batch": {**AXES, "width": (16, 32, 64), "batch": tuple(2**k for k in range(2, 12))},
    "sweep": {**AXES, "batch": tuple(2**k for k in range(2, 13))},  # the CPU sweeps' reach
}


def power(p: float):
    return lambda per_kind: REFERENCE * (sum(per_kind.values()) / REFERENCE) ** p


LAWS = {"linear": lambda per_kind: sum(per_kind.values())} | {
    f"total^{p}": power(p) for p in (1.2, 1.3, 1.4)
}


class Planted(Machine):
    """A :class:`synthetic.Machine` whose compute time follows ``law`` of its per-kind
    times."""

    def __init__(self, law, **kw):
        super().__init__(**kw)
        self.law = law

    def time(self, method, kernel, shape, flops):
        per_kind = {k: f / self.rates[k] for k, f in flops.items() if f}
        return self.t0 + self.t_module * len(shape.layers) + self.law(per_kind)


def verdicts(law: str, grid: str, t0: float, seed: int, n_boot: int) -> list:
    df, meta = make_sweep(
        Planted(LAWS[law], t0=t0, t_module=t0 / 10),
        noise=0.03 + 0.02 * (seed % 2),
        seed=seed,
        axes=GRIDS[grid],
    )
    df["interleaved"] = "depth width batch"
    df = va._by_slow_paths(df)[1]
    models = fit.time_models(df)
    runs = va._time_runs(df)
    return [va._time_explained(df, meta, models, m, k, n_boot, seed) for m, k in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--grid", choices=GRIDS, default="long-batch")
    parser.add_argument("--t0", type=float, default=1e-3)
    parser.add_argument("--laws", default="linear,total^1.3,total^1.4")
    parser.add_argument("--n-boot", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"grid {args.grid}, t0 {args.t0:g} s, {args.seeds} seeds")
    for law in args.laws.split(","):
        counts = collections.defaultdict(collections.Counter)
        for seed in range(args.seeds):
            for claim in verdicts(law, args.grid, args.t0, seed, args.n_boot):
                counts[claim.id][claim.verdict] += 1
        print(f"{law}:")
        for cid, count in sorted(counts.items()):
            print(f"  {cid:36s} " + ", ".join(f"{v} {n}" for v, n in count.most_common()))


if __name__ == "__main__":
    main()
