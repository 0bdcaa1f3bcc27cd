"""The worker of ``riemann-bench compare``: one process per side, timing cases on request.

The command starts this file's source as ``python -c`` in each side's checkout, so each
worker imports that side's ``riemann_core``; this file therefore uses only torch and the
package's public API (``rc.direction``, ``rc.RiemannianPreconditioner``), which every
compared commit has, and nothing else of the package.

Protocol, one JSON object per line: the worker first writes ``{"package": path,
"version": ...}``; then for each request ``{"case": CASE, "calls": k, "runs": r}`` it builds
the case once (cached), makes one untimed call, times ``r`` runs of ``k`` calls and answers
``{"seconds": the fastest run's seconds per call}``, or ``{"error": "Type: message"}``
where building or calling the case raised. The answers go to a copy of the original
standard output; standard output itself is sent to standard error before the package is
imported, so what a side prints (a debug print, a library's message) cannot break the
protocol. A case is a dict (:func:`cases` builds them):
``kind`` (``"sgd"``: a plain SGD step; ``"step"``: a training step with
``pre.backward``, layerwise, ``metric`` its output metric; else the ``method`` of an
``rc.direction`` call), ``widths`` of an MLP (Linear and Tanh), ``batch``, ``device``,
``seed``; cross-entropy, damping ``1e-3``, float32, learning rate 0.
"""

from __future__ import annotations

import json
import os
import sys
import time

#: The networks of the default grid (``widths``, ``batch``): the targets' small network and
#: a wider one whose products outweigh the per-call overhead; ``--quick`` takes the first.
NETWORKS = (((64, 32, 32, 10), 128), ((784, 256, 256, 10), 128))

#: The methods whose dense metric fits at a network's size: ``full`` up to this many
#: parameters (the small network has 3466; the wider one 270k, an ``n x n`` metric of 290 GB).
FULL_UP_TO = 10_000

#: Timed runs of ``calls`` calls per request (one where a call is long: :data:`LONG_CALL`):
#: their fastest is the answer (an interruption
#: of the process lengthens one run, not the fastest).
RUNS = 3

#: Seconds of a call past which a request times one run: an interruption is then a small
#: part of it, and three runs of ``full``'s 0.3 s direction made its case 100 s long.
LONG_CALL = 0.1


def case_name(case: dict) -> str:
    """``"direction layerwise 64-32-32-10 b128"``, ``"step sampled ..."``, ``"sgd step ..."``."""
    net = f"{'-'.join(map(str, case['widths']))} b{case['batch']}"
    if case["kind"] == "sgd":
        return f"sgd step {net}"
    if case["kind"] == "step":
        return f"step {case['metric']} {net}"
    return f"direction {case['kind']} {net}"


def cases(quick: bool, device: str, seed: int, networks=None) -> list[dict]:
    """The grid: per network (``networks``, ``(widths, batch)`` pairs; by default
    :data:`NETWORKS`, the first alone if ``quick``) the SGD step (the control: torch alone,
    the same on both sides), the sampled and exact training steps with ``pre.backward``,
    and every method's direction (``full`` where it fits)."""
    out = []
    for widths, batch in networks or (NETWORKS[:1] if quick else NETWORKS):
        n_params = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))
        base = {"widths": list(widths), "batch": batch, "device": device, "seed": seed}
        methods = ["euclidean", "layerwise", "natural", "kfac"]
        if n_params <= FULL_UP_TO:
            methods.insert(2, "full")
        kinds = [{"kind": "sgd"}, {"kind": "step", "metric": "sampled"}]
        kinds += [{"kind": "step", "metric": "exact"}] + [{"kind": m} for m in methods]
        out += [base | kind for kind in kinds]
    return out


def build(case: dict):
    """The call that ``case`` times (module docstring), on data drawn from its seed."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import riemann_core as rc

    torch.manual_seed(case["seed"])
    widths, device = case["widths"], torch.device(case["device"])
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to(device)
    x = torch.randn(case["batch"], widths[0], device=device)
    y = torch.randint(0, widths[-1], (case["batch"],), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    if case["kind"] == "sgd":

        def call():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    elif case["kind"] == "step":
        pre = rc.RiemannianPreconditioner(
            model, method="layerwise", damping=1e-3, output_metric=case["metric"]
        )

        def call():
            opt.zero_grad()
            pre.backward(F.cross_entropy(model(x), y))
            opt.step()

    else:

        def call():
            rc.direction(model, x, y, method=case["kind"], damping=1e-3)

    if device.type != "cuda":
        return call

    def synchronised():
        call()
        torch.cuda.synchronize(device)

    return synchronised


def serve(stdin=sys.stdin, stdout=None) -> None:
    """Answer requests (module docstring) until ``stdin`` ends; by default on a copy of
    file descriptor 1, which then points to standard error (module docstring)."""
    if stdout is None:
        stdout = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    if len(sys.argv) > 2:  # the CPUs to run on: the other side's too (compare.shared_cpus);
        # before torch is imported, so that every thread it or numpy starts is pinned too
        os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
    import torch

    import riemann_core as rc

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    version = getattr(rc, "__version__", "unknown")
    print(json.dumps({"package": rc.__file__, "version": version}), file=stdout, flush=True)
    built: dict[str, object] = {}
    for line in stdin:
        request = json.loads(line)
        key = json.dumps(request["case"], sort_keys=True)
        try:
            if key not in built:
                built[key] = build(request["case"])
            call = built[key]
            call()
            runs = []
            for _ in range(request["runs"]):
                start = time.perf_counter()
                for _ in range(request["calls"]):
                    call()
                runs.append((time.perf_counter() - start) / request["calls"])
            answer = {"seconds": min(runs)}
        except Exception as err:  # the case, not the worker: the command goes on
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), file=stdout, flush=True)


if __name__ == "__main__":
    serve()
