"""Respaced DDPM sampling (guided-diffusion's ``space_timesteps`` rule) as used by DiffBIR/HazeGen/DiffDehaze.

Sampling functions follow k-diffusion's style: pure functions over a latent, a ``model_fn`` and a schedule,
with a ``callback`` receiving the intermediates of every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from model.gaussian_diffusion import predict_x0

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
    """Timesteps kept when respacing ``num_timesteps`` (guided-diffusion rule).

    ``section_counts`` like ``"50"`` or ``[10, 15, 20]`` splits the range into equal sections and takes the given
    number of evenly strided steps (rounded) from each; ``"ddimN"`` gives a fixed integer stride. Sorted ascending.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


SPACINGS = ("uniform", "logsnr", "karras")
"""``inference.spacing``: which of the model's timesteps a schedule of N steps keeps."""
KARRAS_RHO = 7.0
"""ρ of the Karras et al. (2022) noise levels (their default, also k-diffusion's)."""


def half_log_snr(alpha_cumprod: float | np.ndarray) -> float | np.ndarray:
    """λ = log(sqrt(ᾱ)/sqrt(1 − ᾱ)) = ½·log(ᾱ/(1 − ᾱ)) (decreasing in t)."""
    return 0.5 * np.log(alpha_cumprod / (1.0 - alpha_cumprod))


def _nearest_distinct(targets: np.ndarray, values: np.ndarray) -> list[int]:
    """Indices t of ``values`` (strictly decreasing in t) nearest to each of ``targets`` (one per kept step,
    ordered from t = 0 to t = T−1, first and last hitting the end points), made strictly increasing: a step that
    rounds onto the previous one moves up by one, and a step pushed into the room of the steps above it moves back
    down, so N targets always give N distinct timesteps from 0 to T−1."""
    last = len(values) - 1
    kept = [int(np.argmin(np.abs(values - v))) for v in targets]
    for i in range(1, len(kept)):
        kept[i] = max(kept[i], kept[i - 1] + 1)
    kept[-1] = last
    for i in range(len(kept) - 2, -1, -1):
        kept[i] = min(kept[i], kept[i + 1] - 1)
    return kept


def kept_timesteps(base_alphas_cumprod: np.ndarray, num_steps: int | str, spacing: str = "uniform") -> list[int]:
    """The timesteps (ascending, from 0 to T−1) a schedule of ``num_steps`` keeps.

    ``uniform``: the published respacing (:func:`space_timesteps`, uniform in t; ``num_steps`` may be its
    section string). ``logsnr``: uniform in the half log-SNR λ between t = 0 and t = T−1 (the grid on which
    DPM-Solver's error analysis holds from few steps on). ``karras``: Karras et al.'s noise levels
    σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ with σ = sqrt((1 − ᾱ)/ᾱ), ρ = :data:`KARRAS_RHO`.
    The model is trained at integer timesteps only, so the last two pick the nearest ones (kept distinct by
    :func:`_nearest_distinct`).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"inference.spacing must be one of {', '.join(SPACINGS)}; got '{spacing}'")
    num_timesteps = len(base_alphas_cumprod)
    if spacing == "uniform":
        return space_timesteps(num_timesteps, str(num_steps))
    n = int(num_steps)
    if not 2 <= n <= num_timesteps:
        raise ValueError(f"{spacing} spacing needs 2..{num_timesteps} steps, got {n}")
    ac = np.asarray(base_alphas_cumprod, dtype=np.float64)
    lam = half_log_snr(ac)
    if spacing == "logsnr":
        return _nearest_distinct(np.linspace(lam[0], lam[-1], n), lam)
    sigma = np.sqrt((1.0 - ac) / ac)
    ramp = np.linspace(0.0, 1.0, n)
    inv_rho = 1.0 / KARRAS_RHO
    karras = (sigma[-1] ** inv_rho + ramp * (sigma[0] ** inv_rho - sigma[-1] ** inv_rho)) ** KARRAS_RHO
    return _nearest_distinct(-np.log(karras[::-1]), -np.log(sigma))


@dataclass(frozen=True)
class SpacedSchedule:
    """Coefficients of the respaced chain; index i (0 = least noisy) maps to original timestep ``timesteps[i]``."""

    timesteps: np.ndarray
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    posterior_log_variance_clipped: np.ndarray

    def __len__(self) -> int:
        return len(self.timesteps)


def make_spaced_schedule(base_alphas_cumprod: np.ndarray, num_steps: int | str,
                         spacing: str = "uniform") -> SpacedSchedule:
    """Respaced betas from the kept ``alphas_cumprod`` (β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}) and DDPM posterior terms
    (float64). The posterior log-variance is clipped by repeating its second value for the first step.
    ``spacing`` picks the kept timesteps (:func:`kept_timesteps`; ``uniform`` is the published respacing)."""
    kept = kept_timesteps(base_alphas_cumprod, num_steps, spacing)
    ac = np.asarray(base_alphas_cumprod, dtype=np.float64)[kept]
    ac_prev = np.append(1.0, ac[:-1])
    betas = 1.0 - ac / ac_prev
    var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return SpacedSchedule(
        timesteps=np.asarray(kept, dtype=np.int64),
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        posterior_log_variance_clipped=np.log(np.append(var[1], var[1:])),
    )


def guided_model_output(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any = None,
                        cfg_scale: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance ``uncond + s·(cond − uncond)``; plain ``model_fn(x, t, cond)`` when s == 1 or no
    ``uncond`` is given."""
    out = model_fn(x, t, cond)
    if uncond is None or cfg_scale == 1.0:
        return out
    out_uncond = model_fn(x, t, uncond)
    return out_uncond + cfg_scale * (out - out_uncond)


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B,...).

    ``generator`` may be one generator (or None) for the whole batch, or a list of B generators: then row b is
    drawn from generator b alone, so an image sampled in a batch gets exactly the noise it gets when sampled alone.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def model_x0(model_fn: ModelFn, x: torch.Tensor, schedule: SpacedSchedule, i: int, cond: Any, uncond: Any,
             cfg_scale: float, parameterization: str, x0_fn: Callable | None) -> torch.Tensor:
    """x̂0 at schedule index i: (guided) model output at timestep ``timesteps[i]`` turned into x0, then passed
    through the optional hook ``x0_fn(x0, x, i)`` (the solvers' shared first half of a step)."""
    t = torch.full((x.shape[0],), int(schedule.timesteps[i]), device=x.device, dtype=torch.long)
    model_out = guided_model_output(model_fn, x, t, cond, uncond, cfg_scale)
    x0 = predict_x0(x, model_out, schedule.alphas_cumprod[i], parameterization)
    return x0 if x0_fn is None else x0_fn(x0, x, i)


