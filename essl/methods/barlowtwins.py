"""Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021).

The cross-correlation matrix of the two views' batch-standardised projections is pushed to the identity: on-diagonal
terms to 1 (invariance), off-diagonal terms to 0 with weight ``lambda_offdiag`` (redundancy reduction). Defaults are
the E-SSL reference's ImageNet E-Barlow Twins (Dangovski et al., ICLR 2022; rdangovs/essl
``imagenet/barlowtwins/main.py``): projector 8192-8192-8192 (lightly's ``BarlowTwinsProjectionHead``), off-diagonal
weight 0.0051; the loss is lightly's ``BarlowTwinsLoss`` (cross-correlation summed over DDP ranks with
``gather_distributed``). Its optimiser (LARS, biases and norm layers excluded, their learning rate 0.0048/0.2 of the
weights') lives in the config (``optim.*``), not here.
"""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import Tensor, nn


class BarlowTwins(nn.Module):
    """Barlow Twins (Zbontar et al. 2021): the views' cross-correlation matrix pushed to the identity."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        hidden_dim: int = 8192,
        output_dim: int = 8192,
        lambda_offdiag: float = 0.0051,
        separate_passes: bool = True,
        gather_distributed: bool = False,
    ):
        super().__init__()
        del backbone  # the LightningModule owns it
        if not lambda_offdiag >= 0:
            raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
        self.projection = BarlowTwinsProjectionHead(feature_dim, hidden_dim, output_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_offdiag, gather_distributed=gather_distributed)
        self.separate_passes = separate_passes

    def loss(self, backbone: nn.Module, views: list[Tensor], step: int = 0, max_steps: int = 1) -> Tensor:
        if len(views) != 2:
            raise ValueError(f"Barlow Twins takes 2 views, got {len(views)}")
        if self.separate_passes:
            z0, z1 = (self.projection(backbone(v)) for v in views)
        else:
            z0, z1 = self.projection(backbone(torch.cat(views))).chunk(2)
        return self.criterion(z0, z1)
