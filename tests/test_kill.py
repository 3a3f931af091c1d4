"""Pretraining killed with SIGKILL at chosen points, resumed each time, ends exactly as an uninterrupted run.

One run is killed 10 times in a row, each session resuming the previous one (``resume=true``): while it writes
``config.yaml`` at the very start, at random points during training (inside a training step between backward and
the optimiser step, at a batch start, at an epoch end, half-way through writing a checkpoint's or
``metrics.csv``'s temporary file, after a checkpoint's temporary file is complete but before its rename, right
after the rename) and half-way through writing ``encoder.pt`` at the end; then it is resumed to the end. Checkpoints
every 2 steps with 3 batches an epoch, so most resumes start mid-epoch. The end state must equal an uninterrupted
run's: weights (``encoder.pt`` and ``last.ckpt``), optimiser momentum, learning-rate schedule, augmentation RNG,
step and epoch, every ``metrics.csv`` row, the config; and no temporary or lock file may be left.

How it kills: each session runs in a process forked from a server that has imported essl once (multiprocessing's
forkserver: milliseconds per session instead of seconds of imports). The session patches essl's low-level writer
(:func:`essl.io.write_bytes`), the rename (:meth:`essl.io.StagedFile.commit`) and adds a Lightning callback; when
the chosen event comes at or after the chosen global step, it tells the parent and waits, and the parent sends
SIGKILL. Deterministic on CPU (one thread, ``trainer.deterministic=true``).
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/digits/e-simclr.yaml")
BATCHES = 3  # per epoch
EPOCHS = 8
TOTAL_STEPS = BATCHES * EPOCHS
CHECKPOINT_EVERY = 2  # steps: mostly mid-epoch
COMMON = [
    f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={BATCHES}", "data.batch_size=16",
    "data.image_size=16", "equivariance.crop_size=8", "backbone.kwargs.width=4", "equivariance.hidden_dim=16",
    "method.kwargs.hidden_dim=16", "progress=false", "trainer.deterministic=true", "seed=3", "data.num_workers=0",
    f"trainer.checkpoint_every_n_steps={CHECKPOINT_EVERY}", "trainer.log_every_n_steps=1",
]
N_KILLS = 10
SCHEDULE_SEED = 12
SESSION_TIMEOUT = 240  # seconds a session may take to reach its fault or its end
HANG_SECONDS = 600  # a session at its fault waits this long for the SIGKILL
#: Events a session can be killed at during training ("write:" half-way through a temporary file's bytes,
#: "rename:" with the temporary file complete, before the rename; "renamed:" just after it).
TRAINING_EVENTS = ("train-step", "batch-start", "epoch-end", "write:last.ckpt", "rename:last.ckpt",
                   "renamed:last.ckpt", "write:metrics.csv")

_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["essl.cli", "essl.pretrain", "lightning"])


# ---- the session (runs in the forked process) ----------------------------------------------------------------
def _session(conn, run: str, extra: list[str], fault: tuple[str, int] | None) -> None:
    """Pretrain ``run``; at ``fault`` = (event, at or after global step), tell the parent and wait to be killed."""
    try:
        torch.set_num_threads(1)
        import lightning as L

        import essl.io
        from essl.config import load_config
        from essl.errors import UserError
        from essl.pretrain import pretrain

        step = {"now": 0}
        pause = [fault is not None and fault[0].startswith("pause:")]

        def maybe_die(event: str) -> None:
            if pause[0] and fault[0] == f"pause:{event}" and step["now"] >= fault[1]:
                pause[0] = False
                conn.send(("paused", {"event": event, "step": step["now"], "pid": os.getpid()}))
                conn.recv()  # until the parent says go on
            elif fault is not None and fault[0] == event and step["now"] >= fault[1]:
                conn.send(("fault", {"event": event, "step": step["now"]}))
                time.sleep(HANG_SECONDS)

        def target(tmp: str) -> str:
            name = Path(tmp).name
            return next((t for t in ("last.ckpt", "metrics.csv", "config.yaml", "encoder.pt")
                         if name.startswith(f".{t}.")), name)

        write_bytes = essl.io.write_bytes

        def faulty_write(path: str, data) -> None:
            event = f"write:{target(path)}"
            if fault is not None and fault[0] == event and step["now"] >= fault[1]:
                half = bytes(data)[: len(data) // 2]
                with open(path, "wb") as fh:  # a torn temporary file, on disk
                    fh.write(half)
                    fh.flush()
                    os.fsync(fh.fileno())
                maybe_die(event)
            write_bytes(path, data)

        commit = essl.io.StagedFile.commit

        def faulty_commit(self):
            maybe_die(f"rename:{self.path.name}")
            out = commit(self)
            maybe_die(f"renamed:{self.path.name}")
            return out

        essl.io.write_bytes = faulty_write
        essl.io.StagedFile.commit = faulty_commit

        class Killer(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                step["now"] = trainer.global_step
                maybe_die("batch-start")

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                maybe_die("train-step")  # backward done, weights not yet updated

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                step["now"] = trainer.global_step

            def on_train_epoch_end(self, trainer, pl_module):
                maybe_die("epoch-end")

            def on_train_end(self, trainer, pl_module):
                step["now"] = TOTAL_STEPS

        cfg = load_config(CONFIG, [f"output_dir={run}", *COMMON, *extra])
        try:
            pretrain(cfg, callbacks=[Killer()])
        except UserError as err:
            conn.send(("user-error", str(err)))
            return
        step["now"] = TOTAL_STEPS
        conn.send(("done", None))
    except BaseException:  # noqa: B036 - anything else is reported to the parent as a failure
        conn.send(("crash", traceback.format_exc()))


def _start_session(run: Path, extra: list[str], fault: tuple[str, int] | None):
    parent, child = _CONTEXT.Pipe()
    proc = _CONTEXT.Process(target=_session, args=(child, str(run), extra, fault))
    proc.start()
    child.close()
    return proc, parent


def _run_session(run: Path, extra: list[str], fault: tuple[str, int] | None) -> tuple[str, object]:
    """One session in a forked process; SIGKILL it when it reports its fault. Returns (outcome, detail)."""
    proc, parent = _start_session(run, extra, fault)
    try:
        if not parent.poll(SESSION_TIMEOUT):
            pytest.fail(f"session with fault {fault} neither reached it nor ended in {SESSION_TIMEOUT} s")
        outcome, detail = parent.recv()
        if outcome == "fault":
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if outcome == "fault":
        assert proc.exitcode == -signal.SIGKILL
    elif outcome == "crash":
        pytest.fail(f"session with fault {fault} crashed:\n{detail}")
    return outcome, detail


def schedule(seed: int = SCHEDULE_SEED) -> list[tuple[str, int]]:
    """N_KILLS faults in the order a run meets them: config.yaml's write at the start, training events at sorted
    random steps (every kind of TRAINING_EVENTS at least once), encoder.pt's write at the end."""
    rng = random.Random(seed)
    n_training = N_KILLS - 2
    kinds = list(TRAINING_EVENTS) + [rng.choice(TRAINING_EVENTS) for _ in range(n_training - len(TRAINING_EVENTS))]
    rng.shuffle(kinds)
    steps = sorted(rng.sample(range(1, TOTAL_STEPS - 1), n_training))
    return [("write:config.yaml", 0), *zip(kinds, steps, strict=True), ("write:encoder.pt", TOTAL_STEPS)]


