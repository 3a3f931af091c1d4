"""DOS regression of photonic crystals: fine-tune a pretrained encoder (or train a head on it), beside the same
network trained from scratch.

The downstream task of the photonics experiment of Dangovski et al., "Equivariant Contrastive Learning"
(ICLR 2022), after Loh et al., "Surrogate- and invariance-boosted contrastive learning for data-scarce
applications in science" (Nature Communications 13, 4223, 2022): predict the density of states (DOS) of a 2D
photonic crystal from its 32×32 permittivity map, from few labels, and score the relative L1 error. The
defaults are the authors' fine-tuning (GitHub rdangovs/essl, ``photonics/main.py`` ``finetune_model``,
``photonics/phc_models.py`` ``Net``/``PredictorDOS``); every number taken from there is a named constant below
with its source.

Protocol (what ``essl phc regress`` reports):

* **Labels.** For seed ``s`` the train file is permuted with a generator seeded by ``s``; its first
  ``n_labels`` structures are the labelled set. The first ``round(val_fraction · n_labels)`` of them (at least
  one) form the validation split, the rest the fitting split. Every network of one seed (encoder and scratch)
  sees exactly the same labels.
* **Network.** The encoder's backbone followed by the reference DOS head (:class:`DOSHead`): feature_dim →
  1024 → 1024 → 512 → 400, ReLU between (:data:`HEAD_HIDDEN`, the reference's ``Lvp``), whatever the encoder's
  width. Inputs are raw permittivity maps, normalised as (ε − mean)/std with the encoder file's input spec
  ((ε − 1)/19, :data:`PHC_INPUT_MEAN`/:data:`PHC_INPUT_STD`, without an encoder).

  - ``mode="finetune"`` (default; the reference): a copy of the pretrained encoder and a fresh head, the
    whole network trained;
  - ``mode="frozen"`` (the reference's ``--freeze_enc_ft``): only the head is trained, on features of the frozen
    encoder extracted once (eval mode, no gradient) and standardised with fitting-split statistics;
  - and beside it, **from scratch**: the very same network (the encoder's ``backbone`` spec, or
    ``scratch_backbone`` without an encoder), randomly initialised, trained end to end with the same
    optimiser, epochs and batches.
* **Optimisation** (the reference's): Adam on every trained parameter, learning rate :data:`DEFAULT_LR`
  = 1e-4 for all of them (``backbone_lr_factor`` = 1; another factor scales a fine-tuned backbone's rate
  only), weight decay :data:`DEFAULT_WEIGHT_DECAY` = 1e-5 (Adam's L2 term), constant learning rate, MSE on
  the raw target (DOS/√ε_avg − 2πω on 400 points, :mod:`essl.photonics.dos`, the HDF5 ``target``),
  :data:`DEFAULT_EPOCHS` = 100 passes over the fitting split in seeded shuffled batches: ⌈n_fit / 64⌉ steps
  per epoch as the reference's ``DataLoader(batch_size=64, shuffle=True)``, with the structures spread evenly
  over the batches instead of a short last one (so BatchNorm never sees a batch of one; :func:`_batches`).
* **Augmentation** (``augment``, ``scratch_augment``): ``"none"`` or names of
  :data:`essl.augment.LATTICE_OPS` joined by ``"+"``, applied in that order by
  :func:`essl.augment.lattice_augment` to every fitting batch, one random element per structure and operation.
  They are exact lattice symmetries (pixel permutations) and leave the DOS unchanged. The reference fine-tunes
  with the run's own SSL views, e.g. ``flip3+rot4`` (blob cells), ``shift+flip3`` (level-set cells), plus
  ``halfshift`` (blob) or ``rot4`` (level set) for its SimCLR-invariant arm; ``scratch_augment`` lets the
  from-scratch baseline use the dataset's base symmetries while each encoder uses its own (default: the same
  as ``augment``). A frozen encoder's head gets :data:`FROZEN_VIEWS` feature vectors per fitting structure,
  extracted once from independent random augmentations, and every epoch trains on one of them per structure
  drawn at random (the same number of steps as end-to-end training). Validation and test maps are never
  augmented.
* **Model selection on validation only.** After every epoch the validation relative L1 error is computed;
  the weights of the best epoch (the first on ties) are kept. The test file is touched once per trained
  model, after selection, to score the selected weights: never to choose anything. (The reference reports
  the minimum *test* error over epochs instead, which selects on the test set and is biased low.)
* **Score.** Relative L1 error of :func:`essl.photonics.dos.relative_l1` over the whole test file: mean over
  structures of Σ|ŷ − y| / Σ|y| over target points 100..399, after adding the empty-lattice line back to
  both (Loh et al. 2022). Errors are fractions; we report mean ± sample standard deviation (n − 1) over seeds
  and every seed's value.

The reference trains on 3000 labels on a GPU. On a CPU a model costs about ``epochs`` × ``n_labels`` times
a per-structure step time that grows with the square of the encoder width (most of it the convolutions), so
CPU-sized comparisons use fewer labels or a narrower encoder; compare encoders under the same settings only.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import essl
from essl.augment import LATTICE_OPS, lattice_augment
from essl.backbones import build_backbone, check_input_size
from essl.encoder import FrozenEncoder
from essl.errors import UserError
from essl.io import atomic_write, atomic_write_json, check_output_file
from essl.photonics import dos as phc_dos
from essl.photonics.dataset import PhCData, open_dataset
from essl.runtime import resolve_device, torch_threads

# ------------------------------------------------------------------------------------------------ settings
# Reference: GitHub rdangovs/essl (Dangovski et al. 2022), photonics/main.py and photonics/phc_models.py.

#: Hidden sizes of the DOS head: ``Lvp = [1024, 1024, 512]`` in ``main.py``, used by ``PredictorDOS``.
HEAD_HIDDEN: tuple[int, ...] = (1024, 1024, 512)
#: Fine-tuning learning rate: ``--learning_rate_ft`` default of ``main.py``.
DEFAULT_LR = 1e-4
#: ``finetune_model``: ``torch.optim.Adam(model.parameters(), lr=ftlr, weight_decay=1e-5)``.
DEFAULT_WEIGHT_DECAY = 1e-5
#: ``--finetune_epochs`` default of ``main.py``.
DEFAULT_EPOCHS = 100
#: ``--batchsize`` default of ``main.py`` (fine-tuning batch size).
DEFAULT_BATCH_SIZE = 64
#: Learning rate of a fine-tuned backbone relative to the head's: the reference gives every parameter the same
#: rate (one Adam group over ``model.parameters()``).
DEFAULT_BACKBONE_LR_FACTOR = 1.0
#: Seeds: the reference averages fine-tuning seeds 1, 2, 3 (``main.py``, ``__main__``); essl runs 0, 1, 2.
DEFAULT_SEEDS = 3
#: Share of the labelled structures held out for model selection (essl; the reference has no validation split).
DEFAULT_VAL_FRACTION = 0.2

MODES = ("finetune", "frozen")
DEFAULT_MODE = "finetune"
#: ``augment`` value for no augmentation.
NO_AUGMENT = "none"
#: Former augmentation names, still accepted: each maps to a name of :data:`essl.augment.LATTICE_OPS`.
AUGMENT_ALIASES: dict[str, str] = {"flips": "flip4", "shifts": "shift"}
#: Feature vectors per fitting structure for a frozen encoder with augmentation (independent random views).
FROZEN_VIEWS = 8
#: Structures per forward pass when extracting features or predicting.
EVAL_BATCH_SIZE = 256
#: Smallest training batch: BatchNorm in training mode needs two samples per channel. Also the smallest
#: fitting split and the smallest ``batch_size`` accepted.
MIN_BATCH_SIZE = 2
MIN_FIT = MIN_BATCH_SIZE
#: CPU intra-op threads while training: the networks are small, and on the shared 2-core machines two threads
#: were measured 3-15x slower than one (phc_cnn width 0.25, batch 32, Adam step: 0.06-0.08 s on one thread,
#: 0.4-1.2 s on two, load average ~5). None keeps torch's setting.
CPU_THREADS: int | None = 1
#: Input normalisation of permittivity maps without an encoder file: (ε − 1)/19 maps ε ∈ [1, 20] to [0, 1]
#: (the range of essl.photonics.unitcell, and the reference's normalisation).
PHC_INPUT_MEAN = 1.0
PHC_INPUT_STD = 19.0
#: Backbone width of the from-scratch network when no encoder is given (the CPU-sized photonics encoder).
DEFAULT_SCRATCH_WIDTH = 0.25
#: Test structures shown in the figure (the first ones of the test file).
FIGURE_CELLS = 4
#: Figure size per shown cell (width, height in inches).
FIGURE_ROW_SIZE = (9.0, 2.4)
FIGURE_DPI = 100
#: A frozen feature whose fitting-split standard deviation is below this is only centred.
MIN_FEATURE_STD = 1e-8
#: Optimiser, schedule and loss of every run (the reference's), as stored in the JSON.
OPTIMIZER = "adam"
SCHEDULE = "constant"
LOSS = "mse on the raw target (DOS/sqrt(eps_avg) - 2*pi*omega)"


def default_scratch_backbone() -> dict[str, Any]:
    """The from-scratch network without an encoder: ``{"name": "phc_cnn", "kwargs": {"width": 0.25}}``."""
    return {"name": "phc_cnn", "kwargs": {"width": DEFAULT_SCRATCH_WIDTH}}


# ---------------------------------------------------------------------------------------------------- head


class DOSHead(nn.Module):
    """MLP from encoder features to the 400-point DOS target: feature_dim → 1024 → 1024 → 512 → 400, ReLU
    between: ``PredictorDOS`` of the reference (rdangovs/essl ``photonics/phc_models.py``; Dangovski et al.
    2022, after Loh et al. 2022). ``hidden`` overrides :data:`HEAD_HIDDEN`. (B, feature_dim) → (B, out_dim).
    """

    def __init__(self, feature_dim: int, out_dim: int = phc_dos.N_TARGET, hidden: Sequence[int] = HEAD_HIDDEN):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        layers: list[nn.Module] = []
        width = feature_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.hidden = hidden
        self.sizes = (int(feature_dim), *hidden, int(out_dim))

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


def parse_augment(augment: str, flag: str = "--augment") -> tuple[str, ...]:
    """The lattice operations of an ``augment`` value, in the order applied.

    ``"none"`` → (); otherwise names of :data:`essl.augment.LATTICE_OPS` joined by ``"+"``, e.g.
    ``"flip3+rot4"`` (the reference's blob views), ``"shift+flip3"`` (level sets), ``"halfshift+flip3+rot4"``.
    The former names ``flips`` and ``shifts`` (:data:`AUGMENT_ALIASES`) are accepted, so ``c4v+shifts`` still
    means a C4v element, then a periodic shift. Anything else is a UserError naming the bad value.
    """
    usage = (f"use {NO_AUGMENT!r} or operations of {', '.join(LATTICE_OPS)} joined by '+' in the order applied, "
             "e.g. flip3+rot4")
    if not isinstance(augment, str):
        raise UserError(f"{flag} {augment!r}: expected a string; {usage}")
    if augment == NO_AUGMENT:
        return ()
    ops = []
    for token in augment.split("+"):
        op = AUGMENT_ALIASES.get(token, token)
        if op not in LATTICE_OPS:
            raise UserError(f"{flag} {augment!r}: unknown lattice operation {token!r}; {usage}")
        ops.append(op)
    return tuple(ops)


def augment_maps(x: Tensor, augment: str | Sequence[str], generator: torch.Generator | None = None) -> Tensor:
    """A random lattice symmetry per map (x: (B, 1, n, n) permittivity maps); the DOS is invariant to all.

    ``augment``: an ``augment`` string (:func:`parse_augment`) or a sequence of operation names; applied by
    :func:`essl.augment.lattice_augment`, one random element per map and operation, in order.
    """
    ops = parse_augment(augment) if isinstance(augment, str) else tuple(augment)
    return lattice_augment(x, ops, generator) if ops else x


def _pick_view(xb: Tensor, generator: torch.Generator) -> Tensor:
    """One of the precomputed feature views per structure, uniformly at random: (B, V, D) → (B, D)."""
    choice = torch.randint(xb.shape[1], (xb.shape[0],), device=xb.device, generator=generator)
    return xb[torch.arange(xb.shape[0], device=xb.device), choice]


# --------------------------------------------------------------------------------------------- training


@dataclass
class Selected:
    """A trained model after validation-only selection."""

    model: nn.Module  # carries the selected weights; maps inputs to targets
    best_epoch: int  # 1-based epoch whose weights were kept
    val_error: float  # validation relative L1 error of those weights
    val_history: list[float]  # validation error after every epoch


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A seeded shuffle of range(n) cut into ⌈n / batch_size⌉ nearly equal batches: the number of steps of the
    reference's ``DataLoader(batch_size, shuffle=True, drop_last=False)``, but no short last batch, and never
    more than ⌊n / MIN_BATCH_SIZE⌋ batches, so none is smaller than :data:`MIN_BATCH_SIZE` (BatchNorm)."""
    perm = torch.randperm(n, generator=generator)
    n_batches = max(1, min(math.ceil(n / batch_size), n // MIN_BATCH_SIZE))
    return list(torch.tensor_split(perm, n_batches))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    """Targets (N, 400) predicted by ``model`` in eval mode, batched, on the CPU (float32)."""
    was_training = model.training
    model.eval()
    out = [model(x[i:i + EVAL_BATCH_SIZE].to(device)).float().cpu() for i in range(0, len(x), EVAL_BATCH_SIZE)]
    model.train(was_training)
    return torch.cat(out)


def train_select(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    fit: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
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
    (or None) is applied to every fitting batch on ``device``. The reference's optimisation (module
    docstring): Adam on ``param_groups`` (each with its own ``lr``) with ``weight_decay``, constant learning
    rate, MSE between the output and the raw target, :func:`_batches` from ``generator`` every epoch. On the
    CPU it runs with ``num_threads`` intra-op threads (None: torch's setting).
    """
    with torch_threads(num_threads if device.type == "cpu" else None):
        x_fit, y_fit = fit
        x_val, y_val = val
        optimizer = torch.optim.Adam(param_groups, weight_decay=weight_decay)
        model.to(device)
        best_state, best_epoch, best_error, history = None, 0, math.inf, []
        for epoch in range(1, epochs + 1):
            model.train()
            for idx in _batches(len(x_fit), batch_size, generator):
                xb, yb = x_fit[idx].to(device), y_fit[idx].to(device)
                if augment is not None:
                    xb = augment(xb)
                loss = nn.functional.mse_loss(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            error = float(phc_dos.relative_l1(predict(model, x_val, device), y_val))
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
    """The DOS head, initialised from ``seed`` (the same head initialisation for every network of one seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DOSHead(feature_dim)


def _trainable(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(True)
    return module.train()


def _network_record(body_spec: dict[str, Any], head: DOSHead, modules: Sequence[nn.Module],
                    groups: list[dict[str, Any]], trained: str) -> dict[str, Any]:
    """What the JSON states about one network (``modules``: all its parts, frozen ones included): architecture,
    parameter counts, what was trained."""
    trainable = {id(p) for g in groups for p in g["params"]}
    params = [p for m in modules for p in m.parameters()]
    return {
        "backbone": copy.deepcopy(body_spec),
        "head": list(head.sizes),
        "n_params": sum(p.numel() for p in params),
        "n_trained": sum(p.numel() for p in params if id(p) in trainable),
        "trained": trained,
    }


# -------------------------------------------------------------------------------------------------- runs


@dataclass
class _Run:
    """One (model kind, seed) run: the test error and what selection chose."""

    test_error: float
    val_error: float
    best_epoch: int
    val_history: list[float]  # validation error after every epoch
    figure_pred: Tensor  # (FIGURE_CELLS, 400) test predictions of the selected model


def _score(selected: Selected, x_test: Tensor, y_test: Tensor, device: torch.device, n_figure: int) -> _Run:
    """The one use of the test file: score the already selected model."""
    pred = predict(selected.model, x_test, device)
    error = float(phc_dos.relative_l1(pred, y_test))
    return _Run(test_error=error, val_error=selected.val_error, best_epoch=selected.best_epoch,
                val_history=list(selected.val_history), figure_pred=pred[:n_figure].clone())


def _check_number(name: str, value: Any, low: float, *, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise UserError(f"--{name.replace('_', '-')} must be a number {'>' if strict else '>='} {low:g}, "
                        f"got {value!r}")


def _check_args(mode: str, seeds: int, epochs: int, batch_size: int, lr: float, val_fraction: float,
                weight_decay: float, backbone_lr_factor: float) -> None:
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    for name, value, low in (("seeds", seeds, 1), ("epochs", epochs, 1), ("batch_size", batch_size, MIN_BATCH_SIZE)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    _check_number("lr", lr, 0.0, strict=True)
    _check_number("weight_decay", weight_decay, 0.0, strict=False)
    _check_number("backbone_lr_factor", backbone_lr_factor, 0.0, strict=False)
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
    config = encoder.spec.get("config") or {}
    trained_on = (config.get("data") or {}).get("name") if isinstance(config, dict) else None
    if trained_on is not None and trained_on != "phc":
        raise UserError(f"encoder {path} was pretrained on {trained_on}, not on photonic-crystal maps "
                        "(data.name=phc); phc regress needs an encoder of unit cells")
    channels, enc_size = int(encoder.input["channels"]), int(encoder.input["size"])
    if channels != 1:
        raise UserError(f"encoder {path} takes {channels} input channels; permittivity maps have 1")
    if enc_size != size:
        raise UserError(f"encoder {path} takes {enc_size}x{enc_size} inputs; the data has {size}x{size} maps")


def protocol_text(mode: str, augment: str, scratch_augment: str, epochs: int, batch_size: int, lr: float,
                  weight_decay: float, backbone_lr_factor: float, val_fraction: float) -> str:
    """One-paragraph statement of the protocol, stored in the JSON result."""
    if mode == "frozen":
        encoder = (f"DOS head on frozen features (extracted once in eval mode, standardised; with augmentation "
                   f"one of {FROZEN_VIEWS} precomputed random views per structure and epoch)")
    else:
        factor = "" if backbone_lr_factor == DEFAULT_BACKBONE_LR_FACTOR else f", backbone lr x{backbone_lr_factor:g}"
        encoder = f"pretrained encoder + fresh DOS head, whole network fine-tuned{factor}"
    return (
        f"labels: first n_labels of a seeded permutation of train, {val_fraction:g} of them for validation, the "
        f"same for every network of a seed; encoder: {encoder}; scratch: the same network, random init, trained "
        f"end to end; DOS head MLP feature_dim->{'->'.join(str(h) for h in HEAD_HIDDEN)}->{phc_dos.N_TARGET} "
        f"(rdangovs/essl PredictorDOS); Adam lr {lr:g}, weight decay {weight_decay:g}, constant lr, MSE on the "
        f"raw target, {epochs} epochs of ceil(n_fit/{batch_size}) shuffled batches; lattice augmentation of "
        f"fitting batches: encoder {augment}, scratch {scratch_augment}; best epoch by validation relative L1, "
        f"test scored once after selection (the reference reported the minimum test error over epochs); relative "
        f"L1 over target points {phc_dos.METRIC_START}..{phc_dos.N_TARGET - 1} with the empty lattice added "
        "back; mean ± sample std over seeds"
    )


def run_regression(
    encoder: str | os.PathLike | None,
    train: str | os.PathLike,
    test: str | os.PathLike,
    n_labels: int,
    *,
    mode: str = DEFAULT_MODE,
    seeds: int = DEFAULT_SEEDS,
    augment: str = NO_AUGMENT,
    scratch_augment: str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    backbone_lr_factor: float = DEFAULT_BACKBONE_LR_FACTOR,
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
        mode: "finetune" (train the encoder and the head: the reference) or "frozen" (the head only).
        seeds: runs 0 .. seeds − 1; the seed sets the labelled subset, the initialisation, batch order and
            augmentation draws.
        augment: lattice augmentation of the encoder's fitting batches: "none" or operations of
            :data:`essl.augment.LATTICE_OPS` joined by "+" in order (:func:`parse_augment`), e.g. "flip3+rot4".
        scratch_augment: the same for the from-scratch network (None: ``augment``).
        epochs, batch_size, lr, weight_decay: optimisation (Adam, constant learning rate, MSE on the raw
            target); defaults: the reference's 100, 64, 1e-4, 1e-5.
        backbone_lr_factor: a fine-tuned encoder's backbone learns at ``lr · backbone_lr_factor`` (default 1:
            one rate for every parameter, as the reference). The scratch network always uses ``lr``.
        val_fraction: share of the labelled structures held out for model selection.
        device: where to train; default CUDA when available, else CPU.
        json_path: write the result there (atomically).
        figure_path: save a figure of predicted vs true DOS for the first test cells (seed 0), with the maps.
        progress: show a progress bar.
        scratch_backbone: ``{"name", "kwargs"}`` of the from-scratch network without an encoder (default
            :func:`default_scratch_backbone`); with an encoder, the encoder's own backbone spec is used.
        num_threads: CPU intra-op threads while training (None: torch's setting).
        with_scratch: also train the from-scratch network (with an encoder). Its result depends only on the
            files, labels, seeds, settings, ``scratch_augment`` and backbone architecture, so a comparison of
            several encoders of one architecture can run it once (``encoder=None``) and skip it here.

    Returns:
        ``{"encoder", "train", "test", "n_labels", "mode", "seeds", "augment", "scratch_augment", "results":
        {"encoder": {"mean", "std", "per_seed", "val_per_seed", "best_epoch", "val_history"}, "scratch": {...}},
        "settings": {..., "networks": {kind: {"backbone", "head", "n_params", "n_trained", "trained"}},
        "optimizers": {kind: {"name", "lr", "backbone_lr", "weight_decay", "schedule", "loss", "epochs",
        "batch_size", "augment"}}}, "protocol", "elapsed_seconds"}``; ``results`` has no "encoder" entry when
        ``encoder`` is None and no "scratch" entry with ``with_scratch=False``. Errors are fractions
        (relative L1).

    Raises:
        UserError: unknown mode or augmentation, unlabelled or unreadable files, ``n_labels`` larger than
            the train file or too small for a validation split, an encoder of the wrong input shape.
    """
    start_time = time.perf_counter()
    _check_args(mode, seeds, epochs, batch_size, lr, val_fraction, weight_decay, backbone_lr_factor)
    scratch_augment = augment if scratch_augment is None else scratch_augment
    ops = {"encoder": parse_augment(augment, "--augment"),
           "scratch": parse_augment(scratch_augment, "--scratch-augment")}
    device = resolve_device(device)
    if encoder is None and not with_scratch:
        raise UserError("--no-scratch with encoder 'none': nothing to train (no encoder and no from-scratch baseline)")
    if figure_path is not None:
        _figure_format(figure_path)
        check_output_file(figure_path, "--figure")
    if json_path is not None:  # before the work: a result that cannot be written is not computed
        check_output_file(json_path, "--json")
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
    networks: dict[str, dict[str, Any]] = {}
    optimizers: dict[str, dict[str, Any]] = {}
    head_only = frozen is not None and mode == "frozen"

    with torch_threads(num_threads if device.type == "cpu" else None):
        # frozen mode: test features once, and un-augmented train features once for every labelled structure
        labelled = torch.unique(torch.cat([
            torch.cat([s.fit, s.val]) for s in (label_split(len(x_train), n_labels, val_fraction, seed)
                                                for seed in range(seeds))]))
        feats_test = feats_train = None
        if head_only:
            feats_test = _features(frozen, x_test, device)
            feats_train = torch.zeros(len(x_train), frozen.feature_dim)
            feats_train[labelled] = _features(frozen, x_train[labelled], device)

        with tqdm(total=seeds * len(kinds), desc="phc regress", unit=" model", disable=not progress) as bar:
            for seed in range(seeds):
                split = label_split(len(x_train), n_labels, val_fraction, seed)
                y_fit, y_val = y_train[split.fit], y_train[split.val]
                for kind in kinds:
                    bar.set_postfix_str(f"seed {seed} {kind}")
                    # fresh generators per run: a run does not depend on which other runs came before it
                    gen = torch.Generator(device=device).manual_seed(seed)
                    batch_gen = torch.Generator().manual_seed(seed)
                    kind_ops = ops[kind]

                    def aug(xb: Tensor, gen: torch.Generator = gen, kind_ops: tuple[str, ...] = kind_ops) -> Tensor:
                        return lattice_augment(xb, kind_ops, gen)

                    backbone_lr = None
                    if kind == "encoder" and head_only:
                        x_fit = _frozen_fit_features(frozen, feats_train, x_train, split.fit, kind_ops, gen, device)
                        f_mean, f_std = _feature_stats(x_fit.flatten(0, -2))
                        head = _seeded_head(frozen.feature_dim, seed)
                        model = nn.Sequential(_Standardise(f_mean, f_std), head)
                        groups = [{"params": list(head.parameters()), "lr": lr}]
                        fit_aug = (lambda xb, gen=gen: _pick_view(xb, gen)) if x_fit.dim() == 3 else None
                        fit, val, test_inputs = (x_fit, y_fit), (feats_train[split.val], y_val), feats_test
                        trained = "head only (frozen encoder features)"
                        parts = [frozen, head]
                    elif kind == "encoder":  # fine-tune a copy of the encoder
                        body = _trainable(FrozenEncoder(copy.deepcopy(frozen.backbone), frozen.spec))
                        head = _seeded_head(frozen.feature_dim, seed)
                        model = nn.Sequential(body, head)
                        backbone_lr = lr * backbone_lr_factor
                        groups = [{"params": list(body.parameters()), "lr": backbone_lr},
                                  {"params": list(head.parameters()), "lr": lr}]
                        fit_aug = aug if kind_ops else None
                        fit, val, test_inputs = (x_train[split.fit], y_fit), (x_train[split.val], y_val), x_test
                        trained = "whole network (pretrained encoder + new head)"
                        parts = [body, head]
                    else:  # from scratch: the same network, random init, every parameter at lr
                        body, feature_dim = _scratch_network(backbone_spec, input_spec, seed)
                        head = _seeded_head(feature_dim, seed)
                        model = nn.Sequential(body, head)
                        backbone_lr = lr
                        groups = [{"params": list(body.parameters()), "lr": lr},
                                  {"params": list(head.parameters()), "lr": lr}]
                        fit_aug = aug if kind_ops else None
                        fit, val, test_inputs = (x_train[split.fit], y_fit), (x_train[split.val], y_val), x_test
                        trained = "whole network (random init)"
                        parts = [body, head]
                    networks[kind] = _network_record(backbone_spec, head, parts, groups, trained)
                    optimizers[kind] = {
                        "name": OPTIMIZER, "lr": lr, "backbone_lr": backbone_lr, "weight_decay": weight_decay,
                        "schedule": SCHEDULE, "loss": LOSS, "epochs": epochs, "batch_size": batch_size,
                        "augment": list(kind_ops),
                    }
                    selected = train_select(model, groups, fit, val, epochs=epochs, batch_size=batch_size,
                                            weight_decay=weight_decay, augment=fit_aug, generator=batch_gen,
                                            device=device, num_threads=num_threads)
                    runs[kind].append(_score(selected, test_inputs, y_test, device, n_figure))
                    bar.update(1)

    results = {}
    for kind in kinds:
        summary = _summary([r.test_error for r in runs[kind]])
        summary["val_per_seed"] = [r.val_error for r in runs[kind]]
        summary["best_epoch"] = [r.best_epoch for r in runs[kind]]
        summary["val_history"] = [r.val_history for r in runs[kind]]
        results[kind] = summary
    result = {
        "encoder": None if encoder is None else str(encoder),
        "train": str(train),
        "test": str(test),
        "n_labels": n_labels,
        "mode": mode,
        "seeds": seeds,
        "augment": augment,
        "scratch_augment": scratch_augment,
        "results": results,
        "settings": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "backbone_lr_factor": backbone_lr_factor,
            "weight_decay": weight_decay,
            "optimizer": OPTIMIZER,
            "schedule": SCHEDULE,
            "loss": LOSS,
            "val_fraction": val_fraction,
            "n_fit": n_fit,
            "n_val": n_val,
            "n_train_file": len(train_data),
            "n_test": len(test_data),
            "frozen_views": FROZEN_VIEWS if (head_only and ops["encoder"]) else 1,
            "head_hidden": list(HEAD_HIDDEN),
            "networks": networks,
            "optimizers": optimizers,
            "backbone": backbone_spec,
            "input": input_spec,
            "metric": f"relative L1 over target points {phc_dos.METRIC_START}..{phc_dos.N_TARGET - 1}, "
                      "empty lattice added back",
            "selection": "best epoch by validation relative L1 (first on ties); test scored once per model",
            "device": str(device),
            "num_threads": num_threads,
            "essl_version": essl.__version__,
        },
        "protocol": protocol_text(mode, augment, scratch_augment, epochs, batch_size, lr, weight_decay,
                                  backbone_lr_factor, val_fraction),
        "elapsed_seconds": round(time.perf_counter() - start_time, 2),
    }
    if figure_path is not None:
        preds = {kind: runs[kind][0].figure_pred for kind in kinds}
        save_figure(figure_path, x_test[:n_figure, 0], y_test[:n_figure], preds, mode=mode)
    if json_path is not None:
        atomic_write_json(json_path, result)
    return result


def _frozen_fit_features(encoder: FrozenEncoder, feats_train: Tensor, x_train: Tensor, fit_idx: Tensor,
                         ops: tuple[str, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Fitting inputs of a frozen-encoder head: without augmentation the precomputed features (N, D); with it
    the features of FROZEN_VIEWS independent random augmentations of every fitting structure, (N, V, D)."""
    if not ops:
        return feats_train[fit_idx]
    x_fit = x_train[fit_idx].to(device)
    return torch.stack([_features(encoder, lattice_augment(x_fit, ops, generator), device)
                        for _ in range(FROZEN_VIEWS)], dim=1)


def _feature_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and (population) std of (N, D) features; a constant feature gets std 1."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std < MIN_FEATURE_STD, torch.ones_like(std), std)


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


def _augment_text(result: dict[str, Any]) -> str:
    """The augmentation(s) of the trained networks, for the table header."""
    kinds = result["results"]
    augment, scratch = result["augment"], result.get("scratch_augment", result["augment"])
    if "encoder" not in kinds:
        return scratch
    if "scratch" not in kinds or scratch == augment:
        return augment
    return f"{augment} (scratch {scratch})"


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
        f"test {result['test']}: {settings['n_test']} cells; augment {_augment_text(result)}; "
        f"{settings['epochs']} epochs, batch {settings['batch_size']}, Adam lr {settings['lr']:g}, "
        f"weight decay {settings['weight_decay']:g}",
        "  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(headers, widths, strict=True))),
    ]
    lines.append("-" * len(lines[-1]))
    for row in rows:
        lines.append("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)
