"""Photonics end to end through the CLI: generate labelled cells, pretrain E-SimCLR on ε maps, regress the DOS.
Also: the lattice transformations' labels are exact on real permittivity maps; `phc generate`'s user errors,
sharded generation + `phc merge`, and `phc bands` (band diagram and DOS of one cell) against references."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from essl.augment import LatticeViews
from essl.cli import main
from essl.photonics.unitcell import generate_cells
from essl.transforms import apply, inverse_labels, transform

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["blob", "levelset"])
@pytest.mark.parametrize("group,grid", [("rot4", 2), ("c4v", 2), ("translate", 2), ("flip4", 2)])
def test_lattice_labels_are_exact_on_eps_maps(kind, group, grid):
    eps = torch.from_numpy(generate_cells(kind, 6, seed=3))[:, None]  # (6, 1, 32, 32) physical ε
    x_t, labels = transform(eps, group, mode="random", grid=grid)
    assert torch.equal(apply(x_t, group, inverse_labels(group, labels, grid), grid), eps)
    assert x_t.min() >= 1.0 and x_t.max() <= 20.0  # physical values, never clamped or rescaled


def test_lattice_views_only_permute_pixels_then_normalise():
    eps = torch.from_numpy(generate_cells("levelset", 4, seed=1))[:, None]
    views = LatticeViews(["shift", "c4v", "halfshift"], mean=(1.0,), std=(19.0,))(eps)
    restored = views * 19.0 + 1.0
    for a, b in zip(restored, eps, strict=True):  # the same multiset of pixel values, permuted
        assert torch.allclose(a.flatten().sort().values, b.flatten().sort().values, atol=1e-5)


def test_generate_pretrain_regress_end_to_end(tmp_path, capsys):
    train, test, pool = tmp_path / "train.h5", tmp_path / "test.h5", tmp_path / "pool.h5"
    for out, seed in ((train, 0), (test, 1)):
        assert main(["phc", "generate", "--kind", "levelset", "--n", "12", "--out", str(out), "--labels",
                     "--kgrid", "4", "--seed", str(seed), "--no-progress"]) == 0
    assert main(["phc", "generate", "--kind", "levelset", "--n", "16", "--out", str(pool), "--seed", "2",
                 "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", str(ROOT / "configs/photonics/levelset_e-simclr.yaml"), f"data.path={pool}",
                 f"output_dir={run}", "data.batch_size=4", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "progress=false", "backbone.kwargs.width=0.125", "method.kwargs.hidden_dim=32",
                 "equivariance.hidden_dim=32"]) == 0
    out_json, fig = tmp_path / "regress.json", tmp_path / "dos.png"
    assert main(["phc", "regress", str(run / "encoder.pt"), "--train", str(train), "--test", str(test),
                 "--n-labels", "10", "--seeds", "1", "--json", str(out_json), "--figure", str(fig),
                 "--no-progress"]) == 0
    result = json.loads(out_json.read_text())
    assert set(result["results"]) == {"encoder", "scratch"}
    for entry in result["results"].values():
        assert 0.0 < entry["mean"] < 10.0 and len(entry["per_seed"]) == 1
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scratch" in capsys.readouterr().out.lower()
    # the defaults are the reference fine-tuning (rdangovs/essl photonics/main.py finetune_model)
    assert result["mode"] == "finetune" and result["augment"] == result["scratch_augment"] == "none"
    assert {k: result["settings"][k] for k in ("epochs", "batch_size", "lr", "weight_decay", "backbone_lr_factor",
                                               "schedule")} == {
        "epochs": 100, "batch_size": 64, "lr": 1e-4, "weight_decay": 1e-5, "backbone_lr_factor": 1.0,
        "schedule": "constant"}
    assert result["settings"]["networks"]["encoder"]["head"] == [128, 1024, 1024, 512, 400]  # width 0.125
    # optimisation and augmentation flags reach the protocol; --no-scratch skips the baseline
    assert main(["phc", "regress", str(run / "encoder.pt"), "--train", str(train), "--test", str(test),
                 "--n-labels", "10", "--seeds", "1", "--json", str(out_json), "--no-progress", "--no-scratch",
                 "--epochs", "3", "--batch-size", "4", "--lr", "3e-4", "--weight-decay", "1e-6",
                 "--backbone-lr-factor", "0.1", "--augment", "shift+flip3"]) == 0
    result = json.loads(out_json.read_text())
    assert set(result["results"]) == {"encoder"}
    assert {k: result["settings"][k] for k in ("epochs", "batch_size", "lr", "weight_decay")} == {
        "epochs": 3, "batch_size": 4, "lr": 3e-4, "weight_decay": 1e-6}
    optimizer = result["settings"]["optimizers"]["encoder"]
    assert optimizer["backbone_lr"] == pytest.approx(3e-5) and optimizer["augment"] == ["shift", "flip3"]
    # frozen mode; the scratch network with its own augmentation
    assert main(["phc", "regress", str(run / "encoder.pt"), "--train", str(train), "--test", str(test),
                 "--n-labels", "10", "--seeds", "1", "--json", str(out_json), "--no-progress", "--mode", "frozen",
                 "--epochs", "2", "--augment", "flip3+rot4", "--scratch-augment", "halfshift"]) == 0
    result = json.loads(out_json.read_text())
    assert result["mode"] == "frozen" and result["settings"]["frozen_views"] > 1
    assert [result["settings"]["optimizers"][k]["augment"] for k in ("encoder", "scratch")] == [
        ["flip3", "rot4"], ["halfshift"]]
    assert main(["phc", "regress", "none", "--train", str(train), "--test", str(test), "--n-labels", "10",
                 "--epochs", "0", "--no-progress"]) == 2
    capsys.readouterr()
    assert main(["phc", "regress", "none", "--train", str(train), "--test", str(test), "--n-labels", "10",
                 "--augment", "flip3+rot5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--augment 'flip3+rot5'" in err and "'rot5'" in err and len(err.strip().splitlines()) == 1


# ---- phc generate / merge / bands: user errors, shards, band diagrams ---------------------------------------------

TINY_LABELS = ["--labels", "--kgrid", "4"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A small labelled level-set file (p4m: real symmetric problems)."""
    out = tmp_path_factory.mktemp("labelled") / "cells.h5"
    assert main(["phc", "generate", "--kind", "levelset", "--n", "3", "--out", str(out), *TINY_LABELS, "--option",
                 "symmetry=p4m", "--no-progress"]) == 0
    return out


