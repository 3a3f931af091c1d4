"""Blocking device→host reads of the label solver, counted on CPU (essl.eval.bench_solver.HostReadCounter): the
batched path makes a few per chunk, the per-structure path several per structure."""

from __future__ import annotations

import torch

from essl.eval.bench_solver import HostReadCounter, count_host_reads
from essl.photonics import dos, unitcell

#: Explicit reads of one chunk whose cells share one symmetry group, solved in one sub-batch: the mask of the
#: k-points to re-solve (reduced basis), the width of the widest GGR trapezoid, the copy of the labels.
BATCHED_EXPLICIT_READS = 3
#: Implicit syncs of that chunk: torch.linalg.eigh of the seeds, of the basis Gram matrices, of the Ritz problems,
#: and of the re-solved points (torch documents eigh as synchronising on CUDA).
BATCHED_IMPLICIT_SYNCS = 4


def test_counter_sees_device_reads_only():
    with HostReadCounter() as c:
        host = torch.ones(3)
        assert host.sum().item() == 3 and bool(host.all())  # host tensors: not counted
        x = torch.ones(3).to(c.device)
        y = (x * 2).sum()
        assert float(y) == 6.0  # 1
        assert y.cpu().item() == 6.0  # 2: the copy; .item() of the host copy is free
        z = torch.zeros(2, device=c.device)
        _ = z[z > 0]  # boolean-mask indexing: an implicit sync
        torch.linalg.eigh(torch.eye(2, device=c.device))  # documented as synchronising on CUDA
    assert [r for r, _ in c.reads] == ["__float__", "cpu"]
    assert [s for s, _ in c.syncs] == ["index (boolean mask)", "_linalg_eigh"]
    assert all(where.startswith("test_host_reads.py:") for _, where in c.reads + c.syncs)


def test_batched_labels_read_a_few_times_per_chunk_not_per_structure():
    cells = torch.from_numpy(unitcell.generate_cells("blob", 6, seed=2))  # p1: one group, the reduced basis
    kw = dict(eigensolver="torch", memory_budget=2**31)  # the GPU's eigensolver; one sub-batch
    ref = dos.compute_labels(cells, **kw)
    out, batched = count_host_reads(dos.compute_labels, cells, device=HostReadCounter.DEVICE, **kw)
    assert all(torch.equal(out[k], ref[k]) for k in ref)  # counting changes nothing
    _, per = count_host_reads(dos.compute_labels, cells, device=HostReadCounter.DEVICE, batched=False, **kw)
    print(f"6 blob cells: batched {len(batched.reads)} reads + {len(batched.syncs)} syncs; per-structure "
          f"{len(per.reads)} + {len(per.syncs)}")
    assert len(batched.reads) <= BATCHED_EXPLICIT_READS, batched.reads
    assert len(batched.syncs) <= BATCHED_IMPLICIT_SYNCS, batched.syncs
    assert len(per.reads) + len(per.syncs) >= len(cells) * (BATCHED_EXPLICIT_READS + BATCHED_IMPLICIT_SYNCS)
