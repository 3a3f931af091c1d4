"""The `essl` CLI end to end on tiny digits runs, and its one-line errors with exit code 2."""

import json
from pathlib import Path

import pytest
import torch

from essl.cli import main

ROOT = Path(__file__).resolve().parents[1]
E_SIMCLR = str(ROOT / "configs/digits/e-simclr.yaml")
TINY = ["trainer.max_epochs=2", "trainer.limit_train_batches=3", "data.batch_size=32", "progress=false",
        "backbone.kwargs.width=8", "equivariance.hidden_dim=32", "method.kwargs.hidden_dim=32"]


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_pretrain_then_probe_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", E_SIMCLR, f"output_dir={run}", *TINY]) == 0
    for name in ("config.yaml", "metrics.csv", "last.ckpt", "encoder.pt"):
        assert (run / name).is_file(), name
    payload = torch.load(run / "encoder.pt", weights_only=True)
    assert set(payload) == {"state_dict", "backbone", "feature_dim", "input", "config", "essl_version"}
    assert payload["input"]["channels"] == 1 and payload["input"]["size"] == 32

    out_json = tmp_path / "probe.json"
    assert main(["probe", str(run / "encoder.pt"), "--seeds", "2", "--json", str(out_json), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "raw pixels" in printed.lower() and "random" in printed.lower()
    result = json.loads(out_json.read_text())
    assert result["data"] == "digits" and result["encoder"] == str(run / "encoder.pt")
    for entry in (result["linear"], result["knn"], *[b[k] for b in result["baselines"].values() for k in b]):
        assert 0.0 <= entry["mean"] <= 1.0 and len(entry["per_seed"]) in (1, 2)
    assert set(result["baselines"]) == {"raw_pixels", "random_init"}

    # a finished run refuses to be overwritten; resume=true continues it and says so
    assert main(["pretrain", E_SIMCLR, f"output_dir={run}", *TINY]) == 2
    assert "resume=true" in _err(capsys)
    assert main(["pretrain", E_SIMCLR, f"output_dir={run}", "resume=true", *TINY]) == 0
    assert "resuming" in _err(capsys)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.batchsize=3"], "data.batchsize"),
        (["data.batch_size=many"], "data.batch_size"),
        (["optimm.lr=1"], "optimm"),
        (["method.name=moco"], "method.name"),
        (["data.name=cifar10", "data.path=/no/such/dir"], "/no/such/dir"),
        (["data.name=folder", "data.path=/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_config_exits_2_naming_the_key(overrides, needle, tmp_path, capsys):
    assert main(["pretrain", E_SIMCLR, f"output_dir={tmp_path / 'r'}", *overrides]) == 2
    err = _err(capsys)
    assert needle in err and len(err.splitlines()) == 1


def test_config_file_errors(tmp_path, capsys):
    assert main(["pretrain", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in _err(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_size: [1,\n")
    assert main(["pretrain", str(bad)]) == 2
    err = _err(capsys)
    assert "bad.yaml" in err and "line" in err and len(err.splitlines()) == 1
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 3\n")
    assert main(["pretrain", str(typo)]) == 2
    assert "trainer.max_epoch" in _err(capsys)


def test_empty_image_folder_exits_2(tmp_path, capsys):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    assert main(["pretrain", E_SIMCLR, "data.name=folder", f"data.path={tmp_path / 'imgs'}",
                 f"output_dir={tmp_path / 'r'}"]) == 2
    assert "no images" in _err(capsys)


def test_probe_missing_or_foreign_encoder_exits_2(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in _err(capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert main(["probe", str(foreign)]) == 2
    assert "not an essl encoder" in _err(capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["probe", str(garbage)]) == 2
    assert "garbage.pt" in _err(capsys)


def test_help_exits_0(capsys):
    for argv in (["--help"], ["pretrain", "--help"], ["probe", "--help"], ["phc", "generate", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
