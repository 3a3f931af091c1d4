"""The photonics comparison of Dangovski et al., "Equivariant Contrastive Learning" (ICLR 2022), sized for a CPU.

``python -m essl.eval.phc_compare [--out DIR] [--budget-minutes 45] [--seeds 3] [--mode frozen] [--quick]``

On both unit-cell datasets of the paper (``blob`` and ``levelset``, :mod:`essl.photonics.unitcell`) it

1. **generates data** into ``DIR/data``: an unlabelled pretraining set and labelled train and test sets, each with
   its own dataset seed (so no structure is shared between them). Complete files made with the same settings are
   reused and interrupted ones resume (:func:`essl.photonics.dataset.generate`);
2. **pretrains** SimCLR, SimCLR-invariant and E-SimCLR from ``configs/photonics/<kind>_<method>.yaml`` (λ = 5,
   NT-Xent temperature 0.1, the paper's lattice views) with CPU-sized overrides (:class:`CompareSettings`) into
   ``DIR/pretrain/<kind>_<method>``. A finished run whose stored config equals the requested one is reused, an
   interrupted one resumes from its checkpoint;
3. **regresses the DOS** (:func:`essl.eval.phc_regression.run_regression`, protocol in its module docstring) for
   every number of labels in ``n_labels``, ``seeds`` seeds each: a DOS head on each *frozen* encoder (default;
   ``--mode finetune`` trains the whole network instead, about 3× the regression time), and the same network
   trained from scratch on the same labels (run once per dataset and number of labels, not once per encoder:
   its result does not depend on the encoder). Every run is saved as ``DIR/regress/*.json`` and reused when its
   settings match;
4. **reports**: ``DIR/results.md`` (Markdown table: dataset × method rows, one column per number of labels,
   test relative L1 DOS error in %, mean ± std over seeds), ``DIR/results.json`` (every setting, every seed's
   error, stage times) and ``DIR/error_vs_labels.png`` (error against labels, one line per method, one panel
   per dataset).

Why these sizes (the defaults of :class:`CompareSettings`). The whole run must fit 45 minutes on a 2-core CPU
that is shared with other jobs. Measured on that machine under a load average of 7-9 (one torch thread):

* labels: the default labels of :mod:`essl.photonics.dos` (GGR DOS on a 20×20 k-grid, 81 plane waves, σ = 0.006)
  at 25-31 structures/s on the idle machine since the reduced-basis solver (one thread): 900 labelled cells per
  dataset in under a minute. (Earlier runs used a Gaussian DOS, σ = 0.02, on a 16×16 grid with cutoff 4 for speed,
  2.5% relative L1 away from these labels);
* pretraining (phc_cnn at width 0.25, batch 128): one epoch over 2048 maps takes ~16 s for SimCLR and
  ~45 s for E-SimCLR, whose equivariance branch runs the backbone on all 4 transformed copies of the batch;
* regression: a from-scratch network with 100 epochs takes 13 s (50 labels) to 51 s (200 labels) per seed; a
  head on frozen features 1-5 s. Fine-tuning costs as much as training from scratch, once per encoder.

A first full run with 6 pretraining epochs took 16.7 min (load average 2-9): data 1.0 min, pretraining 10.1 min
(per dataset: SimCLR 47-94 s, SimCLR-invariant 46-92 s, E-SimCLR 155-174 s), regression 5.6 min (from scratch
20-102 s per dataset and number of labels, 3 seeds; frozen heads 1-5 s). The default of 12 epochs doubles the
pretraining; measured (load average 4-5): 23.1 min in all, data 0.7 min, pretraining 17.2 min (per dataset:
SimCLR 90-103 s, SimCLR-invariant 76-91 s, E-SimCLR 317-357 s), regression 5.2 min. With the default GGR labels
(idle machine): 17.1 min, data 1.3 min, pretraining 11.0 min (SimCLR 60-65 s, SimCLR-invariant 57-59 s, E-SimCLR
207-212 s), regression 4.8 min. Inside the 45-minute budget with a margin for heavier load.

Two torch threads were measured 2-4× *slower* than one on the loaded machine, so the run uses one
(``--threads``). Sizes never depend on the budget or on measured times: the result is a function of the
settings and seeds only. ``--budget-minutes`` is checked, not enforced: every stage prints its wall time, and
the run warns (and records) when the total exceeds the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import essl
from essl.errors import UserError
from essl.io import atomic_write, atomic_write_json, atomic_write_text

# --------------------------------------------------------------------------------------------------- settings

#: The two datasets of the paper's photonics experiment.
KINDS = ("blob", "levelset")
#: Pretraining methods, each a config ``configs/photonics/<kind>_<method>.yaml``.
METHODS = ("simclr", "simclr-invariant", "e-simclr")
#: Name of the from-scratch baseline in tables, JSON and the plot.
SCRATCH = "scratch"
#: Row labels of the results table.
METHOD_LABELS = {
    SCRATCH: "supervised from scratch",
    "simclr": "SimCLR",
    "simclr-invariant": "SimCLR-invariant",
    "e-simclr": "E-SimCLR",
}
#: The repository's config folder (this file lives in ``<repo>/eval``).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "photonics"
#: Default output folder.
DEFAULT_OUT = Path("runs") / "phc_compare"
#: The CPU budget of the issue, in minutes.
DEFAULT_BUDGET_MINUTES = 45.0
#: Dataset seeds by role; structure i of a file depends only on (seed, i, kind), so the roles never overlap.
DATA_SEEDS = {"unlabelled": 10, "train": 11, "test": 12}
#: Matplotlib figure: size per dataset panel (inches) and resolution.
PANEL_SIZE = (5.0, 3.8)
FIGURE_DPI = 120
#: Percent per fraction (errors are stored as fractions and shown in %).
PERCENT = 100.0
#: results.json schema tag.
RESULTS_FORMAT = "essl.phc_compare/1"


@dataclass(frozen=True)
class CompareSettings:
    """Every size and hyper-parameter of the comparison (saved in results.json and printed at the start).

    Defaults: the full CPU run (module docstring for the measurements behind them). :data:`QUICK` shrinks them.
    """

    kinds: tuple[str, ...] = KINDS
    methods: tuple[str, ...] = METHODS
    # data
    n_unlabelled: int = 2048  # pretraining maps per dataset
    n_train: int = 400  # labelled training file: each seed draws its n_labels from it
    n_test: int = 500  # labelled test file, scored once per trained model
    label_settings: dict[str, Any] = field(default_factory=dict)  # {}: the benchmark labels of essl.photonics.dos
    # pretraining (overrides of the photonics configs; everything else as in the YAML files)
    width: float = 0.25  # phc_cnn width multiplier (1.0 = the paper's 64/256/256 channels, 1024-d features)
    pretrain_epochs: int = 12
    pretrain_batch_size: int = 128
    warmup_epochs: float = 1.0  # the YAML's 5 warm-up epochs assume 100 epochs
    pretrain_seed: int = 0
    extra_overrides: tuple[str, ...] = ()  # further config overrides, key=value
    # regression (essl.eval.phc_regression)
    n_labels: tuple[int, ...] = (50, 100, 200)
    seeds: int = 3
    mode: str = "frozen"
    regress_epochs: int = 100
    regress_batch_size: int = 32
    augment: str = "none"
    # machine
    threads: int = 1  # torch intra-op threads (module docstring: 1 beats 2 on the shared 2-core machine)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


#: ``--quick``: tiny sizes for tests (well under a minute): solver on a 4×4 k-grid with 13 plane waves, one short
#: pretraining epoch, 3 regression epochs.
QUICK = CompareSettings(
    n_unlabelled=64,
    n_train=24,
    n_test=12,
    label_settings={"kgrid": 4, "cutoff": 2, "method": "gaussian", "sigma": 0.02},
    width=0.125,
    pretrain_epochs=1,
    pretrain_batch_size=32,
    warmup_epochs=0.0,
    extra_overrides=("method.kwargs.hidden_dim=32", "method.kwargs.output_dim=16", "equivariance.hidden_dim=32",
                     "trainer.log_every_n_steps=1"),
    n_labels=(8, 16),
    seeds=2,
    regress_epochs=3,
    regress_batch_size=4,
)


# ------------------------------------------------------------------------------------------------ utilities


class StageTimer:
    """Wall time of named stages, printed as each ends."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn()``, print and record its wall time under ``name``."""
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.log(f"[{self.total():7.1f} s] {name}: {self.seconds[name]:.1f} s")
        return out

    def total(self) -> float:
        """Seconds since the timer was created."""
        return time.perf_counter() - self.start


