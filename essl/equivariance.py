"""The E-SSL equivariance branch (Dangovski et al., "Equivariant Contrastive Learning", ICLR 2022).

Any SSL method gets the same branch: a transformation group with exact labels (:mod:`essl.transforms`), a
prediction head on the backbone features and a weight λ. The total loss is ``ssl_loss + λ · CE``. The head is
the reference code's: Linear → norm → ReLU → Linear → norm → ReLU → Linear to the number of group elements, with
LayerNorm in the CIFAR-10 code (512 → 2048 → 2048 → 4) and BatchNorm in the photonics code (1024 → 512 → 512 → 4;
rdangovs/essl ``photonics/phc_models.py``, ``Classifier`` with ``bnorm=True``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from essl import transforms

HEAD_NORMS = {"layernorm": nn.LayerNorm, "batchnorm": nn.BatchNorm1d}


def equivariance_head(feature_dim: int, hidden_dim: int, n_classes: int, norm: str = "layernorm",
                      last_relu: bool = True, bottleneck_dim: int | None = None) -> nn.Sequential:
    """The reference code's prediction head: Linear → norm → ReLU → Linear → norm → ReLU (without this second ReLU
    when ``last_relu`` is false), optionally a bottleneck Linear → norm of width ``bottleneck_dim``, then Linear to
    the group's elements. The reference's heads: CIFAR-10 E-SimCLR 512 → 2048 → 2048 → 4 with LayerNorm (E-SimSiam:
    no second ReLU); ImageNet E-SimSiam / E-Barlow Twins 2048 → 2048 → 2048 → 256 → 4 with LayerNorm; photonics
    1024 → 512 → 512 → 4 with BatchNorm."""
    layer = HEAD_NORMS[norm]
    layers: list[nn.Module] = [nn.Linear(feature_dim, hidden_dim), layer(hidden_dim), nn.ReLU(inplace=True),
                               nn.Linear(hidden_dim, hidden_dim), layer(hidden_dim)]
    if last_relu:
        layers.append(nn.ReLU(inplace=True))
    width = hidden_dim
    if bottleneck_dim:
        layers += [nn.Linear(hidden_dim, bottleneck_dim), layer(bottleneck_dim)]
        width = bottleneck_dim
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


class EquivarianceBranch(nn.Module):
    """Predict which group element was applied: ``(loss, accuracy)`` from a transformed batch and its labels."""

    def __init__(
        self,
        group: str,
        feature_dim: int,
        weight: float,
        hidden_dim: int = 2048,
        mode: str = "all",
        grid: int = 2,
        norm: str = "layernorm",
        last_relu: bool = True,
        bottleneck_dim: int | None = None,
    ):
        super().__init__()
        self.group, self.mode, self.grid, self.weight = group, mode, grid, weight
        self.head = equivariance_head(feature_dim, hidden_dim, transforms.group_size(group, grid), norm, last_relu,
                                      bottleneck_dim)

    def make_batch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, h, w) -> (x_t, labels): (G·B or B, C, h, w) and int64 labels, exact."""
        return transforms.transform(x, self.group, self.mode, self.grid)

    def loss(self, backbone: nn.Module, x_t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.head(backbone(x_t))  # (G·B, G)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return loss, acc
