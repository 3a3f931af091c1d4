"""``essl sweep``: the Figure 2 protocol of Dangovski et al., "Equivariant Contrastive Learning" (ICLR 2022).

For each transformation of a list (hflip, vflip, rot4, invert, grayscale, jigsaw, blur, ...; ``essl list groups``),
three pretrainings from one config, each probed with the same linear probe:

* the **baseline**: the config as it is (the plain method, λ = 0 unless the config says otherwise);
* **invariance**: the transformation added to the invariant views (``augment.groups``: a random element per view);
* **equivariance** (E-SSL): the transformation predicted by the equivariance head (``equivariance.group``, weight λ,
  the paper's crop view with the same colour operations, minus the one being predicted).

The result is the relative change of the linear-probe accuracy against the baseline, (acc − acc₀) / acc₀, per
transformation and arm: the paper's question of whether a transformation is better made invariant, predicted, or
left alone. Every run is cached under ``OUT/runs/<arm>-<transform>-s<seed>`` (an interrupted sweep resumes; finished
runs with the same config are reused), and the sweep writes ``OUT/sweep.json`` (every run), ``OUT/sweep.md`` (the
table) and ``OUT/sweep.png`` (the bar plot). A transformation that does not apply to the data (grayscale on
one-channel images) is reported as skipped, with the reason.

Sized for the embedded digits on a CPU by default (the config's own sizes); the same command with a CIFAR-10 config
on a GPU is the paper's experiment.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import essl
from essl.errors import UserError
from essl.io import atomic_write, atomic_write_json, atomic_write_text
from essl.runtime import Task, run_tasks

ARMS = ("invariance", "equivariance")
DEFAULT_TRANSFORMS = ("hflip", "vflip", "rot4", "invert", "grayscale", "jigsaw", "blur")
#: λ of the equivariance arm (the paper's CIFAR-10 value).
DEFAULT_WEIGHT = 0.4
#: Crop view operation that equals the predicted transformation, switched off in the equivariance arm so that its
#: elements stay distinguishable (essl.config refuses the combination otherwise).
SAME_OP = {"hflip": "hflip_prob", "flip4": "hflip_prob", "c4v": "hflip_prob", "grayscale": "grayscale_prob",
           "blur": "blur_prob", "invert": "solarize_prob"}
PERCENT = 100.0
FIGURE_SIZE = (8.0, 4.0)
FIGURE_DPI = 120


def run_overrides(arm: str, transform: str | None, seed: int, run_dir: Path, weight: float,
                  extra: Sequence[str]) -> list[str]:
    """Config overrides of one run of the sweep (``arm`` = baseline | invariance | equivariance)."""
    out = [f"seed={seed}", f"output_dir={run_dir}", "progress=false", *extra]
    if arm == "invariance":
        out.append(f"augment.groups=[{transform}]")
    elif arm == "equivariance":
        out += [f"equivariance.weight={weight}", f"equivariance.group={transform}", "equivariance.view=crop"]
        if transform in SAME_OP:
            out.append(f"equivariance.{SAME_OP[transform]}=0.0")
    return out


def _skip_reason(transform: str, channels: int) -> str | None:
    if transform == "grayscale" and channels != 3:
        return f"grayscale does nothing to {channels}-channel images"
    return None


def _run_task(config: str, overrides: list[str], probe_seeds: int, threads: int) -> dict[str, Any]:
    """Pretrain (or reuse a finished identical run) and probe; cached as ``probe.json`` in the run folder."""
    import torch

    previous = torch.get_num_threads()  # restored afterwards: with one job the task runs in the caller's process
    torch.set_num_threads(threads)
    try:
        return _run(config, overrides, probe_seeds)
    finally:
        torch.set_num_threads(previous)


def _run(config: str, overrides: list[str], probe_seeds: int) -> dict[str, Any]:
    from essl.config import load_config, to_container
    from essl.encoder import read_encoder_file
    from essl.eval.linear_probe import run_probe
    from essl.pretrain import CHECKPOINT, ENCODER, pretrain

    cfg = load_config(config, overrides)
    run_dir = Path(cfg.output_dir)
    encoder = run_dir / ENCODER
    probe_json = run_dir / "probe.json"
    comparable = {k: v for k, v in to_container(cfg).items() if k not in ("resume", "progress")}
    if encoder.exists():
        stored = {k: v for k, v in read_encoder_file(encoder)["config"].items() if k not in ("resume", "progress")}
        if stored != comparable:
            raise UserError(f"{run_dir}: holds a run with other settings; delete it or choose another --out")
    else:
        if (run_dir / CHECKPOINT).exists():
            cfg.resume = True
        pretrain(cfg)
    cached = _read_json(probe_json)
    if cached is None or cached.get("seeds") != probe_seeds:
        result = run_probe(encoder, seeds=probe_seeds, progress=False, baselines=False)
        cached = {"seeds": probe_seeds, "linear": result["linear"], "knn": result["knn"]}
        atomic_write_json(probe_json, cached)
    return {"run_dir": str(run_dir), "overrides": overrides, **cached}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_sweep(config: str | os.PathLike, transforms: Sequence[str] = DEFAULT_TRANSFORMS,
              arms: Sequence[str] = ARMS, seeds: int = 1, out: str | os.PathLike | None = None,
              weight: float = DEFAULT_WEIGHT, probe_seeds: int = 5, jobs: int = 1, threads: int = 1,
              overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep (module docstring); returns what ``sweep.json`` holds.

    Args:
        config: the baseline config (e.g. configs/digits/simclr.yaml).
        transforms: transformation groups (:data:`essl.transforms.GROUPS`).
        arms: which of "invariance" and "equivariance" to run beside the baseline.
        seeds: pretraining seeds per run (the probe has its own ``probe_seeds``).
        out: output folder (default ``runs/sweep-<config name>``).
        weight: λ of the equivariance arm.
        jobs, threads: worker processes and torch threads per worker.
        overrides: config overrides applied to every run.
    """
    from essl import transforms as tf
    from essl.config import load_config
    from essl.data import load_labelled

    base_cfg = load_config(config, list(overrides))
    unknown = [t for t in transforms if t not in tf.GROUPS]
    if unknown:
        raise UserError(f"--transforms: {unknown[0]!r} is not one of {', '.join(tf.GROUPS)}")
    bad_arms = [a for a in arms if a not in ARMS]
    if bad_arms or not arms:
        raise UserError(f"--as: expected invariance and/or equivariance, got {','.join(arms) or 'nothing'}")
    if seeds < 1 or probe_seeds < 1 or jobs < 1:
        raise UserError("--seeds, --probe-seeds and --jobs must be >= 1")
    out = Path(out) if out is not None else Path("runs") / f"sweep-{base_cfg.name}"
    out.mkdir(parents=True, exist_ok=True)
    channels = load_labelled(base_cfg.data.name, base_cfg.data.image_size, base_cfg.data.path).channels
    skipped = {t: r for t in transforms if (r := _skip_reason(t, channels))}
    start = time.perf_counter()
    log(f"essl sweep {config} -> {out}: {len(transforms)} transformations x {list(arms)} + baseline, {seeds} seed(s)")
    tasks, keys = [], {}
    for seed in range(seeds):
        runs = [("baseline", None)] + [(arm, t) for t in transforms if t not in skipped for arm in arms]
        for arm, t in runs:
            name = f"{arm}-{t or 'none'}-s{seed}"
            ovr = run_overrides(arm, t, seed, out / "runs" / name, weight, overrides)
            load_config(config, ovr)  # refuse a bad combination before any training
            keys[name] = (arm, t, seed)
            tasks.append(Task(name, _run_task, (str(config), ovr, probe_seeds, threads),
                              cost=2.0 if arm == "equivariance" else 1.0))
    results = run_tasks(tasks, jobs, log, start)
    runs_out = {name: {"arm": a, "transform": t, "seed": s, **results[name]} for name, (a, t, s) in keys.items()}
    table = summarise(runs_out, transforms, arms, skipped)
    total = time.perf_counter() - start
    result = {"format": "essl.sweep/1", "essl_version": essl.__version__, "config": str(config),
              "overrides": list(overrides), "transforms": list(transforms), "arms": list(arms), "seeds": seeds,
              "probe_seeds": probe_seeds, "weight": weight, "skipped": skipped, "summary": table, "runs": runs_out,
              "total_seconds": round(total, 1)}
    atomic_write_json(out / "sweep.json", result)
    text = format_table(result)
    atomic_write_text(out / "sweep.md", text + "\n")
    plot_sweep(result, out / "sweep.png")
    log("")
    log(text)
    log(f"\nsweep took {total / 60:.1f} min; {out}/sweep.md, sweep.json, sweep.png")
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(runs: dict[str, Any], transforms: Sequence[str], arms: Sequence[str],
              skipped: dict[str, str]) -> dict[str, Any]:
    """Per transformation and arm: linear accuracy (mean over pretraining seeds) and its relative change against the
    baseline of the same seed, (acc − acc₀) / acc₀, mean ± std over seeds."""
    base = {r["seed"]: r["linear"]["mean"] for r in runs.values() if r["arm"] == "baseline"}
    b_mean, b_std = _mean_std(list(base.values()))
    summary: dict[str, Any] = {"baseline": {"linear": b_mean, "linear_std": b_std}}
    for t in transforms:
        if t in skipped:
            summary[t] = {"skipped": skipped[t]}
            continue
        row = {}
        for arm in arms:
            mine = {r["seed"]: r["linear"]["mean"] for r in runs.values() if r["arm"] == arm and r["transform"] == t}
            rel = [(mine[s] - base[s]) / base[s] for s in sorted(mine)]
            acc_mean, acc_std = _mean_std(list(mine.values()))
            rel_mean, rel_std = _mean_std(rel)
            row[arm] = {"linear": acc_mean, "linear_std": acc_std, "relative": rel_mean, "relative_std": rel_std}
        summary[t] = row
    return summary


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per transformation, the linear-probe accuracy of each arm and its change against the
    baseline."""
    s, arms = result["summary"], result["arms"]
    base = s["baseline"]
    lines = [f"Linear probe accuracy (%, fast protocol, {result['probe_seeds']} probe seeds; {result['seeds']} "
             f"pretraining seed(s)) and relative change against the baseline "
             f"({PERCENT * base['linear']:.2f}%): {result['config']}", "",
             "| transformation | " + " | ".join(f"{a} (%)" for a in arms) + " | "
             + " | ".join(f"{a}: change" for a in arms) + " |",
             "|---|" + "---:|" * (2 * len(arms))]
    for t in result["transforms"]:
        row = s[t]
        if "skipped" in row:
            lines.append(f"| {t} | " + " | ".join(["skipped"] * len(arms)) + " | " + row["skipped"]
                         + " |" * len(arms))
            continue
        accs = [f"{PERCENT * row[a]['linear']:.2f}" for a in arms]
        rel = [f"{PERCENT * row[a]['relative']:+.2f}%" for a in arms]
        lines.append(f"| {t} | " + " | ".join(accs + rel) + " |")
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Bar plot of the relative linear-probe change per transformation, one bar per arm (the paper's Figure 2)."""
    from matplotlib.figure import Figure

    s, arms = result["summary"], result["arms"]
    names = [t for t in result["transforms"] if "skipped" not in s[t]]
    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [PERCENT * s[t][arm]["relative"] for t in names], width,
               yerr=[PERCENT * s[t][arm]["relative_std"] for t in names], capsize=3, label=arm)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("linear probe change vs baseline (%)")
    ax.set_title(f"{Path(result['config']).name}: invariance vs equivariance")
    ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - the CLI is `essl sweep`
    from essl.cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])
