"""Peak memory on the host and on CUDA."""

import pytest
import torch

from riemann_core.measure import memory


def test_host_peak_is_positive_and_cuda_peak_needs_cuda():
    assert memory.host_peak_rss_bytes() > 0
    with pytest.raises(ValueError, match="needs a CUDA device"):
        memory.cuda_peak_bytes(lambda: None, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_sees_an_allocation():
    n = 1 << 20
    peak = memory.cuda_peak_bytes(lambda: torch.empty(n, device="cuda"), "cuda")
    assert peak >= 4 * n


@pytest.mark.skipif(memory.host_peak_bytes(lambda: None) is None, reason="needs /proc")
def test_host_peak_sees_an_allocation_of_known_size():
    """What the sweeps read on the host: 128 MiB allocated and written (so resident) by
    the call show as a rise of about that much (pages the allocator kept resident may be
    reused) and no more than it plus 64 MiB of slack for the interpreter; a call that
    allocates nothing shows far less."""
    size = 128 * 2**20

    def allocate():
        torch.ones(size // 4)  # float32, every page written

    peak = memory.host_peak_bytes(allocate)
    assert 0.95 * size <= peak <= size + 64 * 2**20
    assert memory.host_peak_bytes(lambda: None) < 16 * 2**20


def test_host_peak_sees_a_call_s_allocation_again_after_it_was_freed():
    n = 4 << 20  # 16 MiB of float32, touched so that the pages are resident

    def allocate():
        torch.ones(n)

    for _ in range(3):  # freed: glibc keeps it for the next call, whose rise would be 0
        allocate()
    peak = memory.host_peak_bytes(allocate)
    if peak is not None:  # Linux
        assert peak >= 0.9 * 4 * n


@pytest.mark.skipif(not memory.reset_host_peak(), reason="needs /proc/self/clear_refs")
def test_reset_host_peak_restarts_the_peak_asv_reads():
    """asv's ``peakmem`` reads ``ru_maxrss``: after a 256 MiB block is freed, restarting
    the peak brings it back to about what is resident (found by review: the benchmarks'
    peaks held their first call's one-time memory and their setup's)."""
    import resource

    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    block = torch.ones(64 * 2**20)  # 256 MiB of float32, every page written
    high = maxrss()
    del block
    assert memory.reset_host_peak()
    assert maxrss() < high - 200 * 2**20
