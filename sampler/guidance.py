"""Fidelity guidance for AccSamp: DCP-weighted MS-SSIM between the decoded x0 and the AlignOp estimate."""
from __future__ import annotations

from typing import Callable

import torch

from utils.ssim import ms_ssim

GRADIENT_GAIN = 3000.0


class WeightedMSSSIMGuidance:
    """Published AccSamp guidance (``guidance`` section of ``stage2_accsamp.yaml``).

    On each active step: decode x0 with gradients, loss = −MS-SSIM(decoded·0.5+0.5, estimate·0.5+0.5) (5 scales,
    per-scale values mapped (v+1)/2 before the weighted product), take g = ∂loss/∂decoded, form the pixel update
    −g · transmission · scale · 3000, pull it back through the decoder (vector-Jacobian product) to the latent x0
    and add it times 1/posterior_mean_coef1 of the step. Active while ``t_stop < t + 1 < t_start`` on the original
    1000-step timestep t; applied ``repeat`` times per step.
    """

    def __init__(self, scale: float = 0.1, t_start: int = 601, t_stop: int = -1, space: str = "rgb",
                 repeat: int = 1):
        if space != "rgb":
            raise ValueError(f"only pixel-space ('rgb') guidance is implemented, got space='{space}'")
        if repeat < 1:
            raise ValueError("repeat must be >= 1")
        self.scale, self.t_start, self.t_stop, self.repeat = scale, t_start, t_stop, repeat
        self.target_pm1: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None

    def set_target(self, estimate_pm1: torch.Tensor, weight: torch.Tensor) -> None:
        """estimate_pm1: (B,3,H,W) in [-1,1]; weight: (B,1,H,W) transmission in [0.05,1]."""
        self.target_pm1, self.weight = estimate_pm1.detach(), weight.detach()

    def active(self, t: int) -> bool:
        return self.t_stop < t + 1 < self.t_start

    def loss(self, decoded_pm1: torch.Tensor) -> torch.Tensor:
        """−MS-SSIM per image (B,) between the decoded prediction and the estimate, both mapped to [0,1]."""
        return -ms_ssim(decoded_pm1 * 0.5 + 0.5, self.target_pm1 * 0.5 + 0.5, data_range=1.0, normalize=True)

    def pixel_update(self, decoded_pm1: torch.Tensor) -> torch.Tensor:
        """−∂loss/∂decoded · transmission · scale · 3000: the pixel-space update (B,3,H,W)."""
        with torch.enable_grad():
            leaf = decoded_pm1.detach().float().requires_grad_(True)
            (g_img,) = torch.autograd.grad(self.loss(leaf).sum(), leaf)
        return -g_img * self.weight * (self.scale * GRADIENT_GAIN)

    def __call__(self, x0: torch.Tensor, t: int, coef1: float, decode_fn: Callable[[torch.Tensor], torch.Tensor],
                 decode_vjp_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Return the guided x0 latent (B,4,h,w); unchanged when inactive at t.

        decode_fn: scaled latent -> image in [-1,1] (same size as the target). decode_vjp_fn(z, v), when given,
        returns (∂decode/∂z)ᵀ v without keeping the whole decoder graph (tiled decoding for large images);
        otherwise one decode with autograd serves both the loss and the pull-back.
        """
        if self.target_pm1 is None:
            raise RuntimeError("set_target() must be called before guidance is applied")
        if not self.active(t):
            return x0
        for _ in range(self.repeat):
            z = x0.detach().float()
            if decode_vjp_fn is None:
                with torch.enable_grad():
                    z.requires_grad_(True)
                    decoded = decode_fn(z).float()
                    (delta_z,) = torch.autograd.grad(decoded, z, grad_outputs=self.pixel_update(decoded))
            else:
                with torch.no_grad():
                    decoded = decode_fn(z).float()
                delta_z = decode_vjp_fn(z, self.pixel_update(decoded))
            x0 = x0 + delta_z.to(x0.dtype) / coef1
        return x0
