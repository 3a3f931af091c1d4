"""Readers for the image datasets (see the package docstring). Everything is returned as uint8 (N, C, H, W)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from essl.data.lazy import FolderImages, LazyImages, folder_splits, lazy_folder, lazy_stl10
from essl.errors import UserError

DIGITS_SPLIT_SEED = 0  # the digits train/test split is fixed: results are comparable across runs
DIGITS_TEST_FRACTION = 0.2
DIGITS_MAX_VALUE = 16.0  # scikit-learn's digits are integers in [0, 16]
STL10_SIDE = 96
DECODE_BATCH = 64  # images per batch when a folder is decoded into memory
MAX_DECODE_WORKERS = 8


@dataclass
class LabelledData:
    """In-memory uint8 images (N, C, H, W) with int64 labels; ``unlabelled`` extra images for pretraining."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    unlabelled: Tensor | None = None
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.x_train) == 0:
            raise UserError(f"dataset {self.name!r} has no training images")
        if not self.mean:
            self.mean, self.std = channel_stats(self.x_train)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def size(self) -> int:
        return int(self.x_train.shape[-1])

    def pretrain_images(self) -> Tensor:
        """Images used for self-supervised pretraining: train (+ unlabelled, e.g. STL-10's 100k)."""
        if self.unlabelled is None:
            return self.x_train
        return torch.cat([self.x_train, self.unlabelled])

    # the interface shared with essl.data.lazy.LazyImages (what the DataModule and the composition root use)
    @property
    def n_pretrain(self) -> int:
        return len(self.x_train) + (len(self.unlabelled) if self.unlabelled is not None else 0)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    def pretrain_dataset(self) -> TensorDataset:
        """(image, label) of the pretraining images; unlabelled ones have label -1 (pretraining ignores labels)."""
        x = self.pretrain_images()
        y = torch.cat([self.y_train, torch.full((len(x) - len(self.y_train),), -1, dtype=self.y_train.dtype)])
        return TensorDataset(x, y)

    def bank_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_train, self.y_train)

    def test_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_test, self.y_test)


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (computed, not hard-coded)."""
    xf = x.float().div_(255.0).transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(xf.mean(1).tolist()), tuple(xf.std(1).clamp_min(1e-3).tolist())


def resize_uint8(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of uint8 (N, C, H, W) to (N, C, size, size), rounded back to uint8."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def load_digits(image_size: int = 32) -> LabelledData:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8))[:, None]  # (N,1,8,8)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=d.target, random_state=DIGITS_SPLIT_SEED
    )
    x = resize_uint8(x, image_size)
    return LabelledData("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test], num_classes=10)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def _find(root: Path, marker: str) -> Path:
    """``root``'s child ``marker`` folder if there is one, else ``root`` itself."""
    return root / marker if (root / marker).is_dir() else root


def load_cifar(root: Path, classes: int, image_size: int | None) -> LabelledData:
    marker = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    folder = _find(root, marker)
    if classes == 10:
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = [folder / "test_batch"], b"labels"
    else:
        train_files, test_files, key = [folder / "train"], [folder / "test"], b"fine_labels"
    for f in train_files + test_files:
        if not f.is_file():
            raise UserError(f"cifar{classes}: missing file {f} (expected the python version, {marker}/)")

    def read(files: list[Path]) -> tuple[Tensor, Tensor]:
        parts = [_unpickle(f) for f in files]
        x = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[key]) for p in parts]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    xtr, ytr = read(train_files)
    xte, yte = read(test_files)
    if image_size:
        xtr, xte = resize_uint8(xtr, image_size), resize_uint8(xte, image_size)
    return LabelledData(f"cifar{classes}", xtr, ytr, xte, yte, num_classes=classes)


def load_stl10(root: Path, image_size: int | None, unlabelled: bool = True) -> LabelledData:
    folder = _find(root, "stl10_binary")

    def images(name: str) -> Tensor:
        f = folder / name
        if not f.is_file():
            raise UserError(f"stl10: missing file {f}")
        raw = np.fromfile(f, dtype=np.uint8).reshape(-1, 3, STL10_SIDE, STL10_SIDE)
        x = torch.from_numpy(raw.transpose(0, 1, 3, 2).copy())  # stored column-major
        return resize_uint8(x, image_size) if image_size else x

    def labels(name: str) -> Tensor:
        f = folder / name
        if not f.is_file():
            raise UserError(f"stl10: missing file {f}")
        return torch.from_numpy(np.fromfile(f, dtype=np.uint8).astype(np.int64) - 1)  # 1..10 -> 0..9

    extra = images("unlabeled_X.bin") if unlabelled and (folder / "unlabeled_X.bin").is_file() else None
    return LabelledData(
        "stl10", images("train_X.bin"), labels("train_y.bin"), images("test_X.bin"), labels("test_y.bin"),
        num_classes=10, unlabelled=extra,
    )


def _decode_all(images: FolderImages) -> tuple[Tensor, Tensor]:
    """Every image of a file list, decoded into memory by loader workers (one per core, at most
    :data:`MAX_DECODE_WORKERS`), in order."""
    workers = min(MAX_DECODE_WORKERS, os.cpu_count() or 1) if len(images) > DECODE_BATCH else 0
    xs, ys = [], []
    for x, y in DataLoader(images, batch_size=DECODE_BATCH, num_workers=workers):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys).to(torch.int64)


