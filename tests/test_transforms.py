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


@pytest.mark.parametrize("group", ["rot4", "flip4", "flip3", "hflip", "vflip", "c4v", "translate", "jigsaw"])
@pytest.mark.parametrize("n", [4, 6, 8])
def test_element_permutations_are_the_pixel_operations(group, n):
    """The permutations used to check configurations move pixels exactly as the tensor ops do (independent
    reference: a random image transformed by the op vs indexed by the permutation)."""
    x = torch.randn(n, n)
    ops = transforms._element_ops(group, n, n, 2)
    for k, perm in enumerate(transforms.element_permutations(group, n)):
        assert torch.equal(x.reshape(-1)[list(perm)].view(n, n), ops[k](x)), (group, k)


def test_composition_matches_applying_one_after_the_other():
    n = 6
    x = torch.randn(n, n)
    shift = transforms.element_permutations("shift", n)[7]  # rows 1, cols 1
    flip = transforms.element_permutations("flip4", n)[1]
    rot = transforms.element_permutations("rot4", n)[1]
    both = transforms.compose(transforms.compose(shift, flip), rot)
    expected = torch.rot90(torch.roll(x, (1, 1), dims=(0, 1)).flip(-1), 1, dims=(0, 1))
    assert torch.equal(x.reshape(-1)[list(both)].view(n, n), expected)


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
    (["hflip"], "jigsaw", []),  # a flip also flips inside the tiles: never a pure tile permutation
    (["flip4"], "jigsaw", []),
])
def test_merged_elements_known_answers(before, group, merged):
    n = 16
    assert transforms.merged_elements(group, [transforms.element_permutations(op, n) for op in before], n) == merged


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


@pytest.mark.parametrize("mode", ["all", "random"])
def test_jigsaw_labels_are_exact(mode):
    torch.manual_seed(0)
    x = torch.randn(30, 3, 8, 6)
    x_t, labels = transforms.transform(x, "jigsaw", mode=mode)
    source = x.repeat(24, 1, 1, 1) if mode == "all" else x
    for i in range(len(labels)):  # naive reference: move each 4x3 tile by hand
        perm = transforms.JIGSAW_PERMUTATIONS[int(labels[i])]
        for t in range(4):
            r, c = divmod(t, 2)
            sr, sc = divmod(perm[t], 2)
            out = x_t[i, :, 4 * r:4 * r + 4, 3 * c:3 * c + 3]
            assert torch.equal(out, source[i, :, 4 * sr:4 * sr + 4, 3 * sc:3 * sc + 3])
    back = transforms.apply(x_t, "jigsaw", transforms.inverse_labels("jigsaw", labels))
    assert torch.equal(back, source)


def _naive_blur(img: torch.Tensor, k: int) -> torch.Tensor:
    """Separable Gaussian with reflect padding, written out with explicit loops over the kernel taps."""
    import math

    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    taps = torch.tensor([math.exp(-((i - k // 2) ** 2) / (2 * sigma**2)) for i in range(k)], dtype=img.dtype)
    taps = taps / taps.sum()
    pad = torch.nn.functional.pad(img[None], (k // 2,) * 4, mode="reflect")[0]
    h, w = img.shape[-2:]
    rows = sum(taps[i] * pad[..., i:i + h, :] for i in range(k))
    return sum(taps[j] * rows[..., :, j:j + w] for j in range(k))


@pytest.mark.parametrize("mode", ["all", "random"])
def test_photometric_groups_equal_naive_references(mode):
    torch.manual_seed(1)
    x = torch.rand(12, 3, 10, 10)
    for group in ("invert", "grayscale", "blur"):
        x_t, labels = transforms.transform(x, group, mode=mode)
        source = x.repeat(transforms.group_size(group), 1, 1, 1) if mode == "all" else x
        for i in range(len(labels)):
            g, img = int(labels[i]), source[i]
            if g == 0:
                expected = img
            elif group == "invert":
                expected = 1.0 - img
            elif group == "grayscale":
                expected = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).expand(3, -1, -1)
            else:
                expected = _naive_blur(img, transforms.BLUR_KERNELS[g - 1])
            torch.testing.assert_close(x_t[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", ["rot4", "hflip", "jigsaw", "invert", "blur", "translate"])
def test_random_mode_labels_are_uniform(group):
    """Chi-square test of the drawn labels (20000 draws, 99.9% critical value)."""
    from scipy.stats import chi2

    torch.manual_seed(0)
    g = transforms.group_size(group)
    x = torch.zeros(20000, 1, 4, 4)
    _, labels = transforms.transform(x, group, mode="random")
    counts = torch.bincount(labels, minlength=g).double()
    expected = len(labels) / g
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < chi2.ppf(0.999, g - 1)
