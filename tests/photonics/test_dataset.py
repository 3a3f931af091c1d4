"""HDF5 generation end to end: unlabelled and labelled (real solver, tiny settings), resume after SIGKILL,
refusal to mix settings, and the reader's one-line errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

import essl
from essl.errors import UserError
from essl.photonics import dataset
from essl.photonics.dataset import DOS_POINTS, TARGET_POINTS, generate, open_dataset
from essl.photonics.unitcell import generate_cells

# The real solver (essl.photonics.dos.compute_labels) with tiny settings: 21 plane waves (|G| <= 2), a 4×4
# k-grid, 10 bands, Gaussian-broadened DOS (the fastest method): a fraction of a second per structure on CPU.
SOLVER = {"kgrid": 4, "cutoff": 2, "n_bands": 10, "method": "gaussian"}
CHILD_SOLVE_DELAY = 0.3
"""Seconds the killed child waits before each chunk's solve, so that the kill lands mid-chunk, not at the end."""
DATASETS = ("eps", "eps_avg", "bands", "dos", "target")


def read_all(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_unlabelled_end_to_end(tmp_path):
    out = generate(tmp_path / "cells.h5", "blob", 10, seed=4, chunk=4, progress=False)
    assert out == tmp_path / "cells.h5" and sorted(os.listdir(tmp_path)) == ["cells.h5"]
    data, attrs = read_all(out)
    assert sorted(data) == ["eps", "eps_avg"]
    np.testing.assert_array_equal(data["eps"], generate_cells("blob", 10, seed=4))
    np.testing.assert_allclose(data["eps_avg"], data["eps"].mean(axis=(1, 2)), rtol=1e-6)
    assert attrs["kind"] == "blob" and attrs["n"] == 10 and attrs["seed"] == 4 and attrs["completed"] == 10
    assert attrs["essl_version"] == essl.__version__ and not attrs["labels"]
    assert json.loads(attrs["cell_options"])["supersample"] == 1
    ds = open_dataset(out)
    assert len(ds) == 10 and not ds.has_labels
    with pytest.raises(UserError, match="missing dataset 'bands'; generate it with --labels"):
        open_dataset(out, require_labels=True)


def test_cell_options_are_stored_and_used(tmp_path):
    out = generate(tmp_path / "p4m.h5", "levelset", 5, cell_options={"symmetry": "p4m"}, progress=False)
    data, attrs = read_all(out)
    assert json.loads(attrs["cell_options"])["symmetry"] == "p4m"
    np.testing.assert_array_equal(data["eps"], np.rot90(data["eps"], 1, axes=(1, 2)))
    with pytest.raises(UserError, match="unknown levelset option 'radius'"):
        generate(tmp_path / "x.h5", "levelset", 5, cell_options={"radius": 0.1}, progress=False)


def test_labelled_end_to_end_and_already_complete(tmp_path, capsys):
    out = generate(tmp_path / "lab.h5", "levelset", 3, labels=True, seed=2, chunk=2, progress=True, **SOLVER)
    err = capsys.readouterr().err
    assert "structures/s" in err  # the tqdm bar
    ds = open_dataset(out, require_labels=True)
    assert ds.bands.shape[0] == 3 and ds.bands.shape[2] == SOLVER["n_bands"] and ds.bands.ndim == 3
    assert ds.dos.shape == (3, DOS_POINTS) and ds.target.shape == (3, TARGET_POINTS)
    assert all(a.dtype == np.float32 for a in (ds.eps, ds.eps_avg, ds.bands, ds.dos, ds.target))
    np.testing.assert_allclose(ds.eps_avg, ds.eps.mean(axis=(1, 2)), rtol=1e-5)
    assert np.all(np.diff(ds.bands, axis=2) >= 0)  # bands sorted at every k-point
    stored = json.loads(ds.attrs["label_settings"])
    assert stored == json.loads(json.dumps(dataset._solver()[1](**SOLVER)))
    assert ds.attrs["labels"] and ds.attrs["completed"] == 3

    # The default DOS method (GGR) through the same path, on one structure.
    ggr = generate(tmp_path / "ggr.h5", "cylinder", 1, labels=True, kgrid=4, cutoff=2, progress=False)
    ds_ggr = open_dataset(ggr, require_labels=True)
    assert json.loads(ds_ggr.attrs["label_settings"])["dos_method"] == "ggr"
    assert (ds_ggr.dos >= 0).all() and ds_ggr.dos.sum() > 0

    before = (out.stat().st_mtime_ns, out.read_bytes())
    generate(out, "levelset", 3, labels=True, seed=2, chunk=2, progress=False, **SOLVER)
    assert "already complete" in capsys.readouterr().out
    assert (out.stat().st_mtime_ns, out.read_bytes()) == before


def test_refuses_other_settings(tmp_path):
    out = generate(tmp_path / "a.h5", "levelset", 2, labels=True, seed=0, progress=False, **SOLVER)
    cases = [
        ({"seed": 1}, "seed=0, not 1"),
        ({"kgrid": 6}, "label_settings.kgrid=4, not 6"),
        ({"n": 3}, "n=2, not 3"),
        ({"kind": "blob"}, "kind='levelset', not 'blob'"),
        ({"labels": False}, "labels=True, not False"),
    ]
    for change, message in cases:
        args = {"kind": "levelset", "n": 2, "labels": True, "seed": 0, **SOLVER, **change}
        if not args["labels"]:
            args = {k: v for k, v in args.items() if k not in SOLVER}
        with pytest.raises(UserError, match=message) as info:
            generate(out, progress=False, **args)
        assert str(out) in str(info.value) and "\n" not in str(info.value)
    # How the bands were solved is provenance, not a setting: a file stays complete for another band solver.
    assert generate(out, "levelset", 2, labels=True, seed=0, progress=False, band_solver="reduced", **SOLVER) == out
    # The same check protects a partial file left by an interrupted run.
    partial = tmp_path / "b.h5.partial"
    os.replace(out, partial)
    with pytest.raises(UserError, match=r"b\.h5\.partial: made with cell_options\.symmetry='pm', not 'p1'"):
        generate(tmp_path / "b.h5", "levelset", 2, labels=True, cell_options={"symmetry": "p1"}, **SOLVER)
    (tmp_path / "foreign.h5").write_text("not ours")
    with pytest.raises(UserError, match="foreign.h5: exists and is not an essl photonic-crystal dataset"):
        generate(tmp_path / "foreign.h5", "blob", 2, progress=False)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--kind 'hexagon'"):
        generate(tmp_path / "x.h5", "hexagon", 2)
    with pytest.raises(UserError, match="n=0"):
        generate(tmp_path / "x.h5", "blob", 0)
    with pytest.raises(UserError, match="symmetry='p6m'"):
        generate(tmp_path / "x.h5", "levelset", 2, cell_options={"symmetry": "p6m"})
    with pytest.raises(UserError, match="size=1"):
        generate(tmp_path / "x.h5", "blob", 2, size=1)
    with pytest.raises(UserError, match="--kgrid needs --labels"):
        generate(tmp_path / "x.h5", "blob", 2, kgrid=4)
    with pytest.raises(UserError, match="bad solver settings.*method"):
        generate(tmp_path / "x.h5", "blob", 2, labels=True, method="magic")
    with pytest.raises(UserError, match="--device 'gpu'"):
        generate(tmp_path / "x.h5", "blob", 2, labels=True, device="gpu")
    assert not list(tmp_path.iterdir())


def test_corrupt_partial_file_starts_over(tmp_path, capsys):
    (tmp_path / "c.h5.partial").write_bytes(b"\x89HDF garbage")
    out = generate(tmp_path / "c.h5", "cylinder", 3, progress=False)
    assert "starting over" in capsys.readouterr().err
    np.testing.assert_array_equal(open_dataset(out).eps, generate_cells("cylinder", 3, seed=0))


CHILD = textwrap.dedent(
    """
    import time
    import essl.photonics.dataset as dataset

    compute_labels, label_settings = dataset._solver()

    def slow_compute_labels(eps, **kwargs):
        time.sleep({delay!r})
        return compute_labels(eps, **kwargs)

    dataset._solver = lambda: (slow_compute_labels, label_settings)

    def committed(done):
        print("committed", done, flush=True)

    dataset.generate({out!r}, "levelset", {n}, labels=True, seed=7, chunk=2, progress=False,
                     _chunk_callback=committed, **{solver!r})
    """
)


def run_and_kill(code: str, delay: float) -> str:
    """Run ``code`` in a fresh interpreter; SIGKILL it ``delay`` seconds after its first committed chunk.

    Returns what the child printed up to then."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not (lines and lines[-1].startswith("committed")):
            lines.append(child.stdout.readline())
            assert lines[-1], f"the child ended before committing a chunk: {lines}"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return "".join(lines)


def test_kill_and_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    n = 8
    out = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    code = CHILD.format(delay=CHILD_SOLVE_DELAY, out=str(out), n=n, solver=SOLVER)

    # Killed right after the first commit, i.e. while solving the second chunk ...
    run_and_kill(code, delay=0.0)
    assert not out.exists() and partial.exists()  # the final name only ever holds a complete file
    with h5py.File(partial, "r") as f:
        first = int(f.attrs["completed"])
    assert 2 <= first < n  # really interrupted mid-way
    # ... then resumed in a new process and killed again at a random moment (possibly while writing) ...
    delay = float(np.random.default_rng().uniform(0.0, CHILD_SOLVE_DELAY))
    assert "resuming at structure" in run_and_kill(code, delay)
    assert not out.exists() and partial.exists()
    with h5py.File(partial, "r") as f:
        assert first < int(f.attrs["completed"]) < n
    # ... and finished by running the same command once more.
    generate(out, "levelset", n, labels=True, seed=7, chunk=2, progress=False, **SOLVER)
    assert out.exists() and not partial.exists()
    resumed = open_dataset(out, require_labels=True)
    reference = generate(
        tmp_path / "ref.h5", "levelset", n, labels=True, seed=7, chunk=2, progress=False, **SOLVER
    )
    expected, expected_attrs = read_all(reference)
    got, got_attrs = read_all(out)
    assert sorted(got) == sorted(DATASETS) == sorted(expected)
    for key in DATASETS:
        assert got[key].tobytes() == expected[key].tobytes(), key  # bit for bit
    assert got_attrs == expected_attrs
    assert len(resumed) == n


def make_file(path, n=4, size=8, labels=True, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "eps": rng.uniform(1, 20, (n, size, size)).astype(np.float32),
        "eps_avg": np.ones(n, np.float32),
    }
    if labels:
        arrays |= {
            "bands": np.ones((n, 5, 10), np.float32),
            "dos": np.ones((n, DOS_POINTS), np.float32),
            "target": np.ones((n, TARGET_POINTS), np.float32),
        }
    arrays |= overrides
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f[key] = value
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eps": np.ones((4, 8, 9), np.float32)}, r"'eps' has shape \(4, 8, 9\)"),
        ({"dos": np.ones((4, 400), np.float32)}, r"'dos' has shape \(4, 400\), expected \(4, 500\)"),
        ({"target": np.ones((3, 400), np.float32)}, r"'target' has shape \(3, 400\)"),
        ({"bands": np.ones((4, 10), np.float32)}, r"'bands' has shape \(4, 10\)"),
        ({"eps_avg": np.full(4, np.nan, np.float32)}, "'eps_avg' has NaN/inf in 4 of 4"),
        ({"target": None}, "missing dataset 'target'"),
        ({"eps": None}, "missing dataset 'eps'"),
        ({"eps": np.zeros((4, 8, 8), np.float32)}, "not normalised maps"),
    ],
)
def test_reader_errors(tmp_path, overrides, message):
    path = make_file(tmp_path / "bad.h5", **overrides)
    with pytest.raises(UserError, match=message) as info:
        open_dataset(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_reader_file_errors(tmp_path):
    with pytest.raises(UserError, match="missing.h5: no such file"):
        open_dataset(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("x")
    with pytest.raises(UserError, match="text.h5: not an HDF5 file"):
        open_dataset(tmp_path / "text.h5")
    path = make_file(tmp_path / "part.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["completed"] = 2
    with pytest.raises(UserError, match=r"part.h5: incomplete file \(2 of 4"):
        open_dataset(path)
    ok = open_dataset(make_file(tmp_path / "ok.h5", labels=False))
    assert len(ok) == 4 and ok.bands is None


def test_datamodule_reads_a_generated_file(tmp_path):
    import torch

    from essl.data.phc import EPS_MIN, EPS_SPAN, PhCDataModule

    out = generate(tmp_path / "dm.h5", "blob", 4, labels=True, seed=1, progress=False, **SOLVER)
    ds = open_dataset(out, require_labels=True)
    dm = PhCDataModule(out, 2, with_target=True, seed=0)
    xs, ys = zip(*dm.train_dataloader(), strict=True)
    x, y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
    assert x.shape == (4, 1, 32, 32) and y.shape == (4, TARGET_POINTS)
    for xi, yi in zip(x, y, strict=True):
        (row,) = [r for r in range(4) if np.array_equal(ds.target[r], yi)]
        np.testing.assert_allclose(xi[0], (ds.eps[row] - EPS_MIN) / EPS_SPAN, rtol=1e-6)
