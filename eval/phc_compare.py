"""The photonics comparison of Dangovski et al., "Equivariant Contrastive Learning" (ICLR 2022), with the reference
protocol (rdangovs/essl ``photonics/``), at a CPU scale and at the paper's scale.

``python -m essl.eval.phc_compare [--scale cpu|paper] [--out DIR] [--jobs 2] [--seeds 3] [--n-labels ...] [--quick]``

On both unit-cell datasets of the paper (``blob``: one smooth blob centred in the cell; ``levelset``: plane group
pm, the reference's "gpm" data; :mod:`essl.photonics.unitcell`) it

1. **generates data** into ``DIR/data``: an unlabelled pretraining set and labelled train and test sets, each with
   its own dataset seed (no structure is shared between them). Complete files are reused, interrupted ones resume;
2. **pretrains** SimCLR, SimCLR-invariant and E-SimCLR from ``configs/photonics/<kind>_<arm>.yaml`` — the reference
   recipe: its views (blob: the three-way flip then a quarter turn; level set: a periodic shift then the three-way
   flip; SimCLR-invariant adds the group that E-SimCLR predicts), its projector and BatchNorm equivariance head,
   λ = 5, T = 0.1, SGD momentum 0.9 without weight decay, batch 256, cosine without warm-up; E-SimCLR predicts the
   half-cell translation (blob) or the 4-fold rotation (level set) of the **raw** cell — with the sizes of the
   chosen scale, into ``DIR/pretrain/<kind>_<arm>``; the final equivariance accuracy of every run is recorded beside
   its Bayes limit (:mod:`essl.photonics.symmetry`);
3. **fine-tunes** every encoder, and trains the same network from scratch, on each number of labels, ``seeds``
   seeds each (:func:`essl.eval.phc_regression.run_regression`, the reference protocol: the whole network, Adam
   lr 1e-4, weight decay 1e-5, batch 64, MSE, DOS head 1024-1024-1024-512-400, every batch augmented with the run's
   view symmetries; the scratch network gets the dataset's base views). Models are selected on a validation split
   of the labelled set, never on the test set (the reference reports the minimum test error over epochs);
4. **ablations** in the same results: the frozen encoders with a trained DOS head, and E-SimCLR pretrained with the
   equivariance input of essl before 0.2 (the invariant views' operations, which for level sets contain the 180°
   rotation and cap the rotation task at 50%);
5. **reports** ``DIR/results.md`` (tables), ``DIR/results.json`` (every setting, every seed's error, stage times)
   and ``DIR/error_vs_labels.png``.

Every stage is cached and reused when its settings match (a re-run after an interruption continues where it
stopped); the result depends only on the settings and seeds, not on ``--jobs`` or the machine's load.

Scales (:data:`SCALES`). ``paper``: the reference's sizes — 15,000 blob and 20,480 level-set unlabelled cells, the
full-width encoder (64/256/256 channels, 1024-d features), 200 pretraining epochs, fine-tuning for 100 epochs,
2,000 test cells — for a GPU. ``cpu`` (the default): what fits 90 minutes on a 2-core CPU with two worker
processes, chosen by measurement (module constants below and the README): a quarter-width encoder, fewer
pretraining epochs over more cells, and a cap on the structures one fine-tuning run sees at large label counts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import essl
from essl.errors import UserError
from essl.io import atomic_write, atomic_write_json, atomic_write_text
from essl.runtime import Task, run_tasks

# --------------------------------------------------------------------------------------------------- settings

#: The two datasets of the paper's photonics experiment.
KINDS = ("blob", "levelset")
#: Pretrained arms, each a config ``configs/photonics/<kind>_<arm>.yaml``.
ARMS = ("simclr", "simclr-invariant", "e-simclr")
#: The from-scratch baseline (no pretraining).
SCRATCH = "scratch"
#: Ablation: E-SimCLR whose equivariance input gets the invariant views' operations of essl < 0.2.
OLD_INPUT = "e-simclr-old-input"
#: The equivariance input of essl < 0.2, per dataset: the invariant views of its configs at the time.
OLD_EQ_OPS = {"blob": ("c4v",), "levelset": ("shift", "flip4")}
#: Row labels of the results tables.
LABELS = {
    SCRATCH: "supervised from scratch",
    "simclr": "SimCLR",
    "simclr-invariant": "SimCLR-invariant",
    "e-simclr": "E-SimCLR",
    OLD_INPUT: "E-SimCLR, pre-0.2 augmented equivariance input",
}
#: Ablations that can be requested.
ABLATIONS = ("frozen", "old_eq_input")
#: The repository's config folder (this file lives in ``<repo>/eval``).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "photonics"
DEFAULT_OUT = Path("runs") / "phc_compare"
#: Dataset seeds by role; structure i of a file depends only on (seed, i, kind), so the roles never overlap.
DATA_SEEDS = {"unlabelled": 10, "train": 11, "test": 12}
PANEL_SIZE = (5.0, 3.8)
FIGURE_DPI = 120
PERCENT = 100.0
RESULTS_FORMAT = "essl.phc_compare/2"


@dataclass(frozen=True)
class CompareSettings:
    """Every size and hyper-parameter of the comparison (saved in results.json and printed at the start).

    Defaults: the reference's own values wherever they are not a size; :data:`SCALES` sets the sizes.
    """

    scale: str = "cpu"
    kinds: tuple[str, ...] = KINDS
    arms: tuple[str, ...] = ARMS
    ablations: tuple[str, ...] = ABLATIONS
    # data
    n_unlabelled: tuple[tuple[str, int], ...] = (("blob", 15000), ("levelset", 20480))  # per dataset
    n_train: int = 3000  # labelled training file: each seed draws its labels from it
    n_test: int = 2000
    label_settings: dict[str, Any] = field(default_factory=dict)  # {}: the benchmark labels of essl.photonics.dos
    # pretraining (overrides of the photonics configs; everything else as in the YAML files, i.e. the reference)
    width: float = 1.0  # phc_cnn width multiplier (1.0: the reference's 64/256/256 channels, 1024-d features)
    pretrain_epochs: int = 200
    pretrain_batch_size: int = 256
    pretrain_lr: float = 1e-3
    pretrain_seed: int = 0
    extra_overrides: tuple[str, ...] = ()  # further config overrides, key=value
    # regression (essl.eval.phc_regression; the reference fine-tuning)
    n_labels: tuple[int, ...] = (50, 200, 800, 3000)
    seeds: int = 3
    regress_epochs: int = 100
    regress_sample_budget: int | None = None  # cap on epochs · n_labels per model (None: always regress_epochs)
    regress_batch_size: int = 64
    regress_lr: float = 1e-4
    regress_weight_decay: float = 1e-5
    ablation_n_labels: tuple[int, ...] | None = None  # label counts of the ablation rows (None: all)
    # machine
    jobs: int = 2  # worker processes
    threads: int = 1  # torch threads per worker

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def unlabelled(self, kind: str) -> int:
        return dict(self.n_unlabelled)[kind]

    def epochs_for(self, n_labels: int) -> int:
        """Fine-tuning epochs at ``n_labels``: ``regress_epochs``, capped so that a model sees at most
        ``regress_sample_budget`` labelled structures in all."""
        if self.regress_sample_budget is None:
            return self.regress_epochs
        return max(1, min(self.regress_epochs, math.ceil(self.regress_sample_budget / n_labels)))

    def ablation_labels(self) -> tuple[int, ...]:
        return self.n_labels if self.ablation_n_labels is None else self.ablation_n_labels


#: The reference's sizes (rdangovs/essl photonics/main.py), for a GPU.
PAPER = CompareSettings(scale="paper")

#: CPU scale (the default), chosen by measurement on the 2-core machine (README, "Photonic crystals"): a
#: quarter-width encoder; 8192 unlabelled cells per dataset (cells are nearly free, epochs cost); 8 pretraining
#: epochs (256 steps against the reference's 11,700), so the SGD learning rate is 10x the reference's; fine-tuning
#: capped at 24,000 labelled-structure passes per model (100 epochs up to 240 labels, 30 at 800, 8 at 3000); the
#: reference's 2,000 test cells. Measured costs (one thread): pretraining ~1.7 ms per image pass, fine-tuning
#: ~2.0 ms per fitting structure per epoch; two workers.
CPU = CompareSettings(
    scale="cpu",
    n_unlabelled=(("blob", 8192), ("levelset", 8192)),
    width=0.25,
    pretrain_epochs=8,
    pretrain_lr=1e-2,
    regress_sample_budget=24000,
    ablation_n_labels=(50, 200),
)

#: ``--quick``: tiny sizes for tests (well under a minute): solver on a 4×4 k-grid with 13 plane waves, one short
#: pretraining epoch, a few regression epochs, one worker.
QUICK = CompareSettings(
    scale="quick",
    n_unlabelled=(("blob", 64), ("levelset", 64)),
    n_train=24,
    n_test=12,
    label_settings={"kgrid": 4, "cutoff": 2, "method": "gaussian", "sigma": 0.02},
    width=0.125,
    pretrain_epochs=1,
    pretrain_batch_size=32,
    extra_overrides=("method.kwargs.hidden_dim=32", "method.kwargs.output_dim=16", "equivariance.hidden_dim=32",
                     "trainer.log_every_n_steps=1"),
    n_labels=(8, 16),
    seeds=2,
    regress_epochs=3,
    regress_batch_size=4,
    ablation_n_labels=(8,),
    jobs=1,
)

SCALES = {"cpu": CPU, "paper": PAPER, "quick": QUICK}


# ------------------------------------------------------------------------------------------------ utilities


def _print(msg: str) -> None:
    print(msg, flush=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------- data


def data_paths(out: Path, kind: str) -> dict[str, Path]:
    """The three HDF5 files of one dataset: unlabelled (pretraining), train and test (labelled)."""
    return {role: out / "data" / f"{kind}-{role}.h5" for role in DATA_SEEDS}


def _data_task(path: str, kind: str, role: str, n: int, label_settings: dict[str, Any], threads: int) -> str:
    from essl.photonics.dataset import generate

    _set_threads(threads)
    labelled = role != "unlabelled"
    kwargs = dict(label_settings) if labelled else {}
    generate(path, kind, n, labels=labelled, seed=DATA_SEEDS[role], progress=False, **kwargs)
    return path


# ---------------------------------------------------------------------------------------------- pretraining


def arm_config(kind: str, arm: str) -> Path:
    """The YAML of a pretrained arm (the ablation arm is E-SimCLR's with other equivariance input)."""
    return CONFIG_DIR / f"{kind}_{'e-simclr' if arm == OLD_INPUT else arm}.yaml"


def pretrain_overrides(settings: CompareSettings, kind: str, arm: str, data_path: Path, run_dir: Path) -> list[str]:
    """Config overrides of one pretraining run (the YAML holds the reference recipe; these hold the sizes)."""
    extra = []
    if arm == OLD_INPUT:
        extra = ["equivariance.strict=false", f"equivariance.lattice=[{','.join(OLD_EQ_OPS[kind])}]"]
    return [
        f"data.path={data_path}",
        f"backbone.kwargs.width={settings.width}",
        f"trainer.max_epochs={settings.pretrain_epochs}",
        f"data.batch_size={settings.pretrain_batch_size}",
        f"optim.lr={settings.pretrain_lr}",
        f"seed={settings.pretrain_seed}",
        "trainer.accelerator=cpu",
        "trainer.deterministic=true",
        "progress=false",
        f"output_dir={run_dir}",
        *extra,
        *settings.extra_overrides,
    ]


#: Config keys that do not change what a run computes (ignored when deciding whether to reuse a run).
_RUN_ONLY_KEYS = ("resume", "progress")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RUN_ONLY_KEYS}


