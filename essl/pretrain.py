"""``essl pretrain``: the composition root that turns a config into explicit-argument objects and trains.

Run directory (``output_dir``): ``config.yaml`` (resolved), ``metrics.csv`` (Lightning CSV logger),
``last.ckpt`` (written atomically; ``resume=true`` continues from it) and ``encoder.pt`` (the frozen-encoder
contract, :mod:`essl.encoder`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import nn

from essl.augment import LatticeViews, ViewMaker, ViewSpec, build_view_pipeline
from essl.backbones import build_backbone, check_input_size
from essl.config import LR_REFERENCE_BATCH, to_container
from essl.data import ImageDataModule, LabelledData, load_labelled
from essl.encoder import export_encoder
from essl.equivariance import EquivarianceBranch
from essl.errors import UserError
from essl.io import atomic_torch_save, atomic_write_text
from essl.methods import build_method
from essl.module import ESSLModule, OptimSpec

CHECKPOINT = "last.ckpt"
ENCODER = "encoder.pt"
log = logging.getLogger("essl")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename: a kill never leaves a torn ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


def build_module(cfg: DictConfig, data: LabelledData, global_batch: int) -> tuple[ESSLModule, dict[str, Any]]:
    """Backbone, method, views, equivariance branch and optimiser settings from the config."""
    backbone, feature_dim = build_backbone(cfg.backbone.name, data.channels, **cfg.backbone.kwargs)
    a, e = cfg.augment, cfg.equivariance
    lattice = list(a.lattice)
    eq_size = e.crop_size if e.view == "crop" else data.size
    for size in sorted({data.size} | ({eq_size} if e.weight > 0 else set())):
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
    )
    info = {"feature_dim": feature_dim, "lr": lr}
    return module, info


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_container(cfg), sort_keys=False))


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def pretrain(cfg: DictConfig) -> Path:
    """Train from a loaded config; returns the path of the exported ``encoder.pt``."""
    run_dir = Path(cfg.output_dir)
    ckpt = run_dir / CHECKPOINT
    if ckpt.exists() and not cfg.resume:
        raise UserError(f"output_dir {run_dir} already holds a run ({CHECKPOINT}); pass resume=true to continue it "
                        "or choose another output_dir")
    data = load_labelled(cfg.data.name, cfg.data.image_size, cfg.data.path)
    n_images = len(data.pretrain_images())
    if cfg.data.batch_size > n_images:
        raise UserError(f"config key 'data.batch_size': {cfg.data.batch_size} exceeds the {n_images} training images")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp"):  # temporary files of a killed atomic write
        stale.unlink(missing_ok=True)

    knn = cfg.eval.knn_monitor and data.num_classes > 0 and len(data.x_test) > 0
    t = cfg.trainer
    precision = t.precision
    if precision.startswith("16") and not torch.cuda.is_available():
        precision = "32-true"  # fp16 autocast needs a GPU; bf16 on CPU is slower than fp32 for these models
        print(f"essl: no GPU, trainer.precision={t.precision} runs as {precision}", file=sys.stderr)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(  # one file, last.ckpt, rewritten at every save: a top-1 named "last" (Lightning 2.6
            # writes save_last=True's file at an epoch end only after a top-k save, never with save_top_k=0)
            dirpath=run_dir,
            filename=Path(CHECKPOINT).stem,
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=t.checkpoint_every_n_steps or None,
            save_on_train_epoch_end=True,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps // 2)))
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no tips or GPU/TPU banners; warnings still show
    trainer = L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        sync_batchnorm=t.sync_batchnorm,
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        deterministic=t.deterministic,
        logger=CSVLogger(save_dir=run_dir, name="", version=""),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        default_root_dir=run_dir,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        limit_val_batches=None if knn else 0,  # validation = the kNN monitor only
    )
    global_batch = cfg.data.batch_size * trainer.world_size
    module, info = build_module(cfg, data, global_batch)
    dm = ImageDataModule(data, cfg.data.batch_size, cfg.data.num_workers, knn_monitor=knn)

    if trainer.is_global_zero:
        _write_config(cfg, run_dir)
    ckpt_path = None
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        print(f"essl: resuming {run_dir} from {ckpt} (epoch {state['epoch']}, step {state['global_step']})",
              file=sys.stderr)
        ckpt_path = str(ckpt)
    elif cfg.resume:
        print(f"essl: resume=true but {ckpt} does not exist; starting a new run", file=sys.stderr)
    print(f"essl: {cfg.method.name} λ={cfg.equivariance.weight} on {data.name} ({n_images} images), "
          f"{cfg.backbone.name} ({info['feature_dim']}-d), global batch {global_batch}, lr {info['lr']:.4g}, "
          f"run dir {run_dir}", file=sys.stderr)
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
    return encoder
