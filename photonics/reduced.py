"""Reduced-basis band solver: Rayleigh–Ritz on patches of the Brillouin zone, with an a-posteriori error check.

Every eigenproblem of :mod:`essl.photonics.pwe` is a Hermitian matrix that is *quadratic* in the Bloch vector k:

    M(k) = |k|² Q₀ + k_x Q_x + k_y Q_y + Q₂.

* TM: the generalised problem K(k) E = λ [ε] E with K = diag(|k+G|²). With the Cholesky factor [ε] = L Lᴴ,
  C = L⁻¹ and y = Lᴴ E it is the standard problem M(k) = C K(k) Cᴴ, so Q₀ = C Cᴴ, Q_d = 2 C diag(G_d) Cᴴ,
  Q₂ = C diag(|G|²) Cᴴ. Its eigenvalues are those of S [ε]⁻¹ S (the form used by :func:`pwe.solve_bands`).
* TE: M(k) = Σ_d D_d [ε]⁻¹ D_d with D_d = diag(k_d + G_d), so Q₀ = [ε]⁻¹, Q_d = G_d [ε]⁻¹ + [ε]⁻¹ G_d,
  Q₂ = Σ_d G_d [ε]⁻¹ G_d (G_d = diag of the d-components of the plane waves).

Because the k-dependence is a fixed polynomial, a basis V (P × r) gives the reduced matrices R_j = Vᴴ Q_j V once
and then, at every k, an r × r problem H(k) = |k|² R₀ + k_x R_x + k_y R_y + R₂ — the k·p idea of Luttinger & Kohn
(Phys. Rev. 97, 869 (1955)) with the basis taken from exact solutions at nearby k. Here the zone is cut into
``patches`` × ``patches`` square patches; the basis of a patch spans the lowest ``seed_bands`` eigenvectors at its
four corners (seeds shared between neighbouring patches), compressed to its ``basis_size`` most significant
directions. Ritz values are upper bounds of the exact eigenvalues (Poincaré / Cauchy interlacing);
group velocities follow from the Ritz vectors, dθ/dk_d = cᴴ ∂H/∂k_d c (Hellmann–Feynman in the subspace).

Accuracy is checked, not assumed. For a Ritz pair (θ, x = Vc) the residual r = M x − θ x is orthogonal to the basis,
r = (I − VVᴴ) M V c, so ‖r‖² = Σ_ij a_i a_j cᴴ Z_iᴴ Z_j c with Z_j = (I − VVᴴ) Q_j V: precomputed once per patch and
free of cancellation. The error estimate is the block Kato–Temple bound ‖r‖²/δ (Parlett, "The Symmetric Eigenvalue
Problem", ch. 11; :func:`_error_estimate`), with the gap δ to the rest of the spectrum estimated from the
neighbouring Ritz values (so it is an estimate, not a proof). Every k-point where a band's estimate exceeds
``residual_tol`` · max(θ, 1e-4 · θ_max) is re-solved with the full matrix, so the result does not rely on the basis
being good (tests force a poor basis and check every accepted point against the direct solver). Measured on the
default labels (20×20 grid, 81 plane waves, 10 TM bands, 16 blob / 16 level-set cells): DOS targets within
1.6e-5 / 2.3e-5 relative L1 of the direct solver's, band frequencies within 2.3e-4 (median 3e-7), at 1.9–2.8× less
cost on CPU (README, "Photonic-crystal data").

Batching. :func:`solve_reduced` runs the structures of a call together (sub-batches within ``memory_budget``):
every step above is one op over (structure, patch, slot), so a GPU sees a few dozen large ops per sub-batch instead
of ~1,000 small ones per structure, and the only explicit host read is the mask of the points to re-solve. The
per-structure loop it replaced is kept (``batched=False``) as its reference: the two agree to rounding
(~1e-14 on complex128 forms), and the batched results of a structure do not depend on its batch, bit for bit on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from essl.photonics.lapack import cholesky, lapack_lowest

DEFAULT_PATCHES = 4
"""Patches per direction of the zone [-½, ½]²: 0.25 × 0.25 patches, 25 points each of a 20×20 grid."""
DEFAULT_SEED_BANDS = 12
"""Eigenvectors kept at every seed k-point (at least n_bands + 2)."""
DEFAULT_BASIS_SIZE = 28
"""Directions kept per patch out of 4 × seed_bands."""
DEFAULT_RESIDUAL_TOL = 1e-2
"""Relative error estimate (of the eigenvalue θ = f²) above which a k-point is re-solved with the full matrix. The
estimate is pessimistic: accepted points were measured at least 20× more accurate than it allows."""

DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes of working memory per sub-batch of structures in the batched path (the same default as the direct
solver's, :data:`essl.photonics.pwe.DEFAULT_MEMORY_BUDGET`; ~20 MB per structure on the default labels)."""

