"""SSL losses against naive references; the BYOL target; E-SSL composition (λ = 0 is the plain method)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from essl.augment import ViewMaker
from essl.backbones import build_backbone
from essl.equivariance import EquivarianceBranch
from essl.methods import BYOL, SimCLR
from essl.methods.simclr import CrossViewInfoNCE
from essl.module import ESSLModule, OptimSpec


def naive_nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over 2B samples, written out pair by pair (Chen et al. 2020, eq. 1)."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = len(z)
    b = n // 2
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        sims = [torch.dot(z[i], z[j]) / temperature for j in range(n) if j != i]
        numerator = torch.dot(z[i], z[pos]) / temperature
        total = total - (numerator - torch.logsumexp(torch.stack(sims), 0))
    return total / n


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_lightly_nt_xent_matches_naive(temperature):
    torch.manual_seed(0)
    z0, z1 = torch.randn(6, 5), torch.randn(6, 5)
    ours = NTXentLoss(temperature=temperature)(z0, z1)
    assert torch.allclose(ours, naive_nt_xent(z0, z1, temperature), atol=1e-5)


def naive_cross_view_info_nce(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference CIFAR-10 loss written out anchor by anchor (rdangovs/essl cifar10/main.py): the positive of
    z0[i] is z1[i] and its negatives are the other z1[j] only; symmetrised over the two views."""
    a, b = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    n = len(a)

    def one_way(q, k):
        total = 0.0
        for i in range(n):
            sims = torch.stack([torch.dot(q[i], k[j]) / temperature for j in range(n)])
            total = total - (sims[i] - torch.logsumexp(sims, 0))
        return total / n

    return 0.5 * (one_way(a, b) + one_way(b, a))


@pytest.mark.parametrize("temperature", [0.2, 0.5])
def test_cross_view_info_nce_matches_naive(temperature):
    torch.manual_seed(1)
    z0, z1 = torch.randn(7, 5), torch.randn(7, 5)
    ours = CrossViewInfoNCE(temperature=temperature)(z0, z1)
    torch.testing.assert_close(ours, naive_cross_view_info_nce(z0, z1, temperature), rtol=1e-5, atol=1e-6)
    # it is not NT-Xent: the same-view negatives are missing
    assert not torch.isclose(ours, naive_nt_xent(z0, z1, temperature), atol=1e-3)


@pytest.mark.parametrize("negatives", ["all", "cross_view"])
def test_separate_passes_use_per_view_batchnorm_statistics(negatives):
    """separate_passes=True equals running each view through backbone and projector on its own (the reference);
    the default joint pass normalises both views with shared BatchNorm statistics, a different number."""
    backbone, dim = _tiny_backbone()
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) + 1.0]
    torch.manual_seed(0)
    split = SimCLR(backbone, dim, hidden_dim=16, output_dim=8, negatives=negatives, separate_passes=True)
    joint = copy.deepcopy(split)
    joint.separate_passes = False
    z = [split.projection(backbone(v)) for v in views]  # training mode: per-view batch statistics
    reference = naive_cross_view_info_nce if negatives == "cross_view" else naive_nt_xent
    torch.testing.assert_close(split.loss(backbone, views), reference(z[0], z[1], 0.5), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(joint.loss(backbone, views), split.loss(backbone, views), atol=1e-4)


def test_byol_separate_passes_per_view():
    backbone, dim = _tiny_backbone()
    torch.manual_seed(0)
    method = BYOL(backbone, dim, hidden_dim=16, output_dim=8, separate_passes=True)
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) + 1.0]
    p = [method.prediction(method.projection(backbone(v))) for v in views]
    with torch.no_grad():
        t = [method.target_projection(method.target_backbone(v)) for v in views]
    expected = 0.5 * (F.cosine_similarity(p[0], t[1]).mean() + F.cosine_similarity(p[1], t[0]).mean()) * -1
    torch.testing.assert_close(method.loss(backbone, views, 0, 10), expected, rtol=1e-5, atol=1e-6)


def test_projector_variants():
    """projection_mlp: lightly's SimCLRProjectionHead for the defaults; the reference CIFAR-10 ProjectionMLP and
    the reference photonics projector for the other settings."""
    from lightly.models.modules import SimCLRProjectionHead
    from torch import nn

    from essl.methods.simclr import projection_mlp

    torch.manual_seed(0)
    ours = projection_mlp(6, 10, 4)
    torch.manual_seed(0)
    lightly_head = SimCLRProjectionHead(6, 10, 4)
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), lightly_head(x))
    phc = [type(m) for m in projection_mlp(6, 10, 4, layers=3, final_norm="none").layers]
    assert phc == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    ref = list(projection_mlp(6, 10, 4, final_norm="bn_noaffine").layers)
    assert not ref[-1].affine and ref[-2].bias is None


def _tiny_backbone():
    torch.manual_seed(0)
    return build_backbone("small_cnn", 3, width=4)


def test_simclr_loss_is_nt_xent_of_projected_views():
    backbone, dim = _tiny_backbone()
    method = SimCLR(backbone, dim, hidden_dim=16, output_dim=8, temperature=0.5).eval()
    backbone.eval()
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    z = [method.projection(backbone(v)) for v in views]
    assert torch.allclose(method.loss(backbone, views), naive_nt_xent(z[0], z[1], 0.5), atol=1e-5)


