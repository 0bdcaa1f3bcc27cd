"""Scaling fits: known exponents recovered from synthetic timings, tables, rates."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from riemann_core import costs
from riemann_core.scaling import fit

BASE = {"width": 64, "depth": 2, "out_dim": 10, "batch": 32}
AXES = {
    "width": (16, 32, 64, 128, 256, 512),
    "depth": (1, 2, 4, 8, 16),
    "out_dim": (2, 5, 10, 20, 40),
    "batch": (4, 8, 16, 32, 64, 128),
}
RUNS = (
    ("euclidean", "structured"),
    ("layerwise", "structured"),
    ("layerwise", "generic"),
    ("full", "structured"),
    ("natural", "structured"),
    ("kfac", "structured"),
)


def reference_time(method, kernel, shape):
    """Seconds per call that follow the methods' scaling (docs/methods.md): every claim holds on these."""
    n, d, N = shape.n_params, shape.d, shape.batch
    w, L = shape.widths[0], len(shape.layers)
    return {
        ("euclidean", "structured"): 1e-9 * n,
        ("layerwise", "generic"): 1e-11 * (n * d * d + L * d**3),
        ("layerwise", "structured"): 1e-12 * L * (w * d * d + d**3),
        ("full", "structured"): 1e-11 * (n * n * d + n**3 / 3),
        ("natural", "structured"): 1e-11 * (n * d * d + d**3),
        ("kfac", "structured"): 1e-10 * L * (w**3 + N * w * w),
    }[method, kernel]


def make_sweep(
    time_fn=reference_time,
    *,
    base=BASE,
    axes=AXES,
    runs=RUNS,
    repeats=5,
    noise=0.05,
    flops_error=0.0,
    status_fn=None,
    seed=0,
):
    """A sweep's ``results.csv`` (as a DataFrame) and ``sweep.json``, built from formulas.

    Each run's times are ``time_fn(method, kernel, shape)`` times lognormal noise, one per
    repeat; ``status_fn(method, kernel, point)`` returns a status other than "ok" to plant
    a missing point; counted FLOPs are the model's times ``1 + flops_error``.
    """
    rng = np.random.default_rng(seed)
    points = {tuple({**base, axis: v}[a] for a in fit.AXES) for axis in axes for v in axes[axis]}
    rows = []
    for width, depth, out_dim, batch in sorted(points):
        point = dict(width=width, depth=depth, out_dim=out_dim, batch=batch)
        shape = costs.MLPShape((width,) * (depth + 1) + (out_dim,), batch, out_dim)
        for method, kernel in runs:
            status = status_fn(method, kernel, point) if status_fn else "ok"
            times = []
            if status == "ok":
                t = time_fn(method, kernel, shape)
                times = (t * rng.lognormal(0.0, noise, repeats)).tolist()
            q1, q3 = np.percentile(times, [25, 75]) if times else (math.nan, math.nan)
            model = costs.flops(method, shape, kernel)["total"]
            rows.append(
                dict(
                    method=method,
                    kernel=kernel,
                    **point,
                    device="cpu",
                    dtype="float32",
                    output_metric="exact",
                    n_params=shape.n_params,
                    d=shape.d,
                    time_median_s=float(np.median(times)) if times else math.nan,
                    time_iqr_s=q3 - q1,
                    times_s=json.dumps(times),
                    flops=model * (1 + flops_error) if times else math.nan,
                    flops_model=model,
                    peak_bytes=math.nan,
                    status=status,
                    reason="" if status == "ok" else "planted",
                )
            )
    meta = {"base": dict(base), "axes": {a: list(v) for a, v in axes.items()}}
    meta.update(gemm_flops_per_s=1e11, environment={"device_name": "synthetic"})
    return pd.DataFrame(rows), meta


def noisy(x, fn, repeats=5, sigma=0.05, seed=1):
    rng = np.random.default_rng(seed)
    return [fn(xi) * rng.lognormal(0.0, sigma, repeats) for xi in x]


def test_slope_of_a_noisy_power_law_is_its_exponent():
    n = np.geomspace(1e3, 1e6, 8)
    result = fit.loglog_slope(n, noisy(n, lambda v: 3e-9 * v))
    assert result.slope == pytest.approx(1, abs=0.05)
    assert result.low <= 1 <= result.high
    assert result.high - result.low < 0.2
    assert result.points == 4 and result.x_range == (n[4], n[7])


