"""A sweep over several devices: fits, claims and reports per device, never mixed; each
device judged against its own rates."""

import json

import numpy as np
import pandas as pd
import pytest
from synthetic import Machine, make_sweep

from riemann_core.measure.timing import RATE_KINDS
from riemann_core.scaling import devices, fit, report, sweep, validate

#: GPU B is three times faster than GPU A at every kind of work, with a third of its overhead
MACHINES = {
    "GPU A": Machine(),
    "GPU B": Machine(
        t0=1e-3 / 3, t_module=1e-4 / 3, rates={"products": 1.5e11, "cholesky": 3e10, "eigh": 9e9}
    ),
}


def five_percent_more(method, kernel, shape, flops):
    return {kind: 1.05 * f for kind, f in flops.items()}


def two_devices(spread_b=0.05):
    """Rows and ``sweep.json`` of two devices; GPU B counts 5% more FLOPs than its model
    (a failing claim) and its rates spread by ``spread_b`` during the sweep."""
    a, meta = make_sweep(MACHINES["GPU A"])
    b, meta_b = make_sweep(
        MACHINES["GPU B"], counted=five_percent_more, rate_spread=spread_b, seed=1
    )
    a = a.assign(device_name="GPU A", host="node1", physical_device="cuda:0")
    b = b.assign(device_name="GPU B", host="node2", physical_device="cuda:3")
    meta["devices"] = {
        name: {
            "environment": {"device_name": name},
            "workers": [f"{host} cuda:0"],
            "device_rates": m.pop("device_rates"),
        }
        for name, host, m in (("GPU A", "node1", meta), ("GPU B", "node2", meta_b))
    }
    del meta["environment"]
    return pd.concat([a, b], ignore_index=True), meta


def test_fits_and_time_models_are_per_device():
    df, meta = two_devices()
    table = fit.fit_table(df, meta, n_boot=50)
    assert set(table["device_name"]) == set(MACHINES)
    for name, rows in df.groupby("device_name"):
        alone = fit.fit_table(rows.drop(columns="device_name"), meta, n_boot=50)
        mine = table[table["device_name"] == name].drop(columns="device_name")
        np.testing.assert_allclose(mine["flops_exponent"], alone["flops_exponent"])
    models = fit.time_model_table(df).set_index(["device_name", "method", "kernel"])
    a, b = (models.loc[(name, "natural", "structured")] for name in MACHINES)
    assert b["rate_products_gflops"] / a["rate_products_gflops"] == pytest.approx(3, rel=0.2)


def test_claims_are_per_device_and_mixing_devices_is_refused():
    df, meta = two_devices()
    with pytest.raises(ValueError, match="mix device_names"):
        validate.validate(df, meta, n_boot=50)
    verdicts = {(n, c.id): c.verdict for n, c in devices.claims(df, meta)}
    assert verdicts["GPU A", "flops-match-model"] == "pass"
    assert verdicts["GPU B", "flops-match-model"] == "fail"
    assert len(verdicts) == 2 * len(validate.validate(df[df["device_name"] == "GPU A"], meta))


def test_a_device_whose_rates_moved_is_too_noisy_and_only_that_one():
    df, meta = two_devices(spread_b=0.5)
    claims = devices.claims(df, meta, seed=0)
    noisy = {name for name, c in claims if c.basis == "time" and c.verdict == "too noisy"}
    assert noisy == {"GPU B"}
    moved = [c for name, c in claims if name == "GPU B" and c.verdict == "too noisy"]
    assert all("rates moved during the sweep" in c.detail for c in moved)


def test_achieved_rates_use_each_device_own_rates():
    df, meta = two_devices()
    rates = devices.achieved_rates(df, meta)
    ok = rates[rates["status"] == "ok"]
    machine = ok["device_name"].map(MACHINES)
    sol = ok["sol_products"] / machine.map(lambda m: m.rates["products"])
    sol += ok["sol_cholesky"] / machine.map(lambda m: m.rates["cholesky"])
    np.testing.assert_allclose(ok["sol_s"], sol)
    np.testing.assert_allclose(ok["time_over_sol"], ok["time_median_s"] / sol)


def test_rows_without_a_device_name_belong_to_the_sweep_device():
    df, meta = make_sweep(runs=(("euclidean", "structured"),))
    df = df.drop(columns=["host", "device_name", "physical_device"])  # an older results.csv
    assert set(devices.named(df, meta)["device_name"]) == {"synthetic"}
    assert devices.device_meta(meta, "synthetic") == meta  # whose rates are at the top
    df["device_name"] = ["cpu model"] * (len(df) - 1) + [np.nan]  # a lost point
    meta["devices"] = {"cpu model": {"device_rates": [], "environment": {}}}
    assert set(devices.named(df, meta)["device_name"]) == {"cpu model"}
    meta["devices"]["other"] = meta["devices"]["cpu model"]
    assert devices.named(df, meta)["device_name"].iloc[-1] == sweep.UNKNOWN


