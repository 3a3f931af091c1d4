"""Tests of the plane-wave band solver against independent references (CPU).

References: the analytic empty lattice; the square lattice of dielectric rods of Joannopoulos et al., "Photonic
Crystals" (2nd ed.), ch. 5 (ε = 8.9, r = 0.2a: TM gap 0.322–0.443, gap/midgap 31%); legume-gme's PlaneWaveExp
(an independent implementation, analytic shape Fourier transforms); finite differences for group velocities.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from essl.photonics import pwe

C128 = torch.complex128


def rasterise(inside, n: int, supersample: int = 8) -> torch.Tensor:
    """Area fraction of each of n×n pixels covered by the shape ``inside(x, y)`` (coordinates centred on the cell
    centre), by supersampling; (n, n) float64, rows = y."""
    m = n * supersample
    c = (torch.arange(m, dtype=torch.float64) + 0.5) / m - 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    return inside(x, y).double().reshape(n, supersample, n, supersample).mean(dim=(1, 3))


def rod_map(n: int, r: float, eps_rod: float, eps_bg: float = 1.0) -> torch.Tensor:
    frac = rasterise(lambda x, y: x**2 + y**2 <= r**2, n)
    return (eps_bg + (eps_rod - eps_bg) * frac)[None]  # (1, n, n)


def ellipse_map(n: int, rx: float, ry: float, phi: float, eps_in: float, eps_bg: float) -> torch.Tensor:
    def inside(x, y):  # same convention as legume.Ellipse.is_inside
        x1 = x * math.cos(phi) + y * math.sin(phi)
        y1 = -x * math.sin(phi) + y * math.cos(phi)
        return (x1 / rx) ** 2 + (y1 / ry) ** 2 <= 1

    return (eps_bg + (eps_in - eps_bg) * rasterise(inside, n))[None]


def test_plane_wave_sets():
    g = pwe.plane_waves(5, "circle")
    assert g.shape == (81, 2) and g[0].tolist() == [0, 0]
    assert (g.pow(2).sum(1) <= 25).all()
    assert pwe.n_plane_waves(5, "square") == 121
    # closed under the 90° rotation (gx, gy) -> (-gy, gx): bands transform exactly under C4v
    rot = torch.stack([-g[:, 1], g[:, 0]], 1)
    assert {tuple(v) for v in rot.tolist()} == {tuple(v) for v in g.tolist()}


@pytest.mark.parametrize("n", [4, 5, 16])
def test_kgrid_time_reversal(n):
    k, w = pwe.kgrid(n)
    full, wf = pwe.kgrid(n, time_reversal=False)
    assert math.isclose(w.sum().item(), 1.0) and math.isclose(wf.sum().item(), 1.0)
    assert len(full) == n * n and len(k) == (n * n + 1) // 2
    # k ∪ −k (weighted) reproduces the full grid
    both = torch.cat([k, -k])
    key = lambda t: {tuple(np.round(v, 9)) for v in t.tolist()}  # noqa: E731
    assert key(both) == key(full)


@pytest.mark.parametrize("pol", ["tm", "te"])
@pytest.mark.parametrize("dtype", [torch.complex64, C128])
def test_empty_lattice(pol, dtype):
    kp, _, _ = pwe.kpath(8)
    kp = torch.cat([kp, torch.tensor([[0.13, 0.31], [-0.42, 0.07]], dtype=torch.float64)])
    eps = torch.tensor([1.0, 4.0, 12.5])[:, None, None].expand(3, 32, 32)
    f = pwe.solve_bands(eps, kp, n_bands=10, polarization=pol, dtype=dtype)  # (3, K, 10)
    for i, e in enumerate([1.0, 4.0, 12.5]):
        ref = pwe.empty_lattice_bands(kp, e, 10)
        # relative to the band frequency (absolute at ω = 0, Γ)
        err = (f[i].double() - ref).abs() / ref.clamp_min(1e-3)
        assert err.max() < 1e-5, (pol, dtype, e, err.max())


def test_square_rods_tm_gap():
    """ε = 8.9 rods, r = 0.2a in air (Joannopoulos et al. ch. 5): TM gap between bands 1 and 2."""
    eps = rod_map(64, 0.2, 8.9)
    kp, _, _ = pwe.kpath(12)
    f = pwe.solve_bands(eps, kp, n_bands=3, cutoff=7, dtype=C128)[0]  # 149 plane waves
    top1, bottom2 = f[:, 0].max().item(), f[:, 1].min().item()
    gap = (bottom2 - top1) / ((bottom2 + top1) / 2)
    print(f"rods: band-1 max {top1:.4f} band-2 min {bottom2:.4f} gap/midgap {gap:.3f}")
    assert abs(top1 / 0.322 - 1) < 0.01 and abs(bottom2 / 0.443 - 1) < 0.01
    assert abs(gap - 0.31) < 0.01


def test_dft_coefficients_alias_limit():
    eps = rod_map(32, 0.2, 8.9)
    with pytest.raises(ValueError, match="alias"):
        pwe.solve_bands(eps, torch.zeros(1, 2), cutoff=8, fourier="dft")
    # within the limit (2m < n/2) both coefficient rules give close bands; "pixel" is allowed at any cutoff
    k = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    a = pwe.solve_bands(eps, k, cutoff=7, fourier="dft", dtype=C128)
    b = pwe.solve_bands(eps, k, cutoff=7, fourier="pixel", dtype=C128)
    assert ((a - b).abs() / b).max() < 0.02
    pwe.solve_bands(eps, k, cutoff=12, fourier="pixel")


@pytest.mark.parametrize("pol", ["tm", "te"])
def test_group_velocity_finite_differences(pol):
    g = torch.Generator().manual_seed(0)
    eps = 1 + 12 * torch.rand(2, 16, 16, generator=g, dtype=torch.float64)
    k = torch.tensor([[0.13, 0.27], [0.41, -0.08], [0.0, 0.0]], dtype=torch.float64)
    f, v = pwe.solve_bands(eps, k, n_bands=6, polarization=pol, cutoff=4, group_velocity=True, dtype=C128)
    h = 1e-5
    for d in range(2):
        dk = torch.zeros(2, dtype=torch.float64)
        dk[d] = h
        fd = pwe.solve_bands(eps, k + dk, 6, pol, 4, dtype=C128) - pwe.solve_bands(eps, k - dk, 6, pol, 4, dtype=C128)
        fd = fd / (2 * h)
        assert (v[:, :2, :, d] - fd[:, :2]).abs().max() < 1e-6
    # ω = 0 at Γ: velocity exactly 0, no NaN (also in complex64)
    assert (v[:, 2, 0] == 0).all()
    _, v32 = pwe.solve_bands(eps.float(), k, 6, pol, 4, group_velocity=True)
    assert torch.isfinite(v32).all() and (v32[:, 2, 0] == 0).all()


def test_complex64_accuracy():
    g = torch.Generator().manual_seed(1)
    eps = 1 + 19 * (torch.rand(3, 32, 32, generator=g) > 0.5).float()
    k, _ = pwe.kgrid(6)
    a = pwe.solve_bands(eps, k, dtype=torch.complex64).double()
    b = pwe.solve_bands(eps, k, dtype=C128)
    err = ((a - b).abs() / b).max().item()
    print(f"complex64 vs complex128: max relative band difference {err:.2e}")
    assert err < 1e-4


def test_c4v_covariance_and_shift_invariance():
    g = torch.Generator().manual_seed(2)
    eps = 1 + 9 * torch.rand(1, 32, 32, generator=g, dtype=torch.float64)
    k = torch.tensor([[0.13, 0.27], [0.41, -0.08]], dtype=torch.float64)
    f = pwe.solve_bands(eps, k, dtype=C128)
    # rot90 on (row = y, col = x) maps (x, y) -> (y, -x) about the cell centre up to a translation: the bands of the
    # rotated cell at the rotated k equal the original ones
    rot = torch.rot90(eps, 1, dims=(-2, -1))
    k_rot = torch.stack([k[:, 1], -k[:, 0]], 1)
    assert torch.allclose(pwe.solve_bands(rot, k_rot, dtype=C128), f, rtol=1e-9, atol=1e-12)
    shifted = torch.roll(eps, (5, -11), dims=(-2, -1))
    assert torch.allclose(pwe.solve_bands(shifted, k, dtype=C128), f, rtol=1e-9, atol=1e-12)


def test_chunking_and_batch_independence_bitwise():
    g = torch.Generator().manual_seed(3)
    eps = 1 + 19 * torch.rand(5, 32, 32, generator=g)
    k, _ = pwe.kgrid(6)  # 18 k-points: padded to 24 internally
    f_all, v_all = pwe.solve_bands(eps, k, group_velocity=True)
    f_small, v_small = pwe.solve_bands(eps, k, group_velocity=True, memory_budget=1)  # k-slices of 8 matrices
    assert torch.equal(f_all, f_small) and torch.equal(v_all, v_small)
    for idx in ([3], [4, 3], [0, 2, 3]):
        f_sub, v_sub = pwe.solve_bands(eps[idx], k, group_velocity=True)
        assert torch.equal(f_sub, f_all[idx]) and torch.equal(v_sub, v_all[idx])


def test_bad_inputs():
    with pytest.raises(ValueError, match="polarization"):
        pwe.solve_bands(torch.ones(1, 8, 8), torch.zeros(1, 2), polarization="tx")
    with pytest.raises(ValueError, match="positive"):
        pwe.solve_bands(torch.zeros(1, 8, 8), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="kpoints"):
        pwe.solve_bands(torch.ones(1, 8, 8), torch.zeros(3))


# ----------------------------------------------------------------------------------------------- legume-gme

legume = pytest.importorskip("legume")


def legume_bands(shape, kpoints: torch.Tensor, gmax: float, pol: str, n_bands: int) -> np.ndarray:
    lattice = legume.Lattice("square")
    phc = legume.PhotCryst(lattice)
    phc.add_layer(d=0.5, eps_b=1.0)
    phc.add_shape(shape)
    solver = legume.PlaneWaveExp(phc.layers[0], gmax=gmax)
    solver.run(kpoints=2 * np.pi * kpoints.numpy().T, pol=pol, numeig=n_bands)  # legume: k in 1/a, (2, K)
    return np.asarray(solver.freqs)  # (K, n_bands), units ωa/2πc


K_LEGUME = torch.tensor([[0.5, 0.0], [0.5, 0.5], [0.17, 0.29], [0.05, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "case",
    [
        ("rods", "tm"),
        ("ellipse", "tm"),
        ("rods", "te"),
    ],
)
def test_legume_shape_defined_cells(case):
    """Both solvers converged (ours: anti-aliased 128×128 map, |G| ≤ 10, 317 plane waves; legume: analytic
    transforms, gmax = 8, 289 plane waves): bands agree within 0.5%."""
    kind, pol = case
    n_bands = 6
    if kind == "rods":
        eps = rod_map(128, 0.2, 8.9)
        shape = legume.Circle(eps=8.9, x_cent=0.0, y_cent=0.0, r=0.2)
    else:
        eps = ellipse_map(128, 0.3, 0.15, 0.4, 6.0, 1.0)
        shape = legume.Ellipse(eps=6.0, x_cent=0.0, y_cent=0.0, rx=0.3, ry=0.15, phi=0.4)
    ours = pwe.solve_bands(eps, K_LEGUME, n_bands, pol, cutoff=10, dtype=C128)[0].numpy()
    ref = legume_bands(shape, K_LEGUME, gmax=8, pol=pol, n_bands=n_bands)
    rel = np.abs(ours - ref) / ref
    print(f"legume {kind} {pol}: max relative difference {rel.max():.2e}")
    assert rel.max() < 5e-3


@pytest.mark.parametrize("pol", ["tm", "te"])
def test_legume_identical_coefficients(pol):
    """Given our exact pixel Fourier coefficients and the same square plane-wave set, legume builds the same
    matrices: bands agree to rounding (checks the matrix assembly independently of the discretisation)."""
    from essl.eval.bench_solver import legume_solver_for_map

    g = torch.Generator().manual_seed(4)
    eps = 1 + 19 * (torch.rand(32, 32, generator=g) > 0.6).double()
    k = torch.tensor([[0.5, 0.0], [0.21, -0.33]], dtype=torch.float64)
    ours = pwe.solve_bands(eps[None], k, 8, pol, cutoff=4, cutoff_shape="square", dtype=C128)[0].numpy()
    solver = legume_solver_for_map(eps.numpy(), gmax=4)
    solver.run(kpoints=2 * np.pi * k.numpy().T, pol=pol, numeig=8)
    np.testing.assert_allclose(ours, np.asarray(solver.freqs), rtol=1e-8)


# ----------------------------------------------------------------------------------------------- symmetry, LAPACK


def test_cell_symmetries_exact():
    from essl.photonics import unitcell

    pm = torch.from_numpy(unitcell.generate_cells("levelset", 3, seed=5))  # one mirror x -> -x
    p4m = torch.from_numpy(unitcell.generate_cells("levelset", 2, seed=5, symmetry="p4m"))
    p1 = torch.from_numpy(unitcell.generate_cells("blob", 3, seed=5))
    found = pwe.cell_symmetries(torch.cat([pm, p4m, p1]))
    assert [set(s) for s in found[:3]] == [{"mx"}] * 3
    assert all(set(s) == set(pwe.POINT_OPS) for s in found[3:5])
    assert all(s == {} for s in found[5:])
    # found after any periodic shift / rotation (the mirror of a rotated pm cell is "my"), and never for a cell
    # that breaks the symmetry by one pixel
    moved = torch.rot90(torch.roll(pm, (7, 13), dims=(-2, -1)), 1, dims=(-2, -1))
    assert [set(s) for s in pwe.cell_symmetries(moved)] == [{"my"}] * 3
    broken = pm.clone()
    broken[:, 3, 4] += 0.5
    assert all(s == {} for s in pwe.cell_symmetries(broken))
    centres = pwe.inversion_centres(torch.cat([pm, p4m]))
    assert centres[:3].isnan().all() and not centres[3:].isnan().any()


@pytest.mark.parametrize("ops", [(), ("mx",), ("d",), ("mx", "my", "c2", "d", "ad", "c4", "c4i")])
@pytest.mark.parametrize("n", [6, 7])
def test_irreducible_kgrid(ops, n):
    k_half, w_half = pwe.kgrid(n)
    k, w, index = pwe.irreducible_kgrid(n, ops)
    assert math.isclose(w.sum().item(), 1.0)
    if not ops:
        assert torch.equal(k, k_half) and torch.equal(w, w_half) and torch.equal(index, torch.arange(len(k_half)))
    # every half-grid point maps to a representative that is its image under an operation of the group or −1
    mats = [torch.tensor(pwe._POINT_OP_MATRICES[o], dtype=torch.float64) for o in ops] + [torch.eye(2).double()]
    for kp, i in zip(k_half, index, strict=True):
        images = [m @ kp for m in mats] + [-(m @ kp) for m in mats]
        assert any(torch.allclose(im, k[i]) for im in images)
    # weights: the number of full-grid points each representative stands for
    counts = torch.bincount(index, weights=w_half, minlength=len(k))
    torch.testing.assert_close(counts, w)


def test_lapack_subset_and_real_inversion_match_torch():
    from essl.photonics import unitcell

    cells = torch.cat(
        [
            torch.from_numpy(unitcell.generate_cells("levelset", 2, seed=6, symmetry="p4m")),  # inversion: real path
            torch.from_numpy(unitcell.generate_cells("blob", 2, seed=6)),
        ]
    )
    k, _ = pwe.kgrid(6)
    for pol in ("tm", "te"):
        ref, v_ref = pwe.solve_bands(
            cells.double(), k, 8, pol, 4, True, dtype=C128, eigensolver="torch", real_inversion=False
        )
        for dtype, tol in ((torch.complex64, 1e-5), (C128, 1e-10)):
            f, v = pwe.solve_bands(cells, k, 8, pol, 4, True, dtype=dtype, eigensolver="lapack")
            assert ((f.double() - ref).abs() / ref).max() < tol, (pol, dtype)
            assert (v.double() - v_ref).abs().max() < 1e3 * tol, (pol, dtype)
    with pytest.raises(ValueError, match="eigensolver"):
        pwe.solve_bands(cells, k, eigensolver="magma")


# ----------------------------------------------------------------------------------------------- inversion centres


def _ellipse_at(n: int, cx: float, cy: float, r: float = 0.3, aspect: float = 0.6, eps_in: float = 12.0):
    """Anti-aliased ellipse (semi-axes r, aspect·r) centred at (cx, cy) (fractional, periodic) on an n×n map in the
    unitcell frame (pixel centres at (j + ½)/n): inversion-symmetric about (cx, cy) whenever the grid is, i.e. when
    cx, cy are pixel centres or pixel corners."""
    s = 8  # supersampling per pixel side
    m = n * s
    c = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    y, x = torch.meshgrid(c, c, indexing="ij")
    dx, dy = (x - cx + 0.5) % 1 - 0.5, (y - cy + 0.5) % 1 - 0.5
    inside = ((dx / r) ** 2 + (dy / (aspect * r)) ** 2 <= 1).double()
    return 1 + (eps_in - 1) * inside.reshape(n, s, n, s).mean(dim=(1, 3))


def _inversion_cells() -> dict[str, torch.Tensor]:
    from essl.photonics import unitcell

    n = 32
    return {
        # centre between pixels (a pixel corner): the cell centre of an even grid, and an off-centre corner
        "cell centre, even grid": _ellipse_at(n, 0.5, 0.5),
        "pixel corner": _ellipse_at(n, 3 / n, 11 / n),
        # centre on a pixel centre
        "pixel centre": _ellipse_at(n, 7.5 / n, 20.5 / n),
        # on a pixel centre in x, between pixels in y
        "mixed": _ellipse_at(n, 7.5 / n, 0.5),
        # p4m level set moved by an odd shift: its centre moves from a corner to a pixel centre
        "p4m level set, rolled": torch.roll(
            torch.from_numpy(unitcell.generate_cells("levelset", 1, seed=8, symmetry="p4m"))[0].double(),
            (5, 0),
            dims=(0, 1),
        ),
        # no inversion centre: a p1 blob and a pm level set (one mirror only)
        "p1 blob": torch.from_numpy(unitcell.generate_cells("blob", 1, seed=8))[0].double(),
        "pm level set": torch.from_numpy(unitcell.generate_cells("levelset", 1, seed=8))[0].double(),
    }


K_INVERSION = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.17, 0.29], [-0.31, 0.06]], dtype=torch.float64)


@pytest.mark.parametrize("fourier", ["pixel", "dft"])
@pytest.mark.parametrize("solver", ["direct", "reduced"])
def test_real_inversion_equals_complex_path(fourier, solver):
    """The real-symmetric shortcut (Fourier origin at the detected inversion centre) solves the same problem as
    the complex one, for centres on a pixel centre, between pixels, mixed, and cells without a centre; for both
    coefficient rules (the "dft" rule used to take the centre half a pixel off: bands off by up to 3.5%)."""
    cells = _inversion_cells()
    eps = torch.stack(list(cells.values()))
    centres = pwe.inversion_centres(eps)
    has_centre = ~centres[:, 0].isnan()
    assert has_centre.tolist() == [True] * 5 + [False] * 2  # the real path is really taken for the first five
    # the centre lies where the construction put it (mod ½: c and c + ½ are both centres of a periodic cell)
    expect = torch.tensor([[0.5, 0.5], [3 / 32, 11 / 32], [7.5 / 32, 20.5 / 32], [7.5 / 32, 0.5]], dtype=torch.float64)
    half_periods = (centres[:4] - expect) / 0.5
    assert (half_periods - half_periods.round()).abs().max() < 1e-12
    k = pwe.kgrid(4)[0] if solver == "reduced" else K_INVERSION
    # the reduced solver is a Rayleigh-Ritz approximation whose basis differs between the real and the complex
    # path; both are compared with the complex direct solve, to within its accepted Ritz error (measured <= 3e-7
    # here; the half-pixel bug was 1e-3..1e-2)
    tols = ((C128, 1e-5), (torch.complex64, 1e-5)) if solver == "reduced" else ((C128, 1e-9), (torch.complex64, 2e-5))
    for pol in ("tm", "te"):
        kw = dict(n_bands=8, polarization=pol, cutoff=4, fourier=fourier, group_velocity=True)
        f_c, v_c = pwe.solve_bands(eps, k, dtype=C128, real_inversion=False, solver="direct", **kw)
        for dtype, tol in tols:
            f_r, v_r = pwe.solve_bands(eps, k, dtype=dtype, real_inversion=True, solver=solver, **kw)
            rel = ((f_r.double() - f_c).abs() / f_c.clamp_min(1e-3)).amax(dim=(1, 2))
            assert (rel < tol).all(), dict(zip(cells, rel.tolist(), strict=True))
            # velocities: compared where bands are not degenerate (at Γ, X, M degenerate pairs have arbitrary bases)
            if solver == "direct":
                generic = slice(3, None)
                assert (v_r[:, generic].double() - v_c[:, generic]).abs().max() < 1e3 * tol


def test_dft_and_pixel_rules_share_the_frame():
    """fourier="dft" on a map refined s× by nearest-neighbour upsampling tends to fourier="pixel" on the original
    (module docstring): the refined map's FFT coefficients are the pixel ones times (πg/ns)/sin(πg/ns) per direction,
    so the entries of [ε] differ by at most ((πg/ns)²/6)·2 relatively (g ≤ 2m). Run through the default real path,
    this also checks that both rules put the inversion centre at the same point."""
    eps = torch.stack(list(_inversion_cells().values()))
    s, m = 8, 4
    up = eps.repeat_interleave(s, -1).repeat_interleave(s, -2)
    assert torch.equal(pwe.inversion_centres(up).isnan(), pwe.inversion_centres(eps).isnan())
    a = pwe.solve_bands(up, K_INVERSION, 8, cutoff=m, fourier="dft", dtype=C128)  # real_inversion=True default
    b = pwe.solve_bands(eps, K_INVERSION, 8, cutoff=m, fourier="pixel", dtype=C128)
    bound = 2 * (math.pi * 2 * m / (32 * s)) ** 2 / 6
    rel = ((a - b).abs() / b.clamp_min(1e-3)).max().item()
    print(f"dft on the 8× refined map vs pixel: max relative band difference {rel:.1e} (entry bound {bound:.1e})")
    assert rel < bound


def test_real_path_refuses_a_wrong_centre():
    eps = _ellipse_at(32, 0.5, 0.5)[None]
    g = pwe.plane_waves(3)
    pwe.inverse_epsilon_matrix(eps, g, "dft", torch.tensor([[0.5, 0.5]], dtype=torch.float64), real=True)
    off = torch.tensor([[0.5 + 1 / 64, 0.5 + 1 / 64]], dtype=torch.float64)  # half a pixel off the centre
    with pytest.raises(RuntimeError, match="not an inversion centre"):
        pwe.inverse_epsilon_matrix(eps, g, "dft", off, real=True)
