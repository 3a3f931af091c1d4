"""``essl show RUN_DIR [--plot PNG]``: what a pretraining run folder holds.

Prints the run's state (finished, interrupted and resumable, or running, from ``last.ckpt``, ``encoder.pt`` and
the lock file), the resolved config (``config.yaml``) and the last logged value of every metric
(``metrics.csv``). ``--plot`` draws the training curves against the global step (loss and SSL loss, equivariance
loss, equivariance and kNN accuracy, learning rate) into one figure, written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from essl.errors import UserError
from essl.io import FileLock, atomic_write, check_output_file
from essl.pretrain import CHECKPOINT, CONFIG, ENCODER, LOCK, METRICS, read_metrics

#: The figure's panels: (title, y label, metric columns drawn; a column ending in "*" is a prefix).
PANELS = (
    ("loss", "loss", ("train/loss", "train/ssl_loss")),
    ("equivariance loss", "cross-entropy", ("train/equi_loss",)),
    ("accuracy", "accuracy", ("train/equi_acc", "val/knn_acc")),
    ("learning rate", "lr", ("lr-*",)),
)
PANEL_WIDTH, PANEL_HEIGHT = 4.0, 3.0  # inches
FIGURE_DPI = 120
NOT_METRICS = ("step", "epoch")


def _columns(rows: list[dict[str, str]], patterns: tuple[str, ...]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [k for k in keys if any(k == p or (p.endswith("*") and k.startswith(p[:-1])) for p in patterns)]


def _series(rows: list[dict[str, str]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where ``key`` was logged."""
    steps, values = [], []
    for r in rows:
        value = r.get(key)
        if value in (None, ""):
            continue
        try:
            steps.append(float(r.get("step") or "nan"))
            values.append(float(value))
        except ValueError:
            continue
    return steps, values


def last_metrics(rows: list[dict[str, str]]) -> dict[str, tuple[float, int]]:
    """Every metric's last logged value and the step it was logged at."""
    out: dict[str, tuple[float, int]] = {}
    for key in _columns(rows, ("*",)):
        if key in NOT_METRICS:
            continue
        steps, values = _series(rows, key)
        if values:
            out[key] = (values[-1], int(steps[-1]) if math.isfinite(steps[-1]) else -1)
    return out


def run_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What ``run_dir`` holds: ``config``, ``rows`` (metrics), ``checkpoint`` (epoch, step, epochs completed),
    ``encoder`` (path or None), ``running`` (the lock holder or None) and ``status`` (one line)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    files = [run_dir / n for n in (CONFIG, METRICS, CHECKPOINT)]
    if not any(f.exists() for f in files):
        raise UserError(f"{run_dir} is not an essl run folder (no {CONFIG}, {METRICS} or {CHECKPOINT})")
    config = None
    if (run_dir / CONFIG).is_file():
        try:
            config = yaml.safe_load((run_dir / CONFIG).read_text())
        except yaml.YAMLError:
            raise UserError(f"{run_dir / CONFIG} is not readable YAML") from None
    checkpoint = None
    if (run_dir / CHECKPOINT).is_file():
        try:
            state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            raise UserError(f"{run_dir / CHECKPOINT} is not a readable checkpoint") from None
        essl_state = state.get("essl") or {}
        checkpoint = {"epoch": int(state.get("epoch", 0)), "step": int(state.get("global_step", 0)),
                      "epochs_completed": int(essl_state.get("epochs_completed", state.get("epoch", 0)))}
        if config is None:
            config = essl_state.get("config")
    encoder = run_dir / ENCODER if (run_dir / ENCODER).is_file() else None
    max_epochs = ((config or {}).get("trainer") or {}).get("max_epochs")
    running = FileLock(run_dir / LOCK).live_holder()
    if running is not None:
        status = f"running: {running}"
    elif checkpoint is None:
        status = "no checkpoint yet (a new run, or one stopped before its first checkpoint)"
    elif max_epochs is not None and checkpoint["epochs_completed"] >= max_epochs and encoder is not None:
        status = f"finished: {checkpoint['epochs_completed']}/{max_epochs} epochs, step {checkpoint['step']}"
    else:
        status = (f"interrupted at epoch {checkpoint['epochs_completed']}/{max_epochs}, step {checkpoint['step']}; "
                  "continue it with resume=true")
    return {"run_dir": str(run_dir), "config": config, "rows": read_metrics(run_dir / METRICS),
            "checkpoint": checkpoint, "encoder": str(encoder) if encoder else None, "running": running,
            "status": status}


def format_run(state: dict[str, Any]) -> str:
    """The text ``essl show`` prints."""
    lines = [f"run {state['run_dir']}: {state['status']}"]
    lines.append(f"encoder: {state['encoder'] or 'not written yet'}")
    lines.append("")
    lines.append("config (resolved):" if state["config"] is not None else "config: none")
    if state["config"] is not None:
        lines += ["  " + line for line in yaml.safe_dump(state["config"], sort_keys=False).rstrip().splitlines()]
    lines.append("")
    metrics = last_metrics(state["rows"])
    if metrics:
        lines.append(f"last metrics ({len(state['rows'])} rows in {METRICS}):")
        width = max(len(k) for k in metrics)
        lines += [f"  {k:<{width}}  {v:.6g}  (step {s})" for k, (v, s) in metrics.items()]
    else:
        lines.append(f"last metrics: none ({METRICS} is empty or absent)")
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, str]], path: str | os.PathLike, title: str = "") -> Path:
    """The training curves of ``rows`` (metrics.csv) as one figure at ``path`` (format from its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, y, _columns(rows, cols)) for t, y, cols in PANELS]
    panels = [(t, y, cols) for t, y, cols in panels if any(_series(rows, c)[1] for c in cols)]
    if not panels:
        raise UserError(f"--plot: no curves to draw ({METRICS} has no logged losses, accuracies or learning rate)")
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_WIDTH * len(panels), PANEL_HEIGHT), squeeze=False)
    for ax, (name, ylabel, cols) in zip(axes[0], panels, strict=True):
        for col in cols:
            steps, values = _series(rows, col)
            if values:
                ax.plot(steps, values, label=col)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".").lower()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=FIGURE_DPI))
    finally:
        plt.close(fig)
    return Path(path)


def check_plot_path(path: str | os.PathLike) -> Path:
    """``--plot``: a writable file whose suffix names a format matplotlib writes; checked before any work."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in supported:
        raise UserError(f"--plot {path}: unknown image format {fmt!r} (use one of {', '.join(sorted(supported))})")
    return check_output_file(path, "--plot")


def show(run_dir: str | os.PathLike, plot: str | os.PathLike | None = None) -> str:
    """``essl show``: the text to print; with ``plot``, also the figure of the training curves."""
    if plot is not None:
        check_plot_path(plot)
    state = run_state(run_dir)
    text = format_run(state)
    if plot is not None:
        if not state["rows"]:
            raise UserError(f"--plot: {Path(run_dir) / METRICS} has no rows (trainer.logger=tensorboard runs log "
                            "to tensorboard/ instead)")
        plot_curves(state["rows"], plot, title=str(run_dir))
        text += f"\n\nessl: curves written to {plot}"
    return text
