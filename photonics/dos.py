"""Density of states (DOS) of 2D photonic crystals from bands on a full-Brillouin-zone k-grid; benchmark labels.

Normalisation. With k in units of 2π/a the first Brillouin zone [-½, ½]² has area 1, and

    DOS(ω) = Σ_n ∫_BZ δ(ω − ω_n(k)) d²k

counts states per unit cell area (a = 1) per unit reduced frequency ω = ωa/2πc, so ∫ DOS dω = number of bands
(the sum rule; tests check it). For a homogeneous medium of ε = 1 the number of states below ω is the area of
the disc |k| ≤ ω, N(ω) = πω², hence DOS = 2πω: the empty-lattice line of the benchmark, per polarisation.

Label convention (Loh et al., Nat. Commun. 13, 4223 (2022); Dangovski et al., ICLR 2022; docs/design.md). Frequencies
are rescaled by √ε_avg (ε_avg = mean of the pixel map): ω' = ω √ε_avg, so that a homogeneous cell of any ε has
the bands of the ε = 1 empty lattice. The DOS is evaluated in ω' on ``N_FREQ`` = 500 points in [0, 1.2]; as a
density in ω' it is DOS_ω(ω'/√ε_avg) / √ε_avg — the "divided by √ε_avg" of the convention is the Jacobian and is
built in. The first ``N_TARGET`` = 400 points are kept and the regression target is DOS − 2πω', which is ≈ 0
for the empty lattice (up to the GGR linearisation error, ~0.2% on the default grid): with 10 bands the empty
lattice is complete up to ω' = 1.58 (the minimum of its 11th band), above the last target point ω' = 0.96.

Methods.

* ``"gaussian"``: every (band, k-point) contributes a Gaussian of width ``sigma`` at ω_n(k). Coarse grids need
  a large ``sigma`` (docs/design.md: 25% relative-L1 difference between 16² and 32² grids at σ = 0.006).
* ``"ggr"`` (default): the generalised Gilat–Raubenheimer method (Gilat & Raubenheimer, Phys. Rev. 144, 390
  (1966); Liu, Johnson et al., "Generalized Gilat–Raubenheimer method for density-of-states calculation in
  photonic crystals", J. Opt. 20, 044005 (2018)). Inside the square k-cell of side Δ = 1/n around every grid
  point the band is extrapolated linearly with its group velocity v, ω(k_c + δ) ≈ ω_c + v·δ. In 2D the
  contribution of one cell is then analytic: v·δ with δ uniform in the square is the sum of two independent
  uniform variables of widths |v_x|Δ and |v_y|Δ, whose density is a trapezoid (the length of the iso-frequency
  segment inside the cell divided by |v|, the 2D form of Gilat–Raubenheimer). We integrate that trapezoid
  exactly over each frequency bin [ω_j − h/2, ω_j + h/2] (h = grid spacing), via its closed-form CDF, so that
  stationary cells (v = 0) give a finite bin value and the sum rule holds to rounding.
  Group velocities come from the eigenvectors (Hellmann–Feynman; :func:`essl.photonics.pwe.solve_bands`).

Determinism. :func:`compute_labels` gives bit-identical results for a structure whatever else is in its batch
(on CPU): the solver lays out every structure's eigenproblems identically, and the batched DOS adds every
structure's contributions into its own bins in the same order (a wider window only adds exact zeros).

Batching. The structures of a call that share a point group are solved together: the direct solver over
structures × k-points, the reduced-basis solver and the GGR DOS over structures (``batched=True``, the default;
``batched=False`` is the per-structure path they replaced, equal to rounding and kept for comparisons). With the
maps on the host and ``device="cuda"``, a chunk of one symmetry group makes three explicit blocking reads (the
k-points the reduced basis must re-solve, the widest GGR trapezoid, the copy of the labels) besides the syncs of
``torch.linalg.eigh`` (README, "Photonic-crystal data").
"""

from __future__ import annotations

import math

import torch

from essl.photonics import pwe

N_FREQ = 500
"""Points of the label frequency grid."""
FREQ_MAX = 1.2
"""Upper end of the label frequency grid, in rescaled units ω√ε_avg·a/2πc."""
N_TARGET = 400
"""The first N_TARGET grid points form the regression target."""
METRIC_START = 100
"""The relative-L1 error is scored over target points METRIC_START .. N_TARGET−1."""

