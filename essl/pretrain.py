"""``essl pretrain``: the composition root that turns a config into explicit-argument objects and trains.

Run directory (``output_dir``): ``config.yaml`` (resolved), ``metrics.csv`` (every logged row of the run, across
any number of resumes), ``last.ckpt`` (``resume=true`` continues from it), ``encoder.pt`` (the frozen-encoder
contract, :mod:`essl.encoder`) and, with ``trainer.logger=tensorboard|both``, ``tensorboard/``. While a run is
going, ``.essl.lock`` names its process: a second run on the same folder is refused (exit 2).

Crash safety (docs/design.md). Every file is written atomically (:mod:`essl.io`). A checkpoint is written to its
temporary file when Lightning saves it, but renamed over ``last.ckpt`` only once the metrics rows of the steps it
holds are on disk (at the next batch, the next save or the end of training): ``last.ckpt`` at global step S and
the rows of ``metrics.csv`` with step < S always agree, and a resume keeps exactly those rows. The training loader
is resumable (:mod:`essl.data.module`) and the augmentation RNG is in the checkpoint, so a resumed run, from an
epoch boundary or mid-epoch, ends in the same state as an uninterrupted one.

Resume rules: ``resume=true`` on a folder holding a run compares the stored config with the new one; only
:data:`RESUMABLE_KEYS` may differ (where and how fast it runs, how long, what is logged), anything else is refused
naming the first differing key, before any file is touched. A finished run resumed with the same settings does
nothing and says so; a larger ``trainer.max_epochs`` extends it (the cosine schedule is stretched to the new end).
"""

from __future__ import annotations

import csv
import inspect
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from essl.augment import LatticeViews, ViewMaker, ViewSpec, build_view_pipeline
from essl.backbones import BACKBONES, build_backbone, check_input_size
from essl.config import LR_REFERENCE_BATCH, to_container
from essl.data import ImageDataModule, LabelledData, LazyImages, load_pretrain_data
from essl.data.module import ResumableLoader
from essl.encoder import export_encoder
from essl.equivariance import EquivarianceBranch
from essl.errors import UserError
from essl.io import (
    FileLock,
    StagedFile,
    atomic_torch_save,
    atomic_write_text,
    check_output_dir,
    stage_torch_save,
    temp_files,
)
from essl.methods import build_method
from essl.module import (
    ESSLModule,
    OptimSpec,
    hand_over_resume_path,
    per_device_batch,
    requeue_checkpoint,
    resolve_precision,
    shared_resume_path,
)

CHECKPOINT = "last.ckpt"
ENCODER = "encoder.pt"
CONFIG = "config.yaml"
METRICS = "metrics.csv"
LOCK = ".essl.lock"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CHECKPOINT, ENCODER, CONFIG, METRICS, LOCK)  # whose temporary files a killed run may leave behind
#: Config keys that may differ when a run is resumed: where and how fast it runs, how long, what it logs and shows.
#: A key ending in "." stands for every key under it. Changing devices or num_nodes rescales the learning rate
#: with the new global batch; trainer.max_epochs stretches the cosine schedule to the new end.
RESUMABLE_KEYS = ("name", "resume", "progress", "output_dir", "trainer.max_epochs", "trainer.devices",
                  "trainer.num_nodes", "trainer.accelerator", "trainer.strategy", "trainer.compile",
                  "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.logger", "data.num_workers",
                  "trainer.sync_batchnorm", "trainer.float32_matmul_precision", "eval.")
