"""DDIM (Song et al., ICLR 2021) on the respaced discrete-time schedule of ``sampler.spaced``.

One step from schedule index i (timestep t_i, ᾱ = ᾱ_i) to i−1 (ᾱ' = ``alphas_cumprod_prev[i]``, 1 at i = 0):

    x' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ²)·ε̂ + σ·z,   σ = η·sqrt((1 − ᾱ')/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ'),   z ~ N(0, I)

η = 0 is the deterministic sampler: with x̄ = x/sqrt(ᾱ) and σ_t = sqrt((1 − ᾱ)/ᾱ) the step is one Euler step of
the probability-flow ODE dx̄/dσ_t = ε̂ (first order). η = 1 draws from the DDPM posterior, i.e. it is the spaced
ancestral sampler. ε̂ is recomputed from x and the (possibly hook-modified) x̂0, so an x0 hook acts on the DDIM step
exactly as it acts on the spaced sampler's posterior mean.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sampler.spaced import Generators, ModelFn, SpacedSchedule, model_x0, randn


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """ε̂ = (x_t − sqrt(ᾱ)·x̂0)/sqrt(1 − ᾱ): the noise that x̂0 implies for x_t."""
    return (x_t - float(np.sqrt(alpha_cumprod)) * x0) / float(np.sqrt(1.0 - alpha_cumprod))


def ddim_sigma(alpha_cumprod: float, alpha_cumprod_prev: float, eta: float) -> float:
    """Standard deviation of the DDIM step's fresh noise (0 for η = 0 and for the last step, where ᾱ' = 1)."""
    return float(eta * np.sqrt((1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod))
                 * np.sqrt(1.0 - alpha_cumprod / alpha_cumprod_prev))


def sample_ddim(model_fn: ModelFn, x: torch.Tensor, schedule: SpacedSchedule, cond: Any, *, eta: float = 0.0,
                uncond: Any = None, cfg_scale: float = 1.0, parameterization: str = "eps",
                start_step: int = 0, end_step: int | None = None, x0_fn: Callable | None = None,
                callback: Callable[[dict], None] | None = None, generator: Generators = None,
                disable: bool = True) -> torch.Tensor:
    """Run DDIM on latent ``x`` (B,4,h,w); same arguments and step numbering as ``sample_spaced``.

    Step k (k = 0 noisiest) goes from schedule index i = N−1−k to i−1; the last step (i = 0) returns x̂0.
    ``x0_fn(x0, x, i)`` may modify x̂0 (AccSamp fidelity guidance); ``callback`` gets
    ``{"step", "index", "t", "x", "x0"}`` after each step. Noise is drawn from ``generator`` (one, or one per
    batch element, see ``sampler.spaced.randn``) only when σ > 0.
    """
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    n = len(schedule)
    end_step = n if end_step is None else end_step
    for k in tqdm(range(start_step, end_step), disable=disable, desc="DDIM", leave=False):
        i = n - 1 - k
        a, a_prev = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
        x0 = model_x0(model_fn, x, schedule, i, cond, uncond, cfg_scale, parameterization, x0_fn)
        eps = eps_from_x0(x, x0, a)
        sigma = ddim_sigma(a, a_prev, eta)
        x_new = float(np.sqrt(a_prev)) * x0 + float(np.sqrt(max(1.0 - a_prev - sigma**2, 0.0))) * eps
        if sigma > 0:
            x_new = x_new + sigma * randn(x.shape, generator, x.device, x.dtype)
        x = x_new
        if callback is not None:
            callback({"step": k, "index": i, "t": int(schedule.timesteps[i]), "x": x, "x0": x0})
    return x
