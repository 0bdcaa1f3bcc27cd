"""asv benchmarks: every method's direction, the phases of the layerwise Woodbury solve,
and every K-FAC variant beside the same variant of the public K-FAC (curvlinops).

Problems come from :mod:`bench.common` (a tanh MLP, cross-entropy, exact output metric,
damping ``1e-3``, float32) on ``RIEMANN_BENCH_DEVICE``. Combinations whose modelled peak
memory (``costs.peak_bytes``) exceeds the budget are skipped in ``setup``, as are the
CUDA memory benchmarks when CUDA is absent.

* ``time_``: seconds per call; on CUDA the timed call ends with a synchronisation, and
  ``setup``'s warm-up call with one too (:func:`_warm`): asv starts the clock as ``setup``
  returns.
* ``peakmem_``: asv's peak resident host memory of the benchmark process, restarted right
  before the call, after ``setup``'s warm-up call (``memory.reset_host_peak``, on Linux;
  elsewhere the peak cannot be restarted and holds setup's and the first call's; before,
  it held the first call's one-time memory, ~80 MiB where a direction needs ~1, and a
  phase's ``setup`` peak): torch, the call's inputs (model and batch; for a phase, what
  the phase starts from) and the call's own peak. The restart returns free memory to the
  system, so it runs in the ``peakmem_`` benchmark only: a ``time_`` call follows the
  warm-up call with the memory it freed kept, as in a training loop (restarted in
  ``setup``, which asv runs before every timed call, it added the page faults of fresh
  memory to each: 18-37% of a direction at width 128). Torch's own ~275 MiB dwarf a
  direction's few MiB there, so a call's memory doubling moves it by a few percent:
* ``track_host_peak_bytes``: the call's own memory, the peak rise of resident host memory
  during one call above what is resident before it (``memory.host_peak_bytes``; Linux).
* ``track_flops_counted``: FLOPs of one call (after a warm-up call) counted by
  ``riemann_core.measure.flops.flop_counter``; ``track_flops_modelled``: the cost
  model's ``riemann_core.costs.flops`` total. Either changing flags a regression.
* ``track_cuda_peak_bytes``: peak CUDA memory allocated during one call (after a warm-up
  call), above its inputs.
* ``Overhead.time_overhead``: every method on an MLP so small (2-2-2, batch 2) that its
  time is the fixed cost of a call, the ``t0`` of the sweep's time model.
* ``Targets.track_*``: the core figures of ``riemann-bench targets``, each a median of
  per-round ratios over interleaved rounds within one run (exact layerwise over its
  speed of light; a step with ``pre.backward`` over an SGD step, sampled Fisher, at
  784-1024-1024-10 and 64-32-32-10; exact over the exact direction alone; full over
  layerwise at about 4k parameters; for reference, the sampled step over the lean eager
  one and, along a training run where steps take the float64 residual check, over an SGD
  step), measured once per run (``setup_cache``, quick rounds).
* ``track_ours_over_curvlinops``: our K-FAC's time over curvlinops' in the same variant,
  the median of per-round ratios over interleaved rounds (goal: at most 1). Skipped
  without curvlinops (``pip install "riemann-bench[compare]"``).

The grids are literals here, never read from the code under test (but for the names
of the K-FAC variants, ``public_kfac.VARIANTS``, unchanged since they were added): a cheap default
(the suite in minutes with ``asv run --python=same --quick``), one axis at a time: the
base point (width 32, depth 1, 10 outputs, batch 32) and each of width (128, 256), depth
(2, 3), output dimension (20, 30) and batch (64, 128) varied alone (asv's parameters are a
Cartesian product: the other combinations are skipped, ``skip_params``); and, with
``RIEMANN_BENCH_FULL=1``, the full Cartesian one (hours on a 2-core CPU).
"""

from __future__ import annotations

import functools
import itertools
import statistics

import torch

import riemann_core as rc
from riemann_core import costs
from riemann_core.costs import dense_is_cheaper
from riemann_core.measure import public_kfac
from riemann_core.measure.flops import flop_counter
from riemann_core.measure.memory import cuda_peak_bytes, host_peak_bytes, reset_host_peak
from riemann_core.measure.timing import interleaved, median_ratio
from riemann_core.methods import Options, Problem, build_problem
from riemann_core.methods.layerwise import damped
from riemann_core.modules import handler_for
from riemann_core.scaling import kfac_targets, targets
from riemann_core.woodbury import cholesky_in_place, pad_with_identity, padded_gram