def final_equivariance_accuracy(run_dir: Path) -> float | None:
    """Mean ``train/equi_acc`` over the last epoch's logged steps of a run (None without the branch)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/equi_acc")]
    if not rows:
        return None
    last_epoch = max(int(r["epoch"]) for r in rows)
    values = [float(r["train/equi_acc"]) for r in rows if int(r["epoch"]) == last_epoch]
    return sum(values) / len(values)


def _pretrain_task(out: str, settings_dict: dict[str, Any], kind: str, arm: str, data_path: str) -> dict[str, Any]:
    """Pretrain ``arm`` on ``kind``; reuse a finished identical run, resume an interrupted one."""
    import warnings

    from essl.config import load_config, to_container
    from essl.encoder import read_encoder_file
    from essl.pretrain import CHECKPOINT, ENCODER, pretrain

    settings = _settings_from_dict(settings_dict)
    _set_threads(settings.threads)
    run_dir = Path(out) / "pretrain" / f"{kind}_{arm}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ablation's equivariance.strict=false warning is the point of it
        cfg = load_config(arm_config(kind, arm), pretrain_overrides(settings, kind, arm, Path(data_path), run_dir))
    encoder = run_dir / ENCODER
    t0 = time.perf_counter()
    if encoder.exists():
        stored = read_encoder_file(encoder)["config"]
        if _comparable(stored) != _comparable(to_container(cfg)):
            raise UserError(f"{run_dir}: holds a run with other settings; delete it or choose another --out")
        reused = True
    else:
        if (run_dir / CHECKPOINT).exists():
            cfg.resume = True
        pretrain(cfg)
        reused = False
    return {"encoder": str(encoder), "reused": reused, "seconds": round(time.perf_counter() - t0, 1),
            "equi_acc": final_equivariance_accuracy(run_dir),
            "views": list(cfg.augment.lattice),
            "predicted": cfg.equivariance.group if cfg.equivariance.weight > 0 else None,
            "eq_input_ops": list(cfg.equivariance.lattice) if cfg.equivariance.weight > 0 else None}


# ----------------------------------------------------------------------------------------------- regression


def arm_augment(kind: str, arm: str) -> str:
    """The fine-tuning augmentation of an arm: its own view symmetries (the reference's ``get_aug`` flags); the
    scratch network gets the dataset's base views (those of plain SimCLR and E-SimCLR)."""
    from essl.config import load_config

    cfg = load_config(arm_config(kind, "simclr" if arm == SCRATCH else arm), ["data.path=/unused.h5"])
    return "+".join(cfg.augment.lattice) or "none"


def regress_key(settings: CompareSettings, kind: str, arm: str, n_labels: int, mode: str,
                encoder: str | None, paths: dict[str, str]) -> dict[str, Any]:
    """Everything a regression result depends on (a cached result is reused only when this matches)."""
    return {"encoder": encoder, "train": paths["train"], "test": paths["test"], "n_labels": n_labels, "mode": mode,
            "seeds": settings.seeds, "augment": arm_augment(kind, arm), "epochs": settings.epochs_for(n_labels),
            "batch_size": settings.regress_batch_size, "lr": settings.regress_lr,
            "weight_decay": settings.regress_weight_decay, "scratch_width": settings.width,
            "threads": settings.threads, "essl_version": essl.__version__}


def _regress_task(out: str, settings_dict: dict[str, Any], kind: str, arm: str, n_labels: int, mode: str,
                  encoder: str | None, paths: dict[str, str]) -> dict[str, Any]:
    """One regression: a fine-tuned (or frozen) encoder, or the from-scratch network (``arm == SCRATCH``);
    cached as ``DIR/regress/<kind>_<arm>_<mode>_n<n>.json``."""
    from essl.eval.phc_regression import run_regression

    settings = _settings_from_dict(settings_dict)
    _set_threads(settings.threads)
    json_path = Path(out) / "regress" / f"{kind}_{arm}_{mode}_n{n_labels}.json"
    key = regress_key(settings, kind, arm, n_labels, mode, encoder, paths)
    cached = _read_json(json_path)
    if cached is not None and cached.get("compare_key") == key:
        return cached
    json_path.parent.mkdir(parents=True, exist_ok=True)
    aug = key["augment"]
    result = run_regression(
        encoder, paths["train"], paths["test"], n_labels, mode=mode, seeds=settings.seeds, augment=aug,
        scratch_augment=aug, epochs=key["epochs"], batch_size=settings.regress_batch_size, lr=settings.regress_lr,
        weight_decay=settings.regress_weight_decay, progress=False, num_threads=settings.threads,
        scratch_backbone={"name": "phc_cnn", "kwargs": {"width": settings.width}}, with_scratch=encoder is None)
    result["compare_key"] = key
    atomic_write_json(json_path, result)
    return result


# ------------------------------------------------------------------------------------------------- reporting


def _cell(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return ""
    return f"{PERCENT * summary['mean']:.2f} ± {PERCENT * summary['std']:.2f}"


def _table(title: str, rows: dict[str, dict[str, dict[str, Any]]], n_labels: Sequence[int]) -> list[str]:
    header = ["dataset", "method", *[f"{n} labels" for n in n_labels]]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(n_labels)) + "|"]
    for kind, by_arm in rows.items():
        for arm, by_n in by_arm.items():
            lines.append("| " + " | ".join([kind, LABELS.get(arm, arm), *[_cell(by_n.get(str(n))) for n in n_labels]])
                         + " |")
    return lines


