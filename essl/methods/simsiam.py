"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021).

Each view's projection goes through a predictor, which regresses the *other* view's projection under a
stop-gradient; the loss is the symmetrised negative cosine similarity, ½·(D(p₁, sg z₂) + D(p₂, sg z₁)). Defaults are
the E-SSL reference's CIFAR-10 E-SimSiam (Dangovski et al., ICLR 2022; rdangovs/essl ``cifar10/main.py``): projector
Linear(feature_dim, 2048, no bias) → BN → ReLU → Linear(2048, 2048, no bias) → BN without affine, predictor
2048 → 512 → 2048 (lightly's ``SimSiamPredictionHead``), and the predictor trained at a constant learning rate
(its own optimiser in the reference, which the cosine schedule never touches: ``fixed_lr_parameters``). The loss is
lightly's ``NegativeCosineSimilarity``. ``separate_passes=True`` sends each view through the backbone on its own, as
the reference does.
"""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead
from torch import Tensor, nn

from essl.methods.simclr import projection_mlp


class SimSiam(nn.Module):
    """SimSiam (Chen & He 2021): predict the other view's projection, stop-gradient, no negatives."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        hidden_dim: int = 2048,
        output_dim: int = 2048,
        predictor_dim: int = 512,
        projector_layers: int = 2,
        fixed_predictor_lr: bool = True,
        separate_passes: bool = True,
    ):
        super().__init__()
        del backbone  # the LightningModule owns it
        self.projection = projection_mlp(feature_dim, hidden_dim, output_dim, projector_layers, "bn_noaffine")
        self.prediction = SimSiamPredictionHead(output_dim, predictor_dim, output_dim)
        self.criterion = NegativeCosineSimilarity()
        self.fixed_predictor_lr = fixed_predictor_lr
        self.separate_passes = separate_passes

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters kept at the peak learning rate (the reference's predictor optimiser has no schedule)."""
        return list(self.prediction.parameters()) if self.fixed_predictor_lr else []

    def loss(self, backbone: nn.Module, views: list[Tensor], step: int = 0, max_steps: int = 1) -> Tensor:
        if len(views) != 2:
            raise ValueError(f"SimSiam takes 2 views, got {len(views)}")
        if self.separate_passes:
            z0, z1 = (self.projection(backbone(v)) for v in views)
        else:
            z0, z1 = self.projection(backbone(torch.cat(views))).chunk(2)
        p0, p1 = self.prediction(z0), self.prediction(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
