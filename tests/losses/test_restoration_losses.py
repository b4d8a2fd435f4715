"""Losses of the feed-forward baselines: each minimised by the ground truth, the WGAN-GP penalty against its closed
form on a linear critic, the CrossDehaze self-supervised term and its β schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from losses.restoration import (PerceptualLoss, critic_loss, data_loss, gaussian_blur, generator_adversarial_loss,
                                gradient_penalty, ssl_beta, ssl_consistency)
from losses.vgg import VGGFeatures
from tests.train_helpers import write_vgg_weights


class LinearCritic(nn.Module):
    """D(x) = <w, x> + b per sample: its input gradient is w everywhere."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1) + self.b


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_penalty_equals_its_closed_form_on_a_linear_critic(seed):
    critic = LinearCritic((3, 8, 8), seed)
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    expected = (critic.w.detach().norm() - 1.0) ** 2
    assert gradient_penalty(critic, real, fake, torch.Generator().manual_seed(3)).item() == pytest.approx(
        expected.item(), rel=1e-5)


def test_critic_loss_is_wasserstein_plus_ten_times_the_penalty_and_trains_the_critic():
    critic = LinearCritic((3, 8, 8), 0)
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8) * 0.5
    loss, logs = critic_loss(critic, real, fake, 10.0, torch.Generator().manual_seed(0))
    w = critic.w.detach()
    wasserstein = (fake * w).flatten(1).sum(1).mean() - (real * w).flatten(1).sum(1).mean()
    assert loss.item() == pytest.approx((wasserstein + 10 * (w.norm() - 1) ** 2).item(), rel=1e-5)
    assert logs["critic_wasserstein"].item() == pytest.approx(wasserstein.item(), rel=1e-5)
    loss.backward()
    assert critic.w.grad.abs().sum() > 0


def test_the_ground_truth_leaves_the_critic_nothing_to_score():
    """With fake = real the Wasserstein estimate is 0 for any critic: the critic loss is λ·GP alone, and the
    generator's adversarial term equals -D(real)."""
    critic = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3))
    real = torch.rand(3, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    loss, logs = critic_loss(critic, real, real.clone(), 10.0, gen)
    assert logs["critic_wasserstein"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(10.0 * logs["critic_gp"].item(), rel=1e-5)
    assert generator_adversarial_loss(critic, real).item() == pytest.approx(-critic(real).mean().item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_data_losses_are_minimised_by_the_target(kind):
    target = torch.rand(2, 3, 8, 8)
    assert data_loss(kind, target.clone(), target).item() == 0.0
    for delta in (0.01, -0.2):
        assert data_loss(kind, target + delta, target).item() > 0
    mask = torch.tensor([True, False])
    off = target.clone()
    off[1] += 0.5  # a masked-out sample does not count
    assert data_loss(kind, off, target, mask).item() == 0.0
    with pytest.raises(ValueError, match="unknown data loss"):
        data_loss("huber", target, target)


@pytest.mark.parametrize("with_vgg", [True, False])
def test_perceptual_loss_is_minimised_by_the_target(tmp_path, with_vgg):
    loss = PerceptualLoss(write_vgg_weights(tmp_path / "vgg.pth") if with_vgg else None)
    assert loss.uses_vgg is with_vgg
    target = torch.rand(2, 3, 32, 32)
    assert loss(target.clone(), target).item() == 0.0
    pred = (target + 0.1 * torch.randn_like(target)).clamp(0, 1).requires_grad_(True)
    value = loss(pred, target)
    value.backward()
    assert value.item() > 0 and pred.grad.abs().sum() > 0
    if with_vgg:
        assert isinstance(loss.vgg, VGGFeatures) and not any(p.requires_grad for p in loss.vgg.parameters())


def test_ssl_term_is_zero_for_a_blur_invariant_output_and_positive_for_texture():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((2, 3, 32, 32), 0.4, requires_grad=True)
    assert ssl_consistency(flat, generator=gen).item() == pytest.approx(0.0, abs=1e-12)
    textured = torch.rand(2, 3, 32, 32)
    assert ssl_consistency(textured, generator=gen).item() > 1e-3


def test_gaussian_blur_keeps_constants_and_smooths():
    img = torch.rand(1, 3, 20, 20)
    blurred = gaussian_blur(img, 1.5)
    assert blurred.shape == img.shape
    assert torch.allclose(gaussian_blur(torch.full_like(img, 0.7), 1.5), torch.full_like(img, 0.7), atol=1e-6)
    assert blurred.std() < img.std()
    assert blurred.mean().item() == pytest.approx(img.mean().item(), abs=0.02)


def test_ssl_beta_is_cosine_decayed_from_0_1():
    assert ssl_beta(0, 100) == pytest.approx(0.1)
    assert ssl_beta(50, 100) == pytest.approx(0.05)
    assert ssl_beta(25, 100) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert ssl_beta(100, 100) == 0.0 and ssl_beta(150, 100) == 0.0
    assert all(ssl_beta(s, 100) >= ssl_beta(s + 1, 100) for s in range(100))


def test_ssl_objective_is_minimised_by_the_ground_truth_at_the_end_and_by_a_flat_one_throughout():
    """L1 + β·SSL: β reaches 0 at the end of the stage, where the ground truth is the minimiser (the SSL term
    regularises towards blur-invariant outputs, so a textured ground truth is not its minimiser before); a
    blur-invariant ground truth minimises it at every β."""
    gen = torch.Generator().manual_seed(0)
    textured = torch.rand(1, 3, 24, 24)
    flat = torch.full((1, 3, 24, 24), 0.5)
    for target in (textured, flat):
        near = target + 0.05

        def objective(pred, beta):
            return data_loss("l1", pred, target) + beta * ssl_consistency(pred, generator=gen)

        assert objective(target, ssl_beta(100, 100)) == 0 < objective(near, ssl_beta(100, 100))
    for step in (0, 50, 99):
        beta = ssl_beta(step, 100)
        assert (data_loss("l1", flat, flat) + beta * ssl_consistency(flat, generator=gen)).item() == \
            pytest.approx(0.0, abs=1e-12)
