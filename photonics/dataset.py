"""HDF5 photonic-crystal datasets: resumable, crash-safe, shardable generation, merging, and a validating reader.

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
                completed (number of structures written; equals the rows in a finished file),
                shard ("" for a whole data set, "I/N" for shard I of N), devices (JSON list of the devices that
                computed the file, e.g. ["cpu"] or ["cuda (NVIDIA H100 80GB HBM3)"]: provenance, not compared);
                shard files also shard_start, shard_stop (the global indices of their rows); merged files
                merged_from (JSON, one record per shard: its index, structures and devices)

Crash safety. Generation writes ``FILE.h5.partial``. Its datasets are allocated at their final size when it is
created but never filled (HDF5's fill is off): the file is sparse, the file system gives it disk blocks only as
chunks are written, so it grows by chunks on disk while its layout never changes. Committing a chunk only writes
raw data in place and then the ``completed`` attribute (same size, modified in place) after the data is flushed;
no HDF5 metadata moves, so a kill at any point leaves a file that reopens with every committed chunk. The partial
file is renamed to ``FILE.h5`` (atomic ``os.replace``) only once complete and validated, so ``FILE.h5`` is never
half written. Running the same command again re-opens the partial file and continues from ``completed``;
structure i depends only on (seed, i), and chunks start at the same indices, so the result is identical to an
uninterrupted run (bit for bit on CPU).

Disk space and failures. Before anything is written, the space the finished file needs beyond what is already on
disk is compared with the free space of its file system (a UserError naming the path and both sizes). A full disk
mid-run is a UserError ("no space left on device") naming the file: the committed chunks stay, and the same
command resumes once there is room. A run that fails removes what it created and holds no committed structure
(its partial file, temporary files, folders it made); it never removes what an earlier run wrote.

Locking. A generation (or merge) holds :class:`essl.io.FileLock` on ``.FILE.h5.lock`` beside its output for its
whole life: a second process for the same output exits with a UserError naming the holder (host, pid).

Sharding. ``shard=(I, N)`` generates only shard I of N of the data set: a contiguous range of whole chunks of the
default size (:func:`shard_range`), into its own file (a valid data set of those rows, with the data set's global
settings). :func:`merge` checks that the shard files are the N shards of one data set and writes the whole file;
with the same chunk boundaries every structure is computed in the same batch as in one run, so on CPU the merged
file has the same arrays as one run, bit for bit, and the same attributes apart from the shard bookkeeping
(``merged_from``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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
"""Structures per committed chunk. Labelled chunks are small so that an interruption loses little work. These are
also the units of a shard (:func:`shard_range`), whatever the device."""
DEFAULT_CHUNK_LABELLED_CUDA = 256
"""Structures per chunk of a labelled run on a GPU: the batch the band solver works on (not measured on a GPU
here; README, "Photonic-crystal data")."""
SOLVER_DEVICES = ("cpu", "cuda")
"""Device types the band solver runs on (its subset eigensolver is LAPACK on CPU, torch.linalg on CUDA)."""

MIN_KGRID = 2
"""Smallest k-grid of the labels: one k-point (Γ alone, where the bands are degenerate and the group velocities
undefined) samples no dispersion, so its DOS would be meaningless."""

SETTING_KEYS = ("kind", "n", "seed", "size", "cell_options", "labels", "label_settings", "shard")
"""Attributes that must match for a file to be resumed or accepted as already complete ("shard" is "" for a whole
data set, also in files written before sharding existed)."""

JSON_KEYS = ("cell_options", "label_settings")
PROVENANCE_KEYS = ("eigensolver", "kpoint_symmetry", "band_solver")
"""label_settings entries recorded for provenance but not compared on resume: how the bands were solved changes the
labels only at the ~1e-5 relative level (tests/photonics), so a file made by an older solver stays resumable and
complete. A resumed file keeps the provenance of its first run."""
LABEL_KEYS = ("bands", "dos", "target")

DEVICES_ATTR_BYTES = 512
"""Fixed size of the ``devices`` attribute, so that a resumed run on another device updates it in place (no HDF5
metadata moves: the crash-safety argument of the module docstring)."""
METADATA_ALLOWANCE = 2**20
"""Bytes allowed for a file's HDF5 metadata (object headers, attributes; ~10 kB measured) in the space check."""
VALIDATE_BLOCK_BYTES = 64 * 2**20
"""Bytes read at a time when a finished or merged file is validated (it is never loaded whole)."""
LOCK_SUFFIX = ".lock"


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
    shard: str = "",
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
        "shard": shard,
    }


