"""essl.malloc: with the tuning a freed large block is reused without new page faults; without it glibc hands the
block back to the kernel and the next allocation faults every page in again (the reference: the same program
with ESSL_MALLOC_TUNING=0)."""

import os
import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
from essl.malloc import tune_malloc
applied = tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = 64 * 2**20
for _ in range(2):  # warm up: the first allocation faults in any case
    b = bytearray(block); del b
f0 = faults()
for _ in range(5):
    b = bytearray(block); del b  # bytearray(n) writes zeros: every page is touched
print(applied, (faults() - f0) / 5)
"""


def _run(env_value: str) -> tuple[bool, float]:
    env = dict(os.environ, ESSL_MALLOC_TUNING=env_value)
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    applied, per_alloc = out.stdout.split()
    return applied == "True", float(per_alloc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_malloc_reuses_freed_memory_without_page_faults():
    applied, tuned = _run("1")
    off, plain = _run("0")
    assert applied and not off
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert plain > 0.5 * pages  # glibc default: mmap'd, returned, faulted in again
    assert tuned < 0.01 * pages
