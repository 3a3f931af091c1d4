"""Exact group transformations that return labels (the E-SSL prediction targets).

Dangovski et al., "Equivariant Contrastive Learning" (ICLR 2022), predict *which* element of a small set of
transformations was applied to an input: the four-fold rotation for images (Gidaris et al., 2018), flips, or one of
the ``nt × nt`` periodic translations of a photonic-crystal unit cell (half-cell shifts for ``nt = 2``); their
Figure 2 asks, for each transformation of a list, whether predicting it (equivariance) or making the representation
invariant to it helps.

Two kinds of transformations:

* **pixel permutations** (rotations, flips, translations, the 2×2 jigsaw): exact, so applying the inverse of the
  labelled element to the output gives back the input bit for bit. Rotations and flips use ``torch.rot90`` and
  ``torch.flip`` (never an interpolating rotation); translations are integer ``torch.roll``-type shifts;
* **photometric** ones (colour inversion, grayscale, blur): not invertible, but deterministic given the label, and
  applied to images in [0, 1] *before* normalisation (the equivariance branch normalises after transforming).

Two modes:

* ``"all"``: every image in every group element, as in the paper (a ``G·B`` batch, element-major: the
  first ``B`` rows are element 0, the next ``B`` element 1, ...). Labels are ``arange(G).repeat_interleave(B)``.
* ``"random"``: one uniformly drawn element per image (a ``B`` batch).

Both are vectorised: the ``"all"`` mode applies each of the ``G`` elements to the whole batch, the ``"random"``
mode gathers pixels through a per-sample source-index map (permutations) or selects per sample among the ``G``
outputs (photometric), with no per-sample Python loop, on the input's device.

Label conventions (``g`` is the label):

* ``rot4``: ``torch.rot90(x, g, dims=(-2, -1))`` (counter-clockwise quarter turns), square inputs only;
* ``hflip``, ``vflip``: 0 none, 1 flip W (horizontal) / flip H (vertical);
* ``flip4``: 0 none, 1 horizontal (flip W), 2 vertical (flip H), 3 both (= rotation by 180°);
* ``flip3``: the first three elements of ``flip4`` (none, horizontal, vertical). Not a group (the product of the
  two flips is missing): the three-way flip of the reference photonics code (rdangovs/essl,
  ``photonics/symop_utils.py``), used as a random invariance operation, never predicted;
* ``c4v``: the 8 symmetries of the square, ``g = 4·f + k``: rotate by ``k`` quarter turns, then flip
  horizontally if ``f = 1``; square inputs only;
* ``translate``: ``g = i·nt + j`` shifts rows by ``i·H/nt`` and columns by ``j·W/nt`` periodically
  (``torch.roll(x, (i·H/nt, j·W/nt), dims=(-2, -1))``); ``H`` and ``W`` must be divisible by ``nt``;
* ``jigsaw``: the image cut into 2×2 tiles; ``g`` indexes the 24 permutations π of the tiles in
  ``itertools.permutations(range(4))`` order, tiles numbered row-major; output tile ``t`` is input tile ``π[t]``;
  ``H`` and ``W`` must be even;
* ``invert``: 0 none, 1 colour inversion ``1 − x``;
* ``grayscale``: 0 none, 1 the luma ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, kornia's ``rgb_to_grayscale``) in
  every channel; 3-channel inputs only;
* ``blur``: 0 none, then Gaussian blurs with kernel sizes :data:`BLUR_KERNELS` and σ = 0.3·((k − 1)/2 − 1) + 0.8
  (the usual σ of a k-tap kernel), reflect padding (kornia's ``gaussian_blur2d``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

GROUP_INFO: dict[str, str] = {
    "rot4": "four-fold rotation, 4 elements (Gidaris et al. 2018; the paper's main E-SSL task)",
    "hflip": "horizontal flip, 2 elements",
    "vflip": "vertical flip, 2 elements",
    "flip4": "none / horizontal / vertical / both flips, 4 elements",
    "c4v": "the 8 symmetries of the square",
    "translate": "periodic shifts on an nt x nt grid (equivariance.grid; half-cell shifts for nt = 2)",
    "jigsaw": "the 24 orders of the 2x2 tiles of the image",
    "invert": "colour inversion 1 - x, 2 elements (images in [0, 1])",
    "grayscale": "BT.601 luma in every channel, 2 elements (colour images)",
    "blur": "none or a Gaussian blur of kernel 3, 5 or 7, 4 elements",
}
"""The registry of transformation sets an equivariance head can predict (the paper's Figure 2 set plus flip4, c4v,
translate), with a one-line description each (``essl list groups``)."""
PHOTOMETRIC_GROUPS = ("invert", "grayscale", "blur")
"""Deterministic but not invertible: applied to images in [0, 1] before normalisation."""
PERMUTATION_GROUPS = tuple(g for g in GROUP_INFO if g not in PHOTOMETRIC_GROUPS)
"""Exact pixel permutations: undone bit for bit by :func:`inverse_labels`."""
GROUPS = tuple(GROUP_INFO)
JIGSAW_PERMUTATIONS = tuple(itertools.permutations(range(4)))
"""The 24 orders of the 2×2 tiles, in label order."""
BLUR_KERNELS = (3, 5, 7)
"""Kernel sizes of the three blur levels after "none"."""
LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (kornia's rgb_to_grayscale)."""
ELEMENT_SETS = (*GROUPS, "flip3")
"""Everything :func:`transform` can apply at random: the groups and the reference's three-way flip."""
MODES = ("all", "random")


