"""Bad input at the CLI (issues 6 and 12): every case exits 2 with exactly one stderr line naming the problem (the
file, key or value), no traceback, and nothing written (the files under ``tmp_path`` are the same before and
after, byte for byte); ``--debug`` raises instead.

The cases are a table; each builds its argv (and any bad file) under ``tmp_path``. Everything runs in-process
through :func:`essl.cli.main`, except one case that is also run as a real ``essl`` subprocess, to see every
line the process writes (in-process, pytest intercepts warnings and Lightning's log handler). Cases that need a
folder nobody may write in get one (a read-only tmpfs when running as root, whom file modes do not stop).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from essl.cli import main
from essl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SIMCLR = str(ROOT / "configs/digits/simclr.yaml")
E_SIMCLR = str(ROOT / "configs/digits/e-simclr.yaml")
PHC_SIMCLR = str(ROOT / "configs/photonics/levelset_simclr.yaml")
PHC_E_SIMCLR = str(ROOT / "configs/photonics/levelset_e-simclr.yaml")
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "data.batch_size=8", "progress=false",
        "backbone.kwargs.width=8", "method.kwargs.hidden_dim=32"]
HAS_PHC_REGRESSION = importlib.util.find_spec("essl.eval.phc_regression") is not None
N_MAPS = 4
MAP_SIDE = 32
N_BANDS, N_K = 10, 3
DOS_POINTS, TARGET_POINTS = 500, 400


# ---- bad files ------------------------------------------------------------------------------------------------
def _h5(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    return path


def _maps(n: int = N_MAPS, side: int = MAP_SIDE) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (1.0 + 19.0 * rng.random((n, side, side))).astype(np.float32)


def _labelled(n: int = N_MAPS) -> dict[str, np.ndarray]:
    """A labelled photonic-crystal file's datasets (``essl phc generate --labels`` layout), all valid."""
    eps = _maps(n)
    return {
        "eps": eps,
        "eps_avg": eps.mean(axis=(1, 2)),
        "bands": np.ones((n, N_K, N_BANDS), np.float32),
        "dos": np.ones((n, DOS_POINTS), np.float32),
        "target": np.zeros((n, TARGET_POINTS), np.float32),
    }


def _with_nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[a.size // 2] = np.nan
    return a


def _digits_run(tmp: Path, config: str = SIMCLR) -> list[str]:
    return ["pretrain", config, f"output_dir={tmp / 'run'}", *TINY]


def _phc_run(tmp: Path, data_path: Path | str, *extra: str) -> list[str]:
    return ["pretrain", PHC_SIMCLR, f"output_dir={tmp / 'run'}", f"data.path={data_path}", "data.batch_size=2",
            "progress=false", "backbone.kwargs.width=0.125", "method.kwargs.hidden_dim=32", *extra]


def _phc_essl(tmp: Path, *extra: str) -> list[str]:
    """E-SimCLR on photonic maps with extra overrides (the data file is never reached: config errors come first)."""
    return ["pretrain", PHC_E_SIMCLR, f"output_dir={tmp / 'run'}", f"data.path={tmp / 'never-read.h5'}", *extra]


def _regress(tmp: Path, train: Path) -> list[str]:
    test = _h5(tmp / "test.h5", **_labelled())
    return ["phc", "regress", "none", "--train", str(train), "--test", str(test), "--n-labels", "2",
            "--seeds", "1", "--no-progress"]


def _malformed_yaml(tmp: Path) -> list[str]:
    bad = tmp / "malformed.yaml"
    bad.write_text("data:\n  batch_size: [1,\n")
    return ["pretrain", str(bad)]


def _file_unknown_key(tmp: Path) -> list[str]:
    cfg = tmp / "typo.yaml"
    cfg.write_text("trainer:\n  max_epoch: 3\n")
    return ["pretrain", str(cfg), f"output_dir={tmp / 'run'}"]


def _file_wrong_type(tmp: Path) -> list[str]:
    cfg = tmp / "wrongtype.yaml"
    cfg.write_text("data:\n  batch_size: many\n")
    return ["pretrain", str(cfg), f"output_dir={tmp / 'run'}"]


def _empty_folder(tmp: Path) -> list[str]:
    (tmp / "imgs" / "cat").mkdir(parents=True)
    (tmp / "imgs" / "cat" / "notes.txt").write_text("not an image")
    return [*_digits_run(tmp), "data.name=folder", f"data.path={tmp / 'imgs'}"]


def _encoder_file(tmp: Path, make: Callable[[Path], None]) -> list[str]:
    path = tmp / "encoder.pt"
    make(path)
    return ["probe", str(path), "--seeds", "1", "--no-progress"]


def _foreign_pt(path: Path) -> None:
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)  # a plain state_dict, not an essl encoder file