def _winners(results: dict[str, Any]) -> list[str]:
    """One line per dataset: at which label counts E-SimCLR's mean error is below every other row's."""
    lines = []
    for kind, by_arm in results["errors"]["finetune"].items():
        if "e-simclr" not in by_arm:
            continue
        wins = []
        for n in results["settings"]["n_labels"]:
            mine = by_arm["e-simclr"][str(n)]["mean"]
            others = [by_n[str(n)]["mean"] for arm, by_n in by_arm.items() if arm != "e-simclr"]
            wins.append(f"{n}: {'yes' if all(mine < o for o in others) else 'no'}")
        lines.append(f"- {kind}: E-SimCLR below every other row at " + ", ".join(wins))
    return lines


def format_markdown(results: dict[str, Any]) -> str:
    """The results tables (fine-tuned; ablations; equivariance accuracy against its Bayes limit)."""
    s = results["settings"]
    seeds = s["seeds"]
    lines = _table(f"Test relative L1 DOS error (%, mean ± std over {seeds} seeds; lower is better). Every network "
                   "fine-tuned end to end (the reference protocol); scratch: the same network from random "
                   "initialisation, same optimiser, epochs and augmentation.",
                   results["errors"]["finetune"], s["n_labels"])
    lines += ["", *_winners(results)]
    if results["errors"].get("frozen"):
        lines += ["", *_table("Ablation: frozen encoders + DOS head (same optimiser and epochs).",
                              results["errors"]["frozen"], s["ablation_n_labels"] or s["n_labels"])]
    if results["errors"].get("old_eq_input"):
        lines += ["", *_table("Ablation: E-SimCLR whose equivariance input got the invariant views' operations "
                              "(essl < 0.2), fine-tuned.", results["errors"]["old_eq_input"],
                              s["ablation_n_labels"] or s["n_labels"])]
    lines += ["", "Equivariance accuracy at the end of pretraining (training batches) and its Bayes limit:", "",
              "| dataset | run | predicted | equivariance input | accuracy | Bayes limit |",
              "|---|---|---|---|---:|---:|"]
    for kind, by_arm in results["pretraining"].items():
        for arm, info in by_arm.items():
            if info.get("equi_acc") is None:
                continue
            limit = info.get("bayes_limit")
            ops = info.get("eq_input_ops") or []
            source = "raw cell" if not ops else "raw + " + ", ".join(ops)
            lines.append(f"| {kind} | {LABELS.get(arm, arm)} | {info['predicted']} | {source} | "
                         f"{PERCENT * info['equi_acc']:.1f}% | {'' if limit is None else f'{PERCENT * limit:.0f}%'} |")
    return "\n".join(lines)


