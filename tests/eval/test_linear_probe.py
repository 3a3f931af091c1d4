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
    assert set(written) == {"linear", "knn", "baselines", "encoder", "data", "protocol", "protocol_name", "settings"}
    assert written["encoder"] == str(path) and written["data"] == "digits"
    assert isinstance(written["protocol"], str) and "k=200" in written["protocol"]
    assert written["protocol_name"] == "fast" and written["protocol"].startswith("fast protocol")
    assert written["settings"]["protocol"] == "fast" and written["settings"]["seeds"] == 2
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
    assert "(fast protocol)" in lines[0]
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
        ({"protocol": "exact"}, "--protocol"),
        ({"epochs": 3}, "only for --protocol paper"),
        ({"lr": 1.0, "train_batch_size": 8}, "--train-batch-size, --lr: only for --protocol paper"),
        ({"protocol": "paper", "epochs": 0}, "--epochs"),
        ({"protocol": "paper", "train_batch_size": 0}, "--train-batch-size"),
        ({"protocol": "paper", "lr": float("nan")}, "--lr"),
    ],
)
def test_run_probe_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        run_probe(tmp_path / "encoder.pt", progress=False, **kwargs)


def test_paper_batch_larger_than_train_set_is_user_error(tmp_path):
    path = tiny_encoder_file(tmp_path)
    with pytest.raises(UserError, match="exceeds"):
        run_probe(path, protocol="paper", train_batch_size=100_000, device="cpu", progress=False)


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


# ----------------------------------------------------------------------------------------------- paper protocol
# The reference: rdangovs/essl, cifar10/main.py, eval_loop (Dangovski et al., ICLR 2022).

#: Grey levels by which the batched uint8 resampling may differ from torchvision's / PIL's: their fixed-point
#: weights round a few intermediate values the other way, and the second pass can amplify that to 2 levels.
#: Measured on white noise, the worst case: 99.1-99.7% of the values identical (digits test set: 99.5%, max 1).
UINT8_TOLERANCE = 2
MIN_IDENTICAL = 0.99


def uint8_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours.float() - ref.float()).abs()
    assert diff.max() <= UINT8_TOLERANCE, f"max difference {diff.max()} grey levels"
    assert (diff == 0).float().mean() >= MIN_IDENTICAL


@pytest.mark.parametrize("size, resize", [(32, 36), (8, 9), (96, 108)])
def test_paper_test_view_equals_torchvision_per_image(size, resize):
    tv = pytest.importorskip("torchvision.transforms.v2")
    assert lp.paper_test_sizes(size) == (resize, size)
    x = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    reference = tv.Compose([tv.Resize(resize, interpolation=tv.InterpolationMode.BICUBIC, antialias=True),
                            tv.CenterCrop(size)])
    expected = torch.stack([reference(img) for img in x])  # uint8, one image at a time
    ours = lp.paper_test_transform(size)(x)  # float in [0, 1], the whole batch
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    uint8_close(ours * 255, expected)


def test_paper_test_view_equals_pil_as_in_the_reference():
    """The reference resizes PIL images: compare with PIL itself (32 px RGB, Resize(36) + CenterCrop(32))."""
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    expected = []
    for img in x:
        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((36, 36), Image.BICUBIC).crop((2, 2, 34, 34))
        expected.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1))
    uint8_close(lp.paper_test_transform(32)(x) * 255, torch.stack(expected))


