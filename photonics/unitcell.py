"""Unit-cell generators for 2D photonic crystals (square lattice, lattice constant a = 1).

Every generator returns permittivity maps ``eps`` of shape ``(N, size, size)``, dtype ``float32``, as a
**numpy array** (convert with ``torch.from_numpy`` where a tensor is needed). The values are physical
relative permittivities (ε ≥ 1), never normalised here; models normalise as (ε − 1)/19 at their input.

Datasets (docs/design.md, "Photonics physics"):

* ``blob`` -- one smooth random blob centred in the cell, two-tone ε in [1, 20]: the "blob" unit cells of the
  photonics benchmark of Dangovski et al., "Equivariant Contrastive Learning", ICLR 2022, built on the 2D
  photonic-crystal data of Loh et al., "Surrogate- and invariance-boosted contrastive learning for
  data-scarce applications in science", Nature Communications 2022. Our shape is a star-shaped region whose
  radius is a short random Fourier series in the polar angle (low harmonics only, hence a smooth boundary).
* ``levelset`` -- the level-set cells of Loh et al. 2022: threshold of a random real Fourier sum over the
  3×3 set of reciprocal vectors G = 2π(n₁, n₂), |n_i| ≤ 1, optionally with a plane-group symmetry
  (p1: none; pm: one mirror; p4m: the full C4v point group), at the quantile that gives a fill fraction
  ~ U(0.01, 0.99); ε_in, ε_out ~ U(1, 20).
* ``cylinder`` -- one circular rod centred in the cell, radius r in (0, 0.5], configurable ε values (e.g. the
  ε = 8.9, r = 0.2a rods of Joannopoulos et al., "Photonic Crystals", ch. 5, used to validate the solver).

Conventions. Axis 1 of a map is y (rows), axis 2 is x (columns); pixel (row, col) samples the cell at its
centre ((col + ½)/size, (row + ½)/size) in fractional coordinates. This grid of pixel centres is invariant
under the 8 operations of C4v about the cell centre (½, ½), which therefore act on the maps *exactly* as
array operations (``np.rot90``, ``np.flip``, transposition) -- see :func:`c4v_images`.

Reproducibility. The structure with global index ``i`` is drawn from its own random stream, a child of
``numpy.random.SeedSequence(seed)`` keyed by (kind, i) (:func:`structure_rng`), so it depends only on
``(seed, i)``: generating indices
``start .. start + n - 1`` in chunks, or resuming an interrupted run, reproduces exactly the same cells as
one run over everything. Only the handful of scalar parameters per structure is drawn in a Python loop;
the maps are built with vectorised numpy over the whole batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from essl.errors import UserError

DEFAULT_SIZE = 32
"""Pixels per side of the unit cell (the benchmark's 32×32 maps)."""

EPS_MIN = 1.0
EPS_MAX = 20.0
"""Range of the random permittivities, ε ~ U(EPS_MIN, EPS_MAX) (Loh et al. 2022)."""

FILL_MIN = 0.01
FILL_MAX = 0.99
"""Range of the level-set fill fraction, ~ U(FILL_MIN, FILL_MAX) (Loh et al. 2022)."""

CELL_CENTRE = 0.5
"""Centre of the unit cell in fractional coordinates (blobs and rods are centred here)."""

MAX_RADIUS = 0.5
"""Largest rod radius that still fits in the unit cell (touching rods)."""

# Blob shape: r(θ) = r0 · (1 + Σ_k (a_k cos kθ + b_k sin kθ) · BLOB_AMPLITUDE / k), a_k, b_k ~ N(0, 1).
# The first harmonic (k = 1) is left out: it mostly shifts the shape off centre, and the blob is centred.
BLOB_R0_RANGE = (0.15, 0.35)
BLOB_HARMONICS = (2, 5)
BLOB_AMPLITUDE = 0.12
BLOB_R_CLIP = (0.05, 0.48)  # keep the blob non-empty and inside the cell (0.48 < MAX_RADIUS)

# Level set: the non-zero half of the 3×3 reciprocal-vector set {(n1, n2) : |n_i| ≤ 1} (the other half is
# ±G of these; the constant term only shifts the threshold, which is set by a quantile anyway).
LEVELSET_G = np.array([(1, 0), (0, 1), (1, 1), (1, -1)], dtype=np.float64)

KINDS = ("blob", "levelset", "cylinder")
SYMMETRIES = ("p1", "pm", "p4m")
DEFAULT_SYMMETRY = "pm"
"""The level-set dataset of the E-SSL paper uses one mirror (pm); docs/design.md."""


STREAM_ID = {"blob": 1, "levelset": 2, "cylinder": 3}
"""Fixed per-kind stream tags, so that datasets of different kinds made with one seed are independent."""


def structure_rng(seed: int, index: int, kind: str) -> np.random.Generator:
    """Random stream of structure ``index`` of a ``kind`` dataset: ``SeedSequence(seed)``'s child
    with spawn key (STREAM_ID[kind], index)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(STREAM_ID[kind], index)))


def _draw(
    kind: str, seed: int, start: int, n: int, draw_one: Callable[[np.random.Generator], np.ndarray]
) -> np.ndarray:
    """Stack ``draw_one(rng_i)`` for i in [start, start + n) -> (n, p) float64 parameter table."""
    rows = [draw_one(structure_rng(seed, i, kind)) for i in range(start, start + n)]
    return np.stack(rows) if rows else np.zeros((0, 0))


def pixel_grid(size: int, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fractional coordinates (x, y), each (size·s, size·s), of the (sub)pixel centres of one unit cell."""
    m = size * supersample
    t = (np.arange(m) + 0.5) / m
    y, x = np.meshgrid(t, t, indexing="ij")  # axis 0 = y (rows), axis 1 = x (columns)
    return x, y


def _block_mean(mask: np.ndarray, size: int, s: int) -> np.ndarray:
    """(N, size·s, size·s) -> (N, size, size): average over s×s sub-pixels (area fraction inside)."""
    if s == 1:
        return mask.astype(np.float64)
    return mask.reshape(mask.shape[0], size, s, size, s).mean(axis=(2, 4))


def _two_tone(inside: np.ndarray, eps_in: np.ndarray, eps_out: np.ndarray) -> np.ndarray:
    """Mix ε_in (area fraction ``inside``) and ε_out per pixel -> float32 (N, size, size)."""
    e_in = eps_in[:, None, None]
    e_out = eps_out[:, None, None]
    return (e_out + (e_in - e_out) * inside).astype(np.float32)


def _eps_or_random(value: float | None, rng: np.random.Generator) -> float:
    return float(rng.uniform(EPS_MIN, EPS_MAX)) if value is None else float(value)


def _check_eps(name: str, value: float | None) -> None:
    if value is not None and not (np.isfinite(value) and value >= EPS_MIN):
        raise UserError(f"unit cell option {name}={value!r}: permittivity must be finite and >= {EPS_MIN}")


def _check_supersample(supersample: int) -> None:
    if int(supersample) != supersample or supersample < 1:
        raise UserError(f"unit cell option supersample={supersample!r}: must be an integer >= 1")


def blob_cells(
    n: int,
    seed: int,
    *,
    start: int = 0,
    size: int = DEFAULT_SIZE,
    eps_in: float | None = None,
    eps_out: float | None = None,
    supersample: int = 1,
) -> np.ndarray:
    """One smooth random blob centred in the cell, two-tone ε (Dangovski et al. 2022; Loh et al. 2022).

    The blob is {(ρ, θ) : ρ ≤ r(θ)} around the cell centre with
    r(θ) = r0 · (1 + Σ_k (a_k cos kθ + b_k sin kθ) · BLOB_AMPLITUDE / k), k in BLOB_HARMONICS,
    r0 ~ U(BLOB_R0_RANGE), a_k, b_k ~ N(0, 1), clipped to BLOB_R_CLIP. ε inside / outside are drawn
    from U(1, 20) unless ``eps_in`` / ``eps_out`` fix them. ``supersample`` > 1 anti-aliases the boundary
    (pixel value = area-weighted mix); the default 1 gives strictly two-tone maps.
    Returns a float32 numpy array (n, size, size).
    """
    _check_eps("eps_in", eps_in)
    _check_eps("eps_out", eps_out)
    _check_supersample(supersample)
    k = np.arange(BLOB_HARMONICS[0], BLOB_HARMONICS[1] + 1)

    def draw(rng: np.random.Generator) -> np.ndarray:
        r0 = rng.uniform(*BLOB_R0_RANGE)
        ab = rng.standard_normal(2 * k.size)
        e_in = _eps_or_random(eps_in, rng)
        e_out = _eps_or_random(eps_out, rng)
        return np.concatenate([[r0, e_in, e_out], ab])

    p = _draw("blob", seed, start, n, draw)
    if n == 0:
        return np.zeros((0, size, size), np.float32)
    r0, e_in, e_out, ab = p[:, 0], p[:, 1], p[:, 2], p[:, 3:]
    a, b = ab[:, : k.size], ab[:, k.size :]  # (n, K)
    x, y = pixel_grid(size, supersample)
    dx, dy = x - CELL_CENTRE, y - CELL_CENTRE
    rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx)  # (m, m)
    ktheta = k[:, None, None] * theta  # (K, m, m)
    weight = BLOB_AMPLITUDE / k  # (K,)
    wiggle = np.einsum("nk,kij->nij", a * weight, np.cos(ktheta)) + np.einsum(
        "nk,kij->nij", b * weight, np.sin(ktheta)
    )  # (n, m, m)
    radius = np.clip(r0[:, None, None] * (1.0 + wiggle), *BLOB_R_CLIP)
    inside = _block_mean(rho[None] <= radius, size, supersample)
    return _two_tone(inside, e_in, e_out)


