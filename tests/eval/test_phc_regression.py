"""essl.eval.phc_regression: the DOS error against a naive computation; the training loop, the network and the
defaults against the reference fine-tuning (rdangovs/essl photonics/main.py ``finetune_model``, restated here);
training batches get exact lattice symmetries with valid targets; validation-only selection; ``run_regression``
end to end on tiny labelled files; one-line user errors."""

import copy
import inspect
import json
import math
import re

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
from essl.photonics.dos import compute_labels

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


# ------------------------------------------------------------------------------------------------ helpers

# The reference fine-tuning (rdangovs/essl photonics/main.py finetune_model, phc_models.py PredictorDOS),
# restated here independently of essl's constants.
REF_LR, REF_WEIGHT_DECAY, REF_EPOCHS, REF_BATCH = 1e-4, 1e-5, 100, 64
REF_HEAD = (1024, 1024, 512)
PHC_MEAN, PHC_STD = 1.0, 19.0  # (ε − 1)/19 input normalisation without an encoder file


def reference_head(feature_dim: int) -> nn.Sequential:
    """PredictorDOS: feature_dim → 1024 → 1024 → 512 → 400 with ReLUs."""
    sizes = (feature_dim, *REF_HEAD)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], TARGET_POINTS))


def reference_network(seed: int, width: float = ENCODER_WIDTH) -> nn.Sequential:
    """phc_cnn initialised from ``seed``, then the head initialised from ``seed`` (essl's seeding)."""
    torch.manual_seed(seed)
    backbone, dim = build_backbone("phc_cnn", 1, width=width)
    torch.manual_seed(seed)
    return nn.Sequential(backbone, reference_head(dim))