def group_size(group: str, grid: int = 2) -> int:
    """Number of elements (= classes of the equivariance head) of ``group``."""
    if group in ("rot4", "flip4"):
        return 4
    if group == "flip3":
        return 3
    if group in ("hflip", "vflip", "invert", "grayscale"):
        return 2
    if group == "jigsaw":
        return len(JIGSAW_PERMUTATIONS)
    if group == "blur":
        return 1 + len(BLUR_KERNELS)
    if group == "c4v":
        return 8
    if group == "translate":
        return grid * grid
    raise ValueError(f"unknown transformation group {group!r}; choose one of {', '.join(ELEMENT_SETS)}")


def _element_ops(group: str, height: int, width: int, grid: int) -> list[Callable[[Tensor], Tensor]]:
    """The group's elements as exact tensor ops on (..., H, W), in label order."""
    dims = (-2, -1)
    if group in ("rot4", "c4v") and height != width:
        raise ValueError(f"{group} needs square inputs, got {height}x{width}")
    if group == "rot4":
        return [lambda x, k=k: torch.rot90(x, k, dims=dims) for k in range(4)]
    if group in ("flip4", "flip3"):
        flips = [lambda x: x, lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.flip(dims)]
        return flips[: group_size(group)]
    if group in ("hflip", "vflip"):
        return [lambda x: x, lambda x, d=-1 if group == "hflip" else -2: x.flip(d)]
    if group == "c4v":
        rots = [lambda x, k=k: torch.rot90(x, k, dims=dims) for k in range(4)]
        return rots + [lambda x, r=r: r(x).flip(-1) for r in rots]
    if group == "translate":
        if height % grid or width % grid:
            raise ValueError(f"translate with grid {grid} needs H and W divisible by it, got {height}x{width}")
        dh, dw = height // grid, width // grid
        return [
            lambda x, i=i, j=j: torch.roll(x, (i * dh, j * dw), dims=dims) for i in range(grid) for j in range(grid)
        ]
    if group == "jigsaw":
        if height % 2 or width % 2:
            raise ValueError(f"jigsaw needs even H and W, got {height}x{width}")
        return [lambda x, perm=perm: _jigsaw(x, perm) for perm in JIGSAW_PERMUTATIONS]
    if group == "invert":
        return [lambda x: x, lambda x: 1.0 - x]
    if group == "grayscale":
        return [lambda x: x, _grayscale]
    if group == "blur":
        return [lambda x: x] + [lambda x, k=k: _blur(x, k) for k in BLUR_KERNELS]
    raise ValueError(f"unknown transformation group {group!r}; choose one of {', '.join(ELEMENT_SETS)}")


