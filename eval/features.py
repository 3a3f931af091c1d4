"""Run a frozen encoder once over a dataset and keep its features.

Linear-probe and kNN evaluation of self-supervised representations (Dangovski et al., "Equivariant
Contrastive Learning", ICLR 2022; Wu et al., InstDisc, CVPR 2018) fit a classifier on *frozen* features.
We extract them once, without augmentation, and reuse them for every seed and every classifier.

Images arrive as uint8 (N, C, H, W) tensors, as ``essl.data.load_labelled`` returns them; each batch is moved
to the device and scaled to float [0, 1] there. Normalisation with the encoder file's mean/std happens inside
the module returned by ``essl.load_encoder``, so nothing else is done to the pixels here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from essl.runtime import default_device

#: Images per forward pass.
DEFAULT_BATCH_SIZE = 256

#: Largest uint8 pixel value: uint8 images are divided by it to land in [0, 1].
UINT8_MAX = 255.0


def extract_features(
    encoder: nn.Module,
    x: Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Tensor:
    """Features of every image in ``x`` under the frozen ``encoder``, in order.

    Args:
        encoder: maps float (B, C, H, W) images in [0, 1] to (B, D) features. It is moved to ``device``
            (``nn.Module.to`` is in place) and run in eval mode; its previous train/eval mode is restored.
        x: (N, C, H, W) images: uint8 (scaled by 1/255) or floating point already in [0, 1].
        batch_size: images per forward pass.
        device: where the encoder runs; default :func:`default_device`.
        progress: show a tqdm progress bar.

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