def test_slope_of_a_cubic_is_three():
    x = [2, 4, 8, 16, 32]
    result = fit.loglog_slope(x, [[1e-6 * v**3] for v in x])
    assert result.slope == pytest.approx(3)
    assert result.low == pytest.approx(3) and result.high == pytest.approx(3)


def test_the_tail_of_two_regimes_shows_the_larger_exponent():
    x = 2.0 ** np.arange(1, 13)
    times = [[v**2 + v**3 / 64] for v in x]  # the cubic takes over at x = 64
    tail = fit.loglog_slope(x, times)
    assert tail.points == 6
    assert 2.8 < tail.slope < 3
    assert tail.high <= 3 + 1e-9  # every local slope is below 3
    assert fit.loglog_slope(x, times, tail=12).slope < 2.6


def test_bootstrap_is_deterministic_given_the_seed():
    x = np.geomspace(10, 1e4, 6)
    y = noisy(x, lambda v: v**2, sigma=0.3)
    assert fit.loglog_slope(x, y, seed=3) == fit.loglog_slope(x, y, seed=3)
    assert fit.loglog_slope(x, y, seed=3) != fit.loglog_slope(x, y, seed=4)


def test_points_with_equal_x_are_pooled():
    result = fit.loglog_slope([1, 2, 2, 4], [[1.0], [4.0], [4.0, 4.0], [16.0]], tail=3)
    assert result.points == 3 and result.slope == pytest.approx(2)


