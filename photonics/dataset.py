"""HDF5 photonic-crystal datasets: resumable, crash-safe generation and a validating reader.

The labelled data of the photonics benchmark (Dangovski et al., "Equivariant Contrastive Learning", ICLR 2022;
Loh et al., "Surrogate- and invariance-boosted contrastive learning for data-scarce applications in science",
Nature Communications 2022) cannot be downloaded here, so essl computes it: unit cells from
:mod:`essl.photonics.unitcell`, DOS labels from :func:`essl.photonics.dos.compute_labels`.

File layout (one HDF5 file, N structures of n×n pixels, all float32)::

    eps       (N, n, n)        relative permittivity maps (physical values, ε ≥ 1)
    eps_avg   (N,)             mean permittivity of each cell
    bands     (N, K, n_bands)  band frequencies ωa/2πc on the solver's K k-points      [labelled files only]
    dos       (N, 500)         DOS on 500 points in [0, 1.2] (benchmark convention)  [labelled files only]
    target    (N, 400)         first 400 DOS points minus the empty-lattice line     [labelled files only]

    attributes: format ("essl.phc/1"), essl_version, kind, n, seed, size, cell_options (JSON), labels (bool),
                label_settings (JSON of essl.photonics.dos.label_settings, "null" when unlabelled),
                completed (number of structures written; equals n in a finished file)

Crash safety. Generation writes ``FILE.h5.partial``, with every dataset allocated up front (NaN-filled,
contiguous, no timestamps), so committing a chunk only overwrites raw data in place and then the
``completed`` attribute (same size, modified in place) after the data is flushed. The partial file is
renamed to ``FILE.h5`` (atomic ``os.replace``) only once complete, so ``FILE.h5`` is never half written.
Running the same command again re-opens the partial file and continues from ``completed``; structure i
depends only on (seed, i), so the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import essl
from essl.errors import UserError
from essl.photonics.unitcell import DEFAULT_SIZE, KINDS, generate_cells, generator_options

FORMAT = "essl.phc/1"
"""Value of the ``format`` attribute; bump when the layout changes."""

DOS_POINTS = 500
TARGET_POINTS = 400
"""Benchmark label convention (docs/design.md): DOS on 500 points in [0, 1.2], the first 400 used as target."""

EPS_FLOOR = 1.0
EPS_FLOOR_TOLERANCE = 1e-6
"""Permittivity maps hold physical values ε ≥ 1; smaller values mean a normalised map was stored."""

DEFAULT_CHUNK_UNLABELLED = 4096
DEFAULT_CHUNK_LABELLED = 32
"""Structures per committed chunk. Labelled chunks are small so that an interruption loses little work."""

SETTING_KEYS = ("kind", "n", "seed", "size", "cell_options", "labels", "label_settings")
"""Attributes that must match for a file to be resumed or accepted as already complete."""

JSON_KEYS = ("cell_options", "label_settings")
PROVENANCE_KEYS = ("eigensolver", "kpoint_symmetry", "band_solver")
"""label_settings entries recorded for provenance but not compared on resume: how the bands were solved changes the
labels only at the ~1e-5 relative level (tests/photonics), so a file made by an older solver stays resumable and
complete. A resumed file keeps the provenance of its first run."""
LABEL_KEYS = ("bands", "dos", "target")


def _solver() -> tuple[Callable[..., dict], Callable[..., dict]]:
    """(compute_labels, label_settings) of the band solver; imported lazily (unlabelled runs skip it)."""
    from essl.photonics import dos

    return dos.compute_labels, dos.label_settings


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _settings(
    kind: str,
    n: int,
    seed: int,
    size: int,
    cell_options: dict[str, Any],
    labels: bool,
    label_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The settings stored as attributes and compared on resume (JSON-able, canonical)."""
    options = dict(generator_options(kind))
    unknown = sorted(set(cell_options) - set(options))
    if unknown:
        raise UserError(f"phc generate: unknown {kind} option {unknown[0]!r} (known: {', '.join(options)})")
    options.update(cell_options)
    try:
        options_json = _json(options)
    except TypeError as exc:
        raise UserError(f"phc generate: cell options {cell_options} are not plain values ({exc})") from None
    label_settings = None
    if labels:
        try:
            label_settings = _solver()[1](**label_kwargs)
        except (TypeError, ValueError) as exc:  # an unknown or bad solver option
            raise UserError(f"phc generate: bad solver settings {label_kwargs}: {exc}") from None
    elif label_kwargs:
        raise UserError(f"phc generate: solver option {sorted(label_kwargs)[0]!r} given without labels")
    return {
        "kind": kind,
        "n": int(n),
        "seed": int(seed),
        "size": int(size),
        "cell_options": options_json,
        "labels": bool(labels),
        "label_settings": _json(label_settings),
    }


