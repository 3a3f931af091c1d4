"""Linear probe and kNN evaluation of a frozen encoder, with two baselines, mean ± std over seeds.

``essl probe ENCODER --protocol fast|paper`` (:func:`run_probe`) trains a linear classifier on a frozen encoder
under one of two protocols; the kNN accuracy, the baselines, the table and the JSON are shared. Neither
protocol selects anything on the test set: each seed's classifier is scored on it once.

**fast** (the default; cheap and deterministic, right for small data on a CPU):

* **Frozen features, extracted once, no augmentation.** The encoder file (``essl.load_encoder``) is run once
  over the train and test images (:func:`essl.eval.features.extract_features`).
* **Linear probe.** Multinomial logistic regression on features standardised with train statistics,
  L2 penalty on the weights (not the bias), fitted full-batch with L-BFGS for at most ``MAX_ITER``
  iterations (a convex objective: no learning rate, no sample order, no initialisation noise). The penalty is
  chosen from :data:`WEIGHT_DECAY_GRID` by accuracy on a seeded validation split (:data:`VAL_FRACTION` of
  the *training* set); the classifier is then refitted on all training data with that penalty and scored
  once on the test set. Test labels are never used for selection.
* **Seeds.** A seed sets the validation split, hence the chosen penalty.
* Its absolute numbers are not the paper's: compare methods under the same probe only.

**paper** (the linear evaluation of Dangovski et al., "Equivariant Contrastive Learning", ICLR 2022, as their
code runs it: rdangovs/essl, ``cifar10/main.py``, ``eval_loop``):

* **Model.** The frozen encoder in eval mode (BatchNorm uses its running statistics) under ``no_grad``; one
  ``nn.Linear(feature_dim, num_classes)`` with torch's default initialisation is the only thing trained. The
  features enter it as they are (no standardisation). Loss: cross-entropy.
* **Optimiser.** SGD, lr :data:`PAPER_LR` (30), momentum :data:`PAPER_MOMENTUM` (0.9), weight decay
  :data:`PAPER_WEIGHT_DECAY` (0). Before every step the learning rate is set to
  ``lr · 0.5 · (1 + cos(π · step / max_steps))`` (:func:`cosine_lr`), step = 0 … max_steps − 1,
  max_steps = epochs · ⌊N / batch⌋: a cosine from lr towards 0, per step, no warm-up.
* **Data.** :data:`PAPER_EPOCHS` (100) epochs of batches of :data:`PAPER_BATCH_SIZE` (256), reshuffled every
  epoch, the last incomplete batch dropped (``drop_last``).
* **Train view**, drawn afresh for every image at every step, batched on the device: torchvision's
  ``RandomResizedCrop(S, interpolation=BICUBIC)`` with its default scale :data:`PAPER_CROP_SCALE` (0.08, 1)
  and ratio :data:`PAPER_CROP_RATIO` (3/4, 4/3), then ``RandomHorizontalFlip`` (p = :data:`PAPER_HFLIP_PROB`),
  S the encoder's input size (32 for CIFAR-10). Crop boxes come from kornia's ``RandomResizedCrop`` parameter
  generator; the crop is resampled by :func:`essl.eval.features.resized_crop` (see "Differences" below).
* **Test view**: ``Resize(R, BICUBIC)`` (shorter side) then ``CenterCrop(S)``, R = round(36 · S / 32): the
  reference's 36 and 32 for CIFAR-10's 32 px images, both scaled by S / 32 for other sizes (9 and 8 for 8 px,
  108 and 96 for STL-10's 96 px). Test features are extracted once per encoder.
* **Pixels.** Images stay uint8 until the device and are resampled there as PIL resamples uint8 images
  (:mod:`essl.eval.features`); then they are in [0, 1] and the encoder file's module normalises them with
  its own mean/std (the reference's ``Normalize``).
* **Reported**: the test accuracy of the classifier after the last epoch. Nothing is selected, there is no
  validation split, no early stopping.
* **Seeds.** Seed s seeds torch's CPU generator for that run (under ``fork_rng``: the caller's state is
  untouched) and every random draw is made on the CPU in a fixed order: classifier initialisation, then per
  epoch the order (``torch.randperm(N)``), per step the crop boxes and the flips. A seed gives the same draws
  on any device.
* **Differences from the reference** (none changes the protocol's definition): no mixed precision; the
  reference seeds once and runs its 5 repeats on the continuing random stream, and prints the population std
  (``np.std``; ``per_seed`` holds every value); it averages per-batch test accuracies (its last test batch of
  16 images counts like a full one), we count correct / total. Crop boxes: kornia's generator follows
  torchvision's ``get_params`` (10 candidates per image, area uniform in scale · H · W, log aspect ratio
  uniform, the first candidate that fits, start uniform over integer positions; if none fits, the whole image
  or the ratio-clamped full-width/height box), with a different random stream, and it places that fallback box
  at a random position where torchvision centres it (identical for square images, where the fallback is the
  whole image). Resampling: kornia's own crop (``cropping_mode="resample"``) maps the corner pixel *centres*
  of the box onto the corner pixel centres of the output (a slightly smaller field of view) and uses
  ``grid_sample``'s bicubic (a = −0.75) in float; we instead build PIL's bicubic matrices (a = −0.5, pixel
  edges to edges, uint8 rounding after each pass), which agree with torchvision's per-image transforms on
  uint8 tensors to within 2 grey levels (tested).

**Shared by both protocols**

* **Summary.** Mean ± sample standard deviation (n − 1) over seeds 0 … seeds − 1, and every seed's value.
* **kNN.** The similarity-weighted kNN of Wu et al., "Unsupervised Feature Learning via Non-Parametric
  Instance Discrimination" (InstDisc, CVPR 2018): cosine similarity, k = 200, weights exp(s / 0.1)
  (:mod:`essl.knn`), on the features of the plain (unaugmented, unresized) train and test images, as the
  reference's ``knn_monitor``. It has no randomness, so it is computed once (``per_seed`` holds one value,
  std 0).
* **Baselines, same protocol.** A randomly initialised encoder of the same architecture and input
  normalisation (``essl.encoder.random_encoder_like``, seed :data:`RANDOM_INIT_SEED`), and raw pixels
  (flattened, in [0, 1]). Under the paper protocol the raw-pixel probe sees the same augmented train views
  and resized test views through the same SGD recipe (lr 30 was tuned for ResNet features, not pixels, so
  this row is a floor, not a tuned pixel classifier). An encoder that does not beat both has learned nothing
  useful.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import essl
from essl.data import load_labelled
from essl.encoder import random_encoder_like
from essl.errors import UserError
from essl.io import atomic_write_json, check_output_file
from essl.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_accuracy
from essl.runtime import resolve_device, torch_threads

from .features import (
    DEFAULT_BATCH_SIZE,
    UINT8_MAX,
    default_device,
    extract_features,
    resize_center_crop,
    resized_crop,
)

PHC_SUFFIXES = (".h5", ".hdf5")  # photonic-crystal map files (essl.data.phc)
#: L2 penalties tried (on the mean cross-entropy, as ``0.5 * wd * ||W||²``), strongest first.
WEIGHT_DECAY_GRID: tuple[float, ...] = (1e0, 1e-1, 1e-2, 1e-3, 1e-4)
#: Share of the training set held out to choose the penalty.
VAL_FRACTION = 0.1
#: L-BFGS iterations per fit (full batch). Strong penalties converge well before; weak penalties on separable
#: features stop here. Measured on digits (5 seeds, mean test accuracy): raw pixels 96.44 at 100 and at 300
#: iterations (96.61 at 50), a 128-d random CNN 93.67 at 100 vs 93.72 at 300.
MAX_ITER = 100
#: L-BFGS curvature pairs kept (torch's default is 100; 10 is the usual choice and uses less memory).
LBFGS_HISTORY = 10
#: Stop when the loss changes by less than this between iterations (torch's default).
TOLERANCE_CHANGE = 1e-9
#: A feature whose train standard deviation is below this is only centred, not scaled (e.g. blank borders).
MIN_STD = 1e-6
#: CPU fits on fewer feature entries (N·D) than this run on one thread: L-BFGS on small matrices is a stream of
#: tiny operations, and MKL/OpenMP threads spinning on them was measured 10-100x slower on a loaded 2-core box
#: (1437x128 digits features: 0.8 s single-threaded vs 25 s with 2 threads, CPU time).
SINGLE_THREAD_MAX_ELEMENTS = 2**22
#: Number of seeds when none is given (the paper's mean ± std over 5 seeds).
DEFAULT_SEEDS = 5
#: Seed of the randomly initialised encoder baseline.
RANDOM_INIT_SEED = 0
#: Dataset probed when neither ``--data`` nor the encoder's config names one.
DEFAULT_DATA = "digits"

#: The linear-probe protocols (module docstring); the first is the default.
PROTOCOLS = ("fast", "paper")

# The paper protocol: rdangovs/essl, cifar10/main.py, eval_loop (Dangovski et al., ICLR 2022).
#: Training epochs (``for e in range(1, 101)``).
PAPER_EPOCHS = 100
#: Images per SGD step (``batch_size=256``, shuffled, ``drop_last=True``).
PAPER_BATCH_SIZE = 256
#: Base learning rate of the cosine schedule (``lr=30``, ``base_lr=30``).
PAPER_LR = 30.0
#: SGD momentum (``momentum=0.9``).
PAPER_MOMENTUM = 0.9
#: SGD weight decay (``weight_decay=0``).
PAPER_WEIGHT_DECAY = 0.0
#: ``RandomResizedCrop``'s area range, torchvision's default (the reference passes none).
PAPER_CROP_SCALE = (0.08, 1.0)
#: ``RandomResizedCrop``'s aspect-ratio range (width / height), torchvision's default.
PAPER_CROP_RATIO = (3 / 4, 4 / 3)
#: ``RandomHorizontalFlip``'s probability, torchvision's default.
PAPER_HFLIP_PROB = 0.5
#: Image side of CIFAR-10, for which the reference's test sizes are written.
PAPER_IMAGE_SIZE = 32
#: The reference's test-time ``Resize(36)`` before ``CenterCrop(32)``; scaled by image size / 32.
PAPER_TEST_RESIZE = 36


# --------------------------------------------------------------------------------------------- linear probe


def _standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and scale of the columns of ``x``: (D,), (D,); near-constant columns keep scale 1."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std < MIN_STD, torch.ones_like(std), std)


def _fit_logistic(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int,
                  init: nn.Linear | None = None) -> nn.Linear:
    """Minimise mean cross-entropy + 0.5·wd·||W||² over a linear layer with full-batch L-BFGS.

    Small CPU problems (below :data:`SINGLE_THREAD_MAX_ELEMENTS`) run on one thread for the duration of the fit.
    """
    linear = nn.Linear(x.shape[1], num_classes, device=x.device)
    with torch.no_grad():
        if init is None:
            linear.weight.zero_()
            linear.bias.zero_()
        else:
            linear.load_state_dict(init.state_dict())
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=LBFGS_HISTORY,
                                  tolerance_change=TOLERANCE_CHANGE, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + 0.5 * weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    small = x.device.type == "cpu" and x.numel() < SINGLE_THREAD_MAX_ELEMENTS
    with torch.enable_grad(), torch_threads(1 if small else None):
        optimizer.step(closure)
    return linear


@torch.no_grad()
def _accuracy(linear: nn.Linear, x: Tensor, y: Tensor) -> float:
    return (linear(x).argmax(dim=1) == y).double().mean().item()


def _check_probe_inputs(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor,
                        num_classes: int, val_fraction: float, weight_decays: Sequence[float]) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D; got train {tuple(train_feats.shape)}, "
                         f"test {tuple(test_feats.shape)}")
    if train_y.shape != (train_feats.shape[0],) or test_y.shape != (test_feats.shape[0],):
        raise ValueError("labels must be (N,) and match their features")
    if train_feats.shape[0] < 2 or test_feats.shape[0] < 1:
        raise ValueError("the linear probe needs at least 2 training and 1 test sample")
    for name, y in (("train", train_y), ("test", test_y)):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"{name} labels must lie in [0, {num_classes})")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not weight_decays or any(not wd >= 0 for wd in weight_decays):
        raise ValueError(f"weight_decays must be a non-empty list of values >= 0, got {weight_decays}")


def select_weight_decay(
    train_feats: Tensor,
    train_y: Tensor,
    num_classes: int,
    seed: int,
    val_fraction: float = VAL_FRACTION,
    weight_decays: Sequence[float] = WEIGHT_DECAY_GRID,
    max_iter: int = MAX_ITER,
) -> tuple[float, list[float]]:
    """Choose the L2 penalty on a seeded validation split of the training set only.

    Features are standardised with the statistics of the fitting part. Penalties are fitted strongest first,
    each warm-started from the previous optimum (a regularisation path). Equal validation accuracies go to
    the stronger penalty.

    Returns:
        (chosen penalty, validation accuracy of each penalty in ``weight_decays`` order).
    """
    n = train_feats.shape[0]
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(train_feats.device)
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    mean, std = _standardiser(train_feats[fit_idx])
    x_fit, x_val = (train_feats[fit_idx] - mean) / std, (train_feats[val_idx] - mean) / std
    y_fit, y_val = train_y[fit_idx], train_y[val_idx]

    order = sorted(range(len(weight_decays)), key=lambda i: -weight_decays[i])
    val_acc = [0.0] * len(weight_decays)
    best, linear = None, None
    for i in order:
        linear = _fit_logistic(x_fit, y_fit, num_classes, weight_decays[i], max_iter, init=linear)
        val_acc[i] = _accuracy(linear, x_val, y_val)
        if best is None or val_acc[i] > val_acc[best]:
            best = i
    return float(weight_decays[best]), val_acc


def train_linear_probe(
    train_feats: Tensor,
    train_y: Tensor,
    test_feats: Tensor,
    test_y: Tensor,
    num_classes: int,
    seed: int,
    val_fraction: float = VAL_FRACTION,
    weight_decays: Sequence[float] = WEIGHT_DECAY_GRID,
    max_iter: int = MAX_ITER,
    device: str | torch.device | None = None,
) -> float:
    """Test accuracy in [0, 1] of a linear classifier on frozen features (protocol: module docstring).

    Args:
        train_feats, test_feats: (N, D) and (M, D) features.
        train_y, test_y: (N,) and (M,) integer labels in ``[0, num_classes)``.
        num_classes: number of classes C.
        seed: sets the validation split used to choose the L2 penalty.
        val_fraction: share of the training set held out for that choice.
        weight_decays: the L2 penalties to choose from; with a single value no validation fit is made.
        max_iter: L-BFGS iterations per fit.
        device: where to fit; default CUDA when available, else CPU.
    """
    _check_probe_inputs(train_feats, train_y, test_feats, test_y, num_classes, val_fraction, weight_decays)
    device = torch.device(device) if device is not None else default_device()
    train_feats, test_feats = train_feats.to(device, torch.float32), test_feats.to(device, torch.float32)
    train_y, test_y = train_y.to(device, torch.long), test_y.to(device, torch.long)

    if len(weight_decays) == 1:
        weight_decay = float(weight_decays[0])
    else:
        weight_decay, _ = select_weight_decay(train_feats, train_y, num_classes, seed, val_fraction,
                                              weight_decays, max_iter)
    mean, std = _standardiser(train_feats)
    linear = _fit_logistic((train_feats - mean) / std, train_y, num_classes, weight_decay, max_iter)
    return _accuracy(linear, (test_feats - mean) / std, test_y)


# ------------------------------------------------------------------------------------------- paper protocol


def cosine_lr(step: int, max_steps: int, base_lr: float) -> float:
    """The reference's per-step schedule without warm-up: ``base_lr · 0.5 · (1 + cos(π · step / max_steps))``.

    ``adjust_learning_rate(..., warmup_epochs=0, ...)`` in rdangovs/essl ``cifar10/main.py`` with end lr 0; it
    is applied before step ``step`` = 0 … max_steps − 1, so the first step uses ``base_lr`` and the last one a
    small positive rate.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max_steps))


