"""SimSiam, Barlow Twins and VICReg (issue 11): each loss against a naive implementation written from its paper,
the reference's constant-lr predictor, and the registry that owns the method choices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from essl.backbones import build_backbone
from essl.methods import METHODS, build_method, describe, method_parameters


def _naive_simsiam(p0, p1, z0, z1):
    """D(p, z) = −cos(p, stop-grad z), symmetrised (Chen & He 2021, eq. 1-2), one sample at a time."""
    d = [-torch.dot(F.normalize(p, dim=0), F.normalize(z.detach(), dim=0)) for p, z in
         [*zip(p0, z1, strict=True), *zip(p1, z0, strict=True)]]
    return 0.5 * (sum(d[:len(p0)]) / len(p0) + sum(d[len(p0):]) / len(p0))


def _naive_barlow(z0, z1, lam):
    """Zbontar et al. 2021, eq. 1-2: C_ij = Σ_b ẑ0_bi ẑ1_bj / N with batch-standardised ẑ (biased variance)."""
    n, d = z0.shape

    def standardise(z):
        mean = sum(z[b] for b in range(n)) / n
        var = sum((z[b] - mean) ** 2 for b in range(n)) / n
        return (z - mean) / torch.sqrt(var + 1e-5)

    a, b = standardise(z0), standardise(z1)
    c = torch.zeros(d, d)
    for i in range(d):
        for j in range(d):
            c[i, j] = sum(a[k, i] * b[k, j] for k in range(n)) / n
    on = sum((1 - c[i, i]) ** 2 for i in range(d))
    off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lam * off


def _naive_vicreg(z0, z1, inv, var, cov, eps=1e-4):
    """Bardes et al. 2022, eq. 1-6: s = MSE, v = mean_j relu(1 − sqrt(Var_j + ε)) per branch, c = Σ_{i≠j} C_ij² / d."""
    n, d = z0.shape
    s = ((z0 - z1) ** 2).sum() / (n * d)

    def v(z):
        return sum(F.relu(1 - torch.sqrt(z[:, j].var() + eps)) for j in range(d)) / d

    def c(z):
        zc = z - z.mean(0)
        cm = zc.T @ zc / (n - 1)
        return sum(cm[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    return inv * s + var * 0.5 * (v(z0) + v(z1)) + cov * (c(z0) + c(z1))


def _tiny():
    torch.manual_seed(0)
    return build_backbone("small_cnn", 3, width=4)


VIEWS = [torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8) + 0.5]


def test_simsiam_loss_matches_naive_and_stops_the_gradient():
    backbone, dim = _tiny()
    method = build_method("simsiam", backbone, dim, hidden_dim=16, output_dim=8, predictor_dim=4)
    loss = method.loss(backbone, VIEWS)
    z = [method.projection(backbone(v)) for v in VIEWS]
    p = [method.prediction(zz) for zz in z]
    torch.testing.assert_close(loss, _naive_simsiam(p[0], p[1], z[0], z[1]), rtol=1e-5, atol=1e-6)
    # the target branch carries no gradient: d loss / d z only through the predictor
    z0 = z[0].detach().requires_grad_(True)
    method.criterion(method.prediction(z[1]), z0.detach()).backward()
    assert z0.grad is None
    assert {id(q) for q in method.fixed_lr_parameters()} == {id(q) for q in method.prediction.parameters()}


@pytest.mark.parametrize("lam", [0.0051, 0.5])
def test_barlow_twins_loss_matches_naive(lam):
    backbone, dim = _tiny()
    method = build_method("barlowtwins", backbone, dim, hidden_dim=8, output_dim=5, lambda_offdiag=lam)
    loss = method.loss(backbone, VIEWS)
    z = [method.projection(backbone(v)) for v in VIEWS]
    torch.testing.assert_close(loss, _naive_barlow(z[0], z[1], lam), rtol=1e-4, atol=1e-4)


def test_vicreg_loss_matches_naive():
    backbone, dim = _tiny()
    method = build_method("vicreg", backbone, dim, hidden_dim=8, output_dim=5, invariance=25.0, variance=25.0,
                          covariance=1.0)
    loss = method.loss(backbone, VIEWS)
    z = [method.projection(backbone(v)) for v in VIEWS]
    torch.testing.assert_close(loss, _naive_vicreg(z[0], z[1], 25.0, 25.0, 1.0), rtol=1e-4, atol=1e-4)


def test_simsiam_predictor_keeps_the_peak_learning_rate():
    """The reference trains SimSiam's predictor with its own optimiser that no schedule touches."""
    from essl.augment import ViewMaker
    from essl.module import ESSLModule, OptimSpec

    backbone, dim = _tiny()
    method = build_method("simsiam", backbone, dim, hidden_dim=16, output_dim=8, predictor_dim=4)
    module = ESSLModule(backbone, method, ViewMaker(torch.nn.Identity()), OptimSpec(lr=0.1, warmup_epochs=0),
                        (0.5,) * 3, (0.25,) * 3)
    module.max_steps = lambda: 10  # no trainer: a 10-step cosine
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    pred = {id(p) for p in method.prediction.parameters()}
    for _ in range(5):
        opt.step()
        sched.step()
    for group in opt.param_groups:
        fixed = all(id(p) in pred for p in group["params"])
        assert group["fixed_lr"] == fixed
        assert (group["lr"] == pytest.approx(0.1)) == fixed  # the rest has decayed half way


def test_registry_lists_the_methods_with_their_parameters():
    assert set(METHODS) == {"simclr", "byol", "simsiam", "barlowtwins", "vicreg"}
    for name in METHODS:
        assert describe(name) and "backbone" not in method_parameters(name)
    assert method_parameters("barlowtwins")["lambda_offdiag"] == 0.0051
    assert method_parameters("vicreg")["invariance"] == 25.0
