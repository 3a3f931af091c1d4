"""Atomic file writes: write to a temporary file beside the target, then rename over it; the job lock.

A killed process never leaves a half-written result under the final name (checkpoints, ``encoder.pt``,
JSON results, figures, ``config.yaml``, ``metrics.csv``). The temporary file is ``.<name>.<random>.tmp<suffix>``
beside the target (:func:`temp_files`, the one place that knows the pattern, finds those a killed writer left).
Files are created with the mode the umask allows (0666 & ~umask), as other tools do, not mkstemp's 0600.

A write that fails is a :class:`~essl.errors.UserError` naming the path and the reason ("no space left on
device"), after the temporary file is removed: the previous file under the name is kept. Output paths can be
checked before any work (:func:`check_output_file`, :func:`check_output_dir`).
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from essl.errors import UserError

TEMP_MARK = ".tmp"  # temporary files are .<name>.<random>.tmp<suffix>
DEFAULT_FILE_MODE = 0o666  # before the umask, as open() and every other tool create files
WRITE_PROBE_PREFIX = ".essl-write-check."


def _reason(err: BaseException) -> str:
    """An OSError's reason in lower case ("no space left on device"), else the exception's first line."""
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno).lower()
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def temp_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files that :func:`atomic_write` makes (and a killed process leaves) for ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*{TEMP_MARK}{path.suffix}"))


def _disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def _write_error(path: Path, err: BaseException) -> UserError:
    kept = f"; the previous {path.name} is kept" if path.exists() else ""
    return UserError(f"cannot write {path}: {_reason(err)}{kept}")


class StagedFile:
    """A complete temporary file beside ``path``, not yet under its name: :meth:`commit` renames it over
    ``path`` (atomic), :meth:`discard` removes it."""

    def __init__(self, tmp: Path, path: Path):
        self.tmp, self.path = tmp, path

    def commit(self) -> Path:
        try:
            os.replace(self.tmp, self.path)
        except OSError as err:
            self.discard()
            raise _write_error(self.path, err) from None
        try:  # the rename itself survives a power cut only once the folder is synced
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def stage_write(path: str | os.PathLike, write: Callable[[str], None]) -> StagedFile:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (same suffix) and fsync it; the file is not
    under its name yet (:class:`StagedFile`). Any failure removes the temporary file; an OSError (or a failure
    on a full file system) is a UserError naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_MARK + path.suffix, dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        os.fchmod(fd, DEFAULT_FILE_MODE & ~current_umask())
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from None
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and _disk_full(path.parent):  # e.g. a library's own error on ENOSPC
            raise _write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise
    return StagedFile(Path(tmp), path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (same suffix), fsync, rename over ``path``."""
    return stage_write(path, write).commit()


def write_bytes(path: str, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` (the one low-level writer of the byte-level functions below)."""
    with open(path, "wb") as fh:
        fh.write(data)


def stage_bytes(path: str | os.PathLike, data: bytes | memoryview) -> StagedFile:
    return stage_write(path, lambda tmp: write_bytes(tmp, data))


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    return stage_bytes(path, data).commit()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _torch_bytes(obj: Any) -> memoryview:
    """``torch.save`` into memory: the file is then written by plain OS writes, whose errors say what failed
    (torch's own writer reports a full disk as "unexpected pos")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def stage_torch_save(obj: Any, path: str | os.PathLike) -> StagedFile:
    return stage_bytes(path, _torch_bytes(obj))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return stage_torch_save(obj, path).commit()


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, what: str) -> None:
    """``folder`` (or, when it does not exist yet, the nearest folder above it) must take a new file."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise UserError(f"{what}: {base} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE_PREFIX, dir=base)
    except OSError as err:
        raise UserError(f"{what}: cannot write in {base} ({_reason(err)})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Before any work: ``path`` can be written as a file (not a folder; its folder exists or can be made and
    takes files). ``what`` names the option in the message, e.g. ``"--json"``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what}: {path} is a folder, expected a file name")
    _check_writable_folder(path.parent, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Before any work: ``path`` is (or can be made as) a folder that takes files."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file, not a folder")
    _check_writable_folder(path, what)
    return path


class LockHeld(UserError):
    """Another live process holds the lock (the message names its host and pid)."""


class FileLock:
    """An exclusive lock on a path for the life of a job (``with FileLock(output_dir / ".essl.lock", "..."):``).

    The lock file holds ``host pid what`` and is created with O_EXCL, so two processes cannot both take it. A lock
    left by a dead process on this host (its pid no longer exists) is stale and taken over; a lock held by a live
    process, or by another host, is a :class:`LockHeld` error naming the holder. The file is removed on release.
    """

    def __init__(self, path: str | os.PathLike, what: str = "essl", resource: str | os.PathLike | None = None):
        self.path = Path(path)
        self.what = what
        self.resource = Path(resource) if resource is not None else self.path.parent  # what the message names
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

    def live_holder(self) -> str | None:
        """Who holds the lock ("what (pid P on HOST)"), or None when nobody does or its process is gone."""
        import socket

        holder = self._holder()
        if holder is None or (holder[0] == socket.gethostname() and not self._alive(holder[1])):
            return None
        return f"{holder[2] or 'a process'} (pid {holder[1]} on {holder[0]})"

    def acquire(self) -> FileLock:
        import socket

        me = f"{socket.gethostname()} {os.getpid()} {self.what}\n"
        for _ in range(3):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if self._create_complete(me):
                    self.held = True
                    return self
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder[0] == socket.gethostname() and not self._alive(holder[1]):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                who = f"{holder[2] or 'a process'} (pid {holder[1]} on {holder[0]})" if holder else "another process"
                raise LockHeld(f"{self.resource} is in use by {who}; wait for it or remove {self.path} if that "
                               "process is gone") from None
            except OSError as err:
                raise UserError(f"cannot lock {self.path}: {err.strerror or err}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return self
        raise LockHeld(f"cannot take the lock {self.path}")

    def _create_complete(self, content: str) -> bool:
        """Create the lock file with its content in one step (a hard link of a complete temporary file), so that
        no process ever sees it empty, even one killed while taking it; FileExistsError when it exists. False
        where the file system has no hard links (the caller then creates it with O_EXCL)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TEMP_MARK + self.path.suffix,
                                   dir=self.path.parent)  # a name temp_files(self.path) finds
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(content)
            os.chmod(tmp, DEFAULT_FILE_MODE & ~current_umask())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise
            except OSError:
                return False
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file, unless another process has taken it over meanwhile (it names that one)."""
        if self.held:
            holder = self._holder()
            if holder is None or holder[1] == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