def _stored_settings(f: h5py.File) -> dict[str, Any]:
    out = {}
    for key in SETTING_KEYS:
        value = f.attrs.get(key)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _first_difference(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Name the first setting (for JSON settings: the first inner key) in which a file differs."""
    for key in SETTING_KEYS:
        old, new = stored[key], wanted[key]
        if old == new:
            continue
        if key in JSON_KEYS:
            try:
                old_d, new_d = json.loads(old), json.loads(new)
            except (TypeError, ValueError):
                old_d = new_d = None
            if isinstance(old_d, dict) and isinstance(new_d, dict):
                if key == "label_settings":
                    old_d, new_d = ({k: v for k, v in d.items() if k not in PROVENANCE_KEYS} for d in (old_d, new_d))
                    if old_d == new_d:
                        continue
                for inner in sorted(set(old_d) | set(new_d)):
                    if old_d.get(inner, "<unset>") != new_d.get(inner, "<unset>"):
                        old_v, new_v = old_d.get(inner, "<unset>"), new_d.get(inner, "<unset>")
                        return f"{path}: made with {key}.{inner}={old_v!r}, not {new_v!r}"
        return f"{path}: made with {key}={old!r}, not {new!r}"
    return None


def _dcpl(fill: float) -> h5py.h5p.PropDCID:
    """Contiguous layout, storage allocated (and filled) at creation: later writes touch no metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_value(np.array(fill, dtype=np.float32))
    return dcpl


def _create_dataset(f: h5py.File, name: str, shape: tuple[int, ...]) -> h5py.Dataset:
    return f.create_dataset(name, shape=shape, dtype=np.float32, dcpl=_dcpl(np.nan), track_times=False)


def _create_partial(partial: Path, settings: dict[str, Any]) -> None:
    n, size = settings["n"], settings["size"]
    tmp = partial.with_name(partial.name + ".new")
    with h5py.File(tmp, "w", track_order=True) as f:
        f.attrs["format"] = FORMAT
        f.attrs["essl_version"] = essl.__version__
        for key, value in settings.items():
            f.attrs[key] = value
        f.attrs["completed"] = np.int64(0)
        _create_dataset(f, "eps", (n, size, size))
        _create_dataset(f, "eps_avg", (n,))
        # bands' shape (K, n_bands) is known only from the solver's first answer: created then.
        if settings["labels"]:
            _create_dataset(f, "dos", (n, DOS_POINTS))
            _create_dataset(f, "target", (n, TARGET_POINTS))
    os.replace(tmp, partial)


def _open_partial(partial: Path, settings: dict[str, Any]) -> int:
    """Check a partial file left by an interrupted run; return its completed count (-1: start over)."""
    try:
        with h5py.File(partial, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise OSError("not an essl photonic-crystal file")
            stored = _stored_settings(f)
            version = f.attrs.get("essl_version")
            completed = int(f.attrs["completed"])
    except (OSError, KeyError) as exc:
        print(f"{partial}: unreadable partial file ({exc}); starting over", file=sys.stderr)
        return -1
    problem = _first_difference(partial, stored, settings)
    if problem is None and version != essl.__version__:
        problem = f"{partial}: made with essl_version={version!r}, not {essl.__version__!r}"
    if problem:
        raise UserError(f"{problem}; will not append to it (delete it to start over)")
    return completed


def _commit(partial: Path, start: int, cells: np.ndarray, eps_avg: np.ndarray, labels: dict | None) -> None:
    """Write one chunk's rows [start, start + len(cells)), flush, then advance ``completed``."""
    stop = start + len(cells)
    with h5py.File(partial, "r+") as f:
        f["eps"][start:stop] = cells
        f["eps_avg"][start:stop] = eps_avg
        if labels is not None:
            if "bands" not in f:
                _create_dataset(f, "bands", (f.attrs["n"],) + labels["bands"].shape[1:])
            for key in LABEL_KEYS:
                f[key][start:stop] = labels[key]
        f.flush()  # the data is on disk before the count says so
        f.attrs.modify("completed", np.int64(stop))


def _labels_for(
    cells: np.ndarray, start: int, device: str, label_kwargs: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Run the solver on one chunk; check its answer against the contract -> float32 numpy arrays."""
    import torch

    eps = torch.from_numpy(cells).to(device)
    out = _solver()[0](eps, **label_kwargs)
    n = len(cells)
    expected = {"bands": 3, "dos": (n, DOS_POINTS), "target": (n, TARGET_POINTS), "eps_avg": (n,)}
    result = {}
    for key, shape in expected.items():
        value = out[key].detach().cpu().numpy().astype(np.float32, copy=False)
        ok = (value.ndim == 3 and value.shape[0] == n) if key == "bands" else value.shape == shape
        if not ok:
            raise RuntimeError(f"compute_labels returned {key} of shape {value.shape} for {n} structures")
        if not np.isfinite(value).all():
            last = start + n - 1
            raise RuntimeError(f"compute_labels returned non-finite {key} for structures {start}..{last}")
        result[key] = value
    return result


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"phc generate: --device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"phc generate: --device {device!r}: CUDA is not available on this machine")


def generate(
    out: str | os.PathLike,
    kind: str,
    n: int,
    *,
    labels: bool = False,
    seed: int = 0,
    kgrid: int | None = None,
    device: str = "cpu",
    chunk: int | None = None,
    progress: bool = True,
    size: int = DEFAULT_SIZE,
    cell_options: Mapping[str, Any] | None = None,
    _chunk_callback: Callable[[int], None] | None = None,
    **label_kwargs: Any,
) -> Path:
    """Generate ``n`` unit cells of ``kind`` (and with ``labels`` their bands/DOS) into the HDF5 file ``out``.

    Args:
        out: the HDF5 file to write (work in progress goes to ``out + ".partial"``).
        kind: "blob", "levelset" or "cylinder" (:mod:`essl.photonics.unitcell`).
        n: number of structures.
        labels: also run the band solver (:func:`essl.photonics.dos.compute_labels`) for bands, DOS, target.
        seed: dataset seed; structure i depends only on (seed, i).
        kgrid: k-grid points per axis for the DOS (None: the solver's default).
        device: torch device for the solver ("cpu", "cuda", ...).
        chunk: structures per committed chunk (default 4096 unlabelled, 32 labelled).
        progress: show a tqdm bar with structures/s (stderr).
        size: pixels per side of the maps (default 32).
        cell_options: generator options, e.g. ``{"symmetry": "p4m"}`` (:func:`unitcell.generator_options`).
        _chunk_callback: private test hook, called with the completed count after each committed chunk.
        **label_kwargs: further solver options passed to ``compute_labels`` / ``label_settings``
            (n_bands, cutoff, polarization, method, memory_budget).

    Returns:
        The path of the complete file.

    Raises:
        UserError: bad arguments, ``out`` (or its partial file) made with other settings, or ``out`` is not
            an essl photonic-crystal file.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if kind not in KINDS:
        raise UserError(f"phc generate: --kind {kind!r}: expected one of {', '.join(KINDS)}")
    for name, value, low in (("n", n, 1), ("seed", seed, 0), ("chunk", chunk, 1), ("kgrid", kgrid, 1)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < low):
            raise UserError(f"phc generate: {name}={value!r} must be an integer >= {low}")
    if kgrid is not None:
        if not labels:
            raise UserError("phc generate: --kgrid needs --labels (it is a solver setting)")
        label_kwargs["kgrid"] = int(kgrid)
    if labels:
        _check_device(device)
    settings = _settings(kind, n, seed, size, dict(cell_options or {}), labels, label_kwargs)
    options = json.loads(settings["cell_options"])
    generate_cells(kind, 0, seed, size, **options)  # validates size and option values before any file exists
    chunk = int(chunk or (DEFAULT_CHUNK_LABELLED if labels else DEFAULT_CHUNK_UNLABELLED))

    if out.exists():
        try:
            with h5py.File(out, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise OSError("no essl format attribute")
                stored, completed = _stored_settings(f), int(f.attrs.get("completed", -1))
        except OSError:
            raise UserError(
                f"{out}: exists and is not an essl photonic-crystal dataset; will not overwrite"
            ) from None
        problem = _first_difference(out, stored, settings)
        if problem:
            raise UserError(f"{problem}; will not append to it (choose another --out or delete it)")
        if completed == settings["n"]:
            print(f"{out}: already complete ({completed} structures, same settings); nothing to do")
            return out
        raise UserError(f"{out}: incomplete ({completed} of {n} structures) but not a .partial file")

    completed = _open_partial(partial, settings) if partial.exists() else -1
    if completed < 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        _create_partial(partial, settings)
        completed = 0
    elif completed > 0:
        print(f"{partial}: resuming at structure {completed} of {n}")

    from tqdm import tqdm

    start_time = time.perf_counter()
    done_before = completed
    with tqdm(
        total=n, initial=completed, unit=" structures", desc=out.name, disable=not progress, smoothing=0.1
    ) as bar:
        while completed < n:
            count = min(chunk, n - completed)
            cells = generate_cells(kind, count, seed, size, start=completed, **options)
            if labels:
                lab = _labels_for(cells, completed, device, label_kwargs)
                eps_avg = lab.pop("eps_avg")
            else:
                lab, eps_avg = None, cells.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
            _commit(partial, completed, cells, eps_avg, lab)
            completed += count
            bar.update(count)
            if _chunk_callback is not None:
                _chunk_callback(completed)

    open_dataset(partial, require_labels=labels)  # full validation before the file gets its final name
    os.replace(partial, out)
    elapsed = time.perf_counter() - start_time
    rate = (n - done_before) / elapsed if elapsed > 0 else float("inf")
    if progress:
        print(f"{out}: {n} {kind} structures{' with labels' if labels else ''} ({rate:.1f} structures/s)")
    return out


@dataclass
class PhCData:
    """A photonic-crystal dataset loaded into memory (see the module docstring for the layout)."""

    path: Path
    eps: np.ndarray  # (N, n, n) float32
    eps_avg: np.ndarray  # (N,) float32
    bands: np.ndarray | None = None  # (N, K, n_bands)
    dos: np.ndarray | None = None  # (N, 500)
    target: np.ndarray | None = None  # (N, 400)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def has_labels(self) -> bool:
        return self.target is not None

    def __len__(self) -> int:
        return len(self.eps)


def open_dataset(path: str | os.PathLike, require_labels: bool = False) -> PhCData:
    """Load and validate a photonic-crystal HDF5 file.

    Checks: the file exists and is HDF5; ``eps`` (N, n, n) with ε ≥ 1 and ``eps_avg`` (N,) are present;
    label datasets, if any (or if ``require_labels``), are all present with shapes (N, K, n_bands),
    (N, 500), (N, 400); no NaN/inf anywhere; the ``completed`` count (if stored) equals N.

    Raises:
        UserError: one line naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path}: not an HDF5 file")
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
        data = {key: _read(f, path, key) for key in ("eps", "eps_avg") + LABEL_KEYS if key in f}
    for key in ("eps", "eps_avg"):
        if key not in data:
            raise UserError(f"{path}: missing dataset {key!r}")
    eps = data["eps"]
    if eps.ndim != 3 or eps.shape[1] != eps.shape[2] or eps.shape[0] == 0:
        raise UserError(f"{path}: dataset 'eps' has shape {eps.shape}, expected (N, n, n) with N >= 1")
    n = eps.shape[0]
    present = [key for key in LABEL_KEYS if key in data]
    if require_labels or present:
        for key in LABEL_KEYS:
            if key not in data:
                hint = "; generate it with --labels" if not present else ""
                raise UserError(f"{path}: missing dataset {key!r}{hint}")
    expected = {"eps_avg": (n,), "dos": (n, DOS_POINTS), "target": (n, TARGET_POINTS)}
    for key, shape in expected.items():
        if key in data and data[key].shape != shape:
            raise UserError(f"{path}: dataset {key!r} has shape {data[key].shape}, expected {shape}")
    if "bands" in data and (data["bands"].ndim != 3 or data["bands"].shape[0] != n):
        shape = data["bands"].shape
        raise UserError(f"{path}: dataset 'bands' has shape {shape}, expected ({n}, K, n_bands)")
    for key, value in data.items():
        bad = ~np.isfinite(value.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise UserError(
                f"{path}: dataset {key!r} has NaN/inf in {int(bad.sum())} of {n} structures "
                f"(first: index {int(np.argmax(bad))})"
            )
    if eps.min() < EPS_FLOOR - EPS_FLOOR_TOLERANCE:
        raise UserError(
            f"{path}: dataset 'eps' has values below {EPS_FLOOR} (min {eps.min():.3g}); "
            "expected relative permittivities, not normalised maps"
        )
    completed = attrs.get("completed")
    if completed is not None and completed != n:
        raise UserError(f"{path}: incomplete file ({completed} of {n} structures written)")
    return PhCData(path=path, attrs=attrs, **data)


def _read(f: h5py.File, path: Path, key: str) -> np.ndarray:
    obj = f[key]
    if not isinstance(obj, h5py.Dataset) or obj.dtype.kind != "f":
        raise UserError(f"{path}: {key!r} is not a floating-point dataset")
    return obj[()].astype(np.float32, copy=False)
