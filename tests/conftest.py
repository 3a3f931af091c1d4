"""Test-wide settings: passive OpenMP waiting (as the `essl` CLI sets it) before torch is imported."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")
