"""Claims against a sweep: pass on data built to satisfy them, fail on planted violations."""

import json

import pytest
from test_fit import RUNS, make_sweep, reference_time

from riemann_core.scaling import validate as va


def verdicts(claims):
    return {c.id: c.verdict for c in claims}


def by_id(claims, cid):
    (claim,) = [c for c in claims if c.id == cid]
    return claim


def full_fits_in_memory(method, kernel, point):
    return "oom" if method == "full" and point["width"] > 128 else "ok"


def test_every_claim_passes_on_data_that_satisfy_it():
    df, meta = make_sweep(status_fn=full_fits_in_memory)
    claims = va.validate(df, meta)
    assert verdicts(claims) == {c.id: "pass" for c in claims}
    assert {c.id for c in claims} >= {
        "generic-layerwise-linear-in-n",
        "layerwise-d2-to-d3",
        "structured-layerwise-in-d",
        "full-n3",
        "crossover-width",
        "structured-vs-generic",
        "flops-match-model",
        "linear-in-depth-layerwise",
    }
    assert va.exit_code(claims) == 0
    n = by_id(claims, "generic-layerwise-linear-in-n")
    assert n.low <= n.measured <= n.high and n.measured == pytest.approx(1, abs=0.1)
    assert "layerwise (generic kernel) along the width axis" in n.detail
    assert "largest 3 of 6 points" in n.detail
    crossover = by_id(claims, "crossover-width")
    assert crossover.measured == 16 and "below the smallest width" in crossover.detail


def planted(method, kernel, time):
    """``reference_time`` with ``method``/``kernel``'s time replaced by ``time(shape)``."""

    def time_fn(m, k, shape):
        return time(shape) if (m, k) == (method, kernel) else reference_time(m, k, shape)

    return time_fn


@pytest.mark.parametrize(
    "cid, sweep",
    [
        (
            "generic-layerwise-linear-in-n",
            dict(time_fn=planted("layerwise", "generic", lambda s: 1e-18 * s.n_params**2 * s.d)),
        ),
        ("flops-match-model", dict(flops_error=0.05)),
        (
            "crossover-width",
            dict(time_fn=planted("full", "structured", lambda s: 1e-15 * s.n_params)),
        ),
        (
            "structured-vs-generic",  # structured only 1.5 times faster
            dict(
                time_fn=planted(
                    "layerwise",
                    "structured",
                    lambda s: reference_time("layerwise", "generic", s) / 1.5,
                )
            ),
        ),
        (
            "linear-in-depth-natural",
            dict(time_fn=planted("natural", "structured", lambda s: 1e-12 * s.n_params**2)),
        ),
    ],
    ids=["layerwise-n^2", "flops-5%-off", "full-always-faster", "factor-1.5", "natural-n^2"],
)
def test_a_planted_violation_fails_its_claim(cid, sweep):
    df, meta = make_sweep(**sweep)
    claims = va.validate(df, meta, n_boot=500)
    assert by_id(claims, cid).verdict == "fail"
    assert va.exit_code(claims) == 1


def test_flops_claim_names_the_worst_row():
    df, meta = make_sweep(runs=(("kfac", "structured"),))
    df.loc[df.index[3], "flops"] *= 1.02
    claim = by_id(va.validate(df, meta, n_boot=100), "flops-match-model")
    assert claim.verdict == "fail" and claim.measured == pytest.approx(0.02)
    row = df.iloc[3]
    assert f"width={row['width']}, depth={row['depth']}" in claim.detail


def test_missing_methods_make_their_claims_inconclusive():
    runs = [r for r in RUNS if r[0] != "full"]
    df, meta = make_sweep(runs=runs)
    claims = va.validate(df, meta, n_boot=200)
    for cid in ("full-n3", "crossover-width"):
        assert by_id(claims, cid).verdict == "inconclusive"
    assert "0 ok points of full (structured kernel)" in by_id(claims, "full-n3").detail
    assert by_id(claims, "generic-layerwise-linear-in-n").verdict == "pass"
    assert va.exit_code(claims) == 0


def test_an_empty_sweep_is_inconclusive_everywhere():
    df, meta = make_sweep()
    claims = va.validate(df.iloc[:0], meta)
    assert set(verdicts(claims).values()) == {"inconclusive"}
    assert all(c.detail for c in claims)
    assert va.exit_code(claims) == 0


