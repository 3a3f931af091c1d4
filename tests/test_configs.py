"""Every YAML in configs/ loads in struct mode and runs one training step on CPU with tiny inputs."""

from pathlib import Path

import pytest
import torch

from essl.config import load_config
from essl.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
IMAGE_CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))
IMAGE_CONFIGS = [p for p in IMAGE_CONFIGS if p.parent.name != "photonics"]
PHC_CONFIGS = sorted((ROOT / "configs" / "photonics").glob("*.yaml"))
TINY = ["data.name=digits", "data.path=null", "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.log_every_n_steps=1", "progress=false",
        "equivariance.crop_size=8",
        "eval.knn_monitor=false"]
SMALL_HEADS = ["equivariance.hidden_dim=64", "method.kwargs.hidden_dim=64", "method.kwargs.output_dim=32"]


def test_there_are_configs_for_every_method():
    names = {f"{p.parent.name}/{p.stem}" for p in IMAGE_CONFIGS}
    for ds in ("digits", "cifar10"):
        assert {f"{ds}/{m}" for m in ("simclr", "e-simclr", "byol", "e-byol")} <= names


@pytest.mark.parametrize("path", IMAGE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_runs_one_step(path, tmp_path):
    cfg = load_config(path, TINY + SMALL_HEADS + [f"output_dir={tmp_path / 'run'}"])  # one step: small heads
    assert cfg.name  # every config names its run
    encoder = pretrain(cfg)
    assert encoder.is_file() and (tmp_path / "run" / "last.ckpt").is_file()
    payload = torch.load(encoder, weights_only=True)
    assert payload["backbone"]["name"] == cfg.backbone.name
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    assert "train/ssl_loss" in metrics
    assert ("train/equi_loss" in metrics) == (cfg.equivariance.weight > 0)


def test_cifar_configs_follow_the_paper_recipe():
    cfg = load_config(ROOT / "configs/cifar10/e-simclr.yaml", ["data.path=/x"])
    assert cfg.data.batch_size == 512 and cfg.trainer.max_epochs == 800
    assert cfg.optim.lr == 0.06 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert cfg.optim.warmup_epochs == 10 and cfg.method.kwargs.temperature == 0.5
    assert cfg.equivariance.weight == 0.4 and cfg.equivariance.crop_size == 16
    assert list(cfg.equivariance.crop_scale) == [0.2, 1.0]
    assert cfg.equivariance.view == "crop" and cfg.equivariance.norm == "layernorm"
    base = load_config(ROOT / "configs/cifar10/simclr.yaml", ["data.path=/x"])
    assert base.optim.lr == 0.03 and base.equivariance.weight == 0.0
    for c in (cfg, base):  # rdangovs/essl cifar10/main.py: info_nce_loss, ProjectionMLP(512, 2048, 2048), 2 passes
        k = c.method.kwargs
        assert (k.negatives, k.projector_final_norm, k.separate_passes) == ("cross_view", "bn_noaffine", True)
        assert (k.hidden_dim, k.output_dim) == (2048, 2048)


def test_cifar_reference_projector_and_heads():
    """The modules the paper config builds have the reference's shapes: projector Linear(512, 2048, no bias) +
    BN + ReLU + Linear(2048, 2048, no bias) + BN(2048, affine=False); rotation head 512 → 2048 → 2048 → 4 with
    LayerNorm (rdangovs/essl cifar10/main.py)."""
    from torch import nn

    from essl.data import LabelledData
    from essl.pretrain import build_module

    cfg = load_config(ROOT / "configs/cifar10/e-simclr.yaml", TINY + ["data.name=cifar10"])
    x = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    module, _ = build_module(cfg, LabelledData("tiny", x, y, x, y, 10, mean=(0.5,) * 3, std=(0.25,) * 3), 512)
    proj = list(module.method.projection.layers)
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert proj[0].bias is None and proj[3].bias is None and (proj[0].in_features, proj[3].out_features) == (512, 2048)
    assert proj[1].affine and not proj[4].affine
    head = list(module.equivariance.head)
    assert [type(m) for m in head] == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (512, 2048, 4)


def test_knn_monitor_logs_validation_accuracy(tmp_path):
    cfg = load_config(ROOT / "configs/digits/simclr.yaml", TINY[:-1] + ["eval.knn_monitor=true", "eval.knn_k=20",
                                                                       f"output_dir={tmp_path / 'run'}"])
    pretrain(cfg)
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("val/knn_acc")
    values = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    assert len(values) == 1 and 0.1 < values[0] <= 1.0  # above chance (10 classes) even after one step


@pytest.fixture(scope="module")
def phc_file(tmp_path_factory):
    from essl.photonics.dataset import generate

    out = tmp_path_factory.mktemp("phc") / "cells.h5"
    generate(out, "levelset", 16, labels=False, seed=0, progress=False)
    return out


def test_photonics_configs_exist():
    names = {p.stem for p in PHC_CONFIGS}
    assert names == {f"{k}_{m}" for k in ("blob", "levelset") for m in ("simclr", "simclr-invariant", "e-simclr")}


@pytest.mark.parametrize("path", PHC_CONFIGS, ids=lambda p: p.stem)
def test_photonics_config_runs_one_step(path, phc_file, tmp_path):
    cfg = load_config(path, [f"data.path={phc_file}", "data.batch_size=4", "trainer.max_epochs=1",
                             "trainer.limit_train_batches=1", "trainer.log_every_n_steps=1", "progress=false",
                             "backbone.kwargs.width=0.125", f"output_dir={tmp_path / 'run'}"])
    assert cfg.method.kwargs.temperature == 0.1
    assert cfg.equivariance.weight in (0.0, 5.0)
    payload = torch.load(pretrain(cfg), weights_only=True)
    assert payload["input"] == {"channels": 1, "size": 32, "mean": [1.0], "std": [19.0]}


def test_photonics_configs_follow_the_reference():
    """rdangovs/essl photonics: load_config.py (views per dataset and arm), main.py (SGD 0.9, lr 1e-3, no weight
    decay, batch 256, cosine without warm-up), ssl_mode.py/phc_models.py (projector 1024 → 512 → 512 → 256 with
    BatchNorm, head 1024 → 512 → 512 → 4 with BatchNorm, encoder without BatchNorm in its FC part)."""
    from torch import nn

    from essl.data import LabelledData
    from essl.pretrain import build_module

    views = {"blob_simclr": ["flip3", "rot4"], "blob_e-simclr": ["flip3", "rot4"],
             "blob_simclr-invariant": ["halfshift", "flip3", "rot4"], "levelset_simclr": ["shift", "flip3"],
             "levelset_e-simclr": ["shift", "flip3"], "levelset_simclr-invariant": ["shift", "flip3", "rot4"]}
    x = torch.ones(4, 1, 32, 32)
    y = torch.zeros(4, dtype=torch.long)
    data = LabelledData("tiny", x, y, x[:0], y[:0], 0, mean=(1.0,), std=(19.0,))
    for path in PHC_CONFIGS:
        cfg = load_config(path, ["data.path=/x.h5"])
        assert list(cfg.augment.lattice) == views[path.stem], path.stem
        o = cfg.optim
        settings = (o.name, o.lr, o.momentum, o.weight_decay, o.warmup_epochs, o.scale_lr)
        assert settings == ("sgd", 1e-3, 0.9, 0, 0, False)
        assert cfg.data.batch_size == 256 and cfg.method.kwargs.temperature == 0.1
        module, _ = build_module(cfg, data, 256)
        assert not any(isinstance(m, nn.BatchNorm1d) for m in module.backbone.modules())
        proj = [m for m in module.method.projection.layers if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in proj] == [(1024, 512), (512, 512), (512, 256)]
        if cfg.equivariance.weight > 0:
            e = cfg.equivariance
            assert (e.weight, e.view, list(e.lattice), e.mode) == (5.0, "raw", [], "all")
            assert e.group == ("translate" if path.stem.startswith("blob") else "rot4")
            head = list(module.equivariance.head)
            assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
            assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (1024, 512, 4)


@pytest.mark.parametrize("compile_", [False, True])
def test_trainer_compile_compiles_the_online_backbone_in_place(compile_):
    """Opt-in torch.compile: the online backbone's forward is compiled in place (compilation itself is lazy, on
    the first call), BYOL's momentum copy is made before it, and the parameter names that checkpoints and exported
    encoders rely on do not change."""
    from essl.data import LabelledData
    from essl.pretrain import build_module

    cfg = load_config(ROOT / "configs" / "digits" / "e-byol.yaml", TINY + [f"trainer.compile={compile_}"])
    x = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    data = LabelledData("tiny", x, y, x, y, 10, mean=(0.5,), std=(0.25,))
    module, _ = build_module(cfg, data, 8)
    plain, _ = build_module(load_config(ROOT / "configs" / "digits" / "e-byol.yaml", TINY), data, 8)
    assert (module.backbone._compiled_call_impl is not None) == compile_
    assert module.method.target_backbone._compiled_call_impl is None
    assert list(module.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("channels_last", [False, True])
def test_views_follow_the_backbone_memory_format(channels_last):
    """With a channels-last backbone the views and the equivariance batch are made channels-last too (7% faster
    E-SimCLR steps with ResNet-18 on CPU); the values do not depend on the layout."""
    from essl.data import LabelledData
    from essl.pretrain import build_module

    cfg = load_config(ROOT / "configs" / "cifar10" / "e-simclr.yaml",
                      TINY + ["data.name=cifar10", "backbone.name=small_cnn", f"trainer.channels_last={channels_last}"])
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    data = LabelledData("tiny", x, y, x, y, 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    module, _ = build_module(cfg, data, 4)
    torch.manual_seed(0)
    batch = module.make_training_batch(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert all(v.is_contiguous(memory_format=fmt) for v in [*batch["views"], batch["x_eq"]])
    module.memory_format = torch.contiguous_format
    torch.manual_seed(0)
    plain = module.make_training_batch(x)
    for a, b in zip([*batch["views"], batch["x_eq"]], [*plain["views"], plain["x_eq"]], strict=True):
        assert torch.equal(a, b)
