"""MPB (MIT Photonic Bands) as an independent second band solver, run in a subprocess.

MPB (Johnson & Joannopoulos, "Block-iterative frequency-domain methods for Maxwell's equations in a planewave
basis", Opt. Express 8, 173 (2001); https://mpb.readthedocs.io) is the solver the photonic-crystal benchmark of
Loh et al. (Nat. Commun. 13, 4223 (2022)) was labelled with. Its Python interface (``from meep import mpb``, Debian
packages ``mpb`` and ``python3-meep``) lives in the system interpreter, not in essl's virtual environment, so
:func:`solve_bands_mpb` writes the maps and k-points to a temporary ``.npz`` file, runs :data:`MPB_PYTHON` on a
generated script (:data:`_SCRIPT`) and reads the bands back.

The cell. The pixel map is handed to MPB as a *staircase material function* (``default_material`` = a Python
function of the position), not as ``epsilon_input_file``: MPB interpolates an input file bilinearly, i.e. it would
solve a different, smoothed cell. The convention is essl's (:mod:`essl.photonics.unitcell`, :mod:`.pwe`): axis 1 of
a map is y, axis 2 is x, and pixel (row, col) is the square [col/n, (col+1)/n) × [row/n, (row+1)/n) in fractional
coordinates. MPB's lattice coordinates run over [−½, ½) about ``geometry_center`` = 0, so a point p of MPB is the
fractional point u = p + ½. MPB averages the function over ``mesh_size``³ sub-points per voxel (its subpixel
smoothing); at a point exactly on a pixel edge the pixel to the right / above is taken (a shift of the map by
:data:`_EDGE_NUDGE` of a pixel, which leaves the bands unchanged), so that rounding never decides.

Units. The lattice is the unit square (a = 1) and k-points are given in the reciprocal basis, which for the square
lattice is (k_x, k_y) in units of 2π/a, as in essl. MPB's frequencies are in units of c/a, i.e. ωa/2πc, essl's
unit; its group velocities (``compute_group_velocities``, Cartesian) are dω/dk in units of c, which is essl's
∂f/∂k with f = ωa/2πc and k in 2π/a. TM is MPB's ``run_tm`` (E out of the plane, essl's "tm"), TE its ``run_te``.

Two MPB pitfalls are handled here (both seen on 12 blob + 12 level-set cells at Γ, X, M, resolution 32): it
returns some k-points' bands out of ascending order (7 of the 72 (cell, k-point) pairs; they are sorted, and the
group velocities permuted with them), and its block eigensolver can converge the top requested bands to wrong,
higher eigenvalues (asked for exactly 10 bands, the 10th was off at M in 3 cells and bands 8–10 at Γ in one, by up
to 25%), so :data:`EXTRA_BANDS` more bands are computed than asked for and the lowest ones kept (with 12 bands, both
checked cases matched essl's converged reference to 2e-4).
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time

import numpy as np

MPB_PYTHON = os.environ.get("ESSL_MPB_PYTHON", "/usr/bin/python3")
"""Interpreter with MPB's Python interface (Debian's ``python3-meep``); ``ESSL_MPB_PYTHON`` overrides it."""

EXTRA_BANDS = 2
"""Bands computed beyond the ones returned (module docstring: MPB may miss the top band it is asked for)."""

DEFAULT_RESOLUTION = 32
"""MPB grid points per lattice constant (the benchmark's labels were made at 32, one point per pixel)."""

DEFAULT_MESH_SIZE = 3
"""MPB's default: sub-points per voxel and direction for averaging the material function."""

DEFAULT_TOLERANCE = 1e-7
"""MPB's default relative convergence tolerance of the eigensolver."""

_EDGE_NUDGE = 1e-9
"""Fraction of a pixel added before taking the floor of a position (module docstring)."""

_PROBE = """
import sys, types
try:
    import h5py  # noqa: F401
except ImportError:
    sys.modules["h5py"] = types.ModuleType("h5py")
import meep
from meep import mpb  # noqa: F401
print(meep.__version__)
"""

_SCRIPT = r"""
import os, sys, time, types
try:
    import h5py  # noqa: F401  (only MPB's file output needs it; nothing here writes files)
except ImportError:
    sys.modules["h5py"] = types.ModuleType("h5py")
import numpy as np
import meep as mp
from meep import mpb

mp.verbosity(0)
inp = np.load(sys.argv[1])
eps, kpts = inp["eps"], inp["kpoints"]
n_bands, res, mesh, tol = int(inp["n_bands"]), int(inp["resolution"]), int(inp["mesh_size"]), float(inp["tolerance"])
pol, want_v, nudge = str(inp["polarization"]), bool(inp["group_velocity"]), float(inp["nudge"])
n = eps.shape[-1]
k_points = [mp.Vector3(float(kx), float(ky)) for kx, ky in kpts]
freqs = np.zeros((len(eps), len(kpts), n_bands))
vg = np.zeros((len(eps), len(kpts), n_bands, 2))
seconds = np.zeros(len(eps))
for s, e in enumerate(eps):
    t0 = time.perf_counter()
    media = {}

    def material(p, e=e, media=media):
        # MPB point p in [-1/2, 1/2) -> fractional u = p + 1/2 -> pixel (row = y, col = x)
        col = int(np.floor((p.x + 0.5) * n + nudge)) % n
        row = int(np.floor((p.y + 0.5) * n + nudge)) % n
        v = e[row, col]
        m = media.get(v)
        if m is None:
            m = media[v] = mp.Medium(epsilon=float(v))
        return m

    velocities = []

    def band_function(ms):
        if want_v:
            velocities.append([(v.x, v.y) for v in ms.compute_group_velocities()])

    ms = mpb.ModeSolver(
        geometry_lattice=mp.Lattice(size=mp.Vector3(1, 1)),
        resolution=res,
        mesh_size=mesh,
        tolerance=tol,
        num_bands=n_bands,
        k_points=k_points,
        default_material=material,
        dimensions=2,
    )
    (ms.run_tm if pol == "tm" else ms.run_te)(band_function)
    freqs[s] = ms.all_freqs
    if want_v:
        vg[s] = np.asarray(velocities)
    seconds[s] = time.perf_counter() - t0
np.savez(sys.argv[2], freqs=freqs, vg=vg, seconds=seconds)
"""


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


@functools.lru_cache(maxsize=4)
def _probe(python: str) -> str | None:
    """None if ``python`` can import MPB's interface, else the reason it cannot (cached per interpreter)."""
    if not os.path.exists(python):
        return f"{python} not found (MPB's Python interface: Debian packages mpb and python3-meep)"
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, env=_env(1))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} could not be run: {exc}"
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no error output"])[-1]
        return f"`from meep import mpb` fails in {python}: {tail}"
    return None


