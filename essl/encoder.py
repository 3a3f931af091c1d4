"""The encoder file: the one contract between pretraining and every evaluator (docs/design.md).

``encoder.pt`` holds ``{"state_dict", "backbone": {"name", "kwargs"}, "feature_dim", "input": {"channels",
"size", "mean", "std"}, "config", "essl_version"}``. It is written atomically (temporary file + rename) and read
with ``torch.load(weights_only=True)``: only tensors and plain containers, no pickled code.

:func:`load_encoder` returns a frozen module in eval mode that takes float inputs in data units ([0, 1] for
images) and normalises them with the file's ``mean``/``std`` itself, so evaluators need nothing else.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import essl
from essl.backbones import build_backbone
from essl.errors import UserError
from essl.io import atomic_torch_save

REQUIRED_KEYS = ("state_dict", "backbone", "feature_dim", "input", "config", "essl_version")


class FrozenEncoder(nn.Module):
    """Normalise, then the backbone: (B, C, H, W) in data units -> (B, feature_dim) features."""

    def __init__(self, backbone: nn.Module, spec: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.feature_dim = int(spec["feature_dim"])
        self.input = dict(spec["input"])
        channels = int(self.input["channels"])
        self.register_buffer("mean", torch.tensor(self.input["mean"], dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(self.input["std"], dtype=torch.float32).view(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone((x - self.mean) / self.std)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def export_encoder(
    path: str | os.PathLike,
    backbone: nn.Module,
    backbone_name: str,
    backbone_kwargs: dict[str, Any],
    feature_dim: int,
    channels: int,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    config: dict[str, Any] | None = None,
) -> Path:
    """Write ``encoder.pt`` atomically. ``config`` must be plain containers (the resolved run config)."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    payload = {
        "state_dict": state,
        "backbone": {"name": backbone_name, "kwargs": dict(backbone_kwargs)},
        "feature_dim": int(feature_dim),
        "input": {"channels": int(channels), "size": int(size), "mean": list(mean), "std": list(std)},
        "config": config or {},
        "essl_version": essl.__version__,
    }
    atomic_torch_save(payload, path)
    return Path(path)


def read_encoder_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate the encoder file; a missing, unreadable or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"encoder file not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError):
        raise UserError(f"{path} is not a readable essl encoder file (not a PyTorch file, or truncated)") from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(payload, dict) or k not in payload]
        raise UserError(f"{path} is not an essl encoder file (missing {', '.join(missing)})")
    return payload


def _build(payload: dict[str, Any], path: str | os.PathLike) -> nn.Module:
    spec = payload["backbone"]
    backbone, feature_dim = build_backbone(spec["name"], int(payload["input"]["channels"]), **spec["kwargs"])
    if feature_dim != int(payload["feature_dim"]):
        raise UserError(f"{path}: feature_dim {payload['feature_dim']} does not match backbone {spec['name']!r}")
    return backbone


def load_encoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FrozenEncoder:
    """Load ``encoder.pt`` -> a frozen :class:`FrozenEncoder` in eval mode."""
    payload = read_encoder_file(path, map_location)
    backbone = _build(payload, path)
    try:
        backbone.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit backbone {payload['backbone']['name']!r}: "
                        f"{str(err).splitlines()[0]}") from None
    spec = {k: v for k, v in payload.items() if k != "state_dict"}
    return _freeze(FrozenEncoder(backbone, spec))


def random_encoder_like(encoder: FrozenEncoder, seed: int) -> FrozenEncoder:
    """The same architecture and input handling, randomly initialised (the random-init probe baseline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _build(encoder.spec | {"state_dict": None}, "random init")
    return _freeze(FrozenEncoder(backbone, encoder.spec))
