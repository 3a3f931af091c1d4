"""Device and CPU-thread helpers shared by the evaluators, benchmarks and the band solver."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from essl.errors import UserError


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A user's ``--device`` as a torch.device (None: :func:`default_device`); unknown or unavailable -> UserError."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: unknown device {str(device)!r} (use cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {device} requested but CUDA is not available")
    return device


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (None: unchanged), then restore the previous setting.

    A process-wide torch setting, so not thread-safe. Small CPU workloads on a shared machine run several times
    faster on one thread (measured in ``essl bench``)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
