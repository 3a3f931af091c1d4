"""Large image sets decoded in the loader workers (essl.data.lazy, issue 13 item 1; issue 12: a corrupt image).

The lazy loader must give the pixels, order and split of the in-memory one (which the probe uses), respect
data.image_size, estimate the channel statistics from a sample and cache them, keep its file list in flat numpy
buffers, and turn a file that does not decode into one line naming it (exit 2), in the main process and in a
DataLoader worker. Start-up time and memory on 100k files are measured by ``python -m essl.eval.bench folder``
(a benchmark, not a test).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from essl.cli import main
from essl.data import LabelledData, LazyImages, lazy, load_labelled, load_pretrain_data
from essl.data.images import channel_stats, load_stl10, resize_uint8
from essl.data.module import ImageDataModule
from essl.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(20, 14), (9, 31), (16, 16), (40, 25)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(lazy.CACHE_ENV, str(tmp_path / "cache"))


def _write(path: Path, seed: int, size: tuple[int, int] | None = None) -> None:
    rng = np.random.default_rng(seed)
    w, h = size or SIZES[seed % len(SIZES)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _tree(root: Path, per_class: int = 6, classes: int = 3) -> Path:
    """A flat tree with a nested sub-folder, mixed-case suffixes and files that are not images."""
    k = 0
    for c in range(classes):
        for i in range(per_class):
            sub = "nested/" if i % 3 == 0 else ""
            suffix = ".PNG" if i % 4 == 1 else ".png"
            _write(root / f"c{c}" / f"{sub}img-{i}{suffix}", k)
            k += 1
        (root / f"c{c}" / "notes.txt").write_text("not an image")
    return root


def test_file_order_is_sorted_rglob_order(tmp_path):
    root = _tree(tmp_path / "tree")
    _write(root / "c0" / "a-b.png", 98)
    _write(root / "c0" / "a" / "b.png", 99)  # "a/b" sorts before "a-b" by parts, after it as a string
    files = lazy.scan_classes(root, ["c0", "c1", "c2"])
    expected = [p.relative_to(root) for c in ("c0", "c1", "c2") for p in sorted((root / c).rglob("*"))
                if p.suffix.lower() in lazy.IMAGE_SUFFIXES]
    assert [files.path(i).relative_to(root) for i in range(len(files))] == expected
    assert files.labels.tolist() == [int(str(p).split("/")[0][1:]) for p in expected]
    # a flat numpy buffer, not a list of Python strings
    assert isinstance(files.blob, np.ndarray) and files.blob.dtype == np.uint8
    assert files.blob.nbytes == sum(len(str(p).encode()) for p in expected)


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_lazy_folder_gives_the_in_memory_pixels_split_and_labels(tmp_path, layout):
    if layout == "flat":
        root = _tree(tmp_path / "tree")
    else:
        root = tmp_path / "tree"
        _tree(root / "train")
        _tree(root / "val", per_class=2)
    memory = load_labelled("folder", 24, str(root))
    data = load_pretrain_data("folder", 24, str(root))
    assert isinstance(memory, LabelledData) and isinstance(data, LazyImages)
    assert (data.n_pretrain, data.n_test, data.num_classes) == (len(memory.x_train), len(memory.x_test), 3)
    for dataset, x, y in ((data.bank_dataset(), memory.x_train, memory.y_train),
                          (data.test_dataset(), memory.x_test, memory.y_test)):
        got = [dataset[i] for i in range(len(dataset))]
        assert torch.equal(torch.stack([g[0] for g in got]), x)
        assert torch.equal(torch.stack([g[1] for g in got]), y)


def test_image_size_is_respected(tmp_path):
    root = _tree(tmp_path / "tree")
    data = load_pretrain_data("folder", 28, str(root))
    x, _ = next(iter(ImageDataModule(data, 4).train_dataloader()))
    assert x.shape == (4, 3, 28, 28) and x.dtype == torch.uint8
    assert data.size == 28
    with pytest.raises(UserError, match="no common size; set data.image_size"):
        load_pretrain_data("folder", None, str(root))


def test_pretraining_on_a_folder_uses_data_image_size(tmp_path):
    import essl

    root = _tree(tmp_path / "tree", per_class=8)
    run = tmp_path / "run"
    assert main(["pretrain", str(ROOT / "configs/digits/e-simclr.yaml"), "data.name=folder", f"data.path={root}",
                 "data.image_size=24", "equivariance.crop_size=12", f"output_dir={run}", "trainer.max_epochs=1",
                 "data.batch_size=8", "progress=false", "backbone.kwargs.width=4", "method.kwargs.hidden_dim=16",
                 "equivariance.hidden_dim=16", "data.num_workers=1", "eval.knn_monitor=true"]) == 0
    encoder = essl.load_encoder(run / "encoder.pt")
    assert encoder.input["size"] == 24 and encoder.input["channels"] == 3
    assert "val/knn_acc" in (run / "metrics.csv").read_text()


def test_sample_statistics_match_the_full_ones_and_are_cached(tmp_path, monkeypatch):
    root = _tree(tmp_path / "tree")
    data = load_pretrain_data("folder", 16, str(root))
    full = load_labelled("folder", 16, str(root))  # the in-memory statistics of every training image
    assert len(data.bank_dataset()) < lazy.STATS_SAMPLE  # the sample is all of them here
    np.testing.assert_allclose(data.mean, full.mean, rtol=1e-5)
    np.testing.assert_allclose(data.std, full.std, rtol=1e-4)
    assert len(list((tmp_path / "cache" / "stats").glob("*.json"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the statistics are cached")

    with monkeypatch.context() as patch:
        patch.setattr(lazy, "decode_image", no_decoding)
        again = load_pretrain_data("folder", 16, str(root))
    assert (again.mean, again.std) == (data.mean, data.std)
    _write(root / "c1" / "zz-new.png", 7)  # another folder content: another key, computed anew
    other = load_pretrain_data("folder", 16, str(root))
    assert len(list((tmp_path / "cache" / "stats").glob("*.json"))) == 2
    assert other.n_pretrain + other.n_test == data.n_pretrain + data.n_test + 1


def test_sample_statistics_of_a_sample(tmp_path):
    """With more images than the sample, the estimate uses :data:`STATS_SAMPLE` of them and is close to the
    statistics of all (images of one grey level each, uniform: the channel mean is that of the levels)."""
    levels = torch.arange(0, 256, 4, dtype=torch.uint8)  # 64 levels

    class Grey(torch.utils.data.Dataset):
        def __len__(self):
            return 4000

        def __getitem__(self, i):
            return levels[i % len(levels)].expand(3, 4, 4).clone(), torch.tensor(0)

    mean, std = lazy.sample_stats(Grey())
    exact_mean, exact_std = channel_stats(torch.stack([Grey()[i][0] for i in range(4000)]))
    np.testing.assert_allclose(mean, exact_mean, atol=0.01)
    np.testing.assert_allclose(std, exact_std, atol=0.01)


def test_corrupt_image_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserError) as err:
        lazy.decode_image(bad, 16)
    assert str(err.value).startswith(f"image folder: cannot decode {bad}:") and "\n" not in str(err.value)
    # raised in a DataLoader worker, re-raised in the main process: still the one line
    dataset = lazy.FolderImages(lazy.FileList(tmp_path, np.frombuffer(b"bad.jpg", dtype=np.uint8).copy(),
                                              np.array([0, 7]), np.array([0])), 16)
    with pytest.raises(UserError) as err:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))
    assert str(err.value) == f"image folder: cannot decode {bad}: {str(err.value).split(': ', 2)[2]}"
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


@pytest.mark.parametrize("when", ["statistics", "training"])
@pytest.mark.parametrize("workers", [0, 2])
def test_pretrain_on_a_folder_with_a_corrupt_image_exits_2(tmp_path, capsys, workers, when):
    """Met while estimating the statistics, or (statistics cached by an earlier run) in the middle of training,
    in the main process or in a loader worker: exit 2, one line naming the file."""
    root = _tree(tmp_path / "tree")
    if when == "training":
        load_pretrain_data("folder", 16, str(root))  # caches the statistics: the next run decodes only in training
    bad = root / "c1" / "img-2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = main(["pretrain", str(ROOT / "configs/digits/e-simclr.yaml"), "data.name=folder", f"data.path={root}",
                 "data.image_size=16", "equivariance.crop_size=8", f"output_dir={tmp_path / 'run'}",
                 "trainer.max_epochs=1", "data.batch_size=4", "progress=false", f"data.num_workers={workers}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("essl: error:")]
    assert len(lines) == 1 and f"cannot decode {bad}" in lines[0], err
    assert "Traceback" not in err


def _stl10(folder: Path, n_train: int = 5, n_test: int = 3, n_unlabelled: int = 4) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    side = lazy.STL10_SIDE
    for name, n in (("train", n_train), ("test", n_test)):
        rng.integers(0, 256, n * 3 * side * side, dtype=np.uint8).tofile(folder / f"{name}_X.bin")
        rng.integers(1, 11, n, dtype=np.uint8).tofile(folder / f"{name}_y.bin")
    rng.integers(0, 256, n_unlabelled * 3 * side * side, dtype=np.uint8).tofile(folder / "unlabeled_X.bin")
    return folder.parent


@pytest.mark.parametrize("size", [96, 32])
def test_lazy_stl10_gives_the_in_memory_pixels_at_data_image_size(tmp_path, size):
    root = _stl10(tmp_path / "stl" / "stl10_binary")
    memory = load_stl10(root, size)
    data = load_pretrain_data("stl10", size, str(root))
    assert isinstance(data, LazyImages) and data.size == size
    assert data.n_pretrain == len(memory.x_train) + len(memory.unlabelled)
    pre = data.pretrain_dataset()
    got = torch.stack([pre[i][0] for i in range(len(pre))])
    assert torch.equal(got, torch.cat([memory.x_train, memory.unlabelled]))
    assert torch.equal(torch.stack([data.test_dataset()[i][1] for i in range(3)]), memory.y_test)
    assert torch.equal(resize_uint8(memory.x_test, size), memory.x_test)  # already at size


def test_the_small_sets_stay_in_memory():
    assert isinstance(load_pretrain_data("digits", 16), LabelledData)
    assert os.environ.get(lazy.CACHE_ENV)  # the fixture's cache, never the user's
