"""SSL methods: one small file each, composed with a backbone (not inherited).

A method is an ``nn.Module`` with ``loss(backbone, views, step, max_steps) -> Tensor``: it owns its heads
(and, for BYOL, the momentum encoder) and reads features from the shared backbone. E-SSL's equivariance
branch (:mod:`essl.equivariance`) is added beside any method by the LightningModule.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from essl.errors import UserError
from essl.methods.byol import BYOL
from essl.methods.simclr import SimCLR

METHODS: dict[str, Callable[..., nn.Module]] = {
    "simclr": SimCLR,
    "byol": BYOL,
}


def build_method(name: str, backbone: nn.Module, feature_dim: int, **kwargs) -> nn.Module:
    """Build SSL method ``name`` around ``backbone`` (kwargs: the method's own hyper-parameters)."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](backbone=backbone, feature_dim=feature_dim, **kwargs)


__all__ = ["BYOL", "METHODS", "SimCLR", "build_method"]