def _print(msg: str) -> None:
    print(msg, flush=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------- data


def data_paths(out: Path, kind: str) -> dict[str, Path]:
    """The three HDF5 files of one dataset: unlabelled (pretraining), train and test (labelled)."""
    return {role: out / "data" / f"{kind}-{role}.h5" for role in DATA_SEEDS}


def prepare_data(out: Path, settings: CompareSettings, kind: str) -> dict[str, Path]:
    """Generate (or reuse, or resume) the pretraining, train and test files of ``kind``."""
    from essl.photonics.dataset import generate

    paths = data_paths(out, kind)
    sizes = {"unlabelled": settings.n_unlabelled, "train": settings.n_train, "test": settings.n_test}
    for role, path in paths.items():
        labelled = role != "unlabelled"
        kwargs = dict(settings.label_settings) if labelled else {}
        generate(path, kind, sizes[role], labels=labelled, seed=DATA_SEEDS[role], progress=False, **kwargs)
    return paths


# ---------------------------------------------------------------------------------------------- pretraining


def pretrain_overrides(settings: CompareSettings, data_path: Path, run_dir: Path) -> list[str]:
    """Config overrides of one pretraining run (the YAML holds the method; these hold the CPU sizes)."""
    return [
        f"data.path={data_path}",
        f"backbone.kwargs.width={settings.width}",
        f"trainer.max_epochs={settings.pretrain_epochs}",
        f"data.batch_size={settings.pretrain_batch_size}",
        f"optim.warmup_epochs={settings.warmup_epochs}",
        f"seed={settings.pretrain_seed}",
        "trainer.accelerator=cpu",
        "trainer.deterministic=true",
        "progress=false",
        f"output_dir={run_dir}",
        *settings.extra_overrides,
    ]


#: Config keys that do not change what a run computes (ignored when deciding whether to reuse a run).
_RUN_ONLY_KEYS = ("resume", "progress")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RUN_ONLY_KEYS}


