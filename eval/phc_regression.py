"""DOS regression of photonic crystals from a pretrained encoder, beside the same network trained from scratch.

The downstream task of the photonics experiment of Dangovski et al., "Equivariant Contrastive Learning"
(ICLR 2022), after Loh et al., "Surrogate- and invariance-boosted contrastive learning for data-scarce
applications in science" (Nature Communications 13, 4223, 2022): predict the density of states (DOS) of a 2D
photonic crystal from its 32×32 permittivity map, from few labels, and score the relative L1 error.

Protocol (what ``essl phc regress`` reports):

* **Labels.** For seed ``s`` the train file is permuted with a generator seeded by ``s``; its first
  ``n_labels`` structures are the labelled set. The first ``round(val_fraction · n_labels)`` of them (at least
  one) form the validation split, the rest the fitting split. Encoder and scratch runs of one seed see exactly
  the same labels.
* **Networks.** A DOS head (:class:`DOSHead`, the MLP 1024 → 1024 → 512 → 400 of the paper, hidden sizes
  scaled down for narrower encoders) on

  - ``mode="frozen"``: the frozen encoder. Its features are extracted once (no gradient, eval mode) and
    standardised with fitting-split statistics; only the head is trained;
  - ``mode="finetune"``: a copy of the encoder, trained with the head; the backbone's learning rate is
    :data:`BACKBONE_LR_FACTOR` times the head's;
  - and beside it, always, **from scratch**: the same backbone architecture (the encoder's ``backbone`` spec,
    or ``scratch_backbone`` when there is no encoder), randomly initialised, trained end to end with the
    head at the full learning rate.

  Every network takes raw permittivity maps and normalises them as (ε − mean)/std with the encoder file's
  input spec (:data:`PHC_INPUT_MEAN`, :data:`PHC_INPUT_STD` = (ε − 1)/19 without an encoder, DESIGN.md).
* **Targets.** The benchmark target DOS − 2πω on 400 points (:mod:`essl.photonics.dos`), standardised for
  the loss with the fitting split's per-point mean and one global scale; the loss is the MSE on the
  standardised targets.
* **Optimisation.** Adam, cosine learning-rate decay to zero over all steps, ``epochs`` passes over the
  fitting split in seeded random batches (every batch at least ``batch_size`` structures, none smaller, so
  BatchNorm never sees a batch of one).
* **Augmentation** (``augment``): exact lattice symmetries that leave the DOS unchanged — a random element of
  C4v, of the four flips, and/or a periodic shift by a whole number of pixels (:mod:`essl.transforms`). Applied
  to every fitting batch of end-to-end training (fine-tuning and scratch). A frozen encoder's head sees
  :data:`FROZEN_VIEWS` feature vectors per fitting structure instead, extracted once: the identity and
  ``FROZEN_VIEWS − 1`` random augmented views. Validation and test maps are never augmented.
* **Model selection on validation only.** After every epoch the validation relative L1 error is computed;
  the weights of the best epoch (the first on ties) are kept. The test file is touched once per trained
  model, after selection, to score the selected weights: never to choose anything.
* **Score.** Relative L1 error of :func:`essl.photonics.dos.relative_l1` over the whole test file: mean over
  structures of Σ|ŷ − y| / Σ|y| over target points 100..399, after adding the empty-lattice line back to
  both (Loh et al. 2022). Errors are fractions; we report mean ± sample standard deviation (n − 1) over seeds
  and every seed's value.

The defaults are sized for CPU runs of a few hundred labels at encoder width 0.25 (a few seconds per model);
the paper's own runs train longer on GPUs. Compare encoders under the same settings only.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import essl
from essl.backbones import build_backbone, check_input_size
from essl.encoder import FrozenEncoder
from essl.errors import UserError
from essl.io import atomic_write, atomic_write_json
from essl.photonics import dos as phc_dos
from essl.photonics.dataset import PhCData, open_dataset
from essl.runtime import resolve_device, torch_threads
from essl.transforms import random_shift, transform

# ------------------------------------------------------------------------------------------------ settings

#: Hidden sizes of the DOS head for a 1024-d encoder (Dangovski et al. 2022, after Loh et al. 2022).
HEAD_HIDDEN: tuple[int, ...] = (1024, 512)
#: Feature size of the paper's encoder; narrower encoders get hidden sizes scaled by feature_dim / this.
PAPER_FEATURE_DIM = 1024
#: Smallest hidden layer of a scaled-down head.
MIN_HIDDEN = 32

MODES = ("frozen", "finetune")
AUGMENTS = ("none", "c4v", "flips", "shifts", "c4v+shifts", "flips+shifts")

#: Passes over the fitting split. Measured on 400 + 200 level-set cells (kgrid 12, cutoff 4), 100 labels, phc_cnn
#: width 0.25, relative L1 on the 200 held-out cells (development only, not a per-run choice): from scratch 7.4%
#: at 50 epochs, 7.1% at 100, 6.9% at 200 (2-3 seeds); a head on a random-init frozen encoder 7.7% at 100, 7.4%
#: at 300. Predicting the target 0 (the empty lattice) scores 9.1%, the training mean 9.3%. 100 epochs keeps a
#: model at ~10-30 s on one CPU thread.
DEFAULT_EPOCHS = 100
#: Structures per training batch (batches are never smaller than this; see :func:`_batches`).
DEFAULT_BATCH_SIZE = 32
#: Adam learning rate of the head, and of every parameter when training from scratch (3e-3 measured within
#: seed noise of it on the set above: scratch 7.0% vs 7.1%).
DEFAULT_LR = 1e-3
#: Fine-tuning: the pretrained backbone learns this much slower than the freshly initialised head.
BACKBONE_LR_FACTOR = 0.1
#: Adam L2 penalty (``weight_decay``), all parameters.
DEFAULT_WEIGHT_DECAY = 0.0
#: Share of the labelled structures held out for model selection.
DEFAULT_VAL_FRACTION = 0.2
#: Number of seeds (mean ± std over seeds).
DEFAULT_SEEDS = 3
#: Feature vectors per fitting structure for a frozen encoder with augmentation (identity + random views).
FROZEN_VIEWS = 8
#: Structures per forward pass when extracting features or predicting.
EVAL_BATCH_SIZE = 256
#: The fitting split needs this many structures (BatchNorm in training mode needs a batch of two).
MIN_FIT = 2
#: Smallest batch size accepted, for the same reason.
MIN_BATCH_SIZE = 2
#: CPU intra-op threads while training: the networks are small, and on the shared 2-core machines two threads
#: were measured 3-15x slower than one (phc_cnn width 0.25, batch 32, Adam step: 0.06-0.08 s on one thread,
#: 0.4-1.2 s on two, load average ~5). None keeps torch's setting.
CPU_THREADS: int | None = 1
#: Input normalisation of permittivity maps without an encoder file: (ε − 1)/19 maps ε ∈ [1, 20] to [0, 1].
PHC_INPUT_MEAN = 1.0
PHC_INPUT_STD = 19.0
#: Backbone width of the from-scratch network when no encoder is given (the CPU-sized photonics encoder).
DEFAULT_SCRATCH_WIDTH = 0.25
#: Test structures shown in the figure (the first ones of the test file).
FIGURE_CELLS = 4
#: Figure size per shown cell (width, height in inches).
FIGURE_ROW_SIZE = (9.0, 2.4)
FIGURE_DPI = 100
#: A target whose fitting-split standard deviation is below this is only centred (the loss scale stays finite).
MIN_TARGET_STD = 1e-8


def default_scratch_backbone() -> dict[str, Any]:
    """The from-scratch network without an encoder: ``{"name": "phc_cnn", "kwargs": {"width": 0.25}}``."""
    return {"name": "phc_cnn", "kwargs": {"width": DEFAULT_SCRATCH_WIDTH}}


# ---------------------------------------------------------------------------------------------------- head


def head_hidden_sizes(feature_dim: int) -> tuple[int, ...]:
    """Hidden sizes of :class:`DOSHead`: (1024, 512) for the paper's 1024-d features, scaled by
    ``feature_dim / 1024`` (at least :data:`MIN_HIDDEN`) for narrower encoders, never widened."""
    ratio = min(1.0, feature_dim / PAPER_FEATURE_DIM)
    return tuple(max(MIN_HIDDEN, round(h * ratio)) for h in HEAD_HIDDEN)


class DOSHead(nn.Module):
    """MLP from encoder features to the 400-point DOS target: feature_dim → 1024 → 512 → 400, ReLU between.

    The prediction head of the photonics experiment (Dangovski et al. 2022; Loh et al. 2022). Hidden sizes
    follow :func:`head_hidden_sizes` unless ``hidden`` is given. (B, feature_dim) → (B, out_dim).
    """

    def __init__(self, feature_dim: int, out_dim: int = phc_dos.N_TARGET, hidden: tuple[int, ...] | None = None):
        super().__init__()
        hidden = head_hidden_sizes(feature_dim) if hidden is None else tuple(hidden)
        layers: list[nn.Module] = []
        width = feature_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.hidden = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Standardise(nn.Module):
    """(x − mean) / std with fixed buffers (frozen features, fitting-split statistics)."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


