"""Datasets and datamodules. Loaders only decode to uint8 tensors; augmentation happens on the device.

``load_labelled(name_or_path, image_size)`` returns a :class:`LabelledData` (train/test uint8 images and
labels, in memory) for:

* ``digits`` — scikit-learn's 8×8 handwritten digits (shipped inside scikit-learn: nothing is downloaded),
  resized to ``image_size`` (default 32), with a fixed seeded stratified split (1437 train / 360 test);
* ``cifar10`` / ``cifar100`` — the standard python-pickle folders (``cifar-10-batches-py``, ``cifar-100-python``);
* ``stl10`` — the standard binary folder (``stl10_binary``), with its 100k unlabelled images for pretraining;
* any ImageFolder tree (``root/<class>/<image>``, or ``root/train/<class>/...`` + ``root/test|val/<class>/...``),
  decoded once into memory at ``image_size`` (shorter side resized, centre crop).

A path given instead of a name is recognised by its layout. A missing path is a UserError naming it.

``load_pretrain_data(name_or_path, image_size, path, num_workers)`` is what pretraining reads: the same sets, but
image folders and STL-10 as :class:`~essl.data.lazy.LazyImages` (a file list or a memory-mapped file, decoded in
the DataLoader workers; channel statistics from a cached sample), so a million-file folder starts in seconds and
memory does not grow with its size (:mod:`essl.data.lazy`).
"""

from essl.data.images import DATASETS, LabelledData, load_labelled, load_pretrain_data
from essl.data.lazy import LazyImages
from essl.data.module import ImageDataModule

__all__ = ["DATASETS", "ImageDataModule", "LabelledData", "LazyImages", "load_labelled", "load_pretrain_data"]
