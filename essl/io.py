"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A killed process never leaves a half-written result under the final name (checkpoints, ``encoder.pt``,
JSON results, figures, ``config.yaml``). A folder that cannot be written is a UserError naming the path.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from essl.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (same suffix), fsync, rename over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class LockHeld(UserError):
    """Another live process holds the lock (the message names its host and pid)."""


class FileLock:
    """An exclusive lock on a path for the life of a job (``with FileLock(output_dir / ".essl.lock", "..."):``).

    The lock file holds ``host pid what`` and is created with O_EXCL, so two processes cannot both take it. A lock
    left by a dead process on this host (its pid no longer exists) is stale and taken over; a lock held by a live
    process, or by another host, is a :class:`LockHeld` error naming the holder. The file is removed on release.
    """

    def __init__(self, path: str | os.PathLike, what: str = "essl"):
        self.path = Path(path)
        self.what = what
        self.held = False

    def _holder(self) -> tuple[str, int, str] | None:
        try:
            host, pid, *rest = self.path.read_text().split(maxsplit=2)
            return host, int(pid), rest[0].strip() if rest else ""
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> FileLock:
        import socket

        me = f"{socket.gethostname()} {os.getpid()} {self.what}\n"
        for _ in range(3):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder[0] == socket.gethostname() and not self._alive(holder[1]):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                who = f"{holder[2] or 'a process'} (pid {holder[1]} on {holder[0]})" if holder else "another process"
                raise LockHeld(f"{self.path.parent} is in use by {who}; wait for it or remove {self.path} if that "
                               "process is gone") from None
            except OSError as err:
                raise UserError(f"cannot lock {self.path}: {err.strerror or err}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return self
        raise LockHeld(f"cannot take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
