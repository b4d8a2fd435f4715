"""Preview grids of the training run: samples of the model being trained beside their target and condition."""
from __future__ import annotations

import random
from typing import Any

import torch

from training.step import TrainingStep


@torch.no_grad()
def preview_grid(step_module: TrainingStep, batch: dict[str, Any], step: int, num: int, sample_steps: int,
                 seed: int) -> tuple[torch.Tensor, list[str]]:
    """Image grid (3, 4*H', n*W') in [0,1] (rows = samples (spaced sampling), target, condition, decoded c_img) and
    the prompts the samples were conditioned on."""
    from torchvision.utils import make_grid

    from sampler.spaced import make_spaced_schedule, sample_spaced

    ldm, diffusion = step_module.ldm, step_module.diffusion
    part = {k: v[:num] for k, v in batch.items()}
    device = part["target"].device
    cond, prompts, _ = step_module.condition(part, step, random.Random(seed))
    gen = torch.Generator(device=device).manual_seed(seed)
    schedule = make_spaced_schedule(diffusion.alphas_cumprod_np, sample_steps)
    x_t = torch.randn(cond["c_img"].shape, generator=gen, device=device)
    z = sample_spaced(ldm, x_t, schedule, cond, parameterization=diffusion.parameterization, generator=gen)
    rows = [ldm.vae_decode(z).float() * 0.5 + 0.5, part["target"].float() * 0.5 + 0.5, part["condition"].float(),
            ldm.vae_decode(cond["c_img"]).float() * 0.5 + 0.5]
    return make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=rows[0].shape[0], padding=2), list(prompts)