def paper_test_sizes(image_size: int) -> tuple[int, int]:
    """(resize, crop) of the paper's test view for ``image_size`` px images: (36, 32) scaled by size / 32."""
    return round(PAPER_TEST_RESIZE * image_size / PAPER_IMAGE_SIZE), image_size


def paper_test_transform(image_size: int) -> Callable[[Tensor], Tensor]:
    """The paper's test view on a device batch: bicubic ``Resize(R)`` + ``CenterCrop(S)``, R, S from
    :func:`paper_test_sizes`; float images in [0, 1] for uint8 input."""
    resize, crop = paper_test_sizes(image_size)
    return functools.partial(resize_center_crop, resize=resize, crop=crop)


class PaperTrainView:
    """The paper's train view of a device batch: ``RandomResizedCrop(size, BICUBIC)`` + ``RandomHorizontalFlip``.

    Crop boxes are drawn with kornia's ``RandomResizedCrop`` parameter generator (torchvision's ``get_params``
    semantics; module docstring) and flips with ``torch.rand``, both from torch's CPU generator; the batch is
    cropped, resized and flipped on its own device in one call (:func:`essl.eval.features.resized_crop`).
    """

    def __init__(self, size: int, scale: tuple[float, float] = PAPER_CROP_SCALE,
                 ratio: tuple[float, float] = PAPER_CROP_RATIO, hflip_prob: float = PAPER_HFLIP_PROB):
        self.size = size
        self.hflip_prob = hflip_prob
        self.boxes = K.RandomResizedCrop((size, size), scale=scale, ratio=ratio)

    def sample(self, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(top, left, height, width, flip), each (B,) on the CPU, for a batch of ``shape`` (B, C, H, W)."""
        src = self.boxes.forward_parameters(shape)["src"]  # (B, 4, 2) corners (x, y): TL, TR, BR, BL
        left, top = src[:, 0, 0], src[:, 0, 1]
        width, height = src[:, 1, 0] - left + 1, src[:, 3, 1] - top + 1
        flip = torch.rand(shape[0]) < self.hflip_prob
        return top, left, height, width, flip

    def view(self, x: Tensor) -> Tensor:
        """One random view of every image in ``x`` (B, C, H, W) -> float (B, C, size, size) on ``x``'s device."""
        top, left, height, width, flip = self.sample(x.shape)
        return resized_crop(x, top, left, height, width, self.size, flip=flip)


def _as_float(x: Tensor) -> Tensor:
    """uint8 -> [0, 1]; floating point as is (the view when augmentation is off)."""
    return x.float() / UINT8_MAX if x.dtype == torch.uint8 else x.float()


def fit_paper_linear(
    encoder: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    num_classes: int,
    seed: int,
    epochs: int = PAPER_EPOCHS,
    batch_size: int = PAPER_BATCH_SIZE,
    lr: float = PAPER_LR,
    augment: bool = True,
    device: str | torch.device | None = None,
    callback: Callable[[int, float, Tensor], None] | None = None,
) -> nn.Linear:
    """Train the paper protocol's linear classifier on a frozen encoder (module docstring, **paper**).

    Args:
        encoder: maps float (B, C, H, W) images in data units to (B, D) features; moved to ``device``
            (in place) and run in eval mode under ``no_grad``; its train/eval mode is restored afterwards.
        x_train: (N, C, H, W) uint8 (or float, data units) training images, on any device.
        y_train: (N,) integer labels in ``[0, num_classes)``.
        num_classes: C, the classifier's outputs.
        seed: seeds the classifier's initialisation, the epoch orders, the crop boxes and the flips.
        epochs, batch_size, lr: the protocol's settings (defaults: the paper's).
        augment: draw the paper's train view (random resized crop + flip); False feeds the plain images.
        device: where the encoder and classifier run; default CUDA when available, else CPU.
        callback: called after every step with (step, learning rate used, loss tensor on the device).

    Returns:
        The trained ``nn.Linear(D, num_classes)`` on ``device``.
    """
    n = x_train.shape[0]
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    steps_per_epoch = n // batch_size  # drop_last
    if steps_per_epoch == 0:
        raise ValueError(f"the batch size {batch_size} exceeds the {n} training images: with the last incomplete "
                         "batch dropped there would be no step")
    device = torch.device(device) if device is not None else default_device()
    max_steps = epochs * steps_per_epoch
    was_training = encoder.training
    encoder.to(device).eval()
    view = PaperTrainView(x_train.shape[-1]) if augment else None
    y_train = y_train.to(torch.long)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.no_grad():
                feature_dim = encoder(_as_float(x_train[:1].to(device))).shape[1]
            linear = nn.Linear(feature_dim, num_classes).to(device)  # torch's default init, on the CPU generator
            optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=PAPER_MOMENTUM,
                                        weight_decay=PAPER_WEIGHT_DECAY)
            step = 0
            for _ in range(epochs):
                order = torch.randperm(n)
                for b in range(steps_per_epoch):
                    idx = order[b * batch_size:(b + 1) * batch_size]
                    images = x_train[idx].to(device, non_blocking=True)  # uint8 until here
                    labels = y_train[idx].to(device, non_blocking=True)
                    step_lr = cosine_lr(step, max_steps, lr)
                    for group in optimizer.param_groups:
                        group["lr"] = step_lr
                    with torch.no_grad():
                        feats = encoder(view.view(images) if view is not None else _as_float(images))
                    loss = F.cross_entropy(linear(feats.float()), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if callback is not None:
                        callback(step, step_lr, loss.detach())
                    step += 1
    finally:
        encoder.train(was_training)
    return linear


def _evaluate_paper(model: nn.Module, x_train: Tensor, train_y: Tensor, x_test: Tensor, test_y: Tensor,
                    num_classes: int, seeds: int, epochs: int, train_batch_size: int, lr: float,
                    batch_size: int, device: torch.device, progress: bool, label: str) -> list[float]:
    """Paper-protocol test accuracy of ``model`` for seeds 0 .. seeds − 1 (last epoch, nothing selected)."""
    test_feats = extract_features(model, x_test, batch_size=batch_size, device=device, progress=progress,
                                  transform=paper_test_transform(x_train.shape[-1])).to(device)
    test_y = test_y.to(device, torch.long)
    steps_per_epoch = x_train.shape[0] // train_batch_size
    accuracies = []
    with tqdm(total=seeds * epochs, desc=f"paper probe: {label}", unit="epoch", disable=not progress,
              leave=False) as bar:
        for seed in range(seeds):
            bar.set_postfix(seed=seed)

            def on_step(step: int, step_lr: float, loss: Tensor, seed: int = seed) -> None:
                if (step + 1) % steps_per_epoch == 0:
                    bar.update(1)
                    bar.set_postfix(seed=seed, loss=f"{loss.item():.3f}", lr=f"{step_lr:.3g}")

            linear = fit_paper_linear(model, x_train, train_y, num_classes, seed, epochs=epochs,
                                      batch_size=train_batch_size, lr=lr, device=device,
                                      callback=on_step if progress else None)
            accuracies.append(_accuracy(linear, test_feats, test_y))
    return accuracies


# ------------------------------------------------------------------------------------------------- run_probe


def _summary(values: list[float]) -> dict[str, Any]:
    """{"mean", "std" (sample, n − 1; 0 for one value), "per_seed"} of accuracies."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": list(values)}


def _evaluate(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor, num_classes: int,
              seeds: int, knn_k: int, knn_t: float, device: torch.device,
              linear: list[float] | None = None, progress: bool = False, label: str = "") -> dict[str, Any]:
    """Linear probe over ``seeds`` seeds and kNN (once) on one set of plain features.

    ``linear``: per-seed accuracies already measured by another protocol (paper); default the fast probe's, fitted
    with a progress bar over the seeds when ``progress``.
    """
    if linear is None:
        linear = []
        for seed in tqdm(range(seeds), desc=f"fitting linear probe: {label}", unit="seed", disable=not progress,
                         leave=False):
            linear.append(train_linear_probe(train_feats, train_y, test_feats, test_y, num_classes, seed,
                                             device=device))
    knn = knn_accuracy(train_feats.to(device), train_y.to(device), test_feats.to(device), test_y.to(device),
                       num_classes, k=knn_k, temperature=knn_t)
    return {"linear": _summary(linear), "knn": _summary([knn])}


def _data_from_config(spec: dict[str, Any]) -> tuple[str, str | None]:
    """(``config.data.name``, ``config.data.path``) the encoder was pretrained on; (:data:`DEFAULT_DATA`, None)
    when its config does not say."""
    config = spec.get("config") if isinstance(spec, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    data = data if isinstance(data, dict) else {}
    name, path = data.get("name"), data.get("path")
    if not isinstance(name, str) or not name:
        return DEFAULT_DATA, None
    return name, path if isinstance(path, str) and path else None


def protocol_settings(protocol: str, seeds: int, knn_k: int, knn_t: float, image_size: int,
                      epochs: int = PAPER_EPOCHS, train_batch_size: int = PAPER_BATCH_SIZE,
                      lr: float = PAPER_LR) -> dict[str, Any]:
    """The settings of a run, stored in the JSON result as ``settings``."""
    settings: dict[str, Any] = {"protocol": protocol, "seeds": seeds, "knn_k": knn_k, "knn_t": knn_t,
                                "random_init_seed": RANDOM_INIT_SEED}
    if protocol == "fast":
        return settings | {"weight_decay_grid": list(WEIGHT_DECAY_GRID), "val_fraction": VAL_FRACTION,
                           "max_iter": MAX_ITER}
    resize, crop = paper_test_sizes(image_size)
    return settings | {"epochs": epochs, "batch_size": train_batch_size, "lr": lr, "momentum": PAPER_MOMENTUM,
                       "weight_decay": PAPER_WEIGHT_DECAY, "crop_size": crop, "crop_scale": list(PAPER_CROP_SCALE),
                       "crop_ratio": list(PAPER_CROP_RATIO), "hflip_prob": PAPER_HFLIP_PROB,
                       "test_resize": resize, "test_crop": crop}


def protocol_text(seeds: int, knn_k: int, knn_t: float, protocol: str = "fast", image_size: int = PAPER_IMAGE_SIZE,
                  epochs: int = PAPER_EPOCHS, train_batch_size: int = PAPER_BATCH_SIZE, lr: float = PAPER_LR) -> str:
    """One-paragraph statement of the protocol, stored in the JSON result; it starts with the protocol's name."""
    knn = (f"kNN: InstDisc cosine-weighted, k={knn_k}, T={knn_t:g}, on features of the plain images, "
           "deterministic, computed once; ")
    baselines = (f"baselines with the same protocol: raw pixels in [0, 1] and a random-init encoder "
                 f"(seed {RANDOM_INIT_SEED})")
    if protocol == "fast":
        grid = ", ".join(f"{wd:g}" for wd in WEIGHT_DECAY_GRID)
        return (
            "fast protocol: frozen features, no augmentation; linear: multinomial logistic regression "
            f"(full-batch L-BFGS) on train-standardised features, L2 penalty chosen from {{{grid}}} on a seeded "
            f"{VAL_FRACTION:.0%} validation split of train, refitted on all train, scored once on test; "
            f"mean ± sample std over {seeds} seed(s) (the seed sets the validation split); " + knn + baselines
        )
    resize, crop = paper_test_sizes(image_size)
    return (
        "paper protocol (Dangovski et al., ICLR 2022; rdangovs/essl cifar10/main.py eval_loop): frozen encoder "
        f"in eval mode, no_grad; one nn.Linear trained with cross-entropy, SGD lr {lr:g}, momentum "
        f"{PAPER_MOMENTUM:g}, weight decay {PAPER_WEIGHT_DECAY:g}, per-step cosine from {lr:g} to 0 without warm-up, "
        f"{epochs} epoch(s), batch {train_batch_size} shuffled, last incomplete batch dropped; train views "
        f"RandomResizedCrop({crop}, scale={PAPER_CROP_SCALE}, ratio=(3/4, 4/3), bicubic) + horizontal flip "
        f"p={PAPER_HFLIP_PROB:g}; test views Resize({resize}, bicubic) + CenterCrop({crop}); test accuracy after "
        f"the last epoch, nothing selected; mean ± sample std over {seeds} seed(s) (the seed sets initialisation, "
        "order, crops and flips); " + knn + baselines
    )


def run_probe(
    encoder_path: str | os.PathLike,
    data: str | None = None,
    seeds: int = DEFAULT_SEEDS,
    device: str | torch.device | None = None,
    json_path: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    knn_k: int = DEFAULT_K,
    knn_t: float = DEFAULT_TEMPERATURE,
    protocol: str = PROTOCOLS[0],
    epochs: int | None = None,
    train_batch_size: int | None = None,
    lr: float | None = None,
    baselines: bool = True,
    equivariance: Sequence[str] = (),
) -> dict[str, Any]:
    """Probe an encoder file and the two baselines; optionally write the result as JSON (atomically).

    Args:
        encoder_path: an ``encoder.pt`` written by ``essl pretrain``.
        data: dataset name or path for ``essl.data.load_labelled``; default the encoder's pretraining
            dataset (``config.data.name`` and ``config.data.path``), else ``digits``. A name equal to the
            pretraining dataset's is read from ``config.data.path``. Images are loaded at the encoder's size.
        seeds: linear-probe seeds (0 .. seeds − 1).
        device: where features are extracted and classifiers fitted; default CUDA when available, else CPU.
        json_path: where to write the result.
        batch_size: images per forward pass during feature extraction.
        progress: show progress bars.
        knn_k, knn_t: kNN neighbours and temperature.
        protocol: ``"fast"`` (L-BFGS on frozen features) or ``"paper"`` (the paper's SGD probe on augmented
            views); module docstring.
        epochs, train_batch_size, lr: the paper protocol's settings; None: the paper's (:data:`PAPER_EPOCHS`,
            :data:`PAPER_BATCH_SIZE`, :data:`PAPER_LR`). Setting them with the fast protocol is an error.
        baselines: also probe a random-init encoder and raw pixels (False: the encoder alone, e.g. in sweeps).
        equivariance: transformation groups (:data:`essl.transforms.GROUPS`) to diagnose
            (:func:`essl.eval.equivariance.diagnose`): how invariant the representation is to each and how
            predictable each is from it; in ``result["equivariance"]``.

    Returns:
        ``{"linear": {"mean", "std", "per_seed"}, "knn": {...}, "baselines": {"raw_pixels": {"linear", "knn"},
        "random_init": {"linear", "knn"}}, "encoder", "data", "protocol", "protocol_name", "settings"}``,
        accuracies as fractions; ``protocol`` is a one-paragraph statement, ``protocol_name`` "fast" or
        "paper", ``settings`` the numbers.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    paper_options = {"--epochs": epochs, "--train-batch-size": train_batch_size, "--lr": lr}
    if protocol == "fast" and any(v is not None for v in paper_options.values()):
        given = ", ".join(k for k, v in paper_options.items() if v is not None)
        raise UserError(f"{given}: only for --protocol paper")
    epochs = PAPER_EPOCHS if epochs is None else epochs
    train_batch_size = PAPER_BATCH_SIZE if train_batch_size is None else train_batch_size
    lr = PAPER_LR if lr is None else lr
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if knn_k < 1:
        raise UserError(f"knn k must be >= 1, got {knn_k}")
    if not knn_t > 0:
        raise UserError(f"knn temperature must be > 0, got {knn_t}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    if train_batch_size < 1:
        raise UserError(f"--train-batch-size must be >= 1, got {train_batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"--lr must be a positive number, got {lr}")
    device = resolve_device(device)
    if json_path is not None:  # before the work: a result that cannot be written is not computed
        check_output_file(json_path, "--json")

    encoder = essl.load_encoder(encoder_path)
    config_name, config_path = _data_from_config(encoder.spec)
    if data is None:  # the pretraining data, from its folder
        name, path = config_name, config_path
    else:  # a name (its folder from the config when it is the pretraining dataset) or a path
        name, path = data, config_path if data == config_name else None
    image_size = int(encoder.input["size"])
    if name == "phc" or str(path or name).endswith(PHC_SUFFIXES):
        what = "the encoder was pretrained on" if data is None else "--data gives"
        raise UserError(f"{what} photonic-crystal maps ({path or name}), which have no classes to probe; essl probe "
                        "takes a labelled image dataset (essl list datasets), photonic encoders go to essl phc regress")
    labelled = load_labelled(name, image_size=image_size, path=path)
    if labelled.num_classes < 2 or len(labelled.x_test) == 0:
        raise UserError(f"dataset {labelled.name}: a linear probe needs labelled train and test images of at least "
                        f"2 classes (it has {labelled.num_classes} classes, {len(labelled.x_test)} test images)")
    channels = int(encoder.input["channels"])
    if labelled.x_train.shape[1] != channels:
        raise UserError(f"{labelled.name} has {labelled.x_train.shape[1]} channel(s) but the encoder "
                        f"{encoder_path} takes {channels}")
    if protocol == "paper" and labelled.x_train.shape[0] < train_batch_size:
        raise UserError(f"--train-batch-size {train_batch_size} exceeds the {labelled.x_train.shape[0]} training "
                        f"images of {labelled.name} (the last incomplete batch is dropped: no step would be made)")

    def features(model: nn.Module) -> tuple[Tensor, Tensor]:
        return tuple(extract_features(model, x, batch_size=batch_size, device=device, progress=progress)
                     for x in (labelled.x_train, labelled.x_test))

    ys = (labelled.y_train, labelled.y_test)
    common = {"num_classes": labelled.num_classes, "seeds": seeds, "knn_k": knn_k, "knn_t": knn_t,
              "device": device}
    models = [("encoder", encoder)]
    if baselines:
        models += [("random_init", random_encoder_like(encoder, seed=RANDOM_INIT_SEED)), ("raw_pixels", nn.Flatten())]
    runs = {}
    for key, model in models:
        train_feats, test_feats = features(model)
        linear = None
        if protocol == "paper":
            linear = _evaluate_paper(model, labelled.x_train, ys[0], labelled.x_test, ys[1], labelled.num_classes,
                                     seeds, epochs, train_batch_size, lr, batch_size, device, progress,
                                     label=key.replace("_", " "))
        runs[key] = _evaluate(train_feats, ys[0], test_feats, ys[1], linear=linear, progress=progress,
                              label=key.replace("_", " "), **common)

    paper = {"image_size": image_size, "epochs": epochs, "train_batch_size": train_batch_size, "lr": lr}
    result = {
        "linear": runs["encoder"]["linear"],
        "knn": runs["encoder"]["knn"],
        "baselines": {k: runs[k] for k in ("raw_pixels", "random_init") if k in runs},
        "encoder": str(encoder_path),
        "data": labelled.name,
        "protocol": protocol_text(seeds, knn_k, knn_t, protocol, **paper),
        "protocol_name": protocol,
        "settings": protocol_settings(protocol, seeds, knn_k, knn_t, **paper),
    }
    if equivariance:
        from essl.eval.equivariance import diagnose

        result["equivariance"] = diagnose(encoder, labelled, equivariance, seeds=seeds, device=device,
                                          batch_size=batch_size, knn_k=knn_k, knn_t=knn_t, progress=progress)
    if json_path is not None:
        atomic_write_json(json_path, result)
    return result


# -------------------------------------------------------------------------------------------------- table


def _cell(summary: dict[str, Any]) -> str:
    """'97.50 ± 0.31' in percent; a single deterministic value is shown without ± 0."""
    if len(summary["per_seed"]) == 1:
        return f"{100 * summary['mean']:.2f}"
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """The plain-text table ``essl probe`` prints: rows encoder / random init / raw pixels, accuracy in %."""
    n_seeds = len(result["linear"]["per_seed"])
    rows = [("encoder", result)] + [(label, result["baselines"][key]) for key, label in
                                     (("random_init", "random init"), ("raw_pixels", "raw pixels"))
                                     if key in result["baselines"]]
    cells = [(label, _cell(r["linear"]), _cell(r["knn"])) for label, r in rows]
    headers = ("", f"linear (%, {n_seeds} seed{'s' if n_seeds != 1 else ''})", "kNN (%)")
    widths = [max(len(row[i]) for row in [headers, *cells]) for i in range(3)]
    title = f"{result['encoder']} on {result['data']}"
    name = result.get("protocol_name")
    if name == "paper":
        settings = result.get("settings", {})
        title += f" (paper protocol, {settings.get('epochs', PAPER_EPOCHS)} epochs)"
    elif name is not None:
        title += f" ({name} protocol)"
    lines = [title]
    lines.append(f"{headers[0]:<{widths[0]}}  {headers[1]:>{widths[1]}}  {headers[2]:>{widths[2]}}")
    lines.append("-" * len(lines[-1]))
    for label, lin, knn in cells:
        lines.append(f"{label:<{widths[0]}}  {lin:>{widths[1]}}  {knn:>{widths[2]}}")
    if result.get("equivariance"):
        from essl.eval.equivariance import format_diagnostics

        lines += ["", format_diagnostics(result["equivariance"])]
    return "\n".join(lines)
