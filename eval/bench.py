"""Speed benchmarks of essl, measured side by side in one process (``essl bench``).

Sections (``which``):

* ``pipeline`` — images/s producing the E-SimCLR inputs of one batch of CIFAR-sized uint8 images (two 32×32
  invariant views plus the four rotations of a 16×16 crop, Dangovski et al., ICLR 2022): essl's batched device
  path (:class:`essl.augment.ViewMaker` + :func:`essl.transforms.transform`) against a per-sample
  torchvision/PIL pipeline written after the description of the authors' CIFAR-10 code
  (``RandomResizedCrop(32)``, ``RandomHorizontalFlip``, ``RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)``,
  ``RandomGrayscale(0.2)``, ``ToTensor``, ``Normalize`` per view, the same with ``RandomResizedCrop(16)`` for
  the rotation view, then ``torch.rot90`` of the batch four ways), run in a ``torch.utils.data.DataLoader`` over
  PIL images with ``num_workers = os.cpu_count()``. Images are synthetic (uniform random uint8); nothing is
  downloaded. Equal cores: the reference gets one worker process per core, essl the same cores as intra-op
  threads of the main process.
* ``train`` — one training step (augment + forward + backward + optimiser step) of SimCLR and E-SimCLR
  (λ = 0.4, rot4 of a 16×16 crop) for CIFAR ResNet-18 and ``small_cnn``, assembled from the CIFAR-10 E-SimCLR
  recipe by :func:`essl.pretrain.build_module`: images/s, the share of the step spent augmenting, and the E-SSL
  overhead = E-SimCLR step time / SimCLR step time. The batch sizes are chosen so that ``all`` stays within
  about ten minutes on a 2-core CPU (they are printed with the results).
* ``solver`` — :func:`essl.eval.bench_solver.bench_solver` (labelled photonic-crystal generation against
  legume-gme at equal accuracy, scaling with batch size and plane-wave count); not re-implemented here.
* memory, in every section — peak resident set size of this process (and, for the reference pipeline, the sum
  over its worker processes), sampled by a background thread with psutil during the section; the lifetime
  ``ru_maxrss``; on a GPU ``torch.cuda.max_memory_allocated`` per section. (tracemalloc does not see tensor
  storage, so it is not used.)

Protocol: every compared pair is timed in the same process, repeats interleaved (A, B, A, B, ...) after a
warm-up, and medians are quoted, because the machines are shared and noisy. ``quick=True`` shrinks every size so
that the whole benchmark runs in seconds (tests); its numbers are not meaningful.

``profile`` (not part of ``all``; ``python -m essl.eval.bench profile``) breaks essl's side down: time per
augmentation op and per step phase (augment / forward / backward / optimiser), and the effect of knobs that need
no code change (channels-last, ``torch.compile`` of the backbone), measured side by side.

Run: ``essl bench [pipeline|train|solver|all] [--device cpu|cuda] [--json PATH] [--quick]`` or
``python -m essl.eval.bench [pipeline|train|solver|all|profile] ...``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from essl.io import atomic_write_json, check_output_file
from essl.malloc import tune_malloc
from essl.runtime import resolve_device, torch_threads

SECTIONS = ("pipeline", "train", "solver", "loader", "hostsync")
CHOICES = (*SECTIONS, "all", "profile", "folder")

DEFAULT_REPEATS = 5
"""Timed repeats per measurement (after one warm-up); medians are quoted."""
SEED = 0

# ---- the E-SimCLR CIFAR-10 inputs (Dangovski et al., ICLR 2022, appendix) ------------------------------------
IMAGE_SIZE = 32
EQ_CROP_SIZE = 16
CHANNELS = 3
N_VIEWS = 2
GROUP = "rot4"
N_ROTATIONS = 4
ESSL_WEIGHT = 0.4  # λ of E-SimCLR; 0 is plain SimCLR
E_BARLOW_WEIGHT = 8.0  # λ of configs/cifar10/e-barlowtwins.yaml
CROP_SCALE = (0.2, 1.0)
HFLIP_PROB = 0.5
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
# CIFAR-10 channel statistics used for Normalize (their values do not affect speed)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
UINT8_LEVELS = 256

PIPELINE_BATCH = 512
"""The issue's batch: 512 CIFAR-sized images per measurement."""
QUICK_PIPELINE_BATCH = 16

BACKBONES = ("resnet18_cifar", "small_cnn")
TRAIN_BATCH = {"resnet18_cifar": 64, "small_cnn": 256}
"""Per-step batch on CPU: ResNet-18 at the paper's 512 takes ~30 s a step on 2 cores, so 64 keeps ``all`` short."""
GPU_TRAIN_BATCH = 512
"""On a GPU the paper's batch."""
MAX_TRAIN_REPEATS = 3
"""Timed steps per model (ResNet-18 steps take seconds on a CPU; ``all`` must stay within ~10 minutes)."""
QUICK_TRAIN_BATCH = 8
QUICK_BACKBONES = ("small_cnn",)
"""Quick mode (tests) steps only the small backbone: ResNet-18 alone takes ~10 s to build and warm up on 2 cores."""
SMALL_BACKBONE_HEADS = {"small_cnn": 512}
"""Hidden width of the projection and equivariance heads for the small backbone, as configs/digits/*.yaml use
(the CIFAR recipe's 2048-wide heads on 128-d features would cost more than small_cnn itself)."""
CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "cifar10" / "e-simclr.yaml"
"""The recipe, when the source tree is there (editable install); otherwise schema defaults + the overrides below."""

SOLVER_STRUCTURES = 16
QUICK_SOLVER_STRUCTURES = 2

MEMORY_SAMPLE_S = 0.005
"""Interval of the background RSS sampler."""
BYTES_PER_MB = 2**20
RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


# ---- timing and memory helpers ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    """Wait for queued device work (timing only; essl's own step never syncs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable: one warm-up each, then ``repeats`` rounds A, B, A, B, ..."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


class PeakMemory:
    """Peak RSS of this process (and the sum over its children) while the context is open, sampled in a thread;
    on CUDA also ``max_memory_allocated``. ``result()`` gives MB."""

    def __init__(self, device: torch.device):
        self.device = device
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.start_rss = self.peak_rss = self.peak_children = 0

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        children = 0
        for child in self._proc.children(recursive=True):
            try:
                children += child.memory_info().rss
            except psutil.Error:  # a worker that just exited
                pass
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_children = max(self.peak_children, children)

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.start_rss = self._proc.memory_info().rss
        self._sample()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict[str, float]:
        out = {
            "start_rss_mb": self.start_rss / BYTES_PER_MB,
            "peak_rss_mb": self.peak_rss / BYTES_PER_MB,
            "peak_rss_increase_mb": (self.peak_rss - self.start_rss) / BYTES_PER_MB,
            "peak_rss_workers_mb": self.peak_children / BYTES_PER_MB,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT / BYTES_PER_MB,
        }
        if self.device.type == "cuda":
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / BYTES_PER_MB
        return out

