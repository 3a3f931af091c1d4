"""Batched plane-wave-expansion (PWE) band solver for 2D square-lattice photonic crystals.

Formulation (Ho, Chan & Soukoulis, PRL 65, 3152 (1990); Joannopoulos et al., "Photonic Crystals: Molding the
Flow of Light", 2nd ed., ch. 5 and appendix D). Lattice constant a = 1, c = 1. Every wave vector in this module
is in units of 2π/a: a reciprocal-lattice vector is an integer pair G = (g_x, g_y) and a Bloch vector k lies
in the first Brillouin zone [-½, ½]². In these units the eigenvalues of the matrices below are directly
(ωa/2πc)², so a band frequency is f = √λ in the usual reduced units ωa/2πc (the brief's √λ/2π, with λ taken
in units of (1/a)², is the same number).

* TM (E_z): |k+G|² E_G = f² Σ_G' ε(G−G') E_G'. With S = diag(|k+G|), [ε] the Toeplitz matrix of the Fourier
  coefficients of ε(r) and u = S E, the Hermitian form is M = S · [ε]⁻¹ · S.
* TE (H_z): M_GG' = (k+G)·(k+G') · ([ε]⁻¹)_GG'.

Using the inverse of the Toeplitz matrix [ε] ("inverse rule", Ho et al. 1990) rather than the Toeplitz matrix
of 1/ε ("Laurent rule" applied to 1/ε) is what Li's factorisation rules recommend for products of functions
with concurrent jumps (L. Li, JOSA A 13, 1870 (1996)); it converges markedly faster for TM. [ε]⁻¹ does not
depend on k, so it is computed once per structure (in float64 precision) and reused at every k-point.

Fourier coefficients of the pixel map. ``fourier="pixel"`` (default) takes the map as what it is, a
piecewise-constant ("staircase") function, and uses its exact Fourier coefficients
ε̂(G) = DFT(ε)[G mod n] / n² · sinc(g_x/n) sinc(g_y/n) · e^{−iπ(g_x+g_y)/n}. These are exactly the limit of
refining (nearest-neighbour upsampling) the map before the FFT, so they never alias and any cutoff is allowed.
``fourier="dft"`` uses the plain FFT coefficients (the trigonometric interpolant of the pixel values at the pixel
centres, in the same frame as "pixel"); the
Toeplitz matrix needs them at every difference G − G', whose components reach 2m for a cutoff m, and an n-point
FFT distinguishes only |g| < n/2: the "dft" mode is alias-free only while 2m < n/2 (m ≤ 7 at n = 32) and raises
a ValueError beyond it (upsample the map, or use ``fourier="pixel"``).

Plane-wave sets. ``cutoff`` m selects the integer vectors with |G| ≤ m (``cutoff_shape="circle"``, default) or
max(|g_x|, |g_y|) ≤ m (``"square"``, the set legume-gme uses). Both are invariant under C4v, so the computed bands
transform exactly under rotations / flips of the cell; the circle reaches the same accuracy with ~π/4 of the
plane waves (the error is set by the shortest wavelength left out, which is the same in every direction).

Array conventions (as in :mod:`essl.photonics.unitcell`): a map ``eps[..., row, col]`` has rows along y and
columns along x; pixel (row, col) covers [col/n, (col+1)/n) × [row/n, (row+1)/n) in fractional coordinates.

Speed. The work is batched over (structure, k-point) pairs and split into chunks that fit ``memory_budget``
bytes; complex64 eigen-decompositions (default) are ~1.5–2× faster than complex128 on CPU and agree to ~1e-6
relative in the band frequencies (tests measure this); time reversal (bands at k and −k coincide for real ε)
halves the k-points of a full-zone grid (:func:`kgrid`). Chunks are laid out so that the result for one
structure does not depend on which other structures share its batch, bit for bit on CPU (MKL's eigensolvers
round differently depending on the memory alignment of a matrix, so every structure's block of k-points is
padded to a multiple of ``_ALIGN_K`` matrices).

On CPU, when eigenvectors are needed (group velocities), only the lowest ``n_bands`` eigenpairs are computed, with
LAPACK's MRRR subset solver (?heevr / ?syevr via scipy, one matrix at a time in a fixed aligned buffer, so again
batch-independent bit for bit), followed by Rayleigh quotients uᴴMu that make the single-precision eigenvalues as
accurate as complex128 to ~2e-6 relative (OpenBLAS's cheevr alone is off by ~1e-7·||M||, 1e-3 relative for the
lowest band near Γ). Cells with exact symmetries (:func:`cell_symmetries`) are cheaper: an inversion centre makes
[ε] real about it (real symmetric eigenproblems), and :func:`irreducible_kgrid` drops the k-points related by the
cell's point group (used by :func:`essl.photonics.dos.compute_labels`). For many k-points per structure,
``solver="reduced"`` replaces the per-k-point diagonalisation by Rayleigh–Ritz in small per-patch bases with an
error check (:mod:`essl.photonics.reduced`; the labels' default for p1 and pm cells), batched over structures.

Devices. :func:`solve_bands` takes host maps and a ``device``: the checks and the symmetry analysis run on the host
copy, the plane waves and k-points are moved once, and the Cholesky factorisation skips torch's error-check read
(:func:`essl.photonics.lapack.cholesky`), so that a GPU solve is not interrupted by reads of its input.
"""

from __future__ import annotations

import math

import torch

from essl.photonics import reduced
from essl.photonics.lapack import cholesky, lapack_available, lapack_lowest
from essl.runtime import torch_threads

