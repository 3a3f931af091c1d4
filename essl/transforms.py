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
* ``flip4``: 0 none, 1 horizontal (flip W), 2 vertical (flip H), 3 both (= rotation by 180°);
* ``c4v``: the 8 symmetries of the square, ``g = 4·f + k``: rotate by ``k`` quarter turns, then flip
  horizontally if ``f = 1``; square inputs only;
* ``translate``: ``g = i·nt + j`` shifts rows by ``i·H/nt`` and columns by ``j·W/nt`` periodically
  (``torch.roll(x, (i·H/nt, j·W/nt), dims=(-2, -1))``); ``H`` and ``W`` must be divisible by ``nt``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GROUPS = ("rot4", "flip4", "c4v", "translate")
MODES = ("all", "random")


def group_size(group: str, grid: int = 2) -> int:
    """Number of elements (= classes of the equivariance head) of ``group``."""
    if group in ("rot4", "flip4"):
        return 4
    if group == "c4v":
        return 8
    if group == "translate":
        return grid * grid
    raise ValueError(f"unknown transformation group {group!r}; choose one of {', '.join(GROUPS)}")


def _element_ops(group: str, height: int, width: int, grid: int) -> list[Callable[[Tensor], Tensor]]:
    """The group's elements as exact tensor ops on (..., H, W), in label order."""
    dims = (-2, -1)
    if group in ("rot4", "c4v") and height != width:
        raise ValueError(f"{group} needs square inputs, got {height}x{width}")
    if group == "rot4":
        return [lambda x, k=k: torch.rot90(x, k, dims=dims) for k in range(4)]
    if group == "flip4":
        return [lambda x: x, lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.flip(dims)]
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
    raise ValueError(f"unknown transformation group {group!r}; choose one of {', '.join(GROUPS)}")


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
    if group == "flip4":
        return labels.clone()  # every flip is its own inverse
    if group == "c4v":
        k, f = labels % 4, labels // 4
        # a reflection composed with a rotation is an involution; pure rotations invert to -k
        return torch.where(f == 1, labels, (-k) % 4)
    if group == "translate":
        i, j = labels // grid, labels % grid
        return ((-i) % grid) * grid + (-j) % grid
    raise ValueError(f"unknown transformation group {group!r}; choose one of {', '.join(GROUPS)}")


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