def pretrain_encoder(out: Path, settings: CompareSettings, kind: str, method: str, data_path: Path) -> Path:
    """Pretrain ``method`` on ``kind`` -> encoder.pt; reuse a finished identical run, resume an interrupted one."""
    from essl.config import load_config, to_container
    from essl.encoder import read_encoder_file
    from essl.pretrain import CHECKPOINT, ENCODER, pretrain

    run_dir = out / "pretrain" / f"{kind}_{method}"
    cfg = load_config(CONFIG_DIR / f"{kind}_{method}.yaml", pretrain_overrides(settings, data_path, run_dir))
    encoder = run_dir / ENCODER
    if encoder.exists():
        stored = read_encoder_file(encoder)["config"]
        if _comparable(stored) == _comparable(to_container(cfg)):
            _print(f"  {encoder}: reused (same config)")
            return encoder
        raise UserError(f"{run_dir}: holds a run with other settings; delete it or choose another --out")
    if (run_dir / CHECKPOINT).exists():
        cfg.resume = True
    return pretrain(cfg)


# ----------------------------------------------------------------------------------------------- regression


def _regression_kwargs(settings: CompareSettings) -> dict[str, Any]:
    return {
        "mode": settings.mode,
        "seeds": settings.seeds,
        "augment": settings.augment,
        "epochs": settings.regress_epochs,
        "batch_size": settings.regress_batch_size,
    }


def regress(out: Path, settings: CompareSettings, kind: str, method: str, n_labels: int,
            encoder: Path | None, paths: dict[str, Path]) -> dict[str, Any]:
    """One regression (an encoder's head, or the from-scratch baseline for ``method == SCRATCH``), cached as
    ``DIR/regress/<kind>_<method>_n<n_labels>.json`` and reused when its settings match."""
    from essl.eval.phc_regression import run_regression

    json_path = out / "regress" / f"{kind}_{method}_n{n_labels}.json"
    kwargs = _regression_kwargs(settings)
    key = {"encoder": None if encoder is None else str(encoder), "train": str(paths["train"]),
           "test": str(paths["test"]), "n_labels": n_labels, **kwargs,
           "scratch_width": settings.width, "threads": settings.threads}
    cached = _read_json(json_path)
    if cached is not None and cached.get("compare_key") == key:
        return cached
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result = run_regression(
        encoder, paths["train"], paths["test"], n_labels, progress=False, num_threads=settings.threads,
        scratch_backbone={"name": "phc_cnn", "kwargs": {"width": settings.width}},
        with_scratch=encoder is None, **kwargs,
    )
    result["compare_key"] = key
    atomic_write_json(json_path, result)
    return result


# ------------------------------------------------------------------------------------------------- reporting


def _cell(summary: dict[str, Any]) -> str:
    return f"{PERCENT * summary['mean']:.2f} ± {PERCENT * summary['std']:.2f}"


