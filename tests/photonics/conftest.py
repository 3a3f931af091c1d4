"""Photonics tests: one torch thread and one BLAS thread (numpy, for legume) per test.

The eigenproblems are small; oversubscribed threads on a shared 2-core machine slowed these tests down by 10-100x.
torch's OpenMP runtime is left to torch: a threadpoolctl limit on it made torch's eigensolvers 8x slower (see
essl.eval.bench_solver._threads)."""

import pytest
from threadpoolctl import threadpool_limits

from essl.photonics import pwe


@pytest.fixture(autouse=True)
def _one_thread():
    with pwe.cpu_threads(1), threadpool_limits(1, user_api="blas"):
        yield