# ---- host syncs: blocking device→host reads, counted on any device ---------------------------------------------
#
# On a GPU a read of a device value (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, or an op whose output size
# depends on the data: ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ...) waits until every
# queued kernel has run. On a CPU nothing waits, so the counter tracks which tensors *would* live on the device:
# the roots it is given (the batch, a module's parameters and buffers), every factory call with an explicit
# ``device=`` (code written for a GPU passes the input's device), and every result of an op that has a device
# input (followed through autograd's backward ops, below the Python API). Tensors made without a device are host
# tensors and reading them is free. A copy of host data to the device (``torch.tensor(..., device=)``,
# ``host.to(device)``) is counted apart: on a GPU only some of them block (pinned or ``non_blocking`` copies do
# not), which a CPU run cannot tell.
_ATEN = torch.ops.aten
_READ_OPS = frozenset({
    _ATEN._local_scalar_dense.default,  # item(), bool(), int(), float()
    _ATEN.nonzero.default, _ATEN.masked_select.default, _ATEN.equal.default, _ATEN.is_nonzero.default,
    _ATEN._unique2.default, _ATEN.unique_dim.default, _ATEN.unique_consecutive.default, _ATEN.bincount.default,
    _ATEN.repeat_interleave.Tensor,  # without output_size
})
_MASK_OPS = frozenset({_ATEN.index.Tensor, _ATEN.index_put.default, _ATEN.index_put_.default,
                       _ATEN._index_put_impl_.default})  # a read when an index is a boolean mask
_READ_METHODS = frozenset({Tensor.tolist, Tensor.numpy, Tensor.cpu, Tensor.__array__})
_COPY_OPS = frozenset({_ATEN._to_copy.default, _ATEN.copy_.default})


def _to_host(func, args: tuple, kwargs: dict) -> bool:
    """Whether an aten copy moves a tensor that really is on an accelerator to the CPU (seen on a GPU run only;
    on a CPU run such copies are caught above the dispatcher, as ``.cpu()`` / ``.tolist()`` / ``.to("cpu")``)."""
    if func is _ATEN._to_copy.default:
        source, target = args[0], kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and source.device.type != "cpu"
    dest, source = args[0], args[1]  # copy_(self, src)
    return isinstance(source, Tensor) and source.device.type != "cpu" and dest.device.type == "cpu"

_COPY_FACTORIES = frozenset({torch.tensor, torch.as_tensor})
_FACTORIES = frozenset({*_COPY_FACTORIES, torch.zeros, torch.ones, torch.full, torch.empty, torch.rand, torch.randn,
                        torch.randint, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.randperm,
                        torch.scalar_tensor, torch.empty_strided})
_SITE_FRAMES = 2
"""Frames outside torch named per counted read (innermost first)."""


class _Tags:
    """The set of tensors that would live on the device (identity, weakly held: ids are reused after a free)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: Tensor) -> None:
        key = id(t)
        ref = self._refs.get(key)
        if ref is not None and ref() is t:
            return

        def forget(r: weakref.ref, key: int = key) -> None:
            if self._refs.get(key) is r:
                del self._refs[key]

        self._refs[key] = weakref.ref(t, forget)

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


def _tensors(obj: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(obj) if isinstance(t, Tensor)]


def _site() -> str:
    frames = [f for f in traceback.extract_stack()[:-1]
              if "site-packages/torch/" not in f.filename and f.filename != __file__]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-_SITE_FRAMES:]))


class _FunctionLevel(TorchFunctionMode):
    """Python-API view: factories with ``device=``, host→device copies, ``tolist``/``numpy``/``cpu`` reads."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags, c = self.counter.tags, self.counter
        if func in _READ_METHODS and args and args[0] in tags:
            c._count(c.reads, func.__name__)
        copy = False
        if func is Tensor.to and args and args[0] not in tags and not kwargs.get("non_blocking", False):
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str, Tensor))),
                                               None))
            to_host = isinstance(target, str) and target == "cpu"  # an explicit move to the host, not to the device
            copy = target is not None and not to_host and not (isinstance(target, Tensor) and target not in tags)
        if func in _COPY_FACTORIES and kwargs.get("device") is not None:
            data = args[0] if args else kwargs.get("data")
            copy = not (isinstance(data, Tensor) and data in tags)
        if copy:
            c._count(c.host_to_device, func.__name__)
        out = func(*args, **kwargs)
        if copy and isinstance(out, Tensor) and args and out is args[0]:
            out = out.clone()  # on a GPU the copy is a new tensor; do not tag the host original
        if copy or (func in _FACTORIES and kwargs.get("device") is not None) or any(
                t in tags for t in _tensors((args, kwargs))):
            for t in _tensors(out):
                tags.add(t)
        return out


class _DispatchLevel(TorchDispatchMode):
    """aten view (autograd's backward included): device-ness follows every op; data-dependent ops are reads."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        on_device = any(t in c.tags for t in _tensors((args, kwargs)))
        if on_device and func in _COPY_OPS and _to_host(func, args, kwargs):  # on a GPU: a copy to the host
            c._count(c.reads, f"{func.overloadpacket.__name__} to the host")
        if on_device:
            if func in _READ_OPS and not (func is _ATEN.repeat_interleave.Tensor and kwargs.get("output_size")):
                c._count(c.reads, str(func.overloadpacket.__name__))
            elif func in _MASK_OPS:
                index = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index or ()):
                    c._count(c.reads, f"{func.overloadpacket.__name__}[bool mask]")
        out = func(*args, **kwargs)
        if on_device:
            for t in _tensors(out):
                c.tags.add(t)
        return out


class HostSyncCounter:
    """Count the blocking device→host reads (and host→device copies) of the code run inside the context.

    ``roots``: modules, tensors or containers of tensors that live on the device (the model, a batch). ``reads`` and
    ``host_to_device`` map ``"op @ file:line function <- caller"`` to counts; ``n_reads`` is their total. See the
    comment above for what counts; everything is counted on any device, including a CPU, by the same rules.
    """

    def __init__(self, *roots: Tensor | torch.nn.Module):
        self.roots = roots
        self.tags = _Tags()
        self.reads: collections.Counter[str] = collections.Counter()
        self.host_to_device: collections.Counter[str] = collections.Counter()

    def _count(self, table: collections.Counter, op: str) -> None:
        table[f"{op} @ {_site()}"] += 1

    @property
    def n_reads(self) -> int:
        return sum(self.reads.values())

    @property
    def n_host_to_device(self) -> int:
        return sum(self.host_to_device.values())

    def __enter__(self) -> HostSyncCounter:
        for root in self.roots:
            tensors = [*root.parameters(), *root.buffers()] if isinstance(root, torch.nn.Module) else _tensors(root)
            for t in tensors:
                self.tags.add(t)
        self._modes = (_FunctionLevel(self), _DispatchLevel(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _resolve_device(device: str | None) -> torch.device:
    """``--device`` (None: cuda if available); an unknown or absent device is a UserError (exit 2)."""
    return resolve_device(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    import kornia
    import torchvision

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "kornia": kornia.__version__,
        "device": str(device),
        # OpenMP spin-waiting threads collapse on a shared CPU (see the profile notes); record the setting
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc_tuning": os.environ.get("ESSL_MALLOC_TUNING", "1") != "0",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synthetic_images(n: int, seed: int = SEED) -> Tensor:
    """(n, 3, 32, 32) uniform random uint8 images (a stand-in for CIFAR-10: speed does not depend on content)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, UINT8_LEVELS, (n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g)