def format_markdown(results: dict[str, Any]) -> str:
    """The Markdown results table: one row per dataset × method, one column per number of labels."""
    n_labels = results["settings"]["n_labels"]
    seeds = results["settings"]["seeds"]
    mode = results["settings"]["mode"]
    header = ["dataset", "method", *[f"{n} labels" for n in n_labels]]
    lines = [
        f"Test relative L1 DOS error (%, mean ± std over {seeds} seeds; lower is better). Pretrained encoders: "
        f"{mode} encoder + DOS head; scratch: the same network trained end to end on the same labels.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * len(n_labels)) + "|",
    ]
    for kind, by_method in results["errors"].items():
        for method, by_n in by_method.items():
            cells = [_cell(by_n[str(n)]) for n in n_labels]
            lines.append("| " + " | ".join([kind, METHOD_LABELS.get(method, method), *cells]) + " |")
    return "\n".join(lines)


def plot_errors(results: dict[str, Any], path: Path) -> None:
    """Error against number of labels, one line per method (± std band), one panel per dataset."""
    from matplotlib.figure import Figure

    errors = results["errors"]
    n_labels = results["settings"]["n_labels"]
    fig = Figure(figsize=(PANEL_SIZE[0] * len(errors), PANEL_SIZE[1]), dpi=FIGURE_DPI, layout="constrained")
    axes = fig.subplots(1, len(errors), squeeze=False)[0]
    for ax, (kind, by_method) in zip(axes, errors.items(), strict=True):
        for method, by_n in by_method.items():
            mean = [PERCENT * by_n[str(n)]["mean"] for n in n_labels]
            std = [PERCENT * by_n[str(n)]["std"] for n in n_labels]
            ax.errorbar(n_labels, mean, yerr=std, marker="o", capsize=3, label=METHOD_LABELS.get(method, method),
                        linestyle="--" if method == SCRATCH else "-")
        ax.set_xscale("log")
        ax.set_xticks(n_labels, [str(n) for n in n_labels])
        ax.minorticks_off()
        ax.set_xlabel("number of labels")
        ax.set_ylabel("test relative L1 DOS error (%)")
        ax.set_title(kind)
        ax.legend(fontsize="small")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _summary(result: dict[str, Any], kind_key: str) -> dict[str, Any]:
    r = result["results"][kind_key]
    return {"mean": r["mean"], "std": r["std"], "per_seed": r["per_seed"]}


# ------------------------------------------------------------------------------------------------------ main