def reference_fit(net, x_fit, y_fit, x_val, y_val, epochs, lr=REF_LR, weight_decay=REF_WEIGHT_DECAY):
    """A plain full-batch loop: Adam on all parameters, constant lr, MSE on the raw target; after every epoch the
    validation error (eval mode) and a copy of the weights."""
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    history, states = [], []
    for _ in range(epochs):
        net.train()
        loss = ((net(x_fit) - y_fit) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        net.eval()
        with torch.no_grad():
            history.append(naive_relative_l1(net(x_val).numpy(), y_val.numpy()))
        states.append(copy.deepcopy(net.state_dict()))
    return history, states


def read_file(path):
    with h5py.File(path, "r") as f:
        return torch.from_numpy(f["eps"][:]).float()[:, None], torch.from_numpy(f["target"][:]).float()


def lattice_images(x: torch.Tensor, ops) -> torch.Tensor:
    """Every image of one map x (1, n, n) under ``ops`` applied in order, written with torch.roll/flip/rot90:
    the orbit an augmented map must lie in. (G, 1, n, n)."""
    n = x.shape[-1]
    elements = {
        "shift": lambda im: [torch.roll(im, (i, j), (-2, -1)) for i in range(n) for j in range(n)],
        "halfshift": lambda im: [torch.roll(im, (i, j), (-2, -1)) for i in (0, n // 2) for j in (0, n // 2)],
        "flip3": lambda im: [im, im.flip(-1), im.flip(-2)],
        "flip4": lambda im: [im, im.flip(-1), im.flip(-2), im.flip(-1).flip(-2)],
        "rot4": lambda im: [torch.rot90(im, k, (-2, -1)) for k in range(4)],
        "c4v": lambda im: [g for k in range(4) for g in (torch.rot90(im, k, (-2, -1)),
                                                          torch.rot90(im, k, (-2, -1)).flip(-1))],
    }
    images = [x]
    for op in ops:
        images = [g for im in images for g in elements[op](im)]
    return torch.stack(images)


# ------------------------------------------------------------------------------------------------ metric


def test_score_matches_naive_relative_l1():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    true = torch.randn(7, TARGET_POINTS, generator=g)
    model = nn.Linear(5, TARGET_POINTS)
    selected = pr.Selected(model=model, best_epoch=1, val_error=0.0, val_history=[0.0])
    run = pr._score(selected, x, true, torch.device("cpu"), n_figure=3)
    with torch.no_grad():
        pred = model(x)  # the network predicts the raw target
    assert run.test_error == pytest.approx(naive_relative_l1(pred.numpy(), true.numpy()), rel=1e-9)
    assert torch.allclose(run.figure_pred, pred[:3])
    assert float(pr.phc_dos.relative_l1(true, true)) == 0.0


# --------------------------------------------------------------------------------------- the reference


def test_defaults_are_the_reference_fine_tuning():
    defaults = {k: v.default for k, v in inspect.signature(pr.run_regression).parameters.items()}
    assert defaults["mode"] == "finetune"
    assert defaults["lr"] == REF_LR and defaults["weight_decay"] == REF_WEIGHT_DECAY
    assert defaults["epochs"] == REF_EPOCHS and defaults["batch_size"] == REF_BATCH
    assert defaults["backbone_lr_factor"] == 1.0, "one learning rate for every parameter"
    assert defaults["scratch_augment"] is None, "the scratch network gets the encoder's augmentation by default"
    assert pr.HEAD_HIDDEN == REF_HEAD


@pytest.mark.parametrize("feature_dim", [128, 256, 1024, 2048])
def test_head_is_the_reference_head_for_every_encoder_width(feature_dim):
    shapes = [tuple(m.weight.shape) for m in pr.DOSHead(feature_dim).modules() if isinstance(m, nn.Linear)]
    ref = [tuple(m.weight.shape) for m in reference_head(feature_dim).modules() if isinstance(m, nn.Linear)]
    assert shapes == ref == [(1024, feature_dim), (1024, 1024), (512, 1024), (400, 512)]


def test_train_select_equals_plain_adam_loop():
    """Augmentation off, one batch per epoch: train_select's weights after every epoch are those of a plain loop
    (Adam on all parameters, lr 1e-4, weight decay 1e-5, constant lr, MSE on raw targets), and it keeps the
    weights of the epoch with the lowest validation error."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, SIZE, SIZE, generator=g)  # normalised maps
    y = torch.randn(20, TARGET_POINTS, generator=g) * 0.5
    fit, val = (x[:14], y[:14]), (x[14:], y[14:])
    net, ref = reference_network(0), reference_network(0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values(), strict=True))
    epochs = 4
    selected = pr.train_select(net, [{"params": net.parameters(), "lr": REF_LR}], fit, val, epochs=epochs,
                               batch_size=REF_BATCH, weight_decay=REF_WEIGHT_DECAY, augment=None,
                               generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    history, states = reference_fit(ref, *fit, *val, epochs)
    assert selected.val_history == pytest.approx(history, rel=1e-5)
    best = int(np.argmin(history))
    assert selected.best_epoch == best + 1 and selected.val_error == pytest.approx(history[best], rel=1e-5)
    for name, value in selected.model.state_dict().items():
        assert torch.allclose(value.float(), states[best][name].float(), rtol=1e-5, atol=1e-6), name
    moved = max((v.float() - w.float()).abs().max().item()
                for v, w in zip(states[-1].values(), reference_network(0).state_dict().values(), strict=True))
    assert moved > 0.5 * REF_LR, "the loop did train"


def test_run_regression_equals_reference_protocol(files):
    """End to end, scratch only, defaults, augmentation off, 16 fitting structures (one batch of at most 64):
    the labelled split, the (ε − 1)/19 input, the seeded network, the training and the validation-selected test
    error of run_regression all equal an independent restatement of the protocol."""
    n_labels, epochs, seed = 20, 4, 0
    result = pr.run_regression(None, files["train"], files["test"], n_labels, seeds=1, epochs=epochs,
                               progress=False, scratch_backbone={"name": "phc_cnn", "kwargs": {"width": ENCODER_WIDTH}})
    x_train, y_train = read_file(files["train"])
    x_test, y_test = read_file(files["test"])
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed))[:n_labels]
    n_val = round(0.2 * n_labels)
    val, fit = perm[:n_val], perm[n_val:]
    norm = lambda x: (x - PHC_MEAN) / PHC_STD  # noqa: E731
    net = reference_network(seed)
    history, states = reference_fit(net, norm(x_train[fit]), y_train[fit], norm(x_train[val]), y_train[val], epochs)
    best = int(np.argmin(history))
    net.load_state_dict(states[best])
    net.eval()
    with torch.no_grad():
        test_error = naive_relative_l1(net(norm(x_test)).numpy(), y_test.numpy())
    scratch = result["results"]["scratch"]
    assert scratch["val_history"][0] == pytest.approx(history, rel=1e-4)
    assert scratch["best_epoch"] == [best + 1]
    assert scratch["per_seed"][0] == pytest.approx(test_error, rel=1e-4)
    assert result["settings"]["n_fit"] == len(fit) and result["settings"]["n_val"] == n_val


def test_constant_learning_rate_runs_are_prefixes():
    """No schedule: the first E epochs of a longer run are the E-epoch run (a decaying lr would differ)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(24, 1, SIZE, SIZE, generator=g), torch.randn(24, TARGET_POINTS, generator=g)
    runs = []
    for epochs in (2, 4):
        net = reference_network(1)
        runs.append(pr.train_select(net, [{"params": net.parameters(), "lr": REF_LR}], (x[:18], y[:18]),
                                    (x[18:], y[18:]), epochs=epochs, batch_size=8, weight_decay=REF_WEIGHT_DECAY,
                                    augment=None, generator=torch.Generator().manual_seed(0),
                                    device=torch.device("cpu")).val_history)
    assert runs[0] == runs[1][:2]


@pytest.mark.parametrize("n,batch_size", [(40, 64), (160, 64), (2400, 64), (65, 64), (3, 2), (13, 4), (2, 64)])
def test_batches_take_the_reference_number_of_steps(n, batch_size):
    """⌈n / batch⌉ steps per epoch as DataLoader(batch_size, shuffle=True) (never more than ⌊n / 2⌋), a seeded
    shuffle, every structure once, batch sizes within one of each other, none below two (BatchNorm)."""
    batches = pr._batches(n, batch_size, torch.Generator().manual_seed(0))
    assert len(batches) == min(math.ceil(n / batch_size), n // 2)
    assert sorted(torch.cat(batches).tolist()) == list(range(n))
    sizes = [len(b) for b in batches]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 2 and max(sizes) <= max(batch_size, 3)
    again = pr._batches(n, batch_size, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


# --------------------------------------------------------------------------------------- augmentation


def test_parse_augment():
    assert pr.parse_augment("none") == ()
    assert pr.parse_augment("flip3+rot4") == ("flip3", "rot4")
    assert pr.parse_augment("shift+flip3") == ("shift", "flip3")
    assert pr.parse_augment("halfshift+flip3+rot4") == ("halfshift", "flip3", "rot4")
    assert pr.parse_augment("c4v+shifts") == ("c4v", "shift"), "former names are aliases"
    assert pr.parse_augment("flips") == ("flip4",) and pr.parse_augment("c4v") == ("c4v",)
    for bad, token in (("rot5", "rot5"), ("flip3+", ""), ("none+rot4", "none"), ("", ""), ("Flip3", "Flip3")):
        with pytest.raises(UserError, match=re.escape(f"--augment {bad!r}: unknown lattice operation {token!r}")):
            pr.parse_augment(bad)
    with pytest.raises(UserError, match="--scratch-augment 'x'"):
        pr.parse_augment("x", "--scratch-augment")


def test_augment_maps_are_lattice_symmetries():
    x = torch.rand(5, 1, SIZE, SIZE) * 19 + 1
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pr.augment_maps(x, "none", g), x)
    for augment in ("flip3+rot4", "shift+flip3", "halfshift+flip3+rot4", "c4v+shifts"):
        ops = pr.parse_augment(augment)
        y = pr.augment_maps(x, augment, g)
        assert not torch.equal(y, x), augment
        for a, b in zip(x, y, strict=True):
            assert (lattice_images(a, ops) == b).flatten(1).all(1).any(), augment


def test_training_batches_get_exact_symmetries_with_valid_targets(files, monkeypatch):
    """Spy on the augmentation of a fine-tuning run (encoder: the level-set views shift+flip3; scratch: the
    blob SimCLR-invariant views halfshift+flip3+rot4): it sees fitting maps only, every fitting structure once per
    epoch, and returns an exact lattice image of each (same pixel values, in the orbit written independently
    here); the DOS the solver computes for augmented maps is the stored target of their source structure."""
    calls = []
    real = pr.lattice_augment

    def spy(x, ops, generator=None):
        out = real(x, ops, generator)
        calls.append((x.clone(), tuple(ops), out.clone()))
        return out

    monkeypatch.setattr(pr, "lattice_augment", spy)
    n_labels, epochs = 10, 2
    pr.run_regression(files["encoder"], files["train"], files["test"], n_labels, augment="shift+flip3",
                      scratch_augment="halfshift+flip3+rot4", epochs=epochs, batch_size=4, seeds=1, progress=False)
    x_train, y_train = read_file(files["train"])
    split = pr.label_split(N_TRAIN, n_labels, 0.2, seed=0)
    by_ops = {}
    for x, ops, out in calls:
        by_ops.setdefault(ops, []).append((x, out))
    assert set(by_ops) == {("shift", "flip3"), ("halfshift", "flip3", "rot4")}
    for ops, batches in by_ops.items():
        sources = []
        for x, out in batches:
            for a, b in zip(x, out, strict=True):
                matches = (x_train == a).flatten(1).all(1).nonzero().flatten().tolist()
                assert matches and set(matches) <= set(split.fit.tolist()), "only fitting maps are augmented"
                sources.append(matches[0])
                assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
                assert (lattice_images(a, ops) == b).flatten(1).all(1).any(), ops
        assert sorted(sources) == sorted(split.fit.tolist() * epochs), "every fitting structure once per epoch"
        # the augmented maps keep their labels: recompute the DOS of a few with the file's solver settings
        x, out = batches[0]
        idx = [(x_train == a).flatten(1).all(1).nonzero().flatten()[0].item() for a in x[:2]]
        labels = compute_labels(out[:2, 0].double(), kgrid=TINY["kgrid"], cutoff=TINY["cutoff"],
                                method=TINY["method"])
        err = naive_relative_l1(labels["target"].numpy(), y_train[idx].numpy())
        assert err < 1e-3, (ops, err)


def test_frozen_views_are_precomputed_augmentations(files, monkeypatch):
    """Frozen mode: FROZEN_VIEWS augmented copies of the fitting maps, computed once per seed (before training),
    and each epoch's input of a structure is one of its own views."""
    calls = []
    real = pr.lattice_augment

    def spy(x, ops, generator=None):
        calls.append((len(x), tuple(ops)))
        return real(x, ops, generator)

    monkeypatch.setattr(pr, "lattice_augment", spy)
    result = pr.run_regression(files["encoder"], files["train"], files["test"], 10, mode="frozen",
                               augment="flip3+rot4", with_scratch=False, **FAST)
    n_fit = result["settings"]["n_fit"]
    assert calls == [(n_fit, ("flip3", "rot4"))] * (pr.FROZEN_VIEWS * FAST["seeds"])
    assert result["settings"]["frozen_views"] == pr.FROZEN_VIEWS
    views = torch.arange(6 * 3 * 2, dtype=torch.float32).view(6, 3, 2)
    picked = pr._pick_view(views, torch.Generator().manual_seed(0))
    for i in range(6):
        assert any(torch.equal(picked[i], views[i, v]) for v in range(3))


# --------------------------------------------------------------------------------------------- learning


def test_head_learns_features_that_determine_the_target():
    """Targets linear in 8 features: the trained head beats predicting the training mean by far."""
    g = torch.Generator().manual_seed(0)
    n_fit, n_val, n_test, dim = 160, 40, 200, 8
    x = torch.randn(n_fit + n_val + n_test, dim, generator=g)
    y = x @ (0.5 * torch.randn(dim, TARGET_POINTS, generator=g))
    cut = n_fit + n_val
    fit, val, test = (x[:n_fit], y[:n_fit]), (x[n_fit:cut], y[n_fit:cut]), (x[cut:], y[cut:])
    torch.manual_seed(0)
    head = pr.DOSHead(dim)
    selected = pr.train_select(head, [{"params": head.parameters(), "lr": 1e-3}], fit, val, epochs=60,
                               batch_size=32, weight_decay=0.0, augment=None,
                               generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    error = pr._score(selected, *test, torch.device("cpu"), n_figure=1).test_error
    mean_error = naive_relative_l1(fit[1].mean(0).expand(n_test, -1).numpy(), test[1].numpy())
    assert error < 0.25 * mean_error, (error, mean_error)
    assert selected.val_error == min(selected.val_history)
    assert selected.best_epoch == selected.val_history.index(selected.val_error) + 1


def test_scratch_network_learns_permittivity_target(tmp_path):
    """A file of nearly homogeneous cells whose target is a linear function of their permittivity: the
    from-scratch CNN, run through run_regression with the default optimiser, beats predicting the training mean
    by far."""
    rng = np.random.default_rng(0)
    n_train, n_test = 100, 60
    level = rng.uniform(1, 20, size=(n_train + n_test, 1, 1))
    eps = (level + rng.uniform(0, 0.5, size=(n_train + n_test, SIZE, SIZE))).astype(np.float32)
    feature = (eps.mean(axis=(1, 2)) - 10.5) / 5.5  # (N,), about unit variance
    target = feature[:, None] * rng.normal(size=(1, TARGET_POINTS))
    write_synthetic(tmp_path / "train.h5", eps[:n_train], target[:n_train])
    write_synthetic(tmp_path / "test.h5", eps[n_train:], target[n_train:])
    result = pr.run_regression(None, tmp_path / "train.h5", tmp_path / "test.h5", n_train, seeds=1, epochs=30,
                               batch_size=16, progress=False,
                               scratch_backbone={"name": "phc_cnn", "kwargs": {"width": ENCODER_WIDTH}})
    mean_error = naive_relative_l1(np.broadcast_to(target[:n_train].mean(0), target[n_train:].shape),
                                   target[n_train:])
    assert result["results"]["scratch"]["mean"] < 0.5 * mean_error, (result["results"], mean_error)


# ------------------------------------------------------------------------------------------- end to end


def check_schema(result, n_seeds, kinds, epochs=FAST["epochs"]):
    assert set(result) >= {"encoder", "train", "test", "n_labels", "mode", "seeds", "augment", "scratch_augment",
                           "results", "settings", "protocol"}
    assert set(result["results"]) == set(kinds)
    assert set(result["settings"]["networks"]) == set(kinds) == set(result["settings"]["optimizers"])
    for summary in result["results"].values():
        per_seed = summary["per_seed"]
        assert len(per_seed) == n_seeds and all(math.isfinite(e) and e > 0 for e in per_seed)
        assert summary["mean"] == pytest.approx(np.mean(per_seed))
        assert summary["std"] == pytest.approx(np.std(per_seed, ddof=1) if n_seeds > 1 else 0.0)
        assert len(summary["val_per_seed"]) == n_seeds and len(summary["best_epoch"]) == n_seeds
        assert [len(h) for h in summary["val_history"]] == [epochs] * n_seeds
        assert summary["val_per_seed"] == [min(h) for h in summary["val_history"]]


@pytest.mark.parametrize("mode,augment", [("frozen", "c4v+shifts"), ("finetune", "flip3+rot4")])
def test_end_to_end_json_and_figure(files, tmp_path, mode, augment):
    json_path, fig_path = tmp_path / "out" / "r.json", tmp_path / "out" / "r.png"
    result = pr.run_regression(files["encoder"], files["train"], files["test"], 10, mode=mode, augment=augment,
                               json_path=json_path, figure_path=fig_path, **FAST)
    check_schema(result, FAST["seeds"], ["encoder", "scratch"])
    assert result["mode"] == mode and result["augment"] == augment and result["n_labels"] == 10
    assert result["scratch_augment"] == augment, "the scratch network gets the same augmentation by default"
    assert result["settings"]["n_fit"] == 8 and result["settings"]["n_val"] == 2
    assert result["settings"]["n_test"] == N_TEST
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    assert fig_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in json_path.parent.iterdir() if p.name.startswith(".")], "no temporary files left"
    table = pr.format_regression_table(result)
    assert f"encoder ({mode})" in table and "from scratch" in table and augment in table


def test_scratch_and_finetuned_networks_are_the_same(files):
    """Fine-tuned encoder and scratch baseline: the same architecture (backbone spec, reference head, parameter
    count of an independently built network) and the same optimiser settings; only the initialisation and the
    augmentation (here deliberately different) differ. The frozen head trains the head's parameters only."""
    result = pr.run_regression(files["encoder"], files["train"], files["test"], 10, augment="shift+flip3",
                               scratch_augment="flip3", **FAST)
    nets, opts = result["settings"]["networks"], result["settings"]["optimizers"]
    reference = reference_network(0)
    n_ref = sum(p.numel() for p in reference.parameters())
    n_head = sum(p.numel() for p in reference[1].parameters())
    for kind in ("encoder", "scratch"):
        assert nets[kind]["backbone"] == {"name": "phc_cnn", "kwargs": {"width": ENCODER_WIDTH}}
        assert nets[kind]["head"] == [128, *REF_HEAD, TARGET_POINTS]
        assert nets[kind]["n_params"] == nets[kind]["n_trained"] == n_ref
        assert {k: v for k, v in opts[kind].items() if k != "augment"} == {
            "name": "adam", "lr": REF_LR, "backbone_lr": REF_LR, "weight_decay": REF_WEIGHT_DECAY,
            "schedule": "constant", "loss": pr.LOSS, "epochs": FAST["epochs"], "batch_size": FAST["batch_size"]}
    assert opts["encoder"]["augment"] == ["shift", "flip3"] and opts["scratch"]["augment"] == ["flip3"]
    assert "shift+flip3 (scratch flip3)" in pr.format_regression_table(result)
    frozen = pr.run_regression(files["encoder"], files["train"], files["test"], 10, mode="frozen",
                               with_scratch=False, **FAST)
    assert frozen["settings"]["networks"]["encoder"]["n_trained"] == n_head
    assert frozen["settings"]["networks"]["encoder"]["n_params"] == n_ref
    assert frozen["settings"]["optimizers"]["encoder"]["backbone_lr"] is None
    slow = pr.run_regression(files["encoder"], files["train"], files["test"], 10, backbone_lr_factor=0.1,
                             with_scratch=False, **FAST)
    assert slow["settings"]["optimizers"]["encoder"]["backbone_lr"] == pytest.approx(0.1 * REF_LR)


def test_scratch_only(files, tmp_path):
    result = pr.run_regression(None, files["train"], files["test"], 12, figure_path=tmp_path / "f.png",
                               scratch_backbone={"name": "phc_cnn", "kwargs": {"width": ENCODER_WIDTH}}, **FAST)
    check_schema(result, FAST["seeds"], ["scratch"])
    assert result["encoder"] is None and (tmp_path / "f.png").stat().st_size > 0
    assert result["settings"]["networks"]["scratch"]["head"] == [128, *REF_HEAD, TARGET_POINTS]
    assert "from scratch" in pr.format_regression_table(result)


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
    for mode in ("frozen", "finetune"):
        events.clear()
        pr.run_regression(files["encoder"], files["train"], files["test"], 10, mode=mode, augment="flip3", **FAST)
        assert events == ["select", "score"] * (2 * FAST["seeds"])


@pytest.mark.parametrize("mode", ["finetune", "frozen"])
def test_selection_does_not_depend_on_the_test_file(files, tmp_path, mode):
    """Same labels and seeds, deliberately different test files (blob cells; the level-set test maps with
    scrambled targets): identical validation curves and chosen epochs, different test errors."""
    x_test, y_test = read_file(files["test"])
    scrambled = tmp_path / "scrambled.h5"
    write_synthetic(scrambled, x_test[:, 0].numpy(), 3 * y_test.flip(0).numpy() + 1)
    kwargs = dict(mode=mode, augment="shift+flip3", **FAST)
    runs = [pr.run_regression(files["encoder"], files["train"], test, 10, **kwargs)
            for test in (files["test"], files["test_b"], scrambled)]
    for kind in ("encoder", "scratch"):
        first = runs[0]["results"][kind]
        for other in runs[1:]:
            res = other["results"][kind]
            assert res["val_history"] == first["val_history"] and res["best_epoch"] == first["best_epoch"]
            assert res["val_per_seed"] == first["val_per_seed"]
            assert res["per_seed"] != first["per_seed"]


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
        (dict(encoder=enc, n_labels=10, augment="rotate"), "--augment 'rotate': unknown lattice operation 'rotate'"),
        (dict(encoder=enc, n_labels=10, augment="flip3+rot"), "unknown lattice operation 'rot'"),
        (dict(encoder=enc, n_labels=10, scratch_augment="shifts+x"), "--scratch-augment 'shifts\\+x'"),
        (dict(encoder=rgb, n_labels=10), "3 input channels"),
        (dict(encoder=big, n_labels=10), "64x64"),
        (dict(encoder=tmp_path / "missing.pt", n_labels=10), "not found"),
        (dict(encoder=enc, n_labels=10, batch_size=1), "--batch-size"),
        (dict(encoder=enc, n_labels=10, lr=0.0), "--lr"),
        (dict(encoder=enc, n_labels=10, backbone_lr_factor=-1.0), "--backbone-lr-factor"),
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
    the same architecture and scratch augmentation (so a comparison of encoders can compute it once)."""
    kwargs = dict(augment="shift+flip3", **FAST)
    enc_only = pr.run_regression(files["encoder"], files["train"], files["test"], 10, with_scratch=False, **kwargs)
    check_schema(enc_only, FAST["seeds"], ["encoder"])
    assert "from scratch" not in pr.format_regression_table(enc_only)
    both = pr.run_regression(files["encoder"], files["train"], files["test"], 10, scratch_augment="flip3",
                             **kwargs)
    alone = pr.run_regression(None, files["train"], files["test"], 10, augment="flip3",
                              scratch_backbone={"name": "phc_cnn", "kwargs": {"width": ENCODER_WIDTH}}, **FAST)
    assert both["results"]["encoder"] == enc_only["results"]["encoder"]
    assert both["results"]["scratch"] == alone["results"]["scratch"]
