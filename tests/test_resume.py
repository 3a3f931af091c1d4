"""Fault tolerance (issue 6): kill -9 and resume, atomic checkpoints, a diverging loss.

Kill-and-resume: ``essl pretrain`` runs in a subprocess; the test polls ``last.ckpt`` (every poll must load with
``weights_only=True``: a torn file would fail), SIGKILLs the process once a checkpoint with epoch >= 1 exists,
leaves a torn temporary file beside it, and resumes in-process with ``resume=true``. The resumed run must say
"resuming ... (epoch E, step S)", end at the same global step as an uninterrupted run of the same config and,
run deterministically from a checkpoint at an epoch boundary, reach bit-identical weights (encoder.pt) and
optimiser state.

All training here runs on one intra-op thread (in-process and in the subprocess): the same arithmetic in every
run, and no OpenMP spin-waiting when the machine is busy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from essl.cli import main
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
    # a write torn by the kill (the atomic writer's temporary file) must not matter
    data = (run / "last.ckpt").read_bytes()
    (run / ".last.ckpt.killed.tmp").write_bytes(data[: len(data) // 2])

    capsys.readouterr()
    assert _pretrain(run, *extra, "resume=true") == 0
    err = capsys.readouterr().err
    assert f"resuming {run}" in err and f"(epoch {killed['epoch']}, step {killed['global_step']})" in err, err

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


def test_kill_mid_epoch_resumes_at_the_right_step(tmp_path, reference, capsys):
    """Checkpoints every 2 steps (mostly mid-epoch). Lightning restarts a non-resumable dataloader from the top of
    the epoch, so the weights are not bit-identical; the step count, the message and finite weights are."""
    run = tmp_path / "run"
    killed, _ = _run_and_kill(run, ["trainer.checkpoint_every_n_steps=2"], tmp_path / "killed.log")
    capsys.readouterr()
    assert _pretrain(run, "trainer.checkpoint_every_n_steps=2", "resume=true") == 0
    assert f"(epoch {killed['epoch']}, step {killed['global_step']})" in capsys.readouterr().err
    assert _load(run / "last.ckpt")["global_step"] == _load(reference / "last.ckpt")["global_step"]
    assert all(torch.isfinite(v).all() for v in _encoder_weights(run).values() if v.is_floating_point())


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