# ------------------------------------------------------------------------------------------------ helpers


def _summary(values: list[float]) -> dict[str, Any]:
    """{"mean", "std" (sample, n − 1; 0 for one value), "per_seed"}."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": list(values)}


def _figure_format(path: str | os.PathLike) -> str:
    """The image format of ``path`` from its suffix; an unknown one is a UserError (checked before training)."""
    from matplotlib.figure import Figure

    fmt = Path(path).suffix.lstrip(".").lower()
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise UserError(f"--figure {path}: unknown image format {fmt!r} (use one of {', '.join(sorted(supported))})")
    return fmt


# ------------------------------------------------------------------------------------------- augmentation


def augment_maps(x: Tensor, augment: str, generator: torch.Generator | None = None) -> Tensor:
    """A random lattice symmetry per map (x: (B, 1, n, n) permittivity maps); the DOS is invariant to all.

    ``augment``: "none"; "c4v" (one of the 8 symmetries of the square); "flips" (one of the 4 flips);
    "shifts" (a periodic shift by whole pixels); "c4v+shifts", "flips+shifts" (the symmetry, then a shift).
    """
    if augment not in AUGMENTS:
        raise UserError(f"--augment {augment!r}: expected one of {', '.join(AUGMENTS)}")
    parts = augment.split("+")
    if "c4v" in parts:
        x, _ = transform(x, "c4v", mode="random", generator=generator)
    if "flips" in parts:
        x, _ = transform(x, "flip4", mode="random", generator=generator)
    if "shifts" in parts:
        x, _ = random_shift(x, generator=generator)
    return x


# --------------------------------------------------------------------------------------------- training


@dataclass
class Selected:
    """A trained model after validation-only selection."""

    model: nn.Module  # carries the selected weights; maps inputs to standardised targets
    best_epoch: int  # 1-based epoch whose weights were kept
    val_error: float  # validation relative L1 error of those weights
    val_history: list[float]  # validation error after every epoch


@dataclass
class _TargetScale:
    """Per-point mean and global scale of the fitting targets: loss targets are (y − mean) / scale."""

    mean: Tensor  # (400,)
    scale: Tensor  # ()

    @classmethod
    def fit(cls, y: Tensor) -> _TargetScale:
        mean = y.mean(dim=0)
        scale = (y - mean).pow(2).mean().sqrt().clamp_min(MIN_TARGET_STD)
        return cls(mean, scale)

    def to_loss(self, y: Tensor) -> Tensor:
        return (y - self.mean) / self.scale

    def to_target(self, out: Tensor) -> Tensor:
        return out * self.scale + self.mean


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A seeded shuffle of range(n) cut into ⌊n / batch_size⌋ (at least one) nearly equal batches, so that
    none is smaller than ``min(n, batch_size)``."""
    perm = torch.randperm(n, generator=generator)
    return list(torch.tensor_split(perm, max(1, n // batch_size)))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, scale: _TargetScale, device: torch.device) -> Tensor:
    """Targets (N, 400) predicted by ``model`` in eval mode, batched, on the CPU (float32)."""
    was_training = model.training
    model.eval()
    out = [scale.to_target(model(x[i:i + EVAL_BATCH_SIZE].to(device))).cpu()
           for i in range(0, len(x), EVAL_BATCH_SIZE)]
    model.train(was_training)
    return torch.cat(out)


def train_select(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    fit: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    scale: _TargetScale,
    *,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    augment: Callable[[Tensor], Tensor] | None,
    generator: torch.Generator,
    device: torch.device,
    num_threads: int | None = CPU_THREADS,
) -> Selected:
    """Train ``model`` on the fitting split and keep the epoch with the lowest validation relative L1 error.

    Takes no test data, by design. ``fit`` and ``val`` are (inputs, targets) pairs on the CPU; ``augment``
    (or None) is applied to every fitting batch on ``device``. Adam on ``param_groups`` (each with its own
    ``lr``), cosine decay to zero over all steps, MSE on standardised targets. On the CPU it runs with
    ``num_threads`` intra-op threads (None: torch's setting).
    """
    with torch_threads(num_threads if device.type == "cpu" else None):
        x_fit, y_fit = fit
        x_val, y_val = val
        y_fit_loss = scale.to_loss(y_fit)
        optimizer = torch.optim.Adam(param_groups, weight_decay=weight_decay)
        steps_per_epoch = len(_batches(len(x_fit), batch_size, torch.Generator()))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        model.to(device)
        best_state, best_epoch, best_error, history = None, 0, math.inf, []
        for epoch in range(1, epochs + 1):
            model.train()
            for idx in _batches(len(x_fit), batch_size, generator):
                xb, yb = x_fit[idx].to(device), y_fit_loss[idx].to(device)
                if augment is not None:
                    xb = augment(xb)
                loss = nn.functional.mse_loss(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            error = float(phc_dos.relative_l1(predict(model, x_val, scale, device), y_val))
            history.append(error)
            if error < best_error or best_state is None:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_epoch, best_error = epoch, error
        model.load_state_dict(best_state)
        model.eval()
        return Selected(model=model, best_epoch=best_epoch, val_error=best_error, val_history=history)


# ------------------------------------------------------------------------------------------------- data


@dataclass
class _Split:
    fit: Tensor  # indices into the train file
    val: Tensor


def label_split(n_train: int, n_labels: int, val_fraction: float, seed: int) -> _Split:
    """The seed's labelled structures: the first ``n_labels`` of a permutation of the train file seeded by
    ``seed``; the first ``n_val`` of those validate, the rest fit (protocol: module docstring)."""
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n_labels]
    n_val = _n_val(n_labels, val_fraction)
    return _Split(fit=perm[n_val:], val=perm[:n_val])


def _n_val(n_labels: int, val_fraction: float) -> int:
    return max(1, round(val_fraction * n_labels))


def _maps(data: PhCData) -> Tensor:
    """(N, 1, n, n) float32 permittivity maps (physical values)."""
    return torch.from_numpy(np.ascontiguousarray(data.eps, dtype=np.float32)).unsqueeze(1)


def _targets(data: PhCData) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(data.target, dtype=np.float32))


def _load(path: str | os.PathLike, role: str) -> PhCData:
    data = open_dataset(path, require_labels=True)
    if data.target.shape[1] != phc_dos.N_TARGET:
        raise UserError(f"--{role} {path}: targets have {data.target.shape[1]} points, expected {phc_dos.N_TARGET}")
    return data


@torch.no_grad()
def _features(encoder: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    """Frozen-encoder features (N, D) of maps x (N, 1, n, n), batched, eval mode, on the CPU."""
    encoder.to(device).eval()
    return torch.cat([encoder(x[i:i + EVAL_BATCH_SIZE].to(device)).float().cpu()
                      for i in range(0, len(x), EVAL_BATCH_SIZE)])


# ------------------------------------------------------------------------------------------------- networks


def _input_spec(encoder: FrozenEncoder | None, size: int) -> dict[str, Any]:
    if encoder is not None:
        return dict(encoder.input)
    return {"channels": 1, "size": size, "mean": [PHC_INPUT_MEAN], "std": [PHC_INPUT_STD]}


def _scratch_network(backbone_spec: dict[str, Any], input_spec: dict[str, Any], seed: int) -> tuple[nn.Module, int]:
    """Normalisation + a randomly initialised backbone (seeded), trainable: (module, feature_dim)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, feature_dim = build_backbone(backbone_spec["name"], int(input_spec["channels"]),
                                               **dict(backbone_spec.get("kwargs", {})))
    check_input_size(backbone, int(input_spec["channels"]), int(input_spec["size"]))
    spec = {"feature_dim": feature_dim, "input": input_spec, "backbone": backbone_spec}
    return FrozenEncoder(backbone, spec).train(), feature_dim


def _seeded_head(feature_dim: int, seed: int) -> DOSHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DOSHead(feature_dim)


def _trainable(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(True)
    return module.train()


# -------------------------------------------------------------------------------------------------- runs


@dataclass
class _Run:
    """One (model kind, seed) run: the test error and what selection chose."""

    test_error: float
    val_error: float
    best_epoch: int
    figure_pred: Tensor  # (FIGURE_CELLS, 400) test predictions of the selected model


def _score(selected: Selected, x_test: Tensor, y_test: Tensor, scale: _TargetScale, device: torch.device,
           n_figure: int) -> _Run:
    """The one use of the test file: score the already selected model."""
    pred = predict(selected.model, x_test, scale, device)
    error = float(phc_dos.relative_l1(pred, y_test))
    return _Run(test_error=error, val_error=selected.val_error, best_epoch=selected.best_epoch,
                figure_pred=pred[:n_figure].clone())


def _check_args(mode: str, augment: str, seeds: int, epochs: int, batch_size: int, lr: float,
                val_fraction: float, weight_decay: float) -> None:
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if augment not in AUGMENTS:
        raise UserError(f"--augment {augment!r}: expected one of {', '.join(AUGMENTS)}")
    for name, value, low in (("seeds", seeds, 1), ("epochs", epochs, 1), ("batch_size", batch_size, MIN_BATCH_SIZE)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise UserError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise UserError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


def _check_labels(n_labels: int, n_train: int, val_fraction: float, train: str | os.PathLike) -> tuple[int, int]:
    if isinstance(n_labels, bool) or not isinstance(n_labels, int):
        raise UserError(f"--n-labels must be an integer, got {n_labels!r}")
    if n_labels > n_train:
        raise UserError(f"--n-labels {n_labels} is larger than the train file {train} ({n_train} structures)")
    n_val = _n_val(n_labels, val_fraction) if n_labels > 0 else 0
    if n_labels - n_val < MIN_FIT:
        smallest = next(n for n in range(1, n_train + 2) if n - _n_val(n, val_fraction) >= MIN_FIT)
        raise UserError(f"--n-labels {n_labels} is too small for a validation split of {val_fraction:g} "
                        f"and {MIN_FIT} fitting structures (need at least {smallest})")
    return n_labels - n_val, n_val


def _check_encoder(encoder: FrozenEncoder, path: str | os.PathLike, size: int) -> None:
    channels, enc_size = int(encoder.input["channels"]), int(encoder.input["size"])
    if channels != 1:
        raise UserError(f"encoder {path} takes {channels} input channels; permittivity maps have 1")
    if enc_size != size:
        raise UserError(f"encoder {path} takes {enc_size}x{enc_size} inputs; the data has {size}x{size} maps")


def protocol_text(mode: str, augment: str, epochs: int, val_fraction: float) -> str:
    """One-paragraph statement of the protocol, stored in the JSON result."""
    head = "head on frozen features (extracted once, standardised)" if mode == "frozen" else (
        f"encoder fine-tuned with the head (backbone lr x{BACKBONE_LR_FACTOR:g})")
    return (
        f"labels: first n_labels of a seeded permutation of train, {val_fraction:g} of them for validation; "
        f"encoder: {head}; scratch: same backbone architecture, random init, trained end to end; "
        f"DOS head MLP feature_dim->{'->'.join(str(h) for h in HEAD_HIDDEN)}->{phc_dos.N_TARGET} "
        f"(hidden scaled by feature_dim/{PAPER_FEATURE_DIM} below {PAPER_FEATURE_DIM}); "
        f"Adam, cosine decay, MSE on standardised targets, {epochs} epochs; augment={augment} on fitting batches "
        f"(frozen: {FROZEN_VIEWS} views per structure); best epoch by validation relative L1, test scored once "
        f"after selection; relative L1 over target points {phc_dos.METRIC_START}..{phc_dos.N_TARGET - 1} with "
        "the empty lattice added back; mean ± sample std over seeds"
    )


def run_regression(
    encoder: str | os.PathLike | None,
    train: str | os.PathLike,
    test: str | os.PathLike,
    n_labels: int,
    *,
    mode: str = "frozen",
    seeds: int = DEFAULT_SEEDS,
    augment: str = "none",
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    device: str | torch.device | None = None,
    json_path: str | os.PathLike | None = None,
    figure_path: str | os.PathLike | None = None,
    progress: bool = True,
    scratch_backbone: dict[str, Any] | None = None,
    num_threads: int | None = CPU_THREADS,
    with_scratch: bool = True,
) -> dict[str, Any]:
    """Regress the DOS from an encoder file and from scratch on the same labels (protocol: module docstring).

    Args:
        encoder: an ``encoder.pt`` pretrained on permittivity maps (1 channel, the data's size), or None for
            the from-scratch baseline alone.
        train, test: labelled HDF5 files (:func:`essl.photonics.dataset.generate` with ``labels=True``).
        n_labels: labelled training structures per seed (validation included).
        mode: "frozen" (train a head on frozen features) or "finetune" (train the whole network).
        seeds: runs 0 .. seeds − 1; the seed sets the labelled subset, the initialisation and batch order.
        augment: lattice augmentation of fitting batches, one of :data:`AUGMENTS`.
        epochs, batch_size, lr, weight_decay: optimisation (Adam, cosine decay); the fine-tuned backbone
            learns at ``lr · BACKBONE_LR_FACTOR``.
        val_fraction: share of the labelled structures held out for model selection.
        device: where to train; default CUDA when available, else CPU.
        json_path: write the result there (atomically).
        figure_path: save a figure of predicted vs true DOS for the first test cells (seed 0), with the maps.
        progress: show a progress bar.
        scratch_backbone: ``{"name", "kwargs"}`` of the from-scratch network without an encoder (default
            :func:`default_scratch_backbone`); with an encoder, the encoder's own backbone spec is used.
        num_threads: CPU intra-op threads while training (None: torch's setting).
        with_scratch: also train the from-scratch network (with an encoder). Its result depends only on the
            files, labels, seeds, settings and backbone architecture, so a comparison of several encoders of
            one architecture can run it once (``encoder=None``) and skip it here.

    Returns:
        ``{"encoder", "train", "test", "n_labels", "mode", "seeds", "augment", "results": {"encoder":
        {"mean", "std", "per_seed", "val_per_seed", "best_epoch"}, "scratch": {...}}, "settings": {...},
        "protocol", "elapsed_seconds"}``; ``results`` has no "encoder" entry when ``encoder`` is None and no
        "scratch" entry with ``with_scratch=False``.
        Errors are fractions (relative L1).

    Raises:
        UserError: unknown mode or augmentation, unlabelled or unreadable files, ``n_labels`` larger than
            the train file or too small for a validation split, an encoder of the wrong input shape.
    """
    start_time = time.perf_counter()
    _check_args(mode, augment, seeds, epochs, batch_size, lr, val_fraction, weight_decay)
    device = resolve_device(device)
    if figure_path is not None:
        _figure_format(figure_path)
    train_data, test_data = _load(train, "train"), _load(test, "test")
    size = train_data.eps.shape[1]
    if test_data.eps.shape[1] != size:
        raise UserError(f"--test {test}: {test_data.eps.shape[1]}x{test_data.eps.shape[1]} maps, but the train "
                        f"file has {size}x{size}")
    n_fit, n_val = _check_labels(n_labels, len(train_data), val_fraction, train)

    frozen = None
    if encoder is not None:
        frozen = essl.load_encoder(encoder)
        _check_encoder(frozen, encoder, size)
        backbone_spec = {"name": frozen.spec["backbone"]["name"], "kwargs": dict(frozen.spec["backbone"]["kwargs"])}
    else:
        backbone_spec = copy.deepcopy(scratch_backbone) if scratch_backbone is not None else default_scratch_backbone()
        if not isinstance(backbone_spec, dict) or "name" not in backbone_spec:
            raise UserError(f"scratch_backbone must be a dict with 'name' and 'kwargs', got {scratch_backbone!r}")
        backbone_spec.setdefault("kwargs", {})
    input_spec = _input_spec(frozen, size)

    x_train, y_train = _maps(train_data), _targets(train_data)
    x_test, y_test = _maps(test_data), _targets(test_data)
    n_figure = min(FIGURE_CELLS, len(x_test))
    kinds = (["encoder"] if frozen is not None else []) + (["scratch"] if with_scratch or frozen is None else [])
    runs: dict[str, list[_Run]] = {k: [] for k in kinds}
    head_hidden: dict[str, list[int]] = {}

    with torch_threads(num_threads if device.type == "cpu" else None):
        # frozen mode: test features once, and train features once for every structure any seed labels
        labelled = torch.unique(torch.cat([
            torch.cat([s.fit, s.val]) for s in (label_split(len(x_train), n_labels, val_fraction, seed)
                                                for seed in range(seeds))]))
        feats_test = feats_train = None
        if frozen is not None and mode == "frozen":
            feats_test = _features(frozen, x_test, device)
            feats_train = torch.zeros(len(x_train), frozen.feature_dim)
            feats_train[labelled] = _features(frozen, x_train[labelled], device)

        with tqdm(total=seeds * len(kinds), desc="phc regress", unit=" model", disable=not progress) as bar:
            for seed in range(seeds):
                split = label_split(len(x_train), n_labels, val_fraction, seed)
                scale = _TargetScale.fit(y_train[split.fit])
                y_fit, y_val = y_train[split.fit], y_train[split.val]
                for kind in kinds:
                    bar.set_postfix_str(f"seed {seed} {kind}")
                    # fresh generators per run: a run does not depend on which other runs came before it
                    gen = torch.Generator(device=device).manual_seed(seed)
                    batch_gen = torch.Generator().manual_seed(seed)

                    def aug(xb: Tensor, gen: torch.Generator = gen) -> Tensor:
                        return augment_maps(xb, augment, gen)

                    end_to_end_aug = None if augment == "none" else aug
                    if kind == "encoder" and mode == "frozen":
                        x_fit = _frozen_fit_features(frozen, feats_train, x_train, split.fit, augment, gen, device)
                        y_fit_k = y_fit.repeat(len(x_fit) // len(y_fit), 1)  # view-major copies of the targets
                        f_mean, f_std = _feature_stats(x_fit)
                        head = _seeded_head(frozen.feature_dim, seed)
                        model = nn.Sequential(_Standardise(f_mean, f_std), head)
                        groups = [{"params": head.parameters(), "lr": lr}]
                        selected = train_select(model, groups, (x_fit, y_fit_k), (feats_train[split.val], y_val),
                                                scale, epochs=epochs, batch_size=batch_size,
                                                weight_decay=weight_decay, augment=None, generator=batch_gen,
                                                device=device)
                        test_inputs = feats_test
                    elif kind == "encoder":  # fine-tune a copy of the encoder
                        body = _trainable(FrozenEncoder(copy.deepcopy(frozen.backbone), frozen.spec))
                        head = _seeded_head(frozen.feature_dim, seed)
                        model = nn.Sequential(body, head)
                        groups = [{"params": body.parameters(), "lr": lr * BACKBONE_LR_FACTOR},
                                  {"params": head.parameters(), "lr": lr}]
                        selected = train_select(model, groups, (x_train[split.fit], y_fit), (x_train[split.val], y_val),
                                                scale, epochs=epochs, batch_size=batch_size,
                                                weight_decay=weight_decay, augment=end_to_end_aug,
                                                generator=batch_gen, device=device)
                        test_inputs = x_test
                    else:  # from scratch: same architecture, random init, everything at the full lr
                        body, feature_dim = _scratch_network(backbone_spec, input_spec, seed)
                        head = _seeded_head(feature_dim, seed)
                        model = nn.Sequential(body, head)
                        groups = [{"params": model.parameters(), "lr": lr}]
                        selected = train_select(model, groups, (x_train[split.fit], y_fit), (x_train[split.val], y_val),
                                                scale, epochs=epochs, batch_size=batch_size,
                                                weight_decay=weight_decay, augment=end_to_end_aug,
                                                generator=batch_gen, device=device)
                        test_inputs = x_test
                    head_hidden[kind] = list(head.hidden)
                    runs[kind].append(_score(selected, test_inputs, y_test, scale, device, n_figure))
                    bar.update(1)

    results = {}
    for kind in kinds:
        summary = _summary([r.test_error for r in runs[kind]])
        summary["val_per_seed"] = [r.val_error for r in runs[kind]]
        summary["best_epoch"] = [r.best_epoch for r in runs[kind]]
        results[kind] = summary
    result = {
        "encoder": None if encoder is None else str(encoder),
        "train": str(train),
        "test": str(test),
        "n_labels": n_labels,
        "mode": mode,
        "seeds": seeds,
        "augment": augment,
        "results": results,
        "settings": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "backbone_lr": lr * BACKBONE_LR_FACTOR if (mode == "finetune" and frozen is not None) else None,
            "weight_decay": weight_decay,
            "optimizer": "adam",
            "schedule": "cosine to 0, per step",
            "loss": "mse on standardised targets",
            "val_fraction": val_fraction,
            "n_fit": n_fit,
            "n_val": n_val,
            "n_train_file": len(train_data),
            "n_test": len(test_data),
            "frozen_views": FROZEN_VIEWS if (mode == "frozen" and frozen is not None and augment != "none") else 1,
            "head_hidden": head_hidden,
            "backbone": backbone_spec,
            "input": input_spec,
            "metric": f"relative L1 over target points {phc_dos.METRIC_START}..{phc_dos.N_TARGET - 1}, "
                      "empty lattice added back",
            "device": str(device),
            "essl_version": essl.__version__,
        },
        "protocol": protocol_text(mode, augment, epochs, val_fraction),
        "elapsed_seconds": round(time.perf_counter() - start_time, 2),
    }
    if figure_path is not None:
        preds = {kind: runs[kind][0].figure_pred for kind in kinds}
        save_figure(figure_path, x_test[:n_figure, 0], y_test[:n_figure], preds, mode=mode)
    if json_path is not None:
        atomic_write_json(json_path, result)
    return result


def _frozen_fit_features(encoder: FrozenEncoder, feats_train: Tensor, x_train: Tensor, fit_idx: Tensor,
                         augment: str, generator: torch.Generator, device: torch.device) -> Tensor:
    """Fitting inputs of a frozen-encoder head: the precomputed features of the fitting structures, followed
    (with augmentation) by the features of FROZEN_VIEWS − 1 random augmented views of each, view-major."""
    views = [feats_train[fit_idx]]
    if augment != "none":
        x_fit = x_train[fit_idx].to(device)
        views += [_features(encoder, augment_maps(x_fit, augment, generator), device)
                  for _ in range(FROZEN_VIEWS - 1)]
    return torch.cat(views)


def _feature_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std < MIN_TARGET_STD, torch.ones_like(std), std)


# ------------------------------------------------------------------------------------------------- output


def save_figure(path: str | os.PathLike, eps: Tensor, true: Tensor, preds: dict[str, Tensor],
                mode: str = "frozen") -> None:
    """Predicted vs true DOS of a few test cells, each beside its permittivity map; saved atomically.

    eps: (C, n, n) maps; true: (C, 400) targets; preds: {"encoder"/"scratch": (C, 400) targets}. DOS curves
    are drawn with the empty-lattice line added back (the quantity the error is scored on); the scored
    frequency range is shaded.
    """
    from matplotlib.figure import Figure

    fmt = _figure_format(path)
    omega = phc_dos.frequency_grid(dtype=torch.float64)[: true.shape[1]]
    line = phc_dos.empty_lattice_dos(omega)
    n = len(true)
    fig = Figure(figsize=(FIGURE_ROW_SIZE[0], FIGURE_ROW_SIZE[1] * n), dpi=FIGURE_DPI, layout="constrained")
    axes = fig.subplots(n, 2, squeeze=False, width_ratios=(1, 3))
    labels = {"encoder": f"encoder ({mode})", "scratch": "from scratch"}
    styles = {"encoder": "C0", "scratch": "C3"}
    for i in range(n):
        ax_eps, ax_dos = axes[i]
        im = ax_eps.imshow(eps[i].numpy(), cmap="viridis", origin="lower")
        ax_eps.set_xticks([])
        ax_eps.set_yticks([])
        ax_eps.set_title(f"test cell {i}: ε", fontsize="small")
        fig.colorbar(im, ax=ax_eps, fraction=0.046)
        ax_dos.plot(omega.numpy(), (true[i].double() + line).numpy(), color="k", lw=1.5, label="true")
        for kind, pred in preds.items():
            err = float(phc_dos.relative_l1(pred[i:i + 1], true[i:i + 1]))
            ax_dos.plot(omega.numpy(), (pred[i].double() + line).numpy(), color=styles.get(kind), lw=1,
                        label=f"{labels.get(kind, kind)}: {100 * err:.1f}%")
        ax_dos.axvspan(float(omega[phc_dos.METRIC_START]), float(omega[-1]), color="0.92", zorder=0)
        ax_dos.set_ylabel("DOS")
        ax_dos.legend(fontsize="x-small", loc="upper left")
    axes[-1][1].set_xlabel("ω√ε_avg · a/2πc (shaded: scored range)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))


def _cell(summary: dict[str, Any]) -> str:
    if len(summary["per_seed"]) == 1:
        return f"{100 * summary['mean']:.2f}"
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def format_regression_table(result: dict[str, Any]) -> str:
    """The plain-text table ``essl phc regress`` prints: test and validation relative L1 error in %."""
    settings = result["settings"]
    seeds = result["seeds"]
    names = {"encoder": f"encoder ({result['mode']})", "scratch": "from scratch"}
    rows = []
    for kind, summary in result["results"].items():
        val = _summary(summary["val_per_seed"]) if "val_per_seed" in summary else None
        rows.append((names.get(kind, kind), _cell(summary), _cell(val) if val else "",
                     ", ".join(str(e) for e in summary.get("best_epoch", []))))
    headers = ("", f"test rel. L1 (%, {seeds} seed{'s' if seeds != 1 else ''})", "val rel. L1 (%)", "best epoch")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        f"DOS regression: {result['encoder'] or 'no encoder (scratch only)'}",
        f"train {result['train']}: {result['n_labels']} labels ({settings['n_fit']} fit + {settings['n_val']} val); "
        f"test {result['test']}: {settings['n_test']} cells; augment {result['augment']}; "
        f"{settings['epochs']} epochs",
        "  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(headers, widths, strict=True))),
    ]
    lines.append("-" * len(lines[-1]))
    for row in rows:
        lines.append("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)
