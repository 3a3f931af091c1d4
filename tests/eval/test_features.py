"""essl.eval.features: one pass of a frozen encoder equals calling it directly."""

import pytest
import torch
from torch import nn

from essl.eval.features import extract_features


def tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm makes train vs eval mode visible in the output
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def images(n: int = 21) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_equals_direct_call_in_eval_mode():
    encoder, x = tiny_encoder(), images()
    with torch.no_grad():
        bn = encoder[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        expected = encoder.eval()(x.float() / 255)
    encoder.train()
    feats = extract_features(encoder, x, batch_size=4, device="cpu", progress=False)
    assert feats.shape == (21, 4) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(feats, expected)
    assert encoder.training, "the encoder's previous mode is restored"


def test_batch_size_does_not_matter_and_floats_pass_through():
    encoder, x = tiny_encoder().eval(), images()
    a = extract_features(encoder, x, batch_size=256, progress=False)
    b = extract_features(encoder, x, batch_size=1, progress=False)
    c = extract_features(encoder, x.float() / 255, batch_size=5, progress=False)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_progress_bar_runs(capsys):
    feats = extract_features(tiny_encoder(), images(3), progress=True)
    assert feats.shape == (3, 4)


def test_flatten_gives_raw_pixels_in_unit_range():
    x = images(5)
    feats = extract_features(nn.Flatten(), x, progress=False)
    assert feats.shape == (5, 3 * 8 * 8)
    assert feats.min() >= 0 and feats.max() <= 1
    torch.testing.assert_close(feats * 255, x.flatten(1).float())


@pytest.mark.parametrize(
    "x, encoder, match",
    [
        (torch.zeros(3, 8, 8, dtype=torch.uint8), nn.Flatten(), r"\(N, C, H, W\)"),
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), nn.Flatten(), "N = 0"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), nn.Flatten(), "uint8 or floating"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), nn.Identity(), r"\(B, D\)"),
    ],
)
def test_bad_input(x, encoder, match):
    with pytest.raises(ValueError, match=match):
        extract_features(encoder, x, progress=False)


def test_loaded_encoder_file_equals_direct_call(tmp_path):
    encoder_mod = pytest.importorskip("essl.encoder")
    from essl.backbones import build_backbone

    torch.manual_seed(0)
    backbone, dim = build_backbone("small_cnn", 3, width=4)
    path = encoder_mod.export_encoder(tmp_path / "encoder.pt", backbone, "small_cnn", {"width": 4}, dim, 3, 8,
                                      (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    encoder = encoder_mod.load_encoder(path)
    x = images(10)
    with torch.no_grad():
        expected = encoder(x.float() / 255)
    feats = extract_features(encoder, x, batch_size=3, device="cpu", progress=False)
    assert feats.shape == (10, encoder.feature_dim)
    torch.testing.assert_close(feats, expected)
