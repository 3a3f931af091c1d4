"""One cell's band diagram along Γ–X–M–Γ and its DOS, as a figure (``essl phc bands``).

The cell comes from a data set (``FILE.h5``, structure ``index``) or from a generator (``kind``, ``seed``,
``index``: the structure a data set of that kind and seed would hold at that index). The bands are solved along
the straight path Γ–X–M–Γ (:func:`essl.photonics.pwe.kpath`) with the file's label settings (polarization,
number of bands, cutoff; the defaults of :func:`essl.photonics.dos.label_settings` otherwise), the DOS is the
file's stored label or, for an unlabelled file or a generated cell, computed with those settings
(:func:`essl.photonics.dos.compute_labels`). The figure, as in ``photonics/regression.ipynb``: the permittivity
map, the bands, and the DOS on the same frequency axis (ωa/2πc: the label's rescaled DOS, ω' = ω√ε̄, mapped back
with its Jacobian, DOS_ω(ω) = √ε̄ · DOS'(ω√ε̄)) beside the DOS of the homogeneous medium of ε̄, 2πε̄ω.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from essl.errors import UserError
from essl.photonics import dos, pwe
from essl.photonics.unitcell import KINDS, generate_cells

DEFAULT_POINTS = 24
"""k-points per segment of the path (as the notebook's band diagram)."""
FIGURE_SIZE = (13.0, 4.2)
"""Inches: the map, the bands (wider) and the DOS side by side."""
PANEL_WIDTHS = (1.0, 2.2, 1.0)
FIGURE_DPI = 120
FREQ_MARGIN = 1.05
"""The frequency axis reaches this factor above the highest band."""
GAP_MIN_RATIO = 1e-3
"""Gaps along the path narrower than this fraction of their mid-frequency are not reported (touching bands)."""


def _label_settings(attrs: dict[str, Any]) -> dict[str, Any]:
    """The label settings stored in a data set's attributes, or the defaults for an unlabelled one."""
    try:
        stored = json.loads(attrs.get("label_settings") or "null")
    except (TypeError, ValueError):
        stored = None
    return stored if isinstance(stored, dict) else dos.label_settings()


def load_cell(
    path: str | os.PathLike | None = None,
    index: int = 0,
    kind: str | None = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The cell to draw: from the data set ``path`` (structure ``index``) or from the generator ``kind``.

    Returns a dict with "eps" (n, n) float32, "name" (for titles and file names), "settings" (label settings),
    and "dos" (500,) from a labelled file (else None). Raises UserError for a missing file, an index out of range,
    both or neither of ``path`` and ``kind``.
    """
    from essl.photonics.dataset import open_dataset

    if (path is None) == (kind is None):
        raise UserError("phc bands: give either a data set FILE.h5 or --kind (a generated cell), not both")
    if isinstance(index, bool) or int(index) != index or index < 0:
        raise UserError(f"phc bands: --index {index!r} must be an integer >= 0")
    if kind is not None:
        if kind not in KINDS:
            raise UserError(f"phc bands: --kind {kind!r}: expected one of {', '.join(KINDS)}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise UserError(f"phc bands: --seed {seed!r} must be an integer >= 0")
        eps = generate_cells(kind, 1, seed, start=int(index), **(options or {}))[0]
        extra = "".join(f"-{k}{v}" for k, v in sorted((options or {}).items()))
        return {"eps": eps, "name": f"{kind}{extra}-seed{seed}-{index}", "settings": dos.label_settings(),
                "dos": None, "title": f"{kind} cell {index} of seed {seed}" + "".join(
                    f", {k} {v}" for k, v in sorted((options or {}).items()))}
    if options:
        raise UserError("phc bands: --option applies to a generated cell (--kind), not to a data set")
    data = open_dataset(path)
    if index >= len(data):
        raise UserError(f"phc bands: --index {index} is out of range: {data.path} holds {len(data)} structures "
                        f"(0..{len(data) - 1})")
    return {
        "eps": data.eps[index],
        "name": f"{data.path.stem}-{index}",
        "settings": _label_settings(data.attrs),
        "dos": None if data.dos is None else data.dos[index],
        "title": f"{data.path.name} #{index} ({data.attrs.get('kind', '?')})",
    }


def band_diagram(
    eps: np.ndarray,
    n_bands: int,
    polarization: str = "tm",
    cutoff: int = pwe.DEFAULT_CUTOFF,
    points: int = DEFAULT_POINTS,
) -> dict[str, Any]:
    """Bands of one cell along Γ–X–M–Γ: {"bands" (K, n_bands), "distance" (K,), "ticks" (indices of Γ, X, M,
    Γ)}, complex128 eigenproblems (a figure needs no speed)."""
    k, dist, ticks = pwe.kpath(points)
    bands = pwe.solve_bands(
        torch.from_numpy(np.asarray(eps, dtype=np.float32))[None], k, n_bands, polarization, cutoff,
        dtype=torch.complex128,
    )[0]
    return {"bands": bands.numpy(), "distance": dist.numpy(), "ticks": ticks}


def largest_gap(bands: np.ndarray) -> dict[str, float] | None:
    """The widest gap between consecutive bands along the path (band i's maximum below band i+1's minimum), as
    {"below": i (1-based), "bottom", "top", "ratio" (gap / mid-gap)}; None if the bands overlap everywhere."""
    best = None
    for i in range(bands.shape[1] - 1):
        bottom, top = float(bands[:, i].max()), float(bands[:, i + 1].min())
        if top <= bottom:
            continue
        ratio = (top - bottom) / ((top + bottom) / 2)
        if ratio >= GAP_MIN_RATIO and (best is None or ratio > best["ratio"]):
            best = {"below": i + 1, "bottom": bottom, "top": top, "ratio": ratio}
    return best


def cell_dos(cell: dict[str, Any], settings: dict[str, Any]) -> np.ndarray:
    """The cell's DOS (500,) in the label convention: the file's label, else computed with ``settings``."""
    if cell["dos"] is not None:
        return np.asarray(cell["dos"], dtype=np.float64)
    kwargs = {key: settings[key] for key in ("kgrid", "n_bands", "cutoff", "polarization") if key in settings}
    if "dos_method" in settings:
        kwargs.update(method=settings["dos_method"], sigma=settings.get("sigma"))
    out = dos.compute_labels(torch.from_numpy(np.asarray(cell["eps"], dtype=np.float32))[None], **kwargs)
    return out["dos"][0].double().numpy()


def figure_formats() -> dict[str, str]:
    """File suffixes matplotlib can write -> their description."""
    from matplotlib.figure import Figure

    return Figure().canvas.get_supported_filetypes()


def run_bands(
    path: str | os.PathLike | None = None,
    index: int = 0,
    *,
    kind: str | None = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    n_bands: int | None = None,
    polarization: str | None = None,
    cutoff: int | None = None,
    points: int | None = None,
) -> dict[str, Any]:
    """Draw one cell's band diagram and DOS (module docstring) into ``out`` (default ``<name>-bands.png`` in the
    current folder; the format follows the suffix). Settings not given come from the file's label settings.

    Returns a dict with "out", "name", "bands", "distance", "ticks", "dos" (label convention), "omega" (its
    rescaled frequency grid), "eps_avg", "gap" (:func:`largest_gap`), "settings" (those used).
    """
    from essl.io import atomic_write, check_output_file

    cell = load_cell(path, index, kind, seed, options)
    settings = dict(cell["settings"])
    points = DEFAULT_POINTS if points is None else points
    for key, value, low in (("n_bands", n_bands, 1), ("cutoff", cutoff, 1), ("points", points, 1)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < low):
            raise UserError(f"phc bands: --{key.replace('_', '-')} {value!r} must be an integer >= {low}")
    if polarization is not None and polarization.lower() not in pwe.POLARIZATIONS:
        raise UserError(f"phc bands: --polarization {polarization!r}: expected one of {', '.join(pwe.POLARIZATIONS)}")
    overrides = {"n_bands": n_bands, "cutoff": cutoff, "polarization": polarization and polarization.lower()}
    changed = {k: v for k, v in overrides.items() if v is not None and v != settings.get(k)}
    if changed and cell["dos"] is not None:
        cell["dos"] = None  # the stored DOS belongs to the file's settings: recompute with the ones asked for
    settings.update(changed)
    n_pw = pwe.n_plane_waves(settings["cutoff"])
    if settings["n_bands"] > n_pw:
        raise UserError(f"phc bands: --n-bands {settings['n_bands']} exceeds the {n_pw} plane waves of cutoff "
                        f"{settings['cutoff']}")
    out = Path(out) if out is not None else Path(f"{cell['name']}-bands.png")
    out = check_output_file(out, "phc bands: --out")
    suffix = out.suffix.lstrip(".").lower()
    formats = figure_formats()
    if suffix not in formats:
        raise UserError(f"phc bands: --out {out}: unknown figure format {suffix!r} (use one of {', '.join(formats)})")

    diagram = band_diagram(cell["eps"], settings["n_bands"], settings["polarization"], settings["cutoff"], points)
    density = cell_dos(cell, settings)
    eps_avg = float(np.asarray(cell["eps"], dtype=np.float64).mean())
    result = {
        "out": out,
        "name": cell["name"],
        "title": cell["title"],
        **diagram,
        "dos": density,
        "omega": dos.frequency_grid().numpy(),
        "eps_avg": eps_avg,
        "gap": largest_gap(diagram["bands"]),
        "settings": settings,
        "eps": cell["eps"],
        "dos_from_file": cell["dos"] is not None,
    }
    fig = _figure(result)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=suffix, dpi=FIGURE_DPI))
    return result


def _figure(r: dict[str, Any]):
    from matplotlib.figure import Figure

    s = r["settings"]
    fig = Figure(figsize=FIGURE_SIZE, layout="constrained")
    ax_eps, ax_bands, ax_dos = fig.subplots(1, 3, width_ratios=PANEL_WIDTHS)
    im = ax_eps.imshow(r["eps"], cmap="viridis", origin="lower")
    ax_eps.set_title(f"ε (ε̄ = {r['eps_avg']:.2f})")
    ax_eps.set_xticks([])
    ax_eps.set_yticks([])
    fig.colorbar(im, ax=ax_eps, fraction=0.046)
    dist, bands, ticks = r["distance"], r["bands"], r["ticks"]
    ax_bands.plot(dist, bands, color="C0")
    ax_bands.set_xticks(dist[ticks], ["Γ", "X", "M", "Γ"])
    ax_bands.set_xlim(0, float(dist[-1]))
    for t in ticks:
        ax_bands.axvline(float(dist[t]), color="0.8", lw=0.8)
    top = FREQ_MARGIN * float(bands.max())
    gap = r["gap"]
    if gap is not None:
        ax_bands.axhspan(gap["bottom"], gap["top"], color="C1", alpha=0.2,
                         label=f"gap {gap['below']}–{gap['below'] + 1} along the path ({100 * gap['ratio']:.1f}%)")
        ax_bands.legend(loc="best")
    ax_bands.set_ylim(0, top)
    ax_bands.set_ylabel("ωa/2πc")
    ax_bands.set_title(f"{r['title']}: {s['polarization'].upper()} bands, |G| ≤ {s['cutoff']}")
    # the label's DOS is a density in ω' = ω√ε̄: back to ω with the Jacobian √ε̄
    root = math.sqrt(r["eps_avg"])
    omega = r["omega"] / root
    ax_dos.plot(r["dos"] * root, omega, color="k", label="DOS" + (" (file's label)" if r["dos_from_file"] else ""))
    ax_dos.plot(2 * math.pi * r["eps_avg"] * omega, omega, color="0.5", ls="--", label="homogeneous ε̄")
    ax_dos.axhspan(float(omega[dos.METRIC_START]), float(omega[dos.N_TARGET - 1]), color="0.92", zorder=0,
                   label="scored range")
    ax_dos.set_ylim(0, top)
    ax_dos.set_xlim(left=0)
    ax_dos.set_xlabel("states per unit cell per unit ω")
    ax_dos.set_title(f"DOS ({s.get('kgrid', '?')}² k-grid)")
    ax_dos.legend(loc="lower right", fontsize="small")
    return fig


def summary(r: dict[str, Any]) -> str:
    """One line describing what :func:`run_bands` drew."""
    s = r["settings"]
    gap = r["gap"]
    gap_text = (
        f"largest gap along Γ–X–M–Γ: bands {gap['below']}–{gap['below'] + 1}, {gap['bottom']:.4f}–{gap['top']:.4f} "
        f"({100 * gap['ratio']:.1f}% of mid-gap)" if gap else "no gap along Γ–X–M–Γ"
    )
    source = "the file's DOS label" if r["dos_from_file"] else "DOS computed"
    return (f"{r['title']}: {s['n_bands']} {s['polarization'].upper()} bands, |G| ≤ {s['cutoff']}, ε̄ = "
            f"{r['eps_avg']:.3f}; {gap_text}; {source}")
