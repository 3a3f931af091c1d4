"""Image sets too large for memory: a file list (or a memory-mapped binary), decoded in the DataLoader workers.

Pretraining on an ImageFolder tree or on STL-10 never holds the decoded set in memory: the main process keeps a
compact list of the files (:class:`FileList`: the relative paths packed into one byte buffer plus offsets, shared
by forked workers without copy-on-write growth), and each DataLoader worker decodes its own batches to uint8
tensors at ``data.image_size`` (the shorter side resized bilinearly, then the centre crop; the same pixels as the
in-memory :func:`essl.data.images.load_folder`). The device augmentation then runs as for every other data set.
STL-10's binary files are memory-mapped and its 96-pixel images resized per sample when ``data.image_size``
differs (the same pixels as :func:`essl.data.images.resize_uint8` of the whole set).

Start-up costs one directory scan (``os.scandir``, no ``stat`` per file) and the channel statistics, estimated
from a seeded sample of :data:`STATS_SAMPLE` training images and cached (:func:`cached_stats`), so a second run
of the same folder starts without decoding anything. A file that does not decode is a
:class:`~essl.errors.UserError` naming it (exit 2), also when a worker meets it in the middle of an epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from essl.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
STATS_SAMPLE = 2048
"""Training images decoded to estimate the channel mean and std (the standard error of a channel mean from 2048
images of ~1000 pixels each is well below 1e-3 of the [0, 1] range)."""
STATS_SEED = 0
STATS_BATCH = 64
MIN_STD = 1e-3  # as channel_stats: a constant channel must not divide by zero
UINT8_MAX = 255.0
CACHE_ENV = "ESSL_CACHE_DIR"
CACHE_VERSION = 1  # bump when the statistics' definition changes
FOLDER_SPLIT_SEED = 0  # a flat tree is split train/test with this seed, as load_folder does
FOLDER_TEST_FRACTION = 0.1
STL10_SIDE = 96
STL10_CHANNELS = 3


class CorruptImage(UserError):
    """A file of an image folder that does not decode. One line, also when raised in a DataLoader worker (the
    worker's re-raise wraps the message in a traceback; only the original line is kept)."""

    def __init__(self, message: str):
        lines = [line for line in str(message).strip().splitlines() if line.strip()]
        ours = [line.split(f"{type(self).__name__}: ", 1)[1] for line in lines if f"{type(self).__name__}: " in line]
        super().__init__(ours[-1] if ours else lines[-1] if lines else message)


# ---- the file list ---------------------------------------------------------------------------------------------
@dataclass
class FileList:
    """The image files of one split: relative paths (UTF-8, packed) and labels, in a fixed order.

    ``blob[offsets[i]:offsets[i + 1]]`` is the path of file ``i`` relative to ``root``; ``labels[i]`` its class.
    Numpy buffers instead of Python strings: a million files take ~30 MB, and forked DataLoader workers share
    them (Python objects would be copied page by page as their reference counts change).
    """

    root: Path
    blob: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len(files) + 1
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode()

    def subset(self, indices: np.ndarray) -> FileList:
        """The files at ``indices``, in that order."""
        starts, ends = self.offsets[indices], self.offsets[np.asarray(indices) + 1]
        lengths = ends - starts
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = np.empty(int(offsets[-1]), dtype=np.uint8)
        for k, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            blob[offsets[k]:offsets[k + 1]] = self.blob[a:b]
        return FileList(self.root, blob, offsets, self.labels[indices].copy())


def _image_files(folder: Path) -> list[tuple[str, ...]]:
    """Relative paths (as parts) of the image files under ``folder``, at any depth, in the order of
    ``sorted(folder.rglob("*"))`` (paths compare part by part)."""
    found: list[tuple[str, ...]] = []
    stack: list[tuple[Path, tuple[str, ...]]] = [(folder, ())]
    while stack:
        here, parts = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError as err:
            raise UserError(f"image folder: cannot list {here}: {os.strerror(err.errno or 0).lower()}") from None
        for entry in entries:
            name_parts = (*parts, entry.name)
            if entry.is_dir(follow_symlinks=False):  # as rglob: symlinked sub-folders are not entered
                stack.append((Path(entry.path), name_parts))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and not entry.is_dir():
                found.append(name_parts)
    found.sort()
    return found


def scan_classes(root: Path, classes: Sequence[str]) -> FileList:
    """Every image file of ``root/<class>/...`` for the given classes (label = position in ``classes``)."""
    chunks: list[bytes] = []
    lengths: list[int] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for parts in _image_files(root / cls):
            encoded = "/".join((cls, *parts)).encode()
            chunks.append(encoded)
            lengths.append(len(encoded))
            labels.append(label)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    blob = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    if not len(labels):
        raise UserError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return FileList(root, blob, offsets, np.asarray(labels, dtype=np.int64))


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def folder_splits(root: Path) -> tuple[FileList, FileList, list[str]]:
    """(train, test, classes) of an ImageFolder tree: ``root/train`` + ``root/test`` (or ``val``), or a flat
    ``root/<class>`` split 90/10 with a fixed seed (the split of :func:`essl.data.images.load_folder`)."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = _class_dirs(root / "train")
        if not classes:
            raise UserError(f"image folder {root / 'train'} has no class sub-folders")
        return scan_classes(root / "train", classes), scan_classes(test_dir, classes), classes
    classes = _class_dirs(root)
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    files = scan_classes(root, classes)
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(FOLDER_SPLIT_SEED)).numpy()
    n_test = max(1, int(round(FOLDER_TEST_FRACTION * len(files))))
    return files.subset(perm[n_test:]), files.subset(perm[:n_test]), classes


# ---- decoding --------------------------------------------------------------------------------------------------
def decode_image(path: Path, size: int) -> Tensor:
    """One image file -> uint8 (3, size, size): RGB, the shorter side resized to ``size`` (bilinear), centre crop.
    A file that does not decode raises :class:`CorruptImage` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
            im = im.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            array = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptImage(f"image folder: cannot decode {path}: {reason}") from None
    return torch.from_numpy(array).permute(2, 0, 1)


class FolderImages(Dataset):
    """(uint8 (3, size, size), label) for each file of a :class:`FileList`, decoded on access (in a worker)."""

    def __init__(self, files: FileList, size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return decode_image(self.files.path(i), self.size), torch.tensor(self.files.labels[i])


class STL10Images(Dataset):
    """(uint8 (3, size, size), label) of one STL-10 binary file (memory-mapped), resized per sample if needed."""

    def __init__(self, images: Path, labels: Path | None, size: int):
        self.images, self.size = images, size
        n_bytes = images.stat().st_size
        per_image = STL10_CHANNELS * STL10_SIDE * STL10_SIDE
        if n_bytes % per_image:
            raise UserError(f"stl10: {images} is not a file of {STL10_SIDE}x{STL10_SIDE} images ({n_bytes} bytes)")
        self.n = n_bytes // per_image
        self._raw: np.ndarray | None = None  # opened lazily: each worker maps the file itself
        self.labels = (np.fromfile(labels, dtype=np.uint8).astype(np.int64) - 1 if labels is not None
                       else np.full(self.n, -1, dtype=np.int64))  # 1..10 -> 0..9; -1: unlabelled
        if len(self.labels) != self.n:
            raise UserError(f"stl10: {labels} has {len(self.labels)} labels for {self.n} images in {images}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from essl.data.images import resize_uint8

        if self._raw is None:
            self._raw = np.memmap(self.images, dtype=np.uint8, mode="r",
                                  shape=(self.n, STL10_CHANNELS, STL10_SIDE, STL10_SIDE))
        x = torch.from_numpy(np.ascontiguousarray(self._raw[i].transpose(0, 2, 1)))  # stored column-major
        if self.size != STL10_SIDE:
            x = resize_uint8(x[None], self.size)[0]
        return x, torch.tensor(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_raw": None}  # a worker maps the file itself


# ---- statistics, computed once from a sample and cached ---------------------------------------------------------
def cache_dir() -> Path:
    """``$ESSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/essl``, else ``~/.cache/essl``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "essl"


def sample_stats(dataset: Dataset, num_workers: int = 0, sample: int = STATS_SAMPLE,
                 seed: int = STATS_SEED) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1] units, of a seeded random sample of ``dataset``'s images (decoded by
    ``num_workers`` loader workers). Accumulated in float64 batch by batch: memory of one batch."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(sample, n)].sort().values
    loader = DataLoader(torch.utils.data.Subset(dataset, order.tolist()), batch_size=STATS_BATCH,
                        num_workers=num_workers)
    total = squares = None
    count = 0
    for x, _ in loader:
        xf = x.double().div_(UINT8_MAX).transpose(0, 1).reshape(x.shape[1], -1)  # (C, pixels)
        total = xf.sum(1) if total is None else total + xf.sum(1)
        squares = (xf * xf).sum(1) if squares is None else squares + (xf * xf).sum(1)
        count += xf.shape[1]
    mean = total / count
    var = (squares - count * mean * mean) / max(1, count - 1)  # the unbiased estimate, as Tensor.std
    std = var.clamp_min(0).sqrt().clamp_min(MIN_STD)
    return tuple(mean.tolist()), tuple(std.tolist())


def cached_stats(key: dict, dataset: Dataset, num_workers: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`sample_stats`, cached under :func:`cache_dir` by ``key`` (what identifies the images: the folder,
    the decode size, the number of files and the first and last of them). A cache that cannot be read or written
    is only skipped."""
    from essl.io import atomic_write_json

    key = {"version": CACHE_VERSION, "sample": STATS_SAMPLE, "seed": STATS_SEED, **key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / "stats" / f"{digest}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return tuple(stored["mean"]), tuple(stored["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = sample_stats(dataset, num_workers)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "mean": list(mean), "std": list(std)})
    except (OSError, UserError):
        pass
    return mean, std


# ---- the lazy data set -----------------------------------------------------------------------------------------
@dataclass
class LazyImages:
    """A data set decoded on access, with the interface :class:`~essl.data.module.ImageDataModule` and the
    composition root use (:class:`~essl.data.images.LabelledData` has the same): ``name``, ``channels``,
    ``size``, ``mean``, ``std``, ``num_classes``, ``n_pretrain``, ``n_test`` and the three datasets."""

    name: str
    train: Dataset  # labelled: the kNN memory bank, and pretraining images
    test: Dataset
    num_classes: int
    size: int
    unlabelled: Dataset | None = None
    channels: int = STL10_CHANNELS
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    @property
    def n_pretrain(self) -> int:
        return len(self.train) + (len(self.unlabelled) if self.unlabelled is not None else 0)

    @property
    def n_test(self) -> int:
        return len(self.test)

    def pretrain_dataset(self) -> Dataset:
        """Train (+ unlabelled) images; their labels are ignored by pretraining."""
        if self.unlabelled is None:
            return self.train
        return torch.utils.data.ConcatDataset([self.train, self.unlabelled])

    def bank_dataset(self) -> Dataset:
        return self.train

    def test_dataset(self) -> Dataset:
        return self.test


def lazy_folder(root: Path, image_size: int, num_workers: int = 0) -> LazyImages:
    """An ImageFolder tree as a :class:`LazyImages` decoded at ``image_size``."""
    train, test, classes = folder_splits(root)
    data = LazyImages(f"folder:{root} (decoded at {image_size} px)", FolderImages(train, image_size),
                      FolderImages(test, image_size),
                      num_classes=len(classes), size=image_size)
    first, last = train.path(0), train.path(len(train) - 1)
    key = {"kind": "folder", "root": str(root.resolve()), "size": image_size, "n_train": len(train),
           "n_test": len(test), "first": str(first.relative_to(root)), "last": str(last.relative_to(root))}
    data.mean, data.std = cached_stats(key, data.train, num_workers)
    return data


def lazy_stl10(folder: Path, image_size: int, num_workers: int = 0, unlabelled: bool = True) -> LazyImages:
    """STL-10's binary files (``stl10_binary``) as a :class:`LazyImages` at ``image_size`` (96: as stored)."""
    def file(name: str) -> Path:
        f = folder / name
        if not f.is_file():
            raise UserError(f"stl10: missing file {f}")
        return f

    extra = folder / "unlabeled_X.bin"
    name = "stl10" if image_size == STL10_SIDE else f"stl10 (resized from {STL10_SIDE} to {image_size} px)"
    data = LazyImages(
        name, STL10Images(file("train_X.bin"), file("train_y.bin"), image_size),
        STL10Images(file("test_X.bin"), file("test_y.bin"), image_size), num_classes=10, size=image_size,
        unlabelled=STL10Images(extra, None, image_size) if unlabelled and extra.is_file() else None,
    )
    key = {"kind": "stl10", "root": str(folder.resolve()), "size": image_size, "n_train": len(data.train),
           "bytes": file("train_X.bin").stat().st_size}
    data.mean, data.std = cached_stats(key, data.train, num_workers)
    return data
