"""Photonics end to end through the CLI: generate labelled cells, pretrain E-SimCLR on ε maps, regress the DOS.
Also: the lattice transformations' labels are exact on real permittivity maps."""

import json
from pathlib import Path

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