def symmetrize(f: np.ndarray, symmetry: str) -> np.ndarray:
    """Average (N, m, m) maps over a plane group's point operations about the cell centre (exact array ops).

    p1: unchanged; pm: the mirror x -> 1 - x (``flip`` of the last axis); p4m: the 8 operations of C4v,
    generated by the mirrors x -> 1 - x, y -> 1 - y and the diagonal x <-> y. Each step adds a map to its
    mirror image, a commutative sum of two floats, so the result is symmetric *bit for bit* (a plain mean
    over the 8 images would round differently per pixel and break ties at the threshold).
    """
    if symmetry == "p1":
        return f
    mirror_x = f + np.flip(f, axis=-1)
    if symmetry == "pm":
        return 0.5 * mirror_x
    if symmetry == "p4m":
        mirror_xy = mirror_x + np.flip(mirror_x, axis=-2)
        return 0.125 * (mirror_xy + np.swapaxes(mirror_xy, -1, -2))
    raise UserError(f"unit cell option symmetry={symmetry!r}: expected one of {', '.join(SYMMETRIES)}")


def c4v_images(f: np.ndarray) -> np.ndarray:
    """The 8 images of (..., m, m) maps under C4v about the cell centre -> (8, ..., m, m).

    Order: rotations by 0, 90, 180, 270 degrees, then the same four after a mirror x -> 1 - x.
    """
    rots = [np.rot90(f, k, axes=(-2, -1)) for k in range(4)]
    mirrored = np.flip(f, axis=-1)
    rots += [np.rot90(mirrored, k, axes=(-2, -1)) for k in range(4)]
    return np.stack(rots)


