"""``essl`` command line: ``pretrain``, ``probe``, ``phc generate|regress``, ``bench``.

Thin on purpose: parse, load the config, call library functions. A :class:`~essl.errors.UserError` (bad
config key, missing file, ...) is printed as one line on stderr with exit code 2; ``--debug`` shows the
traceback instead. This is the one place that wires ``essl.eval`` and ``essl.photonics`` to the core.
"""

from __future__ import annotations

import argparse
import os
import sys

# OpenMP threads that spin while waiting make small kornia/torch ops up to 15x slower on a shared CPU
# (measured by `essl bench`); must be set before torch is imported. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from essl import __version__
from essl.errors import UserError
from essl.malloc import tune_malloc

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line message (its default, kept explicit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from essl.config import load_config
    from essl.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    encoder = pretrain(cfg)
    print(f"essl: encoder written to {encoder}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from essl.eval.linear_probe import format_table, run_probe

    result = run_probe(
        args.encoder,
        data=args.data,
        seeds=args.seeds,
        device=args.device,
        json_path=args.json,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        protocol=args.protocol,
        epochs=args.epochs,
        train_batch_size=args.train_batch_size,
        lr=args.lr,
        equivariance=[g for g in (args.equivariance or "").split(",") if g],
    )
    print(format_table(result))
    if args.json:
        print(f"essl: results written to {args.json}")
    return 0


def _cmd_phc_generate(args: argparse.Namespace) -> int:
    from essl.photonics.dataset import generate

    kwargs = {} if args.kgrid is None else {"kgrid": args.kgrid}
    out = generate(
        args.out,
        args.kind,
        args.n,
        labels=args.labels,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        **kwargs,
    )
    print(f"essl: wrote {out}")
    return 0


def _cmd_phc_regress(args: argparse.Namespace) -> int:
    from essl.eval.phc_regression import format_regression_table, run_regression

    result = run_regression(
        None if args.encoder.lower() == "none" else args.encoder,
        args.train,
        args.test,
        args.n_labels,
        mode=args.mode,
        seeds=args.seeds,
        augment=args.augment,
        scratch_augment=args.scratch_augment,
        device=args.device,
        json_path=args.json,
        figure_path=args.figure,
        progress=not args.no_progress,
        with_scratch=not args.no_scratch,
        **{k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "backbone_lr_factor")
           if getattr(args, k) is not None},
    )
    print(format_regression_table(result))
    for label, path in (("results", args.json), ("figure", args.figure)):
        if path:
            print(f"essl: {label} written to {path}")
    return 0


LISTS = ("methods", "groups", "lattice", "backbones", "datasets", "configs")
SWEEP_TRANSFORMS = ("hflip", "vflip", "rot4", "invert", "grayscale", "jigsaw", "blur")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from essl.eval.sweep import run_sweep

    run_sweep(args.config, [t for t in args.transforms.split(",") if t], [a for a in args.arms.split(",") if a],
              seeds=args.seeds, out=args.out, weight=args.weight, probe_seeds=args.probe_seeds, jobs=args.jobs,
              threads=args.threads, overrides=args.overrides)
    return 0


def _config_dir():
    from pathlib import Path

    import essl

    return Path(essl.__file__).resolve().parent.parent / "configs"


def registry(kind: str) -> dict[str, str]:
    """Name -> one-line description of what exists: ``essl list KIND`` (each list from its own registry)."""
    if kind == "methods":
        from essl.methods import METHODS, describe

        return {name: describe(name) for name in METHODS}
    if kind == "groups":
        from essl.transforms import GROUP_INFO

        return dict(GROUP_INFO)
    if kind == "lattice":
        from essl.augment import LATTICE_OPS

        return dict(LATTICE_OPS)
    if kind == "backbones":
        from essl.backbones import BACKBONES, describe_backbone

        return {name: describe_backbone(name) for name in BACKBONES}
    if kind == "datasets":
        from essl.data import DATASETS

        return dict(DATASETS)
    folder = _config_dir()
    out = {}
    for path in sorted(folder.glob("*/*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        out[str(path.relative_to(folder.parent))] = first
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    kinds = LISTS if args.what == "all" else (args.what,)
    for kind in kinds:
        entries = registry(kind)
        if len(kinds) > 1:
            print(f"{kind}:")
        width = max((len(k) for k in entries), default=0)
        for name, text in entries.items():
            print(f"  {name:<{width}}  {text}")
        if not entries:
            print(f"  (none found under {_config_dir()})")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from essl.eval.bench import format_bench, run_bench

    result = run_bench(args.which, device=args.device, json_path=args.json, quick=args.quick, progress=True)
    print(format_bench(result))
    if args.json:
        print(f"essl: results written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="essl", description="Equivariant self-supervised learning (E-SSL) pipeline.")
    p.add_argument("--version", action="version", version=f"essl {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pre = sub.add_parser("pretrain", help="self-supervised pretraining from a YAML config")
    pre.add_argument("config", help="YAML config, e.g. configs/digits/e-simclr.yaml")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_epochs=5")
    pre.set_defaults(func=_cmd_pretrain)

    pr = sub.add_parser("probe", help="linear probe + kNN of a frozen encoder, with baselines")
    pr.add_argument("encoder", help="encoder.pt written by `essl pretrain`")
    pr.add_argument("--data", default=None, help="dataset name or path (default: the encoder's training data)")
    pr.add_argument("--seeds", type=int, default=5, help="number of probe seeds (default 5)")
    pr.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    pr.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    pr.add_argument("--batch-size", type=int, default=256,
                    help="images per forward pass when extracting features (default 256)")
    pr.add_argument("--protocol", choices=("fast", "paper"), default="fast",
                    help="fast: L-BFGS logistic regression on frozen features, penalty chosen on a validation "
                         "split of train (default); paper: the paper's SGD linear probe on augmented views "
                         "(Dangovski et al., ICLR 2022); see the README")
    pr.add_argument("--epochs", type=int, default=None,
                    help="paper protocol: training epochs (default 100, the paper's)")
    pr.add_argument("--train-batch-size", type=int, default=None,
                    help="paper protocol: images per SGD step (default 256, the paper's)")
    pr.add_argument("--lr", type=float, default=None,
                    help="paper protocol: base learning rate of the cosine schedule (default 30, the paper's)")
    pr.add_argument("--equivariance", nargs="?", const="rot4", default=None, metavar="GROUPS",
                    help="also diagnose these transformation groups (comma-separated, default rot4; `essl list "
                         "groups`): invariance of the features and predictability of the transformation")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.set_defaults(func=_cmd_probe)

    sw = sub.add_parser("sweep", help="the paper's Figure 2: each transformation as an invariance vs predicted")
    sw.add_argument("config", help="the baseline config, e.g. configs/digits/simclr.yaml")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    sw.add_argument("--transforms", default=",".join(SWEEP_TRANSFORMS),
                    help=f"comma-separated groups (default {','.join(SWEEP_TRANSFORMS)})")
    sw.add_argument("--as", dest="arms", default="invariance,equivariance",
                    help="arms beside the baseline: invariance and/or equivariance (default both)")
    sw.add_argument("--seeds", type=int, default=1, help="pretraining seeds per run (default 1)")
    sw.add_argument("--probe-seeds", type=int, default=5, help="linear-probe seeds per run (default 5)")
    sw.add_argument("--weight", type=float, default=0.4, help="λ of the equivariance arm (default 0.4)")
    sw.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes (default 1)")
    sw.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    sw.add_argument("--out", default=None, help="output folder (default runs/sweep-<config name>)")
    sw.set_defaults(func=_cmd_sweep)

    phc = sub.add_parser("phc", help="photonic crystals: generate data, DOS regression")
    phc_sub = phc.add_subparsers(dest="phc_command", required=True, parser_class=_Parser)
    gen = phc_sub.add_parser("generate", help="generate unit cells (and DOS labels) into an HDF5 file")
    from essl.photonics.unitcell import KINDS

    gen.add_argument("--kind", required=True, choices=KINDS, help=f"unit-cell generator: {', '.join(KINDS)}")
    gen.add_argument("--n", type=int, required=True, help="number of unit cells")
    gen.add_argument("--out", required=True, help="output HDF5 file")
    gen.add_argument("--labels", action="store_true", help="solve bands and compute DOS labels")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--kgrid", type=int, default=None, help="k-points per side of the Brillouin-zone grid")
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=_cmd_phc_generate)
    reg = phc_sub.add_parser("regress", help="DOS regression from a frozen or fine-tuned encoder vs from scratch")
    reg.add_argument("encoder", help="encoder.pt from `essl pretrain` on photonic data, or `none` (scratch only)")
    reg.add_argument("--train", required=True, help="labelled HDF5 file to take the training labels from")
    reg.add_argument("--test", required=True, help="labelled HDF5 file to score on")
    reg.add_argument("--n-labels", type=int, required=True, help="number of labelled training structures")
    reg.add_argument("--mode", choices=("finetune", "frozen"), default="finetune",
                     help="finetune: train the encoder with the DOS head (default, as the reference); "
                          "frozen: train the head on frozen features")
    reg.add_argument("--seeds", type=int, default=3)
    reg.add_argument("--augment", default="none",
                     help="lattice augmentation of the encoder's training batches: none, or operations applied in "
                          "order joined by '+', from c4v, flip4, flip3, rot4, shift, halfshift (e.g. flip3+rot4 "
                          "for blobs, shift+flip3 for level sets)")
    reg.add_argument("--scratch-augment", default=None,
                     help="the same for the from-scratch network (default: --augment)")
    for flag, kind, what in (("--epochs", int, "training epochs (default 100)"),
                             ("--batch-size", int, "training batch size (default 64)"),
                             ("--lr", float, "Adam learning rate of every parameter (default 1e-4)"),
                             ("--weight-decay", float, "Adam weight decay (default 1e-5)"),
                             ("--backbone-lr-factor", float,
                              "fine-tuning: the backbone's learning rate is lr times this (default 1)")):
        reg.add_argument(flag, type=kind, default=None, help=f"{what}, the reference's")
    reg.add_argument("--no-scratch", action="store_true",
                     help="skip the from-scratch baseline (it depends only on the data, labels and settings)")
    reg.add_argument("--json", default=None, metavar="PATH")
    reg.add_argument("--figure", default=None, metavar="PATH", help="predicted vs true DOS figure (PNG)")
    reg.add_argument("--device", default=None)
    reg.add_argument("--no-progress", action="store_true")
    reg.set_defaults(func=_cmd_phc_regress)

    lst = sub.add_parser("list", help="what exists: methods, transformation groups, lattice operations, backbones, "
                                      "datasets, configs")
    lst.add_argument("what", nargs="?", default="all", choices=(*LISTS, "all"), help="which list (default all)")
    lst.set_defaults(func=_cmd_list)

    bench = sub.add_parser("bench", help="speed benchmarks, measured side by side in one run")
    bench.add_argument("which", nargs="?", default="all", choices=("pipeline", "train", "solver", "all"))
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--json", default=None, metavar="PATH")
    bench.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for smoke tests")
    bench.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # reuse freed memory across training steps instead of page-faulting it in again (essl/malloc.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "seeds", 1) is not None and getattr(args, "seeds", 1) < 1:
        parser.error("--seeds must be at least 1")
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"essl: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("essl: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: one line, the traceback with --debug
        if args.debug:
            raise
        from essl.module import TrainingDiverged

        kind = "" if isinstance(err, TrainingDiverged) else f"{type(err).__name__}: "
        print(f"essl: failed: {kind}{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
              f" (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
