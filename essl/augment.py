"""View augmentations, run batched on the device after the batch transfer (kornia).

The data loaders only decode images to uint8 tensors; everything stochastic happens here, on whole batches on
the accelerator, in ``LightningModule.on_after_batch_transfer``. The recipe follows SimCLR (Chen et al.,
2020) / BYOL (Grill et al., 2020) and the E-SSL reference code (Dangovski et al., ICLR 2022): random resized
crop, horizontal flip, colour jitter applied with a probability, random grayscale, Gaussian blur, solarize,
then normalisation. The equivariance view uses the same colour operations with its own (smaller) crop.

kornia notes (docs/design.md): ``cropping_mode="resample"`` crops the whole batch in one call (the default crops
sample by sample); ``ColorJitter`` follows torchvision's formulas (``ColorJiggle`` does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
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
        ops.append(K.ColorJitter(b, c, s, h, p=spec.jitter_prob))
    if spec.grayscale_prob > 0 and channels == 3:
        ops.append(K.RandomGrayscale(p=spec.grayscale_prob))
    if spec.blur_prob > 0:
        k = _blur_kernel(spec.size)
        ops.append(K.RandomGaussianBlur((k, k), spec.blur_sigma, p=spec.blur_prob))
    if spec.solarize_prob > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize_prob))
    ops += [RandomGroupElement(group) for group in spec.groups]
    if normalize:
        ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
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


class ViewMaker(nn.Module):
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


class LatticeViews(nn.Module):
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
