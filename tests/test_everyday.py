"""What users of SSL tools expect (issue 12): the end-of-run summary line, ``essl show`` (state, resolved config,
last metrics, training curves), the TensorBoard logger beside the CSV one, progress with epoch totals and the
probe's fitting step, ``--help`` texts that give the defaults. Tiny digits runs, in-process."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import yaml

from essl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/digits/e-simclr.yaml")
EPOCHS, BATCHES = 2, 3
TINY = [f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={BATCHES}", "data.batch_size=16",
        "data.image_size=16", "equivariance.crop_size=8", "backbone.kwargs.width=4", "equivariance.hidden_dim=16",
        "method.kwargs.hidden_dim=16", "progress=false", "trainer.log_every_n_steps=1", "seed=1"]
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
FLOAT32_RTOL = 1e-6  # TensorBoard stores scalars as float32


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _last(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, str]:
    """A finished tiny run and what `essl pretrain` printed on stdout."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("everyday") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["pretrain", CONFIG, f"output_dir={run}", *TINY]) == 0
    return run, out.getvalue()


def test_end_of_run_summary_line(finished_run):
    run, stdout = finished_run
    line = stdout.strip().splitlines()[-1]
    rows = _rows(run)
    assert line.startswith(f"essl: done: epoch {EPOCHS}/{EPOCHS}, step {EPOCHS * BATCHES}, ")
    assert re.search(r", \d+(\.\d)? (s|min)", line)  # the wall time
    assert f"loss {_last(rows, 'train/loss'):.4f}" in line
    assert f"ssl loss {_last(rows, 'train/ssl_loss'):.4f}" in line
    assert f"equivariance loss {_last(rows, 'train/equi_loss'):.4f}" in line
    assert f"equivariance accuracy {100 * _last(rows, 'train/equi_acc'):.1f}%" in line
    assert line.endswith(f"; encoder {run / 'encoder.pt'}")


def test_show_prints_state_config_and_last_metrics_and_plots_the_curves(finished_run, tmp_path, capsys):
    import matplotlib.image

    from essl.show import FIGURE_DPI, PANEL_HEIGHT, PANEL_WIDTH, PANELS

    run, _ = finished_run
    png = tmp_path / "curves.png"
    capsys.readouterr()
    assert main(["show", str(run), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {run}: finished: {EPOCHS}/{EPOCHS} epochs, step {EPOCHS * BATCHES}\n")
    assert f"encoder: {run / 'encoder.pt'}" in out
    config = yaml.safe_load((run / "config.yaml").read_text())
    printed = out.split("config (resolved):\n", 1)[1].split("\n\n", 1)[0]
    assert yaml.safe_load("\n".join(line[2:] for line in printed.splitlines())) == config
    rows = _rows(run)
    for key in ("train/loss", "train/ssl_loss", "train/equi_loss", "train/equi_acc", "lr-SGD"):
        steps = [int(r["step"]) for r in rows if r.get(key)]
        assert re.search(rf"  {re.escape(key)} +{_last(rows, key):.6g}  \(step {steps[-1]}\)", out), key
    image = matplotlib.image.imread(png)  # every panel has data in this run: loss, equivariance, accuracy, lr
    assert image.shape[:2] == (round(PANEL_HEIGHT * FIGURE_DPI), round(len(PANELS) * PANEL_WIDTH * FIGURE_DPI))


def test_show_says_interrupted_and_running(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run[0], run)
    (run / "encoder.pt").unlink()
    assert main(["show", str(run)]) == 0
    assert f"interrupted at epoch {EPOCHS}/{EPOCHS}" in capsys.readouterr().out
    (run / ".essl.lock").write_text(f"{socket.gethostname()} {os.getpid()} essl pretrain {run}\n")
    assert main(["show", str(run)]) == 0
    assert f"running: essl pretrain {run} (pid {os.getpid()} on" in capsys.readouterr().out


def test_progress_shows_epoch_totals(tmp_path, capsys):
    capsys.readouterr()
    argv = [a for a in TINY if a != "progress=false"]
    assert main(["pretrain", CONFIG, f"output_dir={tmp_path / 'run'}", *argv, "progress=true"]) == 0
    captured = capsys.readouterr()
    bars = captured.out + captured.err  # Lightning's bar writes to stdout
    assert all(f"Epoch {e}/{EPOCHS}" in bars for e in range(1, EPOCHS + 1))
    assert f"Epoch {EPOCHS + 1}/" not in bars and "Epoch 0" not in bars


def test_probe_shows_its_fitting_step(finished_run, capsys):
    from essl.eval.linear_probe import run_probe

    capsys.readouterr()
    run_probe(finished_run[0] / "encoder.pt", seeds=2, progress=True)
    err = capsys.readouterr().err
    for model in ("encoder", "random init", "raw pixels"):
        assert f"fitting linear probe: {model}" in err


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_logger_beside_the_csv_one(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["pretrain", CONFIG, f"output_dir={run}", *TINY, "trainer.logger=both"]) == 0
    assert main(["pretrain", CONFIG, f"output_dir={run}", *TINY, "trainer.logger=both", "resume=true",
                 f"trainer.max_epochs={EPOCHS + 1}"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = _rows(run)
    for key in ("train/loss", "train/equi_acc"):
        logged = [(s.step, s.value) for s in events.Scalars(key)]
        expected = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        assert [s for s, _ in logged] == [s for s, _ in expected] == list(range((EPOCHS + 1) * BATCHES))
        assert all(v == pytest.approx(e, rel=FLOAT32_RTOL) for (_, v), (_, e) in zip(logged, expected, strict=True))


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_logger_alone_writes_no_csv(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", CONFIG, f"output_dir={run}", *TINY, "trainer.logger=tensorboard"]) == 0
    assert not (run / "metrics.csv").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == EPOCHS * BATCHES


@pytest.mark.parametrize("argv,needles", [
    (["pretrain", "--help"], ["trainer.max_epochs=800", "data.batch_size=256", "trainer.logger=csv",
                              "tensorboard", "may change on resume", "trainer.max_epochs, trainer.devices"]),
    (["show", "--help"], ["RUN_DIR", "--plot", "default: no figure"]),
    (["probe", "--help"], ["(default 5)", "default: not written", "default 256"]),
    (["bench", "--help"], ["default all", "default: cuda if available", "default: not written"]),
])
def test_help_gives_the_defaults(argv, needles, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in needles:
        assert needle in out, needle