def _jigsaw(x: Tensor, perm: tuple[int, ...]) -> Tensor:
    """Output tile t (row-major in the 2×2 grid) is input tile perm[t]."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    tiles = [x[..., r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(2) for c in range(2)]
    top = torch.cat([tiles[perm[0]], tiles[perm[1]]], dim=-1)
    bottom = torch.cat([tiles[perm[2]], tiles[perm[3]]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def _grayscale(x: Tensor) -> Tensor:
    from kornia.color import rgb_to_grayscale

    if x.shape[-3] != 3:
        raise ValueError(f"grayscale needs 3-channel images, got {x.shape[-3]} channels")
    return rgb_to_grayscale(x).expand_as(x).contiguous()


def blur_sigma(kernel: int) -> float:
    """σ of a Gaussian with ``kernel`` taps: 0.3·((k − 1)/2 − 1) + 0.8."""
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8


def _blur(x: Tensor, kernel: int) -> Tensor:
    from kornia.filters import gaussian_blur2d

    s = blur_sigma(kernel)
    return gaussian_blur2d(x, (kernel, kernel), (s, s), border_type="reflect")


def _source_index(group: str, height: int, width: int, grid: int, device: torch.device) -> Tensor:
    """(G, H·W) int64: output pixel p of element g reads input pixel ``index[g, p]``.

    Built by applying each exact op to an image of pixel indices, so it is right by construction.
    """
    pixels = torch.arange(height * width, device=device).view(height, width)
    ops = _element_ops(group, height, width, grid)
    return torch.stack([op(pixels).reshape(-1) for op in ops])


def gather_pixels(x: Tensor, index: Tensor) -> Tensor:
    """Per-sample pixel permutation: ``out[b, c].flat[p] = x[b, c].flat[index[b, p]]``.

    x: (B, C, H, W); index: (B, H·W) int64 on x's device.
    """
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    return flat.gather(2, index[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


def apply(x: Tensor, group: str, labels: Tensor, grid: int = 2) -> Tensor:
    """Apply element ``labels[b]`` of ``group`` to image ``x[b]`` (x: (B, C, H, W), labels: (B,) int)."""
    h, w = x.shape[-2:]
    labels = labels.to(x.device)
    if group in PHOTOMETRIC_GROUPS:  # every element on the whole batch, then one per sample (G is 2-4)
        outs = torch.stack([op(x) for op in _element_ops(group, h, w, grid)])  # (G, B, C, H, W)
        return outs.gather(0, labels.view(1, -1, 1, 1, 1).expand(1, *x.shape))[0]
    table = _source_index(group, h, w, grid, x.device)  # (G, H·W)
    return gather_pixels(x, table[labels])


def inverse_labels(group: str, labels: Tensor, grid: int = 2) -> Tensor:
    """Labels of the inverse elements: ``apply(apply(x, g), inverse_labels(g)) == x``."""
    if group == "rot4":
        return (-labels) % 4
    if group in ("flip4", "flip3", "hflip", "vflip"):
        return labels.clone()  # every flip is its own inverse
    if group == "c4v":
        k, f = labels % 4, labels // 4
        # a reflection composed with a rotation is an involution; pure rotations invert to -k
        return torch.where(f == 1, labels, (-k) % 4)
    if group == "translate":
        i, j = labels // grid, labels % grid
        return ((-i) % grid) * grid + (-j) % grid
    if group == "jigsaw":
        inverse = [JIGSAW_PERMUTATIONS.index(tuple(sorted(range(4), key=p.__getitem__))) for p in JIGSAW_PERMUTATIONS]
        return torch.tensor(inverse, device=labels.device)[labels]
    if group in PHOTOMETRIC_GROUPS:
        raise ValueError(f"{group} is not invertible")
    raise ValueError(f"unknown transformation group {group!r}; choose one of {', '.join(ELEMENT_SETS)}")


def transform(
    x: Tensor,
    group: str,
    mode: str = "all",
    grid: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Transform a batch and return ``(x_t, labels)``.

    x: (B, C, H, W). ``mode="all"`` returns a (G·B, C, H, W) batch, element-major; ``mode="random"`` a
    (B, C, H, W) batch with one uniformly drawn element per image. Labels are int64 on x's device.
    """
    b = x.shape[0]
    g = group_size(group, grid)
    h, w = x.shape[-2:]
    if mode == "all":
        ops = _element_ops(group, h, w, grid)
        x_t = torch.cat([op(x) for op in ops])  # (G·B, C, H, W)
        labels = torch.arange(g, device=x.device).repeat_interleave(b)
        return x_t, labels
    if mode == "random":
        labels = torch.randint(g, (b,), device=x.device, generator=generator)
        return apply(x, group, labels, grid), labels
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def random_shift(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Periodic translation of each image by a uniformly random whole number of pixels.

    The invariant augmentation of a periodic unit cell (any lattice translation leaves the crystal unchanged).
    Returns ``(x_shifted, shifts)`` with shifts (B, 2) = (rows, cols): ``x_shifted[b] ==
    torch.roll(x[b], tuple(shifts[b]), dims=(-2, -1))``.
    """
    b, _, h, w = x.shape
    shifts = torch.stack(
        [
            torch.randint(h, (b,), device=x.device, generator=generator),
            torch.randint(w, (b,), device=x.device, generator=generator),
        ],
        dim=1,
    )
    rows = (torch.arange(h, device=x.device)[None, :] - shifts[:, :1]) % h  # (B, H)
    cols = (torch.arange(w, device=x.device)[None, :] - shifts[:, 1:]) % w  # (B, W)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, h * w)
    return gather_pixels(x, index), shifts


# ---- element algebra: which predicted elements does an invariance operation make indistinguishable? -------
#
# Every pixel operation is a permutation of the n×n grid: an element is the tuple ``source`` with output pixel p
# reading input pixel source[p]. "Apply a, then b" is the permutation p -> a[b[p]]. The permutations are built from
# the tensor operations themselves, on an image of pixel indices.

Permutation = tuple[int, ...]


def compose(first: Permutation, second: Permutation) -> Permutation:
    """The element "apply ``first``, then ``second``"."""
    return tuple(first[i] for i in second)


def element_permutations(name: str, n: int, grid: int = 2) -> list[Permutation]:
    """The elements of ``name`` as permutations of an n×n grid, in label order.

    ``name``: a pixel-permutation group of :data:`PERMUTATION_GROUPS`, ``flip3``, or the invariance operations
    ``shift`` (every periodic shift by whole pixels) and ``halfshift`` (the 4 half-cell shifts).
    """
    pixels = torch.arange(n * n).view(n, n)
    if name == "shift":
        ops = [lambda x, i=i, j=j: torch.roll(x, (i, j), dims=(-2, -1)) for i in range(n) for j in range(n)]
    elif name == "halfshift":
        ops = _element_ops("translate", n, n, 2)
    elif name in (*PERMUTATION_GROUPS, "flip3"):
        ops = _element_ops(name, n, n, grid)
    else:
        raise ValueError(f"{name!r} is not a pixel permutation")
    return [tuple(op(pixels).reshape(-1).tolist()) for op in ops]


def merged_elements(group: str, before: list[list[Permutation]], n: int, grid: int = 2) -> list[tuple[int, int]]:
    """Pairs of labels (g, g') of ``group`` that random operations applied *before* it make indistinguishable.

    ``before`` lists element sets applied in order (each one random element). Labels g and g' merge when some
    draws a, a' give the same overall operation, g∘a = g'∘a': then the same image arises from both labels and no
    classifier can separate them on any data (e.g. ``flip4`` holds the 180° rotation, so before ``rot4`` it merges
    g and g + 2 and caps the accuracy at 50%). An empty list means every element stays identifiable.
    """
    combined: set[Permutation] = {tuple(range(n * n))}
    for elements in before:
        combined = {compose(a, b) for a in combined for b in elements}
    images = [{compose(a, g) for a in combined} for g in element_permutations(group, n, grid)]
    return [(i, j) for i in range(len(images)) for j in range(i + 1, len(images)) if images[i] & images[j]]
