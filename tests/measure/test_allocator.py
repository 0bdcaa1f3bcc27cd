"""The C allocator's policy for timed processes: glibc keeps what it frees."""

import os
import platform
import subprocess
import sys

import pytest

from riemann_core.measure import allocator
from riemann_core.measure.environment import environment

GLIBC = platform.libc_ver()[0] == "glibc"

# page faults of allocating, touching and freeing a 64 MiB tensor (over glibc's largest
# mmap threshold, 32 MiB): the last three of eight rounds, after the heap has settled
FAULTS = r"""
import resource, sys, torch
from riemann_core.measure import allocator
print(allocator.policy())
if sys.argv[1] == "keep":
    print(allocator.keep_freed_memory(), allocator.policy())
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del t
print(sum(faults[-3:]))
"""


def run(mode: str, **extra) -> list[str]:
    """The script's output in a process started without the policy's variables (a dask
    nanny or ``riemann-bench`` in this process may have set them here), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in allocator.KEEP}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode],
        capture_output=True,
        text=True,
        env={**env, **extra},
        check=True,
    )
    return out.stdout.split()


@pytest.fixture(scope="module")
def default_faults():
    """Faults of the last three rounds under glibc's defaults: one per 4 KiB page (16,384
    per round), fewer with transparent huge pages, but every round maps the block anew."""
    out = run("default")
    assert out[0] == "default" and int(out[-1]) >= 300
    return int(out[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc policy")
def test_kept_memory_is_reused_without_page_faults(default_faults):
    kept = run("keep")
    assert kept[:3] == ["default", "True", "keep"]  # "keep freed" split by whitespace
    assert int(kept[-1]) * 20 < default_faults


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc policy")
def test_a_process_started_with_the_variables_runs_under_the_policy(default_faults):
    out = run("default", **allocator.KEEP)
    assert out[:2] == ["keep", "freed"] and int(out[-1]) * 20 < default_faults


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc policy")
def test_glibc_tunables_for_malloc_are_reported_not_taken_for_the_policy():
    tuned = run("default", **allocator.KEEP, GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert tuned[0] == "tunables"


def test_the_environment_record_names_the_policy():
    assert environment()["malloc"] == allocator.policy()
    assert allocator.policy() in ("keep freed", "default", "not glibc")