def plot_errors(results: dict[str, Any], path: Path) -> None:
    """Fine-tuned error against number of labels, one line per method (± std), one panel per dataset."""
    from matplotlib.figure import Figure

    errors = results["errors"]["finetune"]
    n_labels = results["settings"]["n_labels"]
    fig = Figure(figsize=(PANEL_SIZE[0] * len(errors), PANEL_SIZE[1]), dpi=FIGURE_DPI, layout="constrained")
    axes = fig.subplots(1, len(errors), squeeze=False)[0]
    for ax, (kind, by_arm) in zip(axes, errors.items(), strict=True):
        for arm, by_n in by_arm.items():
            mean = [PERCENT * by_n[str(n)]["mean"] for n in n_labels]
            std = [PERCENT * by_n[str(n)]["std"] for n in n_labels]
            ax.errorbar(n_labels, mean, yerr=std, marker="o", capsize=3, label=LABELS.get(arm, arm),
                        linestyle="--" if arm == SCRATCH else "-")
        ax.set_xscale("log")
        ax.set_xticks(n_labels, [str(n) for n in n_labels])
        ax.minorticks_off()
        ax.set_xlabel("number of labels")
        ax.set_ylabel("test relative L1 DOS error (%)")
        ax.set_title(f"{kind} (fine-tuned)")
        ax.legend(fontsize="small")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _summary(result: dict[str, Any], which: str) -> dict[str, Any]:
    r = result["results"][which]
    return {"mean": r["mean"], "std": r["std"], "per_seed": r["per_seed"]}