def test_paper_train_view_equals_torchvision_given_its_boxes():
    """The batched crop + resize + flip equals torchvision's per-image ops on the boxes the view drew."""
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    view = lp.PaperTrainView(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        top, left, h, w, flip = view.sample(x.shape)
        torch.manual_seed(0)
        ours = view.view(x)  # the same draws
    expected = []
    for i in range(len(x)):
        img = tv.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        expected.append(tv.horizontal_flip(img) if flip[i] else img)
    uint8_close(ours * 255, torch.stack(expected))


def test_paper_crop_boxes_follow_torchvision_distribution():
    """kornia's box generator vs torchvision's RandomResizedCrop.get_params on 32x32 images, 4000 draws each."""
    T = pytest.importorskip("torchvision.transforms")
    n, side = 4000, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        top, left, h, w, flip = lp.PaperTrainView(side).sample(torch.Size((n, 3, side, side)))
        img = torch.zeros(3, side, side)
        ref = torch.tensor([T.RandomResizedCrop.get_params(img, list(lp.PAPER_CROP_SCALE),
                                                           list(lp.PAPER_CROP_RATIO)) for _ in range(n)]).float()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all()
    assert abs(flip.float().mean() - lp.PAPER_HFLIP_PROB) < 0.03
    ref_top, ref_left, ref_h, ref_w = ref.unbind(1)

    def stats(t, l, hh, ww):
        area = hh * ww / side**2
        centre = torch.stack([t + hh / 2, l + ww / 2], 1) / side
        return area, (ww / hh).log(), centre

    ours, theirs = stats(top, left, h, w), stats(ref_top, ref_left, ref_h, ref_w)
    # standard errors of the means: area ~0.27 / sqrt(n), log ratio ~0.17 / sqrt(n), centre ~0.2 / sqrt(n);
    # the tolerances are about 5 standard errors of a difference of two means
    for a, b, tol in zip(ours, theirs, (0.03, 0.02, 0.02), strict=True):
        assert abs(a.mean(0) - b.mean(0)).max() < tol
        qs = torch.tensor([0.1, 0.5, 0.9])
        assert (a.flatten().quantile(qs) - b.flatten().quantile(qs)).abs().max() < 2 * tol


def test_cosine_lr_matches_the_reference_formula():
    # known values of base · 0.5 · (1 + cos(π · step / max_steps)) with base 30, max_steps 100
    assert lp.cosine_lr(0, 100, 30.0) == 30.0
    assert lp.cosine_lr(25, 100, 30.0) == pytest.approx(30 * 0.5 * (1 + 2**-0.5))
    assert lp.cosine_lr(50, 100, 30.0) == pytest.approx(15.0)
    assert lp.cosine_lr(75, 100, 30.0) == pytest.approx(30 * 0.5 * (1 - 2**-0.5))
    assert lp.cosine_lr(100, 100, 30.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        lp.cosine_lr(0, 0, 30.0)


def test_training_loop_applies_the_reference_schedule_per_step():
    """The learning rate of every step, as the reference's adjust_learning_rate(warmup_epochs=0) gives it:
    max_steps = epochs · len(loader), len(loader) = N // batch (drop_last), step counted from 0."""

    def adjust_learning_rate(epochs, warmup_epochs, base_lr, loader_len, step):  # the reference, plainly
        max_steps, warmup_steps = epochs * loader_len, warmup_epochs * loader_len
        if step < warmup_steps:
            return base_lr * step / warmup_steps
        step, max_steps = step - warmup_steps, max_steps - warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
        return base_lr * q

    x, y = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8), torch.arange(50) % 3
    seen = []
    lp.fit_paper_linear(torch.nn.Flatten(), x, y, 3, seed=0, epochs=3, batch_size=16, lr=7.0, augment=False,
                        device="cpu", callback=lambda step, lr, loss: seen.append((step, lr)))
    loader_len = 50 // 16
    assert [s for s, _ in seen] == list(range(3 * loader_len))
    for step, lr in seen:
        assert lr == pytest.approx(adjust_learning_rate(3, 0, 7.0, loader_len, step), rel=1e-12)


def bn_encoder() -> torch.nn.Module:
    """A small CNN whose BatchNorm makes train vs eval mode visible, with non-trivial running statistics."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with torch.no_grad():
        encoder[1].running_mean.uniform_(-1, 1)
        encoder[1].running_var.uniform_(0.5, 2)
    return encoder.train()


def test_training_loop_equals_naive_reference_without_augmentation():
    """Batched on-device loop vs a plain loop: frozen eval-mode features, default nn.Linear init under the seed,
    torch.randperm order per epoch, drop_last, hand-written cross-entropy gradient, SGD momentum 0.9 (PyTorch's
    form: v = g on the first step, then v = 0.9 v + g; w -= lr v) and the cosine lr from the formula."""
    n, batch, epochs, classes, seed, base_lr, momentum = 40, 16, 2, 3, 3, 30.0, 0.9
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    encoder = bn_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    rng = torch.get_rng_state()
    linear = lp.fit_paper_linear(encoder, x, y, classes, seed, epochs=epochs, batch_size=batch, lr=base_lr,
                                 augment=False, device="cpu")
    assert encoder.training, "the encoder's mode is restored"
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items()), "encoder untouched"
    assert torch.equal(torch.get_rng_state(), rng), "the caller's random state is untouched"

    # the naive reference, in float64
    torch.manual_seed(seed)
    init = torch.nn.Linear(4, classes)
    w, b = init.weight.detach().double().clone(), init.bias.detach().double().clone()
    with torch.no_grad():
        feats = encoder.eval()(x.float() / 255).double()  # BatchNorm running statistics
    vel_w = vel_b = None
    max_steps, step = epochs * (n // batch), 0
    for _ in range(epochs):
        order = torch.randperm(n)
        for k in range(n // batch):
            idx = order[k * batch:(k + 1) * batch]
            f, t = feats[idx], y[idx]
            grad_logits = torch.softmax(f @ w.T + b, dim=1)
            grad_logits[torch.arange(batch), t] -= 1
            grad_logits /= batch  # d(mean cross-entropy)/d(logits)
            grad_w, grad_b = grad_logits.T @ f, grad_logits.sum(0)
            lr = base_lr * 0.5 * (1 + math.cos(math.pi * step / max_steps))
            vel_w = grad_w if vel_w is None else momentum * vel_w + grad_w
            vel_b = grad_b if vel_b is None else momentum * vel_b + grad_b
            w, b = w - lr * vel_w, b - lr * vel_b
            step += 1
    assert not torch.allclose(w, init.weight.double()), "the reference moved"
    torch.testing.assert_close(linear.weight.detach().double(), w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(linear.bias.detach().double(), b, atol=1e-4, rtol=1e-4)


def test_training_loop_trains_only_the_linear_layer_with_augmentation():
    encoder = bn_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    x, y = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8), torch.arange(32) % 2
    a = lp.fit_paper_linear(encoder, x, y, 2, seed=0, epochs=2, batch_size=8, device="cpu")
    b = lp.fit_paper_linear(encoder, x, y, 2, seed=0, epochs=2, batch_size=8, device="cpu")
    c = lp.fit_paper_linear(encoder, x, y, 2, seed=1, epochs=2, batch_size=8, device="cpu")
    assert torch.equal(a.weight, b.weight), "a seed fixes every draw"
    assert not torch.equal(a.weight, c.weight)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ValueError, match="no step"):
        lp.fit_paper_linear(encoder, x, y, 2, seed=0, batch_size=33, device="cpu")


def he_encoder_file(tmp_path):
    """A random small CNN with He-initialised convolutions: O(1) features, so 2 epochs of SGD learn something."""
    from essl.backbones import build_backbone
    from essl.encoder import export_encoder

    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", 1, width=4)
    for m in backbone.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path / "encoder.pt"
    export_encoder(path, backbone, "small_cnn", {"width": 4}, dim, 1, 8, (0.5,), (0.25,),
                   config={"data": {"name": "digits"}})
    return path


def test_cli_paper_protocol_end_to_end(tmp_path, capsys):
    from essl.cli import main

    path, out = he_encoder_file(tmp_path), tmp_path / "paper.json"
    argv = ["probe", str(path), "--protocol", "paper", "--epochs", "2", "--seeds", "2", "--train-batch-size", "64",
            "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(paper protocol, 2 epochs)" in printed and "raw pixels" in printed
    result = json.loads(out.read_text())
    assert result["protocol_name"] == "paper" and result["protocol"].startswith("paper protocol")
    settings = result["settings"]
    assert settings["epochs"] == 2 and settings["seeds"] == 2 and settings["batch_size"] == 64
    assert settings["lr"] == lp.PAPER_LR and (settings["test_resize"], settings["test_crop"]) == (9, 8)
    for block in (result, *result["baselines"].values()):
        check_summary(block["linear"], 2)
        check_summary(block["knn"], 1)
    # 360 digits test images, 10 classes: chance is 0.1 with a standard deviation of 0.016
    chance, sd = 0.1, math.sqrt(0.1 * 0.9 / 360)
    assert result["linear"]["mean"] > chance + 4 * sd
    assert result["baselines"]["raw_pixels"]["linear"]["mean"] > chance + 4 * sd
    # kNN is the shared one, on features of the plain (unresized) images
    import essl
    from essl.data import load_labelled
    from essl.eval.features import extract_features
    from essl.knn import knn_accuracy

    encoder, digits = essl.load_encoder(path), load_labelled("digits", image_size=8)
    train, test = (extract_features(encoder, x, progress=False) for x in (digits.x_train, digits.x_test))
    assert result["knn"]["per_seed"] == [knn_accuracy(train, digits.y_train, test, digits.y_test, 10)]
