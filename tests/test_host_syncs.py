"""No host syncs in the training step (issue 13, item 4).

1. The counter (:class:`essl.eval.bench.HostSyncCounter`) against reads written on purpose: each kind of blocking
   device→host read of a device tensor counts once, reads of host tensors count nothing, device-ness follows ops,
   factories with ``device=`` and autograd's backward.
2. The training step (augment + forward + backward + optimiser step) of every recipe makes no read: E-SimCLR and
   E-BYOL (CIFAR-10 and digits), and the other methods; with kornia's and lightly's own ops (the "before") the
   counter sees their reads (CIFAR-10 E-SimCLR 12, E-BYOL 15, from ColorJitter, blur, NT-Xent's and VICReg's
   masks and LARS; :data:`BEFORE`).
3. Through Lightning: a real ``pretrain`` makes no read at steps that do not log, and only Lightning's logging and
   the finite-loss check at the logging steps.
4. essl's sync-free ops equal the library ones they replace: kornia's ColorJitter, RandomGaussianBlur and Normalize
   bit for bit under the same seed (the same parameter draws: essl keeps kornia's generators), lightly's NT-Xent,
   VICReg and LARS on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import kornia.augmentation as K
import lightning as L
import pytest
import torch
from lightly.loss import NTXentLoss, VICRegLoss
from lightly.utils.lars import LARS

from essl import augment
from essl.config import load_config
from essl.data import LabelledData
from essl.eval import bench
from essl.eval.bench import HostSyncCounter
from essl.methods.simclr import NTXent
from essl.methods.vicreg import SyncFreeVICRegLoss
from essl.module import ESSLModule, SyncFreeLARS
from essl.pretrain import build_module, pretrain

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
TINY = ["backbone.name=small_cnn", "backbone.kwargs.width=4", "method.kwargs.hidden_dim=32",
        "equivariance.hidden_dim=16", "data.path=unused"]
#: reads per step of the recipes with kornia's and lightly's own ops, small_cnn: ColorJitter 4 per view (3 views
#: with E-SSL), blur 1 per blurred view, NT-Xent's mask 4 (forward and backward), VICReg's 4, LARS 2 per weight tensor
BEFORE = {"cifar10/e-simclr": 12, "cifar10/e-byol": 15, "digits/e-simclr": 16, "digits/e-byol": 12,
          "cifar10/e-barlowtwins": 32, "cifar10/e-vicreg": 36}


# ---- 1. the counter ---------------------------------------------------------------------------------------------
def test_counter_counts_reads_of_device_tensors_only():
    x = torch.rand(6)
    host = torch.rand(6)
    with HostSyncCounter(x) as c:
        y = x * 2  # device: computed from a device tensor
        float(y.sum())
        bool((y > 0).all())
        y.tolist()
        y.cpu()
        torch.nonzero(y > 1)
        y[y > 1]  # boolean-mask indexing: the output size is read back
        z = torch.zeros(3, device=x.device)  # a factory with device=: on the device
        int(z.argmax())
        # free: host tensors, Python numbers, integer indexing
        float(host.sum())
        host.tolist()
        torch.tensor([1.0]).item()
        y[torch.arange(2, device=x.device)]
    assert c.n_reads == 7, dict(c.reads)
    names = [k.split(" @ ")[0] for k in c.reads.elements()]
    assert names.count("_local_scalar_dense") == 3 and "tolist" in names and "cpu" in names
    assert "nonzero" in names and "index[bool mask]" in names


def test_counter_follows_backward_and_counts_host_to_device_copies():
    x = torch.rand(4, 3, requires_grad=True)
    mask = torch.eye(4, 3, dtype=torch.bool)
    with HostSyncCounter(x) as c:
        x[~mask].sum().backward()  # forward and backward of a boolean mask: two reads
        x.grad.max().item()  # autograd's gradient is a device tensor
        torch.tensor([0.5, 0.5], device=x.device)  # host data copied to the device
    assert c.n_reads == 3, dict(c.reads)
    assert c.n_host_to_device == 1, dict(c.host_to_device)


# ---- 2. the training step of every recipe --------------------------------------------------------------------
def _step(config: str, library_ops: bool = False) -> bench.StepSetup:
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", TINY)
    channels = 1 if config.startswith("digits") else 3
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (BATCH, channels, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.zeros(BATCH, dtype=torch.long)
    data = LabelledData("tiny", x, y, x, y, 10, mean=(0.5,) * channels, std=(0.25,) * channels)
    torch.manual_seed(0)
    module, _ = build_module(cfg, data, BATCH)
    module.train()
    s = bench.StepSetup(module, module.configure_optimizers()["optimizer"], x)
    return bench.with_library_ops(s) if library_ops else s


RECIPES = sorted(f"{p.parent.name}/{p.stem}" for d in ("cifar10", "digits")
                 for p in (ROOT / "configs" / d).glob("*.yaml"))


@pytest.mark.parametrize("config", RECIPES)
def test_training_step_makes_no_host_read(config):
    assert bench.host_reads_per_step(_step(config), steps=2) == 0


@pytest.mark.parametrize("config", sorted(BEFORE))
def test_library_ops_read_back_as_counted_before(config):
    """The "before" of the note: the same step with kornia's and lightly's ops reads this often (a regression here
    means the library changed, not essl)."""
    assert bench.host_reads_per_step(_step(config, library_ops=True)) == BEFORE[config]


def test_photonics_step_makes_no_host_read(tmp_path):
    cfg = load_config(ROOT / "configs/photonics/blob_e-simclr.yaml",
                      ["data.path=unused.h5", "backbone.kwargs.width=0.25"])
    x = 1 + 19 * torch.rand(BATCH, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(BATCH, dtype=torch.long)
    module, _ = build_module(cfg, LabelledData("phc", x, y, x[:0], y[:0], 0, mean=(1.0,), std=(19.0,)), BATCH)
    s = bench.StepSetup(module.train(), module.configure_optimizers()["optimizer"], x)
    assert bench.host_reads_per_step(s) == 0


# ---- 3. through Lightning ---------------------------------------------------------------------------------------
LOG_EVERY = 4
STEPS = 9
LOGGING_STEP_READS = 11
"""Measured at a logging step of E-SimCLR with the progress bar: Lightning's CSV and progress-bar values (4 + 4 + 2)
and the all-reduced finite flag (1); once every ``trainer.log_every_n_steps`` (10 by default)."""


class _CountSteps(L.Callback):
    """A counter open from one training batch's transfer to the next (so Lightning's logging after a step counts
    toward that step)."""

    def __init__(self):
        self.counter: HostSyncCounter | None = None
        self.per_step: dict[int, int] = {}

    def start(self, module, batch) -> None:
        self.stop(module.trainer.global_step)
        self.counter = HostSyncCounter(module, batch).__enter__()

    def stop(self, step: int) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.per_step[step] = self.counter.n_reads
            self.counter = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.stop(trainer.global_step)


def test_lightning_steps_read_only_when_they_log(tmp_path, monkeypatch):
    counter = _CountSteps()
    original = ESSLModule.on_before_batch_transfer

    def before(self, batch, dataloader_idx):
        if self.trainer.training:
            counter.start(self, batch)
        return original(self, batch, dataloader_idx)

    monkeypatch.setattr(ESSLModule, "on_before_batch_transfer", before)
    cfg = load_config(ROOT / "configs/digits/e-simclr.yaml",
                      [f"output_dir={tmp_path / 'run'}", "trainer.max_epochs=1", f"trainer.limit_train_batches={STEPS}",
                       "progress=true", "data.batch_size=16", f"trainer.log_every_n_steps={LOG_EVERY}",
                       "backbone.kwargs.width=4", "method.kwargs.hidden_dim=16", "equivariance.hidden_dim=16"])
    pretrain(cfg, callbacks=[counter])
    assert sorted(counter.per_step) == list(range(1, STEPS + 1))
    logging_steps = {s for s in counter.per_step if s % LOG_EVERY == 0}
    quiet = {s: n for s, n in counter.per_step.items() if s not in logging_steps and s != STEPS}
    assert quiet and all(n == 0 for n in quiet.values()), counter.per_step
    # Lightning's logger and progress bar read the logged values, and the finite check reads its flag
    assert all(counter.per_step[s] <= LOGGING_STEP_READS for s in logging_steps), counter.per_step


# ---- 4. the sync-free ops equal the library's -------------------------------------------------------------------
def _same_draws(ours, theirs, x: torch.Tensor, seed: int) -> None:
    torch.manual_seed(seed)
    a = ours(x)
    torch.manual_seed(seed)
    b = theirs(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels, jitter, p", [(3, (0.4, 0.4, 0.4, 0.1), 0.8), (1, (0.4, 0.4, 0.0, 0.0), 0.8),
                                                 (3, (0.4, 0.0, 0.2, 0.0), 1.0)])
def test_color_jitter_is_kornias(seed, channels, jitter, p):
    x = torch.rand(32, channels, 16, 16, generator=torch.Generator().manual_seed(seed))
    _same_draws(augment.ColorJitter(*jitter, p=p), K.ColorJitter(*jitter, p=p), x, seed)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kernel, p", [(3, 0.5), (9, 1.0)])
def test_gaussian_blur_is_kornias(seed, kernel, p):
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    _same_draws(augment.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=p),
                K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=p), x, seed)


def test_normalize_is_kornias_and_every_op_has_its_library_equivalent():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(augment.Normalize(mean, std)(x), K.Normalize(torch.tensor(mean), torch.tensor(std))(x))
    spec = augment.ViewSpec(16, blur_prob=0.5, solarize_prob=0.2)
    ours = augment.build_view_pipeline(spec, 3, mean, std)
    theirs = torch.nn.Sequential(*(augment.library_equivalent(op) for op in ours))
    assert {type(op) for op in theirs} & {augment.ColorJitter, augment.RandomGaussianBlur, augment.Normalize} == set()
    _same_draws(ours, theirs, torch.rand(8, 3, 24, 24), 5)


def test_random_resized_crop_and_the_rest_stay_kornias():
    """Only the ops that read back are replaced: the crop, flip, grayscale and solarize are kornia's own."""
    ops = augment.build_view_pipeline(augment.ViewSpec(16, blur_prob=0.5, solarize_prob=0.2), 3, (0.5,) * 3,
                                      (0.25,) * 3)
    kinds = [type(op) for op in ops]
    for kornia_op in (K.RandomResizedCrop, K.RandomHorizontalFlip, K.RandomGrayscale, K.RandomSolarize):
        assert kornia_op in kinds


