"""One iteration of the one-step distillation (stage 3): the student step, then the fake-score step.

As parts of the one trainer (``training.stage3``): :class:`StudentObjective` and :class:`FakeScoreObjective`, each
with its own optimiser, whose training state is only their trainable tensors (:class:`AdaptedPart`).

Networks (``model.onestep``): the frozen stage-2 ControlLDM (teacher = real score, and the VAE and text encoder
every network shares), the student (LoRA adapters + trainable UNet input conv, one evaluation at t*), and the fake
score (LoRA adapters, same conditioning as the teacher); both adapt copies of the teacher's layers that share its
frozen weights (``model.onestep.shared_copy``). Per iteration, with two optimisers:

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

from losses.onestep import PERCEPTUAL_TERMS, data_loss, vsd_loss
from metrics.ssim import MS_SSIM_WEIGHTS
from model.cldm import ControlLDM
from model.gaussian_diffusion import Diffusion
from model.onestep import LoRADenoiser, OneStepStudent
from utils.rules import Rule, first_violation, is_int, is_number, optional


@dataclass(frozen=True)
class DistillSettings:
    """The ``distill.*`` section of a stage-3 config (defaults: OSEDiff's where it has one; its training script:
    rank 4, L2 weight 1, LPIPS weight 2, VSD weight 1). Checked by :meth:`validate` at construction."""

    controlnet_path: str | None = None
    """The stage-2 ControlNet (release format) the teacher, the student and the fake score start from; required by
    ``train_stage3.py`` (the SD-2.1 weights are ``train.sd_path``)."""
    timestep: int = 999
    """The student's fixed timestep t* (OSEDiff: 999)."""
    lora_rank: int = 4
    """Rank of the student's and the fake score's adapters (OSEDiff: 4)."""
    mse_weight: float = 1.0
    """Weight of the pixel MSE (OSEDiff: 1)."""
    perceptual: str = "ms_ssim"
    """The perceptual term of the data term: ``ms_ssim`` (1 − MS-SSIM, no weights needed) or ``lpips`` (needs
    ``lpips_path`` and ``vgg_path``; OSEDiff's)."""
    perceptual_weight: float = 1.0
    """Weight of the perceptual term (OSEDiff: 2 for LPIPS)."""
    ssim_scales: int = 5
    """MS-SSIM scales (5 = published weights; fewer for crops below ~176 px)."""
    lpips_path: str | None = None
    """LPIPS v0.1 VGG linear layers (the lpips package's ``weights/v0.1/vgg.pth``), with ``perceptual: lpips``."""
    vgg_path: str | None = None
    """torchvision's VGG-16 weights (``vgg16-397923af.pth``), with ``perceptual: lpips``."""
    vsd_weight: float = 1.0
    """Weight of the VSD term (OSEDiff: 1)."""
    vsd_t_min: int = 20
    """Lowest timestep of the VSD and fake-score noise (OSEDiff/DMD: 2 % of T)."""
    vsd_t_max: int = 980
    """Highest timestep of the VSD and fake-score noise (OSEDiff/DMD: 98 % of T)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_timesteps: int | None = None) -> None:
        """ValueError naming the ``distill.*`` key of the first bad value (:data:`DISTILL_RULES`, the timestep range,
        the LPIPS files); ``num_timesteps``: the model's T, when known, bounds ``timestep`` and ``vsd_t_max``."""
        message = first_violation(self, DISTILL_RULES, "distill")
        if message is not None:
            raise ValueError(message)
        if self.vsd_t_min > self.vsd_t_max:
            raise ValueError(f"distill.vsd_t_min/vsd_t_max must satisfy 0 <= t_min <= t_max, got "
                             f"{self.vsd_t_min}, {self.vsd_t_max}")
        if num_timesteps is not None:
            for key in ("timestep", "vsd_t_max"):
                if getattr(self, key) >= num_timesteps:
                    raise ValueError(f"distill.{key} must be below the model's {num_timesteps} timesteps "
                                     f"(model.diffusion.params.timesteps), got {key}={getattr(self, key)}")
        if self.perceptual == "lpips":
            for key in ("lpips_path", "vgg_path"):
                if getattr(self, key) is None:
                    raise ValueError(f"distill.perceptual: lpips needs distill.{key} (LPIPS: the lpips package's "
                                     "weights/v0.1/vgg.pth and torchvision's vgg16-397923af.pth); without them use "
                                     "distill.perceptual: ms_ssim")
        elif self.lpips_path is not None:
            raise ValueError("distill.lpips_path is set but distill.perceptual is ms_ssim: set distill.perceptual: "
                             "lpips to use it, or distill.lpips_path: null")


