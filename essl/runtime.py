"""Device and CPU-thread helpers, and a small process pool, shared by the evaluators, benchmarks and the solver."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Task:
    """One unit of work: a module-level function and its (picklable) arguments; ``cost`` orders the queue."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    cost: float = 1.0


def run_tasks(tasks: Sequence[Task], jobs: int, log: Callable[[str], None], start: float) -> dict[str, Any]:
    """Run ``tasks`` on ``jobs`` worker processes (inline for one), largest cost first; returns name -> result.

    Workers are spawned (a fresh interpreter each: no inherited torch threads or CUDA state); every finished task is
    logged with the seconds since ``start`` (a ``time.perf_counter()`` value). The results do not depend on
    ``jobs``: each task is deterministic given its arguments.
    """
    order = sorted(tasks, key=lambda t: -t.cost)
    results: dict[str, Any] = {}

    def done(name: str, t0: float, value: Any) -> None:
        results[name] = value
        log(f"[{time.perf_counter() - start:7.1f} s] {name}: {time.perf_counter() - t0:.1f} s")

    if jobs <= 1 or len(order) <= 1:
        for t in order:
            t0 = time.perf_counter()
            done(t.name, t0, t.fn(*t.args))
        return results
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        pending = {pool.submit(t.fn, *t.args): (t.name, time.perf_counter()) for t in order[:jobs]}
        queue = list(order[jobs:])
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                name, t0 = pending.pop(fut)
                done(name, t0, fut.result())
                if queue:
                    nxt = queue.pop(0)
                    pending[pool.submit(nxt.fn, *nxt.args)] = (nxt.name, time.perf_counter())
    return results
