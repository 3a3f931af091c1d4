"""Equivariance diagnostics of a frozen encoder: ``essl probe ENCODER --equivariance [groups]``.

For each transformation group G (:data:`essl.transforms.GROUPS`) and the test images x of the probe's dataset:

* **invariance** — the mean cosine similarity of f(x) and f(g·x) over images and the non-identity elements g, beside
  the same similarity between the features of two *different* images (``cosine_other_images``, the level that
  means "no invariance at all"): 1 is perfect invariance. The features are first centred on the mean feature of
  the plain test images: post-ReLU features share a large common component (raw cosines of different digits are
  ~0.9), which would make every cosine look high; centred, different images score about 0. The raw cosines are
  kept as ``cosine_uncentred`` and ``cosine_other_images_uncentred``;
* **accuracy on transformed images** — the class-label linear probe (fitted on plain training images, the fast
  protocol of :mod:`essl.eval.linear_probe`) and the kNN classifier (plain training images as the memory bank)
  scored on g·x, averaged over the elements g (identity included, as each is equally likely);
* **predictability** — a linear probe of g itself from f(g·x) (training images under every element, labels g; test
  images likewise), against chance 1/|G|: what E-SSL trains for. An invariant representation cannot predict g; an
  equivariant one can.

This is what tells a SimCLR encoder made invariant to rotations (high invariance, rotations unpredictable) from an
E-SimCLR encoder (rotations predictable) — the distinction the paper's Figure 2 is about (Dangovski et al., ICLR
2022). Images are transformed in [0, 1] before the encoder normalises them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from essl import transforms
from essl.augment import to_float
from essl.errors import UserError
from essl.knn import knn_accuracy

from .features import extract_features

PERCENT = 100.0


def _element_features(encoder: nn.Module, x: Tensor, group: str, grid: int, batch_size: int,
                      device: torch.device, progress: bool) -> list[Tensor]:
    """Features of every image under every element of ``group``: a list of |G| (N, D) tensors."""
    h, w = x.shape[-2:]
    ops = transforms._element_ops(group, h, w, grid)
    return [extract_features(encoder, x, batch_size=batch_size, device=device, progress=progress,
                             transform=lambda xb, op=op: op(to_float(xb))) for op in ops]


def _cosines(plain: Tensor, transformed: Sequence[Tensor]) -> tuple[list[float], float]:
    """Mean cos(f(x), f(g·x)) per non-identity element, and the mean cosine of image i and image i + 1."""
    p = F.normalize(plain, dim=1)
    same = [(p * F.normalize(t, dim=1)).sum(1).mean().item() for t in transformed[1:]]
    return same, (p * p.roll(1, dims=0)).sum(1).mean().item()


def invariance_scores(plain: Tensor, transformed: Sequence[Tensor]) -> dict[str, Any]:
    """Mean cos(f(x), f(g·x)) over images and the non-identity elements (``transformed[1:]``), and the mean cosine
    between the features of different images (image i against image i + 1 of the plain set), on features centred
    on the mean of ``plain`` (``cosine``, ``cosine_other_images``, ``cosine_per_element``) and as they are
    (``*_uncentred``)."""
    plain, transformed = plain.double(), [t.double() for t in transformed]
    mean = plain.mean(0, keepdim=True)
    same, other = _cosines(plain - mean, [t - mean for t in transformed])
    same_raw, other_raw = _cosines(plain, transformed)
    return {"cosine": sum(same) / len(same), "cosine_other_images": other, "cosine_per_element": [1.0] + same,
            "cosine_uncentred": sum(same_raw) / len(same_raw), "cosine_other_images_uncentred": other_raw}


def diagnose(encoder: nn.Module, labelled: Any, groups: Sequence[str], seeds: int = 1, grid: int = 2,
             device: torch.device | str | None = None, batch_size: int = 256, knn_k: int = 200,
             knn_t: float = 0.1, progress: bool = False) -> dict[str, Any]:
    """The diagnostics of the module docstring for each group; ``labelled`` is a :class:`essl.data.LabelledData`.

    Returns ``{group: {"invariance": {...}, "linear_on_transformed", "knn_on_transformed", "linear_plain",
    "predictability": {"mean", "std", "per_seed", "chance"}}}`` (accuracies as fractions).
    """
    from .linear_probe import _summary, train_linear_probe

    unknown = [g for g in groups if g not in transforms.GROUPS]
    if unknown:
        raise UserError(f"--equivariance: {unknown[0]!r} is not one of {', '.join(transforms.GROUPS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    c = labelled.num_classes
    out: dict[str, Any] = {}
    for group in groups:
        if group == "grayscale" and labelled.channels != 3:
            out[group] = {"skipped": f"grayscale does nothing to {labelled.channels}-channel images"}
            continue
        n_el = transforms.group_size(group, grid)
        train_g = _element_features(encoder, labelled.x_train, group, grid, batch_size, device, progress)
        test_g = _element_features(encoder, labelled.x_test, group, grid, batch_size, device, progress)
        y_tr, y_te = labelled.y_train, labelled.y_test
        linear_t, linear_plain = [], []
        predict = []
        g_train = torch.arange(n_el).repeat_interleave(len(y_tr))
        g_test = torch.arange(n_el).repeat_interleave(len(y_te))
        for seed in range(seeds):
            # class labels from the plain training features, scored on every transformed copy of the test set
            linear_plain.append(train_linear_probe(train_g[0], y_tr, test_g[0], y_te, c, seed, device=device))
            linear_t.append(train_linear_probe(train_g[0], y_tr, torch.cat(test_g), y_te.repeat(n_el), c, seed,
                                               device=device))
            # the transformation itself from the transformed features
            predict.append(train_linear_probe(torch.cat(train_g), g_train, torch.cat(test_g), g_test, n_el, seed,
                                              device=device))
        knn = knn_accuracy(train_g[0].to(device), y_tr.to(device), torch.cat(test_g).to(device),
                           y_te.repeat(n_el).to(device), c, k=knn_k, temperature=knn_t)
        out[group] = {
            "elements": n_el,
            "invariance": invariance_scores(test_g[0], test_g),
            "linear_plain": _summary(linear_plain),
            "linear_on_transformed": _summary(linear_t),
            "knn_on_transformed": knn,
            "predictability": {**_summary(predict), "chance": 1.0 / n_el},
        }
    return out


def format_diagnostics(diag: dict[str, Any]) -> str:
    """The table ``essl probe --equivariance`` prints below the probe table."""
    headers = ("group", "cos f(x),f(gx)", "cos other imgs", "linear on gx (%)", "kNN on gx (%)",
               "predict g (%)", "chance (%)")
    rows = []
    for group, d in diag.items():
        if "skipped" in d:
            rows.append((group, "skipped: " + d["skipped"], "", "", "", "", ""))
            continue
        rows.append((group, f"{d['invariance']['cosine']:.3f}", f"{d['invariance']['cosine_other_images']:.3f}",
                     f"{PERCENT * d['linear_on_transformed']['mean']:.2f}", f"{PERCENT * d['knn_on_transformed']:.2f}",
                     f"{PERCENT * d['predictability']['mean']:.2f}", f"{PERCENT * d['predictability']['chance']:.1f}"))
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["equivariance diagnostics (test images; cosines of features centred on the plain images' mean; "
             "linear probes: fast protocol)",
             "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths,
                                                                                            strict=True)))]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                  strict=True))))
    return "\n".join(lines)
