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
"""

from essl.data.images import DATASETS, LabelledData, load_labelled
from essl.data.module import ImageDataModule

__all__ = ["DATASETS", "ImageDataModule", "LabelledData", "load_labelled"]
