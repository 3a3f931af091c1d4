"""essl.eval.phc_regression: the DOS error against a naive computation, heads learn what determines the target,
validation-only selection, ``run_regression`` end to end on tiny labelled files, one-line user errors."""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from essl.backbones import build_backbone
from essl.encoder import export_encoder
from essl.errors import UserError
from essl.eval import phc_regression as pr
from essl.photonics.dataset import generate

SIZE = 32
TARGET_POINTS, DOS_POINTS, FREQ_MAX = 400, 500, 1.2  # the benchmark label convention, restated independently
METRIC_START = 100
ENCODER_WIDTH = 0.125
N_TRAIN, N_TEST = 24, 12
TINY = dict(labels=True, kgrid=4, cutoff=2, method="gaussian", progress=False)  # fast solver settings
FAST = dict(epochs=3, batch_size=4, seeds=2, progress=False)


def naive_relative_l1(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over cells of Σ|ŷ − y| / Σ|y| over points 100..399, the empty-lattice line 2πω added back."""
    omega = np.linspace(0.0, FREQ_MAX, DOS_POINTS)[:TARGET_POINTS]
    errors = []
    for p, t in zip(pred.astype(np.float64), true.astype(np.float64), strict=True):
        num = den = 0.0
        for j in range(METRIC_START, TARGET_POINTS):
            line = 2 * math.pi * omega[j]
            num += abs((p[j] + line) - (t[j] + line))
            den += abs(t[j] + line)
        errors.append(num / den)
    return float(np.mean(errors))


def write_synthetic(path, eps: np.ndarray, target: np.ndarray) -> None:
    """A labelled file in the layout open_dataset validates, with a made-up target (no solver)."""
    n = len(eps)
    omega = np.linspace(0.0, FREQ_MAX, DOS_POINTS, dtype=np.float32)
    dos = np.zeros((n, DOS_POINTS), np.float32)
    dos[:, :TARGET_POINTS] = target + 2 * np.pi * omega[:TARGET_POINTS]
    with h5py.File(path, "w") as f:
        f["eps"] = eps.astype(np.float32)
        f["eps_avg"] = eps.mean(axis=(1, 2)).astype(np.float32)
        f["bands"] = np.ones((n, 2, 3), np.float32)
        f["dos"] = dos
        f["target"] = target.astype(np.float32)


def make_encoder(path, channels=1, size=SIZE, width=ENCODER_WIDTH, seed=0):
    torch.manual_seed(seed)
    kwargs = {"width": width} if size == SIZE else {"width": width, "input_size": size}
    net, dim = build_backbone("phc_cnn", channels, **kwargs)
    return export_encoder(path, net, "phc_cnn", kwargs, dim, channels, size, (1.0,) * channels,
                          (19.0,) * channels, {"invariant": "c4v+shifts"})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("phc_regress")
    out = {
        "train": generate(d / "train.h5", "levelset", N_TRAIN, seed=0, **TINY),
        "test": generate(d / "test.h5", "levelset", N_TEST, seed=1, **TINY),
        "test_b": generate(d / "test_b.h5", "blob", N_TEST, seed=2, **TINY),
        "unlabelled": generate(d / "unlabelled.h5", "levelset", 8, progress=False),
        "encoder": make_encoder(d / "encoder.pt"),
    }
    return out


# ------------------------------------------------------------------------------------------------ metric


def test_score_matches_naive_relative_l1():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    true = torch.randn(7, TARGET_POINTS, generator=g)
    scale = pr._TargetScale.fit(torch.randn(20, TARGET_POINTS, generator=g))
    model = nn.Linear(5, TARGET_POINTS)
    selected = pr.Selected(model=model, best_epoch=1, val_error=0.0, val_history=[0.0])
    run = pr._score(selected, x, true, scale, torch.device("cpu"), n_figure=3)
    with torch.no_grad():
        pred = scale.to_target(model(x))  # the path from network output to physical targets
    assert run.test_error == pytest.approx(naive_relative_l1(pred.numpy(), true.numpy()), rel=1e-9)
    assert torch.allclose(run.figure_pred, pred[:3])
    perfect = pr.phc_dos.relative_l1(true, true)
    assert float(perfect) == 0.0


def test_target_scale_round_trip():
    y = torch.randn(30, TARGET_POINTS) * 3 + 1
    scale = pr._TargetScale.fit(y)
    assert torch.allclose(scale.to_target(scale.to_loss(y)), y, atol=1e-5)
    assert scale.to_loss(y).pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)


# --------------------------------------------------------------------------------------------- learning


def test_head_learns_features_that_determine_the_target():
    """Targets linear in 8 features: the trained head beats predicting the training mean by far."""
    g = torch.Generator().manual_seed(0)
    n_fit, n_val, n_test, dim = 160, 40, 200, 8
    x = torch.randn(n_fit + n_val + n_test, dim, generator=g)
    y = x @ (0.5 * torch.randn(dim, TARGET_POINTS, generator=g))
    cut = n_fit + n_val
    fit, val, test = (x[:n_fit], y[:n_fit]), (x[n_fit:cut], y[n_fit:cut]), (x[cut:], y[cut:])
    scale = pr._TargetScale.fit(fit[1])
    torch.manual_seed(0)
    head = pr.DOSHead(dim)
    selected = pr.train_select(head, [{"params": head.parameters(), "lr": 3e-3}], fit, val, scale, epochs=60,
                               batch_size=32, weight_decay=0.0, augment=None,
                               generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    error = pr._score(selected, *test, scale, torch.device("cpu"), n_figure=1).test_error
    mean_error = naive_relative_l1(fit[1].mean(0).expand(n_test, -1).numpy(), test[1].numpy())
    assert error < 0.25 * mean_error, (error, mean_error)
    assert selected.val_error == min(selected.val_history)
    assert selected.best_epoch == selected.val_history.index(selected.val_error) + 1


def test_scratch_network_learns_permittivity_target(tmp_path):
    """A file of nearly homogeneous cells whose target is a linear function of their permittivity: the
    from-scratch CNN, run through run_regression, beats predicting the training mean by far."""
    rng = np.random.default_rng(0)
    n_train, n_test = 100, 60
    level = rng.uniform(1, 20, size=(n_train + n_test, 1, 1))
    eps = (level + rng.uniform(0, 0.5, size=(n_train + n_test, SIZE, SIZE))).astype(np.float32)
    feature = (eps.mean(axis=(1, 2)) - 10.5) / 5.5  # (N,), about unit variance
    target = feature[:, None] * rng.normal(size=(1, TARGET_POINTS))
    write_synthetic(tmp_path / "train.h5", eps[:n_train], target[:n_train])
    write_synthetic(tmp_path / "test.h5", eps[n_train:], target[n_train:])
    result = pr.run_regression(None, tmp_path / "train.h5", tmp_path / "test.h5", n_train, seeds=1, epochs=20,
                               batch_size=16, lr=3e-3, progress=False,
                               scratch_backbone={"name": "phc_cnn", "kwargs": {"width": ENCODER_WIDTH}})
    mean_error = naive_relative_l1(np.broadcast_to(target[:n_train].mean(0), target[n_train:].shape),
                                   target[n_train:])
    assert result["results"]["scratch"]["mean"] < 0.5 * mean_error, (result["results"], mean_error)


# ------------------------------------------------------------------------------------------- end to end


def check_schema(result, n_seeds, kinds):
    assert set(result) >= {"encoder", "train", "test", "n_labels", "mode", "seeds", "augment", "results",
                           "settings", "protocol"}
    assert set(result["results"]) == set(kinds)
    for summary in result["results"].values():
        per_seed = summary["per_seed"]
        assert len(per_seed) == n_seeds and all(math.isfinite(e) and e > 0 for e in per_seed)
        assert summary["mean"] == pytest.approx(np.mean(per_seed))
        assert summary["std"] == pytest.approx(np.std(per_seed, ddof=1) if n_seeds > 1 else 0.0)
        assert len(summary["val_per_seed"]) == n_seeds and len(summary["best_epoch"]) == n_seeds


@pytest.mark.parametrize("mode,augment", [("frozen", "c4v+shifts"), ("finetune", "flips+shifts")])
def test_end_to_end_json_and_figure(files, tmp_path, mode, augment):
    json_path, fig_path = tmp_path / "out" / "r.json", tmp_path / "out" / "r.png"
    result = pr.run_regression(files["encoder"], files["train"], files["test"], 10, mode=mode, augment=augment,
                               json_path=json_path, figure_path=fig_path, **FAST)
    check_schema(result, FAST["seeds"], ["encoder", "scratch"])
    assert result["mode"] == mode and result["augment"] == augment and result["n_labels"] == 10
    assert result["settings"]["n_fit"] == 8 and result["settings"]["n_val"] == 2
    assert result["settings"]["n_test"] == N_TEST
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    assert fig_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in json_path.parent.iterdir() if p.name.startswith(".")], "no temporary files left"
    table = pr.format_regression_table(result)
    assert f"encoder ({mode})" in table and "from scratch" in table


def test_scratch_only_and_head_sizes(files, tmp_path):
    result = pr.run_regression(None, files["train"], files["test"], 12, figure_path=tmp_path / "f.png",
                               scratch_backbone={"name": "phc_cnn", "kwargs": {"width": ENCODER_WIDTH}}, **FAST)
    check_schema(result, FAST["seeds"], ["scratch"])
    assert result["encoder"] is None and (tmp_path / "f.png").stat().st_size > 0
    assert result["settings"]["head_hidden"]["scratch"] == list(pr.head_hidden_sizes(128))
    assert "from scratch" in pr.format_regression_table(result)


def test_head_sizes():
    assert pr.head_hidden_sizes(1024) == (1024, 512)
    assert pr.head_hidden_sizes(2048) == (1024, 512), "never widened"
    assert pr.head_hidden_sizes(256) == (256, 128)
    shapes = [m.weight.shape for m in pr.DOSHead(1024).modules() if isinstance(m, nn.Linear)]
    assert shapes == [(1024, 1024), (512, 1024), (400, 512)]


def test_augmentations_permute_pixels():
    x = torch.rand(6, 1, SIZE, SIZE) * 19 + 1
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pr.augment_maps(x, "none", g), x)
    for augment in pr.AUGMENTS[1:]:
        y = pr.augment_maps(x, augment, g)
        assert torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values), augment
        assert not torch.equal(y, x), augment


# ----------------------------------------------------------------------------------------- selection


def test_test_file_is_only_scored_after_selection(files, monkeypatch):
    """Spy: train_select never gets the test file, and test maps/features are predicted only by _score,
    after the model's selection finished."""
    events = []
    real_select, real_score, real_predict = pr.train_select, pr._score, pr.predict
    n_test = N_TEST

    def select(model, groups, fit, val, *args, **kwargs):
        assert len(fit[0]) != n_test and len(val[0]) != n_test
        events.append("select")
        return real_select(model, groups, fit, val, *args, **kwargs)

    def score(*args, **kwargs):
        events.append("score")
        return real_score(*args, **kwargs)

    def predict(model, x, *args, **kwargs):
        if len(x) == n_test:
            assert events and events[-1] == "score", "test data predicted outside scoring"
        return real_predict(model, x, *args, **kwargs)

    monkeypatch.setattr(pr, "train_select", select)
    monkeypatch.setattr(pr, "_score", score)
    monkeypatch.setattr(pr, "predict", predict)
    pr.run_regression(files["encoder"], files["train"], files["test"], 10, mode="frozen", **FAST)
    assert events == ["select", "score"] * (2 * FAST["seeds"])


def test_selection_does_not_depend_on_the_test_file(files):
    """Same labels and seeds, a different test file: identical validation errors and chosen epochs."""
    kwargs = dict(mode="finetune", **FAST)
    a = pr.run_regression(files["encoder"], files["train"], files["test"], 10, **kwargs)
    b = pr.run_regression(files["encoder"], files["train"], files["test_b"], 10, **kwargs)
    for kind in ("encoder", "scratch"):
        assert a["results"][kind]["val_per_seed"] == b["results"][kind]["val_per_seed"]
        assert a["results"][kind]["best_epoch"] == b["results"][kind]["best_epoch"]
        assert a["results"][kind]["per_seed"] != b["results"][kind]["per_seed"]


def test_label_split_is_seeded_and_disjoint():
    a, b = pr.label_split(50, 20, 0.2, seed=0), pr.label_split(50, 20, 0.2, seed=1)
    assert len(a.val) == 4 and len(a.fit) == 16
    assert not set(a.val.tolist()) & set(a.fit.tolist())
    assert torch.equal(a.fit, pr.label_split(50, 20, 0.2, seed=0).fit)
    assert not torch.equal(a.fit, b.fit)


# --------------------------------------------------------------------------------------------- errors


def test_user_errors(files, tmp_path):
    enc, train, test = files["encoder"], files["train"], files["test"]
    rgb = make_encoder(tmp_path / "rgb.pt", channels=3)
    big = make_encoder(tmp_path / "big.pt", size=64)
    cases = [
        (dict(encoder=enc, n_labels=N_TRAIN + 1), "larger than the train file"),
        (dict(encoder=enc, n_labels=2), "too small"),
        (dict(encoder=enc, n_labels=10, train=files["unlabelled"]), "missing dataset"),
        (dict(encoder=enc, n_labels=10, test=files["unlabelled"]), "missing dataset"),
        (dict(encoder=enc, n_labels=10, mode="linear"), "--mode 'linear'"),
        (dict(encoder=enc, n_labels=10, augment="rotate"), "--augment 'rotate'"),
        (dict(encoder=rgb, n_labels=10), "3 input channels"),
        (dict(encoder=big, n_labels=10), "64x64"),
        (dict(encoder=tmp_path / "missing.pt", n_labels=10), "not found"),
        (dict(encoder=enc, n_labels=10, batch_size=1), "--batch-size"),
        (dict(encoder=enc, n_labels=10, figure_path=tmp_path / "f.xyz"), "image format"),
    ]
    for kwargs, message in cases:
        kwargs = {"train": train, "test": test, "progress": False, "epochs": 1, "seeds": 1} | kwargs
        with pytest.raises(UserError, match=message) as info:
            pr.run_regression(kwargs.pop("encoder"), kwargs.pop("train"), kwargs.pop("test"),
                              kwargs.pop("n_labels"), **kwargs)
        assert "\n" not in str(info.value)


def test_scratch_baseline_is_independent_of_the_encoder_run(files):
    """with_scratch=False skips the baseline; the baseline of an encoder run equals the scratch-only run of
    the same architecture (so a comparison of encoders can compute it once)."""
    kwargs = dict(augment="shifts", **FAST)
    enc_only = pr.run_regression(files["encoder"], files["train"], files["test"], 10, with_scratch=False, **kwargs)
    check_schema(enc_only, FAST["seeds"], ["encoder"])
    assert "from scratch" not in pr.format_regression_table(enc_only)
    both = pr.run_regression(files["encoder"], files["train"], files["test"], 10, **kwargs)
    alone = pr.run_regression(None, files["train"], files["test"], 10,
                              scratch_backbone={"name": "phc_cnn", "kwargs": {"width": ENCODER_WIDTH}}, **kwargs)
    assert both["results"]["encoder"] == enc_only["results"]["encoder"]
    assert both["results"]["scratch"] == alone["results"]["scratch"]
