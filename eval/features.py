"""Run a frozen encoder once over a dataset and keep its features.

Linear-probe and kNN evaluation of self-supervised representations (Dangovski et al., "Equivariant
Contrastive Learning", ICLR 2022; Wu et al., InstDisc, CVPR 2018) fit a classifier on *frozen* features.
We extract them once, without augmentation, and reuse them for every seed and every classifier.

Images arrive as uint8 (N, C, H, W) tensors, as ``essl.data.load_labelled`` returns them; each batch is moved
to the device and scaled to float [0, 1] there. Normalisation with the encoder file's mean/std happens inside
the module returned by ``essl.load_encoder``, so nothing else is done to the pixels here, unless a ``transform``
is given (the paper protocol's test-time resize + centre crop, :func:`resize_center_crop`).

**Batched bicubic resampling.** The linear-probe protocol of the paper's code (rdangovs/essl, ``cifar10/main.py``,
``eval_loop``) resizes PIL images with torchvision's ``RandomResizedCrop(32, interpolation=BICUBIC)`` (train) and
``Resize(36, BICUBIC)`` + ``CenterCrop(32)`` (test). :func:`resized_crop` and :func:`resize_center_crop` do the
same to a whole batch on the device with one pair of per-image matrices (rows (B, H', H), columns (B, W', W)):
row o of a matrix holds PIL's bicubic weights (Keys' cubic with a = :data:`BICUBIC_A`; pixel edges map to
edges, i.e. align_corners=False; the kernel widened by the scale factor when downsampling, as with
``antialias=True``; taps outside the crop window dropped and the rest renormalised), so any crop box and any
output size are one batched matmul per axis. uint8 images are resampled like PIL and torchvision's uint8 path:
the horizontal pass first, rounded (half up) and clamped to [0, 255], then the vertical pass, rounded and
clamped again.
``tests/eval/test_features.py`` and ``tests/eval/test_linear_probe.py`` compare both functions with torchvision's
per-image transforms (and PIL's): equal in float, within 2 grey levels (over 99% identical) in uint8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from essl.runtime import default_device

#: Images per forward pass.
DEFAULT_BATCH_SIZE = 256

#: Largest uint8 pixel value: uint8 images are divided by it to land in [0, 1].
UINT8_MAX = 255.0

#: Keys' cubic-convolution coefficient of PIL's bicubic filter, which torchvision applies to PIL images (the
#: paper's pipeline) and which torch's ``interpolate(mode="bicubic", antialias=True)`` copies (Pillow's
#: ``libImaging/Resample.c``). Plain ``mode="bicubic"``, ``grid_sample`` and hence kornia use -0.75.
BICUBIC_A = -0.5
#: Half-width of the bicubic kernel in input pixels (multiplied by the scale factor when downsampling).
BICUBIC_SUPPORT = 2.0


def _bicubic(t: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = :data:`BICUBIC_A`, zero beyond :data:`BICUBIC_SUPPORT`."""
    a, t = BICUBIC_A, t.abs()
    inner = ((a + 2) * t - (a + 3)) * t * t + 1  # |t| < 1
    outer = (((t - 5) * t + 8) * t - 4) * a  # 1 <= |t| < 2
    return torch.where(t < 1, inner, torch.where(t < BICUBIC_SUPPORT, outer, torch.zeros_like(t)))


def resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int,
                     device: str | torch.device | None = None) -> Tensor:
    """Per-image bicubic resampling matrices along one axis: (B, out_size, in_size) float32.

    Row o of image b maps the window ``[start[b], start[b] + length[b])`` of an axis of ``in_size`` pixels to
    output pixel o as PIL's bicubic resize does (and torchvision's with ``antialias=True``): the output pixel's
    centre in window coordinates is c = (o + 0.5)·s with s = length / out_size; window pixel k gets weight
    cubic((k + 0.5 − c) / max(s, 1)); weights outside the window are 0 and each row is normalised to sum 1.

    Args:
        start, length: (B,) integer-valued tensors (any dtype): first pixel and number of pixels of each window.
        in_size: pixels along the axis of the input images.
        out_size: pixels along the axis of the output.
        device: where the matrices are built; default ``start``'s device. The windows are checked where they
            are (keep them on the CPU to avoid a device synchronisation).
    """
    if bool(((start < 0) | (length < 1) | (start + length > in_size)).any()):
        raise ValueError(f"crop windows must lie inside the {in_size} pixels of the axis")
    device = start.device if device is None else torch.device(device)
    start = start.to(device=device, dtype=torch.float32).view(-1, 1, 1)
    length = length.to(device=device, dtype=torch.float32).view(-1, 1, 1)
    scale = length / out_size  # (B, 1, 1)
    centre = (torch.arange(out_size, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5) * scale
    k = torch.arange(in_size, device=device, dtype=torch.float32).view(1, 1, -1) - start  # window coordinates
    weights = _bicubic((k + 0.5 - centre) / scale.clamp(min=1.0)) * ((k >= 0) & (k < length))
    return weights / weights.sum(dim=-1, keepdim=True)  # (B, out_size, in_size)


def resample(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Apply row (B, H', H) and column (B, W', W) matrices to (B, C, H, W) images -> float (B, C, H', W').

    B may be 1 in the matrices (the same resampling for every image). uint8 images are resampled as PIL and
    torchvision's uint8 path do: horizontal pass, round half up and clamp to [0, 255], vertical pass, round and
    clamp; the result is scaled to [0, 1]. Floating-point images (data units) take one exact pass, no rounding.
    """
    cols_t = cols.transpose(1, 2)[:, None]  # (B, 1, W, W')
    rows = rows[:, None]  # (B, 1, H', H)
    if x.dtype == torch.uint8:
        horizontal = _round_to_uint8(x.float() @ cols_t)
        return _round_to_uint8(rows @ horizontal).div_(UINT8_MAX)
    return rows @ (x.float() @ cols_t)


def _round_to_uint8(x: Tensor) -> Tensor:
    """Round half up and clamp to [0, 255], as PIL's and torch's fixed-point uint8 resampling do (add half, shift;
    ``torch.round`` rounds half to even, which differs on the many exact .5 values of upsampled flat regions)."""
    return x.add_(0.5).floor_().clamp_(0, UINT8_MAX)


def resized_crop(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, size: int,
                 flip: Tensor | None = None) -> Tensor:
    """Batched torchvision ``resized_crop(img, top, left, height, width, [size, size], BICUBIC, antialias=True)``.

    Image b is cropped to rows ``[top[b], top[b] + height[b])`` and columns ``[left[b], left[b] + width[b])``
    and resized to ``size`` × ``size`` (:func:`resample`); where ``flip[b]`` is True it is then flipped
    horizontally (the column matrix is reversed, so the flip is exact and free). Returns float (B, C, size,
    size) on ``x``'s device, in [0, 1] for uint8 ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
    rows = resample_weights(top, height, x.shape[-2], size, device=x.device)
    cols = resample_weights(left, width, x.shape[-1], size, device=x.device)
    if flip is not None:
        cols = torch.where(flip.to(x.device).view(-1, 1, 1), cols.flip(1), cols)
    return resample(x, rows, cols)


def resized_shape(height: int, width: int, resize: int) -> tuple[int, int]:
    """(H', W') of torchvision's ``Resize(resize)`` for an int size: the shorter side becomes ``resize``, the
    longer one ``int(resize · long / short)``."""
    if width <= height:
        return int(resize * height / width), resize
    return resize, int(resize * width / height)


def resize_center_crop(x: Tensor, resize: int, crop: int) -> Tensor:
    """Batched torchvision ``Resize(resize, BICUBIC, antialias=True)`` then ``CenterCrop(crop)``.

    The shorter side is resized to ``resize`` (:func:`resized_shape`); the crop starts at
    ``int(round((H' − crop) / 2))`` as in torchvision's ``center_crop``. Returns float (B, C, crop, crop) on
    ``x``'s device, in [0, 1] for uint8 ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    new_h, new_w = resized_shape(height, width, resize)
    if crop > min(new_h, new_w):
        raise ValueError(f"centre crop {crop} is larger than the resized image ({new_h}x{new_w})")
    top, left = int(round((new_h - crop) / 2)), int(round((new_w - crop) / 2))
    zero = torch.zeros(1)
    rows = resample_weights(zero, torch.full((1,), height), height, new_h, device=x.device)[:, top:top + crop]
    cols = resample_weights(zero, torch.full((1,), width), width, new_w, device=x.device)[:, left:left + crop]
    return resample(x, rows, cols)


def extract_features(
    encoder: nn.Module,
    x: Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    progress: bool = True,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Features of every image in ``x`` under the frozen ``encoder``, in order.

    Args:
        encoder: maps float (B, C, H, W) images in [0, 1] to (B, D) features. It is moved to ``device``
            (``nn.Module.to`` is in place) and run in eval mode; its previous train/eval mode is restored.
        x: (N, C, H, W) images: uint8 (scaled by 1/255) or floating point already in [0, 1].
        batch_size: images per forward pass.
        device: where the encoder runs; default :func:`default_device`.
        progress: show a tqdm progress bar.
        transform: applied on the device to each batch as stored (uint8 or float) instead of the scaling to
            [0, 1]; it must return float images in data units, e.g. ``functools.partial(resize_center_crop,
            resize=36, crop=32)``.

    Returns:
        (N, D) float32 features on the CPU.
    """
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {x.dtype}")
    device = torch.device(device) if device is not None else default_device()

    was_training = encoder.training
    encoder.to(device).eval()
    chunks = []
    try:
        with torch.inference_mode():
            starts = range(0, x.shape[0], batch_size)
            for start in tqdm(starts, desc="features", unit="batch", disable=not progress, leave=False):
                batch = x[start:start + batch_size].to(device, non_blocking=True)  # (B, C, H, W)
                if transform is not None:
                    batch = transform(batch)
                else:
                    batch = batch.float() / UINT8_MAX if batch.dtype == torch.uint8 else batch.float()
                out = encoder(batch)  # (B, D)
                if out.ndim != 2 or out.shape[0] != batch.shape[0]:
                    raise ValueError(
                        f"encoder must return (B, D) features, got {tuple(out.shape)} for a batch of "
                        f"{batch.shape[0]}"
                    )
                chunks.append(out.float().cpu())
    finally:
        encoder.train(was_training)
    if not chunks:
        raise ValueError("no images to extract features from (N = 0)")
    return torch.cat(chunks)
