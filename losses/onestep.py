"""Losses of the one-step student (``model.onestep``): the data term on pixels and variational score distillation
(VSD) in latent space with DMD's per-sample gradient normalisation.

Data term (pixels, against the clean target), with one perceptual term P named by the config:

    L_data = w_mse · mean((x̂ − y)²) + w_p · mean_b P(x̂, y)                                     x̂, y in [-1, 1]

    P = 1 − MS-SSIM((x̂ + 1)/2, (y + 1)/2)     "ms_ssim" (no weights needed)
    P = LPIPS(x̂, y)                          "lpips" (:class:`losses.lpips.LPIPS`, when the user supplies its weights)

Both are 0 at x̂ = y, so the clean target minimises L_data. MS-SSIM is ``metrics.ssim.ms_ssim`` (textbook form) with
the first ``ssim_scales`` of the published scale weights (renormalised), so crops smaller than the 5-scale minimum
(~176 px) can use fewer scales.

VSD (Wang et al. 2023, as DMD, Yin et al. 2024, and OSEDiff use it): for the student latent z, a noised
z_t = sqrt(ᾱ_t)·z + sqrt(1 − ᾱ_t)·ε and the two scores' clean estimates x̂0_real (frozen teacher) and x̂0_fake (the
fake score, trained on the student's outputs), the gradient pushed into z is

    g = (x̂0_fake − x̂0_real) / mean_{c,h,w} |z − x̂0_real|        (per sample; DMD's normalisation)

applied through the surrogate L_vsd = ½·mean((z − sg(z − g))²), whose gradient is ∂L/∂z = g / N (N = z.numel()).
g is zero exactly when the fake score equals the real one: the student's distribution is then the teacher's.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from metrics.ssim import MS_SSIM_WEIGHTS, ms_ssim

VSD_EPS = 1e-8
"""Floor of the per-sample normaliser mean|z − x̂0_real| (a student output equal to the teacher's estimate)."""


def ms_ssim_loss(pred_pm1: torch.Tensor, target_pm1: torch.Tensor, scales: int = 5) -> torch.Tensor:
    """mean over the batch of 1 − MS-SSIM on images mapped to [0,1]; (B,3,H,W) in [-1,1] -> scalar in [0, 1]."""
    if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise ValueError(f"MS-SSIM scales must be in 1..{len(MS_SSIM_WEIGHTS)}, got {scales}")
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = (weights / weights.sum()).tolist()
    value = ms_ssim((pred_pm1.float() + 1) / 2, (target_pm1.float() + 1) / 2, data_range=1.0, weights=weights)
    return (1.0 - value).mean()


PERCEPTUAL_TERMS = ("ms_ssim", "lpips")
"""Names of the perceptual term P of the data term (module docstring)."""


def data_loss(pred_pm1: torch.Tensor, target_pm1: torch.Tensor, mse_weight: float = 1.0,
              perceptual_weight: float = 1.0, ssim_scales: int = 5,
              lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The data term, pred/target (B,3,H,W) in [-1,1]: ``{"mse", <P's name>, "data"}`` (``data`` the weighted sum).
    P is LPIPS when an ``lpips`` network ((B,3,H,W) pair -> (B,) distances) is given, else 1 − MS-SSIM."""
    mse = F.mse_loss(pred_pm1.float(), target_pm1.float())
    name = "ms_ssim" if lpips is None else "lpips"
    if not perceptual_weight:
        term = mse.new_zeros(())
    elif lpips is None:
        term = ms_ssim_loss(pred_pm1, target_pm1, ssim_scales)
    else:
        term = lpips(pred_pm1, target_pm1).mean()
    return {"mse": mse, name: term, "data": mse_weight * mse + perceptual_weight * term}


@torch.no_grad()
def vsd_gradient(z: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised distribution-matching direction g (B,C,h,w) for student latents z (see module docstring)."""
    scale = (z - x0_real).abs().mean(dim=tuple(range(1, z.dim())), keepdim=True).clamp_min(VSD_EPS)
    return (x0_fake - x0_real) / scale


def vsd_loss(z: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """½·mean((z − sg(z − g))²): its gradient w.r.t. z is :func:`vsd_gradient` / z.numel(); x0_real and x0_fake
    are used without gradient."""
    g = vsd_gradient(z.detach(), x0_real.detach(), x0_fake.detach())
    dtype = torch.promote_types(z.dtype, torch.float32)
    return 0.5 * F.mse_loss(z.to(dtype), (z.detach() - g).to(dtype))