DEFAULT_KGRID = 20
"""Default k-grid: 20×20 cell centres over the full zone, 200 k-points after time-reversal halving. Measured with
the default GGR smoothing (σ = 0.006) on 6 level-set + 6 blob cells: relative L1 vs a 40×40 grid 1.2% (level set
1.0%, blob 1.4%); a 16×16 grid gave 2.0% (blob 2.4%), too close to the 2% requirement."""
DEFAULT_METHOD = "ggr"
DEFAULT_BAND_SOLVER = "auto"
"""Band solver of the labels (:func:`essl.photonics.pwe.solve_bands`' ``solver``)."""
DEFAULT_SIGMA = {"ggr": 0.006, "gaussian": 0.02}
"""Default width (rescaled frequency units) of the Gaussian that smooths the GGR DOS, or of the Gaussian
broadening (method="gaussian"); each the smallest that keeps the default k-grid within 2% relative L1 of a grid
twice as fine. Without smoothing GGR converges only ~1/n here (16 vs 32: 3.4–3.9%): near-degenerate band pairs
(avoided crossings along lines in k) bend within a cell, which no linear extrapolation follows. Plain Gaussian
broadening needs σ ≈ 0.02 for the same 2% (σ = 0.006 alone: 26%)."""
SMOOTH_TRUNCATE = 6.0
"""Gaussian kernels are truncated at this many standard deviations."""
METHODS = ("ggr", "gaussian")

_MIN_WIDTH = 1e-9
"""Trapezoid widths below this (frequency units) are raised to it: a cell with v = 0 becomes a box narrower than
1e-6 of a frequency bin instead of a 0/0."""
_MIN_WIDTH_RATIO = 1e-8
"""The shorter trapezoid side is at least this fraction of the longer, bounding the cancellation error of the
closed-form CDF by ~1e-8 relative."""