METRICS_FLUSH_SECONDS = 30.0  # between checkpoints, metrics.csv is rewritten at most this often
SECONDS_PER_MINUTE, SECONDS_PER_HOUR = 60, 3600
PERCENT = 100
log = logging.getLogger("essl")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename: a kill never leaves a torn ``last.ckpt``.

    With ``defer`` set to the run's checkpoint path, a save there waits as a complete temporary file
    (:class:`~essl.io.StagedFile`) until :meth:`commit`, which first writes out ``loggers`` (the metrics the
    checkpoint's steps logged) and then renames. A newer save commits the waiting one first; :meth:`discard` drops
    it (on a failure). Saves to other paths (e.g. DDP spawn's hand-back of the weights) are written at once.
    Picklable (DDP spawn sends it to its processes).
    """

    def __init__(self, defer: str | os.PathLike | None = None, loggers: Sequence[Logger] = ()):
        super().__init__()
        self.defer, self.loggers = (Path(defer) if defer is not None else None), list(loggers)
        self.pending: StagedFile | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if self.defer is None or Path(path) != self.defer:
            atomic_torch_save(checkpoint, path)
            return
        self.commit()  # every row of the earlier checkpoint's steps is logged by now
        self.pending = stage_torch_save(checkpoint, path)

    def commit(self) -> None:
        if self.pending is None:
            return
        for lg in self.loggers:  # rows first: a visible checkpoint never holds steps whose rows are not on disk
            lg.flush() if isinstance(lg, HistoryCSVLogger) else lg.save()
        pending, self.pending = self.pending, None
        pending.commit()

    def discard(self) -> None:
        if self.pending is not None:
            self.pending.discard()
            self.pending = None


def read_metrics(path: str | os.PathLike, before_step: int | None = None) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` (as strings), only those with ``step < before_step`` if given."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if before_step is None:
        return rows

    def step(row: dict[str, str]) -> float:
        try:
            return float(row.get("step") or "inf")
        except ValueError:
            return float("inf")

    return [r for r in rows if step(r) < before_step]


class HistoryCSVLogger(Logger):
    """``metrics.csv`` in Lightning's CSV layout (one row per log call, columns sorted), started from the rows of
    earlier sessions of the run (``history``) and always rewritten whole and atomically: at :meth:`flush` (before
    a checkpoint becomes visible), at the end, and at most every :data:`METRICS_FLUSH_SECONDS` in between.

    Lightning's own CSVLogger deletes an existing file when it starts, which loses a resumed run's history.
    """

    def __init__(self, run_dir: str | os.PathLike, history: Sequence[dict[str, Any]] = ()):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = [dict(r) for r in history]
        self._written = time.monotonic()

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is config.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        row["step"] = step if step is not None else len(self.rows)
        self.rows.append(row)

    @rank_zero_only
    def save(self) -> None:  # Lightning calls this after every log call: only every METRICS_FLUSH_SECONDS
        if time.monotonic() - self._written >= METRICS_FLUSH_SECONDS:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        keys = sorted(set().union(*self.rows)) if self.rows else ["step"]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / METRICS, out.getvalue())
        self._written = time.monotonic()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            self.flush()
        except UserError:
            if status == "success":
                raise  # on a failure the first error is the one to report


class RunBookkeeping(L.Callback):
    """Marks every checkpoint with the epochs it completed and the run's config (``checkpoint["essl"]``), and
    makes a deferred checkpoint visible once the rows of its steps are logged (docs/design.md, crash safety)."""

    def __init__(self, checkpoint_io: AtomicCheckpointIO, config: dict[str, Any]):
        self.checkpoint_io, self.config = checkpoint_io, config
        self._epoch_trained = False
        self._loader_state: dict[str, int] | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_trained = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.checkpoint_io.commit()  # the previous step's rows were logged after its checkpoint was saved

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_trained = True  # before RunCheckpoint's epoch-end save (it comes later in the callback list)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loader = trainer.train_dataloader
        checkpoint["essl"] = {"epochs_completed": trainer.current_epoch + int(self._epoch_trained),
                              "config": self.config,
                              "train_loader": loader.state_dict() if isinstance(loader, ResumableLoader) else None}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._loader_state = (checkpoint.get("essl") or {}).get("train_loader")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning restores a stateful loader only when its fit loop builds the loader after the restore; the
        # LR schedule's length (estimated_stepping_batches, in configure_optimizers) builds it before, so the
        # state is applied here, before the first batch is drawn (the loader's iterator starts lazily)
        loader = trainer.train_dataloader
        if self._loader_state is not None and isinstance(loader, ResumableLoader):
            loader.load_state_dict(self._loader_state)
        self._loader_state = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.checkpoint_io.commit()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.checkpoint_io.discard()  # its step's rows may not be logged: the last visible checkpoint stays


class RunCheckpoint(L.Callback):
    """``last.ckpt``, rewritten at every epoch end and, with ``every_n_steps``, every that many steps inside an
    epoch. A step save that falls on an epoch's last batch is left to the epoch-end save that follows at the same
    step: Lightning 2.6 resumes a checkpoint taken at the last batch's ``on_train_batch_end`` into the next epoch
    without counting that epoch as started, and a second resume from inside it then repeats an epoch."""

    def __init__(self, path: Path, every_n_steps: int = 0):
        self.path, self.every_n_steps = path, every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = batch_idx + 1 >= trainer.num_training_batches
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not last:
            trainer.save_checkpoint(self.path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's bar, titled with the epoch out of the total ("Epoch 3/12")."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if getattr(self, "_leave", False):
            self.train_progress_bar = self.init_train_tqdm()
        total = self.total_train_batches
        self.train_progress_bar.reset(total=None if total == float("inf") else total)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


def _check_fixed_input_size(name: str, kwargs: dict[str, Any], size: int, key: str) -> None:
    """A backbone built for one input size (its ``input_size`` argument, e.g. phc_cnn's fully connected part)
    takes exactly that size: say whether the data is too large or too small and how to build it for this size."""
    factory = BACKBONES.get(name)
    param = inspect.signature(factory).parameters.get("input_size") if factory is not None else None
    if param is None:
        return
    built = kwargs.get("input_size", param.default)
    if size != built:
        raise UserError(f"inputs of {size}x{size} ({key}) are too {'large' if size > built else 'small'} for "
                        f"backbone {name}, built for {built}x{built} (backbone.kwargs.input_size sets the size it is "
                        "built for)")


def build_module(cfg: DictConfig, data: LabelledData | LazyImages,
                 global_batch: int) -> tuple[ESSLModule, dict[str, Any]]:
    """Backbone, method, views, equivariance branch and optimiser settings from the config."""
    backbone, feature_dim = build_backbone(cfg.backbone.name, data.channels, **cfg.backbone.kwargs)
    a, e = cfg.augment, cfg.equivariance
    lattice = list(a.lattice)
    eq_size = e.crop_size if e.view == "crop" else data.size
    sizes = {data.size: "the maps of data.path" if cfg.data.name == "phc" else "data.image_size"}
    if e.weight > 0:
        sizes.setdefault(eq_size, "equivariance.crop_size" if e.view == "crop" else sizes[data.size])
    for size, key in sorted(sizes.items()):
        _check_fixed_input_size(cfg.backbone.name, dict(cfg.backbone.kwargs), size, key)
        check_input_size(backbone, data.channels, size)
    if cfg.trainer.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)  # before BYOL copies it
    # negatives from every rank under DDP (a no-op on one process)
    method = build_method(cfg.method.name, backbone, feature_dim, gather_distributed=True, **cfg.method.kwargs)
    if cfg.trainer.compile:
        # in place, after BYOL's momentum copy: the state_dict keys (checkpoints, exported encoders) are unchanged
        backbone.compile()

    def per_view(value: Any, i: int) -> float:  # a probability, or one per view
        values = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
        return float(values[i] if len(values) > 1 else values[0])

    def colour(view: int, own: Any = None) -> dict[str, Any]:
        """The flip/colour settings of invariant view ``view``, or of the equivariance crop view (``own``: its
        config section, whose None entries fall back to the first view's)."""
        spec = dict(hflip_prob=a.hflip_prob, jitter_prob=a.jitter_prob, jitter=tuple(a.jitter),
                    grayscale_prob=a.grayscale_prob, blur_prob=per_view(a.blur_prob, view),
                    solarize_prob=per_view(a.solarize_prob, view), groups=tuple(a.groups) if own is None else ())
        for key in ("hflip_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if own is not None and own[key] is not None:
                spec[key] = float(own[key])
        return spec

    def crop_views(size: int, scale: tuple[float, float], spec: dict[str, Any], normalize: bool = True) -> nn.Module:
        return build_view_pipeline(ViewSpec(size=size, scale=scale, **spec), data.channels, data.mean, data.std,
                                   normalize)

    # invariant views: exact lattice symmetries of unit cells (the whole cell), or SimCLR's image crops (one pipeline
    # per view when the views differ, as BYOL's blur and solarize probabilities)
    if lattice:
        view: nn.Module | list[nn.Module] = LatticeViews(lattice, data.mean, data.std)
    else:
        view = [crop_views(data.size, tuple(a.crop_scale), colour(i)) for i in range(a.n_views)]
    branch, eq_view = None, None
    if e.weight > 0:
        branch = EquivarianceBranch(e.group, feature_dim, e.weight, e.hidden_dim, e.mode, e.grid, e.norm, e.last_relu,
                                    e.bottleneck_dim)
        # the branch's own input (docs/design.md): the paper's crop view for images, the raw cell (plus only
        # operations that keep the predicted elements apart, checked in essl.config) for unit cells;
        # un-normalised: the module normalises after the group transformation (colour groups act on [0, 1])
        eq_view = crop_views(e.crop_size, tuple(e.crop_scale), colour(0, e), False) if e.view == "crop" else (
            LatticeViews(list(e.lattice), data.mean, data.std, normalize=False))
        if e.group == "grayscale" and data.channels != 3:
            raise UserError(f"config key 'equivariance.group': grayscale needs colour images, {data.name} has "
                            f"{data.channels} channel(s)")
    o = cfg.optim
    lr = o.lr * global_batch / LR_REFERENCE_BATCH if o.scale_lr else o.lr
    optim = OptimSpec(o.name, lr, o.momentum, o.weight_decay, o.warmup_epochs, o.final_lr_ratio,
                      o.exclude_bias_norm, o.bias_lr_ratio)
    module = ESSLModule(
        backbone,
        method,
        ViewMaker(view, a.n_views, eq_view),
        optim,
        input_mean=data.mean,
        input_std=data.std,
        equivariance=branch,
        knn_k=cfg.eval.knn_k,
        knn_temperature=cfg.eval.knn_temperature,
        num_classes=data.num_classes,
        finite_check_every=cfg.trainer.log_every_n_steps,
        memory_format=torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format,
        float32_matmul_precision=cfg.trainer.float32_matmul_precision,
    )
    info = {"feature_dim": feature_dim, "lr": lr}
    return module, info


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write_text(run_dir / CONFIG, yaml.safe_dump(to_container(cfg), sort_keys=False))


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, f"{name}.") if isinstance(value, dict) and value else {name: value})
    return out


def resumable(key: str) -> bool:
    """May config key ``key`` differ on resume (:data:`RESUMABLE_KEYS`)?"""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def resumable_keys_text() -> str:
    """:data:`RESUMABLE_KEYS` for messages and docs: ``resume, progress, ..., eval.*``."""
    return ", ".join(k[:-1] + ".*" if k.endswith(".") else k for k in RESUMABLE_KEYS)


def _schema_defaults() -> dict[str, Any]:
    from omegaconf import OmegaConf

    from essl.config import Config

    return _flatten(OmegaConf.to_container(OmegaConf.structured(Config)))


def first_difference(stored: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key (in the new config's order) outside :data:`RESUMABLE_KEYS` whose value differs, with the
    stored and the new value; None when the two configs describe the same run."""
    old_flat, new_flat = _flatten(stored), _flatten(new)
    defaults = _schema_defaults()  # a key an older essl did not write had its (then and now) default value
    missing = object()
    for key in [*new_flat, *(k for k in old_flat if k not in new_flat)]:
        if resumable(key):
            continue
        a, b = old_flat.get(key, defaults.get(key, missing)), new_flat.get(key, missing)
        if a != b:
            return key, None if a is missing else a, None if b is missing else b
    return None


def _same_settings(stored: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """The same config apart from ``resume`` (how this session was started, not a setting of the run)."""
    if stored is None:
        return False
    return {k: v for k, v in _flatten(stored).items() if k != "resume"} == {
        k: v for k, v in _flatten(new).items() if k != "resume"}


@dataclass
class RunState:
    """What ``output_dir`` holds when a run starts."""

    checkpoint: Path | None = None  # resume from it
    step: int = 0
    epoch: int = 0
    epochs_completed: int = 0
    stored_config: dict[str, Any] | None = None
    history: list[dict[str, str]] = field(default_factory=list)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torn by hand, or not a checkpoint
        raise UserError(f"{path} is not a readable checkpoint ({str(err).strip().splitlines()[0][:120]}); move it "
                        "away to start over") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise UserError(f"{path} is not a Lightning checkpoint (no global_step)")
    return state


def inspect_run(run_dir: Path, cfg: DictConfig) -> RunState:
    """Refuse what must not happen to ``run_dir`` (a finished run overwritten, a resume with other settings, an
    ``encoder.pt`` without its checkpoint); say what a resume continues from. Reads only."""
    ckpt, encoder = requeue_checkpoint(run_dir / CHECKPOINT), run_dir / ENCODER
    if not cfg.resume:
        held = [n for n in (CHECKPOINT, ENCODER) if (run_dir / n).exists()]
        if held:
            raise UserError(f"output_dir {run_dir} already holds a run ({held[0]}); pass resume=true to continue it "
                            "or choose another output_dir")
        return RunState()
    if not ckpt.exists():
        if encoder.exists():
            raise UserError(f"output_dir {run_dir} holds {ENCODER} but no {CHECKPOINT} to resume from; choose "
                            "another output_dir")
        print(f"essl: resume=true but {ckpt} does not exist; starting a new run", file=sys.stderr)
        return RunState()
    state = _read_checkpoint(ckpt)
    essl_state = state.get("essl") if isinstance(state.get("essl"), dict) else {}
    stored = essl_state.get("config")
    if stored is None and (run_dir / CONFIG).is_file():
        stored = yaml.safe_load((run_dir / CONFIG).read_text())
    if isinstance(stored, dict):
        diff = first_difference(stored, to_container(cfg))
        if diff is not None:
            key, old, new = diff
            raise UserError(f"output_dir {run_dir} holds a run with other settings: {key} is {old!r} there, {new!r} "
                            f"now; only {resumable_keys_text()} may change on resume (or choose another output_dir)")
    step, epoch = int(state["global_step"]), int(state.get("epoch", 0))
    return RunState(checkpoint=ckpt, step=step, epoch=epoch,
                    epochs_completed=int(essl_state.get("epochs_completed", epoch)),
                    stored_config=stored if isinstance(stored, dict) else None,
                    history=read_metrics(run_dir / METRICS, before_step=step))


def format_duration(seconds: float) -> str:
    """``42.3 s``, ``1 min 11 s``, ``2 h 05 min``."""
    if seconds < SECONDS_PER_MINUTE:
        return f"{seconds:.1f} s"
    if seconds < SECONDS_PER_HOUR:
        return f"{int(seconds // SECONDS_PER_MINUTE)} min {int(seconds % SECONDS_PER_MINUTE)} s"
    return f"{int(seconds // SECONDS_PER_HOUR)} h {int(seconds % SECONDS_PER_HOUR // SECONDS_PER_MINUTE):02d} min"


#: The end-of-run summary's metrics: (logged name, label, shown as a percentage).
SUMMARY_METRICS = (("train/loss", "loss", False), ("train/ssl_loss", "ssl loss", False),
                   ("train/equi_loss", "equivariance loss", False), ("train/equi_acc", "equivariance accuracy", True),
                   ("val/knn_acc", "kNN accuracy", True))


def summary_line(trainer: L.Trainer, seconds: float, encoder: Path) -> str:
    """One line at the end of a run: epochs, steps, wall time of this session, the last logged losses, the encoder."""
    metrics = trainer.callback_metrics
    parts = []
    for key, label, percent in SUMMARY_METRICS:
        if key in metrics:
            value = float(metrics[key])
            parts.append(f"{label} {PERCENT * value:.1f}%" if percent else f"{label} {value:.4f}")
    losses = f"; {', '.join(parts)}" if parts else ""
    return (f"essl: done: epoch {trainer.current_epoch}/{trainer.max_epochs}, step {trainer.global_step}, "
            f"{format_duration(seconds)}{losses}; encoder {encoder}")


def _clean_stale_files(run_dir: Path) -> None:
    """Remove the temporary files a killed writer left for the run's own files (never anything else)."""
    for name in RUN_FILES:
        for stale in temp_files(run_dir / name):
            stale.unlink(missing_ok=True)


def pretrain(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Train from a loaded config; returns the path of the exported ``encoder.pt``. ``callbacks`` are extra
    Lightning callbacks (e.g. a test's fault injection).

    Every user error (an ``output_dir`` that is a file or cannot be written, another process on it, a resume with
    other settings, data that does not fit) is a UserError raised before any file of the run is written.
    """
    started = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    rank_zero = rank_zero_only.rank == 0  # DDP's launcher children run this too: only rank 0 locks and writes
    if rank_zero:
        check_output_dir(run_dir, "config key 'output_dir'")
    data = load_pretrain_data(cfg.data.name, cfg.data.image_size, cfg.data.path, cfg.data.num_workers)
    n_images = data.n_pretrain
    batch_key = "data.global_batch_size" if cfg.data.global_batch_size else "data.batch_size"
    if OmegaConf.select(cfg, batch_key) > n_images:
        raise UserError(f"config key {batch_key!r}: {OmegaConf.select(cfg, batch_key)} exceeds the {n_images} "
                        "training images")
    created = not run_dir.exists()
    lock = FileLock(run_dir / LOCK, f"essl pretrain {run_dir}") if rank_zero else None
    try:
        if lock is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        state = inspect_run(run_dir, cfg)
        encoder = run_dir / ENCODER
        if state.checkpoint is not None and state.epochs_completed >= cfg.trainer.max_epochs and encoder.exists():
            print(f"essl: not resuming {run_dir}: it is already finished (epoch {state.epochs_completed} of "
                  f"{cfg.trainer.max_epochs}, step {state.step}); nothing to do (raise trainer.max_epochs to train "
                  "longer)", file=sys.stderr)
            print(f"essl: encoder {encoder}")
            return encoder
        return _train(cfg, data, run_dir, state, rank_zero, callbacks, started)
    finally:
        if lock is not None:
            lock.release()
            if created and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # a run refused before it wrote anything leaves no folder behind


def _train(cfg: DictConfig, data: LabelledData | LazyImages, run_dir: Path, state: RunState, rank_zero: bool,
           extra_callbacks: Sequence[L.Callback], started: float) -> Path:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    n_images = data.n_pretrain
    knn = cfg.eval.knn_monitor and data.num_classes > 0 and data.n_test > 0
    t = cfg.trainer
    precision, note = resolve_precision(t.precision)
    if note:
        print(f"essl: {note}", file=sys.stderr)
    on_gpu = t.accelerator in ("cuda", "gpu") or (t.accelerator == "auto" and torch.cuda.is_available())
    loggers: list[Logger] = []
    csv_logger = None
    if t.logger in ("csv", "both"):
        csv_logger = HistoryCSVLogger(run_dir, state.history)
        loggers.append(csv_logger)
    if t.logger in ("tensorboard", "both"):
        from lightning.pytorch.loggers import TensorBoardLogger

        # purge_step: TensorBoard drops the events a killed session wrote after the checkpoint it resumes from
        loggers.append(TensorBoardLogger(save_dir=run_dir, name=TENSORBOARD_DIR, version="", default_hp_metric=False,
                                         **({"purge_step": state.step} if state.checkpoint else {})))

    checkpoint_io = AtomicCheckpointIO(defer=run_dir / CHECKPOINT, loggers=loggers)
    callbacks: list[L.Callback] = [
        RunBookkeeping(checkpoint_io, to_container(cfg)),  # before RunCheckpoint: it marks what a save holds
        RunCheckpoint(run_dir / CHECKPOINT, t.checkpoint_every_n_steps),
        LearningRateMonitor(logging_interval="step"),
        *extra_callbacks,
    ]
    if cfg.progress:
        callbacks.append(EpochProgressBar(refresh_rate=max(1, t.log_every_n_steps // 2)))
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no tips or GPU/TPU banners; warnings still show
    trainer = L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        sync_batchnorm=t.sync_batchnorm and on_gpu,  # torch's SyncBatchNorm runs on GPUs only; DDP only
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        deterministic=t.deterministic,
        logger=loggers,
        callbacks=callbacks,
        plugins=[checkpoint_io],
        enable_checkpointing=False,  # no default ModelCheckpoint: RunCheckpoint writes last.ckpt
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        default_root_dir=run_dir,
        check_val_every_n_epoch=cfg.eval.knn_every_n_epochs,
        num_sanity_val_steps=0,
        limit_val_batches=None if knn else 0,  # validation = the kNN monitor only
        use_distributed_sampler=False,  # the training sampler shards by rank itself (essl.data.module)
    )
    batch_size, global_batch = per_device_batch(cfg.data.batch_size, cfg.data.global_batch_size, trainer.world_size)
    if t.sync_batchnorm and not on_gpu and trainer.world_size > 1:
        print("essl: trainer.sync_batchnorm: torch's SyncBatchNorm needs GPUs; BatchNorm statistics stay per process",
              file=sys.stderr)
    module, info = build_module(cfg, data, global_batch)
    dm = ImageDataModule(data, batch_size, cfg.data.num_workers, knn_monitor=knn, seed=cfg.seed)

    if rank_zero:
        _clean_stale_files(run_dir)
        if state.checkpoint is None or not _same_settings(state.stored_config, to_container(cfg)):
            _write_config(cfg, run_dir)  # a new run, or a resume that changed keys of RESUMABLE_KEYS
        if state.checkpoint is None and csv_logger is not None:
            csv_logger.flush()  # a new run: no rows of an earlier, unfinished one
    if state.checkpoint is not None:
        longer = ""
        if state.stored_config and state.stored_config.get("trainer", {}).get("max_epochs") != t.max_epochs:
            longer = f"; trainer.max_epochs is now {t.max_epochs}"
        print(f"essl: resuming {run_dir} from {state.checkpoint} (epoch {state.epoch}, step {state.step}){longer}",
              file=sys.stderr)
    print(f"essl: {cfg.method.name} λ={cfg.equivariance.weight} on {data.name} ({n_images} images), "
          f"{cfg.backbone.name} ({info['feature_dim']}-d), global batch {global_batch}, lr {info['lr']:.4g}, "
          f"run dir {run_dir}", file=sys.stderr)
    ckpt_path = str(state.checkpoint) if state.checkpoint is not None else None
    # decided once: rank 0's decision goes to the ranks it launches, and every rank is checked against it in setup
    module.resume_from = ckpt_path = shared_resume_path(run_dir, ckpt_path)
    with hand_over_resume_path(run_dir, ckpt_path):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    module.check_finite()

    encoder = run_dir / ENCODER
    if trainer.is_global_zero:
        export_encoder(
            encoder,
            module.backbone,
            cfg.backbone.name,
            dict(cfg.backbone.kwargs),
            info["feature_dim"],
            data.channels,
            data.size,
            data.mean,
            data.std,
            config=to_container(cfg),
        )
        print(summary_line(trainer, time.perf_counter() - started, encoder))
    return encoder
