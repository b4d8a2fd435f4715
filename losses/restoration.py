"""Losses of the feed-forward baselines (:mod:`model.baselines`): data terms, WGAN-GP, the perceptual term and the
CrossDehaze self-supervised term. Images are ``img01`` (B,3,H,W) in [0,1] unless stated otherwise.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from losses.vgg import VGGFeatures

DATA_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mse": F.mse_loss, "l1": F.l1_loss}
"""Data terms by config name (``objective.data_loss``): mean squared / absolute error, 0 only at the target."""


def data_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ``kind`` error of pred against target (same shape); ``mask`` (B,) bool keeps only those samples (0 when
    none is kept)."""
    if kind not in DATA_LOSSES:
        raise ValueError(f"unknown data loss '{kind}', expected one of {sorted(DATA_LOSSES)}")
    if mask is not None:
        if not mask.any():
            return pred.sum() * 0.0
        pred, target = pred[mask], target[mask]
    return DATA_LOSSES[kind](pred, target)


# ------------------------------------------------------------------------------------------------------------- GAN
def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP penalty E[(||∇_x̂ D(x̂)||₂ - 1)²] at x̂ = ε real + (1 - ε) fake, ε ~ U[0,1] per sample (Gulrajani et
    al. 2017); the gradient of the summed critic output per sample, so a patch critic's scores count together."""
    eps = torch.rand((real.shape[0], 1, 1, 1), generator=generator, device=real.device, dtype=real.dtype)
    mixed = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, gp_weight: float = 10.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """WGAN-GP critic loss D(fake) - D(real) + λ GP (means over samples and patches) and its parts (detached)."""
    wasserstein = critic(fake.detach()).mean() - critic(real).mean()
    penalty = gradient_penalty(critic, real, fake, generator)
    return wasserstein + gp_weight * penalty, {"critic_wasserstein": wasserstein.detach(),
                                               "critic_gp": penalty.detach()}


def generator_adversarial_loss(critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """-D(fake): the generator's WGAN term (gradients reach the generator through ``fake``)."""
    return -critic(fake).mean()


class PerceptualLoss(nn.Module):
    """DeblurGAN's content loss: MSE between frozen VGG features of prediction and target (one layer; DeblurGAN used
    VGG-19 conv3_3, here VGG-16 ``relu3_3`` of the user's torchvision file, as the cycle losses read it), or the L1
    pixel loss in its place when no VGG file is given (``vgg_path`` None)."""

    def __init__(self, vgg_path: str | os.PathLike | None, layer: str = "relu3_3") -> None:
        super().__init__()
        self.layer = layer
        self.vgg = VGGFeatures(vgg_path, layers=(layer,), semantic_layer=None) if vgg_path is not None else None

    @property
    def uses_vgg(self) -> bool:
        return self.vgg is not None

    def forward(self, pred01: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
        if self.vgg is None:
            return F.l1_loss(pred01, target01)
        return F.mse_loss(self.vgg(pred01)[self.layer], self.vgg(target01)[self.layer])


# ------------------------------------------------------------------------------------------------------ CrossDehaze
def ssl_beta(step: int, total_steps: int, beta0: float = 0.1) -> float:
    """β of the CrossDehaze self-supervised stage: β0 · (1 + cos(π step / total)) / 2, from β0 at step 0 to 0 at
    ``total_steps`` (0 after it)."""
    if total_steps <= 0 or step >= total_steps:
        return 0.0
    return beta0 * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def random_crop_view(img: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The weak view: one random window of ``fraction`` of each side (at least 1 px) of the batch (B,C,H,W)."""
    h, w = img.shape[-2:]
    ch, cw = max(1, int(h * fraction)), max(1, int(w * fraction))
    device = generator.device if generator is not None else None
    top = int(torch.randint(0, h - ch + 1, (1,), generator=generator, device=device))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=generator, device=device))
    return img[..., top:top + ch, left:left + cw]


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W), radius ceil(3σ), reflect padding (replicate for tiny images)."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=img.device, dtype=img.dtype)
    kernel = torch.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = img.shape[1]
    mode = "reflect" if min(img.shape[-2:]) > radius else "replicate"
    x = F.pad(img, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssl_consistency(pred01: torch.Tensor, crop_fraction: float = 0.5, sigma_range: tuple[float, float] = (0.5, 2.0),
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE(weak(ŷ), strong(weak(ŷ))): weak = a random crop, strong = a Gaussian blur with σ ~ U[sigma_range]; 0
    exactly when the cropped prediction is unchanged by the blur (e.g. constant)."""
    weak = random_crop_view(pred01, crop_fraction, generator)
    u = torch.rand((), generator=generator, device=generator.device if generator is not None else None)
    sigma = float(sigma_range[0] + (sigma_range[1] - sigma_range[0]) * u)
    return F.mse_loss(weak, gaussian_blur(weak, sigma))