def bayes_limit(kind: str, group: str | None, eq_input_ops: Sequence[str] | None) -> float | None:
    """Best achievable equivariance accuracy of a run (None when it predicts nothing or it is not known)."""
    if group is None:
        return None
    try:
        from essl.photonics.symmetry import equivariance_limit
    except ImportError:
        return None
    return float(equivariance_limit(kind, group, eq_ops=list(eq_input_ops or ())).accuracy)


# ------------------------------------------------------------------------------------------------------ main


def _settings_from_dict(d: dict[str, Any]) -> CompareSettings:
    fields = {f.name for f in dataclasses.fields(CompareSettings)}
    values = {k: v for k, v in d.items() if k in fields}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return CompareSettings(**values)


def run_compare(out: str | os.PathLike = DEFAULT_OUT, settings: CompareSettings | None = None,
                budget_minutes: float | None = None, log: Callable[[str], None] = _print) -> dict[str, Any]:
    """Run the whole comparison into ``out`` (module docstring); returns the content of results.json.

    Args:
        out: output folder (data, pretraining runs, regression JSONs, results files).
        settings: sizes and hyper-parameters (default :data:`CPU`).
        budget_minutes: wall-time budget, checked and reported (None: 90 for the CPU scale, else unchecked).
        log: where progress lines go.
    """
    import torch

    settings = settings or CPU
    _check_settings(settings)
    previous = torch.get_num_threads()  # inline tasks (one job) set torch's threads: restore them afterwards
    try:
        return _run_compare(out, settings, budget_minutes, log)
    finally:
        torch.set_num_threads(previous)