# ---- the end state -------------------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _config(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.pop("resume")
    cfg.pop("output_dir")
    return cfg


def _assert_same_end_state(run: Path, reference: Path) -> None:
    ours, theirs = _load(run / "last.ckpt"), _load(reference / "last.ckpt")
    assert ours["global_step"] == theirs["global_step"] == TOTAL_STEPS
    assert ours["epoch"] == theirs["epoch"]
    assert ours["essl"]["epochs_completed"] == theirs["essl"]["epochs_completed"] == EPOCHS
    differing = [k for k in theirs["state_dict"] if not torch.equal(ours["state_dict"][k], theirs["state_dict"][k])]
    assert not differing, f"checkpoint weights differ: {differing}"
    for a, b in zip(ours["optimizer_states"][0]["state"].values(), theirs["optimizer_states"][0]["state"].values(),
                    strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert ours["lr_schedulers"] == theirs["lr_schedulers"]
    assert torch.equal(ours["essl_rng"]["torch"], theirs["essl_rng"]["torch"])
    enc, ref = _load(run / "encoder.pt")["state_dict"], _load(reference / "encoder.pt")["state_dict"]
    assert all(torch.equal(enc[k], ref[k]) for k in ref) and enc.keys() == ref.keys()
    assert _rows(run) == _rows(reference)
    assert _config(run) == _config(reference)
    leftovers = sorted(p.name for p in run.iterdir() if p.name not in ("config.yaml", "metrics.csv", "last.ckpt",
                                                                       "encoder.pt"))
    assert not leftovers, f"left behind: {leftovers}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert _run_session(run, [], None)[0] == "done"
    return run


def test_schedule_covers_every_event_in_run_order():
    faults = schedule()
    assert len(faults) == N_KILLS
    assert set(TRAINING_EVENTS) <= {kind for kind, _ in faults}
    assert [s for _, s in faults] == sorted(s for _, s in faults)


def test_ten_kills_then_resume_equal_an_uninterrupted_run(tmp_path, reference):
    run = tmp_path / "run"
    fired = []
    for i, fault in enumerate(schedule()):
        outcome, detail = _run_session(run, [] if i == 0 else ["resume=true"], fault)
        assert outcome == "fault", f"fault {fault} never came: {outcome} {detail}"
        fired.append(detail)
        if fault[0] == "write:last.ckpt":  # the torn temporary file is there, the previous checkpoint intact
            assert list(run.glob(".last.ckpt.*.tmp.ckpt"))
            if (run / "last.ckpt").exists():
                _load(run / "last.ckpt")
    assert not (run / "encoder.pt").exists()  # the last kill tore its write
    assert _run_session(run, ["resume=true"], None)[0] == "done"
    print("faults fired (event, global step):", [(d["event"], d["step"]) for d in fired], file=sys.stderr)
    _assert_same_end_state(run, reference)


def test_a_finished_run_killed_before_its_encoder_only_writes_it(tmp_path, reference):
    """Killed while writing encoder.pt: the resume trains nothing and writes the same encoder."""
    run = tmp_path / "run"
    assert _run_session(run, [], ("write:encoder.pt", TOTAL_STEPS))[0] == "fault"
    assert _load(run / "last.ckpt")["global_step"] == TOTAL_STEPS
    assert _run_session(run, ["resume=true"], None)[0] == "done"
    _assert_same_end_state(run, reference)


def test_two_runs_on_one_output_folder_the_second_exits_2(tmp_path, reference, capsys):
    """While one run trains (held at a batch start), a second `essl pretrain` on its folder is refused naming the
    holder and touches nothing; the first then finishes exactly as an uninterrupted run (nothing mixed in)."""
    from essl.cli import main

    run = tmp_path / "run"
    proc, conn = _start_session(run, [], ("pause:batch-start", BATCHES + 1))
    try:
        assert conn.poll(SESSION_TIMEOUT)
        outcome, detail = conn.recv()
        assert outcome == "paused"
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        capsys.readouterr()
        for extra in ([], ["resume=true"]):
            assert main(["pretrain", CONFIG, f"output_dir={run}", *COMMON, *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert err.startswith(f"essl: error: {run} is in use by essl pretrain") and f"pid {detail['pid']}" in err
            assert {p.name: p.read_bytes() for p in run.iterdir()} == before
        conn.send("go")
        assert conn.poll(SESSION_TIMEOUT)
        assert conn.recv()[0] == "done"
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == 0
    _assert_same_end_state(run, reference)
