"""PhCDataModule: normalisation, shapes, splits, and one-line errors for bad files."""

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from essl.data.phc import EPS_MIN, EPS_SPAN, TARGET_POINTS, PhCDataModule, load_phc
from essl.errors import UserError

N, SIZE = 20, 32


def write(path, eps=None, target=None, completed=None, **extra):
    """A file with ``eps`` and ``target`` (valid random ones unless given; ``target=False`` omits it)."""
    rng = np.random.default_rng(0)
    if eps is None:
        eps = rng.uniform(1.0, 20.0, (N, SIZE, SIZE)).astype(np.float32)
    if target is None:
        target = rng.normal(size=(N, TARGET_POINTS)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["eps"] = eps
        if target is not False:
            f["target"] = target
        for key, value in extra.items():
            f[key] = value
        if completed is not None:
            f.attrs["completed"] = completed
    return path


@pytest.fixture
def labelled(tmp_path):
    target = np.random.default_rng(1).normal(size=(N, TARGET_POINTS)).astype(np.float32)
    return write(tmp_path / "l.h5", target=target, completed=N)


def test_regression_batches(labelled):
    dm = PhCDataModule(labelled, 4, with_target=True, val_fraction=0.25, seed=3)
    eps, target = load_phc(labelled, with_target=True)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, SIZE, SIZE) and x.dtype == torch.float32
    assert y.shape == (4, TARGET_POINTS) and y.dtype == torch.float32
    assert len(dm.val_indices) == 5 and len(dm.train_indices) == 15
    assert set(dm.val_indices.tolist()).isdisjoint(dm.train_indices.tolist())
    # Every training row is the normalised map of its file row, paired with its own target.
    xs, ys = zip(*dm.train_dataloader(), strict=True)
    xs, ys = torch.cat(xs), torch.cat(ys)
    assert len(xs) == 12  # drop_last: 3 full batches of 4 from 15
    rows = [int(np.argmin(np.abs(target - y.numpy()).sum(axis=1))) for y in ys]
    expected = (torch.from_numpy(eps[rows]) - EPS_MIN) / EPS_SPAN
    torch.testing.assert_close(xs[:, 0], expected)
    assert float(xs.min()) >= 0.0 and float(xs.max()) <= 1.0
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 1, SIZE, SIZE)
    assert sum(len(b[0]) for b in dm.val_dataloader()) == 5  # validation keeps the last partial batch


def test_pretraining_batches_and_determinism(labelled):
    a = PhCDataModule(labelled, 8, seed=1)
    b = PhCDataModule(labelled, 8, seed=1)
    (xa, ya), (xb, _) = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert ya.shape == (8,) and ya.dtype == torch.long and (ya == 0).all()
    torch.testing.assert_close(xa, xb)
    assert a.val_dataloader() == []


def test_n_labels_subset(labelled):
    dm = PhCDataModule(labelled, 2, with_target=True, val_fraction=0.2, n_labels=6, seed=0)
    full = PhCDataModule(labelled, 2, with_target=True, val_fraction=0.2, seed=0)
    assert len(dm.train_indices) == 6
    torch.testing.assert_close(dm.train_indices, full.train_indices[:6])
    torch.testing.assert_close(dm.val_indices, full.val_indices)
    with pytest.raises(UserError, match="n_labels=100"):
        PhCDataModule(labelled, 2, with_target=True, val_fraction=0.2, n_labels=100)


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")  # val_fraction=0: no val
def test_trainer_runs_one_step(labelled):
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(SIZE * SIZE, TARGET_POINTS)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x.flatten(1)), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val", torch.nn.functional.mse_loss(self.net(x.flatten(1)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    for fraction in (0.0, 0.25):
        dm = PhCDataModule(labelled, 4, with_target=True, val_fraction=fraction)
        trainer = L.Trainer(
            max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(Tiny(), datamodule=dm)
        assert trainer.global_step == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such file"),
        (lambda p: p.write_text("hello") and p, "not an HDF5 file"),
        (lambda p: write(p, eps=np.ones((N, SIZE, SIZE - 1), np.float32)), r"'eps' has shape \(20, 32, 31\)"),
        (lambda p: write(p, eps=np.ones((N, SIZE * SIZE), np.float32)), r"'eps' has shape \(20, 1024\)"),
        (lambda p: write(p, target=np.zeros((N, 500), np.float32)), r"'target' has shape \(20, 500\)"),
        (lambda p: write(p, target=False), "missing dataset 'target'"),
        (lambda p: write(p, target=np.full((N, TARGET_POINTS), np.nan, np.float32)), "'target' has NaN"),
        (lambda p: write(p, eps=np.zeros((N, SIZE, SIZE), np.float32)), "values below 1.0"),
        (lambda p: write(p, target=np.zeros((N, TARGET_POINTS), np.float32), completed=3), "incomplete"),
    ],
)
def test_bad_files_are_one_line_user_errors(tmp_path, make, message):
    path = make(tmp_path / "bad.h5")
    with pytest.raises(UserError, match=message) as info:
        PhCDataModule(path, 2, with_target=True)
    assert str(tmp_path / "bad.h5") in str(info.value) and "\n" not in str(info.value)


def test_nan_in_eps_and_missing_eps(tmp_path):
    eps = np.ones((N, SIZE, SIZE), np.float32)
    eps[7, 3, 4] = np.nan
    with pytest.raises(UserError, match=r"'eps' has NaN/inf in 1 of 20 structures \(first: index 7\)"):
        PhCDataModule(write(tmp_path / "nan.h5", eps=eps, target=False), 2)
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(UserError, match="missing dataset 'eps'"):
        PhCDataModule(tmp_path / "empty.h5", 2)


def test_bad_arguments(labelled):
    with pytest.raises(UserError, match="batch_size=64 exceeds"):
        PhCDataModule(labelled, 64)
    with pytest.raises(UserError, match="val_fraction=1.5"):
        PhCDataModule(labelled, 2, val_fraction=1.5)
