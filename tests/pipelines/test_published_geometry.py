"""The published pre/post-processing around the sampler, checked against torchvision on the same tensors.

The published scripts upscale with ``Resize(512, BICUBIC, antialias=True)`` when a side is below 512, pad with
zeros to multiples of 64, and after decoding crop, clip to [0,1], ``Resize((h, w))`` back and ``save_image``.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, Resize
from torchvision.utils import save_image

from pipelines.geometry import from_model_output, plan_geometry, to_model_input
from utils.image_io import load_rgb01, save_png01

BICUBIC = InterpolationMode.BICUBIC
# short sides 143, 129, 511, 1 as landscape, portrait and square; the long sides make truncation differ from
# rounding where the short side allows it (512·160/143 = 572.9, 512·200/129 = 793.8, 512·1000/511 = 1001.96)
SIZES = [(143, 160), (160, 143), (143, 143), (129, 200), (200, 129), (129, 129),
         (511, 1000), (1000, 511), (511, 511), (1, 5), (5, 1), (1, 1)]


def edgy_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(3,H,W) in [0,1]: random pixels snapped to 0 or 1 (hard edges, so a bicubic upscale overshoots)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) > 0.5).float()


@pytest.mark.parametrize("hw", SIZES)
def test_resized_size_equals_torchvision_resize(hw):
    img = edgy_image(*hw)
    expected = Resize(512, interpolation=BICUBIC, antialias=True)(img[None])
    geom = plan_geometry(*hw)
    assert geom.resized_hw == tuple(expected.shape[-2:])
    assert geom.padded_hw == tuple(-(-s // 64) * 64 for s in expected.shape[-2:])


def test_resized_size_truncates_and_width_is_short_side_of_a_square():
    assert plan_geometry(143, 160).resized_hw == (512, 572)   # 572.9 truncated
    assert plan_geometry(160, 143).resized_hw == (572, 512)
    assert plan_geometry(511, 1000).resized_hw == (512, 1001)
    assert plan_geometry(143, 143).resized_hw == (512, 512)
    assert plan_geometry(512, 143).resized_hw == (1833, 512)  # short side 143 is the width: 512·512/143 = 1833.2
    assert plan_geometry(600, 512).resized_hw == (600, 512)   # no side below 512: untouched


@pytest.mark.parametrize("hw", [(143, 160), (160, 143), (129, 129), (511, 1000), (1, 5)])
def test_model_input_is_the_unclamped_torchvision_upscale_zero_padded(hw):
    img = edgy_image(*hw, seed=1)
    up = Resize(512, interpolation=BICUBIC, antialias=True)(img[None])
    geom = plan_geometry(*hw)
    x = to_model_input(img, geom)
    rh, rw = up.shape[-2:]
    assert x.shape == (1, 3, *geom.padded_hw)
    assert torch.equal(x[..., :rh, :rw], up)
    assert torch.count_nonzero(x[..., rh:, :]) == 0 and torch.count_nonzero(x[..., :, rw:]) == 0
    if min(hw) > 1:  # a 1-pixel side upscales to constants: no overshoot to see
        assert x.min() < -0.01 and x.max() > 1.01


def published_output(decoded01: torch.Tensor, orig_hw: tuple[int, int], resized_hw: tuple[int, int]) -> torch.Tensor:
    """The published order on (1,3,Hp,Wp): crop, clip to [0,1], torchvision ``Resize`` to the original size."""
    x = decoded01[:, :, : resized_hw[0], : resized_hw[1]].clip(0.0, 1.0)
    return Resize(orig_hw, interpolation=BICUBIC, antialias=True)(x)


@pytest.mark.parametrize("hw", [(143, 160), (160, 143), (129, 129), (600, 700)])
def test_output_png_bytes_equal_save_image_of_published_order(tmp_path, hw):
    geom = plan_geometry(*hw)
    g = torch.Generator().manual_seed(2)
    decoded01 = (torch.rand(1, 3, *geom.padded_hw, generator=g) > 0.5).float() * 1.3 - 0.15  # overshoots both ends
    save_image(published_output(decoded01, geom.orig_hw, geom.resized_hw)[0], tmp_path / "published.png")
    save_png01(from_model_output(decoded01, geom), tmp_path / "ours.png")
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "published.png").read_bytes()
    if geom.resized_hw != geom.orig_hw:  # the other order (resize, then clip) gives other bytes: the test can fail
        x = decoded01[..., : geom.resized_hw[0], : geom.resized_hw[1]]
        save_png01(F.interpolate(x, size=hw, mode="bicubic", antialias=True)[0].clamp(0, 1), tmp_path / "other.png")
        assert (tmp_path / "other.png").read_bytes() != (tmp_path / "published.png").read_bytes()


def test_8bit_conversion_png_bytes_equal_save_image(tmp_path):
    """x·255 + 0.5, clamped, truncated: exact halves round up (2.5/255 -> 3, where round-half-even gives 2)."""
    ties = torch.tensor([(k + 0.5) / 255 for k in range(0, 255, 2)])
    values = torch.cat([ties, torch.tensor([-0.3, -1e-7, 0.0, 1.0, 1.0 + 1e-7, 1.4]),
                        torch.rand(3 * 40 * 41 - ties.numel() - 6, generator=torch.Generator().manual_seed(3))])
    img = values.view(3, 40, 41)
    save_image(img, tmp_path / "tv.png")
    save_png01(img, tmp_path / "ours.png")
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "tv.png").read_bytes()
    save_png01(torch.full((3, 1, 1), 2.5 / 255), tmp_path / "tie.png")
    with Image.open(tmp_path / "tie.png") as im:
        assert im.getpixel((0, 0)) == (3, 3, 3)


def test_reading_equals_cv2_imread_for_8bit_files(tmp_path):
    """The published scripts read with ``cv2.imread`` (BGR -> RGB); Pillow decodes the same pixels for 8-bit PNG
    (RGB, grey, RGBA: alpha dropped) and baseline JPEG (4:4:4 and 4:2:0)."""
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "q444.jpg", quality=90, subsampling=0)
    Image.fromarray(rgb).save(tmp_path / "q420.jpg", quality=75, subsampling=2)
    for path in sorted(tmp_path.iterdir()):
        published = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        ours = (load_rgb01(path) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, published), path.name
