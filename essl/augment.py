"""View augmentations, run batched on the device after the batch transfer (kornia).

The data loaders only decode images to uint8 tensors; everything stochastic happens here, on whole batches on
the accelerator, in ``LightningModule.on_after_batch_transfer``. The recipe follows SimCLR (Chen et al.,
2020) / BYOL (Grill et al., 2020) and the E-SSL reference code (Dangovski et al., ICLR 2022): random resized
crop, horizontal flip, colour jitter applied with a probability, random grayscale, Gaussian blur, solarize,
then normalisation. The equivariance view uses the same colour operations with its own (smaller) crop.

kornia notes (docs/design.md): ``cropping_mode="resample"`` crops the whole batch in one call (the default crops
sample by sample); ``ColorJitter`` follows torchvision's formulas (``ColorJiggle`` does not).

No host syncs. kornia 0.9 samples every parameter on the input's device and its crop, flip, grayscale and
solarize make no blocking device→host read, but three of its ops do, on every call (counted by
``essl.eval.bench.count_host_syncs``, asserted in ``tests/test_host_syncs.py``): ``ColorJitter`` asks
``(factor != neutral).any()`` of each of its four steps, ``gaussian_blur2d`` checks ``(sigma > 0).all()`` on the
device, and ``Normalize`` copies its host mean and std to the device. :class:`ColorJitter`,
:class:`RandomGaussianBlur` and :class:`Normalize` below are kornia's own classes (same parameter generators, so
the same random stream and the same outputs) with only those reads taken out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from kornia.filters import filter2d_separable, get_gaussian_kernel1d
from torch import Tensor, nn

from essl import transforms

# Largest uint8 value: images travel as uint8 until the device and become floats in [0, 1] here.
UINT8_MAX = 255.0
# Solarize at the midpoint, as torchvision's RandomSolarize(threshold=128) in the BYOL recipe.
SOLARIZE_THRESHOLD = 0.5


@dataclass(frozen=True)
class ViewSpec:
    """One family of views: crop and photometric settings (explicit arguments, no config object)."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    groups: tuple[str, ...] = ()  # transformation groups made invariant: a random element each (essl.transforms)


def to_float(x: Tensor) -> Tensor:
    """uint8 images -> float in [0, 1]; float inputs (e.g. permittivity maps) are passed through."""
    if x.dtype == torch.uint8:
        return x.float().div_(UINT8_MAX)
    return x.float()


def _blur_kernel(size: int) -> int:
    """SimCLR's blur kernel: 10% of the image side, made odd."""
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


