import math

import numpy as np
import pytest
import torch

from metrics.ssim import MS_SSIM_WEIGHTS, gaussian_window, ms_ssim, ms_ssim_grad_tiled, ssim


def _hand_gaussian_2d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    c = (size - 1) / 2
    g = np.array([[math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma ** 2)) for j in range(size)]
                  for i in range(size)])
    return g / g.sum()


def test_gaussian_window_matches_formula() -> None:
    g = gaussian_window(11, 1.5, dtype=torch.float64)
    assert g.shape == (11,)
    assert np.allclose(torch.outer(g, g).numpy(), _hand_gaussian_2d())


@pytest.mark.parametrize("shape", [(2, 3, 32, 40), (1, 3, 200, 170)])
def test_identity_gives_one(shape: tuple[int, ...]) -> None:
    x = torch.rand(*shape)
    assert torch.allclose(ssim(x, x.clone()), torch.ones(shape[0]), atol=1e-6)
    assert torch.allclose(ms_ssim(x, x.clone()), torch.ones(shape[0]), atol=1e-6)
    assert torch.allclose(ms_ssim(x, x.clone(), normalize=True), torch.ones(shape[0]), atol=1e-6)


def test_gradient_finite_for_identical_images() -> None:
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    y = x.detach().clone()
    for value in (ssim(x, y), ms_ssim(x, y), ms_ssim(x, y, normalize=True)):
        (grad,) = torch.autograd.grad(value.sum(), x)
        assert torch.isfinite(grad).all()


def test_gradient_finite_for_anticorrelated_images() -> None:
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    y = 1.0 - x.detach()
    (grad,) = torch.autograd.grad(ms_ssim(x, y).sum(), x)
    assert torch.isfinite(grad).all()


def test_constant_shift_equals_luminance_term_by_hand() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((2, 3, 20, 17)) * 0.5
    c = 0.2
    g = _hand_gaussian_2d()
    c1 = (0.01 * 1.0) ** 2
    expected = []
    for b in range(2):
        vals = []
        for ch in range(3):
            for i in range(20 - 10):
                for j in range(17 - 10):
                    mu_x = float((g * x[b, ch, i:i + 11, j:j + 11]).sum())
                    mu_y = mu_x + c
                    vals.append((2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1))
        expected.append(np.mean(vals))
    xt = torch.from_numpy(x)
    out = ssim(xt, xt + c)
    assert np.allclose(out.numpy(), expected, atol=1e-9)
    assert out.max() < 0.95


def test_data_range_scales_constants() -> None:
    x = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    y = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    assert torch.allclose(ssim(x * 255, y * 255, data_range=255.0), ssim(x, y))
    assert torch.allclose(ms_ssim(x * 2, y * 2, data_range=2.0), ms_ssim(x, y))


def _pool_by_hand(x: torch.Tensor, times: int) -> torch.Tensor:
    for _ in range(times):
        b, c, h, w = x.shape
        x = x[..., : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))
    return x


def test_ms_ssim_coarsest_scale_is_ssim_of_pooled_images() -> None:
    x = torch.rand(2, 3, 181, 203, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    out = ms_ssim(x, y, weights=(0.0, 0.0, 0.0, 0.0, 1.0))
    assert torch.allclose(out, ssim(_pool_by_hand(x, 4), _pool_by_hand(y, 4)))
    assert torch.allclose(ms_ssim(x, y, weights=(1.0,)), ssim(x, y))


def test_ms_ssim_normalize_maps_each_scale() -> None:
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    y = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    s = ssim(x, y)
    assert torch.allclose(ms_ssim(x, y, weights=(0.7,), normalize=True), ((s + 1) / 2) ** 0.7)
    assert MS_SSIM_WEIGHTS == (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (8, 8), (16, 100), (40, 2)])
def test_small_images_do_not_crash(hw: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *hw)
    y = torch.rand(2, 3, *hw)
    for value in (ssim(x, y), ms_ssim(x, y), ms_ssim(x, y, normalize=True)):
        assert value.shape == (2,) and torch.isfinite(value).all()
    assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-6)


def test_shrunk_window_uses_image_size() -> None:
    x = torch.rand(1, 1, 5, 9, dtype=torch.float64)
    y = torch.rand(1, 1, 5, 9, dtype=torch.float64)
    g5 = _hand_gaussian_2d(5)
    c1, c2 = 1e-4, 9e-4
    vals = []
    for j in range(9 - 4):
        px, py = x[0, 0, :, j:j + 5].numpy(), y[0, 0, :, j:j + 5].numpy()
        mx, my = (g5 * px).sum(), (g5 * py).sum()
        vx, vy = (g5 * px * px).sum() - mx ** 2, (g5 * py * py).sum() - my ** 2
        cov = (g5 * px * py).sum() - mx * my
        vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert np.isclose(ssim(x, y).item(), np.mean(vals))


def test_mismatched_inputs_raise() -> None:
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def _smooth_pair(h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    y = torch.nn.functional.interpolate(torch.rand(1, 2, h // 8, w // 8, generator=gen, dtype=dtype), size=(h, w),
                                        mode="bilinear", align_corners=False)
    return (y + 0.2 * torch.randn(1, 2, h, w, generator=gen, dtype=dtype)).clamp(0, 1), y


@pytest.mark.parametrize("normalize", [True, False])
def test_ms_ssim_grad_tiled_equals_autograd_over_many_tiles(normalize: bool) -> None:
    # 200x245 with 64-px cores: 4x4 tiles of up to (64+160)^2 px crops; the last row / column cores (8 / 53 px): the
    # first lies past the last window position and owns none. float64, so the only difference left is the
    # summation order of the per-scale means and of the overlapping halo gradients: relative error ~1e-15; 1e-10
    # leaves room for any conv backend while still failing for a single misplaced window (~1e-3).
    x, y = _smooth_pair(200, 245, torch.float64)
    leaf = x.clone().requires_grad_(True)
    value = ms_ssim(leaf, y, normalize=normalize)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    tiled_value, tiled_grad = ms_ssim_grad_tiled(x, y, tile=64, normalize=normalize)
    torch.testing.assert_close(tiled_value, value.detach(), rtol=1e-12, atol=0)
    assert (tiled_grad - grad).abs().max() <= 1e-10 * grad.abs().max()
    assert grad.abs().max() > 0


def test_ms_ssim_grad_tiled_float32_and_small_image_fallback() -> None:
    # float32: per-element rounding (~6e-8) accumulated over <= 5 scales of 121-tap windows and different
    # summation orders stays far below 1e-4 of the largest gradient
    x, y = _smooth_pair(192, 200, torch.float32)
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ms_ssim(leaf, y).sum(), leaf)
    _, tiled = ms_ssim_grad_tiled(x, y, tile=64)
    assert (tiled - grad).abs().max() <= 1e-4 * grad.abs().max()
    small_x, small_y = x[..., :100, :100], y[..., :100, :100]  # below 11*16 px: plain autograd
    leaf = small_x.clone().requires_grad_(True)
    (small_grad,) = torch.autograd.grad(ms_ssim(leaf, small_y).sum(), leaf)
    assert torch.equal(ms_ssim_grad_tiled(small_x, small_y, tile=16)[1], small_grad)
