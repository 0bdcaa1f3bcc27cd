"""The environment record."""

import torch

from riemann_core.measure import environment


def test_environment_record_names_what_a_report_needs():
    env = environment.environment("cpu")
    for key in ("commit", "torch", "device_name", "cpu", "threads", "blas", "python"):
        assert env[key] not in ("", None)
    assert env["torch"] == torch.__version__
