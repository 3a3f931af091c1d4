"""Fault tolerance (issues 6 and 12): kill -9 and resume, atomic checkpoints, a diverging loss, the resume rules,
a full disk, file modes.

Kill-and-resume: ``essl pretrain`` runs in a subprocess; the test polls ``last.ckpt`` (every poll must load with
``weights_only=True``: a torn file would fail), SIGKILLs the process once a checkpoint with epoch >= 1 exists,
leaves a torn temporary file beside it (named as the atomic writer names them), and resumes in-process with
``resume=true``. The resumed run must say "resuming ... (epoch E, step S)", remove the torn file, end at the same
global step as an uninterrupted run of the same config and reach bit-identical weights (encoder.pt) and optimiser
state, from an epoch boundary and from the middle of an epoch alike (the training loader is resumable).
tests/test_kill.py kills at chosen points instead, ten times in one run.

Resume rules: every metrics row survives any number of resumes; a larger trainer.max_epochs extends a run; a
finished run resumed with the same settings changes nothing; a resume with other settings is refused (exit 2,
the key named) and changes nothing.

All training here runs on one intra-op thread (in-process and in the subprocess): the same arithmetic in every
run, and no OpenMP spin-waiting when the machine is busy.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from essl.cli import main
from essl.io import temp_files
from essl.module import ESSLModule
from essl.pretrain import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/digits/e-simclr.yaml")
BATCHES = 3  # per epoch
EPOCHS = 10
TOTAL_STEPS = BATCHES * EPOCHS
COMMON = [
    f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={BATCHES}", "data.batch_size=16",
    "data.image_size=16", "equivariance.crop_size=8", "backbone.kwargs.width=4", "equivariance.hidden_dim=16",
    "method.kwargs.hidden_dim=16", "progress=false", "trainer.deterministic=true", "seed=3", "data.num_workers=0",
]
POLL_SECONDS = 0.02
RUN_TIMEOUT = 300


@pytest.fixture(autouse=True)
def _one_thread_and_restore_determinism():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _pretrain(run: Path, *extra: str) -> int:
    return main(["pretrain", CONFIG, f"output_dir={run}", *COMMON, *extra])


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _encoder_weights(run: Path) -> dict[str, torch.Tensor]:
    return _load(run / "encoder.pt")["state_dict"]


def _momentum_buffers(ckpt: dict) -> list[torch.Tensor]:
    state = ckpt["optimizer_states"][0]["state"]
    return [state[k]["momentum_buffer"] for k in sorted(state)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (checkpoint frequency does not change the training trajectory)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("reference") / "run"
        assert _pretrain(run) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert _load(run / "last.ckpt")["global_step"] == TOTAL_STEPS
    return run


def _run_and_kill(run: Path, extra: list[str], log: Path) -> tuple[dict, list[tuple[int, int]]]:
    """Start `essl pretrain` in a subprocess, SIGKILL it once last.ckpt holds epoch >= 1; returns the checkpoint
    left behind and every (epoch, step) seen while polling."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "essl.cli", "pretrain", CONFIG, f"output_dir={run}", *COMMON, *extra]
    ckpt = run / "last.ckpt"
    seen: list[tuple[int, int]] = []
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=run.parent)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if ckpt.exists():
                    state = _load(ckpt)  # never torn: an exception here fails the test
                    seen.append((state["epoch"], state["global_step"]))
                    if state["epoch"] >= 1:
                        proc.send_signal(signal.SIGKILL)
                        break
                time.sleep(POLL_SECONDS)
        finally:
            if proc.poll() is None:
                proc.kill()  # SIGKILL again is harmless; this also stops a run that timed out
            proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL or not seen or seen[-1][1] >= TOTAL_STEPS:
        pytest.fail(f"no intermediate last.ckpt with epoch >= 1 before the run ended (exit {proc.returncode}); "
                    f"checkpoints seen: {sorted(set(seen))}\n{log.read_text()[-2000:]}")
    assert not (run / "encoder.pt").exists()
    return _load(ckpt), seen


