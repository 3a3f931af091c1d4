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
    _load = essl.pretrain.load_labelled


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


    def load_labelled(*args, **kwargs):
        data = _load(*args, **kwargs)
        data.x_train = data.x_train[:1].expand_as(data.x_train).clone()
        return data


    essl.module.ESSLModule.training_step = training_step
    essl.module.ESSLModule.setup = setup
    essl.pretrain.load_labelled = load_labelled

    if __name__ == "__main__":
        from essl.cli import main

        sys.exit(main(sys.argv[2:]))
    '''
)
STEPS = 2
BATCH = 16


def test_ddp_spawn_pretrain_ranks_draw_different_views(tmp_path):
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DRIVER)
    records = tmp_path / "records"
    records.mkdir()
    run = tmp_path / "run"
    argv = [
        str(ROOT / "configs/digits/e-simclr.yaml"), f"output_dir={run}", "trainer.max_epochs=1",
        f"trainer.limit_train_batches={STEPS}", f"data.batch_size={BATCH}", "progress=false",
        "backbone.kwargs.width=4", "equivariance.hidden_dim=16", "method.kwargs.hidden_dim=16",
        "trainer.strategy=ddp_spawn", f"trainer.devices={WORLD}", "trainer.accelerator=cpu",
    ]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(driver), str(records), "pretrain", *argv], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"global batch {WORLD * BATCH}," in proc.stderr
    assert f"lr {0.3 * WORLD * BATCH / 256:.4g}," in proc.stderr  # optim.lr 0.3 per 256 images, scaled
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