def _run_compare(out: str | os.PathLike, settings: CompareSettings, budget_minutes: float | None,
                 log: Callable[[str], None]) -> dict[str, Any]:
    if budget_minutes is None and settings.scale == "cpu":
        budget_minutes = 90.0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = settings.to_dict()
    start = time.perf_counter()
    log(f"essl phc_compare -> {out}  (essl {essl.__version__}, scale {settings.scale}, {settings.jobs} worker(s) "
        f"x {settings.threads} thread(s))")
    log("settings: " + json.dumps(sd))
    stage_seconds: dict[str, float] = {}

    def stage(name: str, tasks: list[Task]) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = run_tasks(tasks, settings.jobs, log, start)
        stage_seconds[name] = round(time.perf_counter() - t0, 1)
        log(f"[{time.perf_counter() - start:7.1f} s] == {name} done in {stage_seconds[name] / 60:.1f} min")
        return res

    paths = {kind: {r: str(p) for r, p in data_paths(out, kind).items()} for kind in settings.kinds}
    sizes = {"unlabelled": None, "train": settings.n_train, "test": settings.n_test}
    data_tasks = []
    for kind in settings.kinds:
        for role, path in paths[kind].items():
            n = settings.unlabelled(kind) if role == "unlabelled" else sizes[role]
            cost = n * (1 if role == "unlabelled" else 1000)  # labels cost ~1000x an unlabelled cell
            data_tasks.append(Task(f"data {kind} {role}", _data_task,
                                   (path, kind, role, n, dict(settings.label_settings), settings.threads), cost))
    stage("data", data_tasks)

    pre_arms = list(settings.arms) + ([OLD_INPUT] if "old_eq_input" in settings.ablations else [])
    pre_cost = {"simclr": 2.0, "simclr-invariant": 2.0, "e-simclr": 6.0, OLD_INPUT: 6.0}  # backbone passes / cell
    pre = stage("pretraining", [
        Task(f"pretrain {kind} {arm}", _pretrain_task, (str(out), sd, kind, arm, paths[kind]["unlabelled"]),
             pre_cost.get(arm, 2.0) * settings.unlabelled(kind))
        for kind in settings.kinds for arm in pre_arms])
    pretraining = {kind: {arm: pre[f"pretrain {kind} {arm}"] for arm in pre_arms} for kind in settings.kinds}
    for kind, by_arm in pretraining.items():
        for info in by_arm.values():
            info["bayes_limit"] = bayes_limit(kind, info["predicted"], info["eq_input_ops"])

    jobs: list[tuple[str, str, str, int, str | None]] = []  # (table, kind, arm, n, encoder)
    for kind in settings.kinds:
        for n in settings.n_labels:
            jobs.append(("finetune", kind, SCRATCH, n, None))
            jobs += [("finetune", kind, arm, n, pretraining[kind][arm]["encoder"]) for arm in settings.arms]
        for n in settings.ablation_labels():
            if "frozen" in settings.ablations:
                jobs += [("frozen", kind, arm, n, pretraining[kind][arm]["encoder"]) for arm in settings.arms]
            if "old_eq_input" in settings.ablations:
                jobs.append(("old_eq_input", kind, OLD_INPUT, n, pretraining[kind][OLD_INPUT]["encoder"]))
    reg_tasks = []
    for table, kind, arm, n, enc in jobs:
        mode = "frozen" if table == "frozen" else "finetune"
        cost = settings.epochs_for(n) * n * (0.2 if mode == "frozen" else 1.0)
        reg_tasks.append(Task(f"regress {table} {kind} {arm} n={n}", _regress_task,
                              (str(out), sd, kind, arm, n, mode, enc, paths[kind]), cost))
    reg = stage("regression", reg_tasks)

    errors: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    runs: dict[str, Any] = {}
    for table, kind, arm, n, enc in jobs:
        res = reg[f"regress {table} {kind} {arm} n={n}"]
        which = SCRATCH if enc is None else "encoder"
        errors.setdefault(table, {}).setdefault(kind, {}).setdefault(arm, {})[str(n)] = _summary(res, which)
        runs.setdefault(table, {}).setdefault(kind, {}).setdefault(arm, {})[str(n)] = {
            "settings": res["settings"], "elapsed_seconds": res["elapsed_seconds"],
            "val_per_seed": res["results"][which].get("val_per_seed"),
            "best_epoch": res["results"][which].get("best_epoch")}
    total = time.perf_counter() - start
    within = None if budget_minutes is None else total <= budget_minutes * 60
    results = {
        "format": RESULTS_FORMAT,
        "essl_version": essl.__version__,
        "settings": sd,
        "files": paths,
        "pretraining": pretraining,
        "errors": errors,
        "regression_runs": runs,
        "stage_seconds": stage_seconds,
        "total_seconds": round(total, 1),
        "budget_minutes": budget_minutes,
        "within_budget": within,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "metric": "relative L1 of the DOS over target points 100..399, empty lattice added back; fraction",
        "selection": "validation split of the labelled set only (the reference took the minimum test error)",
    }
    atomic_write_json(out / "results.json", results)
    table = format_markdown(results)
    atomic_write_text(out / "results.md", table + "\n\n" + _settings_note(results) + "\n")
    plot_errors(results, out / "error_vs_labels.png")
    log("")
    log(table)
    log("")
    log(f"total wall time {total / 60:.1f} min"
        + ("" if budget_minutes is None else f" (budget {budget_minutes:g} min{'' if within else ', EXCEEDED'})")
        + f"; results in {out}/results.md, results.json, error_vs_labels.png")
    if within is False:
        print(f"warning: the comparison took {total / 60:.1f} min, over the {budget_minutes:g} min budget",
              file=sys.stderr)
    return results


