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


def _affine_permutation(element: transforms.Affine, n: int) -> torch.Tensor:
    """Source index of every output pixel under an affine element, computed pixel by pixel from its definition
    u -> R·u + t (mod 2n) in centred coordinates u = 2·index − (n − 1)."""
    r, t = element
    source = torch.empty(n * n, dtype=torch.long)
    for qi in range(n):
        for qj in range(n):
            v = (2 * qi - (n - 1), 2 * qj - (n - 1))
            u = (r[0] * v[0] + r[1] * v[1] + t[0], r[2] * v[0] + r[3] * v[1] + t[1])
            pi, pj = (((c + n - 1) % (2 * n)) // 2 for c in u)
            source[pi * n + pj] = qi * n + qj
    return source


@pytest.mark.parametrize("group", ["rot4", "flip4", "flip3", "hflip", "vflip", "c4v", "translate"])
@pytest.mark.parametrize("n", [4, 6, 8])
def test_element_algebra_matches_the_pixel_operations(group, n):
    """The affine representation used to check configurations is the same permutation as the tensor ops."""
    ops = transforms._element_ops(group, n, n, 2)
    pixels = torch.arange(n * n).view(n, n)
    for k, element in enumerate(transforms.element_maps(group, n)):
        assert torch.equal(_affine_permutation(element, n), ops[k](pixels).reshape(-1)), (group, k)


def test_composition_matches_applying_one_after_the_other():
    n = 6
    pixels = torch.arange(n * n).view(n, n)
    rot, flip = transforms._element_ops("rot4", n, n, 2)[1], transforms._element_ops("flip4", n, n, 2)[1]
    shift = transforms.element_maps("shift", n)[7]  # rows 1, cols 1
    both = transforms.compose(transforms.compose(shift, transforms.element_maps("flip4", n)[1], n),
                              transforms.element_maps("rot4", n)[1], n)
    expected = rot(flip(torch.roll(pixels, (1, 1), dims=(0, 1))))
    assert torch.equal(_affine_permutation(both, n), expected.reshape(-1))


@pytest.mark.parametrize("before,group,merged", [
    (["flip4"], "rot4", [(0, 2), (1, 3)]),  # flip4 holds the 180° rotation: the old photonics bug
    (["shift", "flip4"], "rot4", [(0, 2), (1, 3)]),
    (["shift", "flip3"], "rot4", [(0, 2), (1, 3)]),  # partly: r0·fH = r2·fW
    (["shift"], "rot4", []),  # translations never equal rotations
    (["hflip"], "rot4", []),  # the paper's crop view flips images before predicting rotations
    (["hflip"], "flip4", [(0, 1), (2, 3)]),
    (["flip3", "rot4"], "translate", []),  # the blob views keep the half-cell translations apart
    (["halfshift"], "translate", [(i, j) for i in range(4) for j in range(i + 1, 4)]),
    ([], "c4v", []),
])
def test_merged_elements_known_answers(before, group, merged):
    n = 16
    assert transforms.merged_elements(group, [transforms.element_maps(op, n) for op in before], n) == merged


def test_merged_elements_agrees_with_brute_force_images():
    """Independent check on real pixels: with [flip3] before rot4, some draws give the same image for labels 0
    and 2 (so they merge), and with [shift] none does for a cell without symmetry."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 6)

    def images(before: list[str], label: int) -> set[bytes]:
        outs = set()
        sets = [transforms._element_ops(op, 6, 6, 2) if op != "shift" else
                [lambda z, i=i, j=j: torch.roll(z, (i, j), dims=(-2, -1)) for i in range(6) for j in range(6)]
                for op in before]
        combos = [[lambda z: z]]
        for ops in sets:
            combos = [c + [op] for c in combos for op in ops]
        for combo in combos:
            z = x
            for op in combo:
                z = op(z)
            outs.add(torch.rot90(z, label, dims=(-2, -1)).numpy().tobytes())
        return outs

    assert images(["flip3"], 0) & images(["flip3"], 2)
    assert not images(["shift"], 0) & images(["shift"], 2)
    assert not images(["shift"], 1) & images(["shift"], 3)


@pytest.mark.parametrize("group,grid,shape", [("hflip", 2, (5, 2, 6, 7)), ("vflip", 2, (4, 1, 5, 5)),
                                              ("flip3", 2, (6, 1, 6, 6))])
def test_new_flip_sets_are_exact(group, grid, shape):
    x = torch.randn(shape)
    labels = torch.arange(len(x)) % transforms.group_size(group, grid)
    y = transforms.apply(x, group, labels, grid)
    for i in range(len(x)):
        dims = {"hflip": [(), (-1,)], "vflip": [(), (-2,)], "flip3": [(), (-1,), (-2,)]}[group][int(labels[i])]
        assert torch.equal(y[i], x[i].flip(dims) if dims else x[i])
    assert torch.equal(transforms.apply(y, group, transforms.inverse_labels(group, labels, grid), grid), x)
