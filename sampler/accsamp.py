"""AccSamp (Accelerated Fidelity-Preserving Sampling) of "Learning Hazing to Dehazing" (CVPR 2025).

Phase 1 runs ordinary spaced steps from pure noise up to the step at which (k+1)/N = 1−τ, takes that step's x0
prediction, decodes it and aligns the hazy image to it with AlignOp to get a dehazed estimate. Phase 2 encodes the
estimate (posterior mode), diffuses it with fresh noise to the timestep of step k = (1−ω)·N and runs the remaining
steps with DCP-weighted MS-SSIM fidelity guidance towards the estimate.

The estimate is clamped to [-1,1] before encoding (AlignOp can overshoot the valid range where the reference's
local contrast exceeds the hazy image's).

Any sampler of ``sampler.registry`` runs both phases (τ and ω stay proportions of its step count). Two documented
speed levers, off by default (the published method): ``guidance_every`` = k applies the guidance on phase-2 steps
k_r, k_r+k, k_r+2k, ... only, and ``pullback="linear"`` replaces the decoder backward by the linear surrogate of
``sampler.pullback``.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from sampler.guidance import WeightedMSSSIMGuidance
from sampler.pullback import LinearDecoderPullback
from sampler.spaced import Generators, ModelFn, SpacedSchedule, randn, sample_spaced

PULLBACKS = ("autograd", "linear")


def _guide_x0(x0: torch.Tensor, x_t: torch.Tensor, i: int, *, guidance: WeightedMSSSIMGuidance,
              schedule: SpacedSchedule, decode_fn: Callable[[torch.Tensor], torch.Tensor],
              decode_vjp_fn: Callable | None, first_step: int = 0, every: int = 1) -> torch.Tensor:
    """Fidelity guidance of x0 at schedule index i (the guidance uses the original timestep and coef1), applied on
    every ``every``-th sampling step counted from ``first_step``."""
    if (len(schedule) - 1 - i - first_step) % every:
        return x0
    return guidance(x0, int(schedule.timesteps[i]), float(schedule.posterior_mean_coef1[i]), decode_fn,
                    decode_vjp_fn)


def accsamp_steps(num_steps: int, tau: float, omega: float) -> tuple[int, int]:
    """(estimate step k_e, restart step k_r) in sampling order: (k_e+1)/N = 1−τ, k_r = (1−ω)·N (rounded)."""
    if not (0.0 < tau < 1.0 and 0.0 < omega <= 1.0):
        raise ValueError(f"need 0 < tau < 1 and 0 < omega <= 1, got tau={tau}, omega={omega}")
    k_est = int(round((1.0 - tau) * num_steps)) - 1
    k_restart = int(round((1.0 - omega) * num_steps))
    if k_est < 0:
        raise ValueError(f"tau={tau} leaves no phase-1 step with {num_steps} steps")
    return k_est, k_restart


def sample_accsamp(model_fn: ModelFn, x_T: torch.Tensor, schedule: SpacedSchedule, cond: Any, hazy01: torch.Tensor,
                   *, tau: float, omega: float, guidance: WeightedMSSSIMGuidance | None,
                   decode_fn: Callable[[torch.Tensor], torch.Tensor],
                   encode_fn: Callable[[torch.Tensor], torch.Tensor],
                   align_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   transmission_fn: Callable[[torch.Tensor], torch.Tensor],
                   decode_vjp_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   parameterization: str = "eps", generator: Generators = None,
                   callback: Callable[[dict], None] | None = None,
                   disable: bool = True, sampler: Callable = sample_spaced, guidance_every: int = 1,
                   pullback: str = "autograd") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run AccSamp.

    x_T: (B,4,h,w) initial noise; hazy01: (B,3,H,W) in ~[0,1] (the padded input, H = 8h; the published
    upscale's bicubic overshoot is kept);
    decode_fn: scaled latent -> image in [-1,1]; encode_fn: image in [-1,1] -> scaled latent (posterior mode);
    align_fn(content_pm1, reference_pm1) -> aligned image in [-1,1]; transmission_fn(hazy01) -> (B,1,H,W) tensor
    or a map evaluated per region on indexing (:class:`haze.dcp.DCPTransmission`, for large images);
    decode_vjp_fn(z, v) -> (∂decode/∂z)ᵀ v, optional (tiled pull-back for large images, see the guidance);
    generator: one, or one per batch element (``sampler.spaced.randn``).
    sampler: a function of ``sampler.registry`` (published: ``sample_spaced``); guidance_every: apply the guidance
    on every k-th phase-2 step, an integer >= 1 (published: 1); pullback: one of :data:`PULLBACKS`, ``autograd``
    (published, through the decoder or ``decode_vjp_fn``) or ``linear`` (``LinearDecoderPullback`` fitted to the
    estimate; overrides decode_vjp_fn). A config's values are validated by ``pipelines.settings``.
    Returns the final latent and ``{"estimate": (B,3,H,W) in [-1,1], "transmission": what transmission_fn gave}``.
    """
    n = len(schedule)
    k_est, k_restart = accsamp_steps(n, tau, omega)
    last: dict = {}

    def keep_last(info: dict) -> None:
        last.update(info)
        if callback is not None:
            callback(info)

    with torch.no_grad():
        sampler(model_fn, x_T, schedule, cond, parameterization=parameterization, start_step=0,
                end_step=k_est + 1, callback=keep_last, generator=generator, disable=disable)
        decoded = decode_fn(last.pop("x0"))[..., : hazy01.shape[-2], : hazy01.shape[-1]]
        estimate = align_fn(hazy01 * 2 - 1, decoded.float()).clamp_(-1, 1)
        del decoded  # full-resolution buffers are released as soon as they are used (large images)
        trans = transmission_fn(hazy01)
        z_est = encode_fn(estimate)
    i_restart = n - 1 - k_restart
    ac = float(schedule.alphas_cumprod[i_restart])
    noise = randn(z_est.shape, generator, z_est.device, z_est.dtype)
    x = float(np.sqrt(ac)) * z_est + float(np.sqrt(1.0 - ac)) * noise
    x0_fn: Callable | None = None
    if guidance is not None:
        guidance.set_target(estimate, trans)
        if pullback == "linear":
            decode_vjp_fn = LinearDecoderPullback.fit(z_est, estimate)
        x0_fn = partial(_guide_x0, guidance=guidance, schedule=schedule, decode_fn=decode_fn,
                        decode_vjp_fn=decode_vjp_fn, first_step=k_restart, every=guidance_every)

    with torch.no_grad():
        x = sampler(model_fn, x, schedule, cond, parameterization=parameterization, start_step=k_restart,
                    end_step=n, x0_fn=x0_fn, callback=callback, generator=generator, disable=disable)
    return x, {"estimate": estimate, "transmission": trans}

