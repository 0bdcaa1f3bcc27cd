"""Claims against synthetic sweeps with a per-call overhead, rates that climb with size and
noise: pass where the algorithms behave as claimed, fail on planted violations, regime not
reached where the points do not reach the regime, not measured where nothing ran."""

import itertools
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from synthetic import AXES, BASE, RUNS, CacheEdge, Machine, make_sweep

from riemann_core import cli
from riemann_core.scaling import devices, fit, grow
from riemann_core.scaling import sweep as sw
from riemann_core.scaling import validate as va


def verdicts(claims):
    return {c.id: c.verdict for c in claims}


def by_id(claims, cid):
    (claim,) = [c for c in claims if c.id == cid]
    return claim


def full_fits_in_memory(method, kernel, point):
    return "skipped" if method == "full" and point["width"] > 128 else "ok"


#: overhead 1 ms + 0.1 ms per module, rates that climb until 1e7 FLOPs of a kind a module
REALISTIC = Machine(saturation=1e7)


def test_every_claim_passes_on_a_machine_with_overhead_and_climbing_rates():
    df, meta = make_sweep(REALISTIC, status_fn=full_fits_in_memory)
    claims = va.validate(df, meta, n_boot=300)
    expected = {c.id: "pass" for c in claims}
    # the plain gradient's and the default K-FAC's work at width 512 are still small
    # against the overhead
    expected["time-explained-euclidean"] = "regime not reached"
    expected["time-explained-kfac-default"] = "regime not reached"
    # and the plain gradient's depth line adds too little work to judge its curve by
    expected["linear-in-depth-euclidean"] = "regime not reached"
    assert verdicts(claims) == expected
    assert {c.id for c in claims} >= {
        "flops-match-model",
        "layerwise-generic-n",
        "layerwise-generic-d",
        "layerwise-structured-n",
        "layerwise-structured-d",
        "full-n",
        "kfac-w",
        "kfac-default-w",
        "linear-in-depth-layerwise",
        "linear-in-depth-kfac-default",
        "time-explained-layerwise",
        "time-explained-layerwise-generic",
        "crossover-width",
        "structured-vs-generic",
    }
    assert va.exit_code(claims) == 0
    assert (
        "width: 0 compute-bound points, overhead 45% at the top"
        in by_id(claims, "time-explained-euclidean").detail
    )
    n = by_id(claims, "layerwise-generic-n")
    assert n.measured == pytest.approx(1, abs=0.01) and "n_params 134154..530442" in n.detail
    assert by_id(claims, "flops-match-model").basis == "flops"
    assert by_id(claims, "time-explained-full").basis == "time"


def planted(method, kernel, seconds):
    """``REALISTIC`` with ``seconds(shape)`` of work the FLOPs do not see in one method."""
    return Machine(
        saturation=1e7,
        extra=lambda m, k, s: seconds(s) if (m, k) == (method, kernel) else 0.0,
    )


def test_work_the_flop_count_does_not_see_fails_the_time_claim():
    """... once the top segment was timed interleaved; points timed one after another
    cannot tell it from the machine's drift between them (too noisy)."""
    # an O(n^1.5) = O(w^3) step hidden in structured layerwise along width
    machine = planted("layerwise", "structured", lambda s: 2e-9 * s.widths[0] ** 3)
    df, meta = make_sweep(machine)
    claim = by_id(va.validate(df, meta, n_boot=300), "time-explained-layerwise")
    assert claim.verdict == "too noisy" and claim.low > 1 + va.TIME_BAND
    assert "along width, but its top two points were timed one after another" in claim.detail
    df["interleaved"] = "depth width batch"  # what a sweep's timing again records
    claims = va.validate(df, meta, n_boot=300)
    claim = by_id(claims, "time-explained-layerwise")
    assert claim.verdict == "fail" and claim.low > 1 + va.TIME_BAND
    assert "faster than the counted work along width over its top two segments." in claim.detail
    assert "over the top segment, timed interleaved" in claim.detail
    assert by_id(claims, "layerwise-structured-n").verdict == "pass"  # the FLOPs are right
    assert va.exit_code(claims) == 1


#: the plain gradient along a long batch axis at width 256 (its width axis overhead-bound)
EDGE_BASE = {"width": 256, "depth": 2, "out_dim": 10, "batch": 32}