DEFAULT_CUTOFF = 5
"""Default plane-wave cutoff m: |G| ≤ 5 (units of 2π/a), 81 plane waves. DOS labels (16×16 grid, 8 level-set / 8 blob
cells) differ from |G| ≤ 7 (149 plane waves) by 0.17% / 0.05% relative L1 (|G| ≤ 4: 0.50% / 0.14%), far below
the k-grid error, at ~half the cost of |G| ≤ 6.

Band frequencies are less accurate than that suggests. Measured against a converged reference (complex128 at
|G| ≤ 10 and 14, Richardson-extrapolated with order 3; it agrees with MPB extrapolated from resolutions 64 and 128
to 1.4e-4 at worst) on 40 blob / 40 level-set cells (30 random, 10 of the highest contrast), at Γ, X, M and 40
points of the labels' 20×20 grid, 10 TM bands: relative error median 5.6e-5 / 1.4e-4, p90 1.3e-3 / 1.4e-3, max
2.8e-2 / 3.3e-2. The worst are the top bands of cells with a small high-ε inclusion (fill 2–13%), where the
field crowds into few pixels with sharp corners. TM bands converge from above (Galerkin in nested plane-wave
sets) as ~m⁻³; a max error below 4e-3 needs |G| ≤ 8 for blobs (max 2.7e-3) / |G| ≤ 9 for level sets (2.3e-3), at
2.8× / 4.3× the label cost, while the labels' DOS moves by only 0.15% / 0.14% relative L1 (mean; max 1.6% /
1.7%). Use a larger cutoff for band diagrams (eval/bench_solver.py, README "Photonic-crystal data")."""

DEFAULT_CUTOFF_SHAPE = "circle"
DEFAULT_MEMORY_BUDGET = 256 * 2**20
"""Bytes of working memory per chunk of eigenproblems (matrices plus eigensolver workspace)."""
DEFAULT_MEMORY_BUDGET_CUDA = 2 * 2**30
"""The same on a GPU (:func:`essl.photonics.dos.compute_labels`' default there): a chunk of 32-256 structures of the
default labels in one or a few batches (~15 MB per structure in the reduced-basis solver, measured on CPU; not
tuned on a GPU here)."""

DEFAULT_DTYPE = torch.complex64

DEFAULT_NUM_THREADS = 1
"""CPU threads used inside :func:`solve_bands` (restored afterwards); None leaves torch's setting alone. The
eigenproblems are small (P ≈ 100): a second MKL thread gains only ~20% on an idle 2-core machine, while on a busy
machine oversubscribed OpenMP threads slowed a 2-structure solve from 0.12 s to 33 s (measured)."""

POLARIZATIONS = ("tm", "te")
FOURIER_MODES = ("pixel", "dft")
CUTOFF_SHAPES = ("circle", "square")
EIGENSOLVERS = ("auto", "lapack", "torch")
SOLVERS = ("auto", "direct", "reduced")
REDUCED_MIN_KPOINTS = 64
"""solver="auto" uses the reduced basis from this many k-points per structure on: on the default 20×20 DOS grid the
p1 cells (200 irreducible k-points) and the pm ones (100), where it made TM labels ~2.1–2.5× faster than the
direct solver (measured side by side, 12 blob and 12 level-set cells); p4m cells (55 k-points, real symmetric
problems) stay direct."""

_ALIGN_K = 8
"""k-points per structure are padded to a multiple of this, so that every structure's block of matrices starts at
a 64-byte boundary (8 matrices × P² × 8 bytes) and the eigensolver sees the same alignment for it in any batch."""

_WORKSPACE_FACTOR = 4
"""Estimated bytes of a chunk per byte of its matrices: the matrix, LAPACK's column-major copy, eigenvectors,
temporaries."""

_ZERO_FREQUENCY = 1e-6
"""Frequencies below this (the ω = 0 mode at Γ) get a group velocity of exactly 0 instead of 0/0."""


# ----------------------------------------------------------------------------------------------- plane waves


def plane_waves(cutoff: float = DEFAULT_CUTOFF, shape: str = DEFAULT_CUTOFF_SHAPE) -> torch.Tensor:
    """Integer reciprocal-lattice vectors G (units of 2π/a) inside the cutoff, as a (P, 2) int64 tensor (g_x, g_y).

    ``shape="circle"``: g_x² + g_y² ≤ cutoff²; ``"square"``: max(|g_x|, |g_y|) ≤ cutoff. Sorted by |G|², then g_x,
    then g_y (deterministic; G = 0 first).
    """
    if shape not in CUTOFF_SHAPES:
        raise ValueError(f"cutoff_shape={shape!r}: expected one of {CUTOFF_SHAPES}")
    if cutoff < 0:
        raise ValueError(f"cutoff={cutoff!r}: must be >= 0")
    m = int(math.floor(cutoff))
    r = torch.arange(-m, m + 1)
    gx, gy = torch.meshgrid(r, r, indexing="xy")
    g = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # (P_square, 2)
    norm2 = (g**2).sum(1)
    if shape == "circle":
        g = g[norm2 <= cutoff**2 + 1e-9]
        norm2 = (g**2).sum(1)
    # lexicographic sort on (|G|², g_x, g_y) with one integer key
    span = 2 * m + 1
    key = (norm2 * span + (g[:, 0] + m)) * span + (g[:, 1] + m)
    return g[torch.argsort(key)]


def n_plane_waves(cutoff: float = DEFAULT_CUTOFF, shape: str = DEFAULT_CUTOFF_SHAPE) -> int:
    """Number P of plane waves in the set of :func:`plane_waves`."""
    return int(plane_waves(cutoff, shape).shape[0])


