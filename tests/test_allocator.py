"""minifn.allocator: freed tensors stay mapped, so allocating them again costs no page faults."""

import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MB tensor a dozen times, then print the median page faults of the next seven
# allocations. The warm-up is that long because torch allocates with posix_memalign, which asks for a little
# more than the block it frees: in some heap layouts (about half the processes, once minifn imported one more
# module) the first six to eight allocations each take new pages, until freed blocks merge (steady after).
PROBE = """
import resource, statistics, sys, torch
from minifn.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_touch_and_free():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(12):
    faults_of_touch_and_free()
print(statistics.median(faults_of_touch_and_free() for _ in range(7)))
"""


def faults_per_allocation(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"})  # no MALLOC_* variables from the caller
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_tensors_are_reused_without_page_faults():
    pages = (64 << 20) // 4096
    assert faults_per_allocation("default") > pages / 2  # glibc unmaps a 64 MB block on free
    assert faults_per_allocation("keep") < pages / 100


def test_the_users_own_malloc_settings_stand(monkeypatch):
    from minifn.allocator import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert keep_freed_memory() is False