@pytest.mark.parametrize(
    "x, y, kwargs, match",
    [
        ([3, 3, 3], [[1.0], [2.0], [3.0]], {}, "at least 2 distinct x"),
        ([1, 2, 3], [[1.0], [0.0], [3.0]], {}, "times must be positive"),
        ([0, 2, 3], [[1.0], [2.0], [3.0]], {}, "x must be positive"),
        ([1, 2, 3], [[1.0], [], [3.0]], {}, "at least one time sample"),
        ([1, 2], [[1.0]], {}, "2 values but y_samples has 1"),
        ([1, 2, 3], [[1.0], [2.0], [3.0]], {"tail": 4}, "tail must be between 2 and 3"),
        ([1, 2, 3], [[1.0], [2.0], [3.0]], {"n_boot": 0}, "n_boot must be at least 1"),
    ],
)
def test_degenerate_input_is_refused(x, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit.loglog_slope(x, y, **kwargs)


def test_axis_points_vary_one_axis_and_keep_only_ok_rows():
    oom = lambda method, kernel, p: "oom" if p["width"] == 512 else "ok"  # noqa: E731
    df, meta = make_sweep(status_fn=oom)
    rows = fit.axis_points(df, meta["base"], "width")
    assert sorted(rows["width"].unique()) == [16, 32, 64, 128, 256]
    assert (rows[["depth", "out_dim", "batch"]] == [2, 10, 32]).all().all()
    assert (rows["status"] == "ok").all()
    with pytest.raises(ValueError, match="unknown axis 'height'"):
        fit.axis_points(df, meta["base"], "height")


def test_fit_axis_takes_the_axis_or_a_derived_x():
    df, meta = make_sweep()
    by_n = fit.fit_axis(df, meta["base"], "layerwise", "generic", "width", x="n_params")
    assert by_n.slope == pytest.approx(1, abs=0.1)
    by_w = fit.fit_axis(df, meta["base"], "layerwise", "generic", "width")
    assert by_w.slope == pytest.approx(2, abs=0.2)  # n ~ w^2
    by_d = fit.fit_axis(df, meta["base"], "natural", "structured", "batch", x="d")
    assert 1.9 < by_d.slope < 3.1
    with pytest.raises(ValueError, match="method='natural' kernel='generic'"):
        fit.fit_axis(df, meta["base"], "natural", "generic", "width")
    with pytest.raises(ValueError, match="unknown x 'flops'"):
        fit.fit_axis(df, meta["base"], "natural", "structured", "width", x="flops")


def test_a_fit_refuses_to_mix_dtypes():
    df, meta = make_sweep(runs=(("euclidean", "structured"),))
    df.loc[df.index[::2], "dtype"] = "float64"
    with pytest.raises(ValueError, match="mix dtypes"):
        fit.fit_axis(df, meta["base"], "euclidean", "structured", "depth")


def test_fit_table_has_a_row_per_method_kernel_and_axis_with_enough_points():
    # full runs at two widths only: no width row for it
    def two_widths(method, kernel, point):
        return "oom" if method == "full" and point["width"] not in (32, 64) else "ok"

    df, meta = make_sweep(status_fn=two_widths)
    table = fit.fit_table(df, meta, n_boot=200)
    assert list(table.columns[:5]) == ["method", "kernel", "device", "dtype", "output_metric"]
    assert list(table.columns[5:]) == [
        *("axis", "x", "slope", "low", "high", "points", "x_min", "x_max"),
    ]
    full = table[table["method"] == "full"]
    assert set(full["axis"]) == {"depth", "out_dim", "batch"}
    assert len(table) == len(RUNS) * 4 - 1
    assert dict(zip(table["axis"], table["x"])) == fit.FIT_X
    row = table[(table["method"] == "kfac") & (table["axis"] == "depth")].iloc[0]
    # kfac time ~ L = depth + 1 layers: slope 1 against layers
    assert row["x"] == "layers" and (row["x_min"], row["x_max"]) == (5, 17)
    assert row["slope"] == pytest.approx(1, abs=0.05)
    assert row["low"] <= row["slope"] <= row["high"]
    # against depth itself the offset bends it: log(17 / 5) / log(4) over depths 4..16
    by_depth = fit.fit_axis(df, meta["base"], "kfac", "structured", "depth")
    assert by_depth.slope == pytest.approx(math.log(17 / 5) / math.log(4), abs=0.05)


def test_joint_fit_recovers_the_cost_model():
    a, b, c = 2e-12, 5e-11, 1e-4
    model = lambda method, kernel, s: a * s.n_params * s.d**2 + b * s.d**3 + c  # noqa: E731
    df, _ = make_sweep(model, runs=(("layerwise", "generic"), ("natural", "structured")), noise=0)
    table = fit.joint_fit(df)
    assert list(table["method"]) == ["layerwise", "natural"]
    for _, row in table.iterrows():
        assert row["a"] == pytest.approx(a, rel=0.02)
        assert row["b"] == pytest.approx(b, rel=0.02)
        assert row["c"] == pytest.approx(c, rel=0.02)
        assert row["r2"] > 0.9999 and row["r2_log"] > 0.9999
        assert row["points"] == len(df) // 2


def test_joint_fit_keeps_coefficients_non_negative():
    df, _ = make_sweep(lambda m, k, s: 1e-3 / s.d, runs=(("kfac", "structured"),), noise=0)
    row = fit.joint_fit(df).iloc[0]
    assert min(row["a"], row["b"], row["c"]) >= 0


def test_achieved_rates_divide_flops_by_time():
    skip = lambda method, kernel, p: "skipped" if p["width"] == 512 else "ok"  # noqa: E731
    df, meta = make_sweep(runs=(("kfac", "structured"),), status_fn=skip)
    rates = fit.achieved_rates(df, meta["gemm_flops_per_s"])
    ok = rates["status"] == "ok"
    expected = df["flops"][ok] / df["time_median_s"][ok]
    assert np.allclose(rates["flops_per_s"][ok], expected)
    assert np.allclose(rates["fraction_of_gemm"][ok], expected / 1e11)
    assert rates["flops_per_s"][~ok].isna().all()
    assert "flops_per_s" not in df  # the input is left alone
    with pytest.raises(ValueError, match="gemm_flops_per_s must be positive"):
        fit.achieved_rates(df, 0.0)


def test_median_ratio_has_an_interval_around_the_ratio():
    ratio, low, high = fit.median_ratio([4.0, 4.2, 3.8], [1.0, 1.1, 0.9])
    assert ratio == pytest.approx(4.0)
    assert low <= ratio <= high


def test_read_sweep_reads_what_the_sweep_writes(tmp_path):
    df, meta = make_sweep(runs=(("euclidean", "structured"),))
    df.loc[0, "status"] = "oom"
    df.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    back, back_meta = fit.read_sweep(tmp_path)
    assert back_meta == meta
    assert back["reason"].tolist() == df["reason"].tolist()
    pd.testing.assert_frame_equal(fit.fit_table(back, meta), fit.fit_table(df, meta))