def levelset_cells(
    n: int,
    seed: int,
    *,
    start: int = 0,
    size: int = DEFAULT_SIZE,
    symmetry: str = DEFAULT_SYMMETRY,
    fill: float | None = None,
    eps_in: float | None = None,
    eps_out: float | None = None,
) -> np.ndarray:
    """Threshold of a random Fourier sum over |n_i| ≤ 1 with a plane-group symmetry (Loh et al. 2022).

    f(r) = Σ_G a_G cos(2π G·r) + b_G sin(2π G·r) over the non-zero half of the 3×3 set (``LEVELSET_G``),
    a_G, b_G ~ N(0, 1), sampled at the pixel centres and averaged over the point operations of
    ``symmetry`` (p1 / pm / p4m; the 3×3 set is closed under C4v, so the result is again such a Fourier sum,
    now symmetric). Pixels with f above the (1 − fill) quantile get ε_in, the rest ε_out, with
    fill ~ U(0.01, 0.99) and ε_in, ε_out ~ U(1, 20) unless fixed by the options. The achieved fill fraction
    equals ``fill`` up to rounding to whole pixels and ties within one symmetry orbit (≤ 8 pixels).
    Returns a float32 numpy array (n, size, size).
    """
    if symmetry not in SYMMETRIES:
        raise UserError(f"unit cell option symmetry={symmetry!r}: expected one of {', '.join(SYMMETRIES)}")
    if fill is not None and not FILL_MIN <= fill <= FILL_MAX:
        raise UserError(f"unit cell option fill={fill!r}: must lie in [{FILL_MIN}, {FILL_MAX}]")
    _check_eps("eps_in", eps_in)
    _check_eps("eps_out", eps_out)
    n_g = len(LEVELSET_G)

    def draw(rng: np.random.Generator) -> np.ndarray:
        ab = rng.standard_normal(2 * n_g)
        ff = rng.uniform(FILL_MIN, FILL_MAX) if fill is None else fill
        e_in = _eps_or_random(eps_in, rng)
        e_out = _eps_or_random(eps_out, rng)
        return np.concatenate([[ff, e_in, e_out], ab])

    p = _draw("levelset", seed, start, n, draw)
    if n == 0:
        return np.zeros((0, size, size), np.float32)
    ff, e_in, e_out, a, b = p[:, 0], p[:, 1], p[:, 2], p[:, 3 : 3 + n_g], p[:, 3 + n_g :]
    x, y = pixel_grid(size)
    phase = 2.0 * np.pi * (LEVELSET_G[:, 0, None, None] * x + LEVELSET_G[:, 1, None, None] * y)  # (G, m, m)
    f = np.einsum("ng,gij->nij", a, np.cos(phase)) + np.einsum("ng,gij->nij", b, np.sin(phase))
    f = symmetrize(f, symmetry)
    # Threshold between the sorted values so that round(fill · size²) pixels (at least 1, at most all but
    # one) lie above it.
    n_pix = size * size
    flat = np.sort(f.reshape(n, n_pix), axis=1)
    n_in = np.clip(np.rint(ff * n_pix).astype(int), 1, n_pix - 1)
    threshold = flat[np.arange(n), n_pix - n_in]  # the smallest value that is inside
    inside = f >= threshold[:, None, None]
    return _two_tone(inside, e_in, e_out)