def run_compare(out: str | os.PathLike = DEFAULT_OUT, settings: CompareSettings | None = None,
                budget_minutes: float = DEFAULT_BUDGET_MINUTES, quick: bool = False,
                log: Callable[[str], None] = _print) -> dict[str, Any]:
    """Run the whole comparison into ``out`` (module docstring); returns the content of results.json.

    Args:
        out: output folder (data, pretraining runs, regression JSONs, results files).
        settings: sizes and hyper-parameters (default: :class:`CompareSettings`, or :data:`QUICK` with ``quick``).
        budget_minutes: wall-time budget; exceeding it is reported (a warning and ``within_budget: false``).
        quick: tiny sizes for tests (:data:`QUICK`) when ``settings`` is None; recorded in results.json.
        log: where progress lines go.
    """
    settings = settings or (QUICK if quick else CompareSettings())
    _check_settings(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        log(f"essl phc_compare -> {out}  (essl {essl.__version__}, torch {torch.__version__}, "
            f"{settings.threads} thread(s), budget {budget_minutes:g} min)")
        log("settings: " + json.dumps(settings.to_dict()))
        timer = StageTimer(log)
        paths = {}
        for kind in settings.kinds:
            paths[kind] = timer.run(f"data {kind}", lambda kind=kind: prepare_data(out, settings, kind))
        encoders: dict[str, dict[str, Path]] = {kind: {} for kind in settings.kinds}
        for kind in settings.kinds:
            for method in settings.methods:
                encoders[kind][method] = timer.run(
                    f"pretrain {kind} {method}",
                    lambda kind=kind, method=method: pretrain_encoder(
                        out, settings, kind, method, paths[kind]["unlabelled"]))
        errors: dict[str, dict[str, dict[str, Any]]] = {}
        runs: dict[str, dict[str, dict[str, Any]]] = {}
        for kind in settings.kinds:
            errors[kind] = {m: {} for m in (SCRATCH, *settings.methods)}
            runs[kind] = {m: {} for m in (SCRATCH, *settings.methods)}
            for n in settings.n_labels:
                for method in (SCRATCH, *settings.methods):
                    enc = None if method == SCRATCH else encoders[kind][method]
                    res = timer.run(f"regress {kind} {method} n={n}",
                                    lambda kind=kind, method=method, n=n, enc=enc: regress(
                                        out, settings, kind, method, n, enc, paths[kind]))
                    errors[kind][method][str(n)] = _summary(res, SCRATCH if enc is None else "encoder")
                    runs[kind][method][str(n)] = {"settings": res["settings"], "protocol": res["protocol"],
                                                  "elapsed_seconds": res["elapsed_seconds"]}
        total = timer.total()
        within = total <= budget_minutes * 60
        results = {
            "format": RESULTS_FORMAT,
            "essl_version": essl.__version__,
            "torch_version": torch.__version__,
            "settings": settings.to_dict(),
            "quick": quick or settings == QUICK,
            "files": {k: {r: str(p) for r, p in v.items()} for k, v in paths.items()},
            "encoders": {k: {m: str(p) for m, p in v.items()} for k, v in encoders.items()},
            "errors": errors,
            "regression_runs": runs,
            "stage_seconds": timer.seconds,
            "total_seconds": round(total, 2),
            "budget_minutes": budget_minutes,
            "within_budget": within,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "metric": "relative L1 of the DOS over target points 100..399, empty lattice added back; fraction",
        }
        atomic_write_json(out / "results.json", results)
        table = format_markdown(results)
        atomic_write_text(out / "results.md", table + "\n\n" + _settings_note(results) + "\n")
        plot_errors(results, out / "error_vs_labels.png")
        log("")
        log(table)
        log("")
        log(f"total wall time {total / 60:.1f} min (budget {budget_minutes:g} min"
            f"{'' if within else ', EXCEEDED'}); results in {out}/results.md, results.json, error_vs_labels.png")
        if not within:
            print(f"warning: the comparison took {total / 60:.1f} min, over the {budget_minutes:g} min budget",
                  file=sys.stderr)
        return results
    finally:
        torch.set_num_threads(previous_threads)


def _settings_note(results: dict[str, Any]) -> str:
    s = results["settings"]
    labels = json.dumps(s["label_settings"]) if s["label_settings"] else "essl.photonics.dos defaults (GGR, 20×20 k)"
    return (
        f"Settings: {s['n_unlabelled']} unlabelled maps per dataset for pretraining; phc_cnn width {s['width']}, "
        f"{s['pretrain_epochs']} epochs, batch {s['pretrain_batch_size']}; labels {labels}; "
        f"train file {s['n_train']}, test file {s['n_test']} structures; regression mode {s['mode']}, "
        f"{s['regress_epochs']} epochs, batch {s['regress_batch_size']}, augment {s['augment']}, {s['seeds']} seeds; "
        f"{s['threads']} torch thread(s). Wall time {results['total_seconds'] / 60:.1f} min "
        f"(budget {results['budget_minutes']:g} min). Full settings and per-seed errors: results.json."
    )


def _check_settings(s: CompareSettings) -> None:
    from essl.eval.phc_regression import MODES

    unknown = [k for k in s.kinds if k not in KINDS] + [m for m in s.methods if m not in METHODS]
    if unknown:
        raise UserError(f"phc_compare: unknown dataset or method {unknown[0]!r}")
    if s.mode not in MODES:
        raise UserError(f"phc_compare: --mode {s.mode!r}: expected one of {', '.join(MODES)}")
    if s.seeds < 1 or s.threads < 1:
        raise UserError("phc_compare: --seeds and --threads must be >= 1")
    if max(s.n_labels) > s.n_train:
        raise UserError(f"phc_compare: n_labels {max(s.n_labels)} exceeds the train file ({s.n_train})")


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
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                        help="wall-time budget, checked and reported (default 45)")
    parser.add_argument("--seeds", type=int, default=None, help="regression seeds (default 3; 2 with --quick)")
    parser.add_argument("--n-labels", type=_parse_labels, default=None, metavar="N,N,...",
                        help="numbers of labels (default 50,100,200)")
    parser.add_argument("--mode", choices=("frozen", "finetune"), default=None,
                        help="regression from the frozen encoder (default) or fine-tuned")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests (well under a minute)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else CompareSettings()
    changes = {k: v for k, v in (("seeds", args.seeds), ("n_labels", args.n_labels), ("mode", args.mode),
                                 ("threads", args.threads)) if v is not None}
    settings = dataclasses.replace(settings, **changes)
    try:
        run_compare(args.out, settings, budget_minutes=args.budget_minutes, quick=args.quick)
    except UserError as err:
        print(f"phc_compare: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
