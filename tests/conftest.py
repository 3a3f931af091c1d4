"""Test-wide settings: passive OpenMP waiting (as the `essl` CLI sets it) before torch is imported."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

from essl.malloc import tune_malloc  # noqa: E402

tune_malloc()  # as the `essl` command does
