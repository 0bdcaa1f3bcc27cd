"""The riemann-bench command line: conventions and the demo."""

import json

import pytest

from riemann_core import cli


@pytest.mark.parametrize(
    "command",
    ["demo", "targets", "sweep", "fit", "validate", "report", "run", "train", "stability"],
)
def test_every_subcommand_has_the_common_options_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--device", "--out", "--quick", "--seed"):
        assert option in text
    assert f"riemann-bench {command}" in text.split("example:")[1]


def test_unavailable_device_is_a_clear_usage_error(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--device", "cuda"])
    assert exit_.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_demo_quick_writes_agreeing_directions(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "demo.json").read_text())
    rows = {(r["method"], r["kernel"]): r for r in record["results"]}
    assert {m for m, _ in rows} == {"euclidean", "layerwise", "full", "natural", "kfac"}
    assert rows["natural", "structured"]["rel_diff_to_full"] < 1e-10
    structured = rows["layerwise", "structured"]["rel_diff_to_full"]
    assert rows["layerwise", "generic"]["rel_diff_to_full"] == pytest.approx(structured, rel=1e-8)
    assert record["environment"]["torch"]
    assert "natural" in capsys.readouterr().out
