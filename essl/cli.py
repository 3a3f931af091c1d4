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
    """argparse with exit code 2 and a one-line message (its default, kept explicit). ``lazy_epilog``: a function
    giving the epilog, called only when the help is shown (it may import what parsing does not need)."""

    lazy_epilog = None

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        if self.lazy_epilog is not None:
            self.epilog = self.lazy_epilog()
        return super().format_help()


HELP_WIDTH = 100  # characters per line of the generated help lists


def _pretrain_epilog() -> str:
    """The config keys with their defaults (from essl.config's schema), the logger choices and the resume rule."""
    import textwrap

    from omegaconf import OmegaConf

    from essl.config import Config
    from essl.pretrain import resumable_keys_text

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    sections: dict[str, list[str]] = {}
    for key, value in flat(defaults):
        shown = ("null" if value is None else str(value).lower() if isinstance(value, bool) else
                 "''" if value == "" else value)
        if key == "output_dir" and value is None:
            shown = "runs/<name>"
        sections.setdefault(key.split(".")[0] if "." in key else "", []).append(f"{key}={shown}")
    lines = ["config keys and their defaults (a YAML file holds what differs; key=value overrides either):"]
    for items in sections.values():
        lines += textwrap.wrap("  ".join(items), HELP_WIDTH, initial_indent="  ", subsequent_indent="    ",
                               break_long_words=False, break_on_hyphens=False)
    lines += ["", "trainer.logger: csv (metrics.csv), tensorboard (tensorboard/ event files) or both.",
              "resume=true continues output_dir from last.ckpt; it refuses other settings, except (may change on "
              "resume):"]
    lines += textwrap.wrap(resumable_keys_text(), HELP_WIDTH, initial_indent="  ", subsequent_indent="  ")
    lines += ["Writes output_dir (default runs/<name>): config.yaml, metrics.csv, last.ckpt, encoder.pt; "
              "essl show shows it."]
    return "\n".join(lines)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from essl.config import load_config
    from essl.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    pretrain(cfg)  # prints the end-of-run summary line (epochs, time, final losses, the encoder's path)
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
    from essl.photonics.unitcell import parse_cell_options

    kwargs = {} if args.kgrid is None else {"kgrid": args.kgrid}
    out = generate(
        args.out,
        args.kind,
        args.n,
        labels=args.labels,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        chunk=args.chunk,
        shard=args.shard,
        cell_options=parse_cell_options(args.option, "phc generate: --option"),
        **kwargs,
    )
    print(f"essl: wrote {out}")
    return 0


def _cmd_phc_merge(args: argparse.Namespace) -> int:
    from essl.photonics.dataset import merge

    out = merge(args.out, args.shards, progress=not args.no_progress)
    print(f"essl: wrote {out}")
    return 0


def _cmd_phc_bands(args: argparse.Namespace) -> int:
    from essl.photonics.bands import run_bands, summary
    from essl.photonics.unitcell import parse_cell_options

    result = run_bands(
        args.file,
        args.index,
        kind=args.kind,
        seed=args.seed,
        options=parse_cell_options(args.option, "phc bands: --option"),
        out=args.out,
        n_bands=args.n_bands,
        polarization=args.polarization,
        cutoff=args.cutoff,
        points=args.points,
    )
    print(summary(result))
    print(f"essl: figure written to {result['out']}")
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


