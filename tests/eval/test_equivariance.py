"""Equivariance diagnostics (essl probe --equivariance) on hand-built representations with known answers, and the
Figure 2 sweep end to end on tiny digits runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from essl.data import LabelledData
from essl.eval.equivariance import diagnose, format_diagnostics, invariance_scores


class _SortedPixels(nn.Module):
    """Exactly invariant to every pixel permutation: the sorted pixel values."""

    def forward(self, x):
        return x.flatten(1).sort(dim=1).values


def _data(n_train=96, n_test=48, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_train + n_test, 1, side, side), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n_train + n_test,), generator=g)
    return LabelledData("noise", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=3)


def test_an_invariant_representation_cannot_predict_the_transformation():
    d = diagnose(_SortedPixels(), _data(), ["rot4", "jigsaw"])
    for group, n in (("rot4", 4), ("jigsaw", 24)):
        r = d[group]
        assert r["invariance"]["cosine"] == pytest.approx(1.0, abs=1e-9)  # f(g·x) == f(x) exactly
        assert r["predictability"]["chance"] == pytest.approx(1 / n)
        # identical features for every element: a classifier can only be right on 1/|G| of the copies
        assert r["predictability"]["mean"] == pytest.approx(1 / n, abs=1e-9)
        # and the class-label probe is unchanged by the transformation
        assert r["linear_on_transformed"]["mean"] == pytest.approx(r["linear_plain"]["mean"], abs=1e-9)


def _ramps(n_train=96, n_test=48, side=8):
    """A brightness ramp down the rows plus noise: each rotation points it another way (identifiable)."""
    g = torch.Generator().manual_seed(1)
    n = n_train + n_test
    ramp = torch.linspace(0, 200, side).view(1, 1, side, 1)
    x = (ramp + 55 * torch.rand(n, 1, side, side, generator=g)).round().clamp(0, 255).to(torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    return LabelledData("ramps", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=3)


def test_raw_pixels_predict_rotations_and_are_not_invariant():
    d = diagnose(nn.Flatten(), _ramps(), ["rot4"])["rot4"]
    assert d["predictability"]["mean"] > 0.95  # the ramp's direction gives the rotation away, linearly
    assert d["invariance"]["cosine"] < 0.9  # a turned ramp is another pixel layout


def test_rotations_of_isotropic_noise_are_unpredictable_even_from_pixels():
    """iid noise has the same distribution in every orientation (Bayes limit 25%): what the data allow bounds the
    predictability, not the representation."""
    d = diagnose(nn.Flatten(), _data(), ["rot4"])["rot4"]
    assert d["predictability"]["mean"] < 0.4


def test_invariance_scores_by_hand():
    plain = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rotated = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # image 0 changes completely, image 1 not at all
    s = invariance_scores(plain, [plain, rotated])
    assert s["cosine_uncentred"] == pytest.approx(0.5) and s["cosine_other_images_uncentred"] == pytest.approx(0.0)


def test_centred_cosines_remove_the_common_component():
    """Features c + e_i (a large shared component c plus one unit vector per image): raw cosines are all ~1 whatever
    the transformation does; centred on the mean, e_i - ē against e_j - ē is exactly -1/3 for i != j (4 images)."""
    e = torch.eye(5)
    plain = 10 * e[4] + e[:4]
    same = invariance_scores(plain, [plain, plain.clone()])
    assert same["cosine"] == pytest.approx(1.0) and same["cosine_per_element"] == [1.0, pytest.approx(1.0)]
    swapped = invariance_scores(plain, [plain, plain.roll(1, dims=0)])  # g sends image i to image i - 1's features
    assert swapped["cosine_uncentred"] == pytest.approx(100 / 101)  # (c + e_i)·(c + e_j) / |c + e_i|²
    assert swapped["cosine"] == pytest.approx(-1 / 3) and swapped["cosine_other_images"] == pytest.approx(-1 / 3)


def test_grayscale_on_one_channel_is_skipped_and_the_table_prints():
    d = diagnose(nn.Flatten(), _data(), ["grayscale", "hflip"])
    assert "skipped" in d["grayscale"]
    table = format_diagnostics(d)
    assert "hflip" in table and "skipped" in table


def test_sweep_end_to_end_and_resume(tmp_path):
    from essl.cli import main

    out = tmp_path / "sweep"
    tiny = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "data.batch_size=32", "backbone.kwargs.width=8",
            "method.kwargs.hidden_dim=32", "method.kwargs.output_dim=16", "equivariance.hidden_dim=32",
            "data.image_size=16", "equivariance.crop_size=8", "trainer.log_every_n_steps=1"]
    argv = ["sweep", "configs/digits/simclr.yaml", *tiny, "--transforms", "rot4,grayscale", "--probe-seeds", "1",
            "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "sweep.json").read_text())
    assert set(res["runs"]) == {"baseline-none-s0", "invariance-rot4-s0", "equivariance-rot4-s0"}
    assert "grayscale" in res["skipped"] and "skipped" in res["summary"]["grayscale"]
    row = res["summary"]["rot4"]
    base = res["summary"]["baseline"]["linear"]
    for arm in ("invariance", "equivariance"):  # the relative change is (acc − base) / base
        assert row[arm]["relative"] == pytest.approx((row[arm]["linear"] - base) / base)
    eq_cfg = json.loads(json.dumps(torch.load(out / "runs" / "equivariance-rot4-s0" / "encoder.pt",
                                              weights_only=True)["config"]))
    assert eq_cfg["equivariance"]["group"] == "rot4" and eq_cfg["equivariance"]["weight"] == 0.4
    inv_cfg = torch.load(out / "runs" / "invariance-rot4-s0" / "encoder.pt", weights_only=True)["config"]
    assert inv_cfg["augment"]["groups"] == ["rot4"] and inv_cfg["equivariance"]["weight"] == 0.0
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "rot4" in (out / "sweep.md").read_text()
    mtime = (out / "runs" / "baseline-none-s0" / "encoder.pt").stat().st_mtime_ns
    assert main(argv) == 0  # finished runs are reused
    assert (out / "runs" / "baseline-none-s0" / "encoder.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "sweep.json").read_text())["summary"] == res["summary"]