def _user_error(capsys, argv, culprit, folder):
    """``argv`` exits 2 with one line naming ``culprit``, no traceback, and writes nothing into ``folder``."""
    before = sorted(p.name for p in folder.iterdir())
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors (a wrong type or choice)
        code = stop.code
    assert code == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert culprit in err, (culprit, err)
    assert sorted(p.name for p in folder.iterdir()) == before, argv


GENERATE_ERRORS = [
    (["--n", "0"], "n=0"),
    (["--n", "-5"], "n=-5"),
    (["--n", "abc"], "--n"),
    (["--kind", "hexagon"], "--kind"),
    ([*TINY_LABELS[:1], "--kgrid", "1"], "kgrid=1"),
    (["--kgrid", "4"], "--kgrid needs --labels"),
    (["--device", "cuda"], "--device cuda needs --labels"),
    (["--labels", "--device", "mps"], "--device 'mps'"),
    (["--labels", "--device", "tpu9"], "--device 'tpu9'"),
    (["--seed", "-1"], "seed=-1"),
    (["--chunk", "0"], "chunk=0"),
    (["--shard", "3/3"], "--shard 3/3"),
    (["--shard", "1-of-2"], "--shard '1-of-2'"),
    (["--shard", "1/0"], "--shard 1/0"),
    (["--shard", "5/8"], "--shard 5/8: no structures left"),
    (["--option", "radius=0.1"], "'radius'"),
    (["--option", "symmetry=p6m"], "symmetry='p6m'"),
    (["--option", "fill"], "--option 'fill'"),
    (["--option", "fill=2"], "fill=2"),
]


@pytest.mark.parametrize(("extra", "culprit"), GENERATE_ERRORS)
def test_generate_user_errors(tmp_path, capsys, extra, culprit):
    argv = ["phc", "generate", "--kind", "levelset", "--n", "2", "--out", str(tmp_path / "sub" / "x.h5"),
            "--no-progress", *extra]
    _user_error(capsys, argv, culprit, tmp_path)


def test_generate_cuda_without_a_gpu_and_output_folder_are_user_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["phc", "generate", "--kind", "blob", "--n", "2", "--no-progress"]
    _user_error(capsys, [*base, "--out", str(tmp_path / "x.h5"), "--labels", "--device", "cuda"],
                "CUDA is not available", tmp_path)
    (tmp_path / "folder.h5").mkdir()
    _user_error(capsys, [*base, "--out", str(tmp_path / "folder.h5")], "folder.h5 is a folder", tmp_path)
    _user_error(capsys, [*base, "--out", str(tmp_path / "y.h5"), "--n", "1000000000", "--labels"],
                "needs", tmp_path)  # terabytes: refused before anything is written