def test_crossover_is_where_layerwise_starts_winning_for_good():
    # full beats structured layerwise up to width 64; layerwise wins from 128 on
    def time_fn(method, kernel, shape):
        if (method, kernel) == ("full", "structured"):
            return 1e-6 * shape.widths[0] ** 2
        return 1e-4 * shape.widths[0] if method == "layerwise" else 1e-3

    runs = (("layerwise", "structured"), ("full", "structured"))
    df, meta = make_sweep(time_fn, runs=runs, noise=0)
    claim = by_id(va.validate(df, meta, n_boot=100), "crossover-width")
    assert (claim.verdict, claim.measured, claim.low) == ("pass", 128, 64)
    assert "full / layerwise = 5.12 at width 512" in claim.detail


def test_no_crossover_before_full_runs_out_of_memory_is_inconclusive():
    def time_fn(method, kernel, shape):
        return 1e-9 if method == "full" else 1e-3

    df, meta = make_sweep(
        time_fn,
        runs=(("layerwise", "structured"), ("full", "structured")),
        status_fn=full_fits_in_memory,
    )
    claim = by_id(va.validate(df, meta, n_boot=100), "crossover-width")
    assert claim.verdict == "inconclusive" and "did not run beyond" in claim.detail


def test_structured_factor_near_the_threshold_is_inconclusive():
    time_fn = planted(
        "layerwise", "structured", lambda s: reference_time("layerwise", "generic", s) / 2
    )
    df, meta = make_sweep(time_fn, noise=0.2)
    claim = by_id(va.validate(df, meta, n_boot=500), "structured-vs-generic")
    assert claim.verdict == "inconclusive"
    assert claim.low < 2 < claim.high
    assert "width 512" in claim.detail


def test_d_claims_leave_out_points_past_the_dense_switch():
    # at width 64 the largest block has 64 * 65 = 4160 parameters; beyond d = 4160 the
    # implementation factorises that block instead and time grows like d
    def time_fn(method, kernel, shape):
        if shape.d > 4160:
            return reference_time(method, kernel, shape.__class__(shape.widths, 416, 10)) * (
                shape.d / 4160
            )
        return reference_time(method, kernel, shape)

    axes = {
        "width": (64,),
        "depth": (2,),
        "out_dim": (10,),
        "batch": (4, 8, 16, 32, 64, 128, 512, 1024),
    }
    df, meta = make_sweep(time_fn, axes=axes, runs=(("layerwise", "generic"),))
    claim = by_id(va.validate(df, meta, n_boot=200), "layerwise-d2-to-d3")
    assert claim.verdict == "pass"
    assert "of 6 points with d <= max_a n_a (8 in all)" in claim.detail


@pytest.mark.parametrize(
    "estimate, low, high, verdict",
    [
        (1.0, 0.9, 1.1, "pass"),
        (1.2, 0.7, 1.7, "pass"),
        (1.2, 0.5, 1.9, "inconclusive"),  # the estimate is in the band, but too noisy
        (1.4, 1.2, 1.6, "inconclusive"),
        (0.7, 0.6, 0.8, "inconclusive"),
        (1.5, 1.3, 1.7, "fail"),
        (0.3, 0.2, 0.7, "fail"),
    ],
)
def test_band_verdict(estimate, low, high, verdict):
    assert va.band_verdict(estimate, low, high, (0.75, 1.25)) == verdict


def test_validate_refuses_a_sweep_it_cannot_read():
    df, meta = make_sweep(runs=(("euclidean", "structured"),))
    with pytest.raises(ValueError, match="no 'base' point"):
        va.validate(df, {})
    with pytest.raises(ValueError, match="lack the column"):
        va.validate(df.drop(columns="d"), meta)
    df.loc[df.index[0], "device"] = "cuda"
    with pytest.raises(ValueError, match="mix devices"):
        va.validate(df, meta)


def test_claims_are_written_as_a_json_list(tmp_path):
    df, meta = make_sweep(runs=[r for r in RUNS if r[0] != "full"])
    claims = va.validate(df, meta, n_boot=100)
    path = va.write_claims(claims, tmp_path / "out" / "claims.json")
    records = json.loads(path.read_text())
    assert [r["id"] for r in records] == [c.id for c in claims]
    assert set(records[0]) == {
        "id",
        "claim",
        "expected",
        "measured",
        "low",
        "high",
        "verdict",
        "detail",
    }
    crossover = next(r for r in records if r["id"] == "crossover-width")
    assert crossover["measured"] is None and crossover["verdict"] == "inconclusive"


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
