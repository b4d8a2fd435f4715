"""DPM-Solver++ (2M): the multistep second-order solver of the probability-flow ODE in data-prediction form
(Lu et al., "DPM-Solver++", 2022, Algorithm 2), on the respaced discrete-time schedule of ``sampler.spaced``.

With α_i = sqrt(ᾱ_i), σ_i = sqrt(1 − ᾱ_i) and the half log-SNR λ_i = log(α_i/σ_i), the exact solution of the ODE
from index s to the next index t is x_t = (σ_t/σ_s)·x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x̂0(λ) dλ. Taking x̂0 constant over
the step gives the first-order update (this is DDIM, η = 0):

    x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·D,   h = λ_t − λ_s,   D = x̂0_s

and a linear extrapolation through the previous step's prediction gives the second-order one:

    D = (1 + 1/(2r))·x̂0_s − 1/(2r)·x̂0_prev,   r = h_prev/h.

The first step (no history) and the last one (to ᾱ = 1, σ = 0, where h is infinite and the update is x̂0 itself)
are first order, as in k-diffusion's ``sample_dpmpp_2m``; the global error is O(h²).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sampler.spaced import Generators, ModelFn, SpacedSchedule, half_log_snr, model_x0


def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, schedule: SpacedSchedule, cond: Any, *,
                    uncond: Any = None, cfg_scale: float = 1.0, parameterization: str = "eps",
                    start_step: int = 0, end_step: int | None = None, x0_fn: Callable | None = None,
                    callback: Callable[[dict], None] | None = None, generator: Generators = None,
                    disable: bool = True) -> torch.Tensor:
    """Run DPM-Solver++ 2M on latent ``x`` (B,4,h,w); same arguments and step numbering as ``sample_spaced``.

    Step k (k = 0 noisiest) goes from schedule index i = N−1−k to i−1; the last step (i = 0) returns x̂0. The
    multistep history starts empty at ``start_step`` (AccSamp's phase 2 restarts from a re-noised latent).
    ``x0_fn(x0, x, i)`` may modify x̂0 before it enters the update and the history; ``callback`` gets
    ``{"step", "index", "t", "x", "x0"}`` after each step. Deterministic: ``generator`` is accepted for a common
    signature and never used.
    """
    n = len(schedule)
    end_step = n if end_step is None else end_step
    x0_prev: torch.Tensor | None = None
    h_prev = 0.0
    for k in tqdm(range(start_step, end_step), disable=disable, desc="DPM-Solver++ 2M", leave=False):
        i = n - 1 - k
        a_s, a_t = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
        x0 = model_x0(model_fn, x, schedule, i, cond, uncond, cfg_scale, parameterization, x0_fn)
        if a_t >= 1.0:
            x_new = x0
        else:
            h = float(half_log_snr(a_t) - half_log_snr(a_s))
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            sigma_ratio = float(np.sqrt((1.0 - a_t) / (1.0 - a_s)))
            x_new = sigma_ratio * x - float(np.sqrt(a_t) * np.expm1(-h)) * d
            h_prev = h
        x0_prev, x = x0, x_new
        if callback is not None:
            callback({"step": k, "index": i, "t": int(schedule.timesteps[i]), "x": x, "x0": x0})
    return x