def load_folder(root: Path, image_size: int | None) -> LabelledData:
    """An ImageFolder tree decoded into memory at ``image_size`` (for the probe; pretraining decodes lazily,
    :func:`essl.data.lazy.lazy_folder`). A folder has no native size: ``image_size`` is required."""
    if not image_size:
        raise UserError(f"image folder {root}: images of a folder have no common size; set data.image_size")
    train, test, classes = folder_splits(root)
    xtr, ytr = _decode_all(FolderImages(train, image_size))
    xte, yte = _decode_all(FolderImages(test, image_size))
    return LabelledData(f"folder:{root}", xtr, ytr, xte, yte, num_classes=len(classes))


DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 8x8 handwritten digits, embedded (nothing downloaded), resized to data.image_size",
    "cifar10": "CIFAR-10 from disk (the python version, cifar-10-batches-py under data.path)",
    "cifar100": "CIFAR-100 from disk (cifar-100-python under data.path)",
    "stl10": "STL-10 from disk (stl10_binary under data.path), with its 100k unlabelled images for pretraining",
    "folder": "any ImageFolder tree: data.path/<class>/<image>, or data.path/{train,test|val}/<class>/<image>",
    "phc": "photonic-crystal permittivity maps, an HDF5 file from `essl phc generate` (data.path)",
}
"""The dataset registry: names accepted by ``data.name`` and ``essl probe --data``, with a description each."""


def load_phc_maps(path: str) -> LabelledData:
    """Photonic-crystal permittivity maps for pretraining: float32 (N, 1, n, n) in physical units (no labels).

    The model input is (ε − EPS_MIN) / EPS_SPAN, expressed as the dataset's ``mean``/``std`` so that the encoder
    file carries it (docs/design.md: normalise only at the model input).
    """
    from essl.data.phc import EPS_MIN, EPS_SPAN, load_phc

    eps, _ = load_phc(path)
    x = torch.from_numpy(eps)[:, None]  # (N, 1, n, n)
    empty = x[:0]
    no_labels = torch.zeros(len(x), dtype=torch.int64)
    return LabelledData(f"phc:{path}", x, no_labels, empty, no_labels[:0], num_classes=0,
                        mean=(EPS_MIN,), std=(EPS_SPAN,))


def _resolve(name_or_path: str, path: str | None) -> tuple[str | None, str | None]:
    """(registered name or None, path) of what ``data.name`` / ``data.path`` (or ``--data``) designate."""
    if name_or_path not in DATASETS:
        return None, name_or_path
    return name_or_path, path


def _existing_folder(name: str | None, name_or_path: str, path: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        if name is None and "/" not in str(name_or_path) and not Path(str(name_or_path)).suffix:
            raise UserError(f"dataset {name_or_path!r}: not a dataset name ({', '.join(DATASETS)}) nor an "
                            "existing path")
        raise UserError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"data path is not a folder: {root}")
    return root


def load_pretrain_data(name_or_path: str, image_size: int | None = None, path: str | None = None,
                       num_workers: int = 0) -> LabelledData | LazyImages:
    """What pretraining reads: image folders and STL-10 decoded lazily in the loader workers
    (:mod:`essl.data.lazy`), the small sets (digits, CIFAR, photonic maps) in memory (:func:`load_labelled`)."""
    name, path = _resolve(name_or_path, path)
    if name in ("folder", "stl10", None) and path and not str(path).endswith((".h5", ".hdf5")):
        root = _existing_folder(name, name_or_path, path)
        kind = name or _guess(root)
        if kind == "folder":
            if not image_size:
                raise UserError(f"image folder {root}: images of a folder have no common size; set data.image_size")
            return lazy_folder(root, image_size, num_workers)
        if kind == "stl10":
            return lazy_stl10(_find(root, "stl10_binary"), image_size or STL10_SIDE, num_workers)
    return load_labelled(name_or_path, image_size, path)


def _guess(root: Path) -> str:
    if (root / "cifar-10-batches-py").is_dir() or (root / "data_batch_1").is_file():
        return "cifar10"
    if (root / "cifar-100-python").is_dir() or root.name == "cifar-100-python":
        return "cifar100"
    if (root / "stl10_binary").is_dir() or (root / "train_X.bin").is_file():
        return "stl10"
    return "folder"


def load_labelled(name_or_path: str, image_size: int | None = None, path: str | None = None) -> LabelledData:
    """Load a labelled dataset by name (``path`` for the on-disk ones) or by its path alone."""
    name, path = _resolve(name_or_path, path)
    if name == "digits":
        return load_digits(image_size or 32)
    if not path:
        raise UserError(f"dataset {name!r} needs data.path (the folder or file that holds it)")
    if name == "phc" or str(path).endswith((".h5", ".hdf5")):
        return load_phc_maps(path)
    root = _existing_folder(name, name_or_path, path)
    name = name or _guess(root)
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, 10 if name == "cifar10" else 100, image_size)
    if name == "stl10":
        return load_stl10(root, image_size)
    return load_folder(root, image_size)