DISTILL_RULES: tuple[Rule, ...] = (
    (("controlnet_path", "lpips_path", "vgg_path"), optional(lambda v: isinstance(v, str)), "a path or null"),
    (("timestep", "vsd_t_min", "vsd_t_max"), lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    (("lora_rank",), lambda v: is_int(v) and v >= 1, "a positive integer"),
    (("ssim_scales",), lambda v: is_int(v) and 1 <= v <= len(MS_SSIM_WEIGHTS),
     f"an integer in 1..{len(MS_SSIM_WEIGHTS)}"),
    (("mse_weight", "perceptual_weight", "vsd_weight"), lambda v: is_number(v) and v >= 0, "a number >= 0"),
    (("perceptual",), lambda v: v in PERCEPTUAL_TERMS, f"one of {', '.join(PERCEPTUAL_TERMS)}"),
)
"""(keys, test, what a valid value is) of every ``distill.*`` key of :class:`DistillSettings`."""


class DistillationStep(nn.Module):
    """The two losses of one distillation iteration.

    Registered submodules are exactly the trained parts: ``student`` (its adapters and UNet input conv) and ``fake``
    (the fake score's adapters); :meth:`student_parameters` and :meth:`fake_parameters` are the two optimisers'
    (disjoint) parameter lists. The teacher ControlLDM, the schedule and the LPIPS network (``lpips``, exactly when
    ``settings.perceptual`` is lpips) are plain attributes.

    Batch keys: ``condition`` (B,3,H,W) hazy in [0,1], ``target`` (B,3,H,W) clean in [-1,1], ``prompt`` list of B
    str; H and W multiples of 8.
    """

    def __init__(self, teacher: ControlLDM, diffusion: Diffusion, settings: DistillSettings = DistillSettings(),
                 lpips: nn.Module | None = None):
        super().__init__()
        settings.validate(diffusion.num_timesteps)
        if (lpips is None) != (settings.perceptual == "ms_ssim"):
            raise ValueError(f"distill.perceptual is {settings.perceptual}: pass an LPIPS network exactly when it is "
                             "lpips")
        teacher.eval().requires_grad_(False)
        self.student = OneStepStudent(teacher, diffusion, settings.timestep, settings.lora_rank)
        self.fake = LoRADenoiser(teacher, settings.lora_rank)
        self.settings = settings
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "diffusion", diffusion)
        object.__setattr__(self, "lpips", lpips)

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
        terms = data_loss(self.teacher.vae_decode(z), batch["target"], s.mse_weight, s.perceptual_weight,
                          s.ssim_scales, self.lpips)
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


# ------------------------------------------------------------------------------------- the trainer's two parts
def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` that require gradients, by name (detached)."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_tensors(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``sd`` into the trainable parameters of ``module``: ValueError naming ``source`` unless its names and
    shapes are exactly those of :func:`trainable_tensors`."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the trainable tensors: {len(missing)} missing (first: "
                         f"{missing[:2]}), {len(unexpected)} unexpected (first: {unexpected[:2]})")
    bad = [name for name, value in sd.items() if tuple(value.shape) != tuple(params[name].shape)]
    if bad:
        raise ValueError(f"{source}: '{bad[0]}' has shape {tuple(sd[bad[0]].shape)}, expected "
                         f"{tuple(params[bad[0]].shape)} (another LoRA rank?)")
    with torch.no_grad():
        for name, value in sd.items():
            params[name].copy_(value)


class AdaptedPart(nn.Module):
    """One trainable part of a distillation run: a network holding frozen copies and trainable adapters. Its training
    state is only the trainable tensors (:meth:`trainable_state_dict`; the frozen weights come from the weight files
    at every start), not the copies of the UNet and ControlNet."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_tensors(self)

    def load_trainable_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "training state") -> None:
        load_trainable_tensors(self, sd, source)


class StudentObjective(AdaptedPart):
    """The student's loss of a :class:`DistillationStep` as a trainable part (registered: ``student`` only).

    ``forward(batch, generator)`` -> ``{"loss", "terms", "latent", "cond", "logs"}``: the student loss, the terms the
    guard checks (``data``, ``vsd``), the detached student latent and the condition the fake-score step reuses, the
    logs.
    """

    def __init__(self, step: DistillationStep):
        super().__init__()
        self.student = step.student
        object.__setattr__(self, "step", step)

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        loss, z, cond, logs = self.step.student_loss(batch, generator)
        terms = {key: logs[key] for key in ("data", "vsd") if key in logs}
        return {"loss": loss, "terms": terms, "latent": z, "cond": cond, "logs": logs}


class FakeScoreObjective(AdaptedPart):
    """The fake score's loss of a :class:`DistillationStep` as a trainable part (registered: ``fake`` only).

    ``forward(latent, cond, generator)`` -> ``{"loss", "terms", "logs"}`` (term ``fake_score``)."""

    def __init__(self, step: DistillationStep):
        super().__init__()
        self.fake = step.fake
        object.__setattr__(self, "step", step)

    def forward(self, latent: torch.Tensor, cond: Mapping[str, Any],
                generator: torch.Generator | None = None) -> dict[str, Any]:
        loss, logs = self.step.fake_score_loss(latent, cond, generator)
        return {"loss": loss, "terms": {"fake_score": loss.detach()}, "logs": logs}
