"""glibc malloc settings for training on CPU (no torch import: the CLI calls this before anything else).

By default glibc serves large blocks (activations, gradients) with fresh ``mmap`` pages and gives them back to the
kernel when they are freed, so every training step faults its whole working set in again: 130 thousand minor
page faults (~0.5 GB) per CIFAR ResNet-18 step at batch 64 here. Raising the mmap threshold and switching heap
trimming off keeps freed memory in the process for the next step. Measured side by side, three processes each,
2-core CPU: SimCLR step 2.91 s → 2.45 s, E-SimCLR step 4.87 s → 3.99 s, 0 page faults per step. Resident memory
then stays at its peak between steps, which a training process reaches every step anyway. Opt out with
``ESSL_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30
"""Blocks up to 1 GiB come from the heap (glibc's default threshold adapts only up to 32 MiB)."""
TRIM_THRESHOLD_BYTES = 2**31 - 1
"""Free heap memory is given back to the kernel only above 2 GiB at its top."""


def tune_malloc() -> bool:
    """Apply the settings of the module docstring to this process; True when they took effect (Linux with glibc
    and ``ESSL_MALLOC_TUNING`` not "0"), False otherwise. Safe to call more than once."""
    if os.environ.get("ESSL_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    trim_ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(mmap_ok) and bool(trim_ok)
