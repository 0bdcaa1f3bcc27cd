"""Host synchronisations on a GPU: a fixed few per call, however deep the network.

A CUDA kernel launch returns at once; reading a device value on the host (``.item()``,
``bool(t)``, ``.tolist()``, a copy to the CPU, the error check of a factorisation that
raises) waits for everything queued before it. The core reads its checks back together
(one transfer per :class:`riemann_core._checks.Deferred` run) and factorises with
``cholesky_ex``, so the count of a call does not grow with the layers or the blocks.
K-FAC with exact damping adds one per order of its factors: ``torch.linalg.eigh`` checks
its status on the host at every call, and the factors of one order are decomposed in one
batched call. Counted with ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every
synchronising operation; the failure message lists where each one was. Run where a GPU is
present (skipped elsewhere).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracle import Problem

import riemann_core as rc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

#: the most host syncs one call may take (the data's checks, the solve's checks; as
#: measured on an H200)
MOST = 2
#: the orders of the K-FAC factors of :func:`problem`'s networks (inputs 5 + 1 and 8 + 1,
#: outputs 8 and 5, at either depth): one batched eigendecomposition each
ORDERS = 4
DEPTHS = (2, 5)


def sync_sites(call) -> list[str]:
    """``file:line`` of every synchronising operation in the second ``call()`` (the first
    one warms up: lazy initialisation is not the hot path)."""
    call()
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # (seen on a GPU: the first "warn" synced once itself)
        warnings.simplefilter("ignore")
        torch.cuda.set_sync_debug_mode("warn")
        torch.cuda.set_sync_debug_mode("default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def problem(depth: int):
    return Problem(depth=depth, width=8, batch=16, classes=5).make(
        dtype=torch.float32, device="cuda"
    )


def check(counts: dict[int, list[str]], options: dict) -> None:
    shallow, deep = (counts[d] for d in DEPTHS)
    report = "; ".join(f"depth {d}: {len(s)} at {s}" for d, s in counts.items())
    print(report)  # the counts, shown with -rP where the test passes
    most = MOST + ORDERS * (options == KFAC_EXACT)
    assert len(deep) == len(shallow), f"the syncs grow with depth: {report}"
    assert len(deep) <= most, f"more than {most} host syncs per call: {report}"


KFAC_EXACT = {"method": "kfac"}
METHODS = [
    *({"method": m} for m in rc.METHODS),
    {"method": "kfac", "kfac_damping": "factored"},
]


def method_id(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("output_metric", ["exact", "sampled"])
@pytest.mark.parametrize("options", METHODS, ids=method_id)
def test_direction_syncs_a_fixed_few_times(options, output_metric):
    counts = {}
    for depth in DEPTHS:
        model, x, y = problem(depth)
        gen = torch.Generator(device="cuda").manual_seed(0)
        counts[depth] = sync_sites(
            lambda model=model, x=x, y=y, gen=gen: rc.direction(
                model, x, y, output_metric=output_metric, generator=gen, **options
            )
        )
    check(counts, options)


@pytest.mark.parametrize("output_metric", ["exact", "sampled"])
@pytest.mark.parametrize("options", METHODS, ids=method_id)
def test_training_step_syncs_a_fixed_few_times(options, output_metric):
    counts = {}
    for depth in DEPTHS:
        model, x, y = problem(depth)
        gen = torch.Generator(device="cuda").manual_seed(0)
        pre = rc.RiemannianPreconditioner(
            model, output_metric=output_metric, generator=gen, **options
        )
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, x=x, y=y, pre=pre, opt=opt):
            opt.zero_grad()
            pre.backward(F.cross_entropy(model(x), y))
            opt.step()

        counts[depth] = sync_sites(step)
    check(counts, options)