from . import common

DTYPE = torch.float32

#: ``method`` or ``method-kernel`` (default kernel: structured).
METHODS = (
    "euclidean",
    "layerwise",
    "layerwise-generic",
    "natural",
    "natural-generic",
    "kfac",
    "full",
)
KERNELS = ("structured", "generic")
PHASES = ("pullback", "gram", "factorisation", "solve")
if common.FULL:
    WIDTHS = (32, 64, 128, 256, 512, 1024)
    DEPTHS = (1, 2, 4, 8)
    OUT_DIMS = (2, 10, 100)
    BATCHES = (32, 128)
else:
    # one axis at a time: the base point (width 32, depth 1, 10 outputs, batch 32), then
    # each axis varied alone to two more values (the combinations off these lines are
    # skipped: ``skip_params``); the first value of each axis is the base's
    WIDTHS = (32, 128, 256)
    DEPTHS = (1, 2, 3)
    OUT_DIMS = (10, 20, 30)
    BATCHES = (32, 64, 128)
SIZES = (WIDTHS, DEPTHS, OUT_DIMS, BATCHES)
SIZE_NAMES = ("width", "depth", "out_dim", "batch")


def off_the_lines(*leading: tuple) -> list[tuple]:
    """The combinations of ``leading`` (the params before the sizes) and :data:`SIZES` that
    vary more than one axis from the base point (each axis's first value): asv's
    ``skip_params``, which asv skips without running ``setup`` (none on the full grid, a
    Cartesian product)."""
    if common.FULL:
        return []
    base = tuple(values[0] for values in SIZES)
    return [
        combination
        for combination in itertools.product(*leading, *SIZES)
        if sum(v != b for v, b in zip(combination[len(leading) :], base, strict=True)) > 1
    ]


def method_and_kernel(label: str) -> tuple[str, str]:
    method, _, kernel = label.partition("-")
    return method, kernel or "structured"


def cuda_device() -> str:
    """The CUDA device for the ``track_cuda_*`` benchmarks; skip them without one."""
    if not torch.cuda.is_available():
        raise NotImplementedError("CUDA memory benchmarks need CUDA, which is not available")
    name = common.device()
    return name if torch.device(name).type == "cuda" else "cuda"


class _DirectionCase:
    params = (METHODS, *SIZES)
    param_names = ("method", *SIZE_NAMES)
    skip_params = off_the_lines(METHODS)
    timeout = 600.0  # the full grid's largest feasible sizes take minutes per call on a CPU

    def setup(self, label, width, depth, out_dim, batch):
        self.device = self.device_name()
        common.require_device(self.device)
        self.method, self.kernel = method_and_kernel(label)
        common.require_feasible(self.method, self.kernel, width, depth, out_dim, batch)
        self.shape = common.shape(width, depth, out_dim, batch)
        model, x, y = common.problem(width, depth, out_dim, batch, self.device, DTYPE)
        self.call = functools.partial(
            rc.direction,
            model,
            x,
            y,
            method=self.method,
            damping=common.DAMPING,
            kernel=self.kernel,
        )

    def device_name(self) -> str:
        return common.device()


def _warm(call, device: str) -> None:
    """``call()`` once, untimed, then ``device`` synchronised. asv runs ``setup`` before
    every timed call and starts the clock as it returns, so on CUDA the kernels the
    warm-up left queued ran inside the timed call, whose closing synchronisation waited
    for them (found by an audit: the Gram and factorisation phases read nothing back to
    the host, so each timed call could hold a whole call's GPU work beside its own)."""
    call()
    common.synchronize(device)


def _peak_of(call) -> None:
    """``call()`` with the process's peak memory restarted first, so that asv's
    ``peakmem`` reads what the call adds to what is resident, not the first call's
    one-time memory nor ``setup``'s (``setup`` ran a warm-up call)."""
    reset_host_peak()
    call()


