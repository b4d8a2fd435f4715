"""Content-kept measures of training pairs against their closed forms (metrics.content_kept)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metrics.content_kept import affine_fit, affine_fit_psnr, detail_kept, mean_gradient
from metrics.full_reference import psnr


def _photo(seed: int, size: int = 48) -> torch.Tensor:
    """A smooth-plus-texture test image (1,3,S,S) in [0.1,0.9] (no clamping by any map below)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(1, 3, 6, 6, generator=gen, dtype=torch.float64), size=(size, size),
                           mode="bilinear", align_corners=False)
    fine = torch.rand(1, 3, size, size, generator=gen, dtype=torch.float64)
    return 0.1 + 0.8 * (0.7 * coarse + 0.3 * fine)


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma) + 1
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, -1, -1)
    return F.conv2d(F.pad(img, (radius,) * 4, mode="replicate"), kernel, groups=3)


@pytest.mark.parametrize("t", [0.3, 0.6, 0.9])
def test_homogeneous_haze_is_undone_by_the_fit_and_keeps_t_of_the_detail(t: float) -> None:
    clean = _photo(0)
    airlight = torch.tensor([0.95, 0.9, 0.8], dtype=torch.float64)[None, :, None, None]
    hazy = t * clean + (1 - t) * airlight
    assert float(affine_fit_psnr(hazy, clean)[0]) > 100.0
    assert float(detail_kept(hazy, clean)[0]) == pytest.approx(t, rel=1e-12)


def test_a_colour_mixing_affine_map_is_undone_exactly() -> None:
    clean = _photo(1)
    mix = torch.tensor([[0.6, 0.2, 0.1], [0.1, 0.5, 0.2], [0.05, 0.1, 0.7]], dtype=torch.float64)
    hazy = torch.einsum("ij,bjhw->bihw", mix, clean) + 0.1
    assert torch.allclose(affine_fit(hazy, clean), clean, atol=1e-9)


def test_blur_and_depth_varying_haze_lower_both_measures() -> None:
    clean = _photo(2)
    ramp = torch.linspace(0.2, 0.9, clean.shape[-2], dtype=torch.float64)[None, None, :, None]
    hazy_depth = ramp * clean + (1 - ramp) * 0.9
    sharp, blurred = 0.6 * clean + 0.36, 0.6 * _blur(clean, 1.5) + 0.36
    fit_sharp, fit_depth, fit_blur = (float(affine_fit_psnr(h, clean)[0]) for h in (sharp, hazy_depth, blurred))
    assert fit_sharp > 100.0 > 40.0 > max(fit_depth, fit_blur)
    assert float(detail_kept(blurred, clean)[0]) < 0.6 * 0.8
    expected = float(mean_gradient(_blur(clean, 1.5))[0] / mean_gradient(clean)[0])
    assert float(detail_kept(blurred, clean)[0]) == pytest.approx(0.6 * expected, rel=1e-12)


def test_the_fit_is_least_squares_per_image() -> None:
    """No other affine map fits better: perturbing the fitted coefficients only lowers the PSNR."""
    clean, other = _photo(3), _photo(4)
    hazy = torch.cat([0.5 * _blur(clean, 2.0) + 0.4, 0.7 * other + 0.2])
    target = torch.cat([clean, clean])
    fitted = affine_fit(hazy, target)
    for k in range(2):
        best = float(psnr(fitted[k:k + 1], target[k:k + 1])[0])
        for scale, shift in ((1.02, 0.0), (0.98, 0.0), (1.0, 0.01)):
            worse = (fitted[k:k + 1] - fitted[k:k + 1].mean()) * scale + fitted[k:k + 1].mean() + shift
            assert float(psnr(worse.clamp(0, 1), target[k:k + 1])[0]) < best
    assert float(affine_fit_psnr(hazy[1:], target[1:])[0]) < float(affine_fit_psnr(hazy[:1], target[:1])[0])


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        affine_fit_psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="equal shape"):
        detail_kept(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
