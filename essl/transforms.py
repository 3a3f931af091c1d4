"""Exact group transformations that return labels (the E-SSL prediction targets).

Dangovski et al., "Equivariant Contrastive Learning" (ICLR 2022), predict *which* element of a small group
was applied to an input: the four-fold rotation for images (Gidaris et al., 2018), the four flips, or one of
the ``nt × nt`` periodic translations of a photonic-crystal unit cell (half-cell shifts for ``nt = 2``).

Every transformation here is a pixel permutation, so it is exact: applying the inverse of the labelled
element to the output gives back the input bit for bit. Rotations and flips use ``torch.rot90`` and
``torch.flip`` (never an interpolating rotation); translations are integer ``torch.roll``-type shifts.

Two modes:

* ``"all"``: every image in every group element, as in the paper (a ``G·B`` batch, element-major: the
  first ``B`` rows are element 0, the next ``B`` element 1, ...). Labels are ``arange(G).repeat_interleave(B)``.
* ``"random"``: one uniformly drawn element per image (a ``B`` batch).

Both are vectorised: the ``"all"`` mode applies each of the ``G`` elements to the whole batch, the
``"random"`` mode gathers pixels through a per-sample source-index map (no per-sample Python loop), on the
input's device.

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
  (``torch.roll(x, (i·H/nt, j·W/nt), dims=(-2, -1))``); ``H`` and ``W`` must be divisible by ``nt``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GROUPS = ("rot4", "flip4", "hflip", "vflip", "c4v", "translate")
"""Groups an equivariance head can predict."""
ELEMENT_SETS = (*GROUPS, "flip3")
"""Everything :func:`transform` can apply at random: the groups and the reference's three-way flip."""
MODES = ("all", "random")


def group_size(group: str, grid: int = 2) -> int:
    """Number of elements (= classes of the equivariance head) of ``group``."""
    if group in ("rot4", "flip4"):
        return 4
    if group == "flip3":
        return 3
    if group in ("hflip", "vflip"):
        return 2
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
    raise ValueError(f"unknown transformation group {group!r}; choose one of {', '.join(ELEMENT_SETS)}")


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
    table = _source_index(group, h, w, grid, x.device)  # (G, H·W)
    return gather_pixels(x, table[labels.to(x.device)])


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
# Every operation above is an affine map of the pixel grid. In centred coordinates u = 2·index − (n − 1) (odd
# integers, one per pixel centre) a rotation or mirror about the image centre is u -> R·u with R in C4v, and a
# periodic shift by s pixels is u -> u + 2s (mod 2n). An element is the pair (R, t): u -> R·u + t (mod 2n);
# composition is (R1, t1)∘(R2, t2) = (R1·R2, R1·t2 + t1). The representation is exact for square n×n inputs,
# and tests check it against the pixel operations themselves.

Affine = tuple[tuple[int, int, int, int], tuple[int, int]]  # ((r00, r01, r10, r11), (t0, t1)) mod 2n

_IDENTITY_R = (1, 0, 0, 1)
_ROT90_R = (0, -1, 1, 0)  # torch.rot90(x, 1, dims=(-2, -1)): (row, col) -> (-col, row) in centred coordinates
_FLIP_W_R = (1, 0, 0, -1)  # x.flip(-1)
_FLIP_H_R = (-1, 0, 0, 1)  # x.flip(-2)


def _mat_mul(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int, int]:
    return (a[0] * b[0] + a[1] * b[2], a[0] * b[1] + a[1] * b[3], a[2] * b[0] + a[3] * b[2], a[2] * b[1] + a[3] * b[3])


def compose(first: Affine, second: Affine, n: int) -> Affine:
    """The element "apply ``first``, then ``second``" on an n×n grid."""
    (r2, t2), (r1, t1) = first, second
    t = (r1[0] * t2[0] + r1[1] * t2[1] + t1[0], r1[2] * t2[0] + r1[3] * t2[1] + t1[1])
    return _mat_mul(r1, r2), (t[0] % (2 * n), t[1] % (2 * n))


def _rotation(k: int) -> tuple[int, int, int, int]:
    r = _IDENTITY_R
    for _ in range(k % 4):
        r = _mat_mul(_ROT90_R, r)
    return r


def element_maps(name: str, n: int, grid: int = 2) -> list[Affine]:
    """The elements of ``name`` as affine maps of an n×n grid, in label order.

    ``name``: a group of :data:`GROUPS`, ``flip3``, or the invariance operations ``shift`` (every periodic shift
    by whole pixels) and ``halfshift`` (the 4 half-cell shifts).
    """
    zero = (0, 0)
    if name == "rot4":
        return [(_rotation(k), zero) for k in range(4)]
    if name in ("flip4", "flip3"):
        flips = [_IDENTITY_R, _FLIP_W_R, _FLIP_H_R, _mat_mul(_FLIP_H_R, _FLIP_W_R)]
        return [(r, zero) for r in flips[: group_size(name)]]
    if name in ("hflip", "vflip"):
        return [(_IDENTITY_R, zero), (_FLIP_W_R if name == "hflip" else _FLIP_H_R, zero)]
    if name == "c4v":
        rots = [_rotation(k) for k in range(4)]
        return [(r, zero) for r in rots] + [(_mat_mul(_FLIP_W_R, r), zero) for r in rots]
    if name in ("translate", "halfshift", "shift"):
        steps = {"translate": grid, "halfshift": 2, "shift": n}[name]
        if n % steps:
            raise ValueError(f"{name} needs a grid size divisible by {steps}, got {n}")
        d = n // steps
        shifts = [(2 * i * d) % (2 * n) for i in range(steps)]
        return [(_IDENTITY_R, (ti, tj)) for ti in shifts for tj in shifts]
    raise ValueError(f"unknown transformation {name!r}")


def merged_elements(group: str, before: list[list[Affine]], n: int, grid: int = 2) -> list[tuple[int, int]]:
    """Pairs of labels (g, g') of ``group`` that random operations applied *before* it make indistinguishable.

    ``before`` lists element sets applied in order (each one random element). Labels g and g' merge when some
    draws a, a' give the same overall operation, g∘a = g'∘a': then the same image arises from both labels and no
    classifier can separate them on any data (e.g. ``flip4`` holds the 180° rotation, so before ``rot4`` it merges
    g and g + 2 and caps the accuracy at 50%). An empty list means every element stays identifiable.
    """
    combined: set[Affine] = {(_IDENTITY_R, (0, 0))}
    for elements in before:
        combined = {compose(a, b, n) for a in combined for b in elements}
    images = [{compose(a, g, n) for a in combined} for g in element_maps(group, n, grid)]
    return [(i, j) for i in range(len(images)) for j in range(i + 1, len(images)) if images[i] & images[j]]
