"""Two-process DDP on CPU (gloo), issue 6.

1. The gathered NT-Xent (lightly's ``NTXentLoss(gather_distributed=True)``, through essl's SimCLR) equals the
   single-process loss on the concatenated batch, and the gradients agree. Exact relation: rank r's loss L_r is
   the mean over its own 2b rows of the (2B × 2B) logits, so the full-batch loss is mean_r L_r. lightly's
   GatherLayer all-reduces (sums) the gradients of the gathered embeddings, so rank r's *local* parameter
   gradient is the part of ∇θ Σ_k L_k that flows through rank r's embeddings; DDP then averages over ranks:
   (1/W) Σ_r ∇θ|_r Σ_k L_k = ∇θ mean_k L_k = ∇θ L_full. Both are checked, and that the gathering matters
   (a rank's loss differs from NT-Xent on its own half alone).
2. The ranks draw different views: a real ``essl pretrain`` with ``trainer.strategy=ddp_spawn`` on a dataset of
   identical images records each rank's views per step: they differ across ranks (only the augmentation stream
   can make them differ), the loss is finite and the learning rate is scaled by the global batch. Control: in
   ``setup``, the module's ``ViewMaker`` run with each rank's RNG state from *before* the rank decorrelation
   gives identical views on both ranks, and different ones after it.

The spawned workers of test 1 import this module: keep its top-level imports light (no Lightning).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightly.loss import NTXentLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from essl.methods import SimCLR
from essl.methods.simclr import CrossViewInfoNCE

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
PER_RANK = 4  # b: samples per rank; the full batch is B = WORLD · b
D_IN, D_FEAT, D_OUT = 12, 10, 8
TEMPERATURE = 0.5
SEED = 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Net(nn.Module):
    """A linear 'backbone' and essl's SimCLR with a shared linear projection (no BatchNorm: per-rank batch
    statistics would differ from the full batch's without SyncBatchNorm)."""

    def __init__(self, gather: bool, negatives: str = "all"):
        super().__init__()
        self.backbone = nn.Linear(D_IN, D_FEAT)
        self.method = SimCLR(self.backbone, D_FEAT, temperature=TEMPERATURE, negatives=negatives,
                             gather_distributed=gather)
        self.method.projection = nn.Linear(D_FEAT, D_OUT)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.method.loss(self.backbone, views)


def _build(gather: bool, negatives: str = "all") -> tuple[_Net, torch.Tensor, torch.Tensor]:
    """The same model initialisation and the same full batch on every process."""
    torch.manual_seed(SEED)
    net = _Net(gather, negatives).double()
    x0 = torch.randn(WORLD * PER_RANK, D_IN, dtype=torch.float64)
    x1 = x0 + 0.3 * torch.randn(WORLD * PER_RANK, D_IN, dtype=torch.float64)
    return net, x0, x1


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in net.named_parameters()}