# ---- 1. augmentation pipeline ----------------------------------------------------------------------------------
def essl_view_maker(device: torch.device):
    """essl's E-SimCLR view maker (two 32×32 views + the 16×16 rotation-view source), on ``device``."""
    from essl.augment import ViewMaker, ViewSpec, build_view_pipeline

    colour = dict(
        hflip_prob=HFLIP_PROB, jitter_prob=JITTER_PROB, jitter=JITTER, grayscale_prob=GRAYSCALE_PROB
    )
    view = build_view_pipeline(ViewSpec(IMAGE_SIZE, CROP_SCALE, **colour), CHANNELS, CIFAR10_MEAN, CIFAR10_STD)
    eq = build_view_pipeline(ViewSpec(EQ_CROP_SIZE, CROP_SCALE, **colour), CHANNELS, CIFAR10_MEAN, CIFAR10_STD)
    return ViewMaker(view, N_VIEWS, eq).to(device)


def essl_inputs(view_maker, x_host: Tensor, device: torch.device) -> tuple[list[Tensor], Tensor, Tensor]:
    """essl's path for one batch: uint8 to the device, views, then the exact rot4 batch with labels."""
    from essl import transforms

    x = x_host.to(device, non_blocking=True)
    views, eq = view_maker(x)
    x_rot, labels = transforms.transform(eq, GROUP, mode="all")  # (4B, 3, 16, 16), (4B,)
    return views, x_rot, labels


def reference_transform(size: int):
    """One view of the reference CIFAR-10 recipe as a per-sample torchvision transform on a PIL image."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=CROP_SCALE),
            T.RandomHorizontalFlip(p=HFLIP_PROB),
            T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_PROB),
            T.RandomGrayscale(p=GRAYSCALE_PROB),
            T.ToTensor(),
            T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )


class ReferenceViews(torch.utils.data.Dataset):
    """PIL images -> (view, view, rotation-view source), each sample augmented on its own (reference style)."""

    def __init__(self, images: Tensor):
        from PIL import Image

        arrays = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3)
        self.images = [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]
        self.view = reference_transform(IMAGE_SIZE)
        self.rotation_view = reference_transform(EQ_CROP_SIZE)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        img = self.images[i]
        return self.view(img), self.view(img), self.rotation_view(img)


def reference_rotations(r: Tensor) -> Tensor:
    """The reference training loop's rotation batch: the four quarter turns of the batch, concatenated."""
    return torch.cat([torch.rot90(r, k, (2, 3)) for k in range(N_ROTATIONS)])  # (4B, 3, 16, 16)


def reference_loader(images: Tensor, batch: int, workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        ReferenceViews(images),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )


def reference_epoch(loader, device: torch.device) -> int:
    """Consume one epoch of the reference loader (moving to the device and rotating as its loop does)."""
    n = 0
    for v1, v2, r in loader:
        v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
        reference_rotations(r.to(device, non_blocking=True))
        n += v1.shape[0]
    return n


