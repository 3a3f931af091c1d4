"""Unit-cell generators: reproducibility, index stability, ε ranges, fill fractions and symmetries."""

import numpy as np
import pytest

from essl.errors import UserError
from essl.photonics.unitcell import (
    EPS_MAX,
    EPS_MIN,
    FILL_MAX,
    FILL_MIN,
    KINDS,
    c4v_images,
    generate_cells,
    generator_options,
    pixel_grid,
)

N = 64
SIZE = 32


@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_range_reproducible(kind):
    a = generate_cells(kind, N, seed=7)
    b = generate_cells(kind, N, seed=7)
    c = generate_cells(kind, N, seed=8)
    assert isinstance(a, np.ndarray) and a.shape == (N, SIZE, SIZE) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= EPS_MIN and a.max() <= EPS_MAX and np.isfinite(a).all()


@pytest.mark.parametrize("kind", KINDS)
def test_index_stable_across_chunks(kind):
    full = generate_cells(kind, 10, seed=3)
    chunks = [generate_cells(kind, 3, seed=3, start=s) for s in (0, 3, 6)] + [
        generate_cells(kind, 1, seed=3, start=9)
    ]
    np.testing.assert_array_equal(np.concatenate(chunks), full)
    assert generate_cells(kind, 0, seed=3).shape == (0, SIZE, SIZE)


def test_kinds_use_independent_streams():
    eps_blob = generate_cells("blob", 20, seed=0)
    eps_ls = generate_cells("levelset", 20, seed=0)
    assert not np.isin(eps_blob.max(axis=(1, 2)), eps_ls).any()


@pytest.mark.parametrize("kind", ["blob", "levelset"])
def test_two_tone(kind):
    eps = generate_cells(kind, N, seed=1)
    for e in eps:
        assert len(np.unique(e)) <= 2


def test_blob_centred_and_inside_the_cell():
    eps = generate_cells("blob", N, seed=2, eps_in=10.0, eps_out=1.0)
    inside = eps == 10.0
    assert inside.any(axis=(1, 2)).all()
    # Never touches the cell boundary, so the blob is one island, not wrapped around the periodic cell.
    assert not inside[:, [0, -1], :].any() and not inside[:, :, [0, -1]].any()
    x, y = pixel_grid(SIZE)
    area = inside.sum(axis=(1, 2))
    cx = (inside * x).sum(axis=(1, 2)) / area
    cy = (inside * y).sum(axis=(1, 2)) / area
    # Centroid near the centre: only harmonics k >= 2 deform the circle (a few pixels of slack).
    assert np.abs(cx - 0.5).max() < 0.1 and np.abs(cy - 0.5).max() < 0.1


def test_levelset_fill_fraction_and_eps():
    fill = np.linspace(FILL_MIN, FILL_MAX, 9)
    for f in fill:
        eps = generate_cells("levelset", 16, seed=4, symmetry="p4m", fill=float(f), eps_in=12.0, eps_out=2.0)
        achieved = (eps == 12.0).mean(axis=(1, 2))
        # Whole pixels, plus ties inside one orbit of C4v (at most 8 pixels).
        assert np.abs(achieved - f).max() <= 8.5 / SIZE**2
    eps = generate_cells("levelset", 200, seed=5, symmetry="p1")
    lo, hi = eps.min(axis=(1, 2)), eps.max(axis=(1, 2))
    assert (lo >= EPS_MIN).all() and (hi <= EPS_MAX).all()
    # ε_in and ε_out are independent U(1, 20): the larger one is above the midpoint more often than not.
    assert 0.1 < np.mean(hi > (EPS_MIN + EPS_MAX) / 2) < 1.0


def test_levelset_random_fill_is_spread():
    eps = generate_cells("levelset", 300, seed=6, symmetry="p1")
    maxima = eps.max(axis=(1, 2), keepdims=True)
    fill = (eps == maxima).mean(axis=(1, 2))  # fill of the higher ε (either ε_in or ε_out): spans [0, 1]
    assert fill.min() < 0.1 and fill.max() > 0.9