#: calls whose peak host memory ``track_host_peak_bytes`` takes the median of
READINGS = 5


class DirectionHostMemory(_DirectionCase):
    """Peak host memory one direction adds to what is resident (skipped where it cannot be
    read: not Linux)."""

    def setup(self, *params):
        if not reset_host_peak():
            raise NotImplementedError("the peak resident memory cannot be restarted here")
        super().setup(*params)
        self.call()  # warm-up: the model's one-time check

    def track_host_peak_bytes(self, *params):
        # the median of READINGS calls: one reading moved by 8% on a width-128 direction,
        # by 2.5x on one of a few KiB, between identical runs (found by a hunt)
        return statistics.median(host_peak_bytes(self.call) for _ in range(READINGS))

    track_host_peak_bytes.unit = "bytes"


class _CountedFlops:
    """``track_flops_counted``: FLOPs of one ``self.call()`` under ``flop_counter``, after
    an uncounted one (the first call on a new model runs the one-time check that it treats
    samples independently: 0% to +63% of a direction's FLOPs on the default grid, measured)."""

    def track_flops_counted(self, *params):
        self.call()
        with flop_counter() as counter:
            self.call()
        return counter.get_total_flops()

    track_flops_counted.unit = "flops"


class Direction(_CountedFlops, _DirectionCase):
    """``rc.direction(model, x, y, method=..., kernel=...)``: the whole direction."""

    def time_direction(self, *params):
        self.call()
        common.synchronize(self.device)

    def peakmem_direction(self, *params):
        _peak_of(self.call)

    def setup(self, *params):
        super().setup(*params)
        _warm(self.call, self.device)  # the model's one-time check, the memory it frees kept

    def track_flops_modelled(self, *params):
        options = {"device": self.device, "dtype": DTYPE}
        return costs.flops(self.method, self.shape, self.kernel, **options)["total"]

    track_flops_modelled.unit = "flops"


class Overhead:
    """Per-call overhead: the direction of a 2-2-2 MLP on two samples, where the work is
    negligible and the time is what every call pays (Python, dispatch, kernel launches).
    Two, not one: a batch of one cannot show coupling, so every call on one sample runs
    the batch-coupling probe again (found by review: 1.7-2x the call)."""

    params = (METHODS,)
    param_names = ("method",)

    def setup(self, label):
        device = common.device()
        common.require_device(device)
        method, kernel = method_and_kernel(label)
        model, x, y = common.problem(2, 1, 2, 2, device, DTYPE)
        self.device = device
        self.call = functools.partial(
            rc.direction, model, x, y, method=method, damping=common.DAMPING, kernel=kernel
        )
        _warm(self.call, device)  # a first call in a process is 1000x the next (imports, probes)

    def time_overhead(self, label):
        self.call()
        common.synchronize(self.device)


class DirectionCudaMemory(_DirectionCase):
    """Peak CUDA memory of one direction (skipped without CUDA)."""

    def device_name(self) -> str:
        return cuda_device()

    def track_cuda_peak_bytes(self, *params):
        self.call()  # the cuBLAS workspace and the model's one-time check, not the call's
        return cuda_peak_bytes(self.call, self.device)

    track_cuda_peak_bytes.unit = "bytes"


def _pullback(model, x, y, kernel):
    """Forward, loss gradient and factor pulled back to every block, rows compressed."""
    opts = Options(damping=common.DAMPING, kernel=kernel)
    problem = build_problem(model, x, y, opts, needs_factor=True)
    for handler in problem.handlers:
        handler.compress_rows()
    return problem


# What each phase starts from, cached: asv re-runs `setup` before every timed call.
@functools.lru_cache(maxsize=4)
def _pulled(kernel, width, depth, out_dim, batch, device):
    model, x, y = common.problem(width, depth, out_dim, batch, device, DTYPE)
    return _pullback(model, x, y, kernel)


