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


# ------------------------------------------------------------------------------- batched bicubic resampling

def smooth_images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure at every scale: bilinear upsamplings of coarse noise plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    fine = 0.2 * torch.rand(n, channels, size, size, generator=g)
    return (255 * (0.8 * up + fine)).round().to(torch.uint8)


def random_boxes(n: int, height: int, width: int, seed: int = 0):
    """(top, left, h, w) boxes of every size inside the image, as (n,) int64 tensors."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(1, height + 1, (n,), generator=g)
    w = torch.randint(1, width + 1, (n,), generator=g)
    top = (torch.rand(n, generator=g) * (height - h + 1)).long()
    left = (torch.rand(n, generator=g) * (width - w + 1)).long()
    return top, left, h, w


def torchvision_resized_crops(x, top, left, h, w, size, flip):
    """The reference: torchvision's per-image resized_crop (bicubic, antialias) and horizontal flip."""
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    out = []
    for i in range(x.shape[0]):
        img = tv.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        out.append(tv.horizontal_flip(img) if flip[i] else img)
    return torch.stack(out)


@pytest.mark.parametrize("size", [32, 12])  # 12: every box of a 20 px image is downsampled or upsampled
def test_resized_crop_equals_torchvision_per_image(size):
    from essl.eval.features import resized_crop

    n, side = 48, 20
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    top, left, h, w = random_boxes(n, side, side)
    flip = torch.arange(n) % 2 == 0
    # float images: the matrices alone, compared with torchvision's float path (float32 rounding only)
    xf = x.float() / 255
    torch.testing.assert_close(resized_crop(xf, top, left, h, w, size, flip=flip),
                               torchvision_resized_crops(xf, top, left, h, w, size, flip), atol=2e-5, rtol=0)
    # uint8 images: two rounded passes as PIL/torchvision; their fixed-point weights round a few intermediate
    # values the other way, which the second pass can amplify to 2 grey levels (measured on white noise, the
    # worst case: 99.4-99.8% of values identical over 3 seeds; 1 level at most on the paper's test view)
    ours = resized_crop(x, top, left, h, w, size, flip=flip) * 255
    ref = torchvision_resized_crops(x, top, left, h, w, size, flip).float()
    diff = (ours - ref).abs()
    assert diff.max() <= 2 and (diff == 0).float().mean() >= 0.99
    torch.testing.assert_close(ours, ours.round(), atol=1e-3, rtol=0)  # on the uint8 grid


def test_resample_weights_rows_are_normalised_and_identity_for_full_window():
    from essl.eval.features import resample_weights

    w = resample_weights(torch.tensor([0, 3]), torch.tensor([10, 5]), 10, 10)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 10))
    torch.testing.assert_close(w[0], torch.eye(10))  # a full-size window is the identity
    assert (w[1][:, :3] == 0).all() and (w[1][:, 8:] == 0).all(), "no weight outside the window"
    with pytest.raises(ValueError, match="inside"):
        resample_weights(torch.tensor([6]), torch.tensor([5]), 10, 4)


def test_resize_center_crop_non_square_equals_torchvision():
    tv = pytest.importorskip("torchvision.transforms.v2")
    from essl.eval.features import resize_center_crop

    x = torch.rand(3, 2, 10, 14, generator=torch.Generator().manual_seed(2))  # float: exact comparison
    ref = tv.Compose([tv.Resize(12, interpolation=tv.InterpolationMode.BICUBIC, antialias=True),
                      tv.CenterCrop(11)])
    torch.testing.assert_close(resize_center_crop(x, 12, 11), torch.stack([ref(img) for img in x]),
                               atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="larger"):
        resize_center_crop(x, 12, 13)


def test_transform_replaces_scaling_on_the_device_batch():
    encoder, x = tiny_encoder().eval(), smooth_images(7, 8)
    seen = []

    def transform(batch):
        seen.append(batch.dtype)
        return batch.float().flip(-1) / 255

    feats = extract_features(encoder, x, batch_size=3, progress=False, transform=transform)
    with torch.no_grad():
        expected = encoder(x.float().flip(-1) / 255)
    torch.testing.assert_close(feats, expected)
    assert seen == [torch.uint8] * 3, "the transform gets the stored uint8 batches"