def _cmd_show(args: argparse.Namespace) -> int:
    from essl.show import show

    print(show(args.run_dir, plot=args.plot))
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

    pre = sub.add_parser("pretrain", help="self-supervised pretraining from a YAML config",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pre.lazy_epilog = _pretrain_epilog
    pre.add_argument("config", help="YAML config, e.g. configs/digits/e-simclr.yaml (essl list configs)")
    pre.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config overrides, e.g. trainer.max_epochs=5 (keys and defaults below)")
    pre.set_defaults(func=_cmd_pretrain)

    sh = sub.add_parser("show", help="a pretraining run: its state, resolved config, last metrics, curves")
    sh.add_argument("run_dir", metavar="RUN_DIR", help="a pretraining output_dir, e.g. runs/digits-e-simclr")
    sh.add_argument("--plot", default=None, metavar="PNG",
                    help="also write the training curves (loss, equivariance loss and accuracy, learning rate) to "
                         "this image (.png, .pdf, .svg, ...; default: no figure)")
    sh.set_defaults(func=_cmd_show)

    pr = sub.add_parser("probe", help="linear probe + kNN of a frozen encoder, with baselines")
    pr.add_argument("encoder", help="encoder.pt written by `essl pretrain`")
    pr.add_argument("--data", default=None, help="dataset name or path (default: the encoder's training data)")
    pr.add_argument("--seeds", type=int, default=5, help="number of probe seeds (default 5)")
    pr.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON (default: not written)")
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
    pr.add_argument("--no-progress", action="store_true",
                    help="no progress bars (default: bars for feature extraction and each probe fit)")
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

    phc = sub.add_parser("phc", help="photonic crystals: generate and merge data, band diagrams, DOS regression")
    phc_sub = phc.add_subparsers(dest="phc_command", required=True, parser_class=_Parser)
    gen = phc_sub.add_parser("generate", help="generate unit cells (and DOS labels) into an HDF5 file")
    from essl.photonics.unitcell import KINDS

    gen.add_argument("--kind", required=True, choices=KINDS, help=f"unit-cell generator: {', '.join(KINDS)}")
    gen.add_argument("--n", type=int, required=True, help="number of unit cells of the data set (at least 1)")
    gen.add_argument("--out", required=True, help="output HDF5 file (work in progress: OUT.partial, resumable)")
    gen.add_argument("--labels", action="store_true", help="solve bands and compute DOS labels")
    gen.add_argument("--seed", type=int, default=0, help="data set seed; structure i depends only on it and i "
                                                         "(default 0)")
    gen.add_argument("--kgrid", type=int, default=None,
                     help="k-points per side of the Brillouin-zone grid of the DOS (default 20, at least 2)")
    gen.add_argument("--device", default="cpu",
                     help="device of the band solver with --labels: cpu (default), cuda or cuda:N")
    gen.add_argument("--chunk", type=int, default=None,
                     help="structures per committed chunk (default 32 with --labels, 256 with --labels on cuda, "
                          "4096 without)")
    gen.add_argument("--shard", default=None, metavar="I/N",
                     help="write only shard I of N (0 <= I < N, whole chunks) of the data set into --out; join "
                          "the N shard files with `essl phc merge`")
    gen.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                     help="generator option, repeatable, e.g. symmetry=p4m (levelset), radius=0.2 eps_in=8.9 "
                          "(cylinder)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=_cmd_phc_generate)
    mrg = phc_sub.add_parser("merge", help="join the shard files of `phc generate --shard I/N` into one data set")
    mrg.add_argument("out", help="output HDF5 file (the whole data set)")
    mrg.add_argument("shards", nargs="+", help="the N shard files, in any order")
    mrg.add_argument("--no-progress", action="store_true", help="no progress bar")
    mrg.set_defaults(func=_cmd_phc_merge)
    bnd = phc_sub.add_parser("bands", help="band diagram (Γ–X–M–Γ) and DOS of one cell as a figure")
    bnd.add_argument("file", nargs="?", default=None, help="a data set (HDF5); or give --kind for a generated cell")
    bnd.add_argument("--index", type=int, default=0, help="structure index in the file or generator (default 0)")
    bnd.add_argument("--kind", default=None, choices=KINDS, help="draw a generated cell instead of a file's")
    bnd.add_argument("--seed", type=int, default=0, help="generator seed with --kind (default 0)")
    bnd.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                     help="generator option with --kind, repeatable (as in `phc generate`)")
    bnd.add_argument("--out", default=None, metavar="PNG",
                     help="figure file; the format follows the suffix (default <file stem>-<index>-bands.png or "
                          "<kind>[-<options>]-seed<S>-<index>-bands.png in the current folder)")
    bnd.add_argument("--n-bands", type=int, default=None, help="bands to draw (default: the file's labels, 10)")
    bnd.add_argument("--polarization", default=None, choices=("tm", "te"),
                     help="default: the file's labels (tm)")
    bnd.add_argument("--cutoff", type=int, default=None,
                     help="plane-wave cutoff |G| <= m (default: the file's labels, 5)")
    bnd.add_argument("--points", type=int, default=None, help="k-points per segment of the path (default 24)")
    bnd.set_defaults(func=_cmd_phc_bands)
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
    bench.add_argument("which", nargs="?", default="all",
                       choices=("pipeline", "train", "solver", "loader", "hostsync", "all"),
                       help="which benchmark (default all)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON (default: not written)")
    bench.add_argument("--quick", action="store_true",
                       help="tiny sizes (seconds), for smoke tests (default: full sizes)")
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
