"""The one-step student's losses (losses.onestep): the data term is minimised by the clean target; the VSD surrogate's
gradient is DMD's normalised direction in closed form, exactly zero when the fake score equals the real one, and
descending it moves the student's distribution onto the teacher's (Gaussian scores in closed form)."""
from __future__ import annotations

import pytest
import torch

from losses.onestep import data_loss, ms_ssim_loss, vsd_gradient, vsd_loss


def test_data_loss_is_minimised_by_the_clean_target():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 48, 48, generator=gen) * 2 - 1
    at_target = data_loss(target, target, ssim_scales=3)
    assert at_target["mse"] == 0 and at_target["ms_ssim"].abs() < 1e-6 and at_target["data"].abs() < 1e-6
    for scale in (0.02, 0.1, 0.5):
        noisy = (target + scale * torch.randn(target.shape, generator=gen)).clamp(-1, 1)
        terms = data_loss(noisy, target, ssim_scales=3)
        assert terms["mse"] > 0 and terms["ms_ssim"] > 0 and terms["data"] > at_target["data"]
    # gradient descent from a perturbed image converges back to the target
    x = (target + 0.3 * torch.randn(target.shape, generator=gen)).requires_grad_(True)
    start = data_loss(x, target, ssim_scales=3)["data"].item()
    opt = torch.optim.Adam([x], lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        data_loss(x, target, ssim_scales=3)["data"].backward()
        opt.step()
    assert data_loss(x, target, ssim_scales=3)["data"].item() < 0.1 * start


def test_ms_ssim_loss_scales_and_range():
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert 0 < ms_ssim_loss(x, -x, 2).item() <= 2.0
    with pytest.raises(ValueError, match="scales"):
        ms_ssim_loss(x, x, 6)


def test_vsd_gradient_equals_its_closed_form():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64).requires_grad_(True)
    real = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    fake = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(vsd_loss(z, real, fake), z)
    zd = z.detach()
    expected = torch.stack([(fake[b] - real[b]) / (zd[b] - real[b]).abs().mean() for b in range(3)]) / z.numel()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(vsd_gradient(zd, real, fake) / z.numel(), expected, rtol=1e-12, atol=0)


def test_vsd_gradient_is_exactly_zero_when_fake_equals_real():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=gen).requires_grad_(True)
    real = torch.randn(2, 4, 8, 8, generator=gen)
    (grad,) = torch.autograd.grad(vsd_loss(z, real, real.clone()), z)
    assert torch.equal(grad, torch.zeros_like(grad))


def gaussian_x0(x_t: torch.Tensor, a: float, mean: torch.Tensor, var: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mean, var·I), x_t = sqrt(a)·x0 + sqrt(1 − a)·ε."""
    gain = a**0.5 * var / (a * var + 1 - a)
    return mean + gain * (x_t - a**0.5 * mean)


def test_descending_vsd_moves_the_student_distribution_onto_the_teachers():
    """Teacher data N(μ_r, s²), student samples z (whose distribution has mean μ_f, the fake score fitted to them
    exactly): each VSD step moves the student's mean towards μ_r, and the gradient vanishes when μ_f = μ_r."""
    gen = torch.Generator().manual_seed(4)
    mu_real = torch.tensor([0.5, -0.3, 0.1, 0.8], dtype=torch.float64).view(1, 4, 1, 1)
    z = (torch.randn(64, 4, 4, 4, generator=gen, dtype=torch.float64) * 0.5 - 1.0).requires_grad_(True)
    a = 0.6
    opt = torch.optim.SGD([z], lr=0.5 * z.numel())  # a step of z − 0.5·g
    gaps = []
    for _ in range(40):
        mu_fake = z.detach().mean(dim=(0, 2, 3), keepdim=True)
        z_t = a**0.5 * z.detach() + (1 - a) ** 0.5 * torch.randn(z.shape, generator=gen, dtype=torch.float64)
        real, fake = gaussian_x0(z_t, a, mu_real, 0.25), gaussian_x0(z_t, a, mu_fake, 0.25)
        opt.zero_grad()
        vsd_loss(z, real, fake).backward()
        opt.step()
        gaps.append((mu_fake - mu_real).abs().max().item())
    assert gaps[-1] < 0.05 * gaps[0]
    mu = mu_real.expand(1, 4, 4, 4)
    assert torch.equal(vsd_gradient(z.detach(), gaussian_x0(z.detach(), a, mu, 0.25),
                                    gaussian_x0(z.detach(), a, mu, 0.25)), torch.zeros_like(z))
