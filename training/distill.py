"""One iteration of the one-step distillation (stage 3): the student step, then the fake-score step.

Networks (``model.onestep``): the frozen stage-2 ControlLDM (teacher = real score, and the VAE and text encoder
every network shares), the student (LoRA copy + trainable UNet input conv, one evaluation at t*), and the fake score
(a LoRA copy of the teacher, same conditioning). Per iteration, with two optimisers:

1. student: z = student(cond) (x̂0 latent at t*), x̂ = decode(z); loss = data(x̂, clean) + w_vsd · VSD(z), VSD with
   t ~ U{t_min..t_max}, both scores evaluated without gradient on z_t (``losses.onestep``);
2. fake score: ε-MSE (v-MSE for a v-model: ``Diffusion.training_outputs``) on the detached student latent at
   t ~ U{t_min..t_max}.

The real score is the teacher conditioned on the hazy image (its latent as the hint, the prompt as text): the
dehazing posterior it was trained for. OSEDiff uses the unconditional SD prior with classifier-free guidance
instead; that is not offered here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from losses.onestep import data_loss, vsd_loss
from model.cldm import ControlLDM
from model.gaussian_diffusion import Diffusion
from model.onestep import LoRADenoiser, OneStepStudent


@dataclass(frozen=True)
class DistillSettings:
    """The ``distill.*`` section of a stage-3 config (defaults: OSEDiff's where it has one)."""

    timestep: int = 999
    """The student's fixed timestep t* (OSEDiff: 999)."""
    lora_rank: int = 4
    """Rank of the student's and the fake score's adapters (OSEDiff: 4)."""
    mse_weight: float = 1.0
    """Weight of the pixel MSE (OSEDiff: 1)."""
    ssim_weight: float = 1.0
    """Weight of 1 − MS-SSIM, the perceptual term used when no LPIPS weights are given."""
    ssim_scales: int = 5
    """MS-SSIM scales (5 = published weights; fewer for crops below ~176 px)."""
    vsd_weight: float = 1.0
    """Weight of the VSD term (OSEDiff: 1)."""
    vsd_t_min: int = 20
    """Lowest timestep of the VSD and fake-score noise (OSEDiff/DMD: 2 % of T)."""
    vsd_t_max: int = 980
    """Highest timestep of the VSD and fake-score noise (OSEDiff/DMD: 98 % of T)."""

    def __post_init__(self) -> None:
        if not 0 <= self.vsd_t_min <= self.vsd_t_max:
            raise ValueError(f"distill.vsd_t_min/vsd_t_max must satisfy 0 <= t_min <= t_max, got "
                             f"{self.vsd_t_min}, {self.vsd_t_max}")
        if self.lora_rank < 1 or self.ssim_scales < 1:
            raise ValueError("distill.lora_rank and distill.ssim_scales must be >= 1")


class DistillationStep(nn.Module):
    """The two losses of one distillation iteration.

    Registered submodules are exactly the trained parts: ``student`` (its adapters and UNet input conv) and ``fake``
    (the fake score's adapters); :meth:`student_parameters` and :meth:`fake_parameters` are the two optimisers'
    (disjoint) parameter lists. The teacher ControlLDM and the schedule are plain attributes.

    Batch keys: ``condition`` (B,3,H,W) hazy in [0,1], ``target`` (B,3,H,W) clean in [-1,1], ``prompt`` list of B
    str; H and W multiples of 8.
    """

    def __init__(self, teacher: ControlLDM, diffusion: Diffusion, settings: DistillSettings = DistillSettings()):
        super().__init__()
        if settings.vsd_t_max >= diffusion.num_timesteps:
            raise ValueError(f"distill.vsd_t_max must be below the model's {diffusion.num_timesteps} timesteps")
        teacher.eval().requires_grad_(False)
        self.student = OneStepStudent(teacher, diffusion, settings.timestep, settings.lora_rank)
        self.fake = LoRADenoiser(teacher, settings.lora_rank)
        self.settings = settings
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "diffusion", diffusion)

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def fake_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.fake.parameters() if p.requires_grad]

    @torch.no_grad()
    def condition(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The teacher's condition of the hazy images (text embedding, hazy latent ``c_img``), without gradient."""
        return self.teacher.prepare_condition(batch["condition"], list(batch["prompt"]))

    def noise_timesteps(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """(n,) int64 timesteps, uniform on {vsd_t_min, ..., vsd_t_max}."""
        s = self.settings
        return torch.randint(s.vsd_t_min, s.vsd_t_max + 1, (n,), generator=generator,
                             device=generator.device if generator is not None else None).to(device)

    def score_estimates(self, z: torch.Tensor, cond: Mapping[str, Any], t: torch.Tensor,
                        noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0_real, x̂0_fake) of z noised to t with ``noise``, both without gradient."""
        with torch.no_grad():
            z_t = self.diffusion.q_sample(z.detach(), t, noise)
            real = self.diffusion.predict_x0(z_t, t, self.teacher(z_t, t, cond))
            fake = self.diffusion.predict_x0(z_t, t, self.fake(z_t, t, cond))
        return real, fake

    def student_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
        """(loss, detached student latent, condition, logs) of step 1; gradients reach only the student."""
        s = self.settings
        cond = self.condition(batch)
        z = self.student(cond)
        terms = data_loss(self.teacher.vae_decode(z), batch["target"], s.mse_weight, s.ssim_weight, s.ssim_scales)
        loss = terms["data"]
        logs = {k: v.detach() for k, v in terms.items()}
        if s.vsd_weight:
            t = self.noise_timesteps(z.shape[0], z.device, generator)
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            real, fake = self.score_estimates(z, cond, t, noise)
            vsd = vsd_loss(z, real, fake)
            loss = loss + s.vsd_weight * vsd
            logs["vsd"] = vsd.detach()
        logs["loss_student"] = loss.detach()
        return loss, z.detach(), cond, logs

    def fake_score_loss(self, z: torch.Tensor, cond: Mapping[str, Any], generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logs) of step 2: the fake score's diffusion loss on the detached student latents z."""
        t = self.noise_timesteps(z.shape[0], z.device, generator)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        loss = self.diffusion.training_outputs(self.fake, z.detach(), t, cond, noise)["loss"]
        return loss, {"loss_fake": loss.detach()}
