"""The cluster recipes of docs/clusters.md: the SLURM job script as text, and a sweep on
workers started from a job script by dask-jobqueue's local runner (loopback only)."""

import json
import re
from pathlib import Path

import pytest

from riemann_core import cli
from riemann_core.scaling import sweep as sw

jobqueue = pytest.importorskip("dask_jobqueue.local")

DOCS = Path(__file__).parents[2] / "docs" / "clusters.md"
TINY = [
    "--widths",
    "4,6",
    "--depths",
    "1",
    "--out-dims",
    "3",
    "--batches",
    "2",
    "--base",
    "4,1,3,2",
]
TINY += ["--repeats", "1", "--methods", "layerwise,natural", "--quick"]


def recipe(marker: str) -> str:
    """The first Python block of docs/clusters.md that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    return next(block for block in blocks if marker in block)


def test_the_slurm_recipe_asks_for_one_gpu_and_declares_one_device_per_job():
    scope: dict = {}
    exec(recipe("SLURMCluster("), scope)
    with scope["cluster"] as cluster:
        script = cluster.job_script()
        assert cluster.scheduler.allowed_failures == 0
    assert "#SBATCH --gres=gpu:1" in script
    assert re.search(r"#SBATCH -n 1\b", script) and "#SBATCH --cpus-per-task=8" in script
    command = script.strip().splitlines()[-1]
    assert "--resources device=1" in command
    assert "source ~/venvs/riemann-bench/bin/activate" in script


def test_a_sweep_on_workers_from_job_scripts_writes_one_resumable_results_file(tmp_path, capsys):
    with jobqueue.LocalCluster(
        cores=1,
        processes=1,
        memory="2GB",
        worker_extra_args=["--resources", "device=1"],
        scheduler_options={"host": "127.0.0.1", "allowed_failures": 0},
    ) as cluster:
        cluster.scale(jobs=1)  # a CPU host: one worker owns its cores
        sweep = ["sweep", "--scheduler", cluster.scheduler_address, "--out", str(tmp_path), *TINY]
        with pytest.warns(UserWarning, match="default malloc policy"):  # dask's defaults
            assert cli.main(sweep) == 0
            rows = sw.read_results(tmp_path / "results.csv")
            assert cli.main(sweep) == 0
    assert "0 points measured, 6 already there" in capsys.readouterr().out
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    # resumed: the same points, none measured again; only the lines timed in one stretch
    # take new times (found by an audit: this test never ran in CI, and read equal rows)
    retimed = {"time_median_s", "time_iqr_s", "times_s", "spread", "flag", *sw.WHERE}
    same = lambda row: {k: v for k, v in row.items() if k not in retimed}  # noqa: E731
    again = sw.read_results(tmp_path / "results.csv")
    assert [same(r) for r in again] == [same(r) for r in rows]
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert list(meta["devices"]) == [rows[0]["device_name"]]
