"""The pretraining DataModule over uint8 images, in memory or decoded by the loader workers from a file list
(:mod:`essl.data.lazy`); no per-sample augmentation on the CPU.

The training loader is *resumable* (Lightning's stateful-dataloader protocol): its order is a function of the
seed and the epoch alone (:class:`EpochSampler`, never the global RNG), and :class:`ResumableLoader` reports how
many batches of the epoch it has handed out (``state_dict``) and continues after them (``load_state_dict``). A
checkpoint taken in the middle of an epoch therefore resumes on exactly the next batch, as an epoch-boundary
checkpoint does (docs/design.md).

Under DDP the kNN monitor's loaders give each rank its shard of the memory bank and of the test split
(:class:`ShardSampler`), with every sample's index (:class:`Indexed`); the module gathers the shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from essl.data.images import LabelledData
from essl.data.lazy import LazyImages


class EpochSampler(Sampler[int]):
    """Shuffled indices of one rank: a permutation drawn from ``seed + epoch`` (as DistributedSampler does), cut
    to the same length on every rank (``drop_last``) and dealt out round-robin, ``rank::world_size``.

    ``skip`` indices at the start of epoch ``skip_epoch`` are left out once (a mid-epoch resume); ``len`` stays the
    epoch's full length, which is what Lightning counts the epoch's batches against.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, number of leading indices to leave out)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def skip(self, epoch: int, n_indices: int) -> None:
        """Leave out the first ``n_indices`` of epoch ``epoch`` (once)."""
        self._skip = (epoch, n_indices)

    def __len__(self) -> int:
        return self.n // self.world_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """This rank's indices of ``epoch``, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=generator)[: len(self) * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
        self._skip = None
        yield from self.permutation(self.epoch)[start:].tolist()


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s share of ``n`` samples in order, ``rank::world_size``, padded by wrapping around to
    ``ceil(n / world_size)`` so that every rank has the same number (for ``all_gather``); the padding repeats
    samples, which :func:`essl.knn.merge_shards` drops again by index."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter([(self.rank + k * self.world_size) % self.n for k in range(len(self))])


class Indexed(Dataset):
    """``(x, y)`` samples of a dataset as ``(x, y, i)``, with ``i`` the sample's index (the kNN monitor's key)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[i]
        return x, y, i


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` with ``state_dict``/``load_state_dict``: Lightning saves the
    state in every checkpoint and loads it before the resumed epoch starts.

    The count is of batches *handed to the training loop* (counted here, after any worker prefetching), so it is
    exact whatever ``num_workers`` is. The base seed of worker processes is drawn from the loader's own generator,
    reseeded per epoch, so iterating never consumes the global RNG (the augmentation stream).
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, **kwargs: Any):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                         generator=torch.Generator(), **kwargs)
        self._yielded = 0  # batches of the current epoch handed out so far (including skipped ones)

    @property
    def epoch_sampler(self) -> EpochSampler:
        return self.sampler  # type: ignore[return-value]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch_sampler.skip(int(state["epoch"]), int(state["batches"]) * int(self.batch_size))
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing below runs before the first batch is asked for, i.e. after Lightning's set_epoch
        sampler = self.epoch_sampler
        resume = getattr(self, "_resume", None)
        self._resume = None
        self._yielded = resume[1] if resume is not None and resume[0] == sampler.epoch else 0
        self.generator.manual_seed(sampler.seed + sampler.epoch)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch


class ImageDataModule(L.LightningDataModule):
    """Train loader: shuffled uint8 batches (B, C, H, W) with ``drop_last`` (equal per-rank batches for a
    gathered NT-Xent), resumable mid-epoch (:class:`ResumableLoader`). Validation loaders (only with
    ``knn_monitor``): 0 = labelled train set (kNN memory bank), 1 = test set, both un-augmented."""

    def __init__(self, data: LabelledData | LazyImages, batch_size: int, num_workers: int = 0,
                 knn_monitor: bool = False, seed: int = 0):
        super().__init__()
        self.data, self.batch_size, self.num_workers, self.knn_monitor = data, batch_size, num_workers, knn_monitor
        self.seed = seed

    def _common(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                "pin_memory": torch.cuda.is_available()}

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> ResumableLoader:
        dataset = self.data.pretrain_dataset()  # in memory, or decoded by the workers (essl.data.lazy)
        rank, world = self._rank()
        sampler = EpochSampler(len(dataset), self.seed, rank, world)
        return ResumableLoader(dataset, sampler, self.batch_size, **self._common())

    def val_dataloader(self) -> list[DataLoader]:
        if not self.knn_monitor:
            return []
        # each rank embeds its shard of both sets with their sample indices; the module gathers the shards
        # (ESSLModule.on_validation_epoch_end); the own generator keeps the global RNG untouched
        rank, world = self._rank()
        return [DataLoader(Indexed(ds), batch_size=self.batch_size, sampler=ShardSampler(len(ds), rank, world),
                           generator=torch.Generator().manual_seed(self.seed), **self._common())
                for ds in (self.data.bank_dataset(), self.data.test_dataset())]
