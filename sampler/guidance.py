"""Fidelity guidance for AccSamp: DCP-weighted MS-SSIM between the decoded x0 and the AlignOp estimate."""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from metrics.ssim import ms_ssim, ms_ssim_grad_tiled
from utils.rules import Rule, SettingsError, first_violation, is_int, is_number

GRADIENT_GAIN = 3000.0


class LazyMap(Protocol):
    """A (B,1,H,W) map that computes only the region it is indexed with, ``m[..., rows, cols]``."""

    shape: torch.Size

    def __getitem__(self, index: tuple) -> torch.Tensor: ...


GUIDANCE_RULES: tuple[Rule, ...] = (
    (("scale",), lambda v: is_number(v) and v >= 0, "a number >= 0"),
    (("t_start", "t_stop"), is_int, "an integer (original timestep)"),
    (("space",), lambda v: v == "rgb", "rgb (only pixel-space guidance is implemented)"),
    (("repeat",), lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    (("tile_size",), lambda v: is_int(v) and v >= 16, "an integer >= 16 (pixels)"),
)
"""(keys, test, what a valid value is) of every ``guidance.params.*`` key of :class:`WeightedMSSSIMGuidance`."""


class WeightedMSSSIMGuidance:
    """Published AccSamp guidance (``guidance`` section of ``stage2_accsamp.yaml``).

    On each active step: decode x0 with gradients, loss = −MS-SSIM(decoded·0.5+0.5, estimate·0.5+0.5) (5 scales,
    per-scale values mapped (v+1)/2 before the weighted product), take g = ∂loss/∂decoded, form the pixel update
    −g · transmission · scale · 3000, pull it back through the decoder (vector-Jacobian product) to the latent x0
    and add it times 1/posterior_mean_coef1 of the step. Active while ``t_stop < t + 1 < t_start`` on the original
    1000-step timestep t; applied ``repeat`` times per step.

    Large images (the caller passes ``decode_vjp_fn``, i.e. the image is decoded in tiles): the MS-SSIM gradient is
    computed over ``tile_size``² tiles with halos (:func:`metrics.ssim.ms_ssim_grad_tiled`, equal to the untiled
    gradient up to float rounding) and the transmission is read per tile, so the guidance's working memory is that
    of one tile plus the (B,3,H,W) gradient. Smaller images keep the published single autograd pass.
    """

    def __init__(self, scale: float = 0.1, t_start: int = 601, t_stop: int = -1, space: str = "rgb",
                 repeat: int = 1, tile_size: int = 512):
        self.scale, self.t_start, self.t_stop, self.repeat = scale, t_start, t_stop, repeat
        self.space, self.tile_size = space, tile_size
        message = first_violation(self, GUIDANCE_RULES, "guidance.params")
        if message is not None:
            raise SettingsError(message)
        self.target_pm1: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None

    def set_target(self, estimate_pm1: torch.Tensor, weight: torch.Tensor | LazyMap) -> None:
        """estimate_pm1: (B,3,H,W) in [-1,1]; weight: (B,1,H,W) transmission in [0.05,1], a tensor or a map computed
        per region on indexing (e.g. :class:`haze.dcp.DCPTransmission`)."""
        self.target_pm1 = estimate_pm1.detach()
        self.weight = weight.detach() if torch.is_tensor(weight) else weight

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
        return -g_img * self.weight[..., :, :] * (self.scale * GRADIENT_GAIN)

    def pixel_update_tiled(self, decoded_pm1: torch.Tensor) -> torch.Tensor:
        """:meth:`pixel_update` computed over tiles (same values up to float rounding). Consumes ``decoded_pm1``
        (mapped to [0,1] in place) and returns the update in a new (B,3,H,W) tensor."""
        x01 = decoded_pm1.detach().float().mul_(0.5).add_(0.5)
        _, grad = ms_ssim_grad_tiled(x01, self.target_pm1 * 0.5 + 0.5, self.tile_size, data_range=1.0,
                                     normalize=True)
        del x01
        grad.mul_(0.5 * self.scale * GRADIENT_GAIN)  # −∂(−MS-SSIM)/∂decoded = ∂MS-SSIM/∂x01 · ∂x01/∂decoded (½)
        for rows in range(0, grad.shape[-2], self.tile_size):
            band = slice(rows, rows + self.tile_size)
            grad[..., band, :] *= self.weight[..., band, :]
        return grad

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
                    update = self.pixel_update_tiled(decode_fn(z))
                delta_z = decode_vjp_fn(z, update)
                del update
            x0 = x0 + delta_z.to(x0.dtype) / coef1
        return x0
