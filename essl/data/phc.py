"""Photonic-crystal HDF5 files as a Lightning DataModule (pretraining and DOS regression).

The file layout is the one written by ``essl phc generate`` (``essl.photonics.dataset``): ``eps`` (N, n, n)
relative permittivity maps and, in labelled files, ``target`` (N, 400) -- the benchmark's DOS label with the
empty lattice subtracted (Dangovski et al., "Equivariant Contrastive Learning", ICLR 2022; Loh et al.,
"Surrogate- and invariance-boosted contrastive learning for data-scarce applications in science", 2022).
essl core does not import ``essl.photonics``; this module reads the file with h5py only.

Batches are ``(x, y)`` tuples:

* ``x``: (B, 1, n, n) float32, the normalised map (ε − EPS_MIN) / EPS_SPAN, i.e. ε ∈ [1, 20] -> [0, 1];
* ``y``: (B, 400) float32 target with ``with_target=True`` (regression), else a dummy (B,) int64 zero
  label (pretraining: the SSL method ignores it).

Datasets are small (10⁴ maps of 32×32 floats = 40 MB), so the file is read into memory once.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from essl.errors import UserError

EPS_MIN = 1.0
EPS_SPAN = 19.0
"""Model-input normalisation (ε − EPS_MIN) / EPS_SPAN maps the dataset range ε ∈ [1, 20] onto [0, 1]."""

TARGET_POINTS = 400
"""Length of the regression target: the first 400 of the 500 DOS points (benchmark convention)."""

EPS_TOLERANCE = 1e-6
"""Permittivities below EPS_MIN − EPS_TOLERANCE mean the file holds already-normalised maps."""


def normalize_eps(eps: torch.Tensor) -> torch.Tensor:
    """(ε − EPS_MIN) / EPS_SPAN: physical permittivity -> model input (no clamping)."""
    return (eps - EPS_MIN) / EPS_SPAN


def load_phc(path: str | os.PathLike, *, with_target: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate ``eps`` (and ``target``) from a photonic-crystal HDF5 file.

    Returns:
        eps (N, n, n) float32 and target (N, 400) float32 (None unless ``with_target``).

    Raises:
        UserError: one line naming the file and the problem (missing file or dataset, not HDF5, wrong
            shape, NaN/inf, values below ε = 1, an unfinished file).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path}: not an HDF5 file")
    keys = ("eps", "target") if with_target else ("eps",)
    with h5py.File(path, "r") as f:
        arrays = {}
        for key in keys:
            if key not in f:
                hint = " (an unlabelled file? generate it with --labels)" if key == "target" else ""
                raise UserError(f"{path}: missing dataset {key!r}{hint}")
            if not isinstance(f[key], h5py.Dataset) or f[key].dtype.kind != "f":
                raise UserError(f"{path}: {key!r} is not a floating-point dataset")
            arrays[key] = f[key][()].astype(np.float32, copy=False)
        completed = f.attrs.get("completed")
    eps = arrays["eps"]
    if eps.ndim != 3 or eps.shape[1] != eps.shape[2] or eps.shape[0] == 0:
        raise UserError(f"{path}: dataset 'eps' has shape {eps.shape}, expected (N, n, n) with N >= 1")
    n = len(eps)
    target = arrays.get("target")
    if target is not None and target.shape != (n, TARGET_POINTS):
        raise UserError(f"{path}: dataset 'target' has shape {target.shape}, expected ({n}, {TARGET_POINTS})")
    for key, value in arrays.items():
        bad = ~np.isfinite(value.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise UserError(
                f"{path}: dataset {key!r} has NaN/inf in {int(bad.sum())} of {n} structures "
                f"(first: index {int(np.argmax(bad))})"
            )
    if eps.min() < EPS_MIN - EPS_TOLERANCE:
        raise UserError(
            f"{path}: dataset 'eps' has values below {EPS_MIN} (min {eps.min():.3g}); "
            "expected relative permittivities, not normalised maps"
        )
    if completed is not None and int(completed) != n:
        raise UserError(f"{path}: incomplete file ({int(completed)} of {n} structures written)")
    return eps, target


class PhCDataModule(L.LightningDataModule):
    """Photonic-crystal maps from an HDF5 file, split into train / validation with a seeded permutation.

    Args:
        path: HDF5 file written by ``essl phc generate``.
        batch_size: batch size of both loaders.
        with_target: yield the (B, 400) DOS target (regression) instead of a dummy label (pretraining).
        val_fraction: fraction of the structures held out for validation (0: no validation loader batches).
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest).
        seed: seed of the split permutation and of the training shuffle.
        n_labels: keep only the first ``n_labels`` structures of the (permuted) training split -- the
            data-scarce regime of the benchmark; None keeps them all.
        drop_last: drop the last incomplete training batch (validation never drops).

    Attributes (after construction): ``eps`` (N, n, n), ``target`` (N, 400) or None, ``train_indices``,
    ``val_indices`` (int64 tensors into the file's rows), ``input_shape`` (1, n, n).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        *,
        with_target: bool = False,
        val_fraction: float = 0.0,
        num_workers: int = 0,
        seed: int = 0,
        n_labels: int | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if int(batch_size) != batch_size or batch_size < 1:
            raise UserError(f"batch_size={batch_size!r}: must be an integer >= 1")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction={val_fraction!r}: must lie in [0, 1)")
        self.batch_size = int(batch_size)
        self.with_target = with_target
        self.num_workers = num_workers
        self.seed = seed
        self.drop_last = drop_last

        eps, target = load_phc(self.path, with_target=with_target)
        self.eps = torch.from_numpy(eps)
        self.target = None if target is None else torch.from_numpy(target)
        n = len(eps)
        self.input_shape = (1, *eps.shape[1:])

        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n_val == 0:
            n_val = 1
        if n_val >= n:
            raise UserError(f"{self.path}: val_fraction={val_fraction} leaves no training structures (N={n})")
        self.val_indices, self.train_indices = perm[:n_val], perm[n_val:]
        if n_labels is not None:
            if int(n_labels) != n_labels or not 1 <= n_labels <= len(self.train_indices):
                raise UserError(
                    f"{self.path}: n_labels={n_labels!r} must lie in [1, {len(self.train_indices)}] "
                    "(the training split)"
                )
            self.train_indices = self.train_indices[: int(n_labels)]
        if drop_last and len(self.train_indices) < self.batch_size:
            raise UserError(
                f"{self.path}: batch_size={self.batch_size} exceeds the {len(self.train_indices)} training "
                "structures (drop_last would leave no batch)"
            )
        self._train = self._subset(self.train_indices)
        self._val = self._subset(self.val_indices)

    def _subset(self, indices: torch.Tensor) -> TensorDataset:
        x = normalize_eps(self.eps[indices]).unsqueeze(1)  # (M, 1, n, n)
        y = self.target[indices] if self.with_target else torch.zeros(len(indices), dtype=torch.long)
        return TensorDataset(x, y)

    def _loader(self, dataset: TensorDataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The held-out split; an empty list (Lightning skips validation) when ``val_fraction`` is 0."""
        return self._loader(self._val, train=False) if len(self._val) else []
