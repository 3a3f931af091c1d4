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


def test_equivariance_head_is_the_papers_mlp():
    branch = EquivarianceBranch("rot4", 512, 0.4)
    kinds = [type(m).__name__ for m in branch.head]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU", "Linear"]
    assert branch.head[0].in_features == 512 and branch.head[0].out_features == 2048
    assert branch.head[-1].out_features == 4