#: The neutral factor of each ColorJitter step (brightness, contrast, saturation, hue): the identity.
JITTER_NEUTRAL = (1.0, 1.0, 1.0, 0.0)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class ColorJitter(K.ColorJitter):
    """kornia's ``ColorJitter`` (torchvision's formulas, the four steps in a random order per batch, drawn on the
    host by kornia's generator) without its per-step host reads.

    kornia runs a step only if ``(factor != neutral).any()`` over the batch, a blocking read of device factors.
    Here a step runs whenever its strength is non-zero, decided once from the constructor's arguments: a non-zero
    strength draws continuous factors, which equal the neutral value with probability 0, so the outputs are
    kornia's. A zero strength always draws the neutral factor and its step is left out, as kornia leaves it out.
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, same_on_batch: bool = False,
                 p: float = 1.0, keepdim: bool = False):
        super().__init__(brightness, contrast, saturation, hue, same_on_batch=same_on_batch, p=p, keepdim=keepdim)
        self._active = tuple(not _is_neutral(value, neutral)
                             for value, neutral in zip((brightness, contrast, saturation, hue), JITTER_NEUTRAL,
                                                       strict=True))

    def apply_transform(self, input: Tensor, params: dict[str, Tensor], flags: dict, transform=None) -> Tensor:
        steps = (self._brightness_fn, self._contrast_fn, self._saturation_fn, self._adjust_hue_turns)
        factors = (params["brightness_factor"], params["contrast_factor"], params["saturation_factor"],
                   params["hue_factor"])
        out = input.clamp(0.0, 1.0)  # kornia's _clamp_unit_range: the same values (no gradients here)
        for idx in params["order"].tolist():  # a host tensor (torch.randperm(4) in kornia's generator)
            if self._active[idx]:
                out = steps[idx](out, factors[idx])
        return out.clamp(0.0, 1.0)


def _is_neutral(strength, neutral: float) -> bool:
    """Whether a ColorJitter strength (a magnitude or a (min, max) range) only ever draws the neutral factor."""
    if isinstance(strength, (tuple, list)):
        return all(float(v) == neutral for v in strength)
    return float(strength) == 0.0


def gaussian_blur(x: Tensor, kernel_size: tuple[int, int] | int, sigma: Tensor, border_type: str = "reflect",
                  separable: bool = True) -> Tensor:
    """kornia's separable ``gaussian_blur2d`` (one kernel per sample from ``sigma`` (B, 2) = (σ_y, σ_x)) without its
    ``(sigma > 0).all()`` check, a blocking read of the device σ; :class:`RandomGaussianBlur` draws σ from a
    positive range, checked once when it is built. Half-precision inputs are blurred in float32, as kornia does."""
    if x.dtype in HALF_DTYPES:
        return gaussian_blur(x.float(), kernel_size, sigma, border_type, separable).to(x.dtype)
    ky, kx = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    sigma = sigma.to(x.dtype)
    n = sigma.shape[0]
    kernel_x = get_gaussian_kernel1d(kx, sigma[:, 1].view(n, 1))
    kernel_y = get_gaussian_kernel1d(ky, sigma[:, 0].view(n, 1))
    return filter2d_separable(x, kernel_x, kernel_y, border_type)


class RandomGaussianBlur(K.RandomGaussianBlur):
    """kornia's ``RandomGaussianBlur`` (same σ draws) blurring with :func:`gaussian_blur`, which reads nothing back.

    kornia's images of at least 256×256 pixels on the CPU take a tap-by-tap path instead of the convolution (the
    same blur, other rounding); every size here goes through the convolution, as kornia does on a GPU.
    """

    def __init__(self, kernel_size: tuple[int, int] | int, sigma: tuple[float, float], border_type: str = "reflect",
                 p: float = 0.5):
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur sigma must be a range 0 < min <= max, got {sigma}")
        super().__init__(kernel_size, sigma, border_type=border_type, p=p)
        self._gaussian_blur2d_fn = gaussian_blur


class KeepsFloat32(nn.Module):
    """A module whose floating tensors follow ``.to(device)`` but never a dtype conversion (``.to(torch.bfloat16)``,
    ``.half()``): Lightning's ``bf16-true`` / ``16-true`` convert the whole LightningModule, but the views are made,
    and normalised, in float32 and only then cast to the model's dtype
    (:meth:`essl.module.ESSLModule.make_training_batch`). kornia's augmentations sample their parameters in the
    dtype they see here, so they keep float32 too."""

    def _apply(self, fn, recurse: bool = True):
        def move_only(t: Tensor) -> Tensor:
            if not t.is_floating_point():
                return fn(t)
            return t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)  # fn's device, t's dtype

        return super()._apply(move_only, recurse)


class Normalize(KeepsFloat32):
    """(x − mean) / std per channel, the arithmetic of kornia's ``Normalize``, with mean and std as buffers that
    move with the module once; kornia's keeps them on the host and copies them to the device at every call."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        mean, std = self.mean.to(x.dtype), self.std.to(x.dtype)
        return ((x.reshape(b, c, -1) - mean) / std).reshape(x.shape)


def library_equivalent(op: nn.Module) -> nn.Module:
    """kornia's own op for one of the sync-free ops above (the same settings, hence the same random stream), any
    other op unchanged: the reference of the tests and the "before" of ``essl bench hostsync``."""
    if isinstance(op, ColorJitter):
        return K.ColorJitter(op.brightness, op.contrast, op.saturation, op.hue, same_on_batch=op.same_on_batch,
                             p=op.p, keepdim=op.keepdim)
    if isinstance(op, RandomGaussianBlur):
        return K.RandomGaussianBlur(op.flags["kernel_size"], op._param_generator.sigma,
                                    border_type=op.flags["border_type"].name.lower(), p=op.p)
    if isinstance(op, Normalize):
        return K.Normalize(mean=op.mean.detach().view(-1).cpu(), std=op.std.detach().view(-1).cpu())
    return op


def build_view_pipeline(spec: ViewSpec, channels: int, mean: Sequence[float], std: Sequence[float],
                        normalize: bool = True) -> nn.Module:
    """A kornia pipeline producing one view of a float batch in [0, 1]: (B, C, H, W) -> (B, C, size, size).

    Colour operations that need RGB (saturation, hue, grayscale) are left out for single-channel inputs. With
    ``normalize=False`` the view stays in [0, 1] (the equivariance branch transforms, then normalises).
    """
    ops: list[nn.Module] = [
        K.RandomResizedCrop((spec.size, spec.size), scale=spec.scale, cropping_mode="resample"),
    ]
    if spec.hflip_prob > 0:
        ops.append(K.RandomHorizontalFlip(p=spec.hflip_prob))
    if spec.jitter_prob > 0:
        b, c, s, h = spec.jitter
        if channels != 3:
            s, h = 0.0, 0.0
        ops.append(ColorJitter(b, c, s, h, p=spec.jitter_prob))
    if spec.grayscale_prob > 0 and channels == 3:
        ops.append(K.RandomGrayscale(p=spec.grayscale_prob))
    if spec.blur_prob > 0:
        k = _blur_kernel(spec.size)
        ops.append(RandomGaussianBlur((k, k), spec.blur_sigma, p=spec.blur_prob))
    if spec.solarize_prob > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize_prob))
    ops += [RandomGroupElement(group) for group in spec.groups]
    if normalize:
        ops.append(Normalize(mean, std))
    return nn.Sequential(*ops)