_ZERO_FREQUENCY = 1e-6
_SCALE_FLOOR = 1e-4
"""Errors are judged relative to max(θ, _SCALE_FLOOR · θ_max): near ω = 0 (band 1 around Γ) absolutely."""


def quadratic_form(eps_matrix: torch.Tensor, gvecs: torch.Tensor, polarization: str) -> torch.Tensor:
    """Coefficients (B, 4, P, P) = (Q₀, Q_x, Q_y, Q₂) of M(k) (module docstring) from the Toeplitz matrix [ε]
    (B, P, P) (complex, or real about an inversion centre) and the plane waves ``gvecs`` (P, 2), in the dtype of
    ``eps_matrix``."""
    g = gvecs.to(device=eps_matrix.device, dtype=eps_matrix.real.dtype)  # (P, 2)
    gx, gy = g[:, 0], g[:, 1]
    if polarization == "tm":
        eye = torch.eye(eps_matrix.shape[-1], dtype=eps_matrix.dtype, device=eps_matrix.device)
        c = torch.linalg.solve_triangular(cholesky(eps_matrix), eye, upper=False)  # C = L⁻¹
        ch = c.mH
        q0 = c @ ch
        qx = 2 * (c * gx) @ ch
        qy = 2 * (c * gy) @ ch
        q2 = (c * (gx**2 + gy**2)) @ ch
    else:
        a = torch.cholesky_inverse(cholesky(eps_matrix))  # [ε]⁻¹
        q0 = a
        qx = gx[:, None] * a + a * gx
        qy = gy[:, None] * a + a * gy
        q2 = gx[:, None] * a * gx + gy[:, None] * a * gy
    q = torch.stack([q0, qx, qy, q2], dim=1)
    return (q + q.mH) / 2  # exactly Hermitian


def _coefficients(k: torch.Tensor) -> torch.Tensor:
    """(K, 4) coefficients (|k|², k_x, k_y, 1) of the quadratic form at k-points (K, 2)."""
    return torch.stack([(k**2).sum(-1), k[:, 0], k[:, 1], torch.ones_like(k[:, 0])], dim=-1)


