"""A cheap pull-back of AccSamp's pixel-space guidance update to the latent (``inference.guidance_pullback:
linear``), replacing the backward pass through the VAE decoder.

The published guidance moves the latent x0 by (∂D/∂z)ᵀ·u, where u (B,3,H,W) is the pixel update and D the decoder;
that vector-Jacobian product costs about one more decoder pass (plus the activations kept for it) at full pixel
resolution on every guided step. Here D is replaced, for the pull-back only, by its least-squares *linear
surrogate* on this image, D̃(z) = up8(W·z + b): one 3×4 colour matrix W and bias b per image, fitted between the
AccSamp estimate's latent and the estimate's 8×8 block means, with up8 nearest upsampling. Its exact adjoint is

    (∂D̃/∂z)ᵀ·u = Wᵀ · sum8(u)          (sum8: sums over the 8×8 pixel block of each latent cell)

which costs one pooling and a 3×4 matrix product. The approximation keeps the part of the update that the decoder
passes through as colour/brightness per latent cell — most of what MS-SSIM's gradient asks for at the coarse scales
— and drops what the true Jacobian does within a cell (texture, edges finer than 8 px) and its dependence on z
beyond the fitted linear map. The loss, its pixel gradient and the decoded x0 are still computed with the real
decoder on each guided step; only the backward pass is approximated. Whether this changes the dehazed result is
untested here (no trained weights): ``tools/compare_samplers.py`` measures it against the published guidance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LinearDecoderPullback:
    """decode_vjp_fn(z, u) of the linear decoder surrogate: weight (B,3,4), bias (B,3) (bias unused by the VJP)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        if weight.ndim != 3 or weight.shape[1:] != (3, 4) or bias.shape != weight.shape[:2]:
            raise ValueError(f"need weight (B,3,4) and bias (B,3), got {tuple(weight.shape)}, {tuple(bias.shape)}")
        self.weight, self.bias = weight, bias

    @classmethod
    def fit(cls, latent: torch.Tensor, img_pm1: torch.Tensor) -> "LinearDecoderPullback":
        """Least squares pool8(img) ≈ W·latent + b per image.

        latent: (B,4,h,w) scaled latent; img_pm1: (B,3,8h,8w) in [-1,1], the decoded (or encoded-from) image.
        """
        b, _, h, w = latent.shape
        if img_pm1.shape[-2:] != (8 * h, 8 * w):
            raise ValueError(f"image {tuple(img_pm1.shape[-2:])} is not 8x the latent {(h, w)}")
        target = F.avg_pool2d(img_pm1.float(), 8).flatten(2).transpose(1, 2)          # (B, hw, 3)
        design = torch.cat([latent.float().flatten(2), torch.ones_like(latent[:, :1].float()).flatten(2)], 1)
        solution = torch.linalg.lstsq(design.transpose(1, 2).double(), target.double()).solution  # (B, 5, 3)
        solution = solution.to(torch.float32)
        return cls(solution[:, :4].transpose(1, 2).contiguous(), solution[:, 4])

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The surrogate itself: (B,4,h,w) -> (B,3,8h,8w), nearest ×8 upsampling of W·z + b."""
        cells = torch.einsum("bcl,blhw->bchw", self.weight.to(latent.dtype), latent) + self.bias[..., None, None]
        return cells.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)

    def __call__(self, latent: torch.Tensor, update_img: torch.Tensor) -> torch.Tensor:
        """(∂D̃/∂z)ᵀ·u = Wᵀ·sum8(u): update_img (B,3,8h,8w) -> latent update (B,4,h,w), float32."""
        sums = F.avg_pool2d(update_img.float(), 8) * 64.0
        return torch.einsum("bcl,bchw->blhw", self.weight, sums)