class RandomGroupElement(nn.Module):
    """A uniformly random element of a transformation group per image (:func:`essl.transforms.transform`, random
    mode): the group as an *invariance* of the views, e.g. the paper's Figure 2 question "rotation as an augmentation"
    (Dangovski et al., ICLR 2022). Acts on images in [0, 1], before normalisation."""

    def __init__(self, group: str):
        super().__init__()
        if group not in transforms.GROUPS:
            raise ValueError(f"unknown transformation group {group!r}; choose from {', '.join(transforms.GROUPS)}")
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        return transforms.transform(x, self.group, mode="random")[0]


class ViewMaker(KeepsFloat32):
    """Makes the invariant views of a uint8 batch, and the equivariance branch's input.

    ``view_pipeline`` is one pipeline used for all ``n_views`` views, or a list with one pipeline per view (the
    asymmetric views of BYOL and of the reference's ImageNet code: blur and solarize probabilities differ between
    the two views). The equivariance branch's input (``eq_pipeline``) is never one of the invariant views: for images
    it is the paper's own rotation view (``RandomResizedCrop(16)`` on CIFAR-10 with the same flip and colour
    operations), for unit cells the raw cell (:class:`LatticeViews` with no or only label-preserving operations). It
    is left un-normalised (images in [0, 1]): the group transformation (:mod:`essl.transforms`, exact labels; colour
    inversion, grayscale and blur act on [0, 1] values) comes first, the normalisation after it.
    """

    def __init__(self, view_pipeline: nn.Module | Sequence[nn.Module], n_views: int = 2,
                 eq_pipeline: nn.Module | None = None):
        super().__init__()
        per_view = list(view_pipeline) if isinstance(view_pipeline, (list, tuple)) else [view_pipeline] * n_views
        self.view_pipelines = nn.ModuleList(per_view)
        self.n_views = len(per_view)
        self.eq_pipeline = eq_pipeline

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        x = to_float(x)  # (B, C, H, W) in [0, 1]
        views = [pipeline(x) for pipeline in self.view_pipelines]
        eq = self.eq_pipeline(x) if self.eq_pipeline is not None else None
        return views, eq


#: Exact lattice symmetries of a periodic unit cell, each applied with one uniformly random element per sample.
LATTICE_OPS: dict[str, str] = {
    "c4v": "one of the 8 symmetries of the square (rotations and mirrors about the cell centre)",
    "flip4": "one of none / horizontal / vertical / both flips (both = the 180-degree rotation)",
    "flip3": "one of none / horizontal / vertical flip (the reference photonics code's three-way flip)",
    "rot4": "one of the 4 quarter turns",
    "shift": "a periodic translation by any whole number of pixels on both axes",
    "halfshift": "one of the 4 half-cell periodic translations",
}


def lattice_augment(x: Tensor, ops: Sequence[str], generator: torch.Generator | None = None) -> Tensor:
    """Apply ``ops`` (names of :data:`LATTICE_OPS`) in order to (B, C, n, n) unit cells, one random element per
    sample and operation; exact pixel permutations (values are never changed, nor clamped)."""
    for op in ops:
        if op == "shift":
            x, _ = transforms.random_shift(x, generator=generator)
        elif op == "halfshift":
            x, _ = transforms.transform(x, "translate", mode="random", grid=2, generator=generator)
        elif op in LATTICE_OPS:
            x, _ = transforms.transform(x, op, mode="random", generator=generator)
        else:
            raise ValueError(f"unknown lattice operation {op!r}; choose from {', '.join(LATTICE_OPS)}")
    return x


class LatticeViews(KeepsFloat32):
    """Invariant views of periodic unit cells (photonic crystals): exact lattice symmetries, no colour ops.

    ``ops`` (names of :data:`LATTICE_OPS`) are applied in order by :func:`lattice_augment`. Permittivity maps are
    physical values: they are never clamped, only normalised at the end (``(ε − mean) / std``, e.g. (ε − 1)/19).
    The reference photonics views (Dangovski et al., ICLR 2022; rdangovs/essl ``photonics/symop_utils.py``) are
    ``[flip3, rot4]`` for blob cells and ``[shift, flip3]`` for level-set cells. With no ``ops`` the view is the
    raw cell, normalised (the input of the reference's equivariance branch).
    """

    def __init__(self, ops: Sequence[str], mean: Sequence[float], std: Sequence[float], normalize: bool = True):
        super().__init__()
        unknown = [op for op in ops if op not in LATTICE_OPS]
        if unknown:
            raise ValueError(f"unknown lattice operations {unknown}; choose from {', '.join(LATTICE_OPS)}")
        self.ops = tuple(ops)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = lattice_augment(x, self.ops)
        return (x - self.mean) / self.std if self.normalize else x