def bench_pipeline(device: torch.device, quick: bool = False, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Section 1 (module docstring): essl's batched views vs the per-sample reference, images/s and ratio."""
    batch = QUICK_PIPELINE_BATCH if quick else PIPELINE_BATCH
    workers = os.cpu_count() or 1
    # the reference epoch gives every worker one batch, so all cores are busy; essl makes as many batches in a row
    n_batches = workers
    images = synthetic_images(batch * n_batches)
    torch.manual_seed(SEED)
    maker = essl_view_maker(device)
    host_batches = [images[i * batch : (i + 1) * batch] for i in range(n_batches)]
    if device.type == "cuda":
        host_batches = [b.pin_memory() for b in host_batches]

    def run_essl() -> None:
        for xb in host_batches:
            essl_inputs(maker, xb, device)

    def run_essl_one_thread() -> None:
        with torch_threads(1):
            run_essl()

    out: dict[str, Any] = {
        "batch": batch,
        "batches_per_repeat": n_batches,
        "repeats": repeats,
        "reference_workers": workers,
        "essl_threads": torch.get_num_threads(),
        "views": f"{N_VIEWS}×{IMAGE_SIZE}² + {N_ROTATIONS} rotations of a {EQ_CROP_SIZE}² crop",
    }
    loader = reference_loader(images, batch, workers, device)

    def run_reference() -> None:
        reference_epoch(loader, device)

    with PeakMemory(device) as mem:
        fns = {"essl": run_essl, "reference": run_reference}
        if device.type == "cpu" and torch.get_num_threads() > 1:
            fns["essl_1_thread"] = run_essl_one_thread
        t = _interleaved(fns, repeats, device)
    n_images = batch * n_batches
    out["essl_images_per_s"] = n_images / t["essl"]
    out["reference_images_per_s"] = n_images / t["reference"]
    out["speedup"] = out["essl_images_per_s"] / out["reference_images_per_s"]
    if "essl_1_thread" in t:
        out["essl_1_thread_images_per_s"] = n_images / t["essl_1_thread"]
        out["speedup_1_thread"] = out["essl_1_thread_images_per_s"] / out["reference_images_per_s"]
    out["memory"] = mem.result()
    return out


# ---- 2. training step ------------------------------------------------------------------------------------------
@dataclass
class StepSetup:
    """One assembled model (backbone + method + views + optional E-SSL branch), its optimiser and a batch."""

    module: Any
    optimizer: torch.optim.Optimizer
    x: Tensor


def build_step(backbone: str, essl_weight: float, batch: int, device: torch.device,
               config: str = "e-simclr") -> StepSetup:
    """A CIFAR-10 recipe (``configs/cifar10/<config>.yaml``, by default E-SimCLR; schema defaults + SimCLR when the
    source tree is not there) through :func:`essl.pretrain.build_module`, on synthetic data."""
    from essl.config import load_config
    from essl.data import LabelledData
    from essl.pretrain import build_module

    config_file = CONFIG_FILE.parent / f"{config}.yaml"
    overrides = [
        f"backbone.name={backbone}",
        f"data.batch_size={batch}",
        f"data.image_size={IMAGE_SIZE}",
        f"equivariance.weight={essl_weight}",
        f"equivariance.group={GROUP}",
        f"equivariance.crop_size={EQ_CROP_SIZE}",
    ]
    if not config_file.exists():
        overrides.append("method.name=simclr")
    if backbone in SMALL_BACKBONE_HEADS:
        width = SMALL_BACKBONE_HEADS[backbone]
        overrides += [f"method.kwargs.hidden_dim={width}", f"equivariance.hidden_dim={width}"]
    cfg = load_config(config_file if config_file.exists() else None, overrides)
    x = synthetic_images(batch)
    labels = torch.zeros(batch, dtype=torch.long)
    data = LabelledData("synthetic", x, labels, x, labels, NUM_CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    torch.manual_seed(SEED)
    module, _ = build_module(cfg, data, batch)
    module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    return StepSetup(module, optimizer, x.to(device))


def _train_batch(backbone: str, device: torch.device, quick: bool) -> int:
    if quick:
        return QUICK_TRAIN_BATCH
    return GPU_TRAIN_BATCH if device.type == "cuda" else TRAIN_BATCH[backbone]


def train_step(s: StepSetup) -> dict[str, Tensor]:
    """augment + forward + backward + optimiser step, as Lightning runs it (no logging)."""
    batch = s.module.make_training_batch(s.x)
    out = s.module.losses(batch)
    s.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    s.optimizer.step()
    return out


def bench_train(device: torch.device, quick: bool = False, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Section 2 (module docstring): SimCLR vs E-SimCLR step, per backbone; images/s and E-SSL overhead."""
    repeats = min(repeats, MAX_TRAIN_REPEATS)
    out: dict[str, Any] = {"repeats": repeats}
    for name in QUICK_BACKBONES if quick else BACKBONES:
        batch = _train_batch(name, device, quick)
        with PeakMemory(device) as mem:
            setups = {
                "simclr": build_step(name, 0.0, batch, device),
                "e_simclr": build_step(name, ESSL_WEIGHT, batch, device),
            }
            steps = _interleaved({k: (lambda s=s: train_step(s)) for k, s in setups.items()}, repeats, device)
            augs = _interleaved(
                {k: (lambda s=s: s.module.make_training_batch(s.x)) for k, s in setups.items()}, repeats, device
            )
        res: dict[str, Any] = {"batch": batch}
        for k in setups:
            res[k] = {
                "step_ms": steps[k] * 1e3,
                "images_per_s": batch / steps[k],
                "augment_ms": augs[k] * 1e3,
                "augment_share": augs[k] / steps[k],
                "host_reads_per_step": host_reads_per_step(setups[k]),
            }
        res["essl_overhead"] = steps["e_simclr"] / steps["simclr"]
        res["memory"] = mem.result()
        out[name] = res
        del setups
    return out


def host_reads_per_step(s: StepSetup, steps: int = 1) -> float:
    """Blocking device→host reads of ``steps`` training steps (:class:`HostSyncCounter`), per step; the step
    runs once before (caches built once per shape are not counted)."""
    train_step(s)
    with HostSyncCounter(s.module, s.x) as counter:
        for _ in range(steps):
            train_step(s)
    return counter.n_reads / steps


def with_library_ops(s: StepSetup) -> StepSetup:
    """The same step with kornia's and lightly's own ops where essl has sync-free ones (the "before" of the host
    sync work): kornia's ColorJitter, RandomGaussianBlur and Normalize (:func:`essl.augment.library_equivalent`),
    lightly's NTXentLoss and VICRegLoss, lightly's LARS. In place; returns ``s``."""
    from lightly.loss import NTXentLoss, VICRegLoss
    from lightly.utils.lars import LARS

    from essl.augment import library_equivalent
    from essl.methods.simclr import NTXent
    from essl.methods.vicreg import SyncFreeVICRegLoss
    from essl.module import SyncFreeLARS

    device = s.x.device
    maker = s.module.view_maker
    for pipeline in [*maker.view_pipelines, maker.eq_pipeline]:
        if isinstance(pipeline, torch.nn.Sequential):
            for i, op in enumerate(pipeline):
                pipeline[i] = library_equivalent(op).to(device)
    method = s.module.method
    criterion = getattr(method, "criterion", None)
    if isinstance(criterion, NTXent):
        method.criterion = NTXentLoss(temperature=criterion.temperature,
                                      gather_distributed=criterion.gather_distributed)
    elif isinstance(criterion, SyncFreeVICRegLoss):
        method.criterion = VICRegLoss(lambda_param=criterion.lambda_param, mu_param=criterion.mu_param,
                                      nu_param=criterion.nu_param, eps=criterion.eps,
                                      gather_distributed=criterion.gather_distributed)
    if isinstance(s.optimizer, SyncFreeLARS):
        lars = LARS(s.optimizer.param_groups, lr=s.optimizer.defaults["lr"])
        lars.load_state_dict(s.optimizer.state_dict())
        s.optimizer = lars
    return s


HOSTSYNC_CONFIGS = ("e-simclr", "e-byol", "simclr", "byol", "e-simsiam", "e-barlowtwins", "e-vicreg")
"""The CIFAR-10 recipes counted by the hostsync section; quick mode counts the first two (the issue's pair)."""
QUICK_HOSTSYNC_CONFIGS = CPU_HOSTSYNC_CONFIGS = ("e-simclr", "e-byol")
"""On a CPU (ResNet-18 steps of seconds) the issue's pair only; the counts do not depend on the device."""
HOSTSYNC_BACKBONES = ("resnet18_cifar",)
"""ResNet-18 as in the recipes: LARS reads two norms per weight tensor, so the count depends on the backbone."""


def bench_hostsync(device: torch.device, quick: bool = False, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Blocking device→host reads per training step (augment + forward + backward + optimiser step) of the CIFAR-10
    recipes, with kornia's and lightly's own ops ("before", :func:`with_library_ops`) and with essl's sync-free ones
    ("after"), and the step time of both, interleaved. Counted by the same rules on every device (CPU included)."""
    repeats = min(repeats, MAX_TRAIN_REPEATS)
    out: dict[str, Any] = {"repeats": repeats}
    backbones = QUICK_BACKBONES if quick else HOSTSYNC_BACKBONES
    configs = HOSTSYNC_CONFIGS if device.type == "cuda" else CPU_HOSTSYNC_CONFIGS
    for config in QUICK_HOSTSYNC_CONFIGS if quick else configs:
        weight = ESSL_WEIGHT if config.startswith("e-") else 0.0
        if config == "e-barlowtwins":
            weight = E_BARLOW_WEIGHT
        for name in backbones:
            batch = _train_batch(name, device, quick)
            setups = {"before": with_library_ops(build_step(name, weight, batch, device, config)),
                      "after": build_step(name, weight, batch, device, config)}
            reads = {k: host_reads_per_step(v) for k, v in setups.items()}
            with HostSyncCounter(setups["before"].module, setups["before"].x) as counter:
                train_step(setups["before"])
            sites = dict(counter.reads.most_common())
            times = _interleaved({k: (lambda v=v: train_step(v)) for k, v in setups.items()}, repeats, device)
            out[f"{config}/{name}"] = {
                "batch": batch,
                "reads_before": reads["before"], "reads_after": reads["after"],
                "step_ms_before": times["before"] * 1e3, "step_ms_after": times["after"] * 1e3,
                "sites_before": sites,
            }
            del setups
    return out


# ---- 4. loader: images/s of the lazy image-folder loader alone --------------------------------------------------
LOADER_IMAGES = 384
QUICK_LOADER_IMAGES = 16
LOADER_CLASSES = 4
LOADER_SOURCE_SIZE = (500, 375)
"""(width, height) of the generated JPEGs: the most common ImageNet training-image size."""
LOADER_IMAGE_SIZE = 224
QUICK_LOADER_IMAGE_SIZE = 32
LOADER_BATCH = 64
QUICK_LOADER_BATCH = 8
JPEG_QUALITY = 90
GPU_STEP_BACKBONE = "resnet50"
GPU_STEP_BATCH = 128
"""On a GPU the loader section also times an E-SimCLR step of ResNet-50 on 224-pixel images (the ImageNet
recipe's model), the rate the loader must keep up with."""
NOISE_LEVEL = 24.0  # uint8 units of noise over the smooth pattern, so JPEGs are photo-sized (tens of kB)


def make_image_folder(root: Path, n: int, size: tuple[int, int], classes: int = LOADER_CLASSES,
                      suffix: str = ".jpg", seed: int = SEED) -> Path:
    """Write ``n`` generated images (a smooth random colour pattern plus noise) as ``root/class_k/i.suffix``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fx, fy, phase = rng.uniform(0.5, 4.0, 3) * 2 * np.pi
        base = 127.5 * (1 + np.sin(fx * xx / w + fy * yy / h + phase))
        channels = [base * c for c in rng.uniform(0.3, 1.0, CHANNELS)]
        image = np.stack(channels, -1) + rng.normal(0, NOISE_LEVEL, (h, w, CHANNELS))
        pil = Image.fromarray(np.clip(image, 0, UINT8_LEVELS - 1).astype(np.uint8))
        path = root / f"class_{i % classes}" / f"{i:07d}{suffix}"
        pil.save(path, quality=JPEG_QUALITY) if suffix in (".jpg", ".jpeg") else pil.save(path)
    return root


def _loader_rate(dataset, batch: int, workers: int, repeats: int) -> float:
    """Images/s of one pass of a DataLoader over ``dataset`` (median over repeats, after a warm-up pass)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                        drop_last=False)

    def one_pass() -> None:
        for _ in loader:
            pass

    seconds = _interleaved({"pass": one_pass}, repeats, torch.device("cpu"))["pass"]
    return len(dataset) / seconds


def bench_loader(device: torch.device, quick: bool = False, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Images/s of the image-folder loader alone (:mod:`essl.data.lazy`: JPEG files decoded to uint8 at
    ``data.image_size`` in DataLoader workers), by number of workers; on a GPU also the ResNet-50 E-SimCLR step
    rate at 224 px and the workers it needs (step images/s / one worker's images/s, rounded up)."""
    import tempfile

    from essl.data.lazy import lazy_folder

    n = QUICK_LOADER_IMAGES if quick else LOADER_IMAGES
    size = QUICK_LOADER_IMAGE_SIZE if quick else LOADER_IMAGE_SIZE
    batch = QUICK_LOADER_BATCH if quick else LOADER_BATCH
    cores = os.cpu_count() or 1
    repeats = min(repeats, MAX_TRAIN_REPEATS)
    out: dict[str, Any] = {"images": n, "source_size": list(LOADER_SOURCE_SIZE), "image_size": size,
                           "batch": batch, "repeats": repeats, "cores": cores}
    with tempfile.TemporaryDirectory(prefix="essl-bench-loader-") as tmp, _cache_in(Path(tmp) / "cache"), \
            PeakMemory(device) as mem:
        root = make_image_folder(Path(tmp) / "images", n, LOADER_SOURCE_SIZE)
        out["jpeg_kb_mean"] = sum(p.stat().st_size for p in root.rglob("*.jpg")) / n / 1024
        t0 = time.perf_counter()
        data = lazy_folder(root, size, num_workers=min(cores, 2))
        out["startup_s"] = time.perf_counter() - t0  # scan + sampled statistics (cold cache)
        rates = {w: _loader_rate(data.pretrain_dataset(), batch, w, repeats) for w in sorted({1, cores})}
    out["images_per_s_by_workers"] = rates
    out["per_worker_images_per_s"] = rates[1]
    out["memory"] = mem.result()
    if device.type == "cuda":
        step = _gpu_step_rate(device, quick)
        out.update(step)
        out["workers_needed"] = math.ceil(step["step_images_per_s"] / rates[1])
    return out


def _gpu_step_rate(device: torch.device, quick: bool) -> dict[str, Any]:
    """Images/s of an E-SimCLR ResNet-50 step on 224-pixel images (mixed bf16/fp16 precision as recommended)."""
    from essl.config import load_config
    from essl.data import LabelledData
    from essl.module import resolve_precision
    from essl.pretrain import build_module

    batch = QUICK_LOADER_BATCH if quick else GPU_STEP_BATCH
    size = QUICK_LOADER_IMAGE_SIZE if quick else LOADER_IMAGE_SIZE
    cfg = load_config(None, [f"backbone.name={GPU_STEP_BACKBONE}", f"data.image_size={size}", "equivariance.weight=0.4",
                             f"equivariance.crop_size={size // 2}", "method.name=simclr"])
    x = torch.randint(0, UINT8_LEVELS, (batch, CHANNELS, size, size), dtype=torch.uint8)
    labels = torch.zeros(batch, dtype=torch.long)
    module, _ = build_module(cfg, LabelledData("synthetic", x, labels, x, labels, NUM_CLASSES, mean=CIFAR10_MEAN,
                                               std=CIFAR10_STD), batch)
    module.to(device).train()
    s = StepSetup(module, module.configure_optimizers()["optimizer"], x.to(device))
    precision, _ = resolve_precision("bf16-mixed")
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype):
            batch_ = s.module.make_training_batch(s.x)
            loss = s.module.losses(batch_)["loss"]
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()

    seconds = _interleaved({"step": step}, MAX_TRAIN_REPEATS, device)["step"]
    return {"step_backbone": GPU_STEP_BACKBONE, "step_batch": batch, "step_precision": precision,
            "step_images_per_s": batch / seconds}


@contextmanager
def _cache_in(folder: Path):
    """Point essl's statistics cache (``ESSL_CACHE_DIR``) at ``folder`` while the block runs."""
    from essl.data.lazy import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = previous


# ---- a large folder: start-up time and memory (a benchmark, not part of `all`) ----------------------------------
FOLDER_IMAGES = 100_000
FOLDER_IMAGE_PX = 16
"""Side of the generated PNG files: small, so that generating 100k of them takes seconds."""
FOLDER_SIZES = (10_000, 100_000)
"""File counts compared: memory must not grow with the folder (the lazy loader), the in-memory one grows."""
QUICK_FOLDER_IMAGES = 200
QUICK_FOLDER_SIZES = (100, 200)
FOLDER_WORKERS = 2
FOLDER_BATCH = 256
FOLDER_TIMEOUT_S = 1800

FOLDER_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
from essl.data import ImageDataModule, load_labelled, load_pretrain_data
mode, path, size, workers, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t_import = time.perf_counter()
data = (load_pretrain_data("folder", size, path, workers) if mode == "lazy"
        else load_labelled("folder", size, path))
t_data = time.perf_counter()
dm = ImageDataModule(data, batch, workers)
it = iter(dm.train_dataloader())
x, _ = next(it)
t_batch = time.perf_counter()
del it
unit = 1 if sys.platform == "darwin" else 1024
print(json.dumps({"images": data.n_pretrain, "import_s": t_import - t0, "data_s": t_data - t_import,
                  "first_batch_s": t_batch - t_import, "batch_shape": list(x.shape),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20,
                  "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit / 2**20}))
"""


def _folder_probe(mode: str, root: Path, size: int, cache: Path, batch: int) -> dict[str, Any]:
    """One start-up in a fresh process (clean memory numbers): data set, DataModule, the first training batch."""
    import subprocess

    env = {**os.environ, "ESSL_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", FOLDER_PROBE, mode, str(root), str(size), str(FOLDER_WORKERS), str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=FOLDER_TIMEOUT_S)
    if proc.returncode:
        raise RuntimeError(f"folder probe {mode} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_folder(n_images: int = FOLDER_IMAGES, folder: str | None = None, in_memory: bool = True,
                 sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Start-up of pretraining on a generated folder of small PNG files: time to the first training batch and
    peak memory (main process, and the largest loader worker), for the lazy loader (cold statistics cache, then
    warm) and, for comparison, the in-memory one, each at several folder sizes. Generated files are kept in
    ``folder`` (default: a temporary folder) and reused by a later run."""
    import shutil
    import tempfile

    sizes = tuple(sorted({*(sizes or ()), n_images})) if sizes else tuple(sorted({*FOLDER_SIZES, n_images}))
    sizes = tuple(n for n in sizes if n <= n_images)
    base = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="essl-bench-folder-"))
    out: dict[str, Any] = {"image_px": FOLDER_IMAGE_PX, "workers": FOLDER_WORKERS, "batch": FOLDER_BATCH,
                           "decode_size": FOLDER_IMAGE_PX, "runs": {}}
    try:
        for n in sizes:
            root = base / f"png{n}"
            done = root / ".complete"
            if not done.exists():
                shutil.rmtree(root, ignore_errors=True)
                t0 = time.perf_counter()
                make_image_folder(root, n, (FOLDER_IMAGE_PX, FOLDER_IMAGE_PX), suffix=".png")
                done.write_text(f"{time.perf_counter() - t0:.1f} s\n")
            cache = base / f"cache{n}"
            shutil.rmtree(cache, ignore_errors=True)
            batch = min(FOLDER_BATCH, n // 2)  # the training split (90%) holds at least one batch
            runs = {"lazy_cold": _folder_probe("lazy", root, FOLDER_IMAGE_PX, cache, batch),
                    "lazy_warm": _folder_probe("lazy", root, FOLDER_IMAGE_PX, cache, batch)}
            if in_memory:
                runs["in_memory"] = _folder_probe("memory", root, FOLDER_IMAGE_PX, cache, batch)
            out["runs"][str(n)] = runs
    finally:
        if not folder:
            shutil.rmtree(base, ignore_errors=True)
    return out


# ---- 3. band solver --------------------------------------------------------------------------------------------
def bench_solver_section(device: torch.device, quick: bool = False, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Section 3: :func:`essl.eval.bench_solver.bench_solver` (legume-gme compared when it is installed)."""
    from essl.eval.bench_solver import bench_solver

    try:
        import legume  # noqa: F401

        compare = True
    except ImportError:
        compare = False
    with PeakMemory(device) as mem:
        r = bench_solver(
            n_structures=QUICK_SOLVER_STRUCTURES if quick else SOLVER_STRUCTURES,
            device=str(device),
            compare_legume=compare,
            repeats=repeats,
            scaling=not quick,  # the scaling sweeps are the slow part of the tiny run; tests skip them
            tiny=quick,
        )
    r = dict(r)
    r["legume_installed"] = compare
    r["memory"] = mem.result()
    return r


# ---- profile of essl's side ------------------------------------------------------------------------------------
def _op_times(pipeline, x: Tensor, repeats: int, device: torch.device) -> dict[str, float]:
    """Median ms of each op of a kornia ``nn.Sequential`` pipeline, fed the previous op's output."""
    names = [f"{i}:{type(m).__name__}" for i, m in enumerate(pipeline)]
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats + 1):
        y = x
        for name, m in zip(names, pipeline, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                y = m(y)
            _sync(device)
            if rep:  # the first pass is a warm-up
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(ts) for n, ts in times.items()}


def _phase_times(s: StepSetup, repeats: int, device: torch.device) -> dict[str, float]:
    """Median ms of augment / forward / backward / optimiser within one step."""
    phases: dict[str, list[float]] = {"augment": [], "forward": [], "backward": [], "optimizer": []}
    def mark(marks: list[float]) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    for rep in range(repeats + 1):
        marks: list[float] = []
        mark(marks)
        batch = s.module.make_training_batch(s.x)
        mark(marks)
        out = s.module.losses(batch)
        mark(marks)
        s.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        mark(marks)
        s.optimizer.step()
        mark(marks)
        if rep:
            for name, a, b in zip(phases, marks, marks[1:], strict=False):
                phases[name].append((b - a) * 1e3)
    return {n: statistics.median(ts) for n, ts in phases.items()}


def _channels_last(s: StepSetup) -> StepSetup:
    s.module.to(memory_format=torch.channels_last)
    return s


def profile_essl(device: torch.device, quick: bool = False, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Where essl's time goes, and what channels-last / ``torch.compile`` (no code change needed) would buy."""
    from essl.augment import to_float

    batch = QUICK_PIPELINE_BATCH if quick else PIPELINE_BATCH
    maker = essl_view_maker(device)
    x = to_float(synthetic_images(batch).to(device))
    out: dict[str, Any] = {
        "batch": batch,
        "view_ops_ms": _op_times(maker.view_pipelines[0], x, repeats, device),
        "eq_view_ops_ms": _op_times(maker.eq_pipeline, x, repeats, device),
    }
    for name in QUICK_BACKBONES if quick else BACKBONES:
        batch = _train_batch(name, device, quick)
        base = build_step(name, ESSL_WEIGHT, batch, device)
        res: dict[str, Any] = {"batch": batch, "phases_ms": _phase_times(base, repeats, device)}
        variants: dict[str, StepSetup] = {
            "baseline": base,
            "channels_last": _channels_last(build_step(name, ESSL_WEIGHT, batch, device)),
        }
        compiled = build_step(name, ESSL_WEIGHT, batch, device)
        try:
            compiled.module.backbone.compile()
            t0 = time.perf_counter()
            train_step(compiled)  # compilation happens on the first call
            train_step(compiled)  # the equivariance batch (16×16) compiles a second graph
            res["compile_s"] = time.perf_counter() - t0
            variants["compile"] = compiled
        except Exception as err:  # a missing compiler toolchain must not sink the profile
            res["compile_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        t = _interleaved({k: (lambda s=s: train_step(s)) for k, s in variants.items()}, repeats, device)
        res["step_ms"] = {k: v * 1e3 for k, v in t.items()}
        res["speedup"] = {k: t["baseline"] / v for k, v in t.items() if k != "baseline"}
        out[name] = res
    return out


# ---- orchestration and output ----------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Plain JSON: str keys, finite floats (non-finite -> None), lists for tuples."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, Tensor)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _sections(which: str) -> tuple[str, ...]:
    if which == "all":
        return SECTIONS
    if which not in CHOICES:
        raise ValueError(f"unknown benchmark {which!r}; choose one of {', '.join(CHOICES)}")
    return (which,)


def run_bench(
    which: str = "all",
    device: str | None = None,
    json_path: str | None = None,
    quick: bool = False,
    repeats: int = DEFAULT_REPEATS,
    progress: bool = False,
    folder_images: int = FOLDER_IMAGES,
) -> dict[str, Any]:
    """Run the benchmark section(s) ``which`` (:data:`SECTIONS`, ``all`` = all of them, ``profile`` or ``folder``;
    ``folder_images``: the largest folder of ``folder``).

    ``device``: ``cpu`` / ``cuda`` (default: cuda if available). Returns a JSON-serialisable dict with
    ``machine``, ``settings`` and one entry per section; with ``json_path`` it is also written there atomically.
    ``quick`` uses tiny sizes (seconds, for tests; the numbers mean nothing) and one repeat. ``progress`` prints
    one line per section to stderr.
    """
    sections = _sections(which)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = _resolve_device(device)
    if json_path is not None:  # before the benchmarks run, not after
        check_output_file(json_path, "--json")
    if quick:
        repeats = 1
    runners = {
        "pipeline": bench_pipeline,
        "train": bench_train,
        "solver": bench_solver_section,
        "loader": bench_loader,
        "hostsync": bench_hostsync,
        "profile": profile_essl,
        "folder": lambda dev, quick, repeats: bench_folder(QUICK_FOLDER_IMAGES if quick else folder_images,
                                                          sizes=QUICK_FOLDER_SIZES if quick else None),
    }
    result: dict[str, Any] = {
        "machine": machine_info(dev),
        "settings": {"which": which, "quick": quick, "repeats": repeats},
    }
    t_all = time.perf_counter()
    for name in sections:
        if progress:
            print(f"essl bench: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result[name] = runners[name](dev, quick=quick, repeats=repeats)
        result[name]["wall_s"] = time.perf_counter() - t0
        if progress:
            print(f"essl bench: {name} done in {result[name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    result["settings"]["wall_s"] = time.perf_counter() - t_all
    result = _jsonable(result)
    if json_path is not None:
        atomic_write_json(json_path, result)
    return result


def _mb(mem: dict[str, Any] | None, key: str = "peak_rss_mb") -> str:
    value = (mem or {}).get(key)
    return "" if value is None else f"{value:.0f}"


def format_bench(result: dict[str, Any]) -> str:
    """Markdown tables (for the README) of whatever sections ``result`` holds."""
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu_count']} CPU cores ({m['processor']}), torch {m['torch']}, torchvision "
        f"{m['torchvision']}, kornia {m['kornia']}, device {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", OMP_WAIT_POLICY={m.get('omp_wait_policy') or 'unset'}"
        + f", malloc tuning {'on' if m.get('malloc_tuning') else 'off'}"
        + f"; medians of {result['settings']['repeats']} interleaved repeats"
        + (" — QUICK mode, numbers not meaningful" if result["settings"].get("quick") else ""),
    ]
    cuda = "cuda" in m["device"]
    if "pipeline" in result:
        p = result["pipeline"]
        lines += [
            "",
            f"**Augmentation** — E-SimCLR inputs ({p['views']}) for batches of {p['batch']} uint8 32×32 images",
            "",
            "| pipeline | images/s | vs reference | peak RSS MB |",
            "|---|---|---|---|",
            f"| essl: batched on {m['device']} (kornia views + exact rot4), {p['essl_threads']} threads "
            f"| {p['essl_images_per_s']:.0f} | {p['speedup']:.2f}× | {_mb(p['memory'])} |",
        ]
        if "essl_1_thread_images_per_s" in p:
            lines.append(
                f"| essl: same, 1 thread | {p['essl_1_thread_images_per_s']:.0f} | {p['speedup_1_thread']:.2f}× | |"
            )
        lines += [
            f"| reference: per-sample torchvision/PIL, DataLoader with {p['reference_workers']} workers "
            f"| {p['reference_images_per_s']:.0f} | 1.00× | {_mb(p['memory'])} + workers "
            f"{_mb(p['memory'], 'peak_rss_workers_mb')} |",
        ]
    if "train" in result:
        tr = result["train"]
        lines += [
            "",
            "**Training step** (augment + forward + backward + SGD step; λ = 0.4, rot4 of a 16×16 crop)",
            "",
            "| backbone | batch | SimCLR images/s | E-SimCLR images/s | E-SSL overhead (time ratio) "
            "| augment share SimCLR / E-SimCLR | host reads/step | peak RSS MB"
            + (" | CUDA peak MB |" if cuda else " |"),
            "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
        ]
        for name in BACKBONES:
            if name not in tr:
                continue
            r = tr[name]
            row = (
                f"| {name} | {r['batch']} | {r['simclr']['images_per_s']:.1f} | {r['e_simclr']['images_per_s']:.1f} "
                f"| {r['essl_overhead']:.2f}× "
                f"| {r['simclr']['augment_share']:.0%} / {r['e_simclr']['augment_share']:.0%} "
                f"| {r['e_simclr'].get('host_reads_per_step', float('nan')):.0f} | {_mb(r['memory'])} |"
            )
            if cuda:
                row += f" {_mb(r['memory'], 'cuda_max_allocated_mb')} |"
            lines.append(row)
    if "hostsync" in result:
        lines += ["", "**Host syncs** — blocking device→host reads per training step (augment + forward + backward + "
                  "optimiser step), kornia's/lightly's ops (before) vs essl's (after)", "",
                  "| recipe / backbone | batch | reads before | reads after | step ms before | step ms after |",
                  "|---|---|---|---|---|---|"]
        for key, r in result["hostsync"].items():
            if isinstance(r, dict):
                lines.append(f"| {key} | {r['batch']} | {r['reads_before']:.0f} | {r['reads_after']:.0f} "
                             f"| {r['step_ms_before']:.0f} | {r['step_ms_after']:.0f} |")
    if "loader" in result:
        ld = result["loader"]
        rates = ", ".join(f"{w} worker{'s' if int(w) > 1 else ''}: {v:.0f}"
                          for w, v in ld["images_per_s_by_workers"].items())
        lines += ["", f"**Loader** — {ld['images']} JPEGs of {ld['source_size'][0]}×{ld['source_size'][1]} "
                  f"(~{ld['jpeg_kb_mean']:.0f} kB) decoded to uint8 {ld['image_size']}² in DataLoader workers: "
                  f"images/s {rates}; start-up (scan + sampled statistics) {ld['startup_s']:.1f} s"]
        if "workers_needed" in ld:
            lines.append(f"GPU step ({ld['step_backbone']}, batch {ld['step_batch']}, {ld['step_precision']}): "
                         f"{ld['step_images_per_s']:.0f} images/s → **{ld['workers_needed']} loader workers** "
                         f"at {ld['per_worker_images_per_s']:.0f} images/s each")
    if "folder" in result:
        lines += ["", f"**Large folder** — PNG files of {result['folder']['image_px']}² px, "
                  f"{result['folder']['workers']} workers, batch {result['folder']['batch']}: seconds to the first "
                  "training batch (after imports) and peak RSS MB (main process / largest worker)", "",
                  "| files | lazy, cold cache | lazy, warm cache | in memory |", "|---|---|---|---|"]
        for n, runs in result["folder"]["runs"].items():
            cells = [f"{r['first_batch_s']:.1f} s, {r['peak_rss_mb']:.0f} / {r['peak_rss_worker_mb']:.0f} MB"
                     if r else "" for r in (runs.get("lazy_cold"), runs.get("lazy_warm"), runs.get("in_memory"))]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "solver" in result:
        from essl.eval.bench_solver import format_table

        s = result["solver"]
        note = "" if s.get("legume_installed") else " (legume-gme not installed: no comparison)"
        lines += ["", "**Band solver**", "", format_table(s), "", f"peak RSS {_mb(s.get('memory'))} MB{note}"]
    if "profile" in result:
        lines += ["", _format_profile(result["profile"])]
    return "\n".join(lines)


def _format_profile(p: dict[str, Any]) -> str:
    lines = [f"**Profile of essl's side** (batch {p['batch']} for the augmentation ops)", "",
             "| op (32×32 view) | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in p["view_ops_ms"].items()]
    lines += ["", "| op (16×16 rotation view) | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in p["eq_view_ops_ms"].items()]
    for name in BACKBONES:
        if name not in p:
            continue
        r = p[name]
        phases = ", ".join(f"{k} {v:.0f} ms" for k, v in r["phases_ms"].items())
        lines += ["", f"E-SimCLR step, {name}, batch {r['batch']}: {phases}"]
        lines += ["", "| variant | step ms | speed-up |", "|---|---|---|"]
        for k, v in r["step_ms"].items():
            lines.append(f"| {k} | {v:.0f} | {r['speedup'].get(k, 1.0):.2f}× |")
        if "compile_s" in r:
            lines.append(f"(torch.compile: {r['compile_s']:.0f} s to compile)")
        if "compile_error" in r:
            lines.append(f"(torch.compile failed: {r['compile_error']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # as the `essl` command does (essl/malloc.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="?", default="all", choices=CHOICES)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results here (atomically)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds (tests); numbers not meaningful")
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    ap.add_argument("--folder-images", type=int, default=FOLDER_IMAGES,
                    help=f"folder: the largest generated folder (default {FOLDER_IMAGES})")
    args = ap.parse_args(argv)
    result = run_bench(args.which, args.device, args.json_path, args.quick, args.repeats, progress=True,
                       folder_images=args.folder_images)
    print(format_bench(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