def _settings_note(results: dict[str, Any]) -> str:
    s = results["settings"]
    labels = json.dumps(s["label_settings"]) if s["label_settings"] else "essl.photonics.dos defaults (GGR, 20×20 k)"
    unl = ", ".join(f"{k} {n}" for k, n in s["n_unlabelled"])
    epochs = {n: _settings_from_dict(s).epochs_for(n) for n in s["n_labels"]}
    return (
        f"Settings (scale {s['scale']}): unlabelled cells {unl}; phc_cnn width {s['width']}, {s['pretrain_epochs']} "
        f"pretraining epochs, batch {s['pretrain_batch_size']}, SGD lr {s['pretrain_lr']:g}; labels {labels}; train "
        f"file {s['n_train']}, test file {s['n_test']} structures; fine-tuning Adam lr {s['regress_lr']:g}, weight "
        f"decay {s['regress_weight_decay']:g}, batch {s['regress_batch_size']}, epochs per label count "
        f"{json.dumps(epochs)}; {s['seeds']} seeds; selection on a validation split only. "
        f"{s['jobs']} worker(s) x {s['threads']} torch thread(s). Wall time {results['total_seconds'] / 60:.1f} min. "
        "Full settings and per-seed errors: results.json."
    )


def _check_settings(s: CompareSettings) -> None:
    unknown = [k for k in s.kinds if k not in KINDS] + [m for m in s.arms if m not in ARMS] + [
        a for a in s.ablations if a not in ABLATIONS]
    if unknown:
        raise UserError(f"phc_compare: unknown dataset, arm or ablation {unknown[0]!r}")
    if s.seeds < 1 or s.threads < 1 or s.jobs < 1:
        raise UserError("phc_compare: --seeds, --jobs and --threads must be >= 1")
    if max(s.n_labels) > s.n_train:
        raise UserError(f"phc_compare: n_labels {max(s.n_labels)} exceeds the train file ({s.n_train})")
    if s.ablation_n_labels is not None and not set(s.ablation_n_labels) <= set(s.n_labels):
        raise UserError("phc_compare: ablation label counts must be among n_labels")