def _attr(f: h5py.File, key: str, default: Any = None) -> Any:
    value = f.attrs.get(key, default)
    if isinstance(value, bytes):
        value = value.decode()
    elif isinstance(value, np.generic):
        value = value.item()
    return value


def _stored_settings(f: h5py.File) -> dict[str, Any]:
    out = {key: _attr(f, key) for key in SETTING_KEYS}
    out["shard"] = out["shard"] or ""
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


# ----------------------------------------------------------------------------------------------- devices, shards


def _check_device(device: str, labels: bool):
    """The torch device of ``--device``, checked before any work (UserError naming the value)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"phc generate: --device {device!r}: unknown device (use cpu, cuda or cuda:N)") from None
    if not labels:
        if dev.type != "cpu":
            raise UserError(
                f"phc generate: --device {device} needs --labels: only the band solver runs on a device "
                "(unit cells are made on the CPU)"
            )
        return dev
    if dev.type not in SOLVER_DEVICES:
        raise UserError(f"phc generate: --device {device!r}: the band solver runs on {' or '.join(SOLVER_DEVICES)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"phc generate: --device {device!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(
                f"phc generate: --device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    return dev


def device_name(dev) -> str:
    """How a device is recorded in a file's ``devices`` attribute: "cpu", or "cuda (<GPU model>)" (no index, so
    that shards run on different GPUs of one model record the same device)."""
    if dev.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type


def _devices_attr(devices: Sequence[str]) -> np.ndarray:
    text = json.dumps(list(devices))
    while len(text.encode()) > DEVICES_ATTR_BYTES and len(devices) > 1:  # keep the first and the latest
        devices = [devices[0], *devices[2:]]
        text = json.dumps(list(devices))
    return np.array(text.encode()[:DEVICES_ATTR_BYTES], dtype=f"S{DEVICES_ATTR_BYTES}")


def _stored_devices(f: h5py.File) -> list[str]:
    try:
        value = json.loads(_attr(f, "devices", "[]") or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), shards numbered from 0 (as ranks and SLURM array indices); UserError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"phc generate: --shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    index, count = int(m[1]), int(m[2])
    if count < 1 or index >= count:
        raise UserError(f"phc generate: --shard {text}: expected I/N with 0 <= I < N (shards are numbered from 0)")
    return index, count


def shard_range(n: int, shard: tuple[int, int], unit: int) -> tuple[int, int]:
    """Structures [start, stop) of shard (I, N) of an n-structure data set: the n structures are cut into chunks
    of ``unit`` (the last one shorter), and shard I gets chunks ⌊I·C/N⌋ .. ⌊(I+1)·C/N⌋ − 1 of the C chunks, so
    every chunk lies in one shard and starts where one run's chunk starts. UserError if the shard gets none."""
    index, count = shard
    n_chunks = -(-n // unit)
    first, last = index * n_chunks // count, (index + 1) * n_chunks // count
    if first == last:
        raise UserError(
            f"phc generate: --shard {index}/{count}: no structures left for this shard ({n} structures make "
            f"{n_chunks} chunk(s) of {unit}); use at most {n_chunks} shards"
        )
    return first * unit, min(last * unit, n)


# ----------------------------------------------------------------------------------------------- files


def _dcpl() -> h5py.h5p.PropDCID:
    """Contiguous layout, storage allocated at creation but never filled (a sparse file; module docstring): later
    writes touch no metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _create_dataset(f: h5py.File, name: str, shape: tuple[int, ...]) -> h5py.Dataset:
    return f.create_dataset(name, shape=shape, dtype=np.float32, dcpl=_dcpl(), track_times=False)


def _bands_shape(settings: dict[str, Any]) -> tuple[int, int] | None:
    """(K, n_bands) of the ``bands`` dataset of labelled settings (None without labels)."""
    if not settings["labels"]:
        return None
    from essl.photonics import pwe

    ls = json.loads(settings["label_settings"])
    return len(pwe.kgrid(ls["kgrid"])[0]), int(ls["n_bands"])


def _shapes(settings: dict[str, Any], rows: int) -> dict[str, tuple[int, ...]]:
    size = settings["size"]
    shapes: dict[str, tuple[int, ...]] = {"eps": (rows, size, size), "eps_avg": (rows,)}
    bands = _bands_shape(settings)
    if bands is not None:
        shapes |= {"bands": (rows, *bands), "dos": (rows, DOS_POINTS), "target": (rows, TARGET_POINTS)}
    return shapes


def file_bytes(settings: dict[str, Any], rows: int) -> int:
    """Bytes a finished file of ``rows`` structures with these settings takes on disk (float32 data + metadata)."""
    return sum(4 * math.prod(s) for s in _shapes(settings, rows).values()) + METADATA_ALLOWANCE


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"  # pragma: no cover


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _on_disk(path: Path) -> int:
    """Bytes of disk blocks a file holds (a sparse partial file holds only its written chunks)."""
    try:
        return path.stat().st_blocks * 512
    except (OSError, AttributeError):
        return 0


def _check_space(what: str, target: Path, needed_total: int, existing: Path | None) -> None:
    """UserError unless the file system of ``target`` has room for ``needed_total`` bytes, less what ``existing``
    (the partial file being resumed) already holds."""
    needed = max(0, needed_total - (_on_disk(existing) if existing is not None else 0))
    folder = _nearest_existing(target.parent)
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # pragma: no cover - no statvfs (not Linux/macOS): cannot check
        return
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise UserError(
            f"{what}: {target} needs {_human(needed)} of disk space but only {_human(free)} are free in {folder}"
        )


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    try:
        return isinstance(err, OSError) and os.statvfs(_nearest_existing(folder)).f_bavail == 0
    except OSError:  # pragma: no cover
        return False


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def lock_path(out: Path) -> Path:
    """The lock file of an output file: ``.NAME.lock`` beside it."""
    return out.with_name(f".{out.name}{LOCK_SUFFIX}")


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet, deepest first (removed again if a run fails)."""
    out = []
    while not folder.exists() and folder.parent != folder:
        out.append(folder)
        folder = folder.parent
    return out


def _lock(out: Path, what: str):
    """Take the lock of ``out`` (:func:`lock_path`); a LockHeld error names the holder (``what`` of its process)."""
    from essl.io import FileLock

    return FileLock(lock_path(out), what, resource=out).acquire()


def _write_attrs(f: h5py.File, settings: dict[str, Any], devices: Sequence[str], completed: int) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["essl_version"] = essl.__version__
    for key, value in settings.items():
        f.attrs[key] = value
    f.attrs["completed"] = np.int64(completed)
    f.attrs.create("devices", _devices_attr(devices))


def _create_partial(partial: Path, settings: dict[str, Any], rows: int, devices: Sequence[str],
                    extra: Mapping[str, Any] | None = None) -> None:
    """Create the partial file with every dataset at its final size (sparse), under a temporary name, then rename
    it: a kill leaves either no partial file or a complete empty one."""
    tmp = partial.with_name(partial.name + ".new")
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            _write_attrs(f, settings, devices, 0)
            for key, value in (extra or {}).items():
                f.attrs[key] = value
            for name, shape in _shapes(settings, rows).items():
                _create_dataset(f, name, shape)
        os.replace(tmp, partial)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open_partial(partial: Path, settings: dict[str, Any], device: str) -> int:
    """Check a partial file left by an interrupted run; return its completed count (-1: start over). Records
    ``device`` in its ``devices`` attribute (in place) when this run uses another device."""
    try:
        with h5py.File(partial, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise OSError("not an essl photonic-crystal file")
            stored = _stored_settings(f)
            version = f.attrs.get("essl_version")
            completed = int(f.attrs["completed"])
            devices = _stored_devices(f)
    except (OSError, KeyError) as exc:
        print(f"{partial}: unreadable partial file ({exc}); starting over", file=sys.stderr)
        return -1
    problem = _first_difference(partial, stored, settings)
    if problem is None and version != essl.__version__:
        problem = f"{partial}: made with essl_version={version!r}, not {essl.__version__!r}"
    if problem:
        raise UserError(f"{problem}; will not append to it (delete it to start over)")
    if device not in devices:
        with h5py.File(partial, "r+") as f:
            if "devices" in f.attrs:
                f.attrs.modify("devices", _devices_attr([*devices, device]))
            else:  # a partial file from before the attribute existed
                f.attrs.create("devices", _devices_attr([*devices, device]))
    return completed


def _commit(
    partial: Path,
    start: int,
    cells: np.ndarray,
    eps_avg: np.ndarray,
    labels: dict | None,
    hook: Callable[[str], None] | None = None,
) -> None:
    """Write one chunk's rows [start, start + len(cells)), flush, then advance ``completed`` (``start`` counts the
    rows of this file). ``hook`` (tests) is called with "eps", "labels", "flushed", "committed" as the chunk goes."""
    stop = start + len(cells)
    with h5py.File(partial, "r+") as f:
        _reserve(partial, f, start, stop)  # a full disk fails here, before HDF5 has written anything
        f["eps"][start:stop] = cells
        f["eps_avg"][start:stop] = eps_avg
        if hook is not None:
            hook("eps")
        if labels is not None:
            if "bands" not in f:  # a partial file from before bands was allocated up front
                _create_dataset(f, "bands", (f["eps"].shape[0],) + labels["bands"].shape[1:])
            for key in LABEL_KEYS:
                f[key][start:stop] = labels[key]
            if hook is not None:
                hook("labels")
        f.flush()  # the data is on disk before the count says so
        if hook is not None:
            hook("flushed")
        f.attrs.modify("completed", np.int64(stop))
    if hook is not None:
        hook("committed")


def _reserve(path: Path, f: h5py.File, start: int, stop: int | None = None) -> None:
    """Give rows [start, stop) (all rows for None) of every contiguous dataset of the open file ``f`` their disk
    blocks before they are written (``posix_fallocate`` on the sparse file; module docstring). An HDF5 write that
    fails half-way on a full disk leaves its buffers to be flushed at close, which fails again (and h5py 3 can
    crash on it): reserving first turns a full disk into a clean OSError (ENOSPC) with nothing written."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # pragma: no cover - not on Linux: the free-space check before the run has to do
        return
    ranges = []
    for name in f:
        ds = f[name]
        offset = ds.id.get_offset() if isinstance(ds, h5py.Dataset) else None
        if offset is None or ds.shape[0] == 0:
            continue
        row = ds.id.get_storage_size() // ds.shape[0]
        hi = ds.shape[0] if stop is None else stop
        ranges.append((offset + start * row, (hi - start) * row))
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in ranges:
            if length > 0:
                fallocate(fd, offset, length)
    finally:
        os.close(fd)


def _labels_for(
    cells: np.ndarray, start: int, dev, label_kwargs: Mapping[str, Any], bands_shape: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Run the solver on one chunk (the maps stay on the host; the solve runs on ``dev``); check its answer against
    the contract -> float32 numpy arrays."""
    import torch

    out = _solver()[0](torch.from_numpy(cells), device=dev, **label_kwargs)
    n = len(cells)
    expected = {"bands": (n, *bands_shape), "dos": (n, DOS_POINTS), "target": (n, TARGET_POINTS), "eps_avg": (n,)}
    result = {}
    for key, shape in expected.items():
        value = out[key].detach().cpu().numpy().astype(np.float32, copy=False)
        if value.shape != shape:
            raise RuntimeError(f"compute_labels returned {key} of shape {value.shape} for {n} structures")
        if not np.isfinite(value).all():
            last = start + n - 1
            raise RuntimeError(f"compute_labels returned non-finite {key} for structures {start}..{last}")
        result[key] = value
    return result


def _check_int(name: str, value: Any, low: int) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < low):
        raise UserError(f"phc generate: {name}={value!r} must be an integer >= {low}")


def _remove_if_empty(dirs: Sequence[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


# ----------------------------------------------------------------------------------------------- generation


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
    shard: tuple[int, int] | str | None = None,
    _chunk_callback: Callable[[int], None] | None = None,
    _commit_hook: Callable[[str], None] | None = None,
    **label_kwargs: Any,
) -> Path:
    """Generate ``n`` unit cells of ``kind`` (and with ``labels`` their bands/DOS) into the HDF5 file ``out``.

    Args:
        out: the HDF5 file to write (work in progress goes to ``out + ".partial"``; module docstring).
        kind: "blob", "levelset" or "cylinder" (:mod:`essl.photonics.unitcell`).
        n: number of structures of the data set.
        labels: also run the band solver (:func:`essl.photonics.dos.compute_labels`) for bands, DOS, target.
        seed: dataset seed; structure i depends only on (seed, i).
        kgrid: k-grid points per axis for the DOS (None: the solver's default; at least MIN_KGRID).
        device: torch device of the band solver ("cpu", "cuda", "cuda:1"; labels only), recorded in ``devices``.
        chunk: structures per committed chunk (default 4096 unlabelled, 32 labelled, 256 labelled on a GPU).
        progress: show a tqdm bar with structures/s (stderr).
        size: pixels per side of the maps (default 32).
        cell_options: generator options, e.g. ``{"symmetry": "p4m"}`` (:func:`unitcell.generator_options`).
        shard: (I, N) or "I/N": write only shard I of N (module docstring, :func:`shard_range`; :func:`merge`
            joins the shard files).
        _chunk_callback: private test hook, called with the completed count after each committed chunk.
        _commit_hook: private test hook, passed to the chunk writer (:func:`_commit`).
        **label_kwargs: further solver options passed to ``compute_labels`` / ``label_settings``
            (n_bands, cutoff, polarization, method, memory_budget).

    Returns:
        The path of the complete file.

    Raises:
        UserError: bad arguments, ``out`` (or its partial file) made with other settings, ``out`` is not an essl
            photonic-crystal file, another process writes ``out``, not enough disk space (before any work), or the
            disk filled up mid-run (the committed chunks are kept).
    """
    out = Path(out).expanduser()
    partial = out.with_name(out.name + ".partial")
    if kind not in KINDS:
        raise UserError(f"phc generate: --kind {kind!r}: expected one of {', '.join(KINDS)}")
    for name, value, low in (("n", n, 1), ("seed", seed, 0), ("chunk", chunk, 1), ("kgrid", kgrid, MIN_KGRID)):
        _check_int(name, value, low)
    if kgrid is not None:
        if not labels:
            raise UserError("phc generate: --kgrid needs --labels (it is a solver setting)")
        label_kwargs["kgrid"] = int(kgrid)
    dev = _check_device(device, labels)
    index_count = parse_shard(shard) if isinstance(shard, str) else shard
    if index_count is not None:
        index_count = parse_shard(f"{index_count[0]}/{index_count[1]}")
    shard_text = f"{index_count[0]}/{index_count[1]}" if index_count else ""
    settings = _settings(kind, n, seed, size, dict(cell_options or {}), labels, label_kwargs, shard_text)
    options = json.loads(settings["cell_options"])
    generate_cells(kind, 0, seed, size, **options)  # validates size and option values before any file exists
    unit = int(chunk or (DEFAULT_CHUNK_LABELLED if labels else DEFAULT_CHUNK_UNLABELLED))
    if chunk is None and labels and dev.type == "cuda":
        chunk = DEFAULT_CHUNK_LABELLED_CUDA
    chunk = int(chunk or unit)
    first, last = shard_range(n, index_count, unit) if index_count else (0, n)
    rows = last - first
    from essl.io import check_output_file

    check_output_file(out, "phc generate: --out")
    new_dirs = _missing_dirs(out.parent)
    lock = _lock(out, f"essl phc generate --out {out}")
    try:
        with _terminate_as_interrupt():
            return _generate_locked(
                out, partial, settings, rows, first, chunk, options, labels, dev, label_kwargs, progress,
                new_dirs, _chunk_callback, _commit_hook,
            )
    finally:
        lock.release()
        if not out.exists() and not partial.exists():
            _remove_if_empty(new_dirs)


def _generate_locked(
    out: Path,
    partial: Path,
    settings: dict[str, Any],
    rows: int,
    first: int,
    chunk: int,
    options: dict[str, Any],
    labels: bool,
    dev,
    label_kwargs: dict[str, Any],
    progress: bool,
    new_dirs: list[Path],
    chunk_callback: Callable[[int], None] | None,
    commit_hook: Callable[[str], None] | None,
) -> Path:
    """The part of :func:`generate` that runs under the lock of ``out``."""
    kind, seed, size, n = settings["kind"], settings["seed"], settings["size"], settings["n"]
    if out.exists():
        _check_finished(out, settings, rows, "", "append to it (choose another --out or delete it)")
        return out

    name = device_name(dev)
    completed = _open_partial(partial, settings, name) if partial.exists() else -1
    _check_space("phc generate", out, file_bytes(settings, rows), partial if completed >= 0 else None)
    created = completed < 0
    extra = {"shard_start": np.int64(first), "shard_stop": np.int64(first + rows)} if settings["shard"] else None
    try:
        if created:
            out.parent.mkdir(parents=True, exist_ok=True)
            _create_partial(partial, settings, rows, [name], extra)
            completed = 0
        elif completed > 0:
            print(f"{partial}: resuming at structure {first + completed} of {n}")
        bands_shape = _bands_shape(settings)

        from tqdm import tqdm

        start_time = time.perf_counter()
        done_before = completed
        with tqdm(
            total=rows, initial=completed, unit=" structures", desc=out.name, disable=not progress, smoothing=0.1
        ) as bar:
            while completed < rows:
                count = min(chunk, rows - completed)
                cells = generate_cells(kind, count, seed, size, start=first + completed, **options)
                if labels:
                    lab = _labels_for(cells, first + completed, dev, label_kwargs, bands_shape)
                    eps_avg = lab.pop("eps_avg")
                else:
                    lab, eps_avg = None, cells.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
                _commit(partial, completed, cells, eps_avg, lab, commit_hook)
                completed += count
                bar.update(count)
                if chunk_callback is not None:
                    chunk_callback(completed)

        validate_file(partial, require_labels=labels)  # full validation before the file gets its final name
        os.replace(partial, out)
        _fsync_dir(out.parent)
    except BaseException as err:
        kept = _committed(partial)
        if created and kept == 0:
            partial.unlink(missing_ok=True)  # this run made it and nothing of value is in it
            _remove_if_empty(new_dirs)
        if isinstance(err, Exception) and _is_disk_full(err, out.parent):
            state = (
                f"{kept} of {rows} structures are committed and kept; free space and run the same command again "
                "to resume"
                if kept
                else "nothing was committed, nothing is left behind"
            )
            raise UserError(f"phc generate: no space left on device writing {partial} ({state})") from None
        raise
    elapsed = time.perf_counter() - start_time
    rate = (rows - done_before) / elapsed if elapsed > 0 else float("inf")
    if progress:
        what = f"{rows} {kind} structures" + (f" (shard {settings['shard']} of {n})" if settings["shard"] else "")
        print(f"{out}: {what}{' with labels' if labels else ''} ({rate:.1f} structures/s)")
    return out


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``kill``, a batch system's time limit or pre-emption) raises KeyboardInterrupt while the block runs,
    so that a terminated run releases its lock and keeps its committed chunks, as Ctrl-C does (main thread only)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _committed(partial: Path) -> int:
    """The ``completed`` count of a partial file (0 if it is missing or unreadable)."""
    try:
        with h5py.File(partial, "r") as f:
            return int(f.attrs.get("completed", 0))
    except (OSError, KeyError, ValueError):
        return 0


# ----------------------------------------------------------------------------------------------- merging


@dataclass
class _ShardInfo:
    path: Path
    index: int
    count: int
    start: int
    stop: int
    settings: dict[str, Any]
    attrs: dict[str, Any]
    devices: list[str]


def _read_shard(path: Path) -> _ShardInfo:
    if not path.is_file():
        raise UserError(f"phc merge: {path}: no such file")
    if not h5py.is_hdf5(path):
        raise UserError(f"phc merge: {path}: not an HDF5 file")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise UserError(f"phc merge: {path}: not an essl photonic-crystal file")
        settings = _stored_settings(f)
        attrs = {key: _attr(f, key) for key in f.attrs}
        devices = _stored_devices(f)
        rows = f["eps"].shape[0] if "eps" in f else -1
    if not settings["shard"]:
        raise UserError(f"phc merge: {path}: a whole data set, not a shard (made without --shard)")
    index, count = parse_shard(settings["shard"])
    start, stop = int(attrs.get("shard_start", -1)), int(attrs.get("shard_stop", -1))
    if attrs.get("completed") != rows or stop - start != rows:
        raise UserError(f"phc merge: {path}: incomplete shard ({attrs.get('completed')} of {rows} structures)")
    return _ShardInfo(path, index, count, start, stop, settings, attrs, devices)


def merge(out: str | os.PathLike, shards: Sequence[str | os.PathLike], *, progress: bool = True) -> Path:
    """Join the N shard files of one data set (``generate(..., shard=(I, N))``, any order) into the whole file
    ``out``: the same arrays and attributes as one run, plus ``merged_from`` (module docstring).

    Checks first, before anything is written: every file is a complete essl shard; all were made with the same
    settings and essl version; together they are shards 0..N−1 of one N, each once, covering structures 0..n−1
    without gap or overlap; ``out`` is not taken; there is disk space for it. The output is written to a hidden
    temporary file beside ``out``, validated and renamed (removed on failure); the shard files are left as they
    are. If ``out`` already holds the same data set, nothing is done.

    Raises:
        UserError: one line naming the file and the problem.
    """
    out = Path(out).expanduser()
    paths = [Path(s).expanduser() for s in shards]
    if not paths:
        raise UserError("phc merge: no shard files given")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise UserError(f"phc merge: {p} is given twice")
        if out.exists() and key == out.resolve():
            raise UserError(f"phc merge: {p} is the output file")
        seen[key] = p
    infos = [_read_shard(p) for p in paths]
    ref = infos[0]
    for info in infos[1:]:
        problem = _first_difference(info.path, {**info.settings, "shard": ""}, {**ref.settings, "shard": ""})
        if problem:
            raise UserError(f"phc merge: {problem} (as {ref.path}): not shards of one data set")
        if info.attrs.get("essl_version") != ref.attrs.get("essl_version"):
            raise UserError(
                f"phc merge: {info.path}: made with essl_version={info.attrs.get('essl_version')!r}, "
                f"not {ref.attrs.get('essl_version')!r} (as {ref.path})"
            )
        if info.count != ref.count:
            raise UserError(f"phc merge: {info.path} is shard {info.index}/{info.count}, {ref.path} one of {ref.count}")
    by_index: dict[int, _ShardInfo] = {}
    for info in infos:
        if info.index in by_index:
            raise UserError(f"phc merge: {info.path} and {by_index[info.index].path} are both shard "
                            f"{info.index}/{info.count}")
        by_index[info.index] = info
    missing = [i for i in range(ref.count) if i not in by_index]
    if missing:
        raise UserError(f"phc merge: shard {missing[0]}/{ref.count} is missing ({len(missing)} of {ref.count} missing)")
    ordered = [by_index[i] for i in range(ref.count)]
    n = ref.settings["n"]
    position = 0
    for info in ordered:
        if info.start != position:
            raise UserError(f"phc merge: {info.path} holds structures {info.start}..{info.stop - 1}, expected "
                            f"{position}.. (shards made with different --chunk?)")
        position = info.stop
    if position != n:
        raise UserError(f"phc merge: the shards hold structures 0..{position - 1} of {n}")

    from essl.io import check_output_file

    check_output_file(out, "phc merge: OUT")
    settings = {**ref.settings, "shard": ""}
    new_dirs = _missing_dirs(out.parent)
    lock = _lock(out, f"essl phc merge {out}")
    try:
        with _terminate_as_interrupt():
            return _merge_locked(out, ordered, settings, progress)
    finally:
        lock.release()
        if not out.exists():
            _remove_if_empty(new_dirs)


def _check_finished(out: Path, settings: dict[str, Any], rows: int, prefix: str, refusal: str) -> None:
    """An existing ``out`` that ``generate`` or ``merge`` would write: returns when it already holds all ``rows``
    structures of these settings (nothing to do, said on stdout); otherwise a UserError saying why it is left
    alone (``prefix`` starts each message, ``refusal`` ends the one for other settings)."""
    try:
        with h5py.File(out, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise OSError("no essl format attribute")
            stored, completed = _stored_settings(f), int(f.attrs.get("completed", -1))
    except OSError:
        raise UserError(f"{prefix}{out}: exists and is not an essl photonic-crystal dataset; "
                        "will not overwrite") from None
    problem = _first_difference(out, stored, settings)
    if problem:
        raise UserError(f"{prefix}{problem}; will not {refusal}")
    if completed != rows:
        raise UserError(f"{prefix}{out}: exists, incomplete ({completed} of {rows} structures) and not a .partial "
                        "file; will not overwrite it")
    print(f"{out}: already complete ({completed} structures, same settings); nothing to do")


def _merge_locked(out: Path, ordered: list[_ShardInfo], settings: dict[str, Any], progress: bool) -> Path:
    n = settings["n"]
    if out.exists():
        _check_finished(out, settings, n, "phc merge: ", "overwrite it (choose another OUT or delete it)")
        return out
    _check_space("phc merge", out, file_bytes(settings, n), None)
    devices: list[str] = []
    for info in ordered:
        devices += [d for d in info.devices if d not in devices]
    record = [
        {"shard": info.settings["shard"], "structures": [info.start, info.stop], "devices": info.devices,
         "file": info.path.name}
        for info in ordered
    ]
    ref = ordered[0]
    tmp = out.with_name(f".{out.name}.merge.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w", track_order=True) as f:
            _write_attrs(f, settings, devices, 0)
            f.attrs["essl_version"] = ref.attrs["essl_version"]
            f.attrs["merged_from"] = _json(record)
            shapes = _shapes(settings, n)
            for name, shape in shapes.items():
                _create_dataset(f, name, shape)
            f.flush()
            _reserve(tmp, f, 0)
            from tqdm import tqdm

            with tqdm(total=n, unit=" structures", desc=out.name, disable=not progress) as bar:
                for info in ordered:
                    with h5py.File(info.path, "r") as src:
                        rows = info.stop - info.start
                        block = _block_rows(shapes)
                        for r0 in range(0, rows, block):
                            r1 = min(r0 + block, rows)
                            for name in shapes:
                                f[name][info.start + r0 : info.start + r1] = src[name][r0:r1]
                            bar.update(r1 - r0)
            f.flush()
            f.attrs.modify("completed", np.int64(n))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        validate_file(tmp, require_labels=settings["labels"])
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and _is_disk_full(err, out.parent):
            raise UserError(f"phc merge: no space left on device writing {out} (nothing is left behind)") from None
        raise
    if progress:
        print(f"{out}: merged {len(ordered)} shards, {n} structures")
    return out


def _block_rows(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Rows per block so that one block of every dataset holds at most VALIDATE_BLOCK_BYTES."""
    per_row = sum(4 * math.prod(s[1:]) for s in shapes.values())
    return max(1, VALIDATE_BLOCK_BYTES // max(1, per_row))


# ----------------------------------------------------------------------------------------------- validation


def _check_shapes(path: Path, shapes: Mapping[str, tuple[int, ...]], require_labels: bool) -> int:
    """The layout checks of :func:`open_dataset` on dataset shapes; returns N."""
    for key in ("eps", "eps_avg"):
        if key not in shapes:
            raise UserError(f"{path}: missing dataset {key!r}")
    eps = shapes["eps"]
    if len(eps) != 3 or eps[1] != eps[2] or eps[0] == 0:
        raise UserError(f"{path}: dataset 'eps' has shape {eps}, expected (N, n, n) with N >= 1")
    n = eps[0]
    present = [key for key in LABEL_KEYS if key in shapes]
    if require_labels or present:
        for key in LABEL_KEYS:
            if key not in shapes:
                hint = "; generate it with --labels" if not present else ""
                raise UserError(f"{path}: missing dataset {key!r}{hint}")
    expected = {"eps_avg": (n,), "dos": (n, DOS_POINTS), "target": (n, TARGET_POINTS)}
    for key, shape in expected.items():
        if key in shapes and tuple(shapes[key]) != shape:
            raise UserError(f"{path}: dataset {key!r} has shape {tuple(shapes[key])}, expected {shape}")
    if "bands" in shapes and (len(shapes["bands"]) != 3 or shapes["bands"][0] != n):
        raise UserError(f"{path}: dataset 'bands' has shape {tuple(shapes['bands'])}, expected ({n}, K, n_bands)")
    return n


def _bad_rows_error(path: Path, key: str, bad: int, first: int, n: int) -> UserError:
    return UserError(f"{path}: dataset {key!r} has NaN/inf in {bad} of {n} structures (first: index {first})")


def _eps_floor_error(path: Path, low: float) -> UserError:
    return UserError(
        f"{path}: dataset 'eps' has values below {EPS_FLOOR} (min {low:.3g}); "
        "expected relative permittivities, not normalised maps"
    )


def validate_file(path: str | os.PathLike, require_labels: bool = False) -> int:
    """The checks of :func:`open_dataset` (layout, finite values, ε ≥ 1, ``completed``), reading the file in blocks
    of VALIDATE_BLOCK_BYTES instead of loading it; returns N. Raises UserError naming the file and the problem."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        keys = [k for k in ("eps", "eps_avg") + LABEL_KEYS if k in f]
        for key in keys:
            obj = f[key]
            if not isinstance(obj, h5py.Dataset) or obj.dtype.kind != "f":
                raise UserError(f"{path}: {key!r} is not a floating-point dataset")
        shapes = {k: f[k].shape for k in keys}
        n = _check_shapes(path, shapes, require_labels)
        block = _block_rows(shapes)
        low = math.inf
        for key in keys:
            bad, first = 0, -1
            for r0 in range(0, n, block):
                value = f[key][r0 : r0 + block]
                rows_bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
                if rows_bad.any():
                    first = r0 + int(np.argmax(rows_bad)) if bad == 0 else first
                    bad += int(rows_bad.sum())
                if key == "eps" and not rows_bad.any():
                    low = min(low, float(value.min()))
            if bad:
                raise _bad_rows_error(path, key, bad, first, n)
        if low < EPS_FLOOR - EPS_FLOOR_TOLERANCE:
            raise _eps_floor_error(path, low)
        completed = _attr(f, "completed")
    if completed is not None and completed != n:
        raise UserError(f"{path}: incomplete file ({completed} of {n} structures written)")
    return n


# ----------------------------------------------------------------------------------------------- reading


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
    n = _check_shapes(path, {k: v.shape for k, v in data.items()}, require_labels)
    eps = data["eps"]
    for key, value in data.items():
        bad = ~np.isfinite(value.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise _bad_rows_error(path, key, int(bad.sum()), int(np.argmax(bad)), n)
    if eps.min() < EPS_FLOOR - EPS_FLOOR_TOLERANCE:
        raise _eps_floor_error(path, float(eps.min()))
    completed = attrs.get("completed")
    if completed is not None and completed != n:
        raise UserError(f"{path}: incomplete file ({completed} of {n} structures written)")
    return PhCData(path=path, attrs=attrs, **data)


def _read(f: h5py.File, path: Path, key: str) -> np.ndarray:
    obj = f[key]
    if not isinstance(obj, h5py.Dataset) or obj.dtype.kind != "f":
        raise UserError(f"{path}: {key!r} is not a floating-point dataset")
    return obj[()].astype(np.float32, copy=False)