def _resume_and_compare(run: Path, extra: list[str], reference: Path, capsys) -> None:
    killed, seen = _run_and_kill(run, extra, run.parent / "killed.log")
    assert killed["epoch"] >= 1 and 0 < killed["global_step"] < TOTAL_STEPS
    assert all(step <= killed["global_step"] for _, step in seen)
    # a write torn by the kill (a temporary file named as the atomic writer names them) is removed on resume
    data = (run / "last.ckpt").read_bytes()
    torn = run / ".last.ckpt.killed00.tmp.ckpt"
    torn.write_bytes(data[: len(data) // 2])
    assert temp_files(run / "last.ckpt") == [torn]

    capsys.readouterr()
    assert _pretrain(run, *extra, "resume=true") == 0
    err = capsys.readouterr().err
    assert f"resuming {run}" in err and f"(epoch {killed['epoch']}, step {killed['global_step']})" in err, err

    assert not torn.exists()
    resumed, expected = _load(run / "last.ckpt"), _load(reference / "last.ckpt")
    assert resumed["global_step"] == expected["global_step"] == TOTAL_STEPS
    ours, theirs = _encoder_weights(run), _encoder_weights(reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"encoder weights differ after resume: {different}"
    for a, b in zip(_momentum_buffers(resumed), _momentum_buffers(expected), strict=True):
        assert torch.equal(a, b)
    assert resumed["lr_schedulers"][0]["last_epoch"] == expected["lr_schedulers"][0]["last_epoch"]


def test_kill_and_resume_from_step_checkpoint_matches_uninterrupted(tmp_path, reference, capsys):
    """Checkpoints every `BATCHES` steps (the last batch of each epoch): exact resume."""
    _resume_and_compare(tmp_path / "run", [f"trainer.checkpoint_every_n_steps={BATCHES}"], reference, capsys)


def test_kill_and_resume_from_epoch_checkpoint_matches_uninterrupted(tmp_path, reference, capsys):
    """The default: a checkpoint at every epoch end."""
    _resume_and_compare(tmp_path / "run", [], reference, capsys)


def test_kill_mid_epoch_matches_uninterrupted(tmp_path, reference, capsys):
    """Checkpoints every 2 steps (mostly mid-epoch): the resumable loader continues after the batches the
    checkpoint holds, so the weights are bit-identical too (before issue 12 they were not)."""
    _resume_and_compare(tmp_path / "run", ["trainer.checkpoint_every_n_steps=2"], reference, capsys)


def test_checkpoint_write_killed_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, target, *args, **kwargs):
        with open(target, "wb") if isinstance(target, (str, Path)) else nullcontext(target) as fh:
            fh.write(b"PK\x03\x04 half a zip archive")
            raise KeyboardInterrupt  # a signal in the middle of the write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = _load(path)
    assert state["global_step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def _finite_weights(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def _one_failure_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "NaN" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("essl: failed: loss became NaN or infinite"), lines[0]
    return lines[0]


NAN_FROM_STEP = 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    losses = ESSLModule.losses

    def diverging(self, batch, step=0, max_steps=1):
        out = losses(self, batch, step, max_steps)
        if self.global_step >= NAN_FROM_STEP:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ESSLModule, "losses", diverging)
    run = tmp_path / "run"
    capsys.readouterr()
    # finite checks only at checkpoint saves and epoch ends (log_every_n_steps sets the periodic check)
    code = _pretrain(run, "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=50")
    assert code not in (0, 2)  # a failure, not a user error
    line = _one_failure_line(capsys.readouterr().err)
    assert "checkpoint" in line
    assert not (run / "encoder.pt").exists()
    ckpt = _load(run / "last.ckpt")
    assert ckpt["global_step"] <= NAN_FROM_STEP  # the last save before the first NaN step
    assert _finite_weights(ckpt)
    assert not list(run.glob(".*.tmp"))


def test_huge_learning_rate_diverges_with_a_clear_message(tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert _pretrain(run, "optim.lr=1e30", "trainer.log_every_n_steps=1") == 1
    _one_failure_line(capsys.readouterr().err)
    assert not (run / "encoder.pt").exists()
    if (run / "last.ckpt").exists():  # whatever was saved must be from before the divergence
        assert _finite_weights(_load(run / "last.ckpt"))


# ---- resume rules (issue 12) ---------------------------------------------------------------------------------
SHORT = ["trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1"]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _training_steps(rows: list[dict[str, str]]) -> list[int]:
    return [int(r["step"]) for r in rows if r.get("train/loss")]


def test_resume_keeps_every_metrics_row_and_a_larger_max_epochs_extends(tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain(run, *SHORT) == 0
    first = _rows(run)
    assert _training_steps(first) == list(range(2 * BATCHES))
    for epochs in (4, 5):
        capsys.readouterr()
        assert _pretrain(run, *SHORT, f"trainer.max_epochs={epochs}", "resume=true") == 0
        assert f"trainer.max_epochs is now {epochs}" in capsys.readouterr().err
        rows = _rows(run)
        assert rows[: len(first)] == first  # the earlier sessions' rows, unchanged
        assert _training_steps(rows) == list(range(epochs * BATCHES))  # every step once, none lost or repeated
        ckpt = _load(run / "last.ckpt")
        assert ckpt["global_step"] == epochs * BATCHES and ckpt["essl"]["epochs_completed"] == epochs
        first = rows


def test_finished_run_resumed_with_the_same_settings_does_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain(run, *SHORT) == 0
    before = _state(run)
    capsys.readouterr()
    # keys that may change on resume (trainer.log_every_n_steps, data.num_workers, progress) do not matter
    assert _pretrain(run, *SHORT, "resume=true", "trainer.log_every_n_steps=3", "progress=false") == 0
    captured = capsys.readouterr()
    assert "already finished (epoch 2 of 2, step 6); nothing to do" in captured.err
    assert f"encoder {run / 'encoder.pt'}" in captured.out
    assert _state(run) == before


@pytest.mark.parametrize("change,key", [
    (["method.name=byol"], "method.name"),
    (["equivariance.weight=0.2"], "equivariance.weight"),
    (["trainer.max_epochs=3", "optim.lr=0.1"], "optim.lr"),
])
def test_resume_with_other_settings_is_refused_and_changes_nothing(change, key, tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain(run, "trainer.max_epochs=1") == 0
    before = _state(run)
    config = str(ROOT / "configs/digits/e-byol.yaml") if change == ["method.name=byol"] else CONFIG
    capsys.readouterr()
    argv = ["pretrain", config, f"output_dir={run}", *COMMON, "trainer.max_epochs=1", "resume=true"]
    argv += [] if change == ["method.name=byol"] else change
    if change == ["method.name=byol"]:
        argv = [a for a in argv if not a.startswith("method.kwargs")] + ["method.kwargs.hidden_dim=16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("essl: error: ")
    assert f"holds a run with other settings: {key} is" in err and "trainer.max_epochs" in err
    assert _state(run) == before


def test_a_new_run_on_a_finished_one_is_refused_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _pretrain(run, "trainer.max_epochs=1") == 0
    before = _state(run)
    assert _pretrain(run, "trainer.max_epochs=1") == 2
    assert "resume=true" in capsys.readouterr().err
    assert _state(run) == before


def test_stale_temporary_files_match_the_writers_names(tmp_path):
    """The clean-up finds what the atomic writer really leaves (a staged, never renamed file) and nothing else."""
    from essl.io import stage_bytes, stage_torch_save
    from essl.pretrain import RUN_FILES, _clean_stale_files

    staged = [stage_torch_save({"w": torch.ones(2)}, tmp_path / "last.ckpt"), stage_bytes(tmp_path / "metrics.csv",
                                                                                         b"step\n")]
    for s in staged:
        assert s.tmp.exists() and temp_files(s.path) == [s.tmp]
    others = [tmp_path / "last.ckpt", tmp_path / "notes.tmp", tmp_path / ".mine.ckpt.x1.tmp.ckpt"]
    for p in others:
        p.write_bytes(b"kept")
    assert set(RUN_FILES) >= {"last.ckpt", "metrics.csv", "config.yaml", "encoder.pt"}
    _clean_stale_files(tmp_path)
    assert not any(s.tmp.exists() for s in staged)
    assert all(p.read_bytes() == b"kept" for p in others)


# ---- a full disk (issue 12) ----------------------------------------------------------------------------------
def test_a_failed_write_names_the_path_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    import essl.io

    path = tmp_path / "last.ckpt"
    essl.io.atomic_torch_save({"step": 1}, path)

    def full(tmp, data):  # what the OS does when the disk fills in the middle of a write
        with open(tmp, "wb") as fh:
            fh.write(bytes(data)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(essl.io, "write_bytes", full)
    with pytest.raises(essl.io.UserError) as info:
        essl.io.atomic_torch_save({"step": 2}, path)
    assert str(info.value) == f"cannot write {path}: no space left on device; the previous last.ckpt is kept"
    assert _load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few hundred kB (root only; skipped where mounting is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()

    def mount(size_bytes: int) -> Path:
        mount_cmd = shutil.which("mount")
        if os.geteuid() != 0 or mount_cmd is None or subprocess.run(
                [mount_cmd, "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
                capture_output=True).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        return folder

    yield mount
    subprocess.run(["umount", str(folder)], capture_output=True)


PAGE = 4096


def test_pretraining_on_a_full_disk_says_so_and_keeps_the_last_good_checkpoint(tmp_path, small_disk, capsys):
    """A real file system that fills up: room for the run's files and one checkpoint, not for writing the second
    beside it. The run stops with exit 2 naming last.ckpt and "no space left on device"; the checkpoint on disk is
    the last good one and no temporary file is left."""
    probe = tmp_path / "probe"
    assert _pretrain(probe, "trainer.max_epochs=1") == 0
    ckpt_size = (probe / "last.ckpt").stat().st_size
    small = sum((probe / n).stat().st_size for n in ("config.yaml", "metrics.csv"))
    disk = small_disk(((ckpt_size * 3 // 2 + small) // PAGE + 2) * PAGE)
    run = disk / "run"
    capsys.readouterr()
    assert _pretrain(run, "trainer.max_epochs=3") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("essl: error: cannot write ") and "no space left on device" in err
    assert str(run / "last.ckpt") in err
    kept = _load(run / "last.ckpt")
    assert kept["global_step"] == BATCHES  # the first epoch's checkpoint
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.ckpt", "metrics.csv"]


# ---- file modes (issue 12) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_are_written_with_the_umask_mode(umask, tmp_path):
    run = tmp_path / "run"
    old = os.umask(umask)
    try:
        assert _pretrain(run, "trainer.max_epochs=1") == 0
        from essl.io import atomic_write_json

        atomic_write_json(tmp_path / "result.json", {"a": 1})
    finally:
        os.umask(old)
    expected = 0o666 & ~umask  # what open() and every other tool give a new file
    for path in (run / "config.yaml", run / "last.ckpt", run / "encoder.pt", run / "metrics.csv",
                 tmp_path / "result.json"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ---- the resumable training loader (issue 12) ----------------------------------------------------------------
def test_training_loader_resumes_after_the_batches_it_handed_out():
    """Lightning's stateful-loader protocol: state_dict after k batches, load_state_dict into a fresh loader, the
    remaining batches are the uninterrupted epoch's; the order is torch.randperm of seed + epoch."""
    from torch.utils.data import TensorDataset

    from essl.data.module import EpochSampler, ResumableLoader

    n, batch, seed, epoch, done = 40, 4, 7, 3, 3
    dataset = TensorDataset(torch.arange(n))

    def loader() -> ResumableLoader:
        sampler = EpochSampler(n, seed)
        sampler.set_epoch(epoch)
        return ResumableLoader(dataset, sampler, batch)

    full = [b[0].tolist() for b in loader()]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    assert full == [order[i:i + batch] for i in range(0, n, batch)]
    first = loader()
    it = iter(first)
    for _ in range(done):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": epoch, "batches": done}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b[0].tolist() for b in resumed]
    assert rest == full[done:]
    assert resumed.state_dict() == {"epoch": epoch, "batches": n // batch}
    again = [b[0].tolist() for b in resumed]  # the skip applies once: the next pass is a whole epoch
    assert again == full


def test_training_loader_shards_ranks_without_overlap():
    from essl.data.module import EpochSampler

    n, world = 23, 3
    shards = [list(EpochSampler(n, 0, rank, world)) for rank in range(world)]
    assert all(len(s) == n // world for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat)