def cylinder_cells(
    n: int,
    seed: int,
    *,
    start: int = 0,
    size: int = DEFAULT_SIZE,
    radius: float | None = None,
    eps_in: float | None = None,
    eps_out: float | None = EPS_MIN,
    supersample: int = 1,
) -> np.ndarray:
    """One circular rod centred in the cell (Joannopoulos et al., "Photonic Crystals", ch. 5).

    ``radius`` in (0, 0.5] (random ~ U(0, 0.5] if None); rod permittivity ``eps_in`` (random ~ U(1, 20) if
    None), background ``eps_out`` (default 1, air; random if None). A pixel is inside when its centre is
    within the radius; ``supersample`` > 1 anti-aliases the rim (area-weighted mix of the two ε).
    Returns a float32 numpy array (n, size, size).
    """
    if radius is not None and not 0.0 < radius <= MAX_RADIUS:
        raise UserError(f"unit cell option radius={radius!r}: must lie in (0, {MAX_RADIUS}]")
    _check_eps("eps_in", eps_in)
    _check_eps("eps_out", eps_out)
    _check_supersample(supersample)

    def draw(rng: np.random.Generator) -> np.ndarray:
        # 1 - U[0, 1) lies in (0, 1]: the radius is never 0 and can reach MAX_RADIUS.
        r = MAX_RADIUS * (1.0 - rng.random()) if radius is None else radius
        return np.array([r, _eps_or_random(eps_in, rng), _eps_or_random(eps_out, rng)])

    p = _draw("cylinder", seed, start, n, draw)
    if n == 0:
        return np.zeros((0, size, size), np.float32)
    x, y = pixel_grid(size, supersample)
    rho = np.hypot(x - CELL_CENTRE, y - CELL_CENTRE)
    inside = _block_mean(rho[None] <= p[:, 0, None, None], size, supersample)
    return _two_tone(inside, p[:, 1], p[:, 2])


GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "blob": blob_cells,
    "levelset": levelset_cells,
    "cylinder": cylinder_cells,
}


def generate_cells(
    kind: str, n: int, seed: int, size: int = DEFAULT_SIZE, *, start: int = 0, **options
) -> np.ndarray:
    """Permittivity maps of structures ``start .. start + n - 1`` of a seeded dataset.

    Args:
        kind: "blob", "levelset" or "cylinder" (see the module docstring for the sources).
        n: number of structures (≥ 0).
        seed: dataset seed (integer ≥ 0). Structure i depends only on (seed, i).
        size: pixels per side (default 32).
        start: global index of the first structure (for chunked / resumed generation).
        **options: generator-specific options, e.g. ``symmetry="p4m"`` for level sets, ``radius=0.2,
            eps_in=8.9`` for cylinders (see :func:`blob_cells`, :func:`levelset_cells`,
            :func:`cylinder_cells`, :func:`generator_options`).

    Returns:
        numpy float32 array (n, size, size) of relative permittivities.

    Raises:
        UserError: unknown kind, unknown option or an option value out of range.
    """
    if kind not in GENERATORS:
        raise UserError(f"unit cell kind {kind!r}: expected one of {', '.join(KINDS)}")
    for name, value, low in (("n", n, 0), ("seed", seed, 0), ("start", start, 0), ("size", size, 2)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise UserError(f"unit cells: {name}={value!r} must be an integer >= {low}")
    gen = GENERATORS[kind]
    allowed = generator_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"unit cell kind {kind!r}: unknown option {unknown[0]!r} (known: {', '.join(sorted(allowed))})"
        )
    return gen(int(n), int(seed), start=int(start), size=int(size), **options)


def generator_options(kind: str) -> dict[str, object]:
    """The options of one generator with their defaults (what ``generate_cells(kind, ...)`` accepts)."""
    if kind not in GENERATORS:
        raise UserError(f"unit cell kind {kind!r}: expected one of {', '.join(KINDS)}")
    params = inspect.signature(GENERATORS[kind]).parameters.values()
    fixed = {"n", "seed", "start", "size"}
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in fixed}


def parse_cell_options(items: list[str] | None, what: str = "--option") -> dict[str, object]:
    """Command-line generator options ``KEY=VALUE`` -> {key: value}: integers and decimals become numbers,
    ``none`` becomes None (a random value where the generator allows it, e.g. ``eps_out=none``), anything else
    stays a string (``symmetry=p4m``). The generator checks names and values (:func:`generate_cells`)."""
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"{what} {item!r}: expected KEY=VALUE, e.g. {what} symmetry=p4m")
        if key in out:
            raise UserError(f"{what} {key}: given twice")
        text = text.strip()
        value: object = text
        if text.lower() == "none":
            value = None
        else:
            for convert in (int, float):
                try:
                    value = convert(text)
                    break
                except ValueError:
                    continue
        out[key] = value
    return out