def _truncated_pt(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "backbone": {"name": "small_cnn"}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


READ_ONLY: dict[str, Path] = {}  # "dir": a folder no process can write in (the read_only_dir fixture)
NO_GPU = not torch.cuda.is_available()


def _tiny_encoder(tmp: Path, config: dict, name: str = "encoder.pt", size: int = MAP_SIDE) -> Path:
    """An untrained phc_cnn encoder file whose stored config says what it was pretrained on."""
    from essl.backbones import build_backbone
    from essl.encoder import export_encoder

    net, dim = build_backbone("phc_cnn", 1, width=0.125)
    return export_encoder(tmp / name, net, "phc_cnn", {"width": 0.125}, dim, 1, size, (1.0,), (19.0,), config)


def _small_digits_encoder(tmp: Path) -> Path:
    """An untrained small_cnn digits encoder (1 channel, 32x32: the shape of a photonic map)."""
    from essl.backbones import build_backbone
    from essl.encoder import export_encoder

    net, dim = build_backbone("small_cnn", 1, width=4)
    return export_encoder(tmp / "digits.pt", net, "small_cnn", {"width": 4}, dim, 1, MAP_SIDE, (0.3,), (0.4,),
                          {"data": {"name": "digits", "path": None}})


def _probe(tmp: Path, *extra: str) -> list[str]:
    enc = _small_digits_encoder(tmp)
    return ["probe", str(enc), "--seeds", "1", "--no-progress", *extra]


def _regress_with(tmp: Path, *extra: str, encoder: str = "none") -> list[str]:
    train = _h5(tmp / "train.h5", **_labelled())
    argv = _regress(tmp, train)
    argv[2] = encoder
    argv[argv.index("--n-labels") + 1] = str(N_MAPS - 1)  # enough for the validation split: the later checks run
    return [*argv, *extra]


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _a_file(tmp: Path) -> Path:
    return _write(tmp / "afile", b"not a folder")


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path], list[str]]
    needles: tuple[str, ...]  # each must appear in the one stderr line ("{tmp}" stands for tmp_path)
    regression: bool = False  # needs essl.eval.phc_regression
    read_only: bool = False  # needs READ_ONLY["dir"]
    skip: str = ""  # a reason to skip on this machine