def test_byol_target_gets_no_gradients_and_follows_the_ema():
    backbone, dim = _tiny_backbone()
    method = BYOL(backbone, dim, hidden_dim=16, output_dim=8, momentum_base=0.9)
    # make the target differ from the online network so the EMA is visible
    with torch.no_grad():
        for p in method.target_backbone.parameters():
            p.add_(1.0)
    online_before = copy.deepcopy(backbone.state_dict())
    target_before = copy.deepcopy(method.target_backbone.state_dict())
    step, max_steps = 3, 10
    loss = method.loss(backbone, [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)], step, max_steps)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target_backbone.parameters())
    assert all(p.grad is None for p in method.target_projection.parameters())
    assert any(p.grad is not None for p in backbone.parameters())
    m = method.momentum(step, max_steps)
    assert 0.9 < m < 1.0
    for name, p in method.target_backbone.named_parameters():
        expected = m * target_before[name] + (1 - m) * online_before[name]
        assert torch.allclose(p, expected, atol=1e-6), name


def _module(weight: float, method: torch.nn.Module, backbone, dim) -> ESSLModule:
    branch = EquivarianceBranch("rot4", dim, weight, hidden_dim=8) if weight > 0 else None
    return ESSLModule(backbone, method, ViewMaker(torch.nn.Identity()), OptimSpec(), (0.5,) * 3, (0.25,) * 3,
                      equivariance=branch)


def test_lambda_zero_is_exactly_the_plain_method_and_skips_the_extra_forward():
    backbone, dim = _tiny_backbone()
    method = SimCLR(backbone, dim, hidden_dim=16, output_dim=8)
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    calls = []
    backbone.register_forward_hook(lambda *a: calls.append(1))

    plain = _module(0.0, method, backbone, dim)
    assert plain.equivariance is None
    torch.manual_seed(5)
    out = plain.losses({"views": views})
    assert len(calls) == 1  # no extra forward pass
    torch.manual_seed(5)
    assert torch.equal(out["loss"], method.loss(backbone, views))  # bit-identical

    lam = 0.4
    essl_module = _module(lam, method, backbone, dim)
    x_eq, labels = essl_module.equivariance.make_batch(torch.randn(4, 3, 4, 4))
    calls.clear()
    torch.manual_seed(5)
    out2 = essl_module.losses({"views": views, "x_eq": x_eq, "eq_labels": labels})
    assert len(calls) == 2
    assert torch.equal(out2["ssl"], out["ssl"])
    assert torch.allclose(out2["loss"], out["ssl"] + lam * out2["equi"])
    assert 0.0 <= float(out2["equi_acc"]) <= 1.0


def test_photonics_equivariance_head_uses_batchnorm():
    branch = EquivarianceBranch("translate", 1024, 5.0, hidden_dim=512, norm="batchnorm")
    kinds = [type(m).__name__ for m in branch.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert branch.head[0].out_features == 512 and branch.head[-1].out_features == 4


def test_equivariance_head_is_the_papers_mlp():
    branch = EquivarianceBranch("rot4", 512, 0.4)
    kinds = [type(m).__name__ for m in branch.head]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU", "Linear"]
    assert branch.head[0].in_features == 512 and branch.head[0].out_features == 2048
    assert branch.head[-1].out_features == 4


def test_optimizer_groups_exclude_bias_and_norm_and_keep_fixed_lr():
    """LARS: 1-d parameters (biases, norm weights) get no weight decay, which switches lightly's LARS adaptation
    off for them, and their own learning rate; parameters a method marks keep the peak learning rate while the
    cosine schedule moves the rest."""
    from essl.module import optimizer_groups

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    named = list(net.named_parameters())
    fixed = {id(p) for p in net[2].parameters()}
    spec = OptimSpec(name="lars", lr=0.2, weight_decay=1e-6, bias_lr_ratio=0.024)
    groups = optimizer_groups(named, spec, fixed)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(named)
    for name, p in named:
        g = by_id[id(p)]
        assert g["fixed_lr"] == (id(p) in fixed), name
        assert (g["weight_decay"] == 0.0) == (p.ndim == 1), name
        assert g["lr"] == pytest.approx(0.2 * (0.024 if p.ndim == 1 else 1.0)), name
    sgd = optimizer_groups(named, OptimSpec(name="sgd", weight_decay=5e-4), set())
    assert all(g["weight_decay"] == 5e-4 for g in sgd)  # no exclusion unless asked (or LARS)


def test_equivariance_head_variants_of_the_reference():
    from torch import nn

    from essl.equivariance import equivariance_head

    simsiam = [type(m) for m in equivariance_head(512, 2048, 4, last_relu=False)]
    assert simsiam == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear, nn.LayerNorm, nn.Linear]
    imagenet = equivariance_head(2048, 2048, 4, bottleneck_dim=256)
    assert [type(m) for m in imagenet][-3:] == [nn.Linear, nn.LayerNorm, nn.Linear]
    assert imagenet[-3].out_features == 256 and imagenet[-1].in_features == 256
