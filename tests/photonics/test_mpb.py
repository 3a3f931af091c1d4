"""essl's plane-wave solver against MPB, an independent solver (different basis, discretisation and eigensolver).

Both are extrapolated to convergence before they are compared, so that the tolerance is set by how well each is
converged, not by how far apart two finite discretisations of the same pixel map happen to be:

* essl: TM bands are a Galerkin (Rayleigh–Ritz) approximation in the plane waves |G| ≤ m of the exact pixel-map
  operator (exact pixel Fourier coefficients), so they decrease monotonically with m; the error goes as ~m⁻³
  (measured from m = 5 to 28 on these cells). Richardson with order 3 from m = 7 and 10.
* MPB: its error goes as ~h² in the grid spacing h = 1/resolution (measured from 32 to 256). Richardson with order
  2 from resolutions 32 and 64, whole multiples of the 32 pixels so that MPB's voxels line up with pixel edges
  (16 → 32 extrapolates 10× worse; at 48 the max error was larger than at 32 on the blob: non-aligned grids
  converge irregularly).

Convergence measurement (10 TM bands, these three cells, at Γ, X, M, (0.17, 0.29) and (0.225, 0.125); converged
value: MPB's order-2 extrapolation from resolutions 192 and 256, which essl at |G| ≤ 28 (2453 plane waves) matches
to 6.6e-5 and essl's own extrapolation from |G| ≤ 10, 14 to 1.0e-4). Largest relative band error of essl's (7, 10)
extrapolation: 6.7e-6 / 7.8e-6 / 2.8e-4 (blob / level set / rods); of MPB's (32, 64): 1.2e-5 / 1.6e-5 / 2.3e-4.
Group velocities at the generic points (units of c): MPB at 64 differs from essl at |G| ≤ 14 by 2.5e-4 / 3.4e-4 /
3.3e-3 and essl at |G| ≤ 10 from MPB at 128 by 9e-5 / 3.1e-4 / 3.6e-3 (MPB 128 and essl 14 agree to 8e-5 / 1.1e-4 /
7.9e-4). Every tolerance below is twice the sum of the two solvers' measured errors, per cell. The rods are by far
the hardest case: a small high-ε inclusion whose pixel corners concentrate the field.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from essl.photonics import mpb, pwe, unitcell

_REASON = mpb.mpb_unavailable_reason()
needs_mpb = pytest.mark.skipif(_REASON is not None, reason=f"MPB not available: {_REASON}")

C128 = torch.complex128
K_POINTS = np.array([[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.17, 0.29]])
"""Γ, X, M and a generic point (units of 2π/a)."""
GENERIC = slice(3, None)
N_BANDS = 10
ESSL_CUTOFFS = (7, 10)
ESSL_ORDER = 3
MPB_RESOLUTIONS = (32, 64)
MPB_ORDER = 2
BAND_TOLERANCE = {"blob": 2 * (6.7e-6 + 1.2e-5), "levelset": 2 * (7.8e-6 + 1.6e-5), "rods": 2 * (2.8e-4 + 2.3e-4)}
"""Relative band tolerance per cell (module docstring)."""
VELOCITY_TOLERANCE = {"blob": 2 * (2.5e-4 + 9e-5), "levelset": 2 * (3.4e-4 + 3.1e-4), "rods": 2 * (3.3e-3 + 3.6e-3)}
"""Absolute group-velocity tolerance per cell, units of c (module docstring)."""


def _cells() -> dict[str, np.ndarray]:
    """The highest-contrast blob and level set of 400 (seed 2) and the rods of Joannopoulos et al. ch. 5 (ε = 8.9,
    r = 0.2a) as a two-tone 32×32 map."""
    return {
        "blob": unitcell.generate_cells("blob", 1, seed=2, start=134)[0],
        "levelset": unitcell.generate_cells("levelset", 1, seed=2, start=214)[0],
        "rods": unitcell.generate_cells("cylinder", 1, seed=0, radius=0.2, eps_in=8.9, eps_out=1.0)[0],
    }


def _richardson(coarse: np.ndarray, fine: np.ndarray, ratio: float, order: float) -> np.ndarray:
    return fine + (fine - coarse) / (ratio**order - 1)


@pytest.fixture(scope="module")
def solved():
    cells = _cells()
    eps = np.stack(list(cells.values())).astype(np.float64)
    runs = [mpb.solve_bands_mpb(eps, K_POINTS, N_BANDS, resolution=r, group_velocity=True) for r in MPB_RESOLUTIONS]
    ours = [
        pwe.solve_bands(
            torch.from_numpy(eps), torch.from_numpy(K_POINTS), N_BANDS, cutoff=m, dtype=C128, group_velocity=True
        )
        for m in ESSL_CUTOFFS
    ]
    mpb_ref = _richardson(runs[0][0], runs[1][0], MPB_RESOLUTIONS[1] / MPB_RESOLUTIONS[0], MPB_ORDER)
    return cells, runs, [(f.numpy(), v.numpy()) for f, v in ours], mpb_ref


@needs_mpb
def test_bands_agree_with_mpb(solved):
    cells, _, ours, ref = solved
    (e_a, _), (e_b, _) = ours
    est = _richardson(e_a, e_b, ESSL_CUTOFFS[1] / ESSL_CUTOFFS[0], ESSL_ORDER)
    rel = np.abs(est - ref) / np.maximum(ref, 1e-3)  # ω = 0 at Γ: absolute (both are 0 to rounding)
    for i, name in enumerate(cells):
        tol = BAND_TOLERANCE[name]
        print(f"{name}: essl vs MPB, max relative band difference {rel[i].max():.1e} (tolerance {tol:.1e})")
        assert rel[i].max() < tol, name


@needs_mpb
def test_essl_tm_bands_are_variational_upper_bounds(solved):
    """Galerkin in nested plane-wave sets (variational principle): every TM band decreases with the cutoff and
    stays above the converged value (MPB's extrapolation, less its own measured error)."""
    cells, _, ours, ref = solved
    (e_a, _), (e_b, _) = ours
    assert (e_a >= e_b - 1e-12).all()
    for i, name in enumerate(cells):
        assert (e_b[i] >= ref[i] * (1 - BAND_TOLERANCE[name] / 2) - 1e-12).all(), name


@needs_mpb
def test_group_velocities_agree_with_mpb(solved):
    """MPB's velocities against essl's Hellmann–Feynman ones at the generic point (no degeneracies), both at the
    finer setting; the ω = 0 mode at Γ has velocity 0 in both."""
    cells, runs, ours, _ = solved
    v_mpb, v_ours = runs[1][1], ours[1][1]
    for i, name in enumerate(cells):
        diff = np.abs(v_mpb[i, GENERIC] - v_ours[i, GENERIC]).max()
        print(f"{name}: group velocity, max |MPB − essl| {diff:.1e} c (tolerance {VELOCITY_TOLERANCE[name]:.1e})")
        assert diff < VELOCITY_TOLERANCE[name], name
    assert np.abs(v_mpb[:, 0, 0]).max() < 1e-6 and (v_ours[:, 0, 0] == 0).all()


@needs_mpb
def test_conventions_are_checked_by_a_transposed_cell(solved):
    """The agreement is not an accident of symmetry: the level set transposed (x <-> y) has bands at the generic
    k-point 100× further from MPB's than the tolerance, so swapped axes would have failed."""
    _, runs, _, ref = solved
    cells = _cells()
    flipped = np.ascontiguousarray(cells["levelset"].T).astype(np.float64)
    f_t = pwe.solve_bands(torch.from_numpy(flipped[None]), torch.from_numpy(K_POINTS), N_BANDS, cutoff=10, dtype=C128)
    i = list(cells).index("levelset")
    rel = np.abs(f_t[0].numpy()[GENERIC] - ref[i, GENERIC]) / ref[i, GENERIC]
    assert rel.max() > 100 * BAND_TOLERANCE["levelset"]


def test_unavailable_interpreter_is_reported(tmp_path):
    missing = str(tmp_path / "no-python")
    assert not mpb.mpb_available(missing)
    assert "not found" in mpb.mpb_unavailable_reason(missing)
    with pytest.raises(RuntimeError, match="not available"):
        mpb.solve_bands_mpb(np.ones((1, 4, 4)), np.zeros((1, 2)), 1, python=missing)
