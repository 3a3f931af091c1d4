"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020).

Two views of each image go through the backbone and an MLP projection head, and an InfoNCE loss treats the other
view of the same image as the positive. Two choices of negatives (``negatives``):

* ``"all"`` — NT-Xent, the usual SimCLR loss: every other projection of the batch, 2B − 2 negatives per anchor
  (lightly's ``NTXentLoss``);
* ``"cross_view"`` — the loss of the E-SSL reference CIFAR-10 code (Dangovski et al., ICLR 2022; rdangovs/essl
  ``cifar10/main.py``, ``info_nce_loss``): logits z₁·z₂ᵀ/T, so an anchor's negatives are only the *other view's*
  B − 1 samples; symmetrised, ½·(ℓ(z₁, z₂) + ℓ(z₂, z₁)).

The projection head is lightly's ``ProjectionHead``: ``projector_layers`` linear layers with BatchNorm and ReLU
between them and a last layer followed by ``projector_final_norm``: ``"bn"`` (lightly's ``SimCLRProjectionHead``),
``"bn_noaffine"`` (a BatchNorm without learned scale and shift, as the reference CIFAR-10 projector) or ``"none"``
(the reference photonics projector). ``separate_passes=True`` sends the two views through the backbone one after
the other, as the reference code does, so that BatchNorm statistics are computed per view; the default sends them
in one batch (shared statistics). With ``gather_distributed=True`` the negatives come from every DDP rank.

``"all"`` uses :class:`NTXent`, lightly's ``NTXentLoss`` with the same logits, whose self-similarity mask is an
index built once per shape: lightly's boolean-mask selection (and its backward) reads the mask's size back from the
device at every step, and its distributed mask is built on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import ProjectionHead
from lightly.utils import dist
from torch import Tensor, nn

NEGATIVES = ("all", "cross_view")
FINAL_NORMS = ("bn", "bn_noaffine", "none")


class NTXent(NTXentLoss):
    """lightly's ``NTXentLoss`` (Chen et al. 2020, eq. 1; no memory bank), computed without host syncs.

    The logits are lightly's, block by block (views 0 and 1 of this rank's ``b`` samples against the keys of every
    rank), and the same-view blocks drop each anchor's similarity with itself, which sits at column ``rank·b + i``
    of row ``i``. lightly drops it with a boolean mask (``logits[~mask]``), which on a GPU waits for the device to
    count the mask; here the kept entries are gathered with an integer index built once per (b, number of keys,
    rank, device) and cached: the same entries in the same order, so the same loss and gradients.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False):
        super().__init__(temperature=temperature, gather_distributed=gather_distributed)
        self._keep: dict[tuple[int, int, int, torch.device], Tensor] = {}

    def _keep_index(self, b: int, n_keys: int, rank: int, device: torch.device) -> Tensor:
        """(b · (n_keys − 1),) flat indices of the (b, n_keys) block without the entries (i, rank·b + i)."""
        key = (b, n_keys, rank, device)
        if key not in self._keep:
            cols = torch.arange(n_keys - 1, device=device).expand(b, -1)  # (b, n_keys − 1)
            own = (torch.arange(b, device=device) + rank * b)[:, None]  # the column to skip in each row
            cols = cols + (cols >= own).long()  # skip it: later columns shift by one
            rows = torch.arange(b, device=device)[:, None] * n_keys
            self._keep[key] = (rows + cols).reshape(-1)
        return self._keep[key]

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        b = out0.shape[0]
        z0, z1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        rank = 0
        k0, k1 = z0, z1
        if self.gather_distributed and dist.world_size() > 1:
            rank = dist.rank()
            k0, k1 = torch.cat(dist.gather(z0)), torch.cat(dist.gather(z1))  # (world·b, D), with gradients
        keep = self._keep_index(b, k0.shape[0], rank, z0.device)

        def block(q: Tensor, k: Tensor) -> Tensor:  # (b, world·b) similarities / T
            return torch.einsum("nc,mc->nm", q, k) / self.temperature

        # lightly's order of operations (00, 01, 10, 11), so that autograd sums the gradients in the same order
        s00, s01, s10, s11 = block(z0, k0), block(z0, k1), block(z1, k0), block(z1, k1)
        s00 = s00.reshape(-1)[keep].view(b, -1)  # (b, world·b − 1): without each anchor's own similarity
        s11 = s11.reshape(-1)[keep].view(b, -1)
        # (2b, 2·world·b − 1): the positive of row i (and of row b + i) sits at column rank·b + i
        logits = torch.cat([torch.cat([s01, s00], dim=1), torch.cat([s10, s11], dim=1)], dim=0)
        labels = (torch.arange(b, device=z0.device) + rank * b).repeat(2)
        return self.cross_entropy(logits, labels)


def projection_mlp(input_dim: int, hidden_dim: int, output_dim: int, layers: int = 2,
                   final_norm: str = "bn") -> ProjectionHead:
    """Linear → BN → ReLU (``layers`` − 1 times), then Linear → ``final_norm``; biases only where no BN follows."""
    if layers < 1:
        raise ValueError(f"projector_layers must be >= 1, got {layers}")
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"projector_final_norm {final_norm!r} is not one of {', '.join(FINAL_NORMS)}")
    blocks = []
    width = input_dim
    for _ in range(layers - 1):
        blocks.append((width, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()))
        width = hidden_dim
    last = {"bn": nn.BatchNorm1d(output_dim), "bn_noaffine": nn.BatchNorm1d(output_dim, affine=False),
            "none": None}[final_norm]
    blocks.append((width, output_dim, last, None))
    return ProjectionHead(blocks)


class CrossViewInfoNCE(nn.Module):
    """Symmetrised InfoNCE with the other view's samples as the only negatives (rdangovs/essl, CIFAR-10).

    ℓ(a, b) = CE(â·b̂ᵀ / T, arange(B)) with â, b̂ the L2-normalised projections; the loss is ½·(ℓ(z₁, z₂) +
    ℓ(z₂, z₁)). Under DDP with ``gather_distributed`` the keys b̂ are gathered from every rank (with gradients).
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def _one_way(self, queries: Tensor, keys: Tensor) -> Tensor:
        q = F.normalize(queries, dim=1)  # (B, D)
        k = F.normalize(keys, dim=1)
        offset = 0
        if self.gather_distributed and dist.world_size() > 1:
            offset = dist.rank() * len(k)
            k = torch.cat(dist.gather(k))  # (world·B, D)
        logits = q @ k.T / self.temperature  # (B, world·B)
        labels = torch.arange(len(q), device=q.device) + offset
        return F.cross_entropy(logits, labels)

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        return 0.5 * (self._one_way(z0, z1) + self._one_way(z1, z0))


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020): InfoNCE between two views; all or cross-view negatives."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        temperature: float = 0.5,
        negatives: str = "all",
        projector_layers: int = 2,
        projector_final_norm: str = "bn",
        separate_passes: bool = False,
        gather_distributed: bool = False,
    ):
        super().__init__()
        del backbone  # SimCLR keeps no copy of the backbone: the LightningModule owns it
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives {negatives!r} is not one of {', '.join(NEGATIVES)}")
        self.projection = projection_mlp(feature_dim, hidden_dim, output_dim, projector_layers, projector_final_norm)
        if negatives == "all":
            self.criterion: nn.Module = NTXent(temperature=temperature, gather_distributed=gather_distributed)
        else:
            self.criterion = CrossViewInfoNCE(temperature=temperature, gather_distributed=gather_distributed)
        self.separate_passes = separate_passes

    def loss(self, backbone: nn.Module, views: list[Tensor], step: int = 0, max_steps: int = 1) -> Tensor:
        """The InfoNCE loss between the two views' projections."""
        if len(views) != 2:
            raise ValueError(f"SimCLR takes 2 views, got {len(views)}")
        if self.separate_passes:  # BatchNorm statistics per view (reference code)
            z0, z1 = (self.projection(backbone(v)) for v in views)
        else:
            z0, z1 = self.projection(backbone(torch.cat(views))).chunk(2)  # (B, output_dim) each
        return self.criterion(z0, z1)
