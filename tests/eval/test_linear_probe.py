"""essl.eval.linear_probe: the probe learns what is linearly there, and only that; run_probe end to end."""

import json
import math

import pytest
import torch

from essl.errors import UserError
from essl.eval import linear_probe as lp
from essl.eval.linear_probe import format_table, run_probe, select_weight_decay, train_linear_probe

NUM_CLASSES = 5


def blobs(n_train: int, n_test: int, dim: int, spread: float, seed: int = 0):
    """Gaussian classes around random centres: small spread = linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(NUM_CLASSES, dim, generator=g)
    y = torch.randint(NUM_CLASSES, (n_train + n_test,), generator=g)
    x = centres[y] + spread * torch.randn(n_train + n_test, dim, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_separable_set_is_learned():
    x, y, xt, yt = blobs(400, 200, 20, spread=0.5)
    x[:, 0] = 7.0  # a constant training feature (like a blank border pixel) is only centred, never divided by 0
    threads = torch.get_num_threads()
    acc = train_linear_probe(x, y, xt, yt, NUM_CLASSES, seed=0, device="cpu")
    assert acc >= 0.99
    assert torch.get_num_threads() == threads, "the small-problem single-thread setting is restored"


def test_random_labels_give_chance():
    x, _, xt, _ = blobs(400, 1000, 20, spread=0.5)
    g = torch.Generator().manual_seed(1)
    y, yt = torch.randint(NUM_CLASSES, (400,), generator=g), torch.randint(NUM_CLASSES, (1000,), generator=g)
    acc = train_linear_probe(x, y, xt, yt, NUM_CLASSES, seed=0, device="cpu")
    chance, sd = 1 / NUM_CLASSES, math.sqrt(0.2 * 0.8 / 1000)
    assert abs(acc - chance) < 4 * sd


def test_same_seed_same_result_and_seed_sets_split():
    x, y, xt, yt = blobs(200, 100, 30, spread=4.0)
    a = train_linear_probe(x, y, xt, yt, NUM_CLASSES, seed=3, device="cpu")
    b = train_linear_probe(x, y, xt, yt, NUM_CLASSES, seed=3, device="cpu")
    assert a == b
    _, val_a = select_weight_decay(x, y, NUM_CLASSES, seed=0)
    _, val_b = select_weight_decay(x, y, NUM_CLASSES, seed=1)
    assert val_a != val_b, "different seeds hold out different validation samples"


def test_selection_uses_validation_only_and_prefers_strong_penalty_on_noise():
    # few noisy samples in many dimensions: the strongest penalty generalises best
    x, y, _, _ = blobs(120, 0, 200, spread=30.0)
    wd, val_acc = select_weight_decay(x, y, NUM_CLASSES, seed=0)
    assert len(val_acc) == len(lp.WEIGHT_DECAY_GRID) and wd in lp.WEIGHT_DECAY_GRID
    assert val_acc[lp.WEIGHT_DECAY_GRID.index(wd)] == max(val_acc)
    # ties go to the stronger penalty
    assert wd == max(w for w, a in zip(lp.WEIGHT_DECAY_GRID, val_acc, strict=True) if a == max(val_acc))
    # test labels cannot influence the fit: predictions are the same whatever the test labels, so the
    # accuracies against two disjoint labellings of the test set add up to at most 1
    x, y, xt, yt = blobs(300, 100, 10, spread=1.0)
    acc = train_linear_probe(x, y, xt, yt, NUM_CLASSES, seed=0, device="cpu")
    wrong = (yt + 1) % NUM_CLASSES
    acc_wrong = train_linear_probe(x, y, xt, wrong, NUM_CLASSES, seed=0, device="cpu")
    assert acc + acc_wrong <= 1.0 + 1e-9


def test_single_penalty_skips_selection(monkeypatch):
    x, y, xt, yt = blobs(100, 50, 5, spread=0.5)

    def fail(*args, **kwargs):
        raise AssertionError("no validation fits with a single penalty")

    monkeypatch.setattr(lp, "select_weight_decay", fail)
    assert train_linear_probe(x, y, xt, yt, NUM_CLASSES, seed=0, weight_decays=[1e-3], device="cpu") >= 0.95


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"weight_decays": []}, "weight_decays"),
        ({"num_classes": 2}, "labels must lie"),
    ],
)
def test_bad_arguments(kwargs, match):
    x, y, xt, yt = blobs(20, 10, 3, spread=1.0)
    args = {"num_classes": NUM_CLASSES, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        train_linear_probe(x, y, xt, yt, **args)


# -------------------------------------------------------------------------------------------------- run_probe

SUMMARY_KEYS = {"mean", "std", "per_seed"}


def tiny_encoder_file(tmp_path, channels: int = 1, config: dict | None = None):
    encoder = pytest.importorskip("essl.encoder")
    from essl.backbones import build_backbone

    torch.manual_seed(0)
    kwargs = {"width": 4}
    backbone, dim = build_backbone("small_cnn", channels, **kwargs)
    path = tmp_path / "encoder.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder.export_encoder(path, backbone, "small_cnn", kwargs, dim, channels, 8, (0.5,) * channels,
                           (0.25,) * channels, config={"data": {"name": "digits"}} if config is None else config)
    return path


def check_summary(summary, n):
    assert set(summary) == SUMMARY_KEYS
    assert len(summary["per_seed"]) == n
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in summary["per_seed"])
    assert 0 <= summary["mean"] <= 1 and summary["std"] >= 0


def test_run_probe_end_to_end(tmp_path):
    path = tiny_encoder_file(tmp_path)
    out = tmp_path / "out" / "probe.json"
    result = run_probe(path, seeds=2, device="cpu", json_path=out, progress=False)
    written = json.loads(out.read_text())
    assert written == result
    assert set(written) == {"linear", "knn", "baselines", "encoder", "data", "protocol"}
    assert written["encoder"] == str(path) and written["data"] == "digits"
    assert isinstance(written["protocol"], str) and "k=200" in written["protocol"]
    assert set(written["baselines"]) == {"raw_pixels", "random_init"}
    for block in (written, *written["baselines"].values()):
        check_summary(block["linear"], 2)
        check_summary(block["knn"], 1)
        assert block["knn"]["std"] == 0
    assert set(written["baselines"]["raw_pixels"]) == {"linear", "knn"}
    # raw 8x8 digits are nearly linearly separable
    assert written["baselines"]["raw_pixels"]["linear"]["mean"] > 0.8
    assert not list(out.parent.glob("*.tmp")), "the temporary file was renamed away"

    table = format_table(result)
    lines = table.splitlines()
    assert [line.split("  ")[0].strip() for line in lines[-3:]] == ["encoder", "random init", "raw pixels"]
    assert f"{100 * result['linear']['mean']:.2f} ± {100 * result['linear']['std']:.2f}" in lines[-3]
    assert f"{100 * result['baselines']['raw_pixels']['knn']['mean']:.2f}" in lines[-1]


def test_run_probe_chooses_data_from_argument_or_config(tmp_path, monkeypatch):
    seen = []

    def spy(name, image_size=None, path=None):
        seen.append((name, image_size, path))
        return lp.essl.data.load_labelled("digits", image_size=image_size)

    monkeypatch.setattr(lp, "load_labelled", spy)
    monkeypatch.setattr(lp, "_evaluate", lambda *a, **k: {"linear": {}, "knn": {}})
    no_config = tiny_encoder_file(tmp_path / "a", config={})
    cifar = tiny_encoder_file(tmp_path / "b", config={"data": {"name": "cifar10", "path": "/data/c10"}})
    run_probe(no_config, seeds=1, device="cpu", progress=False)
    run_probe(cifar, seeds=1, device="cpu", progress=False)
    run_probe(cifar, data="cifar10", seeds=1, device="cpu", progress=False)
    run_probe(cifar, data="/elsewhere", seeds=1, device="cpu", progress=False)
    assert seen == [("digits", 8, None), ("cifar10", 8, "/data/c10"), ("cifar10", 8, "/data/c10"),
                    ("/elsewhere", 8, None)]


def test_run_probe_checks_channels(tmp_path):

    rgb = tiny_encoder_file(tmp_path, channels=3)  # digits are grey
    with pytest.raises(UserError, match="channel"):
        run_probe(rgb, seeds=1, device="cpu", progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seeds": 0}, "seeds"),
        ({"knn_k": 0}, "k must"),
        ({"knn_t": 0.0}, "temperature"),
        ({"batch_size": 0}, "batch-size"),
        ({"device": "nonsense"}, "nonsense"),
    ],
)
def test_run_probe_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        run_probe(tmp_path / "encoder.pt", progress=False, **kwargs)


def test_run_probe_missing_encoder_is_user_error(tmp_path):
    pytest.importorskip("essl.encoder")
    with pytest.raises(UserError, match="missing.pt"):
        run_probe(tmp_path / "missing.pt", progress=False)


def test_format_table_shows_single_value_without_std():
    s = {"mean": 0.5, "std": 0.0, "per_seed": [0.5]}
    m = {"mean": 0.9, "std": 0.01, "per_seed": [0.89, 0.91]}
    result = {"linear": m, "knn": s, "encoder": "e.pt", "data": "digits",
              "baselines": {"raw_pixels": {"linear": m, "knn": s}, "random_init": {"linear": m, "knn": s}}}
    table = format_table(result)
    assert "90.00 ± 1.00" in table and "50.00 ±" not in table and "2 seeds" in table