CASES = [
    Case("malformed yaml", _malformed_yaml, ("malformed.yaml", "line 3")),
    Case("unknown key in file", _file_unknown_key, ("trainer.max_epoch",)),
    Case("unknown key override", lambda t: [*_digits_run(t), "optimm.lr=1"], ("optimm",)),
    Case("unknown nested key override", lambda t: [*_digits_run(t), "trainer.max_epoch=1"],
         ("trainer.max_epoch",)),
    Case("wrong type in file", _file_wrong_type, ("data.batch_size", "many")),
    Case("wrong type override", lambda t: [*_digits_run(t), "trainer.max_epochs=lots"],
         ("trainer.max_epochs", "lots")),
    Case("wrong bool override", lambda t: [*_digits_run(t), "resume=maybe"], ("resume", "maybe")),
    Case("bad choice override", lambda t: [*_digits_run(t), "method.name=moco"], ("method.name", "moco")),
    Case("override without =", lambda t: [*_digits_run(t), "trainer.max_epochs"], ("trainer.max_epochs",)),
    Case("missing config file", lambda t: ["pretrain", str(t / "nope.yaml")], ("{tmp}/nope.yaml",)),
    # contradictory invariance / equivariance settings (issue 10): refused before any work
    Case("eq input ops merge rotations (the old photonics bug)",
         lambda t: _phc_essl(t, "equivariance.lattice=[shift,flip4]"),
         ("equivariance.lattice", "equivariance.group", "rot4", "indistinguishable", "0 and 2")),
    Case("eq input three-way flip merges rotations", lambda t: _phc_essl(t, "equivariance.lattice=[flip3]"),
         ("equivariance.lattice", "indistinguishable")),
    Case("eq input shifts merge translations",
         lambda t: _phc_essl(t, "equivariance.group=translate", "equivariance.lattice=[shift]"),
         ("equivariance.lattice", "translate", "indistinguishable")),
    Case("crop view flips before predicting flips",
         lambda t: [*_digits_run(t, E_SIMCLR), "equivariance.group=flip4", "augment.hflip_prob=0.5"],
         ("augment.hflip_prob", "equivariance.group", "flip4", "indistinguishable")),
    Case("crop view on unit cells", lambda t: _phc_essl(t, "equivariance.view=crop"), ("equivariance.view",)),
    Case("unit cells without lattice views", lambda t: _phc_essl(t, "augment.lattice=[]"), ("augment.lattice",)),
    Case("crop larger than the image", lambda t: [*_digits_run(t, E_SIMCLR), "equivariance.crop_size=40"],
         ("equivariance.crop_size", "40")),
    Case("unknown method parameter", lambda t: [*_digits_run(t), "method.kwargs.temp=0.3"],
         ("method.kwargs.temp", "simclr")),
    Case("bad method value", lambda t: [*_digits_run(t), "method.kwargs.temperature=0"],
         ("method.kwargs", "temperature")),
    Case("old method key", lambda t: [*_digits_run(t), "method.temperature=0.3"],
         ("method.temperature", "method.kwargs.temperature")),
    Case("missing encoder.pt", lambda t: ["probe", str(t / "absent" / "encoder.pt"), "--no-progress"],
         ("{tmp}/absent/encoder.pt",)),
    Case("foreign .pt", lambda t: _encoder_file(t, _foreign_pt), ("{tmp}/encoder.pt", "not an essl encoder")),
    Case("truncated .pt", lambda t: _encoder_file(t, _truncated_pt), ("{tmp}/encoder.pt",)),
    Case("garbage .pt", lambda t: _encoder_file(t, lambda p: p.write_bytes(b"\x00garbage" * 100)),
         ("{tmp}/encoder.pt",)),
    Case("image size too small for phc_cnn (digits)",
         lambda t: [*_digits_run(t), "backbone.name=phc_cnn", "backbone.kwargs.width=0.125", "data.image_size=16"],
         ("16x16", "backbone")),
    Case("16x16 photonic maps for phc_cnn",
         lambda t: _phc_run(t, _h5(t / "small.h5", eps=_maps(side=16))), ("16x16", "backbone")),
    Case("empty dataset folder", _empty_folder, ("{tmp}/imgs", "no images")),
    Case("missing data folder", lambda t: [*_digits_run(t), "data.name=folder", f"data.path={t / 'no_such_dir'}"],
         ("{tmp}/no_such_dir",)),
    Case("missing data path (phc)", lambda t: _phc_run(t, t / "absent.h5"), ("{tmp}/absent.h5",)),
    Case("phc without data.path", lambda t: _phc_run(t, "null"), ("data.path",)),
    Case("not an HDF5 file", lambda t: _phc_run(t, _write(t / "fake.h5", b"plain text")),
         ("{tmp}/fake.h5", "not an HDF5")),
    Case("HDF5 wrong shape", lambda t: _phc_run(t, _h5(t / "shape.h5", eps=_maps()[:, :, :16])),
         ("{tmp}/shape.h5", "eps", "shape")),
    Case("HDF5 1-d eps", lambda t: _phc_run(t, _h5(t / "flat.h5", eps=_maps().reshape(-1))),
         ("{tmp}/flat.h5", "eps", "shape")),
    Case("HDF5 with NaN", lambda t: _phc_run(t, _h5(t / "nan.h5", eps=_with_nan(_maps()))),
         ("{tmp}/nan.h5", "NaN")),
    Case("HDF5 missing dataset", lambda t: _phc_run(t, _h5(t / "noeps.h5", maps=_maps())),
         ("{tmp}/noeps.h5", "eps")),
    Case("phc regress: target wrong shape",
         lambda t: _regress(t, _h5(t / "train.h5", **(_labelled() | {"target": np.zeros((N_MAPS, 7), np.float32)}))),
         ("{tmp}/train.h5", "target", "shape"), regression=True),
    Case("phc regress: NaN target",
         lambda t: _regress(t, _h5(t / "train.h5", **(_labelled() | {"target": _with_nan(_labelled()["target"])}))),
         ("{tmp}/train.h5", "target", "NaN"), regression=True),
    Case("phc regress: missing target",
         lambda t: _regress(t, _h5(t / "train.h5", **{k: v for k, v in _labelled().items() if k != "target"})),
         ("{tmp}/train.h5", "target"), regression=True),
    Case("phc regress: missing train file", lambda t: _regress(t, t / "absent.h5"), ("{tmp}/absent.h5",),
         regression=True),
    # ---- issue 12: values checked in the schema, before any work ------------------------------------------------
    Case("translate grid does not divide the crop",
         lambda t: [*_digits_run(t, E_SIMCLR), "data.image_size=24", "equivariance.group=translate",
                    "equivariance.grid=3", "equivariance.crop_size=16"],
         ("equivariance.grid", "3", "equivariance.crop_size 16")),
    Case("cuda without a GPU", lambda t: [*_digits_run(t), "trainer.accelerator=cuda"],
         ("trainer.accelerator", "cuda", "no CUDA GPU"), skip="" if NO_GPU else "this machine has a GPU"),
    Case("unknown accelerator", lambda t: [*_digits_run(t), "trainer.accelerator=quantum"],
         ("trainer.accelerator", "quantum")),
    Case("devices not a number", lambda t: [*_digits_run(t), "trainer.devices=abc"], ("trainer.devices", "abc")),
    Case("zero devices", lambda t: [*_digits_run(t), "trainer.devices=0"], ("trainer.devices", "'0'")),
    Case("unknown precision", lambda t: [*_digits_run(t), "trainer.precision=bogus"],
         ("trainer.precision", "bogus", "32-true")),
    Case("negative learning rate", lambda t: [*_digits_run(t), "optim.lr=-1"], ("optim.lr", "-1")),
    Case("momentum of 1 or more", lambda t: [*_digits_run(t), "optim.momentum=1.5"], ("optim.momentum", "1.5")),
    Case("negative weight decay", lambda t: [*_digits_run(t), "optim.weight_decay=-0.1"], ("optim.weight_decay",)),
    Case("zero temperature (old key)", lambda t: [*_digits_run(t), "method.temperature=0"],
         ("method.temperature", "method.kwargs.temperature")),
    Case("log every 0 steps", lambda t: [*_digits_run(t), "trainer.log_every_n_steps=0"],
         ("trainer.log_every_n_steps", "0")),
    Case("negative checkpoint interval", lambda t: [*_digits_run(t), "trainer.checkpoint_every_n_steps=-1"],
         ("trainer.checkpoint_every_n_steps", "-1")),
    Case("fraction of batches above 1", lambda t: [*_digits_run(t), "trainer.limit_train_batches=1.5"],
         ("trainer.limit_train_batches", "1.5")),
    Case("negative seed", lambda t: [*_digits_run(t), "seed=-1"], ("seed", "-1")),
    Case("negative num_workers", lambda t: [*_digits_run(t), "data.num_workers=-2"], ("data.num_workers", "-2")),
    Case("unknown logger", lambda t: [*_digits_run(t), "trainer.logger=wandb"], ("trainer.logger", "wandb")),
    Case("image smaller than the equivariance crop", lambda t: [*_digits_run(t, E_SIMCLR), "data.image_size=8"],
         ("equivariance.crop_size", "16", "data.image_size 8")),
    Case("64x64 photonic maps for phc_cnn",
         lambda t: _phc_run(t, _h5(t / "big.h5", eps=_maps(side=64))), ("64x64", "too large", "phc_cnn")),
    # ---- output paths, checked before any work ------------------------------------------------------------------
    Case("output_dir is a file", lambda t: ["pretrain", SIMCLR, f"output_dir={_a_file(t)}", *TINY],
         ("output_dir", "{tmp}/afile", "is a file")),
    Case("output_dir under a file", lambda t: ["pretrain", SIMCLR, f"output_dir={_a_file(t) / 'run'}", *TINY],
         ("output_dir", "{tmp}/afile", "not a folder")),
    Case("output_dir read-only", lambda t: ["pretrain", SIMCLR, f"output_dir={READ_ONLY['dir'] / 'run'}", *TINY],
         ("output_dir", "read-only"), read_only=True),
    Case("probe --json is a folder", lambda t: _probe(t, "--json", str(t)), ("--json", "{tmp}", "is a folder")),
    Case("probe --json read-only", lambda t: _probe(t, "--json", str(READ_ONLY["dir"] / "p.json")),
         ("--json", "read-only"), read_only=True),
    Case("bench --json is a folder", lambda t: ["bench", "pipeline", "--quick", "--json", str(t)],
         ("--json", "{tmp}", "is a folder")),
    Case("bench --device cuda without a GPU", lambda t: ["bench", "pipeline", "--quick", "--device", "cuda"],
         ("--device", "cuda", "not available"), skip="" if NO_GPU else "this machine has a GPU"),
    Case("phc regress --json is a folder", lambda t: _regress_with(t, "--json", str(t)),
         ("--json", "{tmp}", "is a folder"), regression=True),
    Case("phc regress --json read-only", lambda t: _regress_with(t, "--json", str(READ_ONLY["dir"] / "r.json")),
         ("--json", "read-only"), regression=True, read_only=True),
    Case("phc regress --figure is a folder", lambda t: _regress_with(t, "--figure", str(_folder(t / "fig.png"))),
         ("--figure", "{tmp}/fig.png", "is a folder"), regression=True),
    Case("phc regress none --no-scratch", lambda t: _regress_with(t, "--no-scratch"),
         ("--no-scratch", "none", "nothing to train"), regression=True),
    Case("phc regress with a digits encoder",
         lambda t: _regress_with(t, encoder=str(_small_digits_encoder(t))),
         ("{tmp}/digits.pt", "digits", "photonic"), regression=True),
    # ---- the wrong messages of issue 12 -------------------------------------------------------------------------
    Case("probe of a photonics encoder",
         lambda t: ["probe", str(_tiny_encoder(t, {"data": {"name": "phc", "path": str(t / "cells.h5")}})),
                    "--no-progress"], ("{tmp}/cells.h5", "photonic", "phc regress")),
    Case("probe --data FILE.h5", lambda t: _probe(t, "--data", str(_h5(t / "maps.h5", eps=_maps()))),
         ("--data", "{tmp}/maps.h5", "photonic")),
    Case("probe --data mnist (no such dataset)", lambda t: _probe(t, "--data", "mnist"),
         ("mnist", "digits", "cifar10")),
    # ---- essl show ----------------------------------------------------------------------------------------------
    Case("show a missing folder", lambda t: ["show", str(t / "nope")], ("{tmp}/nope", "not found")),
    Case("show a folder that is not a run", lambda t: ["show", str(t)], ("{tmp}", "not an essl run")),
    Case("show --plot with an unknown format", lambda t: ["show", str(t), "--plot", str(t / "c.xyz")],
         ("--plot", "xyz")),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _check_one_line(err: str, needles: tuple[str, ...], tmp: Path) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("essl: error: "), line
    assert "Traceback" not in err
    for needle in needles:
        assert needle.replace("{tmp}", str(tmp)) in line, f"{needle!r} not in {line!r}"


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A folder nobody can write in: mode 0555, or for root (whom modes do not stop) a read-only tmpfs."""
    folder = tmp_path_factory.mktemp("read_only")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                       capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only folder as root (mounting a read-only tmpfs failed)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys, request):
    if case.regression and not HAS_PHC_REGRESSION:
        pytest.skip("essl.eval.phc_regression is not there")
    if case.skip:
        pytest.skip(case.skip)
    if case.read_only:
        READ_ONLY["dir"] = request.getfixturevalue("read_only_dir")
    argv = case.argv(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    _check_one_line(captured.err, case.needles, tmp_path)
    assert _snapshot(tmp_path) == before, "a refused command wrote or removed files"
    if case.read_only:
        assert not any(READ_ONLY["dir"].iterdir())


@pytest.mark.parametrize("name", ["unknown key override", "foreign .pt", "HDF5 with NaN"])
def test_debug_shows_the_traceback(name, tmp_path):
    case = next(c for c in CASES if c.name == name)
    argv = case.argv(tmp_path)
    with pytest.raises(UserError) as info:
        main(["--debug", *argv])
    assert info.traceback  # the exception propagates with its traceback instead of a one-liner
    for needle in case.needles:
        assert needle.replace("{tmp}", str(tmp_path)) in str(info.value)


def test_bad_input_subprocess_prints_exactly_one_line(tmp_path):
    """The real console process: nothing else (warnings, Lightning banners) reaches stderr, no traceback."""
    case = next(c for c in CASES if c.name == "16x16 photonic maps for phc_cnn")  # reaches the Trainer
    argv = case.argv(tmp_path)
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-m", "essl.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    _check_one_line(proc.stderr, case.needles, tmp_path)
    assert proc.stdout == ""
