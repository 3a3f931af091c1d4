"""The pretraining DataModule over in-memory uint8 images (no per-sample augmentation on the CPU)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from essl.data.images import LabelledData


class ImageDataModule(L.LightningDataModule):
    """Train loader: shuffled uint8 batches (B, C, H, W) with ``drop_last`` (equal per-rank batches for a
    gathered NT-Xent). Validation loaders (only with ``knn_monitor``): 0 = labelled train set (kNN memory
    bank), 1 = test set, both un-augmented."""

    def __init__(self, data: LabelledData, batch_size: int, num_workers: int = 0, knn_monitor: bool = False):
        super().__init__()
        self.data, self.batch_size, self.num_workers, self.knn_monitor = data, batch_size, num_workers, knn_monitor

    def _loader(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> DataLoader:
        return DataLoader(
            TensorDataset(x, y),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        x = self.data.pretrain_images()
        y = torch.cat([self.data.y_train, torch.full((len(x) - len(self.data.y_train),), -1)])
        return self._loader(x, y, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        if not self.knn_monitor:
            return []
        return [
            self._loader(self.data.x_train, self.data.y_train, train=False),
            self._loader(self.data.x_test, self.data.y_test, train=False),
        ]