def _parse_labels(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"numbers of labels must be >= 1, got {text!r}")
    return tuple(sorted(set(values)))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (module docstring). Exit 0 on success, 2 with a one-line message on a user error."""
    from essl.malloc import tune_malloc

    tune_malloc()  # as the `essl` command does
    parser = argparse.ArgumentParser(prog="python -m essl.eval.phc_compare", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("cpu", "paper"), default="cpu",
                        help="cpu (default: fits 90 min on 2 cores) or paper (the reference's sizes, for a GPU)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default 2; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 3; 2 with --quick)")
    parser.add_argument("--n-labels", type=_parse_labels, default=None, metavar="N,N,...",
                        help="numbers of labels (default 50,200,800,3000)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the frozen and old-input ablations")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="wall-time budget, checked and reported (default 90 for --scale cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests (well under a minute)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else SCALES[args.scale]
    changes: dict[str, Any] = {k: v for k, v in (("seeds", args.seeds), ("n_labels", args.n_labels),
                                                 ("jobs", args.jobs), ("threads", args.threads)) if v is not None}
    if args.no_ablations:
        changes["ablations"] = ()
    if args.n_labels is not None and settings.ablation_n_labels is not None:
        changes["ablation_n_labels"] = tuple(n for n in settings.ablation_n_labels if n in args.n_labels) or None
    settings = dataclasses.replace(settings, **changes)
    try:
        run_compare(args.out, settings, budget_minutes=args.budget_minutes)
    except UserError as err:
        print(f"phc_compare: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
