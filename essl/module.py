"""The LightningModule: views → method loss + λ · equivariance loss, logging, optimisation.

Data flow (docs/design.md): the DataModule yields uint8 images; Lightning moves them to the device; in
``on_after_batch_transfer`` (training only) the :class:`~essl.augment.ViewMaker` makes the invariant views and
the equivariance branch makes its exact transformed batch and labels; ``training_step`` computes
``loss = ssl_loss + λ · equi_loss`` (Dangovski et al., ICLR 2022, eq. 1). With λ = 0 there is no branch at all
and no extra forward pass.

Scale (issue 13): the training step makes no blocking device→host read (counted in ``tests/test_host_syncs.py``);
the finite-loss flag is read every ``trainer.log_every_n_steps`` steps, all-reduced under DDP so that every rank
stops together; the kNN monitor gathers every rank's shard; views are cast to the model's dtype (``bf16-true``,
``16-true``); the resume checkpoint is rank 0's (:func:`shared_resume_path`, checked in ``setup``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightly.utils.lars import LARS
from lightly.utils.scheduler import cosine_warmup_schedule
from torch import Tensor, nn

from essl.augment import Normalize, ViewMaker, to_float
from essl.equivariance import EquivarianceBranch
from essl.errors import UserError


class SyncFreeLARS(LARS):
    """lightly's ``LARS`` (You et al., "Large Batch Training of Convolutional Networks", 2017) without host syncs.

    lightly scales a parameter's update by the trust ratio η‖w‖ / (‖∇w‖ + λ‖w‖ + ε) only when ``p_norm != 0 and
    g_norm != 0``: two blocking reads of device norms per parameter per step (about 40 for a ResNet-18 with its
    heads). Here both candidate updates are formed on the device and ``torch.where`` keeps the one lightly would
    take, with the same arithmetic, so the updates are lightly's; momentum and Nesterov as in lightly (and SGD).
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum, dampening = group["weight_decay"], group["momentum"], group["dampening"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if wd != 0:  # groups without weight decay (biases, norm layers) skip the adaptation, as in lightly
                    p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                    trust = p_norm / (g_norm + p_norm * wd + group["eps"]) * group["trust_coefficient"]
                    adapted = d_p.add(p, alpha=wd).mul_(trust)
                    d_p = torch.where((p_norm != 0) & (g_norm != 0), adapted, d_p)
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf = state["momentum_buffer"]
                        buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
                    d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(d_p, alpha=-group["lr"])
        return loss


#: Lightning precision values that run on a GPU only here (CPU: float32): fp16 needs a GPU, and bf16 autocast on a
#: CPU is slower than float32 for these models. ``bf16-true`` (bf16 weights) runs on a CPU as asked.
GPU_ONLY_PRECISIONS = ("16-mixed", "16", "16-true", "bf16-mixed", "bf16")
BF16_TO_FP16 = {"bf16-mixed": "16-mixed", "bf16": "16-mixed", "bf16-true": "16-true"}


def resolve_precision(precision: str, cuda: bool | None = None) -> tuple[str, str | None]:
    """The precision a run uses for ``trainer.precision`` on this machine, and a note when it is not the one asked:
    no GPU: :data:`GPU_ONLY_PRECISIONS` run in float32; a GPU without bfloat16 (before Ampere: V100, T4) runs the
    bf16 modes in fp16 (``16-mixed`` with loss scaling; ``16-true``)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda and precision in GPU_ONLY_PRECISIONS:
        return "32-true", f"no GPU, trainer.precision={precision} runs as 32-true"
    if cuda and precision in BF16_TO_FP16 and not _native_bf16():
        new = BF16_TO_FP16[precision]
        return new, f"this GPU has no bfloat16, trainer.precision={precision} runs as {new}"
    return precision, None


def _native_bf16() -> bool:
    """Whether the GPU computes in bfloat16 natively (compute capability 8.0+), not only emulated."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before the argument: the plain check
        return torch.cuda.is_bf16_supported()


def per_device_batch(batch_size: int, global_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(per-device batch, global batch). ``data.global_batch_size`` fixes the global batch, so a config keeps its
    batch and learning rate on any number of GPUs; without it ``data.batch_size`` is per device."""
    if global_batch_size is None:
        return batch_size, batch_size * world_size
    if global_batch_size % world_size:
        raise UserError(f"config key 'data.global_batch_size': {global_batch_size} does not divide into "
                        f"{world_size} processes (devices × nodes); choose a multiple of {world_size}")
    return global_batch_size // world_size, global_batch_size


#: Lightning's SLURM auto-requeue checkpoints (written on the requeue signal, in the run folder).
REQUEUE_CHECKPOINTS = "hpc_ckpt_*.ckpt"
RESUME_ENV = "ESSL_RESUME_DECISION"


def requeue_checkpoint(last: Path) -> Path:
    """``last`` (``last.ckpt``), or a newer checkpoint beside it that Lightning wrote when SLURM signalled the job
    before a requeue (``hpc_ckpt_N.ckpt``, ``sbatch --signal=SIGUSR1@90``): the one with the most steps."""
    candidates = sorted(last.parent.glob(REQUEUE_CHECKPOINTS))
    if not candidates:
        return last
    best, best_step = last, -1
    for path in ([last] if last.exists() else []) + candidates:
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception:  # a torn requeue checkpoint is skipped (last.ckpt is checked when it is read)
            continue
        if step > best_step:
            best, best_step = path, step
    return best


def shared_resume_path(run_dir: Path, local: str | None) -> str | None:
    """The checkpoint this rank resumes from. Rank 0 decides; the ranks that Lightning launches from it
    (``trainer.strategy=ddp``: the same command re-run per device) take its decision from the environment it hands
    them (:func:`hand_over_resume_path`) instead of their own look at the folder. Ranks started independently
    (torchrun, srun) decide alike and are checked against rank 0 once the process group is up (setup)."""
    handed = os.environ.get(RESUME_ENV)
    if handed:
        decision = json.loads(handed)
        if decision.get("run_dir") == str(Path(run_dir).resolve()):
            return decision.get("checkpoint")
    return local


@contextmanager
def hand_over_resume_path(run_dir: Path, checkpoint: str | None) -> Iterator[None]:
    """Export rank 0's resume decision to the processes it launches while the block runs (``trainer.fit``)."""
    previous = os.environ.get(RESUME_ENV)
    os.environ[RESUME_ENV] = json.dumps({"run_dir": str(Path(run_dir).resolve()), "checkpoint": checkpoint})
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RESUME_ENV, None)
        else:
            os.environ[RESUME_ENV] = previous


def _distributed() -> bool:
    """A process group with more than one rank is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1)


def check_same_on_every_rank(what: str, value: object) -> None:
    """Broadcast rank 0's ``value`` and raise, on every rank, if any rank holds another one: a decision that each
    process took on its own (e.g. whether a checkpoint exists, under torchrun or srun) must not split the ranks."""
    mine = [value]
    theirs = [value]
    torch.distributed.broadcast_object_list(theirs, src=0)
    same = torch.tensor(int(theirs[0] == mine[0]))
    if torch.distributed.get_backend() == "nccl":
        same = same.cuda()
    torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    if not bool(same):
        raise DistributedMismatch(f"{what} differs between ranks: rank 0 has {theirs[0]!r}, rank "
                                  f"{torch.distributed.get_rank()} has {mine[0]!r} (is output_dir on a filesystem "
                                  "every node sees?)" if theirs[0] != mine[0] else
                                  f"{what} differs between ranks (rank 0 has {theirs[0]!r}); see the other ranks")


class DistributedMismatch(RuntimeError):
    """Ranks of one DDP run took different decisions; every rank stops with this message."""


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
        float32_matmul_precision: str | None = None,
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
        self.float32_matmul_precision = float32_matmul_precision  # set on GPUs in setup (None: torch's default)
        # normalisation of the equivariance batch and of the kNN monitor's un-augmented inputs, in float32 (the
        # view pipelines normalise their own output)
        self.input_norm = Normalize(input_mean, input_std)
        self._all_finite: Tensor | None = None  # device flag, read only every `finite_check_every` steps
        self._val_features: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        self.resume_from: str | None = None  # the checkpoint this rank resumes from (checked against rank 0's)

    # ---- data on the device -------------------------------------------------------------------------------
    def compute_dtype(self) -> torch.dtype:
        """The backbone's floating dtype: float32, or bf16 / fp16 under ``trainer.precision=bf16-true|16-true``
        (Lightning converts the module; autocast's ``*-mixed`` keep float32 weights)."""
        return next((p.dtype for p in self.backbone.parameters() if p.is_floating_point()), torch.float32)

    def _model_input(self, x: Tensor) -> Tensor:
        """A float32 batch made ready for the backbone: its dtype and memory format."""
        return x.to(dtype=self.compute_dtype(), memory_format=self.memory_format)

    def make_training_batch(self, x: Tensor) -> dict[str, object]:
        """uint8 (B, C, H, W) on the device -> views (and the equivariance batch with exact labels). The views are
        made in float32 and then cast to the backbone's dtype (no-op in float32 and with autocast)."""
        views, eq_source = self.view_maker(x)
        batch: dict[str, object] = {"views": [self._model_input(v) for v in views]}
        if self.equivariance is not None:
            x_eq, labels = self.equivariance.make_batch(eq_source)  # (G·B, C, h, w), (G·B,), data units
            x_eq = self.input_norm(x_eq)  # normalised after the transformation
            batch["x_eq"], batch["eq_labels"] = self._model_input(x_eq), labels
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
        # Lightning reads progress-bar values back to the host at every step they are logged: show them at the
        # logging steps only (the bar keeps the last value), so the other steps make no host read at all
        self.log("train/loss", out["loss"], batch_size=n)
        self.log("train/ssl_loss", out["ssl"], batch_size=n)
        if "equi" in out:
            self.log("train/equi_loss", out["equi"], batch_size=n)
            self.log("train/equi_acc", out["equi_acc"], batch_size=n)
        if self._trainer is not None and (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            shown = {"loss": out["loss"], **({"equi_acc": out["equi_acc"]} if "equi" in out else {})}
            self.log_dict(shown, prog_bar=True, logger=False, batch_size=n)
        self._track_finite(out["loss"].detach())
        return out["loss"]

    def _track_finite(self, loss: Tensor) -> None:
        finite = torch.isfinite(loss)
        self._all_finite = finite if self._all_finite is None else self._all_finite & finite
        if (self.global_step + 1) % self.finite_check_every == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Host sync on the finite flag (kept off the per-step path); raises TrainingDiverged.

        Under DDP the flag is all-reduced first (MIN over ranks), so a NaN on any rank stops every rank at the same
        check with the same message; a rank that raised alone would leave the others waiting in their next
        collective until the process group's timeout. Every rank reaches the same checks (the same step numbers,
        checkpoint saves and epoch ends), so the collective is matched."""
        flag = self._all_finite
        if _distributed():
            local = flag if flag is not None else torch.ones((), dtype=torch.bool, device=self.device)
            flag = local.to(torch.int32)  # ReduceOp.MIN over int32: NCCL and gloo have no bool reduction
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            if not bool(local):
                where = f" on rank {torch.distributed.get_rank()}"
            else:
                where = " on another rank"
        else:
            where = ""
        if flag is not None and not bool(flag):
            raise TrainingDiverged(
                f"loss became NaN or infinite by step {self.global_step}{where}; stopped, the last good checkpoint "
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
        on_gpu = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if on_gpu and self.float32_matmul_precision:
            # TF32 tensor cores for float32 matmuls (Ampere and newer); torch's own default is "highest"
            torch.set_float32_matmul_precision(self.float32_matmul_precision)
        if _distributed():
            check_same_on_every_rank("resume checkpoint", self.resume_from)
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
        x, y, index = batch if len(batch) == 3 else (*batch, None)  # index: the sample's position in its split
        if index is None:
            index = torch.arange(len(y), device=y.device) + batch_idx * len(y)
        feats = self.backbone(self._model_input(self.input_norm(to_float(x)))).float()
        self._val_features.setdefault(dataloader_idx, []).append((feats.detach(), y, index))

    def on_validation_epoch_end(self) -> None:
        """kNN accuracy of the test split against the labelled train split (InstDisc's classifier, essl.knn).

        Under DDP each rank embedded a shard of both splits (Lightning's DistributedSampler, padded with repeated
        samples to equal shards); the features, labels and sample indices are gathered from every rank and
        de-duplicated by index (:func:`essl.knn.merge_shards`), so every rank scores the whole test split
        against the whole bank, the single-process accuracy."""
        from essl.knn import knn_accuracy, merge_shards

        parts = self._val_features
        self._val_features = {}
        if 0 not in parts or 1 not in parts or self.num_classes is None:
            return
        splits = []
        for dl in (0, 1):
            feats, labels, index = (torch.cat([p[i] for p in parts[dl]]) for i in range(3))
            if self.trainer.world_size > 1:
                feats, labels, index = (self.all_gather(t) for t in (feats, labels, index))
            splits.append(merge_shards(index, feats, labels))
        (bank_x, bank_y), (test_x, test_y) = splits
        acc = knn_accuracy(
            bank_x, bank_y, test_x, test_y, self.num_classes, k=self.knn_k, temperature=self.knn_temperature
        )
        self.log("val/knn_acc", acc, prog_bar=True, rank_zero_only=True)

    # ---- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        fixed = {id(p) for p in getattr(self.method, "fixed_lr_parameters", lambda: [])()}
        groups = optimizer_groups(list(self.named_parameters()), o, fixed)
        if o.name == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        elif o.name == "lars":
            opt = SyncFreeLARS(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
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
