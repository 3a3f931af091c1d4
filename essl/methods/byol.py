"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020).

An online network (backbone → projection → prediction) regresses the projection of the other view computed
by a target network (momentum copies of backbone and projection, no gradients). The target follows the online
weights by an exponential moving average whose momentum rises from ``momentum_base`` to 1 on a cosine
schedule. Heads, loss and EMA update are lightly's (``BYOLProjectionHead``, ``BYOLPredictionHead``,
``NegativeCosineSimilarity``, ``update_momentum``, ``cosine_schedule``); the loss is symmetrised over views.
``separate_passes=True`` sends the two views through the networks one after the other (BatchNorm statistics per
view); the default sends them as one batch.
"""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020): an online network regresses a momentum target network's projection."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        hidden_dim: int = 4096,
        output_dim: int = 256,
        momentum_base: float = 0.99,
        momentum_end: float = 1.0,
        separate_passes: bool = False,
    ):
        super().__init__()
        if not 0.0 <= momentum_base <= momentum_end <= 1.0:
            raise ValueError(f"momenta must satisfy 0 <= momentum_base <= momentum_end <= 1, got "
                             f"{momentum_base}, {momentum_end}")
        self.separate_passes = separate_passes
        self.projection = BYOLProjectionHead(feature_dim, hidden_dim, output_dim)
        self.prediction = BYOLPredictionHead(output_dim, hidden_dim, output_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projection = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection)
        self.momentum_base = momentum_base
        self.momentum_end = momentum_end
        self.criterion = NegativeCosineSimilarity()

    def momentum(self, step: int, max_steps: int) -> float:
        return cosine_schedule(step, max_steps, self.momentum_base, self.momentum_end)

    @torch.no_grad()
    def update_target(self, backbone: nn.Module, step: int, max_steps: int) -> float:
        """EMA step of the target network: θ_t ← m θ_t + (1 − m) θ_online. Returns m."""
        m = self.momentum(step, max_steps)
        update_momentum(backbone, self.target_backbone, m)
        update_momentum(self.projection, self.target_projection, m)
        return m

    def loss(self, backbone: nn.Module, views: list[Tensor], step: int = 0, max_steps: int = 1) -> Tensor:
        """Update the target (EMA), then the symmetrised negative cosine similarity of the two views."""
        if len(views) != 2:
            raise ValueError(f"BYOL takes 2 views, got {len(views)}")
        self.update_target(backbone, step, max_steps)
        batches = views if self.separate_passes else [torch.cat(views)]  # 2 × (B, C, H, W) or (2B, C, H, W)
        p = torch.cat([self.prediction(self.projection(backbone(x))) for x in batches])  # (2B, output_dim)
        with torch.no_grad():
            t = torch.cat([self.target_projection(self.target_backbone(x)) for x in batches])
        p0, p1 = p.chunk(2)
        t0, t1 = t.chunk(2)
        return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
