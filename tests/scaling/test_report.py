"""The report: its sections and figures, drawn from a sweep's files alone."""

import json

from synthetic import Machine, make_sweep

from riemann_core.scaling import report
from riemann_core.scaling import sweep as sw


def test_every_method_and_kernel_keeps_one_colour_of_its_own():
    point = {"width": 4, "depth": 1, "out_dim": 2, "batch": 2}
    runs = sw.Grid(base=point, axes={a: (v,) for a, v in point.items()}).runs()
    labels = list(dict.fromkeys(f"{r['method']} ({r['kernel']})" for r in runs))
    assert "kfac-default (structured)" in labels
    colours = [report.colour(label) for label in labels]
    assert len(set(colours)) == len(labels)
    assert colours == [report.colour(label) for label in labels]


def test_report_of_a_sweep_on_disk(tmp_path):
    axes = {"width": (8, 16, 32, 64), "depth": (1, 2, 4), "out_dim": (2, 10), "batch": (8, 32)}
    runs = (("layerwise", "structured"), ("layerwise", "generic"), ("kfac", "structured"))
    df, meta = make_sweep(Machine(saturation=1e7), axes=axes, runs=runs)
    df.loc[df.index[5], ["flag", "remeasured"]] = ["spread", 1]
    df["peak_bytes"] = df["peak_bytes_model"] / 2
    df.to_csv(tmp_path / "results.csv", index=False)
    meta["growth"] = {"layerwise/structured/width": "reached: width: time ~ work^1"}
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    text = report.write_report(tmp_path, seed=0).read_text()
    for section in (
        "## Claims",
        "## Device rates",
        "## Growth of the grid",
        "## Re-measured and flagged points",
        "## Time model",
        "## Exponents per axis",
    ):
        assert section in text
    assert "not measured" in text and "| spread |" in text
    assert "The rates held steady during the sweep." in text
    assert "by the growth rule of the version that ran the sweep, which the sweep did not" in text
    for name in ("time", "flops", "memory", "crossover", "achieved_rate", "time_model"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert f"]({name}.png)" in text


def test_the_growth_section_says_the_rule_the_sweep_grew_by(tmp_path):
    """Found by an audit: a report redrawn by a later version described that version's
    growth rule for a sweep an earlier rule grew."""
    axes = {"width": (8, 16, 32), "depth": (1, 2), "out_dim": (2, 10), "batch": (8, 32)}
    df, meta = make_sweep(Machine(saturation=1e7), axes=axes, runs=(("layerwise", "structured"),))
    df.to_csv(tmp_path / "results.csv", index=False)
    meta["growth"] = {"layerwise/structured/width": "reached: width: time ~ work^1"}
    meta["growth_rule"] = "Width and batch grow until the rule of that version is met."
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    text = report.write_report(tmp_path, seed=0).read_text()
    assert "## Growth of the grid\n\nWidth and batch grow until the rule of that version" in text
    assert "This version's rule" not in text


def test_the_growth_section_says_the_rule_of_decisions_kept_from_an_earlier_run(tmp_path):
    """Found by review: a resume by a later version kept the decisions of the methods it
    did not measure, and the report said its own rule had made them."""
    axes = {"width": (8, 16, 32), "depth": (1, 2), "out_dim": (2, 10), "batch": (8, 32)}
    df, meta = make_sweep(Machine(saturation=1e7), axes=axes, runs=(("layerwise", "structured"),))
    df.to_csv(tmp_path / "results.csv", index=False)
    meta["growth"] = {
        "euclidean/structured/width": "reached: width: time ~ work^1",
        "kfac/structured/width": "stopped at the cap",
        "layerwise/structured/width": "reached: width: time ~ work^1",
    }
    meta["growth_rule"] = "Width and batch grow by this run's rule."
    meta["earlier_growth_rules"] = {
        "euclidean/structured/width": "Width grew by an earlier rule.",
        "kfac/structured/width": None,
    }
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    text = report.write_report(tmp_path, seed=0).read_text()
    assert (
        "Width and batch grow by this run's rule. The decisions of euclidean/structured/width "
        "were kept from an earlier run into this directory, which grew by its own rule: Width "
        "grew by an earlier rule. The decisions of kfac/structured/width were kept from an "
        "earlier run into this directory, which grew by the rule of the version that ran it, "
        "which it did not record." in text
    )