def posterior_step(x_t: torch.Tensor, x0: torch.Tensor, schedule: SpacedSchedule, i: int,
                   generator: Generators) -> torch.Tensor:
    """One ancestral DDPM step from index i to i−1: posterior mean plus noise (no noise at i == 0)."""
    mean = schedule.posterior_mean_coef1[i] * x0 + schedule.posterior_mean_coef2[i] * x_t
    if i == 0:
        return mean
    noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
    return mean + float(np.exp(0.5 * schedule.posterior_log_variance_clipped[i])) * noise


def sample_spaced(model_fn: ModelFn, x: torch.Tensor, schedule: SpacedSchedule, cond: Any, *,
                  uncond: Any = None, cfg_scale: float = 1.0, parameterization: str = "eps",
                  start_step: int = 0, end_step: int | None = None, x0_fn: Callable | None = None,
                  callback: Callable[[dict], None] | None = None, generator: Generators = None,
                  disable: bool = True) -> torch.Tensor:
    """Run the respaced chain on latent ``x`` (B,4,h,w).

    Steps are counted in sampling order: step k uses schedule index i = N−1−k (k = 0 is the noisiest).
    ``start_step``/``end_step`` run the sub-range [start_step, end_step) (AccSamp uses both). ``x0_fn(x0, x, i)``
    may modify the x0 prediction (fidelity guidance). ``callback`` gets ``{"step", "index", "t", "x", "x0"}``
    after each step, where ``x`` is the new latent. ``generator``: one, or one per batch element (see
    :func:`randn`). Returns the latent after the last step run.
    """
    n = len(schedule)
    end_step = n if end_step is None else end_step
    for k in tqdm(range(start_step, end_step), disable=disable, desc="sampling", leave=False):
        i = n - 1 - k
        t = torch.full((x.shape[0],), int(schedule.timesteps[i]), device=x.device, dtype=torch.long)
        model_out = guided_model_output(model_fn, x, t, cond, uncond, cfg_scale)
        x0 = predict_x0(x, model_out, schedule.alphas_cumprod[i], parameterization)
        if x0_fn is not None:
            x0 = x0_fn(x0, x, i)
        x = posterior_step(x, x0, schedule, i, generator)
        if callback is not None:
            callback({"step": k, "index": i, "t": int(schedule.timesteps[i]), "x": x, "x0": x0})
    return x
