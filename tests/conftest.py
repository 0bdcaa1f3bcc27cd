"""Shared fixtures, the ``--run-slow`` switch and the device list."""

from __future__ import annotations

import pytest
import torch

from riemann_core import modules

#: CPU always; CUDA shown as skipped where no GPU is present
DEVICES = [
    pytest.param("cpu", id="dev=cpu"),
    pytest.param(
        "cuda",
        id="dev=cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the large-sample statistical tests marked @pytest.mark.slow",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: large-sample statistical checks, skipped unless --run-slow is given"
    )
    # torch.func's forward mode (hessian = jacfwd(jacrev)) scripts its decompositions
    # (a DeprecationWarning in torch 2.13, a FutureWarning from 2.14)
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global random state."""
    torch.manual_seed(0)


@pytest.fixture
def restore_handlers():
    """Undo ``rc.register_handler`` calls made by a test."""
    saved = dict(modules.STRUCTURED)
    yield
    modules.STRUCTURED.clear()
    modules.STRUCTURED.update(saved)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
