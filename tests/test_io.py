"""essl.io (issue 12): the job lock, output-path checks before any work, temporary-file names."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from essl.errors import UserError
from essl.io import FileLock, LockHeld, atomic_write_text, check_output_dir, check_output_file, stage_bytes, temp_files


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_its_holder_and_refuses_a_second_taker(tmp_path):
    path = tmp_path / ".essl.lock"
    with FileLock(path, "essl pretrain runs/x"):
        assert path.read_text() == f"{socket.gethostname()} {os.getpid()} essl pretrain runs/x\n"
        with pytest.raises(LockHeld) as info:
            FileLock(path, "another").acquire()
        assert f"{tmp_path} is in use by essl pretrain runs/x (pid {os.getpid()} on {socket.gethostname()})" in str(
            info.value)
        assert FileLock(path).live_holder() == f"essl pretrain runs/x (pid {os.getpid()} on {socket.gethostname()})"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".essl.lock"]  # no temporary file left
    assert not path.exists()
    assert FileLock(path).live_holder() is None


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / ".essl.lock"
    path.write_text(f"{socket.gethostname()} {_dead_pid()} essl pretrain (killed)\n")
    assert FileLock(path).live_holder() is None
    with FileLock(path, "new"):
        assert path.read_text().split()[1] == str(os.getpid())
    assert not path.exists()


def test_release_keeps_a_lock_another_process_took_over(tmp_path):
    path = tmp_path / ".essl.lock"
    lock = FileLock(path, "first").acquire()
    path.write_text(f"{socket.gethostname()} 1 second\n")  # pid 1 is alive: the lock is someone else's now
    lock.release()
    assert path.exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / ".essl.lock"
    path.write_text("some-other-host 12345 essl pretrain\n")
    with pytest.raises(LockHeld, match="pid 12345 on some-other-host"):
        FileLock(path).acquire()


def test_output_checks_write_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file", "config key 'output_dir'")
    with pytest.raises(UserError, match="is not a folder"):
        check_output_file(tmp_path / "file" / "out.json", "--json")
    assert check_output_file(tmp_path / "new" / "deeper" / "out.json", "--json").name == "out.json"
    assert check_output_dir(tmp_path / "run", "config key 'output_dir'") == tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # neither folders nor probe files made


def test_temp_files_are_the_writers_own(tmp_path):
    target = tmp_path / "metrics.csv"
    staged = stage_bytes(target, b"step\n")
    (tmp_path / ".metrics.csv.bak").write_text("not ours")
    assert temp_files(target) == [staged.tmp]
    staged.commit()
    assert temp_files(target) == [] and target.read_bytes() == b"step\n"
    atomic_write_text(target, "step,loss\n")
    assert temp_files(target) == []
