"""Exact labels: undoing the labelled operation restores the input bit for bit (independent reference:
torch.rot90 / torch.flip / torch.roll applied sample by sample with the inverse parameters)."""

import pytest
import torch

from essl import transforms


def _undo_one(img: torch.Tensor, group: str, label: int, grid: int) -> torch.Tensor:
    """Naive per-sample inverse of the labelled element, from the documented convention."""
    h, w = img.shape[-2:]
    if group == "rot4":
        return torch.rot90(img, -label, dims=(-2, -1))
    if group == "flip4":
        dims = {0: (), 1: (-1,), 2: (-2,), 3: (-2, -1)}[label]
        return img.flip(dims) if dims else img
    if group == "c4v":
        k, f = label % 4, label // 4
        if f:
            img = img.flip(-1)
        return torch.rot90(img, -k, dims=(-2, -1))
    if group == "translate":
        i, j = divmod(label, grid)
        return torch.roll(img, (-i * h // grid, -j * w // grid), dims=(-2, -1))
    raise AssertionError(group)


CASES = [("rot4", 2, (6, 3, 8, 8)), ("flip4", 2, (5, 2, 7, 9)), ("c4v", 2, (9, 1, 6, 6)),
         ("translate", 2, (7, 3, 8, 12)), ("translate", 4, (3, 1, 8, 8)), ("flip4", 2, (4, 3, 5, 11))]


@pytest.mark.parametrize("group,grid,shape", CASES)
@pytest.mark.parametrize("mode", ["all", "random"])
def test_labels_are_exact(group, grid, shape, mode):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x_t, labels = transforms.transform(x, group, mode=mode, grid=grid)
    g = transforms.group_size(group, grid)
    b = shape[0]
    assert labels.dtype == torch.int64
    if mode == "all":
        assert x_t.shape == (g * b, *shape[1:])
        assert torch.equal(labels, torch.arange(g).repeat_interleave(b))
        source = x.repeat(g, 1, 1, 1)
    else:
        assert x_t.shape == x.shape
        assert labels.min() >= 0 and labels.max() < g
        source = x
    restored = torch.stack([_undo_one(x_t[i], group, int(labels[i]), grid) for i in range(len(labels))])
    assert torch.equal(restored, source)  # bit for bit


@pytest.mark.parametrize("group,grid,shape", CASES)
def test_inverse_labels_round_trip(group, grid, shape):
    x = torch.randint(0, 255, shape, dtype=torch.uint8)
    labels = torch.randint(transforms.group_size(group, grid), (shape[0],))
    y = transforms.apply(x, group, labels, grid)
    assert torch.equal(transforms.apply(y, group, transforms.inverse_labels(group, labels, grid), grid), x)


def test_random_mode_draws_every_element_uniformly():
    torch.manual_seed(1)
    x = torch.zeros(4000, 1, 4, 4)
    _, labels = transforms.transform(x, "rot4", mode="random")
    counts = torch.bincount(labels, minlength=4).float()
    assert counts.min() > 900 and counts.max() < 1100  # 1000 ± ~3.2 sigma


def test_elements_are_distinct_and_match_torch_ops():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outs, _ = transforms.transform(x, "c4v", mode="all")
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8  # a generic square has 8 distinct images
    assert torch.equal(outs[1], torch.rot90(x[0], 1, dims=(-2, -1)))
    assert torch.equal(outs[4], x[0].flip(-1))


def test_rotations_need_square_inputs_and_translations_a_divisible_grid():
    with pytest.raises(ValueError, match="square"):
        transforms.transform(torch.zeros(2, 1, 4, 6), "rot4")
    with pytest.raises(ValueError, match="divisible"):
        transforms.transform(torch.zeros(2, 1, 5, 6), "translate", grid=2)


def test_random_shift_is_a_periodic_roll():
    torch.manual_seed(2)
    x = torch.randn(10, 2, 6, 9)
    y, shifts = transforms.random_shift(x)
    for i in range(10):
        assert torch.equal(y[i], torch.roll(x[i], tuple(shifts[i].tolist()), dims=(-2, -1)))


def test_device_and_dtype_are_kept():
    x = torch.randint(0, 255, (3, 3, 8, 8), dtype=torch.uint8)
    x_t, labels = transforms.transform(x, "rot4", mode="random")
    assert x_t.dtype == torch.uint8 and x_t.device == x.device == labels.device
