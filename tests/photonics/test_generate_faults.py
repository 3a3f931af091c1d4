"""Generation faults and scale-out: killed 10 times at chosen points and resumed (identical to an uninterrupted run),
a full disk before and during a run, two processes on one output, the umask, sharded generation + merge (identical
to one run), and the user errors of the generator.

The solver is the real one (essl.photonics.dos.compute_labels) with tiny settings. The killed sessions run in
processes forked from a server that has imported essl once (multiprocessing's forkserver), so a session costs
milliseconds, not seconds of imports; each tells the parent when it reaches its kill point and waits there for the
SIGKILL, so every kill lands exactly where it was chosen (also half-way through a chunk's writes).
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import signal
import traceback
from pathlib import Path

import h5py
import numpy as np
import pytest

import essl
from essl.errors import UserError
from essl.photonics import dataset
from essl.photonics.dataset import generate, lock_path, merge, open_dataset, shard_range
from essl.photonics.unitcell import generate_cells

TINY = {"kgrid": 4, "cutoff": 2, "n_bands": 10, "method": "gaussian"}
"""Fast solver settings (direct solver: 8 k-points)."""
TINY_REDUCED = {"kgrid": 12, "cutoff": 2, "n_bands": 10}
"""Small settings on which p1 cells (72 k-points) take the batched reduced-basis solver and GGR DOS."""
N_KILLS = 10
SCHEDULE_SEED = 7
SESSION_TIMEOUT = 120  # seconds a session may take to reach its kill point or its end
HANG_SECONDS = 600  # a session at its kill point waits this long for the SIGKILL
CHUNK_EVENTS = ("solve", "eps", "labels", "flushed", "committed")
"""Kill points of a chunk: in the solver, after the maps are written (before the labels), after the labels,
after the flush (before ``completed`` moves), after the commit."""
KILL_N, KILL_CHUNK = 16, 1

_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["essl.photonics.dataset", "essl.photonics.dos", "h5py", "torch"])


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def assert_same_file(got_path, want_path, ignore_attrs=()):
    got, got_attrs = read_all(got_path)
    want, want_attrs = read_all(want_path)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert got[key].tobytes() == want[key].tobytes(), key  # bit for bit
    drop = set(ignore_attrs)
    assert {k: v for k, v in got_attrs.items() if k not in drop} == {
        k: v for k, v in want_attrs.items() if k not in drop
    }


# ---- killed and resumed ------------------------------------------------------------------------------------------


def _session(conn, out: str, kill: tuple[str, int] | None) -> None:
    """Generate ``out``; at the ``kill`` = (event, occurrence) point, tell the parent and wait to be killed."""
    try:
        import torch

        torch.set_num_threads(1)
        from essl.photonics import dataset as ds

        seen: dict[str, int] = {}

        def event(name: str) -> None:
            seen[name] = seen.get(name, 0) + 1
            if kill is not None and kill[0] == name and seen[name] == kill[1]:
                conn.send(("fault", name))
                import time

                time.sleep(HANG_SECONDS)

        compute_labels, label_settings = ds._solver()

        def solver(eps, **kwargs):
            event("solve")
            return compute_labels(eps, **kwargs)

        ds._solver = lambda: (solver, label_settings)
        replace = os.replace

        def faulty_replace(src, dst):
            if str(src).endswith(".partial.new"):
                event("create")  # the new partial file is complete, not yet under its name
            elif str(dst) == out:
                event("rename")  # the finished, validated file, not yet under its final name
            return replace(src, dst)

        ds.os.replace = faulty_replace
        validate = ds.validate_file

        def faulty_validate(*args, **kwargs):
            event("validate")
            return validate(*args, **kwargs)

        ds.validate_file = faulty_validate
        try:
            ds.generate(out, "levelset", KILL_N, labels=True, seed=5, chunk=KILL_CHUNK, progress=False,
                        _commit_hook=event, **TINY)
        except UserError as err:
            conn.send(("user-error", str(err)))
            return
        conn.send(("done", None))
    except BaseException:  # noqa: B036 - anything else is reported to the parent as a failure
        conn.send(("crash", traceback.format_exc()))


def _run_session(out: Path, kill: tuple[str, int] | None) -> str:
    parent, child = _CONTEXT.Pipe()
    proc = _CONTEXT.Process(target=_session, args=(child, str(out), kill))
    proc.start()
    try:
        if not parent.poll(SESSION_TIMEOUT):
            raise AssertionError(f"session with kill point {kill} did not report in {SESSION_TIMEOUT} s")
        what, detail = parent.recv()
        assert what in ("fault", "done"), (what, detail)
        if what == "fault":
            os.kill(proc.pid, signal.SIGKILL)
        return what
    finally:
        proc.join(timeout=SESSION_TIMEOUT)
        if proc.is_alive():  # pragma: no cover
            proc.kill()
            proc.join()


def _schedule(rng: random.Random) -> list[tuple[str, int]]:
    """10 kill points: while the partial file is created; 7 at chunk events in random order, at most 2 chunks into
    a session so that the chunks last, among them at least one half-way through a chunk's writes ("eps": maps
    written, labels not) and one before the flush ("labels"), the others drawn at random; during the final
    validation; and with the finished file not yet renamed."""
    middle = [(e, rng.randint(1, 2)) for e in ("eps", "labels")]
    middle += [(rng.choice(CHUNK_EVENTS), rng.randint(1, 2)) for _ in range(N_KILLS - 5)]
    rng.shuffle(middle)
    return [("create", 1), *middle, ("validate", 1), ("rename", 1)]


def test_killed_ten_times_then_resumed_is_identical_to_an_uninterrupted_run(tmp_path):
    out = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    schedule = _schedule(random.Random(SCHEDULE_SEED))
    assert {e for e, _ in schedule} >= {"eps", "labels"}  # kills half-way through a chunk's writes
    completed = []
    for kill in schedule:
        assert _run_session(out, kill) == "fault", kill
        assert not out.exists()  # the final name only ever holds a complete file
        if partial.exists():
            with h5py.File(partial, "r") as f:  # every kill leaves a readable file with whole chunks
                completed.append(int(f.attrs["completed"]))
        assert lock_path(out).exists()  # the killed process's lock: stale, taken over by the next session
    assert completed == sorted(completed) and 0 < completed[-1] == KILL_N  # progress, and the last two at the end
    assert _run_session(out, None) == "done"
    assert sorted(os.listdir(tmp_path)) == ["killed.h5"]  # no partial, temporary or lock file left
    reference = generate(tmp_path / "ref" / "ref.h5", "levelset", KILL_N, labels=True, seed=5, chunk=KILL_CHUNK,
                         progress=False, **TINY)
    assert_same_file(out, reference)


# ---- disk space --------------------------------------------------------------------------------------------------


class _Statvfs:
    def __init__(self, free: int):
        self.f_bavail, self.f_frsize = free, 1


def test_too_big_for_the_disk_is_refused_up_front_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "new" / "deeper" / "big.h5"
    # a billion labelled structures: refused by the real free space of this file system (terabytes needed)
    with pytest.raises(UserError) as info:
        generate(out, "blob", 10**9, labels=True, progress=False)
    message = str(info.value)
    assert str(out) in message and "needs" in message and "TiB" in message and "free" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # not even the folders it would have made
    # a small one on an (apparently) almost full disk: the needed and the free size, in one line
    monkeypatch.setattr(dataset.os, "statvfs", lambda path: _Statvfs(4096))
    need = dataset.file_bytes(dataset._settings("blob", 100, 0, 32, {}, False, {}), 100)
    with pytest.raises(UserError, match=rf"big\.h5 needs {dataset._human(need)} .* only 4\.0 KiB are free"):
        generate(out, "blob", 100, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_mid_run_keeps_what_was_committed_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "full.h5"
    fallocate = os.posix_fallocate
    calls = {"chunks": 0}

    def full_after_two_chunks(fd, offset, length):
        if length and calls["chunks"] >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fallocate(fd, offset, length)

    def counted(done):
        calls["chunks"] += 1

    monkeypatch.setattr(dataset.os, "posix_fallocate", full_after_two_chunks)
    with pytest.raises(UserError) as info:
        generate(out, "levelset", 7, labels=True, seed=3, chunk=2, progress=False, _chunk_callback=counted, **TINY)
    message = str(info.value)
    assert "no space left on device" in message and "full.h5.partial" in message and "4 of 7" in message
    assert sorted(os.listdir(tmp_path)) == ["full.h5.partial"]  # committed work kept, the lock released
    with h5py.File(tmp_path / "full.h5.partial", "r") as f:
        assert int(f.attrs["completed"]) == 4
    monkeypatch.setattr(dataset.os, "posix_fallocate", fallocate)
    generate(out, "levelset", 7, labels=True, seed=3, chunk=2, progress=False, **TINY)
    reference = generate(tmp_path / "ref.h5", "levelset", 7, labels=True, seed=3, chunk=2, progress=False, **TINY)
    assert_same_file(out, reference)


def test_full_disk_before_the_first_commit_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dataset.os, "posix_fallocate", full)
    with pytest.raises(UserError, match="no space left on device.*nothing was committed, nothing is left behind"):
        generate(tmp_path / "made" / "x.h5", "blob", 3, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_an_earlier_runs_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "keep.h5"
    with pytest.raises(KeyboardInterrupt):
        def interrupt(done):
            raise KeyboardInterrupt

        generate(out, "blob", 6, chunk=2, progress=False, _chunk_callback=interrupt)
    partial = tmp_path / "keep.h5.partial"
    before = partial.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("writer exploded")

    monkeypatch.setattr(dataset, "_commit", broken)
    with pytest.raises(RuntimeError, match="writer exploded"):
        generate(out, "blob", 6, chunk=2, progress=False)
    assert partial.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["keep.h5.partial"]


# ---- two processes, permissions ----------------------------------------------------------------------------------


def _hold(conn, out: str) -> None:
    """Generate ``out`` and wait inside the first chunk until told to go on (the other process tries meanwhile)."""
    try:
        from essl.photonics import dataset as ds

        paused = []

        def pause(stage):
            if stage == "eps" and not paused:
                paused.append(stage)
                conn.send(("holding", os.getpid()))
                conn.recv()

        ds.generate(out, "blob", 2, chunk=1, progress=False, _commit_hook=pause)
        conn.send(("done", None))
    except BaseException:  # noqa: B036
        conn.send(("crash", traceback.format_exc()))


def test_second_concurrent_generation_exits_naming_the_holder(tmp_path, capsys):
    from essl.cli import main

    out = tmp_path / "busy.h5"
    parent, child = _CONTEXT.Pipe()
    proc = _CONTEXT.Process(target=_hold, args=(child, str(out)))
    proc.start()
    try:
        assert parent.poll(SESSION_TIMEOUT)
        what, pid = parent.recv()
        assert what == "holding"
        assert main(["phc", "generate", "--kind", "blob", "--n", "2", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"pid {pid}" in err and "essl phc generate" in err and str(out) in err
        parent.send("go on")
        assert parent.poll(SESSION_TIMEOUT) and parent.recv()[0] == "done"
    finally:
        proc.join(timeout=SESSION_TIMEOUT)
    assert sorted(os.listdir(tmp_path)) == ["busy.h5"]
    np.testing.assert_array_equal(open_dataset(out).eps, generate_cells("blob", 2, seed=0))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "stale.h5"
    proc = _CONTEXT.Process(target=os.getpid)
    proc.start()
    proc.join()
    import socket

    lock_path(out).write_text(f"{socket.gethostname()} {proc.pid} essl phc generate --out {out}\n")
    generate(out, "cylinder", 2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["stale.h5"]


def test_files_respect_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        one = generate(tmp_path / "g.h5", "blob", 4, chunk=2, shard=None, progress=False)
        shards = [generate(tmp_path / f"s{i}.h5", "blob", 4, chunk=2, shard=(i, 2), progress=False) for i in (0, 1)]
        merged = merge(tmp_path / "m.h5", shards, progress=False)
    finally:
        os.umask(old)
    for path in (one, *shards, merged):
        assert path.stat().st_mode & 0o777 == 0o664, path


# ---- shards and merge --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "options", "solver", "n", "chunk", "shards"), [
    ("blob", {}, TINY_REDUCED, 9, 2, 3),  # batched reduced basis + GGR
    ("levelset", {"symmetry": "p4m"}, TINY, 7, 3, 2),  # direct solver, real symmetric problems
    ("cylinder", {}, None, 11, 4, 3),  # unlabelled
])
def test_shards_then_merge_equal_one_run(tmp_path, kind, options, solver, n, chunk, shards):
    labels = solver is not None
    common = dict(labels=labels, seed=4, chunk=chunk, progress=False, cell_options=options, **(solver or {}))
    one = generate(tmp_path / "one.h5", kind, n, **common)
    parts = [generate(tmp_path / f"part{i}.h5", kind, n, shard=f"{i}/{shards}", **common) for i in range(shards)]
    for i, part in enumerate(parts):
        ds = open_dataset(part, require_labels=labels)  # each shard is a valid data set of its rows
        start, stop = shard_range(n, (i, shards), chunk)
        assert (ds.attrs["shard"], ds.attrs["shard_start"], ds.attrs["shard_stop"]) == (f"{i}/{shards}", start, stop)
        np.testing.assert_array_equal(ds.eps, generate_cells(kind, stop - start, 4, start=start, **options))
    merged = merge(tmp_path / "all.h5", list(reversed(parts)), progress=False)  # any order
    assert_same_file(merged, one, ignore_attrs=("merged_from",))
    record = json.loads(read_all(merged)[1]["merged_from"])
    assert [r["shard"] for r in record] == [f"{i}/{shards}" for i in range(shards)]
    assert [r["structures"] for r in record] == [list(shard_range(n, (i, shards), chunk)) for i in range(shards)]
    assert json.loads(read_all(merged)[1]["devices"]) == ["cpu"]
    # merging again is a no-op; resuming a finished shard is too
    before = merged.read_bytes()
    assert merge(merged, parts, progress=False) == merged and merged.read_bytes() == before
    assert generate(parts[0], kind, n, shard=f"0/{shards}", **common) == parts[0]


def test_shard_ranges_tile_the_data_set():
    for n, unit, count in ((1, 32, 1), (100, 32, 4), (65, 32, 3), (4096 * 3 + 1, 4096, 2), (10, 1, 10)):
        ranges = [shard_range(n, (i, count), unit) for i in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(start % unit == 0 for start, _ in ranges)
    # 2 chunks over 3 shards: one shard would get none (shard 0: chunks ⌊0·2/3⌋ .. ⌊1·2/3⌋ − 1)
    with pytest.raises(UserError, match=r"--shard 0/3: no structures left .* use at most 2 shards"):
        shard_range(64, (0, 3), 32)


def test_merge_refuses_what_is_not_one_whole_set_of_shards(tmp_path):
    def shard(name, i, count=3, seed=0, n=9):
        return generate(tmp_path / name, "blob", n, seed=seed, chunk=2, shard=(i, count), progress=False)

    s0, s1, s2 = shard("a0.h5", 0), shard("a1.h5", 1), shard("a2.h5", 2)
    other_seed = shard("b1.h5", 1, seed=1)
    other_count = shard("c1.h5", 1, count=2)
    whole = generate(tmp_path / "whole.h5", "blob", 9, chunk=2, progress=False)
    partial = tmp_path / "p.h5"
    cases = [
        ([s0, s2], "shard 1/3 is missing"),
        ([s0, s1, s1, s2], "a1.h5 is given twice"),
        ([s0, other_seed, s2], r"b1\.h5: made with seed=1, not 0 .*not shards of one data set"),
        ([s0, other_count, s2], "c1.h5 is shard 1/2"),
        ([s0, whole, s2], "whole.h5: a whole data set, not a shard"),
        ([s0, tmp_path / "nothing.h5"], "nothing.h5: no such file"),
    ]
    for files, message in cases:
        with pytest.raises(UserError, match=message) as info:
            merge(partial, files, progress=False)
        assert "\n" not in str(info.value)
    copy = tmp_path / "a1-copy.h5"
    copy.write_bytes(s1.read_bytes())
    with pytest.raises(UserError, match="a1-copy.h5 and .*a1.h5 are both shard 1/3"):
        merge(partial, [s0, s1, copy, s2], progress=False)
    assert not partial.exists() and not list(tmp_path.glob(".*"))
    # an existing output: a finished merge is left as it is, a foreign file is refused
    done = merge(tmp_path / "merged.h5", [s0, s1, s2], progress=False)
    before = done.read_bytes()
    assert merge(done, [s0, s1, s2], progress=False) == done and done.read_bytes() == before
    foreign = tmp_path / "foreign.h5"
    foreign.write_bytes(b"not an HDF5 file")
    with pytest.raises(UserError, match="phc merge: .*foreign.h5: exists and is not an essl photonic-crystal"):
        merge(foreign, [s0, s1, s2], progress=False)
    assert foreign.read_bytes() == b"not an HDF5 file"


# ---- user errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 0}, "n=0 must be an integer >= 1"),
    ({"labels": True, "kgrid": 1}, "kgrid=1 must be an integer >= 2"),
    ({"device": "cuda"}, "--device cuda needs --labels"),
    ({"labels": True, "device": "mps"}, "--device 'mps': the band solver runs on cpu or cuda"),
    ({"labels": True, "device": "nonsense"}, "--device 'nonsense': unknown device"),
    ({"shard": "2/2"}, r"--shard 2/2: expected I/N with 0 <= I < N"),
    ({"shard": "half"}, "--shard 'half': expected I/N"),
    ({"shard": (5, 9)}, r"--shard 5/9: no structures left for this shard \(2 structures make 1 chunk"),
    ({"chunk": 0}, "chunk=0 must be an integer >= 1"),
])
def test_user_errors_are_refused_before_any_work(tmp_path, kwargs, message):
    args = {"n": 2, **kwargs}
    with pytest.raises(UserError, match=message) as info:
        generate(tmp_path / "sub" / "x.h5", "blob", progress=False, **args)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_a_gpu_is_a_user_error(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device 'cuda': CUDA is not available on this machine"):
        generate(tmp_path / "x.h5", "blob", 2, labels=True, device="cuda")
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_folder_is_a_user_error(tmp_path):
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(UserError, match="--out: .*dir.h5 is a folder"):
        generate(tmp_path / "dir.h5", "blob", 2)


def test_resumed_run_records_its_device(tmp_path):
    out = tmp_path / "dev.h5"
    with pytest.raises(KeyboardInterrupt):
        def interrupt(done):
            raise KeyboardInterrupt

        generate(out, "blob", 4, labels=True, chunk=2, progress=False, _chunk_callback=interrupt, **TINY)
    partial = tmp_path / "dev.h5.partial"
    with h5py.File(partial, "r+") as f:  # as if the first run had been on a GPU
        f.attrs.modify("devices", dataset._devices_attr(["cuda (Some GPU)"]))
    generate(out, "blob", 4, labels=True, chunk=2, progress=False, **TINY)
    attrs = read_all(out)[1]
    assert json.loads(attrs["devices"]) == ["cuda (Some GPU)", "cpu"]
    assert attrs["essl_version"] == essl.__version__