def test_the_summary_says_which_devices_contributed():
    df, meta = two_devices()
    df.loc[0, "status"] = "error"
    table = devices.summary(df, meta).set_index("device")
    assert table.loc["GPU A", "hosts"] == "node1" and table.loc["GPU B", "workers"] == 1
    assert table.loc["GPU A", "points ok"] == table.loc["GPU A", "points"] - 1
    assert table.loc["GPU B", "GEMM GFLOP/s"] == pytest.approx(150)


def test_a_report_per_device_and_an_index(tmp_path, monkeypatch):
    drawn = {}

    def figures(df, meta, rates, out, progress=None):  # the figures have tests of their own
        drawn[out.name] = (set(df["device_name"]), fit.best_rates(meta)["products"])
        return {}

    monkeypatch.setattr(report, "figures", figures)
    df, meta = two_devices(spread_b=0.5)
    df.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    index = report.write_report(tmp_path).read_text()
    for name, slug in (("GPU A", "gpu-a"), ("GPU B", "gpu-b")):
        assert f"[{name}](devices/{slug}/report.md)" in index
        own = (tmp_path / "devices" / slug / "report.md").read_text()
        assert own.startswith(f"# Scaling report: {name}")
        assert drawn[slug] == ({name}, MACHINES[name].rates["products"])
    assert "node1" in index and "node2" in index
    b = (tmp_path / "devices" / "gpu-b" / "report.md").read_text()
    assert "| flops-match-model | fail |" in b
    assert "The device's speed moved during the sweep" in b
    a = (tmp_path / "devices" / "gpu-a" / "report.md").read_text()
    assert "The rates held steady during the sweep." in a


def test_devices_whose_names_share_a_slug_get_a_report_each(tmp_path, monkeypatch):
    """Found by a hunt: "GPU A" and "gpu a" both wrote devices/gpu-a/, one over the other."""
    monkeypatch.setattr(report, "figures", lambda *a, **k: {})
    df, meta = two_devices()
    df["device_name"] = df["device_name"].replace("GPU B", "gpu a")
    meta["devices"]["gpu a"] = meta["devices"].pop("GPU B")
    meta["devices"]["gpu a"]["environment"]["device_name"] = "gpu a"
    df.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    index = report.write_report(tmp_path).read_text()
    for name, slug in (("GPU A", "gpu-a"), ("gpu a", "gpu-a-2")):
        assert f"[{name}](devices/{slug}/report.md)" in index
        own = (tmp_path / "devices" / slug / "report.md").read_text()
        assert own.startswith(f"# Scaling report: {name}")


def test_achieved_rates_of_each_dtype_use_that_dtypes_rates():
    """Found by review: a sweep of float32 and float64 read every point against the median
    of both dtypes' rates (a float32 point's time over its speed of light 2.13 read 1.40)."""
    df, meta = make_sweep(rate_spread=0.0)
    double = df.assign(dtype="float64", time_median_s=2 * df["time_median_s"])
    halved = [
        {
            **s,
            "dtype": "float64",
            **{k: [r / 2 for r in v] for k, v in s.items() if k in RATE_KINDS},
        }
        for s in meta["device_rates"]
    ]
    both = devices.achieved_rates(
        pd.concat([df, double], ignore_index=True),
        {**meta, "device_rates": meta["device_rates"] + halved},
    )
    alone = devices.achieved_rates(df, meta)
    single = both[both["dtype"] == "float32"].reset_index(drop=True)
    pd.testing.assert_series_equal(single["sol_s"], alone["sol_s"])
    ratio = both.loc[both["dtype"] == "float64", "sol_s"].to_numpy() / alone["sol_s"].to_numpy()
    assert np.allclose(ratio[np.isfinite(ratio)], 2.0)


def test_a_measured_point_without_its_device_in_a_sweep_over_several_is_named(tmp_path):
    """Found by a hunt: report blamed the dtype ("sweep.json records no device rates in
    float32"), not the blank device_name of a measured row."""
    df, meta = two_devices()
    df.loc[df.index[df["device_name"] == "GPU B"][0], "device_name"] = ""
    df.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    with pytest.raises(sweep.ResultsFileError, match="a measured point without a device_name"):
        fit.read_sweep(tmp_path)