@pytest.mark.parametrize("gather", [False, True])
def test_ntxent_is_lightlys(gather):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z1 = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ours = NTXent(temperature=0.3, gather_distributed=gather)
    loss = ours(z0, z1)
    grads = torch.autograd.grad(loss, (z0, z1))
    ref = NTXentLoss(temperature=0.3, gather_distributed=gather)(z0, z1)
    ref_grads = torch.autograd.grad(ref, (z0, z1))
    assert torch.equal(loss, ref)
    for a, b in zip(grads, ref_grads, strict=True):  # the same operations in the same order: bit for bit
        assert torch.equal(a, b)
    assert len(ours._keep) == 1  # built once for this shape
    ours(z0, z1)
    assert len(ours._keep) == 1


def test_ntxent_keep_index_drops_exactly_each_anchors_own_column():
    """The index of rank r of a 3-rank run: row i loses column r·b + i, nothing else."""
    b, world, rank = 4, 3, 1
    keep = NTXent()._keep_index(b, b * world, rank, torch.device("cpu"))
    mask = torch.ones(b, b * world, dtype=torch.bool)
    mask[torch.arange(b), rank * b + torch.arange(b)] = False
    assert torch.equal(keep, mask.reshape(-1).nonzero().squeeze(1))


def test_vicreg_is_lightlys():
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    ours = SyncFreeVICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0)(za, zb)
    ref = VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0)(za, zb)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_lars_is_lightlys():
    """Several steps with a zero parameter, a zero gradient and a group without weight decay (the cases in which
    lightly skips the trust ratio): the same parameters and momentum buffers."""
    def params():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 4, generator=g)), torch.nn.Parameter(torch.zeros(3, 2)),
              torch.nn.Parameter(torch.randn(6, generator=g)), torch.nn.Parameter(torch.randn(2, 2, generator=g))]
        return ps

    ours_p, ref_p = params(), params()

    def groups(ps):
        return [{"params": ps[:2] + ps[3:], "weight_decay": 1e-2}, {"params": ps[2:3], "weight_decay": 0.0}]

    ours, ref = SyncFreeLARS(groups(ours_p), lr=0.3, momentum=0.9), LARS(groups(ref_p), lr=0.3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in ours_p]
        grads[3] = torch.zeros(2, 2) if step % 2 else grads[3]  # a zero gradient every other step
        for ps in (ours_p, ref_p):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p, strict=True):
            assert torch.equal(a, b), step
    with HostSyncCounter(*ours_p) as c:
        for p in ours_p:
            p.grad = torch.ones_like(p)
        ours.step()
    assert c.n_reads == 0


