"""Linear probe and kNN evaluation of a frozen encoder, with two baselines, mean ± std over seeds.

Protocol (what ``essl probe`` reports):

* **Frozen features, extracted once, no augmentation.** The encoder file (``essl.load_encoder``) is run once
  over the train and test images (:func:`essl.eval.features.extract_features`). This differs from the
  reference protocol of Dangovski et al., "Equivariant Contrastive Learning" (ICLR 2022), which trains the
  linear layer for 100 epochs with SGD (lr 30, cosine, batch 256) on random crop + flip views; ours is
  cheaper and deterministic, and its absolute numbers are not the paper's: compare methods under the same
  probe only.
* **Linear probe.** Multinomial logistic regression on features standardised with train statistics,
  L2 penalty on the weights (not the bias), fitted full-batch with L-BFGS for at most ``MAX_ITER``
  iterations (a convex objective: no learning rate, no sample order, no initialisation noise). The penalty is
  chosen from :data:`WEIGHT_DECAY_GRID` by accuracy on a seeded validation split (:data:`VAL_FRACTION` of
  the *training* set); the classifier is then refitted on all training data with that penalty and scored
  once on the test set. Test labels are never used for selection.
* **Seeds.** A seed sets the validation split, hence the chosen penalty; we report mean ± sample standard
  deviation (n − 1) over seeds, and every seed's value.
* **kNN.** The similarity-weighted kNN of Wu et al., "Unsupervised Feature Learning via Non-Parametric
  Instance Discrimination" (InstDisc, CVPR 2018): cosine similarity, k = 200, weights exp(s / 0.1)
  (:mod:`essl.knn`). It has no randomness, so it is computed once (``per_seed`` holds one value, std 0).
* **Baselines, same probe.** Raw pixels (flattened, scaled to [0, 1]) and a randomly initialised encoder of
  the same architecture and input normalisation (``essl.encoder.random_encoder_like``, seed
  :data:`RANDOM_INIT_SEED`). An encoder that does not beat both has learned nothing useful.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import essl
from essl.data import load_labelled
from essl.encoder import random_encoder_like
from essl.errors import UserError
from essl.io import atomic_write_json
from essl.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_accuracy
from essl.runtime import resolve_device, torch_threads

from .features import DEFAULT_BATCH_SIZE, default_device, extract_features

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


# ------------------------------------------------------------------------------------------------- run_probe


def _summary(values: list[float]) -> dict[str, Any]:
    """{"mean", "std" (sample, n − 1; 0 for one value), "per_seed"} of accuracies."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": list(values)}


def _evaluate(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor, num_classes: int,
              seeds: int, knn_k: int, knn_t: float, device: torch.device) -> dict[str, Any]:
    """Linear probe over ``seeds`` seeds and kNN (once) on one set of features."""
    linear = [train_linear_probe(train_feats, train_y, test_feats, test_y, num_classes, seed, device=device)
              for seed in range(seeds)]
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


def protocol_text(seeds: int, knn_k: int, knn_t: float) -> str:
    """One-paragraph statement of the protocol, stored in the JSON result."""
    grid = ", ".join(f"{wd:g}" for wd in WEIGHT_DECAY_GRID)
    return (
        "frozen features, no augmentation; linear: multinomial logistic regression (full-batch L-BFGS) on "
        f"train-standardised features, L2 penalty chosen from {{{grid}}} on a seeded "
        f"{VAL_FRACTION:.0%} validation split of train, refitted on all train, scored once on test; "
        f"mean ± sample std over {seeds} seed(s) (the seed sets the validation split); "
        f"kNN: InstDisc cosine-weighted, k={knn_k}, T={knn_t:g}, deterministic, computed once; "
        f"baselines with the same probe: raw pixels in [0, 1] and a random-init encoder "
        f"(seed {RANDOM_INIT_SEED})"
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

    Returns:
        ``{"linear": {"mean", "std", "per_seed"}, "knn": {...}, "baselines": {"raw_pixels": {"linear", "knn"},
        "random_init": {"linear", "knn"}}, "encoder", "data", "protocol"}``, accuracies as fractions.
    """
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if knn_k < 1:
        raise UserError(f"knn k must be >= 1, got {knn_k}")
    if not knn_t > 0:
        raise UserError(f"knn temperature must be > 0, got {knn_t}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    device = resolve_device(device)

    encoder = essl.load_encoder(encoder_path)
    config_name, config_path = _data_from_config(encoder.spec)
    if data is None:  # the pretraining data, from its folder
        name, path = config_name, config_path
    else:  # a name (its folder from the config when it is the pretraining dataset) or a path
        name, path = data, config_path if data == config_name else None
    labelled = load_labelled(name, image_size=int(encoder.input["size"]), path=path)
    channels = int(encoder.input["channels"])
    if labelled.x_train.shape[1] != channels:
        raise UserError(f"{labelled.name} has {labelled.x_train.shape[1]} channel(s) but the encoder "
                        f"{encoder_path} takes {channels}")

    def features(model: nn.Module) -> tuple[Tensor, Tensor]:
        return tuple(extract_features(model, x, batch_size=batch_size, device=device, progress=progress)
                     for x in (labelled.x_train, labelled.x_test))

    ys = (labelled.y_train, labelled.y_test)
    common = {"num_classes": labelled.num_classes, "seeds": seeds, "knn_k": knn_k, "knn_t": knn_t,
              "device": device}
    random_encoder = random_encoder_like(encoder, seed=RANDOM_INIT_SEED)
    runs = {}
    for key, model in (("encoder", encoder), ("random_init", random_encoder), ("raw_pixels", nn.Flatten())):
        train_feats, test_feats = features(model)
        runs[key] = _evaluate(train_feats, ys[0], test_feats, ys[1], **common)

    result = {
        "linear": runs["encoder"]["linear"],
        "knn": runs["encoder"]["knn"],
        "baselines": {"raw_pixels": runs["raw_pixels"], "random_init": runs["random_init"]},
        "encoder": str(encoder_path),
        "data": labelled.name,
        "protocol": protocol_text(seeds, knn_k, knn_t),
    }
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
    rows = [
        ("encoder", result),
        ("random init", result["baselines"]["random_init"]),
        ("raw pixels", result["baselines"]["raw_pixels"]),
    ]
    cells = [(label, _cell(r["linear"]), _cell(r["knn"])) for label, r in rows]
    headers = ("", f"linear (%, {n_seeds} seed{'s' if n_seeds != 1 else ''})", "kNN (%)")
    widths = [max(len(row[i]) for row in [headers, *cells]) for i in range(3)]
    lines = [f"{result['encoder']} on {result['data']}"]
    lines.append(f"{headers[0]:<{widths[0]}}  {headers[1]:>{widths[1]}}  {headers[2]:>{widths[2]}}")
    lines.append("-" * len(lines[-1]))
    for label, lin, knn in cells:
        lines.append(f"{label:<{widths[0]}}  {lin:>{widths[1]}}  {knn:>{widths[2]}}")
    return "\n".join(lines)
