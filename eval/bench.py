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
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import Tensor

from essl.io import atomic_write_json
from essl.malloc import tune_malloc
from essl.runtime import torch_threads

SECTIONS = ("pipeline", "train", "solver")
CHOICES = (*SECTIONS, "all", "profile")

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





def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available")
    return dev


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


def build_step(backbone: str, essl_weight: float, batch: int, device: torch.device) -> StepSetup:
    """The CIFAR-10 (E-)SimCLR recipe through :func:`essl.pretrain.build_module`, on synthetic data."""
    from essl.config import load_config
    from essl.data import LabelledData
    from essl.pretrain import build_module

    overrides = [
        f"backbone.name={backbone}",
        f"data.batch_size={batch}",
        f"data.image_size={IMAGE_SIZE}",
        "method.name=simclr",
        f"equivariance.weight={essl_weight}",
        f"equivariance.group={GROUP}",
        f"equivariance.crop_size={EQ_CROP_SIZE}",
    ]
    if backbone in SMALL_BACKBONE_HEADS:
        width = SMALL_BACKBONE_HEADS[backbone]
        overrides += [f"method.kwargs.hidden_dim={width}", f"equivariance.hidden_dim={width}"]
    cfg = load_config(CONFIG_FILE if CONFIG_FILE.exists() else None, overrides)
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
            }
        res["essl_overhead"] = steps["e_simclr"] / steps["simclr"]
        res["memory"] = mem.result()
        out[name] = res
        del setups
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
        "view_ops_ms": _op_times(maker.view_pipeline, x, repeats, device),
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
) -> dict[str, Any]:
    """Run the benchmark section(s) ``which`` (``pipeline``, ``train``, ``solver``, ``all`` or ``profile``).

    ``device``: ``cpu`` / ``cuda`` (default: cuda if available). Returns a JSON-serialisable dict with
    ``machine``, ``settings`` and one entry per section; with ``json_path`` it is also written there atomically.
    ``quick`` uses tiny sizes (seconds, for tests; the numbers mean nothing) and one repeat. ``progress`` prints
    one line per section to stderr.
    """
    sections = _sections(which)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = _resolve_device(device)
    if quick:
        repeats = 1
    runners = {
        "pipeline": bench_pipeline,
        "train": bench_train,
        "solver": bench_solver_section,
        "profile": profile_essl,
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
            "| augment share SimCLR / E-SimCLR | peak RSS MB" + (" | CUDA peak MB |" if cuda else " |"),
            "|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
        ]
        for name in BACKBONES:
            if name not in tr:
                continue
            r = tr[name]
            row = (
                f"| {name} | {r['batch']} | {r['simclr']['images_per_s']:.1f} | {r['e_simclr']['images_per_s']:.1f} "
                f"| {r['essl_overhead']:.2f}× "
                f"| {r['simclr']['augment_share']:.0%} / {r['e_simclr']['augment_share']:.0%} "
                f"| {_mb(r['memory'])} |"
            )
            if cuda:
                row += f" {_mb(r['memory'], 'cuda_max_allocated_mb')} |"
            lines.append(row)
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
    args = ap.parse_args(argv)
    result = run_bench(args.which, args.device, args.json_path, args.quick, args.repeats, progress=True)
    print(format_bench(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
