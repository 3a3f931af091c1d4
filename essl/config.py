"""Structured configuration: dataclass schemas + ``load_config(path, overrides)``.

This module and the composition root (:mod:`essl.pretrain`) are the only places that see config objects;
every other function takes explicit arguments. Defaults live here, once; a YAML file holds only what differs.
omegaconf's struct mode makes an unknown key or a wrong type an error; :func:`load_config` turns it into a
:class:`~essl.errors.UserError` whose one line names the key.

Reference recipe (CIFAR-10, ResNet-18, Dangovski et al., ICLR 2022): batch 512, SGD momentum 0.9, weight decay
5e-4, lr 0.06·bsz/256 for E-SSL (0.03 for the baseline), 10 warm-up epochs + cosine, λ = 0.4, temperature 0.5,
rotation view RandomResizedCrop(16, scale 0.2–1) with the same colour augmentations, 800 epochs.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from essl import transforms
from essl.errors import UserError

LR_REFERENCE_BATCH = 256  # lr is given per 256 images and scaled linearly by the global batch (Goyal et al.)


@dataclass
class DataConfig:
    name: str = "digits"  # `essl list datasets`: digits, cifar10, cifar100, stl10, folder, phc
    path: str | None = None  # folder holding the data (all but digits); the HDF5 file for phc
    image_size: int = 32
    batch_size: int = 256  # per device
    num_workers: int = 0
    global_batch_size: int | None = None  # fixes the global batch: per device = this / world size (batch_size unused)


@dataclass
class AugmentConfig:
    """Invariant views: SimCLR's image recipe (crop size ``data.image_size``), or, when ``lattice`` is set,
    exact lattice symmetries of periodic unit cells and no crop or colour operation (photonic crystals)."""

    n_views: int = 2
    lattice: list[str] = field(default_factory=list)  # c4v | flip4 | rot4 | shift | halfshift
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # brightness contrast saturation hue
    grayscale_prob: float = 0.2
    blur_prob: Any = 0.0  # a probability, or one per view (BYOL / the reference ImageNet code: [1.0, 0.1])
    solarize_prob: Any = 0.0  # likewise ([0.0, 0.2])
    groups: list[str] = field(default_factory=list)  # transformation groups made invariant (`essl list groups`)


@dataclass
class EquivarianceConfig:
    """The E-SSL branch. ``weight`` is λ; λ = 0 is the plain method (no branch, no extra forward pass).

    ``view`` says what the branch's input is, before the group transformation is applied:

    * ``crop``: the paper's rotation view for images: RandomResizedCrop(``crop_size``, ``crop_scale``) with the
      same flip and colour operations as the invariant views (reference CIFAR-10 code);
    * ``raw``: the un-augmented batch, only normalised (the reference photonics code), then the exact lattice
      operations of ``lattice`` (e.g. ``[shift]``), which must keep every predicted element identifiable.

    A configuration whose operations on this input make two predicted elements indistinguishable is refused.
    """

    weight: float = 0.0
    group: str = "rot4"  # `essl list groups`: rot4, hflip, vflip, flip4, c4v, translate, jigsaw, invert, ...
    mode: str = "all"  # all: every image in every element (paper) | random: one element per image
    grid: int = 2  # translate: nt x nt periodic shifts
    view: str = "crop"  # crop (images, the paper's rotation view) | raw (un-augmented; unit cells)
    lattice: list[str] = field(default_factory=list)  # view=raw: lattice ops applied before the group
    crop_size: int = 16
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip_prob: float | None = None  # crop view: its own probabilities (None: those of the first invariant view)
    grayscale_prob: float | None = None
    blur_prob: float | None = None
    solarize_prob: float | None = None
    hidden_dim: int = 2048
    norm: str = "layernorm"  # head normalisation: layernorm (CIFAR-10 reference) | batchnorm (photonics reference)
    last_relu: bool = True  # ReLU after the second hidden layer (false: the reference's CIFAR-10 E-SimSiam head)
    bottleneck_dim: int | None = None  # extra Linear + norm before the output (256: the reference's ImageNet heads)
    strict: bool = True  # refuse inputs that make predicted elements indistinguishable (false: warn; ablations only)


@dataclass
class BackboneConfig:
    name: str = "resnet18_cifar"  # `essl list backbones`
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """The SSL method and its own hyper-parameters (``kwargs``, checked against the method's signature)."""

    name: str = "simclr"  # see `essl list methods`
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.06  # per 256 images; see scale_lr
    scale_lr: bool = True  # lr · global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 10.0
    final_lr_ratio: float = 0.0
    exclude_bias_norm: bool | None = None  # biases/norm weights: no weight decay nor LARS adaptation (None: lars only)
    bias_lr_ratio: float = 1.0  # their learning rate relative to the weights' (Barlow Twins' LARS: 0.0048 / 0.2)


@dataclass
class TrainerConfig:
    max_epochs: int = 800
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    sync_batchnorm: bool = True  # SyncBatchNorm when DDP runs on more than one GPU (false: per-GPU statistics)
    float32_matmul_precision: str = "high"  # on GPUs: torch.set_float32_matmul_precision (TF32); highest = off
    log_every_n_steps: int = 10
    limit_train_batches: Any = 1.0  # a float is a fraction of the epoch, an int a number of batches
    checkpoint_every_n_steps: int = 0  # 0: a checkpoint at every epoch end only
    deterministic: bool = False
    channels_last: bool = True  # NHWC memory format for the backbone (faster convolutions on CPU and GPU)
    compile: bool = False  # torch.compile the backbone's forward in place (opt-in: minutes of compiling first)
    logger: str = "csv"  # csv (metrics.csv) | tensorboard (tensorboard/ event files) | both


@dataclass
class EvalConfig:
    knn_monitor: bool = False  # kNN accuracy on the test split after every epoch (val/knn_acc)
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_every_n_epochs: int = 1  # the kNN monitor's interval


@dataclass
class Config:
    name: str = ""  # default: the config file's stem
    output_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    resume: bool = False
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    equivariance: EquivarianceConfig = field(default_factory=EquivarianceConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "equivariance.group": transforms.GROUPS,
    "equivariance.mode": ("all", "random"),
    "equivariance.view": ("crop", "raw"),
    "equivariance.norm": ("layernorm", "batchnorm"),
    "optim.name": ("sgd", "lars", "adamw"),
    "trainer.float32_matmul_precision": ("highest", "high", "medium"),
    "trainer.logger": ("csv", "tensorboard", "both"),
    "trainer.accelerator": ("auto", "cpu", "cuda", "gpu", "mps", "tpu"),
    # Lightning's precision values (lightning.fabric.connector); "16"/"bf16" are its short forms of the mixed ones
    "trainer.precision": ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true",
                          "64", "transformer-engine", "transformer-engine-float16"),
}
#: Keys that moved into ``method.kwargs`` (a config naming the old key gets a hint).
MOVED_METHOD_KEYS = ("hidden_dim", "output_dim", "temperature", "momentum_base")
POSITIVE = ("data.image_size", "data.batch_size", "trainer.max_epochs", "equivariance.crop_size", "equivariance.grid",
            "equivariance.hidden_dim", "optim.lr", "trainer.num_nodes", "trainer.log_every_n_steps", "eval.knn_k",
            "eval.knn_temperature")