# ----------------------------------------------------------------------------------------------- k-points


def kgrid(
    n: int, *, time_reversal: bool = True, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform n×n grid of k-points at the centres of the cells of the first Brillouin zone [-½, ½]² (2π/a).

    k = ((i + ½)/n − ½, (j + ½)/n − ½), i, j = 0..n−1. For even n the grid is invariant under all of C4v and under
    k → −k without any point mapping onto itself, so with ``time_reversal=True`` (bands at k and −k coincide for
    a real permittivity) only the half with k_y > 0 is returned, each point with weight 2/n². For odd n the
    points with k_y > 0, plus those with k_y = 0 and k_x ≥ 0, are kept (Γ with weight 1/n², the others 2/n²).

    Returns:
        kpoints (K, 2) with columns (k_x, k_y), ordered row by row (k_y outer, k_x inner), and weights (K,)
        summing to 1 (the fraction of the zone each point represents).
    """
    if n < 1:
        raise ValueError(f"kgrid n={n!r}: must be >= 1")
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / n - 0.5  # (n,)
    ky, kx = torch.meshgrid(c, c, indexing="ij")
    k = torch.stack([kx.reshape(-1), ky.reshape(-1)], dim=1)  # (n², 2), k_y outer
    w = torch.full((n * n,), 1.0 / n**2, dtype=torch.float64)
    if time_reversal:
        tol = 0.25 / n
        upper = k[:, 1] > tol
        axis = (k[:, 1].abs() <= tol) & (k[:, 0] > tol)
        gamma = (k[:, 1].abs() <= tol) & (k[:, 0].abs() <= tol)
        keep = upper | axis | gamma
        w = torch.where(gamma, w, 2 * w)[keep]
        k = k[keep]
    return k.to(dtype), w.to(dtype)


HIGH_SYMMETRY_POINTS = {"G": (0.0, 0.0), "X": (0.5, 0.0), "M": (0.5, 0.5)}
"""Γ, X, M of the square lattice in units of 2π/a."""


def kpath(
    points_per_segment: int = 20, path: str = "GXMG", dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Straight-line path through high-symmetry points (default Γ–X–M–Γ) for band diagrams.

    Returns:
        kpoints (K, 2) in units of 2π/a, the cumulative path length (K,) for the abscissa, and the indices of
        the high-symmetry points along the path (tick positions).
    """
    corners = torch.tensor([HIGH_SYMMETRY_POINTS[p] for p in path], dtype=torch.float64)
    pieces, ticks = [], [0]
    for a, b in zip(corners[:-1], corners[1:], strict=True):
        t = torch.arange(points_per_segment, dtype=torch.float64)[:, None] / points_per_segment
        pieces.append(a + t * (b - a))
        ticks.append(ticks[-1] + points_per_segment)
    pieces.append(corners[-1:])
    k = torch.cat(pieces)  # (K, 2)
    dist = torch.cat([torch.zeros(1, dtype=torch.float64), (k[1:] - k[:-1]).norm(dim=1).cumsum(0)])
    return k.to(dtype), dist.to(dtype), ticks


# ----------------------------------------------------------------------------------------------- ε matrices


def fourier_coefficients(eps: torch.Tensor, max_index: int, fourier: str = "pixel") -> torch.Tensor:
    """Fourier coefficients ε̂(G) of the periodic map for all G with |g_x|, |g_y| ≤ max_index.

    Both rules use the same frame, that of :mod:`essl.photonics.unitcell`: pixel (row, col) is centred at
    ((col + ½)/n, (row + ½)/n), so one point of the cell (an inversion centre, :func:`inversion_centres`) has the
    same fractional coordinates in both.

    Args:
        eps: (B, n, n) real permittivity maps (rows = y, columns = x).
        max_index: largest |g| component needed (2m for the Toeplitz matrix of a cutoff m).
        fourier: "pixel" (exact coefficients of the piecewise-constant map, never aliased) or "dft" (the FFT
            coefficients, i.e. those of the trigonometric interpolant through the pixel values at the pixel
            centres; raises ValueError unless max_index < n/2, where they are alias-free).

    Returns:
        (B, 2·max_index+1, 2·max_index+1) complex128, entry [b, g_y + max_index, g_x + max_index] =
        ∫_cell ε(r) e^{−2πi G·r} d²r.
    """
    if fourier not in FOURIER_MODES:
        raise ValueError(f"fourier={fourier!r}: expected one of {FOURIER_MODES}")
    if eps.ndim != 3 or eps.shape[-1] != eps.shape[-2]:
        raise ValueError(f"eps must have shape (B, n, n), got {tuple(eps.shape)}")
    n = eps.shape[-1]
    if fourier == "dft" and 2 * max_index >= n:
        raise ValueError(
            f"fourier='dft' with Fourier indices up to {max_index} (cutoff {max_index // 2}) aliases on a {n}×{n} map:"
            f" the FFT is alias-free only for |g| < n/2 = {n / 2:g}, i.e. a cutoff m with 2m < n/2;"
            " upsample the map or use fourier='pixel' (exact for the pixelated cell)"
        )
    spec = torch.fft.fft2(eps.to(torch.float64)) / n**2  # (B, n, n), index [g_y mod n, g_x mod n]
    g = torch.arange(-max_index, max_index + 1, device=eps.device)
    idx = torch.remainder(g, n)
    coef = spec[:, idx][:, :, idx]  # (B, 2M+1, 2M+1) [g_y, g_x]
    gf = g.to(torch.float64)
    # the FFT puts sample col at x = col/n; the pixel centre is at (col + ½)/n, half a pixel further: the shift
    # theorem multiplies the coefficients by e^{-iπg/n} in each direction. Without this phase the "dft" frame
    # would sit half a pixel away from the "pixel" one, and an inversion centre found on the map
    # (inversion_centres, pixel frame) would not be one of the "dft" coefficients (their imaginary part, dropped
    # by the real-symmetric path, is then not rounding: bands were off by up to 3.5%).
    shift = torch.exp(-1j * math.pi * gf / n)  # (2M+1,)
    # "pixel": the pixel is a box of side 1/n about its centre, whose transform is sinc(g/n) in each direction
    factor = shift * torch.sinc(gf / n) if fourier == "pixel" else shift
    return coef * factor[:, None] * factor[None, :]


def epsilon_matrix(
    eps: torch.Tensor, gvecs: torch.Tensor, fourier: str = "pixel", origin: torch.Tensor | None = None
) -> torch.Tensor:
    """Toeplitz matrix [ε]_{GG'} = ε̂(G − G') (Laurent rule), (B, P, P) complex128, for the plane waves gvecs (P, 2).

    ``origin`` (B, 2) (fractional (x, y)) moves the origin of the Fourier transform to that point: ε̂(G) is
    multiplied by e^{2πi G·origin}, a unitary similarity D [ε] D* (D = diag(e^{2πi G·origin})) that leaves the bands
    unchanged. About an inversion centre of the cell the coefficients, and so [ε], are real (:func:`inversion_centres`).
    """
    m = int(gvecs.abs().max()) if gvecs.numel() else 0  # pass host plane waves: no device read
    gvecs = gvecs.to(eps.device)
    coef = fourier_coefficients(eps, 2 * m, fourier)  # (B, 4m+1, 4m+1)
    if origin is not None:
        g = torch.arange(-2 * m, 2 * m + 1, device=eps.device, dtype=torch.float64)
        o = origin.to(device=eps.device, dtype=torch.float64)
        phase = 2 * math.pi * (o[:, 1, None, None] * g[None, :, None] + o[:, 0, None, None] * g[None, None, :])
        coef = coef * torch.polar(torch.ones_like(phase), phase)
    d = gvecs[:, None, :] - gvecs[None, :, :] + 2 * m  # (P, P, 2), shifted to non-negative indices
    flat = d[..., 1] * (4 * m + 1) + d[..., 0]  # (P, P) into the flattened [g_y, g_x] grid
    return coef.reshape(coef.shape[0], -1)[:, flat]  # (B, P, P)


def inverse_epsilon_matrix(
    eps: torch.Tensor,
    gvecs: torch.Tensor,
    fourier: str = "pixel",
    origin: torch.Tensor | None = None,
    real: bool = False,
) -> torch.Tensor:
    """[ε]⁻¹ (B, P, P) complex128 (inverse rule; Ho et al. 1990, Li 1996). [ε] is Hermitian positive definite for
    ε(r) > 0, so a Cholesky factorisation inverts it. ``origin``: see :func:`epsilon_matrix`; ``real=True`` (only
    for an origin at an inversion centre, where the imaginary part is rounding) returns the float64 real inverse."""
    e = epsilon_matrix(eps, gvecs, fourier, origin)
    if real:
        e = real_part_about_centre(e)
    return torch.cholesky_inverse(cholesky(e))


_REAL_RTOL = 1e-9
"""About an inversion centre the imaginary part of [ε] is float64 rounding of the FFT and the phases (~1e-15 of
its largest entry); more than this fraction means the origin is not an inversion centre of the coefficients."""


def real_part_about_centre(e: torch.Tensor) -> torch.Tensor:
    """The real part of [ε] (B, P, P) taken about an inversion centre, checked: raises RuntimeError if the
    imaginary part is more than rounding (``_REAL_RTOL`` of the largest entry), instead of silently solving another
    cell (the cause of the half-pixel "dft" bug, :func:`fourier_coefficients`)."""
    scale = e.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)  # (B,)
    worst = (e.imag.abs().amax(dim=(-2, -1)) / scale).max().item() if e.numel() else 0.0
    if worst > _REAL_RTOL:
        raise RuntimeError(
            f"[ε] about the detected inversion centre has an imaginary part {worst:.1e} of its largest entry:"
            " the origin is not an inversion centre of these Fourier coefficients"
        )
    return e.real.contiguous()