def _groups(problem) -> list[list[int]]:
    """The blocks whose Grams the direction factorises together: those it solves by
    Woodbury (``methods.layerwise.solve``: not those whose own ``n_a x n_a`` metric costs
    fewer FLOPs, ``costs.dense_is_cheaper``), grouped by equal ``d``. Found by an audit: the
    phases took every block by Woodbury, so at batch 128 (width 32) they timed two Grams
    of order 1152 and their Cholesky, 2.6x the direction's Cholesky FLOPs, where the
    direction forms neither and factorises the blocks' metrics instead."""
    by_size: dict[int, list[int]] = {}
    for i, handler in enumerate(problem.handlers):
        gram, metric = handler.gram_flops(), handler.metric_flops()
        if not dense_is_cheaper(handler.block.n_params, handler.d, gram, metric):
            by_size.setdefault(handler.d, []).append(i)
    return list(by_size.values())


def _gram_buffers(problem) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Per group of :func:`_groups`: ``(indices, buffer, grams)``, the padded column-major
    buffer the direction factorises in place and its Gram views (``woodbury.padded_gram``)."""
    out = []
    for indices in _groups(problem):
        first = problem.handlers[indices[0]]
        out.append((indices, *padded_gram(len(indices), first.d, first.d, like=first)))
    return out


@functools.lru_cache(maxsize=4)
def _factored(kernel, width, depth, out_dim, batch, device):
    """Per group of :func:`_groups` of :func:`_pulled`'s problem: ``(indices, damped,
    chol)``, the padded buffer of the damped Grams ``mu I + K_a K_a^T`` and its Cholesky
    factor, as the direction forms and factorises them (its handlers then hold what the
    solve reuses: ``Xt Xt^T``, a generic ``K_a``)."""
    problem = _pulled(kernel, width, depth, out_dim, batch, device)
    out = []
    for indices, buffer, grams in _gram_buffers(problem):
        for i, gram in zip(indices, grams, strict=True):
            problem.handlers[i].gram_into(gram)
        pad_with_identity(buffer, grams.shape[-1])
        damped(grams, common.DAMPING)
        out.append((indices, buffer.clone(), cholesky_in_place(buffer)))
    return out


#: phases whose work the kernel does not change (the same FLOPs and time with either: the
#: handlers are built in the pullback, the factorisation takes Grams of the same order):
#: timed with the default kernel only (the factorisation: of the blocks the structured
#: direction solves by Woodbury, :func:`_groups`)
KERNEL_FREE_PHASES = ("pullback", "factorisation")


class _PhaseCase:
    params = (PHASES, KERNELS, *SIZES)
    param_names = ("phase", "kernel", *SIZE_NAMES)
    skip_params = sorted(
        set(off_the_lines(PHASES, KERNELS))
        | set(itertools.product(KERNEL_FREE_PHASES, ("generic",), *SIZES)),
        key=repr,
    )
    timeout = 600.0

    def setup(self, phase, kernel, width, depth, out_dim, batch):
        self.device = self.device_name()
        common.require_device(self.device)
        common.require_feasible("layerwise", kernel, width, depth, out_dim, batch)
        size = (kernel, width, depth, out_dim, batch, self.device)
        if phase != "pullback" and not _groups(_pulled(*size)):
            raise NotImplementedError(
                f"the layerwise direction ({kernel}) solves no block by Woodbury at width "
                f"{width}, depth {depth}, {out_dim} outputs, batch {batch}: each block's own "
                "metric costs fewer FLOPs (costs.dense_is_cheaper), so it has no "
                f"{phase} phase to time"
            )
        if phase == "pullback":
            model, x, y = common.problem(width, depth, out_dim, batch, self.device, DTYPE)

            def call():
                _pullback(model, x, y, kernel)

        elif phase == "gram":
            problem = _pulled(*size)
            buffers = _gram_buffers(problem)

            def call():
                # A fresh handler per block, so nothing cached by an earlier call is reused;
                # each Gram written into the buffer the direction factorises
                for indices, _, grams in buffers:
                    for i, gram in zip(indices, grams, strict=True):
                        handler = handler_for(problem.blocks[i], kernel)
                        handler.set_delta(problem.handlers[i].delta)
                        handler.gram_into(gram)

        elif phase == "factorisation":
            work = [(damped, torch.empty_like(damped)) for _, damped, _ in _factored(*size)]

            def call():
                # the damped Grams copied in (the factorisation overwrites them; O(d^2)),
                # factorised in place together, as the direction does
                for damped, buffer in work:
                    cholesky_in_place(buffer.copy_(damped))

        else:
            factored = _factored(*size)
            pulled = _pulled(*size)

            def call():
                # a fresh problem: each call forms g_a (a generic block caches it)
                problem = Problem(pulled.blocks, pulled.handlers)
                for indices, _, chol in factored:
                    t = chol.solve(torch.stack([problem.K_gradient(i) for i in indices]))
                    for j, i in enumerate(indices):
                        h = problem.handlers[i]  # the bound where the direction takes it
                        bound = problem.factored(i) and costs.bound_pays(
                            h.block.n_params, h.N, h.f_out, h.device
                        )
                        problem.gradient_minus_K_tmv(i, t[j], 1 / common.DAMPING, bound)

        self.call = call

    def device_name(self) -> str:
        return common.device()


class LayerwisePhase(_CountedFlops, _PhaseCase):
    """One phase of the layerwise Woodbury direction, summed over the layers.

    ``pullback``: forward, loss gradient and the output factor pulled back to every
    block (``build_problem``), rows compressed to ``min(r, f_out)`` per sample;
    ``gram``: ``handler.gram_into`` per block, into the padded column-major buffer the
    direction factorises (generic kernel: materialising ``K_a`` too), on a handler built
    afresh in the call (``handler_for``, which the pullback times too: 4-8% of the
    phase from width 32 to 256, structured, one thread), so that no ``Xt Xt^T`` cached by
    an earlier call is reused; ``factorisation``:
    the damped Grams of equal order factorised together in place
    (``woodbury.cholesky_in_place``), after a copy into the buffer; ``solve``: ``t =
    chol.solve(K_a g_a)`` and ``(g_a - K_a^T t) / mu``, forming ``g_a``. The routines are
    the direction's (``methods.layerwise``). The Gram, factorisation and solve phases take
    the blocks the direction solves by Woodbury, and are skipped where it solves none (it
    factorises a block's ``n_a x n_a`` metric instead where that costs fewer FLOPs: on the
    default grid, at batch 64 the output layer with either kernel, at batch 128 both
    layers with the structured kernel and the output layer with the generic one); the
    pullback takes every block.
    """

    def time_phase(self, *params):
        self.call()
        common.synchronize(self.device)

    def peakmem_phase(self, *params):
        _peak_of(self.call)

    def setup(self, *params):
        super().setup(*params)
        _warm(self.call, self.device)


class LayerwisePhaseCudaMemory(_PhaseCase):
    """Peak CUDA memory of one phase above what its inputs hold (skipped without CUDA)."""

    def device_name(self) -> str:
        return cuda_device()

    def track_cuda_peak_bytes(self, *params):
        self.call()  # the cuBLAS workspace and the model's one-time check, not the call's
        return cuda_peak_bytes(self.call, self.device)

    track_cuda_peak_bytes.unit = "bytes"


KFAC_VARIANTS = tuple(v.name for v in public_kfac.VARIANTS)
KFAC_IMPLEMENTATIONS = ("ours", "curvlinops")
KFAC_ROUNDS = 5


def _kfac_call(variant_name, implementation, width, depth, out_dim, batch):
    """A from-scratch K-FAC direction of ``variant_name`` by ``implementation``."""
    if implementation == "curvlinops" and not public_kfac.available():
        raise NotImplementedError(f"curvlinops is not installed ({public_kfac.INSTALL})")
    device = common.device()
    common.require_device(device)
    variant = next(v for v in public_kfac.VARIANTS if v.name == variant_name)
    model, x, y = common.problem(width, depth, out_dim, batch, device, DTYPE)
    make = public_kfac.ours if implementation == "ours" else public_kfac.public
    return make(model, x, y, variant, damping=common.DAMPING), device


class KFAC:
    """One K-FAC variant from scratch (gradient, factors, damped inverse, product), ours
    or curvlinops' (:mod:`riemann_core.measure.public_kfac`)."""

    params = (KFAC_VARIANTS, KFAC_IMPLEMENTATIONS, *SIZES)
    param_names = ("variant", "implementation", *SIZE_NAMES)
    skip_params = off_the_lines(KFAC_VARIANTS, KFAC_IMPLEMENTATIONS)
    timeout = 600.0

    def setup(self, variant, implementation, *size):
        self.call, self.device = _kfac_call(variant, implementation, *size)
        _warm(self.call, self.device)  # as the directions' (asv --quick takes no warm-up)

    def time_kfac(self, *params):
        self.call()
        common.synchronize(self.device)


