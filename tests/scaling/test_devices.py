"""A sweep over several devices: fits, claims and reports per device, never mixed."""

import json

import numpy as np
import pandas as pd
import pytest
from test_fit import make_sweep

from riemann_core.scaling import devices, fit, report, validate

RATES = {"GPU A": 1e11, "GPU B": 4e11}


def two_devices():
    """Rows of two devices; GPU B's counted FLOPs are 5% off the model (a failing claim)
    and its times are 3 times shorter."""
    a, meta = make_sweep()
    b, _ = make_sweep(flops_error=0.05, seed=1)
    b["time_median_s"] /= 3
    b["times_s"] = [json.dumps((np.asarray(json.loads(t)) / 3).tolist()) for t in b["times_s"]]
    a = a.assign(device_name="GPU A", host="node1", physical_device="cuda:0")
    b = b.assign(device_name="GPU B", host="node2", physical_device="cuda:3")
    meta["devices"] = {
        name: {"gemm_flops_per_s": rate, "environment": {"device_name": name}, "workers": {}}
        for name, rate in RATES.items()
    }
    return pd.concat([a, b], ignore_index=True), meta


def test_fits_are_per_device():
    df, meta = two_devices()
    table = fit.fit_table(df, meta, n_boot=50)
    assert set(table["device_name"]) == set(RATES)
    for name, rows in df.groupby("device_name"):
        alone = fit.fit_table(rows.drop(columns="device_name"), meta, n_boot=50)
        mine = table[table["device_name"] == name].drop(columns="device_name")
        np.testing.assert_allclose(mine["slope"], alone["slope"])
    joint = fit.joint_fit(df)
    a = joint[(joint["device_name"] == "GPU A") & (joint["method"] == "natural")]["a"].item()
    b = joint[(joint["device_name"] == "GPU B") & (joint["method"] == "natural")]["a"].item()
    assert a / b == pytest.approx(3, rel=0.1)


def test_claims_are_per_device_and_mixing_devices_is_refused():
    df, meta = two_devices()
    with pytest.raises(ValueError, match="mix device_names"):
        validate.validate(df, meta, n_boot=50)
    verdicts = {(n, c.id): c.verdict for n, c in devices.claims(df, meta)}
    assert verdicts["GPU A", "flops-match-model"] == "pass"
    assert verdicts["GPU B", "flops-match-model"] == "fail"
    assert len(verdicts) == 2 * len(validate.validate(df[df["device_name"] == "GPU A"], meta))


def test_achieved_rates_use_each_device_own_gemm_rate():
    df, meta = two_devices()
    rates = devices.achieved_rates(df, meta)
    ok = rates[rates["status"] == "ok"]
    expected = ok["flops"] / ok["time_median_s"] / ok["device_name"].map(RATES)
    np.testing.assert_allclose(ok["fraction_of_gemm"], expected)


def test_rows_without_a_device_name_belong_to_the_sweep_device():
    df, meta = make_sweep(runs=(("euclidean", "structured"),))
    assert set(devices.named(df, meta)["device_name"]) == {"synthetic"}  # an older results.csv
    df["device_name"] = ["cpu model"] * (len(df) - 1) + [np.nan]  # a lost point
    meta["devices"] = {"cpu model": {"gemm_flops_per_s": 1e9, "environment": {}}}
    assert set(devices.named(df, meta)["device_name"]) == {"cpu model"}
    meta["devices"]["other"] = meta["devices"]["cpu model"]
    assert devices.named(df, meta)["device_name"].iloc[-1] == devices.UNKNOWN


def test_the_summary_says_which_devices_contributed():
    df, meta = two_devices()
    df.loc[0, "status"] = "error"
    table = devices.summary(df, meta).set_index("device")
    assert table.loc["GPU A", "hosts"] == "node1" and table.loc["GPU B", "workers"] == 1
    assert table.loc["GPU A", "points ok"] == table.loc["GPU A", "points"] - 1
    assert table.loc["GPU B", "GEMM GFLOP/s"] == 400


def test_a_report_per_device_and_an_index(tmp_path, monkeypatch):
    drawn = {}

    def figures(df, meta, out):  # the figures have tests of their own
        drawn[out.name] = (set(df["device_name"]), meta["gemm_flops_per_s"])
        return {}

    monkeypatch.setattr(report, "figures", figures)
    df, meta = two_devices()
    df.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    index = report.write_report(tmp_path).read_text()
    for name, slug in (("GPU A", "gpu-a"), ("GPU B", "gpu-b")):
        assert f"[{name}](devices/{slug}/report.md)" in index
        own = (tmp_path / "devices" / slug / "report.md").read_text()
        assert own.startswith(f"# Scaling report: {name}")
        assert drawn[slug] == ({name}, RATES[name])
    assert "node1" in index and "node2" in index
    claims = (tmp_path / "devices" / "gpu-b" / "report.md").read_text().split("## Claims")[1]
    assert "| flops-match-model | fail |" in claims