def edge_sweep(machine, top):
    """The plain gradient's sweep with the batch axis up to ``top``, every top pair timed
    interleaved (as a sweep times them again), 7 repeats with 3% noise."""
    batches = tuple(32 * 2**k for k in range(int(math.log2(top // 32)) + 1))
    axes = {"width": (64, 128, 256, 512), "depth": (1, 2, 4, 8), "out_dim": (10,), "batch": batches}
    df, meta = make_sweep(
        machine, base=EDGE_BASE, axes=axes, runs=(("euclidean", "structured"),), repeats=7
    )
    df["interleaved"] = "depth width batch"
    return devices.named(df, meta), meta


#: an uncounted term in batch^2, twice the counted work's time at batch 2048
SQUARE_IN_BATCH = CacheEdge(drop=1.0, extra=lambda m, k, s: 2.4e-8 * s.batch**2)


def test_a_rate_that_drops_at_the_top_of_an_axis_is_no_fail_but_a_term_beyond_the_flops_is():
    """Found by a hunt: the GEMM rate 20% lower past a size reached only at batch 2048 (a
    cache edge), the time exactly the counted FLOPs, failed time-explained-euclidean, 1.355
    [1.266, 1.410], judged on the top segment alone (one more doubling: a pass). A rate
    change bends the one segment across it, work the FLOP count misses every segment past
    its onset: a fail needs the segment below the top one above the band too."""
    claim = by_id(
        va.validate(*edge_sweep(CacheEdge(), 2048), n_boot=300), "time-explained-euclidean"
    )
    assert claim.verdict == "too noisy" and claim.low > 1 + va.TIME_BAND
    assert (
        "the top segment alone grows faster than its work, the one below does not: a rate "
        "change (cache edge) reads so; grow the axis one more step to judge"
    ) in claim.detail
    assert re.search(r"over the top segment \(the segment below: work\^0\.9", claim.detail)
    claim = by_id(
        va.validate(*edge_sweep(CacheEdge(), 4096), n_boot=300), "time-explained-euclidean"
    )
    assert claim.verdict == "pass"
    # an uncounted batch^2 term grows faster than the work in both segments: a fail
    claims = va.validate(*edge_sweep(SQUARE_IN_BATCH, 2048), n_boot=300)
    claim = by_id(claims, "time-explained-euclidean")
    assert claim.verdict == "fail" and claim.low > 1 + va.TIME_BAND
    assert "along batch over its top two segments" in claim.detail
    assert va.exit_code(claims) == 1
    # with only two compute-bound points there is no segment below to tell them apart by,
    # but a time growing x1.68 as fast as its work is more than a rate drop (EDGE_DROP)
    for machine, verdict in ((CacheEdge(), "too noisy"), (SQUARE_IN_BATCH, "fail")):
        df, meta = edge_sweep(machine, 2048)
        df = df[(df["batch"] >= 1024) | (df["batch"] == 32)]
        meta["axes"]["batch"] = [32, 1024, 2048]
        claim = by_id(va.validate(df, meta, n_boot=300), "time-explained-euclidean")
        assert claim.verdict == verdict, claim.detail
        assert "(no segment below it adding x1.5 work or more)" in claim.detail
    assert "no segment below its top one adds x1.5" not in claim.detail
    assert "over its top segment, x1.68 the work's growth, beyond the x1.5" in claim.detail


#: uncounted work in batch^3 whose onset is at the top of the axis: twice the counted work's
#: time at batch 2048, a quarter of it at 1024
CUBE_AT_TOP = Machine(extra=lambda m, k, s: 2 * 0.016 * (s.batch / 2048) ** 3)


def test_a_top_segment_faster_than_a_cache_edge_explains_fails_without_the_segment_below():
    """Found by review: work the FLOP count misses whose onset is at the top segment, on an
    axis its cap ends there, read too noisy (the segment below within the band), its time
    growing x1.7 as fast as its work over a doubling; a 20% rate drop explains x1.25. So did
    time ~ work^1.96 over a width axis whose cap left no segment below it."""
    claims = va.validate(*edge_sweep(CUBE_AT_TOP, 2048), n_boot=300)
    claim = by_id(claims, "time-explained-euclidean")
    assert claim.verdict == "fail" and claim.low > 1 + va.TIME_BAND, claim.detail
    assert re.search(r"\(the segment below: work\^1\.[0-2]", claim.detail)
    assert re.search(
        r"along batch over its top segment, x1\.[6-8]\d* the work's growth, beyond the x1\.5 "
        r"a rate that drops past a cache edge explains\.",
        claim.detail,
    )
    assert va.exit_code(claims) == 1
    regime = fit.AxisRegime(2, 0.0, 4.0, fit.SlopeFit(1.96, 1.93, 1.98, 2, (1.0, 4.0)))
    assert regime.state == "faster" and not regime.top_alone  # no segment below needed


def test_growth_takes_one_more_step_where_the_top_segment_alone_grows_faster():
    """Found by a hunt: a top segment faster than its work was "reached", so a sweep's grid
    ended on a cache edge and its claim failed. Growth doubles the axis once more; where the
    cap stops it, the claim reads too noisy and says so. Two segments faster: reached."""
    df, meta = edge_sweep(CacheEdge(), 2048)
    rows = df.to_dict("records")
    grid = sw.Grid(
        base=EDGE_BASE,
        axes=meta["axes"],
        methods=("euclidean",),
        kernels=("structured",),
        grow={"batch": 4096},
    )
    plan = grow.plan(rows, grid, elapsed=0.0)
    decision = plan.decisions["euclidean/structured/batch"]
    assert decision.startswith("growing to batch=4096: batch: time ~ work^1.3")
    assert "the top segment alone grows faster than its work" in decision
    assert [r["batch"] for r in plan.runs] == [4096]
    capped = sw.Grid(**{**grid.__dict__, "grow": {"batch": 2048}})
    meta["growth"] = grow.plan(rows, capped, elapsed=0.0).decisions
    assert meta["growth"]["euclidean/structured/batch"].startswith("stopped at the cap batch=2048")
    claim = by_id(va.validate(df, meta, n_boot=300), "time-explained-euclidean")
    assert claim.verdict == "too noisy" and "(growth stopped at the cap batch=2048" in claim.detail
    df, _ = edge_sweep(SQUARE_IN_BATCH, 2048)
    plan = grow.plan(df.to_dict("records"), grid, elapsed=0.0)
    assert plan.decisions["euclidean/structured/batch"].startswith("reached: batch: time ~ work^1.")
    assert plan.runs == []


def test_a_flat_axis_whose_time_outgrows_its_work_withholds_the_pass():
    """Found by a hunt: K-FAC with uncounted work in batch^2, over half its time at the
    top, passed on width alone, while along batch the time grew x2.29 over a top segment
    whose modelled work grew x1.4: an axis adding under x1.5 the work is not judged. Its
    time less overhead growing over RATE_HEADROOM times as fast as the work withholds the
    pass (too noisy: a flat axis adds little work, the excess may be overhead)."""
    for c, verdict in ((0.0, "pass"), (3e-7, "too noisy")):
        machine = Machine(saturation=1e7, extra=lambda m, k, s, c=c: c * s.batch**2)
        df, meta = make_sweep(machine, runs=(("kfac", "structured"),), repeats=7)
        df["interleaved"] = "depth width batch"
        claim = by_id(va.validate(df, meta, n_boot=300), "time-explained-kfac")
        assert claim.verdict == verdict, claim.detail
        assert re.search(
            r"batch: 3 compute-bound points, .*, work x1\.[24] over the top", claim.detail
        )
    assert re.search(
        r"^Along batch, an axis not judged \(its top segment adds x1\.4 work, under x1\.5\), "
        r"the time less overhead grows x1\.7\d \[1\.6\d, 1\.[78]\d\] as fast as the work, "
        r"beyond the x1\.25",
        claim.detail,
    )
    assert claim.basis == "interleaved time"


def test_a_counted_super_linear_step_fails_the_flop_claims():
    # an extra n_a x n_a Cholesky in structured layerwise: O(n^3) counted FLOPs
    def extra_cholesky(method, kernel, shape, kinds):
        if (method, kernel) == ("layerwise", "structured"):
            kinds = {**kinds, "cholesky": kinds["cholesky"] + max(shape.block_params()) ** 3 / 3}
        return kinds

    claims = va.validate(*make_sweep(REALISTIC, counted=extra_cholesky), n_boot=300)
    assert by_id(claims, "layerwise-structured-n").verdict == "fail"
    assert by_id(claims, "layerwise-structured-n").measured > 2.5
    match = by_id(claims, "flops-match-model")
    # the constant n_a^3 flattens the counted growth along batch most (model: N^3 d^3 term)
    assert match.verdict == "fail" and "layerwise (structured) along" in match.detail


def test_a_depth_quadratic_in_time_fails_linear_in_depth():
    """... once the line was timed interleaved; depths timed one after another cannot tell
    it from the machine's drift between them (too noisy), as a top pair cannot."""
    machine = planted("natural", "structured", lambda s: 1e-4 * len(s.layers) ** 2)
    claim = by_id(va.validate(*make_sweep(machine), n_boot=300), "linear-in-depth-natural")
    assert claim.verdict == "too noisy" and claim.low > va.DEPTH_TOLERANCE
    assert claim.basis == "time"
    assert "the depths timed one after another" in claim.detail
    assert "timed one after another, not interleaved" in claim.detail
    df, meta = make_sweep(machine)
    df["interleaved"] = "depth"  # what a sweep's interleaved timing of the lines records
    claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
    assert "the depths timed interleaved" in claim.detail and claim.verdict == "fail"
    assert claim.basis == "interleaved time"
    # the time an added layer costs grows by the planted term's 1e-4 (L_a + L_b) s
    found = re.findall(r"([\d.]+) ms \(L = (\d+)-(\d+)\)", claim.detail)
    (first, a, b), (last, c, d) = [(float(t), int(x), int(y)) for t, x, y in found]
    assert last - first == pytest.approx(0.1 * (c + d - a - b), rel=0.05)


def test_a_linear_depth_line_timed_one_after_another_does_not_fail_on_drift():
    """Found by a hunt: a line linear in L whose deepest point (an end of the line, which
    no outlier check flags) was timed in a spell of the machine 20% slower failed at 31%
    [24%, 38%] where its depths were timed one after another (a sweep stopped before it
    timed its lines again, or a group whose timing again failed): the interval holds each
    point's repeats, not the drift between points minutes apart. Too noisy, as a top pair
    timed so is for time-explained."""
    df, meta = make_sweep(Machine(), runs=(("layerwise", "structured"),), repeats=7)
    line = (df["width"] == BASE["width"]) & (df["batch"] == BASE["batch"])
    deepest = line & (df["out_dim"] == BASE["out_dim"]) & (df["depth"] == df["depth"].max())
    df.loc[deepest, "times_s"] = df.loc[deepest, "times_s"].map(
        lambda t: json.dumps([1.2 * x for x in json.loads(t)])
    )
    df.loc[deepest, "time_median_s"] *= 1.2
    claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-layerwise")
    assert claim.verdict == "too noisy" and claim.low > va.DEPTH_TOLERANCE, claim.detail
    assert "timed one after another, not interleaved" in claim.detail
    assert va.exit_code([claim]) == 0


def test_a_depth_line_timed_in_two_stretches_is_judged_in_each():
    """A line passes or fails only where both stretches of its timing do: a stretch whose
    deep points a state of the machine slowed, as a CPU sweep failed euclidean's line at
    0.255 [0.162, 0.384] that two sweeps minutes later passed at 0.05, is too noisy."""
    machine = Machine()  # linear in depth

    def with_stretches(curved):  # per stretch: linear, or bent up (True) or down ("down")
        df, meta = make_sweep(machine, repeats=7)
        line = (df["method"] == "natural") & (df["width"] == BASE["width"])
        line &= (df["out_dim"] == BASE["out_dim"]) & (df["batch"] == BASE["batch"])
        assert line.sum() == len(AXES["depth"])
        for i in df.index[line]:
            times = json.loads(df.at[i, "times_s"])
            L = df.at[i, "depth"] + 1
            median = float(np.median(times))  # down: a concave 1 + 3 sqrt(L), same noise
            bent = {True: 1 + 0.05 * L * L, "down": 1e-3 * (1 + 3 * L**0.5) / median, False: 1}
            both = [[t * bent[c] for t in times] for c in curved]
            df.at[i, "times_s"] = json.dumps(both[0] + both[1])
            df.at[i, "time_median_s"] = float(np.median(both[0] + both[1]))
        df.loc[line, "interleaved"] = "depth"
        df["stretches"] = np.where(line, 2, np.nan)  # as read_sweep reads the column
        return by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")

    claim = with_stretches((False, False))
    assert claim.verdict == "pass" and "in its 2 stretches of time" in claim.detail
    claim = with_stretches((False, True))
    assert claim.verdict == "too noisy" and "the stretches disagree (pass, fail)" in claim.detail
    shares = re.findall(r"(-?\d+)% \[", claim.detail.split("stretches of time")[1])
    assert abs(int(shares[0])) < 15 and int(shares[1]) > 50  # each stretch's own figure
    claim = with_stretches((True, True))
    assert claim.verdict == "fail" and "beyond noise in each stretch" in claim.detail
    claim = with_stretches((True, "down"))  # found by review: two fails, up and down, agreed
    assert claim.verdict == "too noisy" and "the stretches disagree (fail, fail)" in claim.detail


def test_stretch_times_split_each_rows_times_only_where_every_row_has_as_many():
    rows = pd.DataFrame({"time_median_s": [2.5, 6.5], "times_s": ["[1, 2, 3, 4]", "[5, 6, 7, 8]"]})
    assert [[s.tolist() for s in part] for part in fit.stretch_times(rows)] == [
        [[1, 2, 3, 4], [5, 6, 7, 8]]
    ]  # no column: one stretch
    rows["stretches"] = [2, 2]
    assert [[s.tolist() for s in part] for part in fit.stretch_times(rows)] == [
        [[1, 2], [5, 6]],
        [[3, 4], [7, 8]],
    ]
    rows["stretches"] = [2, np.nan]  # a row timed otherwise: the times are not split
    assert len(fit.stretch_times(rows)) == 1


def test_flops_that_are_not_affine_in_depth_fail_linear_in_depth():
    def quadratic(method, kernel, shape, kinds):
        extra = 1e6 * len(shape.layers) ** 2 if method == "kfac" else 0
        return {**kinds, "products": kinds["products"] + extra}

    claim = by_id(va.validate(*make_sweep(counted=quadratic), n_boot=300), "linear-in-depth-kfac")
    assert claim.verdict == "fail" and "deviate" in claim.detail and claim.basis == "flops"


def test_counts_rounded_to_integers_stay_affine_in_depth():
    """Found by a hunt: FlopCounterMode counts integers (a Cholesky batched over the blocks
    loses the fraction of its n^3 / 3), and on a small base point, 3-12k FLOPs, that failed
    the line at 7e-5. A planted L^2 FLOPs still fails (found by review: a slack per layer
    let it pass)."""

    def small(planted):
        def counted(method, kernel, shape, kinds):
            kinds = {kind: flops / 3000 for kind, flops in kinds.items()}
            cholesky = math.floor(kinds["cholesky"]) + planted * len(shape.layers) ** 2
            return {**kinds, "cholesky": cholesky}

        return counted

    for planted, verdicts in ((0, ("pass", "too noisy", "regime not reached")), (1, ("fail",))):
        df, meta = make_sweep(counted=small(planted))
        layerwise = df[(df["method"] == "layerwise") & (df["kernel"] == "structured")]
        assert layerwise["flops"].min() < 1e5  # (the deviations then reach 1e-5)
        claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-layerwise")
        assert claim.verdict in verdicts
        assert ("FLOPs affine in L" in claim.detail) == (planted == 0)


def test_rates_that_never_stop_climbing_do_not_reach_the_regime():
    claims = va.validate(*make_sweep(Machine(saturation=1e13)), n_boot=300)
    claim = by_id(claims, "time-explained-layerwise")
    assert claim.verdict == "regime not reached" and "still climb" in claim.detail
    assert claim.measured < 1 - va.TIME_BAND
    assert va.exit_code(claims) == 0


@pytest.mark.parametrize("interval", [(0.63, 1.02), (math.nan, math.nan)], ids=["wide", "none"])
def test_an_exponent_below_the_band_whose_interval_reaches_it_is_too_noisy(monkeypatch, interval):
    """Found by a hunt: an exponent below the band was read as the device's rates still
    climbing whatever its interval, so noise (one top point slow in 11 of 21 repeats) or a
    top pair timed once was reported as a finding about the device; as above the band,
    the interval decides."""
    regime = fit.axis_regime

    def below_along_batch(rows, model, **options):
        found = regime(rows, model, **options)
        if rows["batch"].nunique() > 1 and found.exponent is not None:
            slope = fit.SlopeFit(0.64, *interval, found.exponent.points, found.exponent.x_range)
            found = fit.AxisRegime(
                found.compute_bound, found.overhead_at_top, found.work_ratio, slope
            )
        return found

    monkeypatch.setattr(fit, "axis_regime", below_along_batch)
    claim = by_id(va.validate(*make_sweep(), n_boot=300), "time-explained-layerwise")
    assert claim.verdict == "too noisy" and "along batch lies below the band" in claim.detail
    assert ("not measured" in claim.detail) == math.isnan(interval[0])


def test_overhead_that_dominates_every_point_does_not_reach_the_regime():
    claims = va.validate(*make_sweep(Machine(t0=100.0)), n_boot=300)
    claim = by_id(claims, "time-explained-layerwise")
    assert claim.verdict == "regime not reached"
    assert "width: 0 compute-bound points, overhead" in claim.detail
    assert claim.measured > 0.2  # the smallest overhead fraction at the top of an axis
    assert by_id(claims, "structured-vs-generic").verdict == "regime not reached"
    assert by_id(claims, "full-n").verdict == "pass"  # counted FLOPs do not care


def test_claims_on_time_on_an_unsteady_machine_are_too_noisy():
    """... unless the points that decide them were timed in the same interleaved rounds."""
    machine = planted("layerwise", "structured", lambda s: 2e-9 * s.widths[0] ** 3)
    df, meta = make_sweep(machine, rate_spread=0.5)
    claims = va.validate(df, meta, n_boot=300)
    claim = by_id(claims, "linear-in-depth-layerwise")
    assert claim.verdict == "too noisy" and "would be 'pass'" in claim.detail
    assert "rates moved during the sweep" in claim.detail
    assert {c.verdict for c in claims if c.basis == "time"} == {"too noisy"}
    assert {c.verdict for c in claims if c.basis == "flops"} == {"pass"}
    assert va.exit_code(claims) == 0
    df["interleaved"] = "depth width batch"  # every line and top pair timed interleaved
    claims = va.validate(df, meta, n_boot=300)
    depth = by_id(claims, "linear-in-depth-layerwise")  # a pass on interleaved points stands
    assert depth.verdict == "pass" and depth.basis == "interleaved time"
    assert "but the points that decide this pass were timed in the same" in depth.detail
    claim = by_id(claims, "time-explained-layerwise")  # a fail under load is unproven
    assert claim.verdict == "too noisy" and claim.basis == "interleaved time"
    assert "would be 'fail'" in claim.detail
    # crossover-width and structured-vs-generic compare points timed one after another
    assert {c.verdict for c in claims if c.basis == "time"} == {"too noisy"}
    assert va.exit_code(claims) == 0


def test_too_few_points_stays_regime_not_reached_on_an_unsteady_machine():
    """A claim that no figure decided (two depths where a line needs three) is not
    relabelled too noisy with "rerun on a quiet machine" when the rates moved (found by
    review: noise decided nothing there, and the advice was wrong)."""
    machine = planted("layerwise", "structured", lambda s: 2e-9 * s.widths[0] ** 3)
    df, meta = make_sweep(machine, rate_spread=0.5)
    deep = (df["method"] == "kfac") & (df["depth"] > 2)  # depths 1 and 2 left
    claims = va.validate(df[~deep], meta, n_boot=300)
    claim = by_id(claims, "linear-in-depth-kfac")
    assert claim.verdict == "regime not reached" and claim.measured is None
    assert "a line needs 3" in claim.detail and "quiet machine" not in claim.detail
    assert by_id(claims, "linear-in-depth-layerwise").verdict == "too noisy"


def test_rates_measured_once_leave_the_claims_on_time_too_noisy():
    """A sweep stopped after its first measurement of the rates: its spread is not known
    (found by review: read as 0, "the rates held steady", and passes stood)."""
    machine = planted("layerwise", "structured", lambda s: 2e-9 * s.widths[0] ** 3)
    df, meta = make_sweep(machine, rate_spread=0.0)
    meta["device_rates"] = meta["device_rates"][:1]
    assert all(math.isnan(v) for v in fit.rate_spread(meta).values())
    claims = va.validate(df, meta, n_boot=300)
    claim = by_id(claims, "linear-in-depth-layerwise")
    assert claim.verdict == "too noisy" and "would be 'pass'" in claim.detail
    assert "measured once" in claim.detail and "resume the sweep" in claim.detail
    assert {c.verdict for c in claims if c.basis == "flops"} == {"pass"}


def _judged_unsteady(steady, loaded, said):
    """Whether the claims ``loaded`` are ``steady``'s judged as on an unsteady machine
    (the reason ``said``, its first letter capitalised or not): every claim on time that a
    figure decided too noisy, its would-be verdict in the detail, but a pass on
    interleaved points, which stands."""
    for before, after in zip(steady, loaded, strict=True):
        decided = before.verdict in ("pass", "fail", "regime not reached")
        if before.basis == "flops" or not decided or before.measured is None:
            assert after == before
        elif before.basis == "interleaved time" and before.verdict == "pass":
            assert after.verdict == "pass" and said[1:] in after.detail, after.detail
        else:
            assert after.verdict == "too noisy", after.detail
            assert f"would be '{before.verdict}'" in after.detail and said in after.detail
    return True


def test_a_sweep_many_of_whose_points_spread_is_judged_as_on_an_unsteady_machine():
    """Found by a hunt: under outside load a quick sweep flagged 16-87 of its 155 points
    ``spread`` (a quiet one: 1) while its rate readings moved only 10-13%, and validate
    judged the machine steady. Past LOADED_SHARE of the ok points flagged spread (or
    stretches), every claim on time is judged as where the rates moved; at the share, or
    on one point, nothing changes. The points flagged here decide no claim (out_dim)."""
    machine = planted("layerwise", "structured", lambda s: 2e-9 * s.widths[0] ** 3)
    df, meta = make_sweep(machine)
    df["interleaved"] = "depth width batch"  # a fail and passes on interleaved points
    steady = va.validate(df, meta, n_boot=300)
    assert va.unsteady_reasons(df, meta) == []
    ok = df.index[df["status"] == "ok"]
    off_claims = ok[df.loc[ok, "out_dim"] != BASE["out_dim"]]
    at_share = int(va.LOADED_SHARE * len(ok))
    df.loc[off_claims[:at_share], "flag"] = "spread"
    assert va.validate(df, meta, n_boot=300) == steady
    df.loc[off_claims[: at_share + 1], "flag"] = "spread"
    loaded = va.validate(df, meta, n_boot=300)
    said = f"{at_share + 1} of the sweep's {len(ok)} ok points"
    assert _judged_unsteady(steady, loaded, said)
    claim = by_id(loaded, "time-explained-layerwise")
    assert claim.verdict == "too noisy" and "flagged spread, loaded or stretches" in claim.detail
    assert claim.detail.endswith("rerun on a quiet machine.")
    assert va.exit_code(loaded) == 0
    # stretches of time that disagree say the same; one point alone is that point's own
    df["flag"] = ""
    df.loc[off_claims[: at_share + 1], "flag"] = "stretches"
    assert va.points_flagged_for_load(df) is not None
    df["flag"] = ""
    df.loc[off_claims[:1], "flag"] = "spread"
    assert va.points_flagged_for_load(df.iloc[:10]) is None


def test_a_sweep_many_of_whose_points_read_loaded_is_judged_as_on_an_unsteady_machine():
    """Points timed twice while other processes kept busy more CPUs than they left free
    (``loaded``, alone or beside ``outlier``) count as those that spread: past
    LOADED_SHARE of the ok points, every claim on time is judged as on an unsteady machine;
    at the share, nothing changes."""
    machine = planted("layerwise", "structured", lambda s: 2e-9 * s.widths[0] ** 3)
    df, meta = make_sweep(machine)
    steady = va.validate(df, meta, n_boot=300)
    ok = df.index[df["status"] == "ok"]
    off_claims = ok[df.loc[ok, "out_dim"] != BASE["out_dim"]]
    at_share = int(va.LOADED_SHARE * len(ok))
    df.loc[off_claims[:at_share], "flag"] = "loaded"
    assert va.unsteady_reasons(df, meta) == []
    df.loc[off_claims[at_share], "flag"] = "outlier loaded"
    (sign,) = va.unsteady_reasons(df, meta)
    assert sign.why.startswith(f"{at_share + 1} of the sweep's {len(ok)} ok points")
    loaded = va.validate(df, meta, n_boot=300)
    assert _judged_unsteady(steady, loaded, f"{at_share + 1} of the sweep's {len(ok)} ok")


def test_a_line_timed_again_under_one_loaded_reading_counts_once_for_the_machine():
    """Found by review: the points of a group of lines timed again are flagged ``loaded``
    by one reading around the group's rounds (sweep.time_lines), all of them at once: on
    the committed CPU sweep a depth line is 10 of its 213 ok points, so one loaded reading
    and one more loaded point made every claim on time too noisy, where LOADED_SHARE was
    set on points flagged each by its own timing. The group counts once; loaded points
    timed alone count each; so many loaded groups still make the machine unsteady."""
    machine = planted("layerwise", "structured", lambda s: 2e-9 * s.widths[0] ** 3)
    df, meta = make_sweep(machine)
    ok = df.index[df["status"] == "ok"]
    at_share = int(va.LOADED_SHARE * len(ok))
    line = (df["method"] == "natural") & (df["width"] == BASE["width"])
    line &= (df["out_dim"] == BASE["out_dim"]) & (df["batch"] == BASE["batch"])
    df.loc[line, "interleaved"] = "depth"
    df.loc[line, "flag"] = "loaded"  # one reading around the line's rounds
    alone = ok[(df.loc[ok, "out_dim"] != BASE["out_dim"]).to_numpy()][: at_share + 1 - line.sum()]
    df.loc[alone, "flag"] = "loaded"
    assert line.sum() + len(alone) == at_share + 1  # past the share, point by point
    assert va.unsteady_reasons(df, meta) == []  # the line once: 1 + len(alone)
    more = ok[(df.loc[ok, "out_dim"] != BASE["out_dim"]).to_numpy()][:at_share]
    df.loc[more, "flag"] = "loaded"  # at_share points alone, and the line: past it
    (sign,) = va.unsteady_reasons(df, meta)
    assert sign.why.startswith(f"{at_share + 1} of the sweep's {len(ok)} ok points")
    assert "a group of lines timed again under one reading once" in sign.why


def test_claims_on_time_while_other_processes_kept_the_cpus_busy_are_too_noisy():
    """Found by a hunt: a process spinning on one of two cores for a whole sweep lowered
    every reading of the GEMM alike (110-141 GFLOP/s against 205-220 quiet, 3-17% apart),
    so nothing noticed, and time-explained-kfac read 1.36 [1.30, 4.22] (quiet: 1.03-1.06).
    Where other processes kept busy more CPUs than the sweep's points left free (by over
    OUTSIDE_SLACK), while the rates were measured, every claim on time is judged as on an
    unsteady machine; not where the points left a CPU free for them, nor on a GPU, nor
    where the load was not read (a sweep written before)."""
    from riemann_core.scaling import report

    machine = planted("layerwise", "structured", lambda s: 2e-9 * s.widths[0] ** 3)
    df, meta = make_sweep(machine)
    df["interleaved"] = "depth width batch"
    steady = va.validate(df, meta, n_boot=300)
    meta["environment"] = {"device_name": "synthetic", "device": "cpu", "threads": 2}
    for session in meta["device_rates"]:
        session.update(outside_cores=0.05, cpus_read=2)
    assert va.validate(df, meta, n_boot=300) == steady  # a quiet machine's reading
    meta["device_rates"][1]["outside_cores"] = 0.7  # a spinner beside 2 threads on 2 CPUs
    loaded = va.validate(df, meta, n_boot=300)
    said = "other processes kept 0.7 of the 2 CPUs busy while the device's rates were measured"
    assert _judged_unsteady(steady, loaded, said)
    assert "measured after the grid, where the sweep's points ran 2 threads and left 0 free" in (
        by_id(loaded, "time-explained-layerwise").detail
    )
    assert "held steady, but **the machine was loaded during the sweep**: other processes kept" in (
        "\n".join(report._rates_section(meta, df))
    )
    for environment in ({"threads": 1}, {"device": "cuda:0"}):  # a CPU left free; a GPU
        judged = {**meta, "environment": {**meta["environment"], **environment}}
        assert va.validate(df, judged, n_boot=300) == steady
    for session in meta["device_rates"]:
        del session["outside_cores"], session["cpus_read"]
    assert va.validate(df, meta, n_boot=300) == steady


def _load_meta(threads, cpus, cores, outside):
    """A CPU sweep's record whose points ran ``threads`` threads, read ``outside`` CPUs
    busy by other processes of ``cpus`` (``cores`` physical cores; not recorded: None)
    after the grid, a quiet 0.02 before and after."""
    sessions = []
    for when, busy in (("start", 0.02), ("grid", outside), ("end", 0.02)):
        session = {"when": when, "dtype": "float32", "products": [1e11], "cholesky": [1e10]}
        session.update(outside_cores=busy, cpus_read=cpus)
        if cores is not None:
            session["cores_read"] = cores
        sessions.append(session)
    environment = {"device_name": "synthetic", "device": "cpu", "threads": threads}
    return {"device_rates": sessions, "environment": environment}


def test_a_hyperthread_beside_a_core_the_points_run_on_is_not_free():
    """Found by review: the points run a thread per physical core (worker_threads, torch's
    default), and on a host with two hyperthreads per core the CPUs read less the threads
    counted the hyperthreads beside them free, so a process keeping one CPU busy beside 2
    threads on 2 cores (4 CPUs) read as no load. The CPUs free are those of the cores the
    points leave unused."""
    assert va.cpus_taken_by_others(_load_meta(2, 4, 2, 1.0)) is not None
    sign = va.cpus_taken_by_others(_load_meta(2, 4, 2, 1.0))
    assert "kept 1 of the 4 CPUs (2 cores) busy" in sign.why and "left 0 free" in sign.why
    assert va.cpus_taken_by_others(_load_meta(1, 4, 2, 1.0)) is None  # a core left free
    assert va.cpus_taken_by_others(_load_meta(2, 4, 4, 1.0)) is None  # no hyperthreads
    assert va.cpus_taken_by_others(_load_meta(2, 4, None, 1.0)) is None  # written before


def test_the_slack_for_other_processes_grows_with_the_cores_the_points_use():
    """Found by review: OUTSIDE_SLACK, a quarter of a CPU, is an eighth of the speed of
    points on 2 cores (its own rationale) but 0.4% of points on 64, where the sweep's own
    client and the system's daemons, or the ticks' rounding over 64 busy CPUs, come near
    it on a quiet machine. An eighth of the cores the points use, a quarter at least."""
    assert va.cpus_taken_by_others(_load_meta(2, 2, 2, 0.3)) is not None
    assert va.cpus_taken_by_others(_load_meta(64, 64, 64, 1.0)) is None
    assert va.cpus_taken_by_others(_load_meta(64, 64, 64, 8.5)) is not None
    assert va.cpus_taken_by_others(_load_meta(0, 2, 2, 0.3)) is not None  # no threads: all


def test_a_reading_of_the_rates_is_taken_less_what_its_counters_rounding_may_add():
    """The session check and the points' share one rule (measure.load.is_loaded): a
    reading past the slack by less than its rounding is not taken for a load."""
    meta = _load_meta(2, 2, 2, 0.3)
    assert va.cpus_taken_by_others(meta) is not None
    for session in meta["device_rates"]:
        session["rounding_cores"] = 0.1
    assert va.cpus_taken_by_others(meta) is None


def test_the_share_of_points_flagged_for_load_is_said_past_the_share_it_is_held_to():
    """Found by review: 8 of a quick sweep's 157 points flagged read "(5%) ... where a
    quiet machine flags under 5%", a share at the limit said to be past it."""
    df = pd.DataFrame({"status": ["ok"] * 157, "flag": ["spread"] * 8 + [""] * 149})
    df["times_s"], df["time_median_s"] = "[]", 1.0
    sign = va.points_flagged_for_load(df)
    assert sign is not None and "8 of the sweep's 157 ok points (5.1%)" in sign.why


def test_an_exponent_in_the_band_passes_only_with_an_interval_near_it():
    """Repeats that spread by half their median: an exponent in the band whose interval
    reaches below 0.5 or above the band is too noisy, not a pass."""
    df, meta = make_sweep(REALISTIC, noise=0.5, status_fn=full_fits_in_memory)
    df["interleaved"] = "depth width batch"
    explained = [c for c in va.validate(df, meta, n_boot=300) if c.id.startswith("time-exp")]
    band = 1 - va.TIME_BAND, 1 + va.TIME_BAND
    judged = [c for c in explained if c.low is not None and band[0] <= c.measured <= band[1]]
    reach = 1 - va.STABLE_REACH, 1 + va.TIME_BAND
    for claim in judged:
        within = reach[0] <= claim.low and claim.high <= reach[1]
        assert (claim.verdict == "pass") == within, claim.detail
        if not within:
            assert "lies in the band, but its interval reaches beyond [0.5, 1.25]" in claim.detail
    assert {c.verdict for c in judged} == {"pass", "too noisy"}


def test_rates_in_another_dtype_do_not_make_the_claims_noisy():
    df, meta = make_sweep(REALISTIC, status_fn=full_fits_in_memory)
    for measured in list(meta["device_rates"]):
        halved = {k: [r / 2 for r in v] for k, v in measured.items() if k not in ("when", "dtype")}
        meta["device_rates"].append({"when": measured["when"], "dtype": "float64", **halved})
    claims = va.validate(df, meta, n_boot=300)  # the rows are float32
    assert "too noisy" not in {c.verdict for c in claims if c.basis == "time"}


def test_flop_claims_below_their_regime_say_where_the_model_reaches_it():
    # batches 2..8 at width 64: forward and pullback, linear in d, still dominate
    axes = {**AXES, "batch": (2, 4, 8)}
    base = {"width": 64, "depth": 2, "out_dim": 10, "batch": 4}
    claims = va.validate(*make_sweep(base=base, axes=axes), n_boot=300)
    claim = by_id(claims, "layerwise-structured-d")
    assert claim.verdict == "regime not reached"
    assert "the model's exponent enters the band at batch=" in claim.detail


def test_a_base_width_too_small_for_the_woodbury_range_does_not_reach_the_regime():
    axes = {**AXES, "width": (4, 8), "batch": (1, 2)}
    base = {"width": 4, "depth": 1, "out_dim": 3, "batch": 2}
    claim = by_id(va.validate(*make_sweep(base=base, axes=axes), n_boot=300), "layerwise-generic-d")
    assert claim.verdict == "regime not reached" and "larger base width" in claim.detail


def test_the_kfac_claim_judges_only_widths_where_its_factors_are_dense():
    # batch 2, out_dim 10: d = 20 rows; past width 20 both factors are kept as rows and the
    # work grows like N^2 w + N w^2, below the claimed band
    base = {"width": 16, "depth": 2, "out_dim": 10, "batch": 2}
    axes = {**AXES, "width": (8, 16, 64, 128)}
    claim = by_id(va.validate(*make_sweep(base=base, axes=axes), n_boot=100), "kfac-w")
    assert claim.verdict == "pass" and "width 8..16" in claim.detail
    narrow = {**axes, "width": (32, 64, 128)}
    claim = by_id(va.validate(*make_sweep(base=base, axes=narrow), n_boot=100), "kfac-w")
    assert claim.verdict == "regime not reached" and "keeps its factors as rows" in claim.detail


def test_counts_of_calls_that_took_a_slow_path_are_left_out_of_the_flop_claims():
    df, meta = make_sweep()
    top = (df["method"] == "natural") & (df["width"] == df["width"].max())
    df.loc[top, "flops"] *= 1.4  # a float64 residual's work at the widest point
    assert by_id(va.validate(df, meta, n_boot=50), "flops-match-model").verdict == "fail"
    df.loc[top, "slow_paths"] = "refine residual"
    claim = by_id(va.validate(df, meta, n_boot=50), "flops-match-model")
    assert claim.verdict == "pass"
    assert "Left out: 1 point whose" in claim.detail and "refine residual" in claim.detail
    assert "1.4..1.4x the model" in claim.detail


def test_times_of_calls_that_took_a_slow_path_are_left_out_of_the_time_claims():
    df, meta = make_sweep(REALISTIC, status_fn=full_fits_in_memory)
    deepest = (df["method"] == "natural") & (df["depth"] == df["depth"].max())
    df.loc[deepest, "time_median_s"] *= 3  # a float64 residual at the deepest point
    df.loc[deepest, "times_s"] = df.loc[deepest, "times_s"].map(
        lambda times: json.dumps([3 * t for t in json.loads(times)])
    )
    assert by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural").verdict != "pass"
    df.loc[deepest, "slow_paths"] = "residual"
    claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
    assert claim.verdict == "pass" and f"L = 2..{df['depth'].max() + 1}" not in claim.detail


def test_claims_of_methods_not_swept_are_not_measured():
    runs = [r for r in RUNS if r[0] != "full"]
    claims = va.validate(*make_sweep(REALISTIC, runs=runs), n_boot=200)
    for cid in ("full-n", "time-explained-full", "crossover-width"):
        assert by_id(claims, cid).verdict == "not measured"
        assert "did not run full" in by_id(claims, cid).detail
    assert by_id(claims, "layerwise-generic-n").verdict == "pass"


def test_an_empty_sweep_is_not_measured_everywhere():
    df, meta = make_sweep()
    claims = va.validate(df.iloc[:0], meta)
    assert set(verdicts(claims).values()) == {"not measured"}
    assert all(c.detail for c in claims)


def test_budget_stopped_axes_do_not_reach_the_regime():
    def only_base(method, kernel, point):
        return "skipped" if method == "kfac" and point["width"] != 64 else "ok"

    claim = by_id(va.validate(*make_sweep(status_fn=only_base), n_boot=200), "kfac-w")
    assert claim.verdict == "regime not reached" and "budgets" in claim.detail


def test_crossover_is_where_layerwise_starts_winning_for_good():
    # full beats structured layerwise up to width 32; layerwise wins from 64 on
    def seconds(method, kernel, shape):
        w = shape.widths[0]
        return 1e-6 * w * w if method == "full" else 1e-4 * w

    machine = Machine(t0=0.0, t_module=0.0, rates={"products": 1e30, "cholesky": 1e30})
    machine.extra = seconds
    df, meta = make_sweep(machine, runs=(("layerwise", "structured"), ("full", "structured")))
    claim = by_id(va.validate(df, meta, n_boot=100), "crossover-width")
    assert (claim.verdict, claim.measured, claim.low, claim.high) == ("pass", 128, 128, 128)
    assert "Crossover between widths 64 and 128" in claim.detail
    # time the FLOPs do not see put it there: the counted work favours layerwise earlier
    # (found by review: the CPU run's crossover was where the overheads cross)
    assert "The counted FLOPs favour layerwise from width 8 on: below the crossover" in claim.detail


def test_a_crossover_where_the_work_crosses_names_no_overhead():
    machine = Machine(t0=0.0, t_module=0.0, saturation=0.0)
    df, meta = make_sweep(machine, runs=(("layerwise", "structured"), ("full", "structured")))
    claim = by_id(va.validate(df, meta, n_boot=100), "crossover-width")
    assert claim.verdict == "pass" and "per-call overheads" not in claim.detail


def test_the_crossover_comes_with_the_widths_noise_could_put_it_at():
    """Found by a hunt: read off the medians alone, the crossover moved with noise (8..12 to
    16..24 in a synthetic sweep) and nothing said so. Here the two tie at width 128 and
    layerwise is twice as fast at 256."""
    machine = Machine(t0=0.0, t_module=0.0, rates={"products": 1e30, "cholesky": 1e30})
    machine.extra = lambda m, k, s: (
        1e-6 * s.widths[0] ** 2 if m == "full" else 1.28e-4 * s.widths[0]
    )
    runs = (("layerwise", "structured"), ("full", "structured"))
    claim = by_id(
        va.validate(*make_sweep(machine, runs=runs, noise=0.1), n_boot=500), "crossover-width"
    )
    assert (claim.verdict, claim.low, claim.high) == ("pass", 128, 256)
    assert claim.measured in (128, 256)
    assert "it lies at widths 128..256 (95%)" in claim.detail


def test_claims_decided_on_one_time_per_side_are_too_noisy():
    """Found by a hunt: with one repeat time per point the bootstrap interval had zero
    width, and crossover-width and structured-vs-generic passed on one timing each."""
    machine = Machine(t0=0.0, t_module=0.0, rates={"products": 1e30, "cholesky": 1e30})
    machine.extra = lambda m, k, s: (
        1e-6 * s.widths[0] ** 2
        if m == "full"
        else ((2e-4 if k == "generic" else 1e-4) * s.widths[0])
    )
    runs = (("layerwise", "structured"), ("layerwise", "generic"), ("full", "structured"))
    claims = va.validate(*make_sweep(machine, runs=runs, repeats=1), n_boot=100)
    for cid in ("crossover-width", "structured-vs-generic"):
        claim = by_id(claims, cid)
        assert claim.verdict == "too noisy" and "With 1 and 1 repeat times there" in claim.detail
    crossover = by_id(claims, "crossover-width")
    assert crossover.measured == 128 and crossover.low is None and crossover.high is None
    assert "a point with fewer than 3 repeat times gives it no interval" in crossover.detail
    assert "bootstrapped" not in by_id(claims, "structured-vs-generic").detail
    # found by review: the depth line's interval of one time per depth read zero-width
    depth = by_id(claims, "linear-in-depth-layerwise")
    assert math.isnan(depth.low) and "(no interval: under 3 times a depth)" in depth.detail
    assert depth.to_dict()["low"] is None


def test_validate_prints_no_interval_where_a_claim_has_none(tmp_path, capsys):
    """Found by review: "structured-vs-generic 1.96 [nan, nan]" on the console."""
    df, meta = make_sweep(repeats=1)
    df.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    assert cli.main(["validate", "--out", str(tmp_path)]) in (0, 1)
    out = capsys.readouterr().out
    assert "structured-vs-generic" in out and "nan" not in out
    assert fit.median_ratio([2.0], [1.0, 1.1])[0] == pytest.approx(2 / 1.05)


def test_no_crossover_before_full_runs_out_of_budget_does_not_reach_the_regime():
    machine = Machine(t0=0.0, t_module=0.0, rates={"products": 1e30, "cholesky": 1e30})
    machine.extra = lambda method, kernel, shape: 1e-6 if method == "full" else 1e-3
    df, meta = make_sweep(
        machine,
        runs=(("layerwise", "structured"), ("full", "structured")),
        status_fn=lambda m, k, p: "skipped" if m == "full" and p["width"] > 16 else "ok",
    )
    claim = by_id(va.validate(df, meta, n_boot=100), "crossover-width")
    assert claim.verdict == "regime not reached" and "budgets stopped it" in claim.detail


def test_structured_factor_near_the_threshold_is_too_noisy():
    machine = Machine(t0=0.0, t_module=0.0, rates={"products": 1e30, "cholesky": 1e30})
    machine.extra = lambda m, k, s: 2e-3 * (2 if k == "generic" else 1)
    df, meta = make_sweep(
        machine, runs=(("layerwise", "structured"), ("layerwise", "generic")), noise=0.2
    )
    claim = by_id(va.validate(df, meta, n_boot=500), "structured-vs-generic")
    assert claim.low < 2 < claim.high
    assert claim.verdict in ("too noisy", "regime not reached")


def test_validate_refuses_a_sweep_it_cannot_read():
    df, meta = make_sweep(runs=(("euclidean", "structured"),))
    with pytest.raises(ValueError, match="no 'base' point"):
        va.validate(df, {})
    with pytest.raises(ValueError, match="lack the column"):
        va.validate(df.drop(columns="flops_cholesky"), meta)
    df.loc[df.index[0], "device"] = "cuda"
    with pytest.raises(ValueError, match="mix devices"):
        va.validate(df, meta)


def test_claims_are_written_as_a_json_list_beside_what_produced_them(tmp_path):
    claims = va.validate(*make_sweep(runs=[r for r in RUNS if r[0] != "full"]), n_boot=100)
    path = va.write_claims(claims, tmp_path / "out" / "claims.json", provenance={"seed": 3})
    document = json.loads(path.read_text())
    assert list(document) == ["seed", "claims"] and document["seed"] == 3
    records = document["claims"]
    assert [r["id"] for r in records] == [c.id for c in claims]
    assert set(records[0]) == {
        *("id", "claim", "expected", "measured", "low", "high", "verdict", "detail", "basis"),
    }
    assert {r["verdict"] for r in records} <= set(va.VERDICTS)
    crossover = next(r for r in records if r["id"] == "crossover-width")
    assert crossover["measured"] is None and crossover["verdict"] == "not measured"


@pytest.mark.parametrize("broken", ["json.dumps", "os.replace"])
def test_write_claims_never_leaves_a_half_written_file(tmp_path, monkeypatch, broken):
    path = tmp_path / "claims.json"
    path.write_text("previous run\n")
    claim = va.Claim("x", "a claim", "1", 1.0, 0.9, 1.1, "pass", "detail")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(broken, fail)
    with pytest.raises(OSError, match="disk full"):
        va.write_claims([claim], path)
    assert path.read_text() == "previous run\n"
    assert [p.name for p in tmp_path.iterdir()] == ["claims.json"]


@pytest.mark.parametrize("grid", ["DEFAULT", "QUICK", "DEFAULT_CUDA", "QUICK_CUDA"])
def test_the_shipped_grids_reach_the_regime_of_every_flop_claim(grid):
    spec = getattr(sw, grid)
    budget = sw.Grid(**spec)

    def within_budgets(method, kernel, point):
        device = "cuda" if grid.endswith("CUDA") else "cpu"
        run = dict(method=method, kernel=kernel, **point, output_metric="exact")
        run.update(device=device, dtype="float32")
        over = sw.model_flops(run)["total"] > budget.flop_budget
        over |= sw.model_peak_bytes(run) > budget.memory_budget_bytes
        return "skipped" if over else "ok"

    df, meta = make_sweep(base=spec["base"], axes=spec["axes"], status_fn=within_budgets)
    claims = [c for c in va.validate(df, meta, n_boot=50) if c.basis == "flops"]
    assert {c.id: c.verdict for c in claims} == {c.id: "pass" for c in claims}


def test_n_claims_judge_only_widths_where_every_block_is_solved_by_woodbury():
    """Widths 8 and 16 at d = 144 rows: the narrow blocks are factorised densely, and a top
    segment across that boundary grows faster than ``n d^2``; a regime not reached, not a
    fail of the algorithm."""
    axes = {**AXES, "width": (8, 16), "depth": (1, 2, 3), "out_dim": (10,), "batch": (8, 16)}
    base = {"width": 16, "depth": 1, "out_dim": 10, "batch": 16}
    claims = va.validate(*make_sweep(base=base, axes=axes), n_boot=50)
    for cid in ("layerwise-generic-n", "layerwise-structured-n"):
        claim = by_id(claims, cid)
        assert claim.verdict == "regime not reached" and "ends past the range" in claim.detail


def test_full_faster_at_every_width_both_ran_is_not_a_fail_while_layerwise_counts_less():
    """Full faster at widths 8..64, where both ran: the cost models give layerwise fewer
    FLOPs there or further out, so overhead decides these times, not the algorithms."""
    machine = Machine(t0=0.0, t_module=0.0, rates={"products": 1e30, "cholesky": 1e30})
    machine.extra = lambda method, kernel, shape: 1e-6 if method == "full" else 1e-3
    axes = {**AXES, "width": (8, 16, 32, 64)}
    df, meta = make_sweep(
        machine, axes=axes, runs=(("layerwise", "structured"), ("full", "structured"))
    )
    claim = by_id(va.validate(df, meta, n_boot=100), "crossover-width")
    assert claim.verdict == "regime not reached"
    assert "The cost models give layerwise fewer FLOPs than full" in claim.detail
    assert "a grid that reaches wider decides" in claim.detail


def test_a_sweep_of_one_point_compares_no_exponent():
    """One point per axis: the counts agree with the model, but no growth is seen; the
    generic kernel has no time model, so its overhead is not claimed."""
    axes = {"width": (16,), "depth": (1,), "out_dim": (10,), "batch": (16,)}
    base = {"width": 16, "depth": 1, "out_dim": 10, "batch": 16}
    claims = va.validate(*make_sweep(REALISTIC, base=base, axes=axes), n_boot=50)
    match = by_id(claims, "flops-match-model")
    assert match.verdict == "regime not reached" and "No exponent compared" in match.detail
    factor = by_id(claims, "structured-vs-generic")
    assert "%" not in factor.detail
    assert factor.verdict == "regime not reached" and "is not known" in factor.detail


def test_an_axis_of_one_point_in_the_grid_is_not_blamed_on_the_budgets():
    axes = {**AXES, "batch": (32,)}
    claim = by_id(va.validate(*make_sweep(axes=axes), n_boot=50), "layerwise-structured-d")
    assert claim.verdict == "regime not reached"
    assert "the grid has 1 on the axis" in claim.detail and "budgets" not in claim.detail


def test_a_depth_share_passes_only_with_its_interval_near_zero(monkeypatch):
    """Found by review: an interval up to 1 wide could pass; a true quadratic share of 0.33
    passed 16 of 200 noisy draws, e.g. 0.049 [-0.095, 0.553]. A pass needs the interval
    within +-2 x the tolerance, as the time exponents' passes do."""
    df, meta = make_sweep()
    df["interleaved"] = "depth"  # a fail needs the line timed interleaved

    def share(low, high):
        monkeypatch.setattr(
            fit, "quadratic_share", lambda *a, **k: fit.SlopeFit(0.049, low, high, 5, (2, 17))
        )
        return by_id(va.validate(df, meta, n_boot=50), "linear-in-depth-layerwise").verdict

    assert share(-0.095, 0.553) == "too noisy"
    assert share(-0.1, 0.25) == "pass"
    assert share(0.2, 0.5) == "fail"


def test_an_unmeasured_exponent_interval_does_not_pass(monkeypatch):
    """Two points timed once each have no interval (nan), which must not read as narrow."""
    assert va._reaches_beyond(fit.SlopeFit(1.0, math.nan, math.nan, 2, (1, 2)))
    assert not va._reaches_beyond(fit.SlopeFit(1.0, 0.9, 1.1, 2, (1, 2)))


def test_a_depth_curve_of_an_overhead_bound_line_is_not_a_fail():
    """A quick run on a 2-core CPU read layerwise's time at width 32, batch 16 as curving up
    in depth (35% [21%, 49%]) while the counted work at the deepest point, at the device's
    rates, was 8% of the shallowest point's time: the line adds too little work to judge,
    and the run failed the quick start. Such a line does not reach the regime; one that
    adds work still fails, and a larger hidden cost does not get it excused (found by
    review of a first rule, which compared the work with the deepest point's time)."""

    def curved(c):
        return lambda m, k, s: c * len(s.layers) ** 2 if m == "natural" else 0.0

    fast = {"products": 5e13, "cholesky": 1e13, "eigh": 3e12}  # the work takes no time
    claim = by_id(va.validate(*make_sweep(Machine(rates=fast, extra=curved(1e-4))), n_boot=300),
                  "linear-in-depth-natural")  # fmt: skip
    assert claim.verdict == "regime not reached" and "the count does not see" in claim.detail
    assert claim.low > va.DEPTH_TOLERANCE  # the time does curve up beyond noise
    for c in (2e-5, 1e-4, 1e-3):  # larger and larger costs hidden from the count
        df, meta = make_sweep(Machine(saturation=1e7, extra=curved(c)))
        df["interleaved"] = "depth"  # a fail needs the line timed interleaved
        claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
        assert claim.verdict == "fail", c


def plant_outlier(df, factor, method, kernel, **point):
    """Scale the times of ``method``/``kernel`` at the base with ``point`` set by
    ``factor``, and flag it ``outlier`` as a sweep would; returns its row."""
    at = {**BASE, **point}
    row = (df["method"] == method) & (df["kernel"] == kernel)
    for axis, value in at.items():
        row &= df[axis] == value
    assert row.sum() == 1
    df.loc[row, "time_median_s"] *= factor
    df.loc[row, "times_s"] = df.loc[row, "times_s"].map(
        lambda t: json.dumps([factor * x for x in json.loads(t)])
    )
    df.loc[row, "flag"] = "outlier"
    return df[row]


def test_a_verdict_decided_on_a_flagged_outlier_says_so():
    """Found by review: points the sweep flagged ``outlier`` (measured twice, 1.5x or more
    off the trend of their neighbours both times) decided verdicts, and nothing said so:
    one layerwise point at 2x its time turned time-explained from pass into 'regime not
    reached', blaming climbing rates. A fail or regime not reached decided on such a point
    is too noisy, naming it; a pass stands and names it; a point flagged along another
    axis (the base point lies on every axis) is not named."""
    df, meta = make_sweep(REALISTIC, status_fn=full_fits_in_memory)
    df["interleaved"] = "depth width batch"
    # 2x: at 1.6x the layerwise line along batch, whose widest blocks take the dense metric
    # formed from the samples' Grams, passes (naming the point: covered below)
    plant_outlier(df, 2.0, "layerwise", "structured", batch=128)
    plant_outlier(df, 1.6, "natural", "structured", depth=4)
    df.loc[(df["method"] == "kfac") & (df["width"] == BASE["width"]), "flag"] = "outlier"
    claims = va.validate(df, meta, n_boot=300)
    for cid, point in (
        ("time-explained-layerwise", "layerwise (structured) at width 64, depth 2, out_dim 10, batch 128"),
        ("linear-in-depth-natural", "natural (structured) at width 64, depth 4, out_dim 10, batch 32"),
    ):  # fmt: skip
        claim = by_id(claims, cid)
        assert claim.verdict == "too noisy"  # (layerwise's: its interval reaches the band)
        assert "rests on points the sweep flagged outlier" in claim.detail
        assert point in claim.detail
    assert "outlier" not in by_id(claims, "linear-in-depth-kfac").detail
    assert "--batches" in by_id(claims, "time-explained-layerwise").detail
    deciding = df[(df["method"] == "natural") & (df["width"] == BASE["width"])]
    passed = va.Claim("c", "claim", "expected", 1.0, 0.9, 1.1, "pass", "Detail.", "time")
    claim = va._on_outliers(passed, deciding, df, ("depth",))
    assert claim.verdict == "pass"
    assert claim.detail.startswith("Detail. It rests on points the sweep flagged outlier")


def test_a_fail_decided_on_points_whose_repeats_spread_is_too_noisy():
    """Found by a hunt of verdicts under outside load: the sweep flags ``spread`` a point
    whose repeats still spread past SPREAD_LIMIT when timed again, and no verdict read the
    flag. A fail decided on such points is too noisy, naming them; without the flag it
    stands; a pass on them stands, and so does a regime not reached (found by review: an
    overhead-bound line read too noisy, which no quiet rerun settles)."""

    def curved(m, k, s):  # natural's time bent up in depth: a fail of linear-in-depth
        return 1e-3 * len(s.layers) ** 2 if m == "natural" else 0.0

    df, meta = make_sweep(Machine(saturation=1e7, extra=curved))
    df["interleaved"] = "depth"  # a fail needs the line timed interleaved
    assert by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural").verdict == "fail"
    natural = (df["method"] == "natural") & (df["width"] == BASE["width"])
    df.loc[natural & (df["depth"] == df.loc[natural, "depth"].max()), "flag"] = "spread"
    claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
    assert claim.verdict == "too noisy"
    assert "would be 'fail'" in claim.detail and "natural (structured) at width" in claim.detail
    for verdict in ("pass", "regime not reached"):
        kept = va.Claim("c", "claim", "expected", 1.0, 0.9, 1.1, verdict, "Detail.", "time")
        assert va._on_outliers(kept, df[natural], df, ("depth",)).verdict == verdict


def test_a_fail_decided_on_points_timed_under_load_is_too_noisy():
    """A point timed while other processes kept busy more CPUs than it left free, and
    again when timed again (``loaded``), is judged as one whose repeats spread: a load
    that slows every repeat alike does not spread them. A fail decided on it is too noisy,
    naming it, beside a point flagged spread where there is one; a pass stands (a regime
    not reached does not: test_a_regime_not_reached_on_points_timed_under_load_is_too_noisy)."""

    def curved(m, k, s):  # natural's time bent up in depth: a fail of linear-in-depth
        return 1e-3 * len(s.layers) ** 2 if m == "natural" else 0.0

    df, meta = make_sweep(Machine(saturation=1e7, extra=curved))
    df["interleaved"] = "depth"  # a fail needs the line timed interleaved
    natural = (df["method"] == "natural") & (df["width"] == BASE["width"])
    deepest = natural & (df["depth"] == df.loc[natural, "depth"].max())
    df.loc[deepest, "flag"] = "loaded"
    claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
    assert claim.verdict == "too noisy" and "would be 'fail'" in claim.detail
    assert "taken while other processes kept busy more CPUs" in claim.detail
    assert "natural (structured) at width" in claim.detail and "spread past" not in claim.detail
    shallowest = natural & (df["depth"] == df.loc[natural, "depth"].min())
    df.loc[shallowest, "flag"] = "spread"
    claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
    assert claim.verdict == "too noisy"
    assert re.search(r"spread past 20% .* and on points whose times were taken", claim.detail)
    kept = va.Claim("c", "claim", "expected", 1.0, 0.9, 1.1, "pass", "Detail.", "time")
    assert va._on_outliers(kept, df[natural], df, ("depth",)).verdict == "pass"


def test_a_regime_not_reached_on_points_timed_under_load_is_too_noisy():
    """Found by review: a load slows every time a point keeps, by as much as it pleases
    (a mid point beside one spinning process read 17 -> 85 ms), and a depth line is judged
    overhead-bound against the time of its shallowest point. A line that fails on a quiet
    machine, its points slowed 5-8x and flagged ``loaded`` (the reading around the line's
    rounds), read regime not reached and "judge it at a larger base width or batch": the
    load's doing, not the line's. Too noisy, naming them; a regime not reached on points
    flagged ``spread`` stands (an overhead-bound line is one however its tiny points
    spread), and so does one on points not flagged."""

    def curved(m, k, s):  # natural's time bent up in depth: a fail of linear-in-depth
        return 1e-4 * len(s.layers) ** 2 if m == "natural" else 0.0

    df, meta = make_sweep(Machine(saturation=1e7, extra=curved))
    df["interleaved"] = "depth"  # a fail needs the line timed interleaved
    assert by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural").verdict == "fail"
    line = (df["method"] == "natural") & (df["width"] == BASE["width"])
    line &= (df["out_dim"] == BASE["out_dim"]) & (df["batch"] == BASE["batch"])
    df.loc[line, "times_s"] = df.loc[line, "times_s"].map(
        lambda t: json.dumps([8 * x for x in json.loads(t)])
    )
    df.loc[line, "time_median_s"] *= 8
    slowed = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
    assert slowed.verdict == "regime not reached"  # not flagged: it stands
    df.loc[line, "flag"] = "loaded"
    claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
    assert claim.verdict == "too noisy", claim.detail
    assert "would be 'regime not reached'" in claim.detail
    assert "taken while other processes kept busy more CPUs" in claim.detail
    df.loc[line, "flag"] = "spread"
    claim = by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural")
    assert claim.verdict == "regime not reached"


def test_a_depth_line_of_three_depths_or_two_rounds_is_too_noisy():
    """Found by review: exactly affine times failed linear-in-depth on three depths of
    three rounds (9 of 40 claims over 8 seeds): a quadratic through three points leaves no
    scatter to measure. The planted curve that fails on the full line reads too noisy."""
    for axes, repeats, why in (
        ({**AXES, "depth": (1, 2, 4)}, 5, "leave no scatter"),
        (AXES, 2, "2 round(s) of each depth are too few"),
    ):
        df, meta = make_sweep(axes=axes, repeats=repeats)
        for share in ((0.3, 0.25, 0.35), (0.0, -0.05, 0.05)):  # would fail, would pass
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(
                    fit,
                    "quadratic_share",
                    lambda *a, share=share, **k: fit.SlopeFit(*share, 5, (2, 5)),
                )
                claim = by_id(va.validate(df, meta, n_boot=50), "linear-in-depth-natural")
            assert claim.verdict == "too noisy" and why in claim.detail


def test_three_depths_whose_stretches_disagree_are_told_of_the_depths():
    """Found by a hunt: where the two stretches of a line of three depths disagreed, the
    advice was to rerun on a quiet machine, which cannot settle three depths."""
    df, meta = make_sweep(axes={**AXES, "depth": (1, 2, 4)}, repeats=6)
    lines = (df["width"] == BASE["width"]) & (df["out_dim"] == BASE["out_dim"])
    df["stretches"] = np.where(lines & (df["batch"] == BASE["batch"]), 2, np.nan)
    # each line: the whole, then its two stretches, which disagree (pass, fail)
    shares = itertools.cycle([(0.0, -0.05, 0.05), (0.0, -0.05, 0.05), (0.3, 0.25, 0.35)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            fit, "quadratic_share", lambda *a, **k: fit.SlopeFit(*next(shares), 3, (2, 5))
        )
        claim = by_id(va.validate(df, meta, n_boot=50), "linear-in-depth-natural")
    assert claim.verdict == "too noisy" and "leave no scatter" in claim.detail
    assert "rerun on a quiet machine" not in claim.detail


def test_a_flat_depth_line_under_overhead_does_not_pass():
    """Found by review: a quadratic line of little work under a large constant overhead
    passed (0.046 [-0.048, 0.138]); the work it adds is under MIN_LINE_WORK of the time,
    so its curve is not judged either way."""
    fast = {"products": 5e13, "cholesky": 1e13, "eigh": 3e12}  # the work takes no time
    machine = Machine(t0=2.0, rates=fast)
    claim = by_id(va.validate(*make_sweep(machine), n_boot=300), "linear-in-depth-natural")
    assert claim.verdict == "regime not reached" and "the count does not see" in claim.detail


def test_a_wide_depth_interval_under_overhead_is_not_reached_rather_than_noisy(monkeypatch):
    """Found by review: the euclidean depth line on the committed CPU run (its work 24% of
    the time) was called too noisy, which no quiet rerun settles: the overhead check ran
    only on verdicts that were not too noisy already."""
    fast = {"products": 5e13, "cholesky": 1e13, "eigh": 3e12}  # the work takes no time
    df, meta = make_sweep(Machine(t0=2.0, rates=fast))
    monkeypatch.setattr(
        fit, "quadratic_share", lambda *a, **k: fit.SlopeFit(0.05, -0.4, 0.5, 5, (2, 5))
    )
    claim = by_id(va.validate(df, meta, n_boot=50), "linear-in-depth-natural")
    assert claim.verdict == "regime not reached" and "the count does not see" in claim.detail


def test_structured_vs_generic_under_the_structured_kernels_overhead_is_not_a_fail():
    """Found by review: the structured kernel's per-call overhead brought the ratio near 1
    (1.25 [1.23, 1.31]) and the claim failed, though its own time model put the overhead
    above the target; only the generic kernel's was checked."""
    machine = Machine(saturation=1e7)
    machine.extra = lambda m, k, s: 5.0 if k == "structured" else 0.0
    df, meta = make_sweep(machine, runs=(("layerwise", "structured"), ("layerwise", "generic")))
    claim = by_id(va.validate(df, meta, n_boot=300), "structured-vs-generic")
    assert claim.verdict == "regime not reached"
    assert "the structured kernel's overhead" in claim.detail


def test_a_crossover_whose_widest_ratio_reaches_1_is_too_noisy(monkeypatch):
    """Found by review: the crossover was decided on bare medians, so under a large
    overhead noise alone made it pass (at 8..12, 12..16 or 16..24 by the seed). A pass
    needs full / layerwise above 1 at the widest width beyond its bootstrap interval."""
    df, meta = make_sweep(REALISTIC, status_fn=full_fits_in_memory)
    assert by_id(va.validate(df, meta, n_boot=300), "crossover-width").verdict == "pass"
    monkeypatch.setattr(fit, "median_ratio", lambda *a, **k: (1.05, 0.97, 1.12))
    claim = by_id(va.validate(df, meta, n_boot=300), "crossover-width")
    assert claim.verdict == "too noisy" and "it reaches 1" in claim.detail


@pytest.mark.parametrize("grid", ["test", "sweep"])
def test_a_planted_super_linear_time_passes_no_claim_on_a_wide_grid(grid):
    """tests/scaling/planted_laws.py: a compute time planted as the per-kind times' sum
    passes every method's time-explained claim (but K-FAC's or layerwise's in a noisy
    draw); raised to the power 1.3 or 1.4 it passes none, on the test suite's grid and on
    one spanning width and batch as the CPU sweeps do (on a narrow width axis the fitted
    rates may follow it: docs/measuring.md)."""
    import planted_laws

    for seed in range(3):
        linear = {c.id: c.verdict for c in planted_laws.verdicts("linear", grid, 1e-3, seed, 300)}
        assert linear["time-explained-natural"] == linear["time-explained-full"] == "pass"
        for law in ("total^1.3", "total^1.4"):
            passed = [
                c.id
                for c in planted_laws.verdicts(law, grid, 1e-3, seed, 300)
                if c.verdict == "pass"
            ]
            assert not passed, (law, seed, passed)


def _slowed_stretch(df, where, factor=20.0):
    """``df`` with the points ``where`` timed in two stretches, the second ``factor`` times
    the first (as an audit's base point: 0.93 ms and 19.5 ms, pooled to 8.1 ms), and every
    other point of their lines in two stretches that agree."""
    df = df.copy()
    df["stretches"] = np.nan
    line = (df["method"] == "layerwise") & (df["kernel"] == "structured")
    line &= (df["width"] == BASE["width"]) & (df["out_dim"] == BASE["out_dim"])
    line &= df["batch"] == BASE["batch"]  # the depth line through the base point
    for i in df.index[line | where]:
        times = json.loads(df.at[i, "times_s"])
        both = times + [t * (factor if where[i] else 1.01) for t in times]
        df.at[i, "times_s"] = json.dumps(both)
        df.at[i, "time_median_s"] = float(np.median(both))
        df.at[i, "stretches"] = 2
    df.loc[line, "interleaved"] = "depth"
    return df


def test_a_point_whose_stretches_disagree_is_left_out_of_the_time_model_and_the_fits():
    """Found by an audit: a base point whose two stretches read 0.93 and 19.5 ms was
    recorded as their pooled median, 8.1 ms; the width fit's top segment and the time model
    (r2_log -0.72) took it. Such a point is left out of both (read off its times, so a
    results file written before the flag is read alike), and a verdict never rests on it:
    the time claims are those of the sweep without it, with a note; its depth line is too
    noisy."""
    df, meta = make_sweep(REALISTIC, status_fn=full_fits_in_memory, repeats=7)
    at_base = (df["method"] == "layerwise") & (df["kernel"] == "structured")
    for axis in fit.AXES:
        at_base &= df[axis] == BASE[axis]
    assert at_base.sum() == 1
    planted = _slowed_stretch(df, at_base)
    clean = _slowed_stretch(df, at_base, factor=1.01)
    without = planted[~at_base]

    key = ("layerwise", "structured")
    models = {k: m for k, m in fit.time_models(planted).items() if k[:2] == key}
    expected = {k: m for k, m in fit.time_models(without).items() if k[:2] == key}
    assert models and models == expected
    table = fit.fit_table(planted, meta, n_boot=200)
    pd.testing.assert_frame_equal(table, fit.fit_table(without, meta, n_boot=200))

    claims = {c.id: c for c in va.validate(planted, meta, n_boot=300)}
    alone = {c.id: c for c in va.validate(without, meta, n_boot=300)}
    for cid in ("time-explained-layerwise", "crossover-width", "structured-vs-generic"):
        assert claims[cid].verdict == alone[cid].verdict
        assert claims[cid].measured == alone[cid].measured
        assert "1 point(s) left out, timed in stretches of time whose medians disagree" in (
            claims[cid].detail
        )
    assert "left out" not in claims["time-explained-natural"].detail
    depth = claims["linear-in-depth-layerwise"]
    assert depth.verdict == "too noisy"
    assert "1 of its points were timed in stretches of time whose medians disagree" in (
        depth.detail
    )
    assert "layerwise (structured) at width" in depth.detail
    assert fit.stretches_disagree(planted).tolist() == at_base.tolist()
    assert not fit.stretches_disagree(clean).any()
    clean_claims = {c.id: c.verdict for c in va.validate(clean, meta, n_boot=300)}
    assert clean_claims["linear-in-depth-layerwise"] != "too noisy"  # agreeing stretches judged


def test_a_regime_not_reached_for_want_of_points_left_out_for_load_is_too_noisy():
    """Found by a hunt: a line that ends at the base point (the budgets stopped it there),
    whose base point's stretches of time disagree, is judged without its top point, and
    read "regime not reached on this device" where the points that reach the regime were
    those load left out. Too noisy instead, naming them; with the stretches agreeing it
    passes."""

    def to_base(method, kernel, point):
        beyond = point["width"] > BASE["width"] or point["batch"] > BASE["batch"]
        return "skipped" if (method, kernel) == ("layerwise", "structured") and beyond else "ok"

    machine = Machine(t0=1e-5, t_module=1e-6, saturation=1e6)
    df, meta = make_sweep(machine, status_fn=to_base, repeats=7)
    at_base = (df["method"] == "layerwise") & (df["kernel"] == "structured")
    for axis in fit.AXES:
        at_base &= df[axis] == BASE[axis]
    cid = "time-explained-layerwise"
    agreeing = by_id(va.validate(_slowed_stretch(df, at_base, 1.01), meta, n_boot=300), cid)
    assert agreeing.verdict == "pass"
    claim = by_id(va.validate(_slowed_stretch(df, at_base), meta, n_boot=300), cid)
    assert claim.verdict == "too noisy", claim.detail
    assert "The verdict would be 'regime not reached', but 1 of them lie on the lines " in (
        claim.detail
    )
    assert "(layerwise (structured) at width 64, depth 2, out_dim 10, batch 32)" in claim.detail
    assert "put back at their stretch 1 of time, it reads 'pass'" in claim.detail


def test_left_out_points_lie_on_a_comparison_s_lines_only_where_both_sides_ran():
    """A comparison (crossover, structured vs generic) judges the widths where both methods
    ran: a point left out there, with the other method's point at the same width, lies on
    its lines, at the widest width or below it; one where the other did not run does not."""
    df, _ = make_sweep(
        status_fn=lambda m, k, p: "skipped" if m == "full" and p["width"] > 64 else "ok"
    )
    runs = [("layerwise", "structured"), ("full", "structured")]
    for width in (64, 16):
        full_at = (df["method"] == "full") & (df["width"] == width)
        for axis in ("depth", "out_dim", "batch"):
            full_at &= df[axis] == BASE[axis]
        found = va._on_lines(df[full_at], df[~full_at], BASE, runs, ("width",))
        assert found.index.tolist() == df.index[full_at].tolist()
    layerwise_at_512 = (df["method"] == "layerwise") & (df["width"] == 512)
    for axis in ("depth", "out_dim", "batch"):
        layerwise_at_512 &= df[axis] == BASE[axis]
    kept = df[~layerwise_at_512]
    assert va._on_lines(df[layerwise_at_512], kept, BASE, runs, ("width",)).empty


def _on_base_line(df, method, kernel, axis, value):
    """The row of ``method`` (``kernel``) at ``axis`` = ``value`` on the line through BASE."""
    at = (df["method"] == method) & (df["kernel"] == kernel) & (df[axis] == value)
    for other in fit.AXES:
        if other != axis:
            at &= df[other] == BASE[other]
    return at


def test_a_regime_not_reached_for_want_of_a_point_left_out_below_the_top_is_too_noisy():
    """Found by review: a point left out for load below the widest width where both ran, or
    below the top of a line, decided a regime not reached as much as one beyond: the
    crossover read "1 widths where both layerwise and full ran; need 2" and
    time-explained-layerwise "no axis has a top segment of compute-bound points", each a
    pass with the point's stretches agreeing. Too noisy instead, saying what it reads with
    the point put back."""
    df, meta = make_sweep(
        REALISTIC, status_fn=lambda m, k, p: "skipped" if m == "full" and p["width"] > 16 else "ok"
    )
    where = _on_base_line(df, "full", "structured", "width", 8)
    agreeing = by_id(
        va.validate(_slowed_stretch(df, where, 1.01), meta, n_boot=200), "crossover-width"
    )
    assert agreeing.verdict == "pass"
    claim = by_id(va.validate(_slowed_stretch(df, where), meta, n_boot=200), "crossover-width")
    assert claim.verdict == "too noisy", claim.detail
    assert "The verdict would be 'regime not reached'" in claim.detail
    assert "(full (structured) at width 8, depth 2, out_dim 10, batch 32)" in claim.detail

    def to_base(method, kernel, point):
        beyond = point["width"] > BASE["width"] or point["batch"] > BASE["batch"]
        return "skipped" if (method, kernel) == ("layerwise", "structured") and beyond else "ok"

    machine = Machine(t0=1e-5, t_module=1e-6, saturation=1e6)
    df, meta = make_sweep(machine, status_fn=to_base, repeats=7)
    where = _on_base_line(df, "layerwise", "structured", "batch", 16)
    cid = "time-explained-layerwise"
    assert by_id(va.validate(_slowed_stretch(df, where, 1.01), meta, n_boot=200), cid).verdict == (
        "pass"
    )
    claim = by_id(va.validate(_slowed_stretch(df, where), meta, n_boot=200), cid)
    assert claim.verdict == "too noisy", claim.detail
    assert "it reads 'pass': load, not the device, decided it" in claim.detail


def test_a_regime_not_reached_that_every_reading_of_a_point_left_out_keeps_stands():
    """Found by review: with every point overhead-bound (a 1 s overhead per call), the top
    point of the width line left out for load (stretches 30% apart) turned time-explained's
    regime not reached too noisy, though each of its stretches is overhead-bound too. It
    stands, naming the point."""
    df, meta = make_sweep(Machine(t0=1.0), repeats=7)
    where = _on_base_line(df, "layerwise", "structured", "width", 512)
    cid = "time-explained-layerwise"
    assert by_id(va.validate(df, meta, n_boot=200), cid).verdict == "regime not reached"
    claim = by_id(va.validate(_slowed_stretch(df, where, 1.3), meta, n_boot=200), cid)
    assert claim.verdict == "regime not reached", claim.detail
    assert "1 point(s) left out" in claim.detail


def test_points_of_one_stretch_or_of_an_old_file_are_never_left_out():
    """A results file without ``stretches`` (written before they were recorded) or ``flag``,
    and rows of one stretch, have nothing to disagree; a row flagged ``stretches`` by the
    sweep is left out whatever its times."""
    df, _ = make_sweep(repeats=4)
    assert not fit.stretches_disagree(df.drop(columns=["stretches", "flag"])).any()
    assert not fit.stretches_disagree(df).any()
    df.loc[df.index[0], "flag"] = "spread stretches"
    assert fit.stretches_disagree(df).tolist() == [True] + [False] * (len(df) - 1)


def test_the_report_says_how_many_points_were_left_out_and_why():
    from riemann_core.scaling import report

    df, _ = make_sweep(repeats=7)
    at_base = (df["method"] == "layerwise") & (df["kernel"] == "structured")
    for axis in fit.AXES:
        at_base &= df[axis] == BASE[axis]
    text = "\n".join(report._flagged_section(_slowed_stretch(df, at_base)))
    assert "1 point timed in stretches of time whose medians disagree by more than 20%" in text
    assert "was left out of the time model, the exponents per axis and the claims" in text
    assert report._left_out_lines(_slowed_stretch(df, at_base))
    assert not report._left_out_lines(df)


def test_a_line_too_light_to_judge_says_so_beside_a_point_left_out(monkeypatch):
    """Found by review: a depth line whose work was too little to judge ("regime not
    reached", judge it at a larger base) became "too noisy, rerun on a quiet machine" once
    it held a point whose stretches disagree, its reason dropped."""
    monkeypatch.setattr(va, "_line_work", lambda rows, rates: 0.01)  # too little work
    df, meta = make_sweep(REALISTIC, status_fn=full_fits_in_memory, repeats=7)
    at_base = (df["method"] == "layerwise") & (df["kernel"] == "structured")
    for axis in fit.AXES:
        at_base &= df[axis] == BASE[axis]
    depth = {c.id: c for c in va.validate(_slowed_stretch(df, at_base), meta, n_boot=300)}
    depth = depth["linear-in-depth-layerwise"]
    assert depth.verdict == "regime not reached", depth.detail
    assert "judge it at a larger base width or batch" in depth.detail
    assert "1 of its points were timed in stretches of time whose medians disagree" in (
        depth.detail
    )


def test_the_report_says_nothing_of_points_left_out_where_there_are_none():
    """Found by review: "0 points ... were left out" stood in every report."""
    from riemann_core.scaling import report

    df, _ = make_sweep(repeats=7)
    assert "left out of the time model" not in "\n".join(report._flagged_section(df))


@pytest.mark.parametrize("bad", [math.nan, 0.0, -1e-3, math.inf])
def test_validate_names_an_ok_row_whose_times_are_no_measurement(bad):
    """Found by a hunt: rows passed from Python are not checked as results.csv is when
    read; a NaN repeat time crashed the depth fit with numpy's "SVD did not converge", a
    zero one raised "a ratio of times needs non-empty, positive samples" naming no point,
    and a NaN one at the widest width read crossover-width 'regime not reached'."""
    df, meta = make_sweep(repeats=5)
    for point in ({"width": 512}, {"depth": 16}):
        bad_df = df.copy()
        row = (bad_df["method"] == "layerwise") & (bad_df["kernel"] == "structured")
        for axis, value in {**BASE, **point}.items():
            row &= bad_df[axis] == value
        (i,) = bad_df.index[row]
        times = json.loads(bad_df.at[i, "times_s"])
        bad_df.at[i, "times_s"] = json.dumps([bad, *times[1:]])
        bad_df.at[i, "time_median_s"] = float(np.median([bad, *times[1:]]))
        where = ", ".join(f"{a} {v}" for a, v in {**BASE, **point}.items())
        with pytest.raises(ValueError, match=f"ok row of layerwise \\(structured\\) at {where}"):
            va.validate(bad_df, meta, n_boot=50)
    flops = df.copy()
    flops.loc[flops.index[flops["status"] == "ok"][0], "flops_products"] = math.nan
    with pytest.raises(ValueError, match="has flops_products = nan"):
        va.validate(flops, meta, n_boot=50)


@pytest.mark.parametrize("times", ["no column", math.nan])
def test_validate_names_an_ok_row_whose_median_alone_is_no_number(times):
    """Found by review: an ok row without repeat times (no ``times_s`` column, or a blank
    cell), whose median is text, raised a KeyError naming no row, or blamed ``times_s``."""
    df, meta = make_sweep(repeats=5)
    df = df.drop(columns=["times_s"]) if times == "no column" else df.assign(times_s=times)
    df["time_median_s"] = df["time_median_s"].astype(object)
    df.loc[df.index[df["status"] == "ok"][0], "time_median_s"] = "fast"
    with pytest.raises(ValueError, match=r"ok row of .* has time_median_s = 'fast'"):
        va.validate(df, meta, n_boot=50)


def test_a_linear_depth_line_of_three_rounds_does_not_fail():
    """Found by a hunt: exactly linear times (5% and 10% noise a call) failed
    linear-in-depth on lines of 3 interleaved rounds, at -22% [-26%, -21%] and -45% [-53%,
    -42%]: the bootstrap of a median of 3 rounds understates its spread (the 95% interval
    held the true share in 76% of draws). Too noisy, saying how many rounds it takes."""
    claims = []
    for seed, noise in ((14, 0.05), (14, 0.1), (12, 0.1)):
        df, meta = make_sweep(repeats=3, noise=noise, seed=seed)
        df["interleaved"] = "depth width batch"
        claims.append(
            by_id(va.validate(df, meta, n_boot=1000, seed=seed), "linear-in-depth-layerwise")
        )
    assert all(c.verdict == "too noisy" for c in claims), [c.detail for c in claims]
    assert all("3 round(s) of each depth are too few" in c.detail for c in claims)
    assert "sweep with --repeats 2 or more" in claims[0].detail
    # five rounds still judge a curve
    machine = planted("natural", "structured", lambda s: 1e-4 * len(s.layers) ** 2)
    df, meta = make_sweep(machine, repeats=5)
    df["interleaved"] = "depth"
    assert by_id(va.validate(df, meta, n_boot=300), "linear-in-depth-natural").verdict == "fail"


def _in_stretches_that_disagree(df, rows) -> None:
    """Time ``rows`` in two stretches, the second twice as slow as the first."""
    df["stretches"] = np.where(rows, 2, np.nan)
    df.loc[rows, "times_s"] = df.loc[rows, "times_s"].map(
        lambda t: json.dumps([x * (1 if i < 3 else 2) for i, x in enumerate(json.loads(t))])
    )


def test_a_run_whose_every_point_was_left_out_for_load_is_too_noisy_not_unmeasured():
    """Found by a hunt: on a loaded machine every point of a tiny sweep's euclidean and
    layerwise runs was timed in stretches that disagree, and their claims on time read
    'not measured: the sweep did not run euclidean', though it had."""
    df, meta = make_sweep(Machine(), runs=RUNS[:4], repeats=6)
    gone = df["method"] == "euclidean"
    _in_stretches_that_disagree(df, gone)
    claim = by_id(va.validate(df, meta, n_boot=50), "time-explained-euclidean")
    assert claim.verdict == "too noisy", claim.detail
    assert claim.detail.startswith("Every measured point of euclidean (structured) was left out")
    assert "did not run" not in claim.detail
    # a run the sweep did not measure at all stays not measured, and is the one named
    df, meta = make_sweep(Machine(), runs=RUNS[:2], repeats=6)
    gone = df["method"] == "layerwise"
    _in_stretches_that_disagree(df, gone)
    claim = by_id(va.validate(df, meta, n_boot=50), "crossover-width")
    assert claim.verdict == "not measured", claim.detail
    assert claim.detail.startswith("The sweep did not run full with the structured kernel.")


def test_a_ratio_of_two_times_a_side_decides_no_claim():
    """Found by a hunt: the bootstrap median of two times is either time or their mean, so
    the 95% interval of a ratio of two such medians held the true ratio in 64% of draws;
    generic layerwise planted 2.5x slower than structured failed structured-vs-generic at
    1.76 [1.54, 1.99] on two repeat times a point (1 of 60 seeds at 15% noise)."""
    machine = Machine(t0=0.0, t_module=0.0, rates={"products": 1e30, "cholesky": 1e30})
    machine.extra = lambda m, k, s: (2.5e-4 if k == "generic" else 1e-4) * s.widths[0]
    runs = (("layerwise", "structured"), ("layerwise", "generic"))
    df, meta = make_sweep(machine, runs=runs, repeats=2, noise=0.15, seed=14)
    claim = by_id(va.validate(df, meta, n_boot=2000, seed=14), "structured-vs-generic")
    assert claim.verdict == "too noisy" and claim.to_dict()["low"] is None, claim.detail
    assert "With 2 and 2 repeat times there" in claim.detail
    assert "Sweep with --repeats 3 or more" in claim.detail