def test_generate_shards_then_merge_equal_one_run(tmp_path, capsys):
    base = ["phc", "generate", "--kind", "blob", "--n", "5", "--chunk", "2", *TINY_LABELS, "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "one.h5")]) == 0
    for i in range(2):
        assert main([*base, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}.h5")]) == 0
    assert main(["phc", "merge", str(tmp_path / "all.h5"), str(tmp_path / "s1.h5"), str(tmp_path / "s0.h5"),
                 "--no-progress"]) == 0
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "all.h5") as b:
        assert sorted(a) == sorted(b) and all(a[k][()].tobytes() == b[k][()].tobytes() for k in a)
        assert {k: v for k, v in b.attrs.items() if k != "merged_from"} == dict(a.attrs)
    _user_error(capsys, ["phc", "merge", str(tmp_path / "x.h5"), str(tmp_path / "s0.h5")], "shard 1/2 is missing",
                tmp_path)
    _user_error(capsys, ["phc", "merge", str(tmp_path / "x.h5"), str(tmp_path / "s0.h5"), str(tmp_path / "one.h5")],
                "one.h5: a whole data set, not a shard", tmp_path)
    (tmp_path / "junk.h5").write_text("not hdf5")
    _user_error(capsys, ["phc", "merge", str(tmp_path / "x.h5"), str(tmp_path / "junk.h5")], "junk.h5: not an HDF5",
                tmp_path)


def test_bands_of_a_file_cell(labelled, tmp_path, capsys):
    png = tmp_path / "fig" / "b.png"
    assert main(["phc", "bands", str(labelled), "--index", "2", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "the file's DOS label" in out and str(png) in out
    from essl.photonics.bands import run_bands
    from essl.photonics.dataset import open_dataset

    r = run_bands(labelled, 2, out=tmp_path / "b.svg")
    ds = open_dataset(labelled)
    np.testing.assert_array_equal(r["dos"], ds.dos[2])  # the file's own label
    np.testing.assert_array_equal(r["eps"], ds.eps[2])
    assert r["bands"].shape == (3 * 24 + 1, 10) and r["settings"]["kgrid"] == 4
    assert (tmp_path / "b.svg").read_text().lstrip().startswith("<?xml")


def test_bands_of_a_generated_cell_against_references(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # rods ε = 8.9, r = 0.2a (Joannopoulos et al., "Photonic Crystals", ch. 5): a TM gap between bands 1 and 2,
    # 0.322-0.443 (31%); the 32×32 staircase rod and |G| <= 5 move the edges by about 1%
    assert main(["phc", "bands", "--kind", "cylinder", "--option", "radius=0.2", "--option", "eps_in=8.9"]) == 0
    out = capsys.readouterr().out
    assert "bands 1–2" in out and "DOS computed" in out
    png = tmp_path / "cylinder-eps_in8.9-radius0.2-seed0-0-bands.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    from essl.photonics.bands import run_bands

    r = run_bands(kind="cylinder", options={"radius": 0.2, "eps_in": 8.9}, out=tmp_path / "r.png")
    gap = r["gap"]
    assert gap["below"] == 1 and abs(gap["bottom"] - 0.322) < 0.01 and abs(gap["top"] - 0.443) < 0.01
    assert 0.29 < gap["ratio"] < 0.33
    # a homogeneous cell: the empty lattice |k+G|/√ε along Γ–X–M–Γ, computed here from its definition
    h = run_bands(kind="cylinder", options={"eps_in": 4.0, "eps_out": 4.0}, out=tmp_path / "h.png", n_bands=6)
    from essl.photonics.pwe import kpath

    k = kpath(24)[0].numpy()
    g = np.array([(i, j) for i in range(-3, 4) for j in range(-3, 4)], dtype=np.float64)
    empty = np.sort(np.linalg.norm(k[:, None, :] + g[None], axis=-1), axis=1)[:, :6] / 2.0
    np.testing.assert_allclose(h["bands"], empty, atol=1e-9)
    assert h["gap"] is None


@pytest.mark.parametrize(("argv", "culprit"), [
    (["--index", "9"], "--index 9 is out of range"),
    (["--index", "-1"], "--index -1"),
    (["--kind", "blob"], "not both"),
    (["--out", "x.bogus"], "unknown figure format 'bogus'"),
    (["--n-bands", "0"], "--n-bands 0"),
    (["--cutoff", "1", "--n-bands", "10"], "exceeds the 5 plane waves"),
    (["--option", "radius=0.2"], "--option applies to a generated cell"),
])
def test_bands_user_errors(labelled, tmp_path, capsys, monkeypatch, argv, culprit):
    monkeypatch.chdir(tmp_path)
    _user_error(capsys, ["phc", "bands", str(labelled), *argv], culprit, tmp_path)


@pytest.mark.parametrize(("argv", "culprit"), [
    ([], "give either a data set FILE.h5 or --kind"),
    (["missing.h5"], "missing.h5: no such file"),
    (["--kind", "blob", "--option", "nosuch=1"], "'nosuch'"),
    (["--kind", "blob", "--seed", "-2"], "--seed -2"),
])
def test_bands_input_errors(tmp_path, capsys, monkeypatch, argv, culprit):
    monkeypatch.chdir(tmp_path)
    _user_error(capsys, ["phc", "bands", *argv], culprit, tmp_path)
