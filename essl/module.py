"""The LightningModule: views → method loss + λ · equivariance loss, logging, optimisation.

Data flow (docs/design.md): the DataModule yields uint8 images; Lightning moves them to the device; in
``on_after_batch_transfer`` (training only) the :class:`~essl.augment.ViewMaker` makes the invariant views and
the equivariance branch makes its exact transformed batch and labels; ``training_step`` computes
``loss = ssl_loss + λ · equi_loss`` (Dangovski et al., ICLR 2022, eq. 1). With λ = 0 there is no branch at all
and no extra forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from lightly.utils.lars import LARS
from lightly.utils.scheduler import cosine_warmup_schedule
from torch import Tensor, nn

from essl.augment import ViewMaker, to_float
from essl.equivariance import EquivarianceBranch


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class OptimSpec:
    """Optimiser and schedule; ``lr`` is the absolute peak learning rate (already scaled by batch size)."""

    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 10.0
    final_lr_ratio: float = 0.0  # cosine decay to lr · final_lr_ratio
    exclude_bias_norm: bool | None = None  # biases and norm weights: no weight decay, no LARS adaptation (None:
    # only with LARS, as Barlow Twins / BYOL / SimCLR do)
    bias_lr_ratio: float = 1.0  # their learning rate relative to the weights' (Barlow Twins: 0.0048 / 0.2)


def optimizer_groups(named: list[tuple[str, nn.Parameter]], spec: OptimSpec,
                     fixed_lr: set[int]) -> list[dict]:
    """Parameter groups: weights; biases and norm weights (1-d tensors) apart when excluded (no weight decay, which
    also switches lightly's LARS adaptation off, and ``bias_lr_ratio``); and parameters whose ``id`` is in
    ``fixed_lr`` (e.g. SimSiam's predictor) in their own groups that keep the peak learning rate (``fixed_lr``)."""
    exclude = spec.exclude_bias_norm if spec.exclude_bias_norm is not None else spec.name == "lars"
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for _, p in named:
        if not p.requires_grad:
            continue
        key = (exclude and p.ndim <= 1, id(p) in fixed_lr)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (bias_norm, fixed), params in sorted(buckets.items()):
        lr = spec.lr * (spec.bias_lr_ratio if bias_norm else 1.0)
        groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if bias_norm else spec.weight_decay,
                       "fixed_lr": fixed})
    return groups