NON_NEGATIVE = ("data.num_workers", "trainer.checkpoint_every_n_steps", "optim.weight_decay", "optim.warmup_epochs",
                "optim.bias_lr_ratio")
UNIT_INTERVAL = ("optim.final_lr_ratio",)  # [0, 1]
MAX_SEED = 2**32 - 1  # seed_everything's range (numpy's)
MAX_HUE = 0.5  # ColorJitter's hue range is [-0.5, 0.5]
PROBABILITIES = ("augment.hflip_prob", "augment.jitter_prob", "augment.grayscale_prob", "augment.blur_prob",
                 "augment.solarize_prob", "equivariance.hflip_prob", "equivariance.grayscale_prob",
                 "equivariance.blur_prob", "equivariance.solarize_prob")
PER_VIEW = ("augment.blur_prob", "augment.solarize_prob")  # a probability or one per view


def _error_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).strip().splitlines()[0]
    if key and key.startswith("method.") and key.split(".", 1)[1] in MOVED_METHOD_KEYS:
        msg += f" (method parameters now live in method.kwargs: use method.kwargs.{key.split('.', 1)[1]})"
    return f"config key {key!r}: {msg}" if key else msg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of keys at the top level")
    return data


def _validate(cfg: DictConfig) -> None:
    from essl.backbones import BACKBONES
    from essl.data import DATASETS
    from essl.methods import METHODS

    registries = {"method.name": tuple(METHODS), "backbone.name": tuple(BACKBONES), "data.name": tuple(DATASETS)}
    for key, allowed in (*CHOICES.items(), *registries.items()):
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise UserError(f"config key {key!r}: {value!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise UserError(f"config key {key!r}: must be positive, got {OmegaConf.select(cfg, key)}")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise UserError(f"config key {key!r}: must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in UNIT_INTERVAL:
        if not 0 <= OmegaConf.select(cfg, key) <= 1:
            raise UserError(f"config key {key!r}: must lie in [0, 1], got {OmegaConf.select(cfg, key)}")
    if not 0 <= cfg.optim.momentum < 1:
        raise UserError(f"config key 'optim.momentum': must lie in [0, 1), got {cfg.optim.momentum}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UserError(f"config key 'seed': must lie in [0, {MAX_SEED}], got {cfg.seed}")
    if cfg.equivariance.bottleneck_dim is not None and cfg.equivariance.bottleneck_dim <= 0:
        raise UserError(f"config key 'equivariance.bottleneck_dim': must be positive or null, got "
                        f"{cfg.equivariance.bottleneck_dim}")
    _validate_trainer(cfg)
    if cfg.eval.knn_every_n_epochs <= 0:
        raise UserError(f"config key 'eval.knn_every_n_epochs': must be positive, got {cfg.eval.knn_every_n_epochs}")
    if cfg.data.global_batch_size is not None and cfg.data.global_batch_size <= 0:
        raise UserError(f"config key 'data.global_batch_size': must be positive or null, got "
                        f"{cfg.data.global_batch_size}")
    for key in PROBABILITIES:
        value = OmegaConf.select(cfg, key)
        values = list(value) if key in PER_VIEW and OmegaConf.is_list(value) else [value]
        if key in PER_VIEW and len(values) not in (1, cfg.augment.n_views):
            raise UserError(f"config key {key!r}: expected one probability or {cfg.augment.n_views} (one per view)")
        for v in values:
            if v is None and key.startswith("equivariance."):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise UserError(f"config key {key!r}: must be a probability in [0, 1], got {v!r}")
    for key in ("augment.crop_scale", "equivariance.crop_scale"):
        lo_hi = OmegaConf.select(cfg, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise UserError(f"config key {key!r}: expected [min, max] with 0 < min <= max <= 1, got {list(lo_hi)}")
    from essl.augment import LATTICE_OPS

    bad = [g for g in cfg.augment.groups if g not in transforms.GROUPS]
    if bad:
        raise UserError(f"config key 'augment.groups': {bad[0]!r} is not one of {', '.join(transforms.GROUPS)}")
    for key in ("augment.lattice", "equivariance.lattice"):
        bad = [op for op in OmegaConf.select(cfg, key) if op not in LATTICE_OPS]
        if bad:
            raise UserError(f"config key {key!r}: {bad[0]!r} is not one of {', '.join(LATTICE_OPS)}")
    if len(cfg.augment.jitter) != 4:
        raise UserError("config key 'augment.jitter': expected 4 values (brightness, contrast, saturation, hue)")
    if min(cfg.augment.jitter) < 0 or cfg.augment.jitter[3] > MAX_HUE:
        raise UserError(f"config key 'augment.jitter': strengths must be >= 0 and the hue <= {MAX_HUE}, got "
                        f"{list(cfg.augment.jitter)}")
    if cfg.augment.n_views != 2:
        raise UserError(f"config key 'augment.n_views': {cfg.method.name} uses 2 views, got {cfg.augment.n_views}")
    limit = cfg.trainer.limit_train_batches
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise UserError(f"config key 'trainer.limit_train_batches': expected a positive int or float, got {limit!r}")
    if isinstance(limit, float) and limit > 1:
        raise UserError(f"config key 'trainer.limit_train_batches': a float is a fraction of the epoch (<= 1.0), got "
                        f"{limit!r}; give an int for a number of batches")
    if cfg.equivariance.weight < 0:
        raise UserError("config key 'equivariance.weight': λ must be >= 0")
    from essl.methods import check_method_kwargs

    check_method_kwargs(cfg.method.name, OmegaConf.to_container(cfg.method.kwargs))
    _validate_views(cfg)


def _validate_trainer(cfg: DictConfig) -> None:
    """Where the run goes: the accelerator must exist on this machine, ``devices`` must name devices it has, the
    logger's package must be installed."""
    import torch

    t = cfg.trainer
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if t.accelerator in ("cuda", "gpu") and not gpus:
        raise UserError(f"config key 'trainer.accelerator': {t.accelerator} requested but no CUDA GPU is available "
                        "(use trainer.accelerator=cpu or auto)")
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise UserError("config key 'trainer.accelerator': mps requested but it is not available on this machine")
    on_gpu = t.accelerator in ("cuda", "gpu") or (t.accelerator == "auto" and gpus > 0)
    devices = str(t.devices).strip()
    usage = "a positive number, -1 (all) or auto" + (", or a list of GPU ids such as 0,1" if on_gpu else "")
    if devices in ("auto", "-1"):
        pass
    elif re.fullmatch(r"\d+", devices):
        if int(devices) < 1:
            raise UserError(f"config key 'trainer.devices': expected {usage}, got {t.devices!r}")
        if on_gpu and int(devices) > gpus:
            raise UserError(f"config key 'trainer.devices': {devices} GPUs requested, this machine has {gpus}")
    elif on_gpu and re.fullmatch(r"\d+(,\d+)*,?", devices):
        missing = [i for i in devices.rstrip(",").split(",") if int(i) >= gpus]
        if missing:
            raise UserError(f"config key 'trainer.devices': GPU {missing[0]} does not exist (this machine has {gpus})")
    else:
        raise UserError(f"config key 'trainer.devices': expected {usage}, got {t.devices!r}")
    if t.logger in ("tensorboard", "both") and not any(importlib.util.find_spec(m) for m in ("tensorboard",
                                                                                              "tensorboardX")):
        raise UserError(f"config key 'trainer.logger': {t.logger} needs the tensorboard package (pip install "
                        "tensorboard)")


def _validate_views(cfg: DictConfig) -> None:
    """What the invariant views and the equivariance input get must fit the data and the predicted group."""
    a, e = cfg.augment, cfg.equivariance
    if cfg.data.name == "phc" and not a.lattice:
        raise UserError("config key 'augment.lattice': photonic-crystal maps (data.name=phc) take exact lattice "
                        "operations as views, e.g. [shift, flip3]; image crops and colour ops would change "
                        "their physical values")
    if e.weight == 0:
        return
    if a.lattice and e.view == "crop":
        raise UserError("config key 'equivariance.view': crop applies image crops and colour ops, which unit cells "
                        "(augment.lattice set) must not get; use equivariance.view=raw")
    if e.view == "crop" and e.lattice:
        raise UserError("config key 'equivariance.lattice': only equivariance.view=raw takes lattice operations")
    if e.view == "crop" and e.crop_size > cfg.data.image_size:
        raise UserError(f"config key 'equivariance.crop_size': {e.crop_size} is larger than data.image_size "
                        f"{cfg.data.image_size}")
    eq_size, eq_key = (e.crop_size, "equivariance.crop_size") if e.view == "crop" else (cfg.data.image_size,
                                                                                           "data.image_size")
    if e.group == "translate" and eq_size % e.grid:
        raise UserError(f"config key 'equivariance.grid': {e.grid} does not divide {eq_key} {eq_size} (the size of "
                        "the equivariance input)")
    if e.group in transforms.PHOTOMETRIC_GROUPS:
        if a.lattice:
            raise UserError(f"config key 'equivariance.group': {e.group} is an image colour operation; unit cells "
                            "(augment.lattice set) take pixel permutations only")
        # a random colour operation of the crop view that is the predicted one merges its elements
        same = {"grayscale": "augment.grayscale_prob", "blur": "augment.blur_prob", "invert": "augment.solarize_prob"}
        key = same[e.group]
        value = OmegaConf.select(cfg, key)
        own = {"blur": e.blur_prob, "invert": e.solarize_prob, "grayscale": e.grayscale_prob}[e.group]  # crop view's
        crop_prob = own if own is not None else max(value) if OmegaConf.is_list(value) else value
        if e.view == "crop" and crop_prob > 0:
            raise UserError(f"config key {key!r} ({value}) with 'equivariance.group' "
                            f"({e.group}): the crop view applies the predicted operation at random, which makes "
                            f"its elements indistinguishable; set {key}=0 or equivariance.view=raw")
        return
    # exact element algebra on a small grid with the same symmetry structure (see transforms.merged_elements)
    n = 8 * e.grid
    before = [("equivariance.lattice", op) for op in e.lattice]
    hflip = a.hflip_prob if e.hflip_prob is None else e.hflip_prob
    if e.view == "crop" and hflip > 0:  # the crop view flips images at random
        before.append(("augment.hflip_prob" if e.hflip_prob is None else "equivariance.hflip_prob", "hflip"))
    perms = [transforms.element_permutations(op, n) for _, op in before]
    merged = transforms.merged_elements(e.group, perms, n, e.grid)
    if merged:
        keys = " and ".join(f"{k!r} ({OmegaConf.select(cfg, k)})" for k in dict.fromkeys(k for k, _ in before))
        pairs = ", ".join(f"{i} and {j}" for i, j in merged)
        msg = (f"config keys {keys} with 'equivariance.group' ({e.group}): these operations on the equivariance "
               f"input make predicted elements indistinguishable ({pairs})")
        if e.strict:
            raise UserError(f"{msg}; remove them or predict another group (equivariance.strict=false runs it anyway)")
        warnings.warn(f"{msg}; running anyway (equivariance.strict=false)", stacklevel=2)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults ← YAML file ← ``key=value`` overrides, in struct mode, validated.

    Raises UserError naming the file or key for a missing file, malformed YAML, an unknown key, a wrong type
    or a value out of range.
    """
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.backbone.kwargs, False)  # free-form backbone arguments
    OmegaConf.set_struct(schema.method.kwargs, False)  # the method's own, checked against its signature
    file_data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value")
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(file_data), OmegaConf.from_dotlist(list(overrides)))
        if not cfg.name:
            cfg.name = Path(path).stem if path is not None else "run"
        if cfg.output_dir is None:
            cfg.output_dir = str(Path("runs") / cfg.name)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise UserError(_error_line(err)) from None
    _validate(cfg)
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain, resolved dict (for the encoder file and ``config.yaml``)."""
    return OmegaConf.to_container(cfg, resolve=True)