# ----------------------------------------------------------------------------------------------- cell symmetry

POINT_OPS = ("mx", "my", "c2", "d", "ad", "c4", "c4i")
"""The non-trivial operations of C4v about the cell centre: mirrors x -> -x ("mx") and y -> -y ("my"), the 180°
rotation = inversion ("c2"), the diagonal mirrors x <-> y ("d") and x <-> -y ("ad"), the 90° rotations ("c4",
"c4i")."""

_POINT_OP_MAPS = {
    "mx": lambda e: e.flip(-1),
    "my": lambda e: e.flip(-2),
    "c2": lambda e: e.flip(-2, -1),
    "d": lambda e: e.transpose(-1, -2),
    "ad": lambda e: e.transpose(-1, -2).flip(-2, -1),
    "c4": lambda e: torch.rot90(e, 1, dims=(-2, -1)),
    "c4i": lambda e: torch.rot90(e, -1, dims=(-2, -1)),
}
"""Each operation as an exact array operation on (..., row = y, col = x) maps about the cell centre."""

_POINT_OP_MATRICES = {
    "mx": ((-1, 0), (0, 1)),
    "my": ((1, 0), (0, -1)),
    "c2": ((-1, 0), (0, -1)),
    "d": ((0, 1), (1, 0)),
    "ad": ((0, -1), (-1, 0)),
    "c4": ((0, -1), (1, 0)),
    "c4i": ((0, 1), (-1, 0)),
}
"""The same operations as 2×2 matrices acting on (x, y) and on (k_x, k_y). (Which of the two 90° rotations is
"c4" does not matter here: a cell symmetric under one is symmetric under the other.)"""

