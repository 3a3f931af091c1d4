"""Precision (issue 13, item 3): ``bf16-true`` / ``16-true`` run (views cast to the model's dtype, made in float32),
the precision actually used on this machine, TF32 matmuls on GPUs, and the CIFAR-10 configs' precision."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from essl.cli import main
from essl.config import load_config
from essl.data import LabelledData
from essl.module import resolve_precision
from essl.pretrain import build_module

ROOT = Path(__file__).resolve().parents[1]
RECOMMENDED = "bf16-mixed"  # README, "Scaling out": bf16 autocast (fp16 where a GPU has no bf16)
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "progress=false", "data.batch_size=16",
        "backbone.kwargs.width=4", "method.kwargs.hidden_dim=16", "equivariance.hidden_dim=16", "eval.knn_monitor=true"]


def _module(config: str = "configs/digits/e-byol.yaml"):
    cfg = load_config(ROOT / config, ["backbone.kwargs.width=4", "method.kwargs.hidden_dim=16",
                                      "equivariance.hidden_dim=16"])
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(8, dtype=torch.long)
    module, _ = build_module(cfg, LabelledData("tiny", x, y, x, y, 10, mean=(0.5,), std=(0.25,)), 8)
    return module, x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_true_half_precision_casts_the_views_and_keeps_augmentation_in_float32(dtype):
    """What Lightning's ``bf16-true`` / ``16-true`` do (``module.to(dtype)``, uint8 batches untouched): the views
    and the equivariance batch come out in the model's dtype, the view maker and its kornia samplers stay float32,
    and the step runs (the step-1 crash of the issue: float32 views meeting half weights)."""
    module, x = _module()
    module = module.to(dtype).train()
    assert module.compute_dtype() == dtype
    assert all(b.dtype == torch.float32 for b in module.view_maker.buffers() if b.is_floating_point())
    assert module.input_norm.mean.dtype == torch.float32
    kornia_ops = [op for op in module.view_maker.modules() if hasattr(op, "set_rng_device_and_dtype")]
    assert kornia_ops and all(op.dtype == torch.float32 for op in kornia_ops)
    batch = module.make_training_batch(x)
    assert all(v.dtype == dtype for v in batch["views"]) and batch["x_eq"].dtype == dtype
    if dtype == torch.bfloat16:  # CPU convolutions have no fp16 kernels everywhere; bf16 ones they have
        out = module.losses(batch)
        out["loss"].backward()
        assert torch.isfinite(out["loss"].float())


def test_float32_views_are_not_cast():
    module, x = _module()
    batch = module.train().make_training_batch(x)
    assert all(v.dtype == torch.float32 for v in batch["views"])


def test_bf16_true_pretrains_on_cpu(tmp_path, capsys):
    """End to end: ``trainer.precision=bf16-true`` trains, monitors kNN and exports (the encoder loads)."""
    import essl

    run = tmp_path / "run"
    assert main(["pretrain", str(ROOT / "configs/digits/e-simclr.yaml"), f"output_dir={run}",
                 "trainer.precision=bf16-true", *TINY]) == 0
    encoder = essl.load_encoder(run / "encoder.pt")
    assert torch.isfinite(encoder(torch.rand(2, 1, 32, 32))).all()
    assert "val/knn_acc" in (run / "metrics.csv").read_text()


@pytest.mark.parametrize("requested, cuda, bf16, used", [
    ("16-mixed", False, False, "32-true"),
    ("16-true", False, False, "32-true"),
    ("bf16-mixed", False, False, "32-true"),
    ("bf16-true", False, False, "bf16-true"),  # runs on a CPU as asked
    ("32-true", False, False, "32-true"),
    ("bf16-mixed", True, True, "bf16-mixed"),
    ("bf16-mixed", True, False, "16-mixed"),  # a GPU without bf16 (V100, T4)
    ("bf16-true", True, False, "16-true"),
    ("16-mixed", True, False, "16-mixed"),
])
def test_precision_used(requested, cuda, bf16, used, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    precision, note = resolve_precision(requested, cuda=cuda)
    assert precision == used
    assert (note is None) == (used == requested)
    if note:
        assert f"trainer.precision={requested}" in note and used in note


def test_cifar_configs_use_the_recommended_precision():
    for path in sorted((ROOT / "configs/cifar10").glob("*.yaml")):
        assert load_config(path, ["data.path=/x"]).trainer.precision == RECOMMENDED, path.name


def test_float32_matmul_precision_is_set_on_gpus_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    module, _ = _module()
    for device in ("cpu", "cuda"):
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), world_size=1)
        module.setup("fit")
    assert calls == ["high"]  # the config default, on the GPU only
    cfg = load_config(ROOT / "configs/digits/e-simclr.yaml", ["trainer.float32_matmul_precision=highest"])
    assert cfg.trainer.float32_matmul_precision == "highest"
    assert main(["pretrain", str(ROOT / "configs/digits/e-simclr.yaml"), "trainer.float32_matmul_precision=tf32"]) == 2