class KFACRatio:
    """Our K-FAC's time over curvlinops' in one variant, within one run."""

    params = (KFAC_VARIANTS, *SIZES)
    param_names = ("variant", *SIZE_NAMES)
    skip_params = off_the_lines(KFAC_VARIANTS)
    timeout = 600.0

    def setup(self, variant, *size):
        self.ours, self.device = _kfac_call(variant, "ours", *size)
        self.theirs, _ = _kfac_call(variant, "curvlinops", *size)

    def track_ours_over_curvlinops(self, *params):
        calls = {"ours": self.ours, "theirs": self.theirs}
        t = interleaved(calls, KFAC_ROUNDS, self.device, warmup=kfac_targets.WARMUP)
        return median_ratio(t["ours"], t["theirs"])

    track_ours_over_curvlinops.unit = "ratio"


class Environment:
    """What a run's figures depend on beside the code: torch's thread count (asv's results
    record the machine, not this; a change between two runs shows here, not as a
    regression of every time benchmark)."""

    def track_torch_threads(self):
        return torch.get_num_threads()

    track_torch_threads.unit = "threads"


class Targets:
    """The core figures of ``riemann-bench targets`` against their goals (ratios)."""

    timeout = 1200.0

    def setup_cache(self):
        result = targets.measure_targets(device=common.device(), dtype=DTYPE, quick=True)
        figures = {}
        for f in result["figures"]:  # full over layerwise: the smallest ratio of its networks
            # (the one nearest its goal of >= 50; a regression on another network shows
            # only once it falls below this one)
            figures[f["id"]] = min(f["ratio"], figures.get(f["id"], f["ratio"]))
        for r in result["references"]:  # the lean eager step, the training run
            small = r["network"] == list(targets.SMALL_NETWORK)
            figures[f"small_{r['id']}" if small else r["id"]] = r["ratio"]
        return figures

    def track_exact_over_speed_of_light(self, figures):
        return figures["speed_of_light"]

    def track_sampled_step_over_sgd_step(self, figures):
        return figures["sampled_step"]

    def track_exact_step_over_exact_direction(self, figures):
        return figures["exact_step"]

    def track_small_sampled_step_over_sgd_step(self, figures):
        return figures["small_sampled_step"]

    def track_layerwise_over_full(self, figures):
        """The inverse of the figure (goal <= 0.02): asv reads every track as lower is
        better, and a slower layerwise direction lowers full / layerwise (found by a hunt:
        ``asv compare`` showed it as an improvement)."""
        return 1 / figures["full_vs_layerwise"]

    def track_sampled_step_over_lean_step(self, figures):
        return figures["step_over_lean"]

    def track_small_sampled_step_over_lean_step(self, figures):
        return figures["small_step_over_lean"]

    def track_training_step_over_sgd_step(self, figures):
        return figures["training_step"]

    def track_small_training_step_over_sgd_step(self, figures):
        return figures["small_training_step"]

    def track_lean_step_over_sgd_step(self, figures):
        return figures["lean_step"]

    def track_small_lean_step_over_sgd_step(self, figures):
        return figures["small_lean_step"]

    track_exact_over_speed_of_light.unit = "ratio"
    track_sampled_step_over_sgd_step.unit = "ratio"
    track_exact_step_over_exact_direction.unit = "ratio"
    track_small_sampled_step_over_sgd_step.unit = "ratio"
    track_layerwise_over_full.unit = "ratio"
    track_sampled_step_over_lean_step.unit = "ratio"
    track_small_sampled_step_over_lean_step.unit = "ratio"
    track_training_step_over_sgd_step.unit = "ratio"
    track_small_training_step_over_sgd_step.unit = "ratio"
    track_lean_step_over_sgd_step.unit = "ratio"
    track_small_lean_step_over_sgd_step.unit = "ratio"
