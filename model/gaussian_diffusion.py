"""Forward diffusion process and training loss of SD-2.1 (scaled-linear schedule, 1000 steps)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def make_scaled_linear_betas(linear_start: float, linear_end: float, timesteps: int) -> np.ndarray:
    """betas = linspace(sqrt(start), sqrt(end), T)**2, computed in float64 (LDM "linear" schedule)."""
    return np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2


def extract(arr: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[t] reshaped to (B, 1, ..., 1) for broadcasting against an ndim-tensor."""
    return arr.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


def predict_x0(x_t: torch.Tensor, model_out: torch.Tensor, alphas_cumprod: float | torch.Tensor,
               parameterization: str = "eps") -> torch.Tensor:
    """One-step clean estimate x̂0 from the model output (the one formula used by training and every sampler).

    eps-prediction (DDPM, Ho et al. 2020, eq. 15): x̂0 = (x_t − sqrt(1−ᾱ)·ε̂) / sqrt(ᾱ);
    v-prediction (Salimans & Ho 2022):             x̂0 = sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v̂.
    x_t, model_out: (B,C,H,W) latents; alphas_cumprod: ᾱ as a float (one timestep for the batch) or a (B,) tensor
    (per sample; square roots taken in float64). Returns x̂0 with the shape and dtype of x_t.
    """
    if parameterization not in ("eps", "v"):
        raise ValueError(f"parameterization must be 'eps' or 'v', got '{parameterization}'")
    if isinstance(alphas_cumprod, torch.Tensor):
        if alphas_cumprod.shape != (x_t.shape[0],):
            raise ValueError(f"alphas_cumprod must be a float or ({x_t.shape[0]},), got {tuple(alphas_cumprod.shape)}")
        ac = alphas_cumprod.double().view(-1, *([1] * (x_t.dim() - 1)))
        a, s = ac.sqrt().to(x_t.dtype), (1.0 - ac).sqrt().to(x_t.dtype)
    else:
        a, s = math.sqrt(alphas_cumprod), math.sqrt(1.0 - alphas_cumprod)
    if parameterization == "eps":
        return (x_t - s * model_out) / a
    return a * x_t - s * model_out


class Diffusion(nn.Module):
    """q(z_t | z_0) and the eps/v regression loss. Buffers are float32 copies of float64 schedules."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000,
                 parameterization: str = "eps", loss_type: str = "l2", schedule: str = "linear"):
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got '{parameterization}'")
        if schedule != "linear" or loss_type != "l2":
            raise ValueError("only the SD schedule ('linear' = scaled linear) with an l2 loss is implemented")
        self.num_timesteps = timesteps
        self.parameterization = parameterization
        betas = make_scaled_linear_betas(linear_start, linear_end, timesteps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.betas_np, self.alphas_cumprod_np = betas, alphas_cumprod
        for name, value in {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        }.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(ᾱ_t)·z_0 + sqrt(1−ᾱ_t)·noise; t: (B,) int64."""
        return (extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def get_v(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t)·noise − sqrt(1−ᾱ_t)·z_0."""
        return (extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * x_start)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor) -> torch.Tensor:
        """x̂0 from the model output (eps or v) at integer timesteps t (B,): :func:`predict_x0`."""
        return predict_x0(x_t, model_out, self.alphas_cumprod.to(t.device)[t], self.parameterization)

    def training_outputs(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor, cond: dict,
                         noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything one training step needs: ``x_noisy``, ``model_out``, ``target`` and the MSE ``loss``."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        model_out = model(x_noisy, t, cond)
        target = noise if self.parameterization == "eps" else self.get_v(x_start, noise, t)
        loss = F.mse_loss(model_out.float(), target.float())
        return {"x_noisy": x_noisy, "model_out": model_out, "target": target, "noise": noise, "loss": loss}
