"""VICReg (Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022).

Three terms on the two views' projections: invariance (mean squared distance, weight ``invariance``), variance (a
hinge keeping every dimension's standard deviation above 1 over the batch, weight ``variance``) and covariance
(off-diagonal covariances pushed to 0, weight ``covariance``). Defaults are the VICReg paper's: coefficients 25 / 25
/ 1 and an 8192-8192-8192 expander (lightly's ``VICRegProjectionHead``); the loss is lightly's ``VICRegLoss``. VICReg
is not in the E-SSL paper: essl adds it as one more method that any equivariance branch can join.

The covariance term is computed by :func:`covariance_term`: lightly's selects the off-diagonal covariances with a
boolean mask, which on a GPU reads the mask's size back from the device at every step (and again in backward).
"""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.loss.vicreg_loss import invariance_loss, variance_loss
from lightly.models.modules.heads import VICRegProjectionHead
from lightly.utils.dist import gather
from torch import Tensor, nn


def covariance_term(x: Tensor) -> Tensor:
    """VICReg's covariance term (Bardes et al. 2022, eq. 4): the squared off-diagonal entries of the batch covariance
    matrix of x (N, D), summed and divided by D. The off-diagonal entries are read as a strided view of the
    flattened matrix (the D − 1 entries after each diagonal one), in the row-major order of lightly's mask."""
    x = x - x.mean(dim=0)
    n, d = x.shape
    cov = torch.einsum("bc,bd->cd", x, x) / (n - 1)  # (D, D)
    off_diagonal = cov.reshape(-1)[1:].view(d - 1, d + 1)[:, :-1]  # (D − 1, D): row r holds the entries after (r, r)
    return off_diagonal.pow(2).sum() / d


class SyncFreeVICRegLoss(VICRegLoss):
    """lightly's ``VICRegLoss`` (its invariance and variance terms, gathered over DDP ranks as lightly does) with the
    covariance term of :func:`covariance_term`: λ·invariance + μ·variance + ν·covariance (Bardes et al. 2022, eq. 6)."""

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        if z_a.shape != z_b.shape or z_a.ndim != 2 or z_a.shape[0] < 2:
            raise ValueError(f"VICReg needs two (N, D) batches with N > 1, got {tuple(z_a.shape)}, {tuple(z_b.shape)}")
        invariance = invariance_loss(x=z_a, y=z_b)
        if self.gather_distributed and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            z_a, z_b = torch.cat(gather(z_a)), torch.cat(gather(z_b))
        variance = 0.5 * (variance_loss(x=z_a, eps=self.eps) + variance_loss(x=z_b, eps=self.eps))
        covariance = covariance_term(z_a) + covariance_term(z_b)
        return self.lambda_param * invariance + self.mu_param * variance + self.nu_param * covariance


class VICReg(nn.Module):
    """VICReg (Bardes et al. 2022): variance, invariance and covariance terms on the two views' embeddings."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        hidden_dim: int = 8192,
        output_dim: int = 8192,
        projector_layers: int = 3,
        invariance: float = 25.0,
        variance: float = 25.0,
        covariance: float = 1.0,
        separate_passes: bool = True,
        gather_distributed: bool = False,
    ):
        super().__init__()
        del backbone  # the LightningModule owns it
        if min(invariance, variance, covariance) < 0:
            raise ValueError("the VICReg coefficients must be >= 0")
        self.projection = VICRegProjectionHead(feature_dim, hidden_dim, output_dim, projector_layers)
        self.criterion = SyncFreeVICRegLoss(lambda_param=invariance, mu_param=variance, nu_param=covariance,
                                    gather_distributed=gather_distributed)
        self.separate_passes = separate_passes

    def loss(self, backbone: nn.Module, views: list[Tensor], step: int = 0, max_steps: int = 1) -> Tensor:
        if len(views) != 2:
            raise ValueError(f"VICReg takes 2 views, got {len(views)}")
        if self.separate_passes:
            z0, z1 = (self.projection(backbone(v)) for v in views)
        else:
            z0, z1 = self.projection(backbone(torch.cat(views))).chunk(2)
        return self.criterion(z0, z1)