@pytest.mark.parametrize("config", ["digits/e-simclr", "digits/e-byol", "digits/e-vicreg"])
def test_training_is_bit_identical_with_the_library_ops(config, tmp_path, monkeypatch):
    """Existing results do not change: a short run with essl's sync-free ops and the same run with kornia's,
    lightly's NT-Xent, VICReg and LARS give the same encoder, bit for bit (one thread, deterministic)."""
    import essl.methods.simclr
    import essl.methods.vicreg
    import essl.module

    common = [ "trainer.max_epochs=1", "trainer.limit_train_batches=3", "progress=false", "data.batch_size=32",
              "backbone.kwargs.width=4", "method.kwargs.hidden_dim=32", "equivariance.hidden_dim=16",
              "trainer.deterministic=true", "seed=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(load_config(ROOT / "configs" / f"{config}.yaml", [f"output_dir={tmp_path / 'ours'}", *common]))
        monkeypatch.setattr(augment, "ColorJitter", K.ColorJitter)
        monkeypatch.setattr(augment, "RandomGaussianBlur",
                            lambda kernel, sigma, p: K.RandomGaussianBlur(kernel, sigma, p=p))
        monkeypatch.setattr(augment, "Normalize", lambda mean, std: K.Normalize(torch.tensor(mean), torch.tensor(std)))
        monkeypatch.setattr(essl.methods.simclr, "NTXent", NTXentLoss)
        monkeypatch.setattr(essl.methods.vicreg, "SyncFreeVICRegLoss", VICRegLoss)
        monkeypatch.setattr(essl.module, "SyncFreeLARS", LARS)
        pretrain(load_config(ROOT / "configs" / f"{config}.yaml", [f"output_dir={tmp_path / 'theirs'}", *common]))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    ours, theirs = (torch.load(tmp_path / run / "encoder.pt", weights_only=True)["state_dict"]
                    for run in ("ours", "theirs"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