def _worker(rank: int, out_dir: str, negatives: str) -> None:
    torch.set_num_threads(1)
    store = f"file://{Path(out_dir) / 'rendezvous'}"  # a file store: no port to pick
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
    try:
        net, x0, x1 = _build(gather=True, negatives=negatives)
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        views = [x0[part], x1[part]]
        # local gradients (no DDP averaging; lightly's gather still all-reduces the embedding gradients)
        loss_local = net(views)
        loss_local.backward()
        local = _grads(net)
        net.zero_grad()
        # what training does: DDP averages the gradients over ranks
        ddp = DDP(net)
        loss = ddp(views)
        loss.backward()
        result = {
            "loss": loss.detach(),
            "loss_local": loss_local.detach(),
            "ddp_grads": _grads(net),
            "local_grads": local,
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("negatives", ["all", "cross_view"])
def test_gathered_ntxent_and_gradients_match_single_process(tmp_path, negatives):
    """Both InfoNCE variants (lightly's NT-Xent and the reference's cross-view loss) gather their negatives from
    every rank: 2-process DDP gives the single-process loss and gradients of the full batch."""
    mp.spawn(_worker, args=(str(tmp_path), negatives), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    with torch.random.fork_rng(devices=[]):
        net, x0, x1 = _build(gather=True, negatives=negatives)  # no process group: the plain, full-batch loss
    full = net([x0, x1])
    full.backward()
    full_grads = _grads(net)

    losses = torch.stack([r["loss"] for r in ranks])
    torch.testing.assert_close(losses.mean(), full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack([r["loss_local"] for r in ranks]), losses, rtol=0, atol=0)
    # the negatives really come from both ranks: NT-Xent on one rank's half alone is a different number
    for r, rank_loss in enumerate(losses):
        part = slice(r * PER_RANK, (r + 1) * PER_RANK)
        z = net.method.projection(net.backbone(torch.cat([x0[part], x1[part]]))).detach()
        alone = (NTXentLoss(temperature=TEMPERATURE) if negatives == "all"
                 else CrossViewInfoNCE(temperature=TEMPERATURE))(*z.chunk(2))
        assert not torch.isclose(alone, rank_loss, rtol=1e-6, atol=0)
    assert not torch.isclose(losses[0], losses[1], rtol=1e-6, atol=0)

    for name, g in full_grads.items():
        assert g.abs().max() > 0, name
        for r in ranks:  # after DDP's average every rank holds the full-batch gradient
            torch.testing.assert_close(r["ddp_grads"][name], g, rtol=1e-10, atol=1e-12)
        local = [r["local_grads"][name] for r in ranks]
        torch.testing.assert_close(sum(local) / WORLD, g, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(local[0], local[1])  # each rank's own share differs before the all-reduce


@pytest.mark.parametrize("negatives", ["all", "cross_view"])
def test_pretrain_config_gathers_negatives(negatives):
    from essl.config import load_config
    from essl.data import load_labelled
    from essl.pretrain import build_module

    cfg = load_config(ROOT / "configs/digits/e-simclr.yaml", [f"method.kwargs.negatives={negatives}"])
    module, _ = build_module(cfg, load_labelled("digits", 32), 128)
    assert module.method.criterion.gather_distributed is True


DRIVER = textwrap.dedent(
    '''
    """Run `essl pretrain` with a training_step that records every rank's views, on a dataset whose images are
    all the same (so only the augmentation stream can make the ranks' views differ). Module-level patches are
    re-applied in the ddp_spawn children, which import this file as __mp_main__."""
    import sys
    from pathlib import Path

    import torch

    import essl.module
    import essl.pretrain

    OUT = Path(sys.argv[1])
    _step = essl.module.ESSLModule.training_step
    _setup = essl.module.ESSLModule.setup
    _load = essl.pretrain.load_pretrain_data


    def setup(self, stage):
        """Views of one fixed batch with this rank's RNG state before and after the module's own setup (which
        offsets the RNG by rank), without consuming the training stream."""
        images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        with torch.random.fork_rng(devices=[]):
            before = self.view_maker(images)[0][0]
        _setup(self, stage)
        with torch.random.fork_rng(devices=[]):
            after = self.view_maker(images)[0][0]
        torch.save({"before": before, "after": after}, OUT / f"rank{self.global_rank}_setup.pt")


    def training_step(self, batch, batch_idx):
        loss = _step(self, batch, batch_idx)
        record = {"views": [v.detach().clone() for v in batch["views"]], "loss": loss.detach().clone(),
                  "world_size": self.trainer.world_size}
        torch.save(record, OUT / f"rank{self.global_rank}_step{self.global_step}.pt")
        return loss


    def load_pretrain_data(*args, **kwargs):
        data = _load(*args, **kwargs)
        data.x_train = data.x_train[:1].expand_as(data.x_train).clone()
        return data


    essl.module.ESSLModule.training_step = training_step
    essl.module.ESSLModule.setup = setup
    essl.pretrain.load_pretrain_data = load_pretrain_data

    if __name__ == "__main__":
        from essl.cli import main

        sys.exit(main(sys.argv[2:]))
    '''
)
STEPS = 2
BATCH = 16


@pytest.mark.parametrize("batch_key", ["data.batch_size", "data.global_batch_size"])
def test_ddp_spawn_pretrain_ranks_draw_different_views(tmp_path, batch_key):
    """Also: ``data.global_batch_size`` fixes the global batch (the per-device one is derived), and SyncBatchNorm,
    on by default, says why it stays off on CPU processes."""
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DRIVER)
    records = tmp_path / "records"
    records.mkdir()
    run = tmp_path / "run"
    batch = BATCH if batch_key == "data.batch_size" else WORLD * BATCH
    argv = [
        str(ROOT / "configs/digits/e-simclr.yaml"), f"output_dir={run}", "trainer.max_epochs=1",
        f"trainer.limit_train_batches={STEPS}", f"{batch_key}={batch}", "progress=false",
        "backbone.kwargs.width=4", "equivariance.hidden_dim=16", "method.kwargs.hidden_dim=16",
        "trainer.strategy=ddp_spawn", f"trainer.devices={WORLD}", "trainer.accelerator=cpu",
    ]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(driver), str(records), "pretrain", *argv], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"global batch {WORLD * BATCH}," in proc.stderr
    assert f"lr {0.3 * WORLD * BATCH / 256:.4g}," in proc.stderr  # optim.lr 0.3 per 256 images, scaled
    assert "SyncBatchNorm needs GPUs" in proc.stderr
    assert (run / "encoder.pt").is_file() and (run / "last.ckpt").is_file()
    state = torch.load(run / "encoder.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    for step in range(STEPS):
        recs = [torch.load(records / f"rank{r}_step{step}.pt", weights_only=True) for r in range(WORLD)]
        assert [rec["world_size"] for rec in recs] == [WORLD, WORLD]
        for rec in recs:
            assert torch.isfinite(rec["loss"])
            v0, v1 = rec["views"]
            assert v0.shape == (BATCH, 1, 32, 32) and not torch.equal(v0, v1)
        for i in range(2):  # identical images on both ranks, different views: per-rank augmentation streams
            a, b = recs[0]["views"][i], recs[1]["views"][i]
            assert not torch.equal(a, b)
            differing = (a - b).flatten(1).abs().amax(1) > 1e-6
            assert differing.float().mean() > 0.5, f"step {step}, view {i}: most samples identical across ranks"
    assert not list(records.glob(f"rank*_step{STEPS}.pt"))

    # control: the ranks start from the same RNG state (same seed), and the rank offset is what separates them
    setups = [torch.load(records / f"rank{r}_setup.pt", weights_only=True) for r in range(WORLD)]
    assert torch.equal(setups[0]["before"], setups[1]["before"])
    assert not torch.equal(setups[0]["after"], setups[1]["after"])


# ---- issue 13: the kNN monitor, a NaN on one rank, the resume decision, the global batch ----------------------
def _knn_setup():
    from essl.config import load_config
    from essl.data import ImageDataModule, load_labelled
    from essl.pretrain import build_module

    cfg = load_config(ROOT / "configs/digits/simclr.yaml", ["backbone.kwargs.width=8", "method.kwargs.hidden_dim=16",
                                                             "eval.knn_k=20"])
    data = load_labelled("digits", 32)
    torch.manual_seed(SEED)
    module, _ = build_module(cfg, data, 128)
    return module, ImageDataModule(data, 64, knn_monitor=True)


def _validate(devices: int) -> dict[str, float]:
    import lightning as L

    module, dm = _knn_setup()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)  # as essl.pretrain: the loaders shard themselves
    results = trainer.validate(module, datamodule=dm, verbose=False)  # one dict per validation loader
    return {k: v for metrics in results for k, v in metrics.items()}


def test_knn_monitor_with_two_processes_gives_the_single_process_accuracy():
    """Each rank embeds a shard of the memory bank and of the test split (1437 and 360 digits: the bank's shards
    are padded); the monitor gathers them, so the logged accuracy is the one-process accuracy, not rank 0's."""
    from essl.data.module import ShardSampler

    single = _validate(1)["val/knn_acc"]
    double = _validate(WORLD)["val/knn_acc"]
    assert double == pytest.approx(single, abs=1e-7)
    assert 0.3 < single < 1.0
    assert len(ShardSampler(1437, 0, WORLD)) == 719  # each rank really saw about half


NAN_DRIVER = textwrap.dedent(
    '''
    """`essl pretrain` whose loss turns NaN on rank 1 only, from step NAN_FROM, or (RESUME mode) a rank 1 that
    sees no checkpoint in output_dir. Lightning's ddp launcher re-runs this file for rank 1, so the patches apply
    to every rank; RANK_VIEW=own makes rank 1 ignore the decision rank 0 hands it (the control)."""
    import os
    import sys
    from pathlib import Path

    import torch

    import essl.module
    import essl.pretrain

    MODE, OUT = sys.argv[1], Path(sys.argv[2])
    NAN_FROM = 3
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank > 0 and os.environ.get("RANK_VIEW") == "own":
        os.environ.pop(essl.module.RESUME_ENV, None)

    _losses = essl.module.ESSLModule.losses
    _setup = essl.module.ESSLModule.setup
    _inspect = essl.pretrain.inspect_run


    def losses(self, batch, step=0, max_steps=1):
        out = _losses(self, batch, step, max_steps)
        if MODE == "nan" and self.global_rank == 1 and self.global_step >= NAN_FROM:
            out["loss"] = out["loss"] * float("nan")
        return out


    def setup(self, stage):
        (OUT / f"rank{self.global_rank}_resume.txt").write_text(str(self.resume_from))
        _setup(self, stage)


    def inspect_run(run_dir, cfg):
        if MODE == "resume" and rank > 0:
            return essl.pretrain.RunState()  # this rank's own look at the folder finds nothing
        return _inspect(run_dir, cfg)


    essl.module.ESSLModule.losses = losses
    essl.module.ESSLModule.setup = setup
    essl.pretrain.inspect_run = inspect_run

    if __name__ == "__main__":
        from essl.cli import main

        sys.exit(main(sys.argv[3:]))
    '''
)
DDP_TINY = ["trainer.max_epochs=1", "data.batch_size=16", "progress=false", "backbone.kwargs.width=4",
            "equivariance.hidden_dim=16", "method.kwargs.hidden_dim=16", "trainer.strategy=ddp",
            f"trainer.devices={WORLD}", "trainer.accelerator=cpu", "trainer.log_every_n_steps=2"]
DDP_TIMEOUT = 300  # a hang guard: a rank left waiting in a collective would sit there for 30 minutes


def _ddp_run(tmp_path: Path, mode: str, run: Path, *extra: str, rank_view: str = "handed"):
    driver = tmp_path / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    records = tmp_path / "records"
    records.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_VIEW": rank_view}
    argv = ["pretrain", str(ROOT / "configs/digits/e-simclr.yaml"), f"output_dir={run}", *DDP_TINY, *extra]
    return subprocess.run([sys.executable, str(driver), mode, str(records), *argv], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=DDP_TIMEOUT), records


def test_nan_on_one_rank_stops_every_rank_at_the_same_check(tmp_path):
    """The finite flag is all-reduced: rank 1's NaN (from step 3) stops both ranks at the next check (step 4,
    trainer.log_every_n_steps=2) with the one-line message, instead of rank 0 waiting for rank 1 until the process
    group's timeout."""
    proc, _ = _ddp_run(tmp_path, "nan", tmp_path / "run", "trainer.limit_train_batches=20")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    failures = [line for line in proc.stderr.splitlines() if line.startswith("essl: failed:")]
    assert len(failures) == WORLD, proc.stderr[-3000:]  # one line from each process
    assert sorted(f.split("step ")[1].split(" ")[0].rstrip(";") for f in failures) == ["3", "3"], failures
    assert any("on rank 1" in f for f in failures) and any("on another rank" in f for f in failures)
    assert all("loss became NaN or infinite by step 3" in f for f in failures)
    assert not (tmp_path / "run" / "encoder.pt").exists()


def test_resume_is_decided_once_by_rank_zero(tmp_path):
    """Rank 1's own look at output_dir finds no checkpoint (as on a node that does not see rank 0's files yet):
    it still resumes from rank 0's, the decision rank 0 hands the ranks it launches; without that hand-over the
    ranks' decisions are compared once the process group is up and every rank stops with the same message."""
    run = tmp_path / "run"
    first, _ = _ddp_run(tmp_path, "plain", run, "trainer.limit_train_batches=2")
    assert first.returncode == 0, first.stderr[-3000:]
    step = torch.load(run / "last.ckpt", weights_only=True)["global_step"]

    proc, records = _ddp_run(tmp_path, "resume", run, "trainer.limit_train_batches=2", "trainer.max_epochs=2",
                             "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    decisions = [(records / f"rank{r}_resume.txt").read_text() for r in range(WORLD)]
    assert decisions == [str(run / "last.ckpt")] * WORLD
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 2 * step

    control, _ = _ddp_run(tmp_path, "resume", run, "trainer.limit_train_batches=2", "trainer.max_epochs=3",
                          "resume=true", rank_view="own")
    assert control.returncode == 1, control.stderr[-3000:]
    lines = [line for line in control.stderr.splitlines() if "resume checkpoint differs between ranks" in line]
    assert len(lines) == WORLD, control.stderr[-3000:]
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 2 * step  # nothing trained


def test_global_batch_that_does_not_divide_is_refused(tmp_path, capsys):
    from essl.cli import main

    code = main(["pretrain", str(ROOT / "configs/digits/e-simclr.yaml"), f"output_dir={tmp_path / 'run'}",
                 "data.global_batch_size=33", "trainer.strategy=ddp_spawn", f"trainer.devices={WORLD}",
                 "trainer.accelerator=cpu", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("essl: error: config key 'data.global_batch_size': 33 does not divide")


def test_slurm_requeue_checkpoint_newer_than_last_is_resumed(tmp_path, capsys):
    """Lightning's SLURM auto-requeue writes ``hpc_ckpt_N.ckpt`` into the run folder on the requeue signal
    (``sbatch --signal=SIGUSR1@90``); the requeued job (the same command, with resume=true) continues from it when
    it holds more steps than ``last.ckpt``; a torn one is passed over."""
    import shutil

    from essl.cli import main
    from essl.module import requeue_checkpoint

    run = tmp_path / "run"
    args = ["pretrain", str(ROOT / "configs/digits/e-simclr.yaml"), f"output_dir={run}",
            "trainer.limit_train_batches=2", "data.batch_size=16", "progress=false", "backbone.kwargs.width=4",
            "equivariance.hidden_dim=16", "method.kwargs.hidden_dim=16"]
    assert main([*args, "trainer.max_epochs=1"]) == 0
    shutil.copy(run / "last.ckpt", tmp_path / "epoch1.ckpt")
    assert main([*args, "trainer.max_epochs=2", "resume=true"]) == 0
    (run / "last.ckpt").rename(run / "hpc_ckpt_1.ckpt")  # the requeue checkpoint is the newer one
    shutil.copy(tmp_path / "epoch1.ckpt", run / "last.ckpt")
    (run / "hpc_ckpt_2.ckpt").write_bytes(b"torn")
    assert requeue_checkpoint(run / "last.ckpt") == run / "hpc_ckpt_1.ckpt"
    capsys.readouterr()
    assert main([*args, "trainer.max_epochs=3", "resume=true"]) == 0
    err = capsys.readouterr().err
    assert f"from {run / 'hpc_ckpt_1.ckpt'} (epoch " in err and "step 4)" in err, err
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 6
    assert requeue_checkpoint(run / "last.ckpt") == run / "last.ckpt"  # the run's own checkpoint is newer again