_SYMMETRY_RTOL = 1e-9
"""Relative tolerance on the FFT cross-correlation that proposes a shift; every proposal is then verified exactly."""


def cell_symmetries(eps: torch.Tensor) -> list[dict[str, tuple[int, int]]]:
    """The point-group operations that map each cell onto itself exactly, bit for bit, up to a periodic shift.

    For every structure and every operation R of :data:`POINT_OPS` (about the cell centre) the periodic pixel
    shifts s = (s_y, s_x) with ``torch.roll(R(eps), s) == eps`` are searched: an FFT cross-correlation proposes
    the shifts where ||roll(R(eps), s) − eps|| vanishes (to rounding), and a proposal is accepted only if the
    shifted map equals the original exactly. Symmetry operations whose mirror line or rotation centre lies on a
    pixel centre or a pixel edge are therefore all found (these are the ones a pixel map can have), and no
    operation is ever reported that the map does not have: a nearly symmetric cell counts as not symmetric.

    Args:
        eps: (B, n, n) real maps.

    Returns:
        one dict per structure, {operation name: (s_y, s_x)} for the operations it has (empty for p1 cells).
    """
    if eps.ndim != 3 or eps.shape[-1] != eps.shape[-2]:
        raise ValueError(f"eps must have shape (B, n, n), got {tuple(eps.shape)}")
    e = eps.detach().cpu().to(torch.float64)
    n = e.shape[-1]
    spec = torch.fft.fft2(e)
    norm2 = (e * e).sum(dim=(-2, -1))  # (B,)
    out: list[dict[str, tuple[int, int]]] = [{} for _ in range(e.shape[0])]
    raw = eps.detach().cpu()
    for name in POINT_OPS:
        t = _POINT_OP_MAPS[name](e)
        # corr[s] = Σ_r e[r] t[r − s] = <e, roll(t, s)>; ||roll(t, s) − e||² = 2 (||e||² − corr[s])
        corr = torch.fft.ifft2(spec * torch.fft.fft2(t).conj()).real  # (B, n, n)
        close = (norm2[:, None, None] - corr) <= _SYMMETRY_RTOL * norm2[:, None, None]
        for b, sy, sx in close.nonzero().tolist():
            if name in out[b]:
                continue
            if torch.equal(torch.roll(_POINT_OP_MAPS[name](raw[b]), (sy, sx), dims=(0, 1)), raw[b]):
                out[b][name] = (sy % n, sx % n)
    return out


def inversion_centres(eps: torch.Tensor, symmetries: list[dict] | None = None) -> torch.Tensor:
    """Inversion centre (x, y) (fractional) of every cell that has one, NaN for the others; (B, 2) float64.

    A cell with ``roll(c2(eps), (s_y, s_x)) == eps`` satisfies ε(c0 − r) = ε(r), c0 = (s_x, s_y)/n, so it is even
    about c0/2, where its Fourier coefficients are real."""
    symmetries = cell_symmetries(eps) if symmetries is None else symmetries
    n = eps.shape[-1]
    out = torch.full((len(symmetries), 2), float("nan"), dtype=torch.float64)
    for b, ops in enumerate(symmetries):
        if "c2" in ops:
            sy, sx = ops["c2"]
            out[b] = torch.tensor([sx / (2 * n), sy / (2 * n)], dtype=torch.float64)
    return out