def test_levelset_symmetries():
    pm = generate_cells("levelset", N, seed=9, symmetry="pm")
    np.testing.assert_array_equal(pm, np.flip(pm, axis=-1))
    p4m = generate_cells("levelset", N, seed=9, symmetry="p4m")
    for image in c4v_images(p4m):
        np.testing.assert_array_equal(image, p4m)
    p1 = generate_cells("levelset", N, seed=9, symmetry="p1")
    assert sum(np.array_equal(e, np.flip(e, axis=-1)) for e in p1) < N // 4


def test_levelset_is_low_order_fourier_sum():
    """The thresholded map keeps most of its spectral power on the 3×3 set of lowest reciprocal vectors.

    (Thresholding adds higher harmonics, so this is a statistical check of the |n_i| <= 1 construction.)
    """
    eps = generate_cells("levelset", 32, seed=10, symmetry="p1", fill=0.5, eps_in=2.0, eps_out=1.0)
    power = np.abs(np.fft.fft2(eps - eps.mean(axis=(1, 2), keepdims=True))) ** 2
    low = power[:, [0, 0, 1, 1, 1, -1, -1, -1], [1, -1, 0, 1, -1, 0, 1, -1]].sum()
    assert low / power.sum() > 0.7


def test_c4v_images_are_the_group():
    rng = np.random.default_rng(0)
    g = rng.random((3, 6, 6))
    images = c4v_images(g)
    assert images.shape == (8, 3, 6, 6)
    np.testing.assert_array_equal(images[0], g)
    assert len({im.tobytes() for im in images}) == 8  # eight distinct images of a generic map
    # Closed under composition: every image of an image is one of the eight.
    assert {im.tobytes() for im in c4v_images(images[5])} == {im.tobytes() for im in images}


def test_cylinder_radius_and_values():
    eps = generate_cells("cylinder", 4, seed=0, size=64, radius=0.2, eps_in=8.9, eps_out=1.0)
    assert set(np.unique(eps)) == {np.float32(1.0), np.float32(8.9)}
    fill = (eps == np.float32(8.9)).mean(axis=(1, 2))
    np.testing.assert_allclose(fill, np.pi * 0.2**2, rtol=0.03)
    for image in c4v_images(eps):
        np.testing.assert_array_equal(image, eps)
    smooth = generate_cells("cylinder", 1, seed=0, size=32, radius=0.2, eps_in=8.9, supersample=8)
    np.testing.assert_allclose(smooth.mean(), 1.0 + 7.9 * np.pi * 0.2**2, rtol=0.01)
    rand = generate_cells("cylinder", 200, seed=1, eps_in=5.0)
    filled = (rand == 5.0).mean(axis=(1, 2))
    largest = (generate_cells("cylinder", 1, seed=0, radius=0.5, eps_in=5.0) == 5.0).mean()
    assert 0 <= filled.min() and filled.max() <= largest  # 0 < r <= 0.5
    assert filled.max() > 0.5 * largest


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="kind 'square'"):
        generate_cells("square", 2, 0)
    with pytest.raises(UserError, match="symmetry='p6m'"):
        generate_cells("levelset", 2, 0, symmetry="p6m")
    with pytest.raises(UserError, match="unknown option 'radius'"):
        generate_cells("levelset", 2, 0, radius=0.2)
    with pytest.raises(UserError, match="radius=0.7"):
        generate_cells("cylinder", 2, 0, radius=0.7)
    with pytest.raises(UserError, match="seed=-1"):
        generate_cells("blob", 2, -1)
    with pytest.raises(UserError, match="eps_in=0.5"):
        generate_cells("blob", 2, 0, eps_in=0.5)
    assert generator_options("levelset")["symmetry"] == "pm"
