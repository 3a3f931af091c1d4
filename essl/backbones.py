"""Backbones: ``build_backbone(name, in_channels, **kwargs) -> (module, feature_dim)``.

Every backbone maps (B, C, H, W) float images to (B, feature_dim) features (the representation that the
linear probe and the equivariance head read).

* ``resnet18_cifar`` — ResNet-18 (He et al., 2016) with the CIFAR stem used by SimCLR and E-SSL on CIFAR-10
  (Chen et al., 2020, appendix B.9; Dangovski et al., 2022): a 3×3 stride-1 first convolution and no max-pool.
* ``resnet50`` — ResNet-50 with the ImageNet stem, the backbone of the paper's ImageNet experiments.
* ``phc_cnn`` — the photonics CNN of the E-SSL paper (see :func:`phc_cnn`), with a width multiplier.
* ``small_cnn`` — four 3×3 conv/BN/ReLU blocks with stride-2 down-sampling and global average pooling; a few
  hundred thousand parameters at width 32, for CPU-sized runs (digits, tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from essl.errors import UserError

RESNET18_FEATURES = 512
RESNET50_FEATURES = 2048


def resnet18_cifar(in_channels: int = 3) -> tuple[nn.Module, int]:
    """ResNet-18 with the CIFAR stem (3×3 stride-1 first convolution, no max-pool): 512-d features."""
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, RESNET18_FEATURES


def resnet50(in_channels: int = 3, zero_init_residual: bool = True) -> tuple[nn.Module, int]:
    """ResNet-50 with the ImageNet stem (He et al., 2016): 2048-d features, the paper's ImageNet backbone.

    The last BatchNorm of each block is zero-initialised as in the reference ImageNet code (rdangovs/essl
    imagenet/*). Random initialisation, no download."""
    net = torchvision.models.resnet50(weights=None, zero_init_residual=zero_init_residual)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net, RESNET50_FEATURES


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def small_cnn(in_channels: int = 3, width: int = 32) -> tuple[nn.Module, int]:
    """Four 3x3 conv/BN/ReLU blocks and global average pooling, 4·width features (CPU-sized runs, tests).

    conv(w) -> conv(2w, /2) -> conv(4w, /2) -> conv(4w, /2) -> global average pool."""
    net = nn.Sequential(
        _conv_block(in_channels, width, 1),
        _conv_block(width, 2 * width, 2),
        _conv_block(2 * width, 4 * width, 2),
        _conv_block(4 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return net, 4 * width


PHC_CHANNELS = (64, 256, 256)  # Dangovski et al. 2022, photonics encoder (after Loh et al. 2022)
PHC_POOLS = (2, 4, 4)
PHC_KERNEL = 7
PHC_FEATURES = 1024


def phc_cnn(in_channels: int = 1, width: float = 1.0, input_size: int = 32,
            fc_batchnorm: bool = False) -> tuple[nn.Module, int]:
    """The photonics encoder of the E-SSL paper (1024-d at width 1; unit cells of 32x32 pixels).

    Three 7×7 conv/BN/ReLU blocks with max-pools 2/4/4, then a fully connected part Linear → ReLU → Linear to
    1024 (the last layer's output is the representation), as the reference ``Encoder`` (rdangovs/essl
    ``photonics/phc_models.py``; its convolutions carry a bias, which the BatchNorm after them cancels, so ours
    have none). ``width`` multiplies every channel count and the hidden size
    (e.g. 0.25 for CPU-sized runs); ``fc_batchnorm=True`` adds a BatchNorm1d after the first linear layer (essl
    before 0.2). Needs ``input_size``×``input_size`` inputs of at least 32×32."""
    chans = [max(1, round(c * width)) for c in PHC_CHANNELS]
    hidden = max(1, round(PHC_FEATURES * width))
    layers: list[nn.Module] = []
    cin = in_channels
    for cout, pool in zip(chans, PHC_POOLS, strict=True):
        layers += [nn.Conv2d(cin, cout, PHC_KERNEL, padding=PHC_KERNEL // 2, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True), nn.MaxPool2d(pool)]
        cin = cout
    side = input_size
    for pool in PHC_POOLS:
        side //= pool
    if side < 1:
        raise UserError(f"phc_cnn needs inputs of at least {2 * 4 * 4}x{2 * 4 * 4} pixels, got input_size={input_size}")
    norm = [nn.BatchNorm1d(hidden)] if fc_batchnorm else []
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, hidden), *norm,
                        nn.ReLU(inplace=True), nn.Linear(hidden, hidden))
    return net, hidden


BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet50": resnet50,
    "small_cnn": small_cnn,
    "phc_cnn": phc_cnn,
}


def register_backbone(name: str, factory: Callable[..., tuple[nn.Module, int]]) -> None:
    """Add a backbone factory ``factory(in_channels, **kwargs) -> (module, feature_dim)``."""
    BACKBONES[name] = factory


def describe_backbone(name: str) -> str:
    """One line: the first line of the factory's docstring."""
    import inspect

    return (inspect.getdoc(BACKBONES[name]) or name).splitlines()[0]


def build_backbone(name: str, in_channels: int = 3, **kwargs) -> tuple[nn.Module, int]:
    """Build backbone ``name`` for ``in_channels`` input channels. Unknown names raise UserError."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    try:
        return BACKBONES[name](in_channels=in_channels, **kwargs)
    except TypeError as err:
        raise UserError(f"backbone {name!r}: bad arguments {kwargs}: {err}") from None


def check_input_size(backbone: nn.Module, channels: int, size: int) -> None:
    """Run one tiny forward pass: a size the backbone cannot take is a UserError naming the size."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, channels, size, size))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"image size {size}x{size} ({channels} channels; data.image_size or equivariance.crop_size) "
                        f"is too small for this backbone: {first}") from None
    finally:
        backbone.train(was_training)
