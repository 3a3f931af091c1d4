"""Tests of the reduced-basis (Rayleigh–Ritz on patches) band solver against the direct solver.

References: the direct plane-wave solver in complex128 (itself checked against the empty lattice, the rods of
Joannopoulos et al. and legume-gme in test_pwe.py), i.e. an independent diagonalisation of the full matrix at every
k-point; the S·[ε]⁻¹·S form of the direct solver for the quadratic form; its DOS labels.
"""

from __future__ import annotations

import pytest
import torch

from essl.photonics import dos, pwe, reduced, unitcell

C128 = torch.complex128


@pytest.fixture(scope="module")
def blobs() -> torch.Tensor:
    return torch.from_numpy(unitcell.generate_cells("blob", 3, seed=5))


def _direct(eps, k, pol, n_bands=10):
    return pwe.solve_bands(
        eps, k, n_bands, pol, group_velocity=True, dtype=C128, eigensolver="torch", real_inversion=False
    )


@pytest.mark.parametrize("pol", ["tm", "te"])
def test_quadratic_form_has_the_direct_spectrum(blobs, pol):
    g = pwe.plane_waves(5)
    q = reduced.quadratic_form(pwe.epsilon_matrix(blobs, g), g, pol)  # (B, 4, P, P)
    k = torch.tensor([[0.0, 0.0], [0.13, -0.41], [0.5, 0.5], [-0.27, 0.08]], dtype=torch.float64)
    a = torch.stack([(k**2).sum(1), k[:, 0], k[:, 1], torch.ones(len(k), dtype=torch.float64)], 1)
    m = torch.einsum("kj,bjpq->bkpq", a.to(C128), q)
    assert torch.allclose(m, m.mH, atol=1e-12)
    f = torch.linalg.eigvalsh(m)[..., :10].clamp_min(0).sqrt()
    ref = pwe.solve_bands(blobs, k, 10, pol, dtype=C128, eigensolver="torch", real_inversion=False)
    assert torch.allclose(f, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pol", ["tm", "te"])
def test_reduced_matches_direct_on_the_dos_grid(blobs, pol):
    k, _ = pwe.kgrid(20)
    f_ref, v_ref = _direct(blobs, k, pol)
    f, v = pwe.solve_bands(blobs, k, 10, pol, group_velocity=True, solver="reduced")
    rel = (f.double() - f_ref).abs() / f_ref.clamp_min(1e-3)
    assert rel[..., 1:].max() < 1e-3  # measured ~1e-5
    assert (f.double() - f_ref).abs().max() < 1e-4  # band 1 near Γ: small absolute error
    assert rel.median() < 1e-5
    assert (v.double() - v_ref).abs().max() < 5e-3  # measured ~1e-4 (|v| up to ~0.5)


def test_rejected_points_are_solved_exactly_and_accepted_ones_meet_the_tolerance(blobs):
    """A deliberately poor basis (2×2 patches of the whole zone, 28 directions each): the points whose error
    estimate exceeds the tolerance are re-solved with the full matrix, and every accepted point is within it."""
    g = pwe.plane_waves(5)
    q = reduced.quadratic_form(pwe.epsilon_matrix(blobs, g), g, "tm")
    k, _ = pwe.kgrid(8)
    f_ref, v_ref = _direct(blobs, k, "tm")
    tol = 1e-2
    poor = dict(patches=2, seed_bands=12, basis_size=28)
    f, v, info = reduced.solve_reduced(q, k, 10, residual_tol=tol, **poor)
    assert 0 < info["fallback"] < info["solved"]
    theta, theta_ref = f**2, f_ref**2
    scale = torch.maximum(theta_ref, reduced._SCALE_FLOOR * theta_ref.amax(-1, keepdim=True))
    assert ((theta - theta_ref).abs() / scale).max() <= tol
    # without the check the same basis is visibly wrong: the estimate is what makes the result right
    f_raw, _, _ = reduced.solve_reduced(q, k, 10, residual_tol=float("inf"), **poor)
    assert ((f_raw**2 - theta_ref).abs() / scale).max() > tol
    # tolerance 0: everything re-solved, identical to the direct solver
    f0, v0, info0 = reduced.solve_reduced(q, k, 10, residual_tol=0.0, **poor)
    assert info0["fallback"] == info0["solved"]
    assert torch.allclose(f0, f_ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(v0, v_ref, atol=1e-8)


def test_real_inversion_cells_and_batch_independence():
    eps = torch.ones(2, 32, 32)
    y, x = torch.meshgrid((torch.arange(32) + 0.5) / 32 - 0.5, (torch.arange(32) + 0.5) / 32 - 0.5, indexing="ij")
    eps[0][(x**2 + y**2) < 0.2**2] = 8.9  # rods: inversion centre, real symmetric problems
    eps[1] = torch.from_numpy(unitcell.generate_cells("blob", 1, seed=9))[0]
    k, _ = pwe.kgrid(20)
    f_ref, _ = _direct(eps, k, "tm")
    f, v = pwe.solve_bands(eps, k, 10, group_velocity=True, solver="reduced")
    assert ((f.double() - f_ref).abs() / f_ref.clamp_min(1e-3))[..., 1:].max() < 1e-3
    f1, v1 = pwe.solve_bands(eps[1:], k, 10, group_velocity=True, solver="reduced")
    assert torch.equal(f1[0], f[1]) and torch.equal(v1[0], v[1])


def test_labels_from_the_reduced_solver(blobs):
    ref = dos.compute_labels(blobs, band_solver="direct")
    out = dos.compute_labels(blobs, band_solver="reduced")
    assert float(dos.relative_l1(out["target"], ref["target"])) < 1e-4  # measured ~1e-5
    assert dos.label_settings(band_solver="direct") != dos.label_settings()
    with pytest.raises(ValueError, match="band_solver"):
        dos.label_settings(band_solver="ritz")
    with pytest.raises(ValueError, match="solver"):
        pwe.solve_bands(blobs, torch.zeros(1, 2), solver="ritz")


# ---- the batched path (structures solved together) against the per-structure path ---------------------------------


@pytest.fixture(scope="module")
def mixed() -> torch.Tensor:
    """Blobs (p1), pm and p4m level sets and a rod: complex and real (inversion-centre) problems, 1-8 symmetries."""
    parts = [
        unitcell.generate_cells("blob", 2, seed=21),
        unitcell.generate_cells("levelset", 2, seed=21),
        unitcell.generate_cells("levelset", 1, seed=21, symmetry="p4m"),
        unitcell.generate_cells("cylinder", 1, seed=21),
    ]
    return torch.cat([torch.from_numpy(p) for p in parts])


@pytest.mark.parametrize("pol", ["tm", "te"])
@pytest.mark.parametrize("eigensolver", ["lapack", "torch"])  # torch: the GPU's path
def test_batched_reduced_solver_equals_the_per_structure_path(mixed, pol, eigensolver):
    g = pwe.plane_waves(5)
    q = reduced.quadratic_form(pwe.epsilon_matrix(mixed, g), g, pol)  # every kind through the reduced basis
    k, _ = pwe.kgrid(20)
    kw = dict(seed_dtype=torch.complex64, eigensolver=eigensolver)
    f0, v0, info0 = reduced.solve_reduced(q, k, 10, batched=False, **kw)
    f1, v1, info1 = reduced.solve_reduced(q, k, 10, **kw)
    # the same k-points re-solved, and the same numbers to rounding (complex128 forms: ~1e-14 measured)
    assert info1["fallback"] == info0["fallback"] and info1["solved"] == info0["solved"]
    torch.testing.assert_close(f1, f0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v1, v0, rtol=1e-8, atol=1e-10)
    assert info1["max_error"] == pytest.approx(info0["max_error"], rel=1e-6)
    # a structure's result does not depend on the rest of its batch or on the sub-batch size, bit for bit on CPU
    one = reduced.solve_reduced(q, k, 10, memory_budget=1, **kw)  # sub-batches of one structure
    part = reduced.solve_reduced(q[[4, 0, 3]], k, 10, **kw)
    assert torch.equal(one[0], f1) and torch.equal(one[1], v1)
    assert torch.equal(part[0], f1[[4, 0, 3]]) and torch.equal(part[1], v1[[4, 0, 3]])


def test_batched_re_solves_the_same_points_with_a_poor_basis(blobs):
    """The fallback (full-matrix re-solves) batched over structures: a basis so poor that many points fail."""
    g = pwe.plane_waves(5)
    q = reduced.quadratic_form(pwe.epsilon_matrix(blobs, g), g, "tm")
    k, _ = pwe.kgrid(8)
    poor = dict(patches=2, seed_bands=12, basis_size=28)
    f0, v0, info0 = reduced.solve_reduced(q, k, 10, batched=False, **poor)
    f1, v1, info1 = reduced.solve_reduced(q, k, 10, memory_budget=2**20, **poor)  # small fallback groups
    assert 0 < info1["fallback"] == info0["fallback"] < info1["solved"]
    torch.testing.assert_close(f1, f0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v1, v0, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pol", ["tm", "te"])
@pytest.mark.parametrize("band_solver", ["auto", "reduced"])
def test_batched_labels_equal_the_per_structure_labels(mixed, pol, band_solver):
    """compute_labels, batched (the reduced basis and the GGR DOS over the structures of a group) against the
    per-structure path, on blobs, pm and p4m level sets and a rod (the float32 labels agree to rounding; measured
    bit for bit)."""
    kw = dict(polarization=pol, band_solver=band_solver)
    ref = dos.compute_labels(mixed, batched=False, **kw)
    out = dos.compute_labels(mixed, **kw)
    for key in ("bands", "dos", "target", "eps_avg"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=1e-6)
    assert float(dos.relative_l1(out["target"], ref["target"])) < 1e-6
    part = dos.compute_labels(mixed[[5, 1]], **kw)  # batch-independent, bit for bit
    assert all(torch.equal(part[key], out[key][[5, 1]]) for key in out)