def mpb_unavailable_reason(python: str = MPB_PYTHON) -> str | None:
    """Why MPB cannot run here (a sentence for skip messages), or None when it can."""
    return _probe(python)


def mpb_available(python: str = MPB_PYTHON) -> bool:
    """Whether :func:`solve_bands_mpb` can run: ``python`` exists and imports ``meep.mpb``."""
    return _probe(python) is None


def solve_bands_mpb(
    eps,
    kpoints,
    n_bands: int = 10,
    resolution: int = DEFAULT_RESOLUTION,
    polarization: str = "tm",
    group_velocity: bool = False,
    *,
    mesh_size: int = DEFAULT_MESH_SIZE,
    tolerance: float = DEFAULT_TOLERANCE,
    extra_bands: int = EXTRA_BANDS,
    threads: int = 1,
    python: str = MPB_PYTHON,
    timeout: float | None = None,
    info: dict | None = None,
):
    """Lowest ``n_bands`` bands of pixel maps from MPB (module docstring), in essl's conventions and units.

    Args:
        eps: (N, n, n) or (n, n) permittivity maps, numpy or torch (rows = y, columns = x, pixel (row, col) the
            square [col/n, (col+1)/n) × [row/n, (row+1)/n)).
        kpoints: (K, 2) Bloch vectors (k_x, k_y) in units of 2π/a.
        n_bands: bands returned per k-point (MPB computes ``n_bands + extra_bands``).
        resolution: MPB grid points per lattice constant.
        polarization: "tm" (E_z, ``run_tm``) or "te" (H_z, ``run_te``).
        group_velocity: also return MPB's group velocities (∂f/∂k, units of c).
        mesh_size, tolerance: MPB's averaging mesh and eigensolver tolerance.
        threads: OMP / OpenBLAS threads of the subprocess.
        python: interpreter with ``meep.mpb``.
        timeout: seconds before the subprocess is killed (None: no limit).
        info: if a dict, receives "wall_s" (the whole call, subprocess start included), "solve_s" (N,) (MPB's
            time per structure, measured inside the subprocess) and "reordered" (how many (structure, k-point)
            pairs MPB returned out of ascending order).

    Returns:
        freqs (N, K, n_bands) float64 in units of ωa/2πc, ascending per k-point, and with ``group_velocity`` also
        vgroup (N, K, n_bands, 2) (the velocities follow their bands through the sort). (K, n_bands) / (K,
        n_bands, 2) for a single (n, n) map.

    Raises:
        RuntimeError: MPB is not available (:func:`mpb_unavailable_reason`) or its run failed (with its stderr).
    """
    t_start = time.perf_counter()
    eps = np.asarray(eps.detach().cpu() if hasattr(eps, "detach") else eps, dtype=np.float64)
    kpoints = np.asarray(kpoints.detach().cpu() if hasattr(kpoints, "detach") else kpoints, dtype=np.float64)
    squeeze = eps.ndim == 2
    if squeeze:
        eps = eps[None]
    if eps.ndim != 3 or eps.shape[-1] != eps.shape[-2]:
        raise ValueError(f"eps must have shape (N, n, n), got {eps.shape}")
    if not np.isfinite(eps).all() or (eps <= 0).any():
        raise ValueError("eps must be finite and positive")
    if kpoints.ndim != 2 or kpoints.shape[1] != 2:
        raise ValueError(f"kpoints must have shape (K, 2), got {kpoints.shape}")
    polarization = polarization.lower()
    if polarization not in ("tm", "te"):
        raise ValueError(f"polarization={polarization!r}: expected 'tm' or 'te'")
    if n_bands < 1 or extra_bands < 0 or resolution < 1:
        raise ValueError(f"n_bands={n_bands}, extra_bands={extra_bands}, resolution={resolution}: out of range")
    reason = mpb_unavailable_reason(python)
    if reason is not None:
        raise RuntimeError(f"MPB is not available: {reason}")
    with tempfile.TemporaryDirectory(prefix="essl-mpb-") as tmp:
        src, inp, out = (os.path.join(tmp, f) for f in ("run_mpb.py", "input.npz", "output.npz"))
        with open(src, "w") as f:
            f.write(_SCRIPT)
        np.savez(
            inp,
            eps=eps,
            kpoints=kpoints,
            n_bands=n_bands + extra_bands,
            resolution=resolution,
            mesh_size=mesh_size,
            tolerance=tolerance,
            polarization=polarization,
            group_velocity=group_velocity,
            nudge=_EDGE_NUDGE,
        )
        run = subprocess.run(
            [python, src, inp, out], capture_output=True, text=True, timeout=timeout, env=_env(threads), cwd=tmp
        )
        if run.returncode != 0 or not os.path.exists(out):
            tail = "\n".join(run.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"MPB run failed (exit code {run.returncode}):\n{tail}")
        with np.load(out) as res:
            freqs, vg, seconds = res["freqs"], res["vg"], res["seconds"]
    order = np.argsort(freqs, axis=-1, kind="stable")  # MPB's bands are not always ascending
    reordered = int((np.diff(freqs, axis=-1) < 0).any(axis=-1).sum())
    freqs = np.take_along_axis(freqs, order, axis=-1)[..., :n_bands]
    vg = np.take_along_axis(vg, order[..., None], axis=-2)[..., :n_bands, :]
    if info is not None:
        info["wall_s"] = time.perf_counter() - t_start
        info["solve_s"] = seconds
        info["reordered"] = reordered
    if squeeze:
        freqs, vg = freqs[0], vg[0]
    return (freqs, vg) if group_velocity else freqs
