"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020).

Two views of each image go through the backbone in one pass and a 2-layer MLP projection head; the NT-Xent
(InfoNCE) loss treats the other view of the same image as the positive and the other 2B − 2 projections as
negatives. Heads and loss are lightly's (``SimCLRProjectionHead``, ``NTXentLoss``); with
``gather_distributed=True`` the negatives are gathered from every DDP rank.
"""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn


class SimCLR(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        temperature: float = 0.5,
        gather_distributed: bool = False,
    ):
        super().__init__()
        del backbone  # SimCLR keeps no copy of the backbone: the LightningModule owns it
        self.projection = SimCLRProjectionHead(feature_dim, hidden_dim, output_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def loss(self, backbone: nn.Module, views: list[Tensor], step: int = 0, max_steps: int = 1) -> Tensor:
        """NT-Xent between the two views; both pass the backbone in one batch (shared BatchNorm statistics)."""
        if len(views) != 2:
            raise ValueError(f"SimCLR takes 2 views, got {len(views)}")
        z = self.projection(backbone(torch.cat(views)))  # (2B, output_dim)
        z0, z1 = z.chunk(2)
        return self.criterion(z0, z1)