def _assemble(q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """M(k) = Σ_j a[:, j] q[j] for one structure's form q (4, P, P) at coefficients a (K, 4) -> (K, P, P)."""
    n = q.shape[-1]
    return (a.to(q.dtype) @ q.reshape(4, n * n)).reshape(-1, n, n)


def _lowest(mats: torch.Tensor, n: int, eigensolver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest n eigenpairs of a stack of Hermitian matrices (m, P, P)."""
    if eigensolver == "lapack":
        lam, vec = lapack_lowest(mats.contiguous(), n, True)
        return lam, vec
    lam, vec = torch.linalg.eigh(mats)
    return lam[..., :n], vec[..., :n]


_SEED_OFFSETS = ((0, 0), (2, 0), (0, 2), (2, 2))
"""Seeds of a patch in half-patch units from its lower-left corner: its four corners, shared with the neighbouring
patches (adding the centre made the basis barely better, at 50% more seed problems on the default grid)."""


def _patch_layout(kpoints: torch.Tensor, patches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch of every k-point, the used patches' seed indices, and the seed k-points.

    Returns:
        patch_of_k (K,) index into the used patches; seeds_of_patch (n_used, 4) indices into seed_k; seed_k (S, 2)
        float64 (the corners of the used patches, each once).
    """
    w = 1.0 / patches
    ij = torch.floor((kpoints.to(torch.float64) + 0.5) / w).long().clamp(0, patches - 1)  # (K, 2) (col x, row y)
    flat = ij[:, 1] * patches + ij[:, 0]
    used, patch_of_k = torch.unique(flat, return_inverse=True)
    # seeds on the half-patch lattice: corners (2j, 2i), (2j+2, 2i), ...
    seed_ids: dict[tuple[int, int], int] = {}
    seeds_of_patch = []
    for p in used.tolist():
        i, j = divmod(p, patches)
        row = []
        for dx, dy in _SEED_OFFSETS:
            row.append(seed_ids.setdefault((2 * j + dx, 2 * i + dy), len(seed_ids)))
        seeds_of_patch.append(row)
    seed_u = torch.tensor(list(seed_ids), dtype=torch.float64)  # (S, 2) in half-patch units
    seed_k = seed_u * (w / 2) - 0.5
    return patch_of_k, torch.tensor(seeds_of_patch, dtype=torch.long), seed_k


def _derivatives(q: torch.Tensor, c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """dθ/dk_d = cᴴ (2 k_d Q₀ + Q_d) c / cᴴc for eigenvectors c (..., m, n, nb) of the forms q (..., 4, n, n) at
    k-points k (..., m, 2), batched over the leading dimensions: (..., m, 2, nb)."""
    n, nb = c.shape[-2:]
    m = c.shape[-3]
    cols = c.transpose(-3, -2).reshape(*c.shape[:-3], n, m * nb)  # (..., n, m·nb)
    qc = (q[..., :3, :, :].reshape(*q.shape[:-3], 3 * n, n) @ cols).reshape(*c.shape[:-3], 3, n, m, nb)
    e = (cols.reshape(*c.shape[:-3], 1, n, m, nb).conj() * qc).real.sum(-3)  # (..., 3, m, nb) = cᴴ Q_j c
    e = e / (c.conj() * c).real.sum(-2).unsqueeze(-3)
    kd = k.movedim(-1, -2)[..., :, :, None].to(e.dtype)  # (..., 2, m, 1)
    return (2 * kd * e[..., :1, :, :] + e[..., 1:3, :, :]).movedim(-3, -2)


def _padded_layout(patch_of_k: torch.Tensor, n_used: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-point indices grouped by patch, (n_used, m) with m the largest group; the empty slots of a patch repeat its
    first k-point. Also the mask (n_used, m) of the slots that are not repeats."""
    counts = torch.bincount(patch_of_k, minlength=n_used)
    m = int(counts.max())
    order = torch.argsort(patch_of_k, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(m, device=patch_of_k.device)
    valid = slot[None, :] < counts[:, None]
    pos = starts[:, None] + torch.where(valid, slot[None, :], 0)
    return order[pos], valid


def _error_estimate(theta: torch.Tensor, res: torch.Tensor, cluster: float = 1e-3) -> torch.Tensor:
    """Estimated |θ_i − λ_i| from ascending Ritz values θ (..., L) and their residual norms (..., L).

    Block Kato–Temple (Parlett, "The Symmetric Eigenvalue Problem", ch. 11): for a cluster of Ritz values separated
    from the rest of the spectrum by δ, every eigenvalue error in it is at most Σ_cluster ‖r_j‖² / δ. Neighbours
    are put in one cluster when the gap between them, less both residuals (a lower bound of the exact gap), is below
    ``cluster`` · θ_max: bands that cross (exactly, on mirror lines, or nearly) are then judged by their distance to
    the other bands, not by their tiny mutual gap. The top Ritz value only serves as a neighbour (its own gap above
    is unknown, so its error estimate is inf)."""
    length = theta.shape[-1]
    gap = theta[..., 1:] - theta[..., :-1] - res[..., 1:] - res[..., :-1]  # (..., L-1)
    cut = gap > cluster * theta[..., -1:].abs()
    r2 = res**2
    inf = torch.full_like(theta[..., 0], float("inf"))
    zero = torch.zeros_like(theta[..., 0])
    left = [inf]  # gap below the cluster of each index
    acc = [r2[..., 0]]  # Σ ‖r‖² of the cluster so far, from the left
    for i in range(1, length):
        left.append(torch.where(cut[..., i - 1], gap[..., i - 1], left[-1]))
        acc.append(torch.where(cut[..., i - 1], r2[..., i], acc[-1] + r2[..., i]))
    right = [zero]  # unknown above the top
    total = [acc[-1]]
    for i in range(length - 2, -1, -1):
        right.append(torch.where(cut[..., i], gap[..., i], right[-1]))
        total.append(torch.where(cut[..., i], acc[i], total[-1]))
    right, total = right[::-1], total[::-1]
    delta = torch.minimum(torch.stack(left, -1), torch.stack(right, -1))
    return torch.stack(total, -1) / delta.clamp_min(torch.finfo(theta.dtype).tiny)


def solve_reduced(
    q: torch.Tensor,
    kpoints: torch.Tensor,
    n_bands: int,
    group_velocity: bool = True,
    *,
    patches: int = DEFAULT_PATCHES,
    seed_bands: int = DEFAULT_SEED_BANDS,
    basis_size: int = DEFAULT_BASIS_SIZE,
    residual_tol: float = DEFAULT_RESIDUAL_TOL,
    seed_dtype: torch.dtype | None = None,
    eigensolver: str = "torch",
    batched: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Lowest ``n_bands`` frequencies f = √θ (and group velocities) at ``kpoints`` (K, 2) for every structure of the
    quadratic forms ``q`` (B, 4, P, P) (:func:`quadratic_form`, float64 / complex128), by Rayleigh–Ritz on patches
    (module docstring).

    Args:
        seed_dtype: dtype of the seed eigenproblems (default: that of ``q``; complex64 / float32 is enough, the
            basis only has to span the right space).
        eigensolver: "lapack" (CPU subset solver of :mod:`pwe`) or "torch" for the seed problems.
        batched: solve the structures together, in sub-batches of at most ``memory_budget`` bytes of working
            memory (DEFAULT): every step is one batched op over (structure, patch, k-point) and the only explicit
            host read of a sub-batch is the mask of k-points to re-solve (with the largest accepted error estimate).
            ``False``: the per-structure path (:func:`_solve_per_structure`), the reference it agrees with to
            rounding (tests/photonics/test_reduced.py).
        memory_budget: bytes of working memory per sub-batch of structures (``batched`` only).

    Pass ``kpoints`` on the CPU: the patch layout is computed on the host (k-points on a device cost one read).

    Returns:
        freqs (B, K, n_bands) and vgroup (B, K, n_bands, 2) (None without ``group_velocity``) in the real dtype of
        ``q``, and info {"fallback": number of (structure, k-point) pairs re-solved with the full matrix,
        "solved": B·K, "max_error": largest relative error estimate accepted}.
    """
    if not batched:
        return _solve_per_structure(
            q,
            kpoints,
            n_bands,
            group_velocity,
            patches=patches,
            seed_bands=seed_bands,
            basis_size=basis_size,
            residual_tol=residual_tol,
            seed_dtype=seed_dtype,
            eigensolver=eigensolver,
        )
    b_count, _, p, _ = q.shape
    seed_bands = min(max(seed_bands, n_bands + 2), p)
    k_host = kpoints.detach().cpu().to(torch.float64)
    patch_of_k, seeds_of_patch, seed_k = _patch_layout(k_host, patches)  # host-side bookkeeping, no device reads
    n_used = seeds_of_patch.shape[0]
    r = min(basis_size, p, seeds_of_patch.shape[1] * seed_bands)
    if r < n_bands + 2:
        raise ValueError(f"basis_size={basis_size}: must be at least n_bands + 2 = {n_bands + 2}")
    slots, valid = _padded_layout(patch_of_k, n_used)  # (n_used, m)
    device, real = q.device, q.real.dtype
    layout = _Layout(
        k=k_host.to(device=device, dtype=real),
        seed_k=seed_k.to(device=device, dtype=real),
        seeds_of_patch=seeds_of_patch.to(device),
        slots=slots.to(device),
        valid=valid.reshape(-1).nonzero()[:, 0].to(device),
        target=slots[valid].to(device),
    )
    n_k = len(k_host)
    freqs = torch.empty(b_count, n_k, n_bands, dtype=real, device=device)
    vg = torch.empty(b_count, n_k, n_bands, 2, dtype=real, device=device) if group_velocity else None
    info = {"fallback": 0, "solved": b_count * n_k, "max_error": 0.0}
    per_structure = _bytes_per_structure(q, len(seed_k), n_used, slots.shape[1], seed_bands, r)
    step = max(1, memory_budget // per_structure)
    for s0 in range(0, b_count, step):
        s1 = min(s0 + step, b_count)
        f, v, fallback, max_error = _solve_batch(
            q[s0:s1],
            layout,
            n_bands,
            group_velocity,
            seed_bands=seed_bands,
            r=r,
            residual_tol=residual_tol,
            seed_dtype=seed_dtype,
            eigensolver=eigensolver,
            memory_budget=memory_budget,
        )
        freqs[s0:s1] = f
        if group_velocity:
            vg[s0:s1] = v
        info["fallback"] += fallback
        info["max_error"] = max(info["max_error"], max_error)
    return freqs, vg, info


_BATCH_WORKSPACE_FACTOR = 2
"""Bytes of a sub-batch per byte of its largest live tensors (:func:`_bytes_per_structure`): temporaries, casts,
eigensolver workspace."""
_FALLBACK_WORKSPACE_FACTOR = 6
"""Bytes per byte of a re-solved k-point's matrix: its form Q (4 matrices), M(k), eigenvectors, workspace."""


@dataclass
class _Layout:
    """The device-side layout of the k-points of one :func:`solve_reduced` call (shared by every structure)."""

    k: torch.Tensor  # (K, 2) k-points
    seed_k: torch.Tensor  # (S, 2) seed k-points (the corners of the used patches)
    seeds_of_patch: torch.Tensor  # (n_used, 4) indices into seed_k
    slots: torch.Tensor  # (n_used, m) k-point of every slot of every patch (repeats pad the short patches)
    valid: torch.Tensor  # (K,) flat indices (into n_used·m) of the slots that are not repeats (integer indices:
    # a boolean mask on a GPU would cost a blocking read per use)
    target: torch.Tensor  # (K,) the k-point of every valid slot, each k-point once


def _bytes_per_structure(q: torch.Tensor, n_seeds: int, n_used: int, m: int, seed_bands: int, r: int) -> int:
    """Estimated working memory of one structure in :func:`_solve_batch`: its seed matrices and their
    eigenvectors, the patch bases and Q_j V products, the residual Grams and the Ritz problems of every slot."""
    p, item = q.shape[-1], q.element_size()
    low = item // 2  # single precision (Ritz vectors, residual Grams)
    elems = (
        n_seeds * p * (p + seed_bands) * 2  # seed matrices (and their cast), eigenvectors
        + n_used * p * 4 * seed_bands * 2  # seed vectors per patch, rotated basis
        + n_used * 4 * p * r * 3  # Q_j V, V (Vᴴ Q_j V), the projected residual directions
        + n_used * 16 * r * r  # residual Grams
        + n_used * m * r * r * 4  # Ritz matrices h, h·c, their casts, the residual weights w
    )
    return max(1, elems * item * _BATCH_WORKSPACE_FACTOR + n_used * m * r * r * low)


def _solve_batch(
    q: torch.Tensor,
    lay: _Layout,
    n_bands: int,
    group_velocity: bool,
    *,
    seed_bands: int,
    r: int,
    residual_tol: float,
    seed_dtype: torch.dtype | None,
    eigensolver: str,
    memory_budget: int,
) -> tuple[torch.Tensor, torch.Tensor | None, int, float]:
    """The reduced-basis solve of a batch of structures q (b, 4, P, P): the steps of :func:`_solve_per_structure`
    with a leading structure dimension. Every structure's numbers go through the same ops with the same shapes
    whatever else is in the batch (on CPU the results are batch-independent bit for bit; tests check it).

    Returns freqs (b, K, nb), vgroup (b, K, nb, 2) or None, the number of re-solved (structure, k-point) pairs and
    the largest accepted error estimate."""
    b, _, p, _ = q.shape
    device, real, dt = q.device, q.real.dtype, q.dtype
    low = torch.complex64 if q.is_complex() else torch.float32  # Ritz eigenvectors and residual Grams
    sdtype = dt if seed_dtype is None else seed_dtype
    n_used, n_k = lay.slots.shape[0], lay.k.shape[0]
    a_k = _coefficients(lay.k)  # (K, 4)
    a_seed = _coefficients(lay.seed_k)  # (S, 4)
    k_p, a_p = lay.k[lay.slots], a_k[lay.slots]  # (n_used, m, 2), (n_used, m, 4)
    aa_p = (a_p[..., :, None] * a_p[..., None, :]).reshape(n_used, -1, 16).to(low)
    a_p = a_p.to(dt)
    # basis of every patch: the r most significant directions of its seeds' lowest eigenvectors
    seeds = (a_seed.to(dt) @ q.reshape(b, 4, p * p)).reshape(-1, p, p)  # (b·S, P, P)
    _, y = _lowest(seeds.to(sdtype), seed_bands, eigensolver)  # (b·S, P, ns)
    y = y.to(dt).reshape(b, -1, p, seed_bands)[:, lay.seeds_of_patch]  # (b, n_used, 4, P, ns)
    y = y.transpose(2, 3).reshape(b, n_used, p, -1)  # (b, n_used, P, 4·ns)
    _, u = torch.linalg.eigh((y.mH @ y).to(low))  # ascending
    v, _ = torch.linalg.qr(y @ u[..., -r:].to(dt))  # (b, n_used, P, r)
    qv = q[:, None] @ v[:, :, None]  # (b, n_used, 4, P, r) = Q_j V
    red = v[:, :, None].mH @ qv  # (b, n_used, 4, r, r) = Vᴴ Q_j V
    z = (qv - v[:, :, None] @ red).to(low).transpose(2, 3).reshape(b, n_used, p, 4 * r)  # [(I − V Vᴴ) Q_j V]
    del qv
    gperp = (z.mH @ z).reshape(b, n_used, 4, r, 4, r).transpose(3, 4).reshape(b, n_used, 16, r * r)
    del z
    red = (red + red.mH) / 2
    # Ritz problems at every k-point: single-precision eigenvectors, Rayleigh quotients in double precision
    h = (a_p @ red.reshape(b, n_used, 4, r * r)).reshape(b, n_used, -1, r, r)  # (b, n_used, m, r, r)
    _, c = torch.linalg.eigh(h.to(low))
    c = c[..., : n_bands + 2]
    cd = c.to(dt)
    theta = (cd.conj() * (h @ cd)).real.sum(-2) / (cd.conj() * cd).real.sum(-2)  # (b, n_used, m, nb+2)
    del h
    theta, order = theta.sort(dim=-1)
    c = c.gather(-1, order[..., None, :].expand_as(c))
    # residual norms: r = (I − VVᴴ) M(k) V c, ‖r‖² = Σ_ij a_i a_j cᴴ Z_iᴴ Z_j c (no cancellation)
    w = (aa_p @ gperp).reshape(b, n_used, -1, r, r)
    res = ((c.conj() * (w @ c)).real.sum(-2) / (c.conj() * c).real.sum(-2)).clamp_min(0).sqrt().to(real)
    del w, gperp
    err = _error_estimate(theta, res)[..., :n_bands]
    theta = theta[..., :n_bands]
    scale = torch.maximum(theta, _SCALE_FLOOR * theta.amax(-1, keepdim=True)).clamp_min(torch.finfo(real).tiny)
    th = torch.empty(b, n_k, n_bands, dtype=real, device=device)
    th[:, lay.target] = theta.flatten(1, 2)[:, lay.valid]
    rel = torch.empty(b, n_k, n_bands, dtype=real, device=device)
    rel[:, lay.target] = (err / scale).flatten(1, 2)[:, lay.valid]
    dth = None
    if group_velocity:
        dth = torch.empty(b, n_k, 2, n_bands, dtype=real, device=device)
        c_sorted = cd.gather(-1, order[..., None, :].expand_as(cd))[..., :n_bands]
        dth[:, lay.target] = _derivatives(red, c_sorted, k_p).flatten(1, 2)[:, lay.valid]
    bad = ~(rel <= residual_tol).all(-1)  # (b, K); a NaN estimate counts as bad
    accepted = torch.where(bad[..., None], torch.zeros((), dtype=real, device=device), rel).amax()
    # the one host read of the batch: which (structure, k-point) pairs to re-solve, and the largest accepted error
    host = torch.cat([bad.reshape(-1).to(real), accepted.reshape(1)]).cpu()
    max_error = float(host[-1])
    s_bad, k_bad = host[:-1].reshape(b, n_k).nonzero(as_tuple=True)
    if len(s_bad):
        _resolve(q, a_k, lay.k, s_bad, k_bad, n_bands, th, dth, memory_budget)
    f = th.clamp_min(0).sqrt()
    if not group_velocity:
        return f, None, len(s_bad), max_error
    safe = f > _ZERO_FREQUENCY
    v_k = torch.where(safe[..., None, :], dth / (2 * f.clamp_min(_ZERO_FREQUENCY))[..., None, :], 0)
    return f, v_k.transpose(-1, -2), len(s_bad), max_error  # (b, K, nb, 2)


def _resolve(
    q: torch.Tensor,
    a_k: torch.Tensor,
    k: torch.Tensor,
    s_bad: torch.Tensor,
    k_bad: torch.Tensor,
    n_bands: int,
    th: torch.Tensor,
    dth: torch.Tensor | None,
    memory_budget: int,
) -> None:
    """Re-solve the (structure, k-point) pairs (host index tensors ``s_bad``, ``k_bad``) with the full matrix, in
    place in ``th`` (b, K, nb) and ``dth`` (b, K, 2, nb), in groups that fit ``memory_budget``. M(k) is assembled
    with elementwise ops (the same rounding for a pair whatever else is re-solved with it)."""
    p = q.shape[-1]
    per_pair = 4 * p * p * q.element_size() * _FALLBACK_WORKSPACE_FACTOR
    step = max(1, memory_budget // per_pair)
    for i0 in range(0, len(s_bad), step):
        si, ki = s_bad[i0 : i0 + step].to(q.device), k_bad[i0 : i0 + step].to(q.device)
        qs, a = q[si], a_k[ki].to(q.dtype)  # (n, 4, P, P), (n, 4)
        mats = a[:, 0, None, None] * qs[:, 0]
        for j in range(1, 4):
            mats = mats + a[:, j, None, None] * qs[:, j]
        lam, vec = torch.linalg.eigh(mats)  # (n, P), (n, P, P)
        th[si, ki] = lam[:, :n_bands]
        if dth is not None:
            dth[si, ki] = _derivatives(qs, vec[:, None, :, :n_bands], k[ki][:, None])[:, 0]


def _solve_per_structure(
    q: torch.Tensor,
    kpoints: torch.Tensor,
    n_bands: int,
    group_velocity: bool = True,
    *,
    patches: int = DEFAULT_PATCHES,
    seed_bands: int = DEFAULT_SEED_BANDS,
    basis_size: int = DEFAULT_BASIS_SIZE,
    residual_tol: float = DEFAULT_RESIDUAL_TOL,
    seed_dtype: torch.dtype | None = None,
    eigensolver: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The per-structure path of :func:`solve_reduced` (essl 0.2's implementation, unchanged): one structure at a
    time, ~1,000 small ops and ~8 host reads each. Kept as the reference the batched path is tested and benchmarked
    against (``batched=False``)."""
    b_count, _, p, _ = q.shape
    seed_bands = min(max(seed_bands, n_bands + 2), p)
    patch_of_k, seeds_of_patch, seed_k = _patch_layout(kpoints, patches)
    n_used = seeds_of_patch.shape[0]
    r = min(basis_size, p, seeds_of_patch.shape[1] * seed_bands)
    if r < n_bands + 2:
        raise ValueError(f"basis_size={basis_size}: must be at least n_bands + 2 = {n_bands + 2}")
    device, real, dt = q.device, q.real.dtype, q.dtype
    low = torch.complex64 if q.is_complex() else torch.float32  # Ritz eigenvectors and residual Grams
    sdtype = dt if seed_dtype is None else seed_dtype
    k = kpoints.to(device=device, dtype=real)
    a_k = _coefficients(k)  # (K, 4)
    a_seed = _coefficients(seed_k.to(device=device, dtype=real))  # (S, 4)
    seeds_of_patch = seeds_of_patch.to(device)
    slots, valid = _padded_layout(patch_of_k.to(device), n_used)  # (n_used, m)
    k_p, a_p = k[slots], a_k[slots]  # (n_used, m, 2), (n_used, m, 4)
    aa_p = (a_p[..., :, None] * a_p[..., None, :]).reshape(n_used, -1, 16).to(low)
    a_p = a_p.to(dt)
    freqs = torch.empty(b_count, len(k), n_bands, dtype=real, device=device)
    vg = torch.empty(b_count, len(k), n_bands, 2, dtype=real, device=device) if group_velocity else None
    info = {"fallback": 0, "solved": b_count * len(k), "max_error": 0.0}
    tiny = torch.finfo(real).tiny
    target = slots[valid]  # k-point of every valid slot
    for s in range(b_count):  # one structure at a time: results independent of the batch
        qs = q[s]  # (4, P, P)
        # basis of every patch: the r most significant directions of its seeds' lowest eigenvectors
        _, y = _lowest(_assemble(qs, a_seed).to(sdtype), seed_bands, eigensolver)  # (S, P, ns)
        y = y.to(dt)[seeds_of_patch].transpose(1, 2).reshape(n_used, p, -1)  # (n_used, P, 4·ns)
        _, u = torch.linalg.eigh((y.mH @ y).to(low))  # ascending
        v, _ = torch.linalg.qr(y @ u[..., -r:].to(dt))  # (n_used, P, r)
        qv = qs[None] @ v[:, None]  # (n_used, 4, P, r) = Q_j V
        red = v[:, None].mH @ qv  # (n_used, 4, r, r) = Vᴴ Q_j V
        z = (qv - v[:, None] @ red).to(low).transpose(1, 2).reshape(n_used, p, 4 * r)  # [(I − V Vᴴ) Q_j V]
        gperp = (z.mH @ z).reshape(n_used, 4, r, 4, r).transpose(2, 3).reshape(n_used, 16, r * r)
        red = (red + red.mH) / 2
        # Ritz problems at every k-point: single-precision eigenvectors, Rayleigh quotients in double precision
        h = (a_p @ red.reshape(n_used, 4, r * r)).reshape(n_used, -1, r, r)  # (n_used, m, r, r)
        _, c = torch.linalg.eigh(h.to(low))
        c = c[..., : n_bands + 2]
        cd = c.to(dt)
        theta = (cd.conj() * (h @ cd)).real.sum(-2) / (cd.conj() * cd).real.sum(-2)  # (n_used, m, nb+2)
        theta, order = theta.sort(dim=-1)
        c = c.gather(-1, order[..., None, :].expand_as(c))
        # residual norms: r = (I − VVᴴ) M(k) V c, ‖r‖² = Σ_ij a_i a_j cᴴ Z_iᴴ Z_j c (no cancellation)
        w = (aa_p @ gperp).reshape(n_used, -1, r, r)
        res = ((c.conj() * (w @ c)).real.sum(-2) / (c.conj() * c).real.sum(-2)).clamp_min(0).sqrt().to(real)
        err = _error_estimate(theta, res)[..., :n_bands]
        theta = theta[..., :n_bands]
        scale = torch.maximum(theta, _SCALE_FLOOR * theta.amax(-1, keepdim=True)).clamp_min(tiny)
        err = (err / scale)[valid]  # (K, nb) in the order of `target`
        th = torch.empty(len(k), n_bands, dtype=real, device=device)
        th[target] = theta[valid]
        rel = torch.empty(len(k), n_bands, dtype=real, device=device)
        rel[target] = err
        if group_velocity:
            dth = torch.empty(len(k), 2, n_bands, dtype=real, device=device)
            dth[target] = _derivatives(red, cd.gather(-1, order[..., None, :].expand_as(cd))[..., :n_bands], k_p)[valid]
        bad = ~(rel <= residual_tol).all(-1)  # (K,); a NaN estimate counts as bad
        if bad.any():
            kb = bad.nonzero()[:, 0]
            lam_b, vec_b = torch.linalg.eigh(_assemble(qs, a_k[kb]))  # (Kb, P, P)
            th[kb] = lam_b[..., :n_bands]
            if group_velocity:
                dth[kb] = _derivatives(qs, vec_b[..., :n_bands], k[kb])
            info["fallback"] += int(len(kb))
        if not bad.all():
            info["max_error"] = max(info["max_error"], float(rel[~bad].max()))
        f = th.clamp_min(0).sqrt()
        freqs[s] = f
        if group_velocity:
            safe = f > _ZERO_FREQUENCY
            v_k = torch.where(safe[:, None], dth / (2 * f.clamp_min(_ZERO_FREQUENCY))[:, None], 0)
            vg[s] = v_k.transpose(1, 2)  # (K, nb, 2)
    return freqs, vg, info