class ESSLModule(L.LightningModule):
    def __init__(
        self,
        backbone: nn.Module,
        method: nn.Module,
        view_maker: ViewMaker,
        optim: OptimSpec,
        input_mean: tuple[float, ...],
        input_std: tuple[float, ...],
        equivariance: EquivarianceBranch | None = None,
        knn_k: int = 200,
        knn_temperature: float = 0.1,
        num_classes: int | None = None,
        finite_check_every: int = 10,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.view_maker = view_maker
        self.equivariance = equivariance
        self.optim = optim
        self.knn_k, self.knn_temperature, self.num_classes = knn_k, knn_temperature, num_classes
        self.finite_check_every = finite_check_every
        self.memory_format = memory_format  # of the views: channels_last to match a channels-last backbone
        # normalisation for un-augmented inputs (kNN monitor); the view pipelines normalise their own output
        self.register_buffer("input_mean", torch.tensor(input_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(input_std).view(1, -1, 1, 1), persistent=False)
        self._all_finite: Tensor | None = None  # device flag, read only every `finite_check_every` steps
        self._val_features: dict[int, list[tuple[Tensor, Tensor]]] = {}

    # ---- data on the device -------------------------------------------------------------------------------
    def make_training_batch(self, x: Tensor) -> dict[str, object]:
        """uint8 (B, C, H, W) on the device -> views (and the equivariance batch with exact labels)."""
        views, eq_source = self.view_maker(x)
        batch: dict[str, object] = {"views": [v.contiguous(memory_format=self.memory_format) for v in views]}
        if self.equivariance is not None:
            x_eq, labels = self.equivariance.make_batch(eq_source)  # (G·B, C, h, w), (G·B,), data units
            x_eq = (x_eq - self.input_mean) / self.input_std  # normalised after the transformation
            batch["x_eq"], batch["eq_labels"] = x_eq.contiguous(memory_format=self.memory_format), labels
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # runs during validation and the sanity check too: augment only while training (docs/design.md)
        if self._trainer is not None and self.trainer.training:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            return self.make_training_batch(x)
        return batch

    # ---- training -----------------------------------------------------------------------------------------
    def max_steps(self) -> int:
        if self._trainer is None:
            return 1
        steps = self.trainer.estimated_stepping_batches
        return int(steps) if math.isfinite(steps) else 1

    def losses(self, batch: dict[str, object], step: int = 0, max_steps: int = 1) -> dict[str, Tensor]:
        """The step's losses: ``ssl`` always, ``equi`` and ``equi_acc`` when the branch exists, ``loss`` total."""
        ssl = self.method.loss(self.backbone, batch["views"], step, max_steps)
        out = {"ssl": ssl, "loss": ssl}
        if self.equivariance is not None:
            equi, acc = self.equivariance.loss(self.backbone, batch["x_eq"], batch["eq_labels"])
            out.update(equi=equi, equi_acc=acc, loss=ssl + self.equivariance.weight * equi)
        return out

    def training_step(self, batch, batch_idx: int) -> Tensor:
        out = self.losses(batch, self.global_step, self.max_steps())
        n = batch["views"][0].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("train/ssl_loss", out["ssl"], batch_size=n)
        if "equi" in out:
            self.log("train/equi_loss", out["equi"], batch_size=n)
            self.log("train/equi_acc", out["equi_acc"], prog_bar=True, batch_size=n)
        self._track_finite(out["loss"].detach())
        return out["loss"]

    def _track_finite(self, loss: Tensor) -> None:
        finite = torch.isfinite(loss)
        self._all_finite = finite if self._all_finite is None else self._all_finite & finite
        if (self.global_step + 1) % self.finite_check_every == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Host sync on the finite flag (kept off the per-step path); raises TrainingDiverged."""
        if self._all_finite is not None and not bool(self._all_finite):
            raise TrainingDiverged(
                f"loss became NaN or infinite by step {self.global_step}; stopped, the last good checkpoint "
                "is kept (try a lower learning rate)"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never overwrite a good checkpoint with diverged weights
        # the augmentation stream (kornia and transforms draw from torch's global RNG) resumes where it was
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["essl_rng"] = rng

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("essl_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self._decorrelate_ranks()

    def setup(self, stage: str) -> None:
        self._decorrelate_ranks()

    def _decorrelate_ranks(self) -> None:
        """Under DDP every rank starts from the same seed (``seed_everything``): offset the global RNG by the
        rank so that each GPU draws different views (docs/design.md). A no-op on one process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return
        base = int(torch.randint(0, 2**62, (1,)))  # identical on every rank at this point
        torch.manual_seed(base + self.trainer.global_rank)

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    # ---- optional kNN monitor: dataloader 0 = labelled train (memory bank), 1 = test -------------------
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        feats = self.backbone((to_float(x) - self.input_mean) / self.input_std)
        self._val_features.setdefault(dataloader_idx, []).append((feats.detach(), y))

    def on_validation_epoch_end(self) -> None:
        from essl.knn import knn_accuracy

        parts = self._val_features
        self._val_features = {}
        if 0 not in parts or 1 not in parts or self.num_classes is None:
            return
        bank_x = torch.cat([f for f, _ in parts[0]])
        bank_y = torch.cat([y for _, y in parts[0]])
        test_x = torch.cat([f for f, _ in parts[1]])
        test_y = torch.cat([y for _, y in parts[1]])
        acc = knn_accuracy(
            bank_x, bank_y, test_x, test_y, self.num_classes, k=self.knn_k, temperature=self.knn_temperature
        )
        self.log("val/knn_acc", acc, prog_bar=True)

    # ---- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        fixed = {id(p) for p in getattr(self.method, "fixed_lr_parameters", lambda: [])()}
        groups = optimizer_groups(list(self.named_parameters()), o, fixed)
        if o.name == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        elif o.name == "lars":
            opt = LARS(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        elif o.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {o.name!r}")
        max_steps = self.max_steps()
        epochs = max(1, self.trainer.max_epochs or 1) if self._trainer is not None else 1
        warmup = min(max_steps, int(round(o.warmup_epochs * max_steps / epochs)))

        def cosine(step: int) -> float:  # linear warm-up from 0, then cosine to final_lr_ratio (per step)
            return cosine_warmup_schedule(min(step, max_steps), max_steps, 1.0, o.final_lr_ratio, warmup, 0.0)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [(lambda _: 1.0) if g["fixed_lr"] else cosine for g in groups])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