def frequency_grid(dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The label frequency grid, (N_FREQ,) = linspace(0, FREQ_MAX, N_FREQ) in rescaled units ω√ε_avg."""
    return torch.linspace(0.0, FREQ_MAX, N_FREQ, dtype=dtype, device=device)


def empty_lattice_dos(omega: torch.Tensor) -> torch.Tensor:
    """DOS of the ε = 1 empty lattice per unit cell area and unit reduced frequency, 2πω (module docstring)."""
    return 2 * math.pi * omega


# ----------------------------------------------------------------------------------------------- DOS


def _check_bands(freqs: torch.Tensor, weights: torch.Tensor) -> None:
    if freqs.ndim != 3:
        raise ValueError(f"freqs must have shape (B, K, n_bands), got {tuple(freqs.shape)}")
    if weights.shape != (freqs.shape[1],):
        raise ValueError(f"weights must have shape ({freqs.shape[1]},), got {tuple(weights.shape)}")


def _trapezoid_cdf(s: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """CDF at s of the sum of two independent centred uniform variables of widths p ≥ q > 0 (broadcasting).

    Its density is the box convolution (1/pq)[r(s+A) − r(s+B) − r(s−B) + r(s−A)], r(t) = max(t, 0), with
    A = (p+q)/2, B = (p−q)/2; integrating once more gives the same combination of R(t) = max(t, 0)²/2. s is
    clamped to [−A, A] first so that the terms stay O(p²) (relative rounding error ~ eps·p/q).
    """
    a, b = (p + q) / 2, (p - q) / 2
    t = torch.minimum(torch.maximum(s, -a), a)

    def r2(x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0) ** 2 / 2

    return (r2(t + a) - r2(t + b) - r2(t - b) + r2(t - a)) / (p * q)


def _gaussian_kernel(sigma: float, h: float) -> tuple[torch.Tensor, int]:
    """Sampled Gaussian of width sigma on a grid of spacing h, normalised to sum 1 (preserves Σ DOS·h), and its
    half-width in points (SMOOTH_TRUNCATE standard deviations)."""
    half = int(math.ceil(SMOOTH_TRUNCATE * sigma / h))
    x = torch.arange(-half, half + 1, dtype=torch.float64) * h
    ker = torch.exp(-0.5 * (x / sigma) ** 2)
    return ker / ker.sum(), half


def dos_ggr(
    freqs: torch.Tensor,
    vgroup: torch.Tensor,
    weights: torch.Tensor,
    omega: torch.Tensor,
    cell: float,
    sigma: float = 0.0,
    *,
    batched: bool = True,
    memory_budget: int = pwe.DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """Generalised Gilat–Raubenheimer DOS (2D, analytic per cell; module docstring), bin-averaged on omega.

    Args:
        freqs: (B, K, nb) band frequencies at the k-grid points.
        vgroup: (B, K, nb, 2) group velocities ∂ω/∂k (k in units of 2π/a).
        weights: (K,) fraction of the zone represented by each k-point (sums to 1 over the zone).
        omega: (W,) uniform frequency grid (pass it on the CPU: its spacing is then read without a device read).
        cell: side Δ of the square k-cell around each grid point (1/n for an n×n grid).
        sigma: if > 0, the GGR DOS is then convolved with a Gaussian of this width (computed on a grid extended
            by SMOOTH_TRUNCATE·sigma on both sides first, so that no weight is lost or invented at the edges).
        batched: all structures in one set of ops (DEFAULT; one host read per call, the width of the widest
            trapezoid, in sub-batches of at most ``memory_budget`` bytes), or one structure at a time (``False``,
            :func:`_dos_ggr_per_structure`, the path it agrees with to rounding).
        memory_budget: bytes of working memory per sub-batch (``batched`` only).

    Returns:
        (B, W) DOS in states per unit cell per unit frequency, float64, on the device of ``freqs``. A structure's
        DOS does not depend on the other structures of the batch (on CPU bit for bit: every bin adds the same
        contributions in the same order; the window of bins a trapezoid covers may be wider, which adds exact
        zeros).
    """
    if not batched:
        return _dos_ggr_per_structure(freqs, vgroup, weights, omega, cell, sigma)
    _check_bands(freqs, weights)
    device = freqs.device
    om = omega.detach().cpu().to(torch.float64)  # the grid's arithmetic on the host
    n_out = om.numel()
    half = 0
    if sigma > 0:
        step = (om[1] - om[0]).item()
        ker, half = _gaussian_kernel(sigma, step)
        om = torch.cat(
            [
                om[0] - step * torch.arange(half, 0, -1, dtype=torch.float64),
                om,
                om[-1] + step * torch.arange(1, half + 1, dtype=torch.float64),
            ]
        )
        taps = ker.tolist()
    n_bins = om.numel()
    h = (om[1] - om[0]).item() if n_bins > 1 else 1.0
    first_edge = om[0].item() - h / 2  # bin j covers [first_edge + j·h, first_edge + (j+1)·h)
    b_count, n_k, n_b = freqs.shape
    if b_count == 0:
        return torch.zeros(0, n_out, dtype=torch.float64, device=device)
    f = freqs.to(torch.float64).reshape(b_count, -1, 1)  # (B, C, 1), C = K·nb trapezoids
    widths = vgroup.to(torch.float64).abs() * cell  # (B, K, nb, 2)
    p = widths.max(dim=-1).values.clamp_min(_MIN_WIDTH)  # (B, K, nb)
    q = torch.maximum(widths.min(dim=-1).values, p * _MIN_WIDTH_RATIO).clamp_min(_MIN_WIDTH)
    p, q = p.reshape(b_count, -1, 1), q.reshape(b_count, -1, 1)
    wk = weights.to(device=device, dtype=torch.float64)[:, None].expand(n_k, n_b).reshape(1, -1, 1)  # (1, C, 1)
    # every trapezoid covers [fc − (p+q)/2, fc + (p+q)/2]: its CDF is evaluated only at the span+1 edges of a
    # window of bins starting just below its support; the one host read of the call is the widest support
    span = int(math.ceil((p + q).max().item() / h)) + 2
    per_structure = f.shape[1] * (span + 1) * f.element_size() * _GGR_WORKSPACE_FACTOR
    step_b = max(1, memory_budget // per_structure)
    offs = torch.arange(span + 1, device=device)  # (span+1,)
    out = []
    for s0 in range(0, b_count, step_b):
        fc, pp, qq = f[s0 : s0 + step_b], p[s0 : s0 + step_b], q[s0 : s0 + step_b]
        b = fc.shape[0]
        start = torch.floor((fc - (pp + qq) / 2 - first_edge) / h).long().clamp(0, n_bins)  # (b, C, 1)
        edges = first_edge + (start + offs) * h  # (b, C, span+1)
        cdf = _trapezoid_cdf(edges - fc, pp, qq)  # (b, C, span+1)
        mass = wk * (cdf[..., 1:] - cdf[..., :-1])  # (b, C, span)
        row = (torch.arange(b, device=device) * (n_bins + span))[:, None, None]  # each structure its own bins
        d = torch.zeros(b * (n_bins + span), dtype=torch.float64, device=device)
        d.index_add_(0, (row + start + offs[:-1]).reshape(-1), mass.reshape(-1))  # sequential on CPU
        d = d.reshape(b, n_bins + span)[:, :n_bins] / h  # (b, W_ext)
        if sigma > 0:  # the Gaussian as a sum of shifted copies, in a fixed order (no batch-shaped matmul)
            sm = taps[0] * d[:, 0:n_out]
            for t in range(1, 2 * half + 1):
                sm = sm + taps[t] * d[:, t : t + n_out]
            d = sm
        out.append(d)
    return torch.cat(out)


_GGR_WORKSPACE_FACTOR = 8
"""Bytes of a batched GGR sub-batch per byte of its (structure, trapezoid, edge) array: edges, CDF terms, masses."""


def _dos_ggr_per_structure(
    freqs: torch.Tensor,
    vgroup: torch.Tensor,
    weights: torch.Tensor,
    omega: torch.Tensor,
    cell: float,
    sigma: float = 0.0,
) -> torch.Tensor:
    """The per-structure path of :func:`dos_ggr` (essl 0.2's implementation, unchanged: a loop over the structures
    with three host reads each). Kept as the reference of the batched path and for the benchmark (``batched=False``)."""
    _check_bands(freqs, weights)
    om = omega.to(torch.float64)
    n_out = om.numel()
    if sigma > 0:
        step = (om[1] - om[0]).item()
        ker, half = _gaussian_kernel(sigma, step)
        ker = ker.to(om.device)
        om = torch.cat(
            [
                om[0] - step * torch.arange(half, 0, -1, dtype=torch.float64, device=om.device),
                om,
                om[-1] + step * torch.arange(1, half + 1, dtype=torch.float64, device=om.device),
            ]
        )
        # (n_out + 2·half, n_out) banded matrix: column j holds the kernel centred on extended point j + half
        smooth = torch.zeros(n_out + 2 * half, n_out, dtype=torch.float64, device=om.device)
        idx = torch.arange(n_out, device=om.device)
        for t in range(2 * half + 1):
            smooth[idx + t, idx] = ker[t]
    n_bins = om.numel()
    h = (om[1] - om[0]).item() if n_bins > 1 else 1.0
    first_edge = om[0].item() - h / 2  # bin j covers [first_edge + j·h, first_edge + (j+1)·h)
    w = weights.to(torch.float64)
    out = []
    for f_b, v_b in zip(freqs.to(torch.float64), vgroup.to(torch.float64), strict=True):  # (K, nb), (K, nb, 2)
        widths = v_b.abs() * cell  # (K, nb, 2)
        p = widths.max(dim=-1).values.clamp_min(_MIN_WIDTH)  # (K, nb)
        q = torch.maximum(widths.min(dim=-1).values, p * _MIN_WIDTH_RATIO).clamp_min(_MIN_WIDTH)
        fc, p, q = f_b.reshape(-1, 1), p.reshape(-1, 1), q.reshape(-1, 1)  # (C, 1), C = K·nb trapezoids
        # every trapezoid covers [fc − (p+q)/2, fc + (p+q)/2]: evaluate its CDF only at the span+2 edges of a
        # window of bins starting just below its support, and add the bin masses into place
        span = int(math.ceil((p + q).max().item() / h)) + 2
        start = torch.floor((fc - (p + q) / 2 - first_edge) / h).long().clamp(0, n_bins)  # (C, 1)
        offs = torch.arange(span + 1, device=om.device)  # (span+1,)
        edges = first_edge + (start + offs) * h  # (C, span+1)
        cdf = _trapezoid_cdf(edges - fc, p, q)  # (C, span+1)
        wk = w[:, None].expand(f_b.shape).reshape(-1, 1)  # (C, 1)
        mass = wk * (cdf[:, 1:] - cdf[:, :-1])  # (C, span)
        d = torch.zeros(n_bins + span, dtype=torch.float64, device=om.device)
        d.index_add_(0, (start + offs[:-1]).reshape(-1), mass.reshape(-1))  # sequential on CPU: deterministic
        d = d[:n_bins] / h  # (W_ext,)
        out.append(d @ smooth if sigma > 0 else d)  # (W,)
    return torch.stack(out) if out else torch.zeros(0, n_out, dtype=torch.float64)


def dos_gaussian(
    freqs: torch.Tensor, weights: torch.Tensor, omega: torch.Tensor, sigma: float = DEFAULT_SIGMA["gaussian"]
) -> torch.Tensor:
    """Gaussian-broadened DOS: Σ_{n,k} w_k N(ω; ω_n(k), σ²), (B, W) float64 (structure by structure)."""
    _check_bands(freqs, weights)
    om = omega.to(torch.float64)
    w = weights.to(torch.float64)
    norm = 1 / (sigma * math.sqrt(2 * math.pi))
    out = []
    for f_b in freqs.to(torch.float64):  # (K, nb)
        z = (om[None, :] - f_b.reshape(-1, 1)) / sigma  # (K·nb, W)
        wk = w[:, None].expand(f_b.shape).reshape(-1, 1)
        out.append((wk * torch.exp(-0.5 * z**2)).sum(0) * norm)
    return torch.stack(out) if out else torch.zeros(0, omega.numel(), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- labels


def _check_method(method: str) -> str:
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    return method


def label_settings(
    *,
    kgrid: int = DEFAULT_KGRID,
    n_bands: int = 10,
    cutoff: int = pwe.DEFAULT_CUTOFF,
    polarization: str = "tm",
    method: str = DEFAULT_METHOD,
    sigma: float | None = None,
    memory_budget: int = pwe.DEFAULT_MEMORY_BUDGET,
    dtype: torch.dtype = pwe.DEFAULT_DTYPE,
    num_threads: int | None = pwe.DEFAULT_NUM_THREADS,
    kpoint_symmetry: bool = True,
    eigensolver: str = "auto",
    real_inversion: bool = True,
    band_solver: str = DEFAULT_BAND_SOLVER,
) -> dict:
    """Plain JSON-able solver + DOS settings of :func:`compute_labels` (stored as HDF5 attributes, compared on
    resume). ``memory_budget`` and ``num_threads`` only change speed, not results, and are not included."""
    del memory_budget, num_threads, real_inversion
    if band_solver not in pwe.SOLVERS:
        raise ValueError(f"band_solver={band_solver!r}: expected one of {pwe.SOLVERS}")
    method = _check_method(method)
    sigma = DEFAULT_SIGMA[method] if sigma is None else float(sigma)
    settings = {
        "solver": "essl.photonics.pwe plane-wave expansion (inverse rule)",
        "polarization": polarization.lower(),
        "n_bands": int(n_bands),
        "cutoff": int(cutoff),
        "cutoff_shape": pwe.DEFAULT_CUTOFF_SHAPE,
        "n_plane_waves": pwe.n_plane_waves(cutoff, pwe.DEFAULT_CUTOFF_SHAPE),
        "fourier": "pixel",
        "eig_dtype": str(dtype).replace("torch.", ""),
        "kgrid": int(kgrid),
        "time_reversal": True,
        "kpoint_symmetry": "exact point group of each cell" if kpoint_symmetry else "none",
        "eigensolver": eigensolver,
        "band_solver": band_solver,
        "dos_method": method,
        "freq_rescale": "sqrt(eps_avg)",
        "n_freq": N_FREQ,
        "freq_max": FREQ_MAX,
        "n_target": N_TARGET,
        "target": "dos - 2*pi*omega",
    }
    settings["sigma"] = sigma
    return settings


def compute_labels(
    eps: torch.Tensor,
    *,
    kgrid: int = DEFAULT_KGRID,
    n_bands: int = 10,
    cutoff: int = pwe.DEFAULT_CUTOFF,
    polarization: str = "tm",
    method: str = DEFAULT_METHOD,
    sigma: float | None = None,
    memory_budget: int | None = None,
    dtype: torch.dtype = pwe.DEFAULT_DTYPE,
    num_threads: int | None = pwe.DEFAULT_NUM_THREADS,
    kpoint_symmetry: bool = True,
    eigensolver: str = "auto",
    real_inversion: bool = True,
    band_solver: str = DEFAULT_BAND_SOLVER,
    device: torch.device | str | None = None,
    batched: bool = True,
) -> dict[str, torch.Tensor]:
    """Bands, DOS and regression target of a batch of unit cells: THE labelling entry point of the datasets.

    Solves the bands on a ``kgrid``×``kgrid`` grid of cell centres of the Brillouin zone, halved by time reversal
    (:func:`essl.photonics.pwe.kgrid`), computes the DOS in rescaled frequency on :func:`frequency_grid` with
    ``method`` ("ggr" smoothed by a Gaussian of width ``sigma``, or "gaussian" broadening of width ``sigma``;
    None = DEFAULT_SIGMA[method]), and the target DOS − 2πω on its first N_TARGET points
    (module docstring). Runs on ``device`` (default: the device of ``eps``); returns CPU tensors. Give ``eps`` on
    the CPU with ``device="cuda"``: the cell symmetries are then found on the host copy and the only blocking reads
    of the solve are the few per symmetry group that its data-dependent steps need (README, "Photonic-crystal
    data").

    Args:
        eps: (N, n, n) permittivity maps (ε > 0), any real dtype; numpy arrays are accepted.
        kpoint_symmetry: solve every cell only on the k-points irreducible under its point group, detected
            exactly from the map (:func:`essl.photonics.pwe.cell_symmetries`,
            :func:`essl.photonics.pwe.irreducible_kgrid`):
            2× fewer for a mirror (pm level sets), 3.6× for C4v (p4m, rods); p1 cells (blobs) are unchanged. The
            result equals the unreduced one up to rounding (~1e-6 relative); the returned bands are still given on
            every point of the half grid (copied from the representatives).
        eigensolver, real_inversion: passed to :func:`essl.photonics.pwe.solve_bands` (speed; rounding only).
        band_solver: :func:`essl.photonics.pwe.solve_bands`' ``solver``: "auto" (DEFAULT: "reduced" for cells
            with at least pwe.REDUCED_MIN_KPOINTS irreducible k-points, i.e. p1 and pm on the default grid),
            "reduced" (Rayleigh–Ritz on patches of the zone with an error estimate, :mod:`essl.photonics.reduced`;
            TM labels agree with "direct" to ~1e-5 relative L1) or "direct".
        device: where to solve (default: the device of ``eps``).
        memory_budget: bytes of working memory per batch of eigenproblems (default
            :data:`pwe.DEFAULT_MEMORY_BUDGET` on CPU, :data:`pwe.DEFAULT_MEMORY_BUDGET_CUDA` on a GPU).
        batched: the reduced-basis solver and the GGR DOS batched over the structures of the call (DEFAULT), or
            one structure at a time (``False``: the per-structure path, equal to rounding; for comparisons).
            Like ``memory_budget`` it changes speed only and is not a label setting.

    Returns:
        dict with "bands" (N, K, n_bands) float32 — un-rescaled frequencies ωa/2πc at the K = ⌈kgrid²/2⌉ k-points
        of the half grid (:func:`essl.photonics.pwe.kgrid`, same order; with the default cutoff their relative
        error against a converged solve is median ~1e-4 but up to ~3% for the top bands of cells with a small
        high-ε inclusion, :data:`essl.photonics.pwe.DEFAULT_CUTOFF`); "dos" (N, N_FREQ) float32 in rescaled
        units; "target" (N, N_TARGET) float32; "eps_avg" (N,) float32.
    """
    method = _check_method(method)
    sigma = DEFAULT_SIGMA[method] if sigma is None else float(sigma)
    eps = torch.as_tensor(eps)
    if eps.ndim != 3:
        raise ValueError(f"eps must have shape (N, n, n), got {tuple(eps.shape)}")
    device = torch.device(eps.device if device is None else device)
    if memory_budget is None:
        memory_budget = pwe.DEFAULT_MEMORY_BUDGET if device.type == "cpu" else pwe.DEFAULT_MEMORY_BUDGET_CUDA
    with pwe.cpu_threads(num_threads if device.type == "cpu" else None):
        eps_dev = eps.to(device)
        eps_avg = eps_dev.to(torch.float64).mean(dim=(-1, -2))  # (N,)
        omega_host = frequency_grid()
        omega = omega_host.to(device)
        n_half = len(pwe.kgrid(kgrid)[0])
        band_dtype = torch.float32 if dtype == torch.complex64 else torch.float64
        f = torch.empty(eps.shape[0], n_half, n_bands, dtype=band_dtype, device=device)
        dos = torch.empty(eps.shape[0], N_FREQ, dtype=torch.float64, device=device)
        # structures grouped by their exact point group: each group is solved on its irreducible k-points, so a
        # structure's result depends on its own map only (bit for bit, whatever else is in the batch)
        ops = pwe.cell_symmetries(eps) if kpoint_symmetry else [{} for _ in range(eps.shape[0])]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, o in enumerate(ops):
            groups.setdefault(tuple(sorted(o)), []).append(i)
        for key, members in groups.items():
            idx = torch.tensor(members, device=device)
            kpts, weights, index = pwe.irreducible_kgrid(kgrid, key)  # host tensors
            sub = eps[members] if eps.device.type == "cpu" else eps_dev[idx]
            scale = eps_avg[idx].sqrt()[:, None, None]  # (b, 1, 1)
            common = dict(
                memory_budget=memory_budget,
                dtype=dtype,
                num_threads=num_threads,
                eigensolver=eigensolver,
                real_inversion=real_inversion,
                solver=band_solver,
                batched=batched,
                device=device,
                symmetries=[ops[i] for i in members] if kpoint_symmetry else None,
            )
            if method == "ggr":
                fg, v = pwe.solve_bands(sub, kpts, n_bands, polarization, cutoff, group_velocity=True, **common)
                dos[idx] = dos_ggr(
                    fg * scale,
                    v * scale[..., None],
                    weights,
                    omega_host,
                    cell=1.0 / kgrid,
                    sigma=sigma,
                    batched=batched,
                    memory_budget=memory_budget,
                )
            else:
                fg = pwe.solve_bands(sub, kpts, n_bands, polarization, cutoff, **common)
                dos[idx] = dos_gaussian(fg * scale, weights.to(device), omega, sigma)
            f[idx] = fg[:, index.to(device)].to(f.dtype)
    target = dos[:, :N_TARGET] - empty_lattice_dos(omega[:N_TARGET])
    out = {"bands": f, "dos": dos, "target": target, "eps_avg": eps_avg}
    # one device-to-host copy for all four (float32 values, as before)
    flat = torch.cat([v.float().reshape(-1) for v in out.values()]).cpu()
    parts = flat.split([v.numel() for v in out.values()])
    return {k: part.reshape(v.shape).clone() for (k, v), part in zip(out.items(), parts, strict=True)}


def relative_l1(
    pred: torch.Tensor, true: torch.Tensor, start: int = METRIC_START, stop: int = N_TARGET
) -> torch.Tensor:
    """Relative L1 error of the benchmark: mean over samples of Σ|ŷ − y| / Σ|y| over points start..stop−1.

    ``pred`` and ``true`` are *targets* (N, N_TARGET) (DOS − 2πω); the empty-lattice line is added back to both
    before scoring, so the denominator is the full DOS (Loh et al. 2022). Returns a scalar tensor (float64).
    """
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(
            f"pred and true must both have shape (N, {N_TARGET}); got {tuple(pred.shape)}, {tuple(true.shape)}"
        )
    omega = frequency_grid(device=pred.device)[: pred.shape[1]]
    line = empty_lattice_dos(omega)
    p = pred.to(torch.float64) + line
    t = true.to(torch.float64) + line
    err = (p - t)[:, start:stop].abs().sum(1) / t[:, start:stop].abs().sum(1)
    return err.mean()