def irreducible_kgrid(
    n: int, operations=(), dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k-points of :func:`kgrid` (n×n cell centres, time-reversal half) reduced by a cell's point group.

    Bands at R k equal those at k for every point operation R of the cell (and at −k by time reversal), so one
    representative per orbit of the group generated by ``operations`` (names of :data:`POINT_OPS`) and −1 is
    solved, weighted by the size of its orbit on the full grid (the grid of cell centres is invariant under C4v).
    The group velocities of an orbit are the representative's rotated / mirrored, v(Rk) = R v(k): their absolute
    components are those of the representative, permuted, so a cell's GGR contribution is the same for the whole
    orbit (:func:`essl.photonics.dos.dos_ggr`).

    Returns:
        kpoints (K', 2), weights (K',) summing to 1, and index (K,) mapping every point of ``kgrid(n)`` (same
        order) to its representative, so that bands on the half grid are ``bands[:, index]``. With no operations
        this is exactly ``kgrid(n)`` with index = arange(K).
    """
    k_half, _ = kgrid(n, dtype=torch.float64)
    mats = [torch.tensor(_POINT_OP_MATRICES[o], dtype=torch.long) for o in operations]
    group = {(1, 0, 0, 1), (-1, 0, 0, -1)}
    frontier = [torch.eye(2, dtype=torch.long), -torch.eye(2, dtype=torch.long)] + mats
    group |= {tuple(m.reshape(-1).tolist()) for m in mats}
    while frontier:  # closure of the generated group (at most 8 elements)
        a = frontier.pop()
        for b in list(group):
            c = a @ torch.tensor(b, dtype=torch.long).reshape(2, 2)
            key = tuple(c.reshape(-1).tolist())
            if key not in group:
                group.add(key)
                frontier.append(c)
    gmats = torch.tensor(sorted(group), dtype=torch.long).reshape(-1, 2, 2)  # (|G|, 2, 2)
    # integer coordinates u = 2 i − (n − 1) of the grid, k = u / 2n (exact under every operation)
    u = torch.round(k_half * 2 * n).long()  # (K, 2)
    key = lambda v: (v[..., 1] + n) * (2 * n + 1) + (v[..., 0] + n)  # noqa: E731
    half_index = {int(kk): i for i, kk in enumerate(key(u).tolist())}
    images = torch.einsum("gij,kj->kgi", gmats, u)  # (K, |G|, 2)
    rep = torch.empty(len(u), dtype=torch.long)
    orbit = torch.empty(len(u), dtype=torch.long)
    for i, img in enumerate(key(images).tolist()):
        distinct = set(img)
        rep[i] = min(half_index[j] for j in distinct if j in half_index)
        orbit[i] = len(distinct)
    reps = torch.unique(rep)  # sorted: the representatives in kgrid order
    position = torch.full((len(u),), -1, dtype=torch.long)
    position[reps] = torch.arange(len(reps))
    weights = orbit[reps].to(torch.float64) / n**2
    return k_half[reps].to(dtype), weights.to(dtype), position[rep]


# ----------------------------------------------------------------------------------------------- solver


cpu_threads = torch_threads  # kept as the solver's public name


def _chunks(
    n_structures: int, k_pad: int, bytes_per_matrix: int, memory_budget: int
) -> list[tuple[int, int, int, int]]:
    """Split (structure, k) work into chunks (s0, s1, k0, k1) of whole structures, or of k-slices of one structure,
    each with at most ``memory_budget`` bytes. The split of one structure's k-points depends only on the budget."""
    per_matrix = bytes_per_matrix * _WORKSPACE_FACTOR
    max_mats = max(_ALIGN_K, memory_budget // per_matrix)
    if k_pad <= max_mats:
        per_chunk = max(1, max_mats // k_pad)
        return [(s, min(s + per_chunk, n_structures), 0, k_pad) for s in range(0, n_structures, per_chunk)]
    k_step = (max_mats // _ALIGN_K) * _ALIGN_K
    return [(s, s + 1, k0, min(k0 + k_step, k_pad)) for s in range(n_structures) for k0 in range(0, k_pad, k_step)]


def _solve_group(
    a_inv: torch.Tensor,
    q: torch.Tensor,
    n_bands: int,
    polarization: str,
    group_velocity: bool,
    memory_budget: int,
    eigensolver: str,
    real_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bands (and velocities) of structures sharing one formulation: a_inv (b, P, P) complex or real, q (Kp, P, 2)."""
    device = a_inv.device
    B, k_pad, n_pw = a_inv.shape[0], q.shape[0], q.shape[1]
    qn = q.norm(dim=-1)  # (Kp, P) = |k+G|
    freqs = torch.empty(B, k_pad, n_bands, dtype=real_dtype, device=device)
    vg = torch.empty(B, k_pad, n_bands, 2, dtype=real_dtype, device=device) if group_velocity else None
    itemsize = a_inv.element_size()
    for s0, s1, k0, k1 in _chunks(B, k_pad, n_pw * n_pw * itemsize, memory_budget):
        a = a_inv[s0:s1, None]  # (b, 1, P, P)
        qc, qnc = q[k0:k1], qn[k0:k1]  # (k, P, 2), (k, P)
        if polarization == "tm":
            mat = a * (qnc[:, :, None] * qnc[:, None, :])  # (b, k, P, P) = S A S
        else:
            mat = a * (qc @ qc.transpose(-1, -2))  # (b, k, P, P) = [(k+G)·(k+G')] ∘ A
        if eigensolver == "lapack":
            _, u = lapack_lowest(mat.reshape(-1, n_pw, n_pw), n_bands, True)
            u = u.reshape(*mat.shape[:2], n_pw, n_bands)
            # Rayleigh quotients uᴴMu/uᴴu: the eigenvalue error becomes quadratic in the eigenvector error. Single-
            # precision ?heevr / ?syevr (OpenBLAS) leave absolute errors ~1e-7·||M|| in the eigenvalues themselves,
            # 1e-3 relative for the lowest band near Γ; the quotient restores ~1e-6 relative (tests).
            mu = mat @ u  # (b, k, P, nb)
            num = (u.conj() * mu).real.sum(-2) if u.is_complex() else (u * mu).sum(-2)
            den = (u.real**2 + u.imag**2).sum(-2) if u.is_complex() else (u * u).sum(-2)
            lam, order = (num / den).sort(dim=-1)  # (b, k, nb), ascending even where near-degenerate
            u = u.gather(-1, order[..., None, :].expand_as(u))
            if not group_velocity:
                u = None
        elif not group_velocity:
            lam, u = torch.linalg.eigvalsh(mat)[..., :n_bands], None  # (b, k, nb)
        else:
            lam, vec = torch.linalg.eigh(mat)
            lam, u = lam[..., :n_bands], vec[..., :n_bands]  # (b, k, nb), (b, k, P, nb), unit columns
        f = lam.clamp_min(0).sqrt()
        freqs[s0:s1, k0:k1] = f
        if not group_velocity:
            continue
        w = u.real**2 + u.imag**2 if u.is_complex() else u**2  # (b, k, P, nb) = |u_G|²
        if polarization == "tm":
            # dλ/dk = 2λ Σ_G (k+G) |u_G|² / |k+G|² (from K E = λ [ε] E with u = S E), so df/dk = f Σ_G ...;
            # u_G = |k+G| E_G vanishes where k+G = 0, where the weight is set to 0 instead of 0/0
            inv_q2 = torch.where(qnc > 0, 1 / qnc.clamp_min(torch.finfo(real_dtype).tiny) ** 2, 0)  # (k, P)
            dir_ = qc * inv_q2[..., None]  # (k, P, 2)
            v = f[..., None] * torch.einsum("bkpn,kpd->bknd", w, dir_)  # (b, k, nb, 2)
        else:
            # dM/dk_d = D_d A + A D_d with D_d = diag((k+G)_d): dλ/dk_d = 2 Re(u† D_d A u), df/dk = dλ/dk / 2f
            au = a_inv[s0:s1, None] @ u  # (b, k, P, nb)
            proj = (u.conj() * au).real if u.is_complex() else u * au  # (b, k, P, nb)
            dl = torch.einsum("bkpn,kpd->bknd", proj, qc)  # (b, k, nb, 2) = dλ/dk / 2
            safe = f > _ZERO_FREQUENCY
            v = torch.where(safe[..., None], dl / f.clamp_min(_ZERO_FREQUENCY)[..., None], 0)
        vg[s0:s1, k0:k1] = v.to(real_dtype)
    return freqs, vg


def solve_bands(
    eps: torch.Tensor,
    kpoints: torch.Tensor,
    n_bands: int = 10,
    polarization: str = "tm",
    cutoff: float = DEFAULT_CUTOFF,
    group_velocity: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: torch.dtype = DEFAULT_DTYPE,
    cutoff_shape: str = DEFAULT_CUTOFF_SHAPE,
    fourier: str = "pixel",
    num_threads: int | None = DEFAULT_NUM_THREADS,
    eigensolver: str = "auto",
    real_inversion: bool = True,
    solver: str = "direct",
    *,
    batched: bool = True,
    device: torch.device | str | None = None,
    symmetries: list[dict] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lowest ``n_bands`` band frequencies of a batch of 2D photonic crystals at the given k-points.

    Plane-wave expansion with the inverse rule (module docstring; Ho, Chan & Soukoulis 1990; Joannopoulos et al.
    ch. 5). Runs on ``device`` (default: the device of ``eps``). With ``eps`` on the CPU and ``device`` a GPU, the
    checks and the symmetry analysis run on the host copy and the solve on the GPU, without blocking reads of the
    input.

    Args:
        eps: (B, n, n) or (n, n) real permittivity maps, ε > 0 (rows = y, columns = x).
        kpoints: (K, 2) Bloch vectors (k_x, k_y) in units of 2π/a.
        n_bands: number of lowest bands returned.
        polarization: "tm" (E_z) or "te" (H_z).
        cutoff: plane-wave cutoff m in units of 2π/a (see ``cutoff_shape``).
        group_velocity: also return dω/dk from the eigenvectors (Hellmann–Feynman theorem).
        memory_budget: bytes of working memory per chunk of eigenproblems.
        dtype: complex dtype of the eigenproblems (complex64 default; complex128 for reference accuracy).
        cutoff_shape: "circle" (|G| ≤ m, default) or "square" (|g_x|, |g_y| ≤ m).
        fourier: "pixel" or "dft" Fourier coefficients (see :func:`fourier_coefficients`).
        num_threads: CPU threads for the duration of the call (DEFAULT_NUM_THREADS); None = torch's setting.
            Ignored on other devices.
        eigensolver: "lapack" (CPU only: LAPACK's MRRR ?heevr / ?syevr for the lowest n_bands eigenpairs only,
            one matrix at a time), "torch" (batched ``torch.linalg.eigh`` / ``eigvalsh``, all eigenpairs; any
            device) or "auto" (DEFAULT: "lapack" on CPU when eigenvectors are needed, else "torch").
        real_inversion: solve cells with an inversion centre (detected exactly, :func:`cell_symmetries`) as real
            symmetric problems (Fourier origin at the centre, where [ε] is real; float32 for complex64).
        solver: "direct" (DEFAULT: one P×P eigenproblem per k-point), "reduced" (Rayleigh–Ritz in a small basis
            per patch of the zone, built from direct solves at the patch corners, with an a-posteriori error
            estimate that re-solves doubtful k-points directly; :mod:`essl.photonics.reduced`) or "auto" ("reduced"
            from REDUCED_MIN_KPOINTS k-points on, else "direct"). "reduced" pays off for many k-points per structure
            (DOS grids); ``eigensolver`` then applies to its seed problems and ``memory_budget`` bounds its
            sub-batches of structures.
        batched: "reduced" only: solve the structures of a call together (DEFAULT; :func:`reduced.solve_reduced`),
            or one at a time (``False``, the per-structure path it agrees with to rounding).
        device: where to solve (default: the device of ``eps``).
        symmetries: :func:`cell_symmetries` of ``eps`` if already known (the inversion centres come from it).

    Returns:
        freqs (B, K, n_bands) in units of ωa/2πc, float32 for complex64 / float64 for complex128, ascending per
        k-point; with ``group_velocity=True`` also vgroup (B, K, n_bands, 2) = (∂f/∂k_x, ∂f/∂k_y) in units of c
        (exactly 0 for the ω = 0 mode at Γ). At a degenerate k-point the velocities of the degenerate bands are
        those of an arbitrary basis of the degenerate subspace (uniform grids at cell centres avoid such points).
    """
    if device is None:
        device = eps.device
    device = torch.device(device)
    if num_threads is not None and device.type == "cpu" and num_threads != torch.get_num_threads():
        with cpu_threads(num_threads):
            return solve_bands(
                eps,
                kpoints,
                n_bands,
                polarization,
                cutoff,
                group_velocity,
                memory_budget,
                dtype,
                cutoff_shape,
                fourier,
                num_threads=None,
                eigensolver=eigensolver,
                real_inversion=real_inversion,
                solver=solver,
                batched=batched,
                device=device,
                symmetries=symmetries,
            )
    polarization = polarization.lower()
    if polarization not in POLARIZATIONS:
        raise ValueError(f"polarization={polarization!r}: expected one of {POLARIZATIONS}")
    if dtype not in (torch.complex64, torch.complex128):
        raise ValueError(f"dtype={dtype}: expected torch.complex64 or torch.complex128")
    if eigensolver not in EIGENSOLVERS:
        raise ValueError(f"eigensolver={eigensolver!r}: expected one of {EIGENSOLVERS}")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")
    squeeze = eps.ndim == 2
    if squeeze:
        eps = eps[None]
    if eps.ndim != 3 or eps.shape[-1] != eps.shape[-2]:
        raise ValueError(f"eps must have shape (B, n, n), got {tuple(eps.shape)}")
    if eps.is_complex() or not bool((torch.isfinite(eps) & (eps > 0)).all()):  # one read (none for a host eps)
        raise ValueError("eps must be real, finite and positive")
    kpoints = torch.as_tensor(kpoints)
    if kpoints.ndim != 2 or kpoints.shape[1] != 2:
        raise ValueError(f"kpoints must have shape (K, 2), got {tuple(kpoints.shape)}")
    if solver == "auto":
        solver = "reduced" if kpoints.shape[0] >= REDUCED_MIN_KPOINTS else "direct"
    if eigensolver == "auto":
        vectors = group_velocity or solver == "reduced"
        eigensolver = "lapack" if device.type == "cpu" and vectors and lapack_available() else "torch"
    if eigensolver == "lapack" and device.type != "cpu":
        raise ValueError(f"eigensolver='lapack' runs on CPU only, the solve is on {device}")
    real_dtype = torch.float32 if dtype == torch.complex64 else torch.float64
    gvecs = plane_waves(cutoff, cutoff_shape)  # (P, 2) on the host; the ε-matrix builders move it
    n_pw = gvecs.shape[0]
    if not 1 <= n_bands <= n_pw:
        raise ValueError(f"n_bands={n_bands!r}: must be in [1, {n_pw}] for {n_pw} plane waves (cutoff {cutoff})")
    B, K = eps.shape[0], kpoints.shape[0]

    # k-points padded (repeating the last one) to a multiple of _ALIGN_K; the padding is discarded
    k_pad = -(-K // _ALIGN_K) * _ALIGN_K
    k_host = kpoints.detach().cpu().to(torch.float64)
    kk = k_host.to(device)
    kk = torch.cat([kk, kk[-1:].expand(k_pad - K, 2)]) if k_pad > K else kk
    q = (kk[:, None, :] + gvecs[None].to(device, torch.float64)).to(real_dtype)  # (Kp, P, 2) = k + G

    if real_inversion:
        centres = inversion_centres(eps, symmetries)
    else:
        centres = torch.full((B, 2), float("nan"), dtype=torch.float64)
    is_real = ~centres[:, 0].isnan()
    eps_dev = eps.to(device)
    freqs = torch.empty(B, k_pad, n_bands, dtype=real_dtype, device=device)
    vg = torch.empty(B, k_pad, n_bands, 2, dtype=real_dtype, device=device) if group_velocity else None
    for real in (False, True):
        idx = (is_real == real).nonzero()[:, 0]
        if len(idx) == 0:
            continue
        idx_dev = idx.to(device)
        sub = eps_dev[idx_dev]
        if solver == "reduced":
            origin = centres[idx].to(device) if real else None
            e = epsilon_matrix(sub, gvecs, fourier, origin)
            e = real_part_about_centre(e) if real else e
            f, v, _ = reduced.solve_reduced(
                reduced.quadratic_form(e, gvecs, polarization),
                k_host,
                n_bands,
                group_velocity,
                seed_dtype=real_dtype if real else dtype,
                eigensolver=eigensolver,
                batched=batched,
                memory_budget=memory_budget,
            )
            freqs[idx_dev, :K] = f.to(real_dtype)
            if group_velocity:
                vg[idx_dev, :K] = v.to(real_dtype)
            continue
        if real:  # [ε] real symmetric about the inversion centre; float32 / float64 real eigenproblems
            a_inv = inverse_epsilon_matrix(sub, gvecs, fourier, centres[idx].to(device), real=True).to(real_dtype)
        else:
            a_inv = inverse_epsilon_matrix(sub, gvecs, fourier).to(dtype)  # (b, P, P), once per structure
        f, v = _solve_group(a_inv, q, n_bands, polarization, group_velocity, memory_budget, eigensolver, real_dtype)
        freqs[idx_dev] = f
        if group_velocity:
            vg[idx_dev] = v

    freqs = freqs[:, :K]
    if squeeze:
        freqs = freqs[0]
    if not group_velocity:
        return freqs
    vg = vg[:, :K]
    return freqs, (vg[0] if squeeze else vg)


def empty_lattice_bands(
    kpoints: torch.Tensor, eps: float = 1.0, n_bands: int = 10, cutoff: float = 8.0
) -> torch.Tensor:
    """Reference bands of a homogeneous medium: the lowest n_bands of |k+G|/√ε over all G with |G| ≤ cutoff, (K, nb)."""
    g = plane_waves(cutoff, "circle").to(torch.float64)
    kk = torch.as_tensor(kpoints, dtype=torch.float64)
    f = (kk[:, None, :] + g[None]).norm(dim=-1) / math.sqrt(eps)  # (K, P)
    return f.sort(dim=-1).values[:, :n_bands]
