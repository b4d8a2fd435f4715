"""One-step DiffDehaze: the stage-2 ControlLDM's denoiser with LoRA adapters (``peft``), run once at a fixed timestep.

Student (as OSEDiff, arXiv 2406.08177, with DiffDehaze's ControlNet): copies of the stage-2 UNet and IRControlNet with
LoRA adapters on their attention, feed-forward, projection and convolution layers (:data:`LORA_LAYER_PATTERN`), the
UNet's input convolution fully trainable; the hazy image's latent z_h is both the input at timestep t* (default 999)
and the ControlNet hint, and the output is x̂0 = ``model.gaussian_diffusion.predict_x0`` of the prediction:

    x̂0 = predict_x0(z_h, ε_θ(z_h, t*, {c_txt, c_img = z_h}), ᾱ_t*)        (scaled latents, B×4×h×w)

Adapters are created by ``peft.inject_adapter_in_model`` on plain modules (B = 0 at init, so every output equals the
stage-2 model's bit for bit until the first update). The VAE and the text encoder are not copied: the student uses
the stage-2 model's frozen ones. :class:`LoRADenoiser` is also the fake score of the distillation
(``training.distill``). The adapter file holds only the trainable tensors (``safetensors``) and is merged into the
stage-2 weights at load (:meth:`LoRADenoiser.merge_adapters`).
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from model.cldm import ControlLDM, controlled_denoise
from model.gaussian_diffusion import Diffusion
from utils.checkpoint import CheckpointError, save_state_dict_atomic

LORA_LAYER_PATTERN = re.compile(
    r"(unet|controlnet)\..*\.("
    r"attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out"  # transformer blocks
    r"|in_layers\.2|out_layers\.3|skip_connection|op|conv"  # ResBlock, Downsample, Upsample convolutions
    r")|unet\.out\.2|controlnet\.(input_blocks\.0\.0|zero_convs\.\d+\.0|middle_block_out\.0)")
"""Full names (in a :class:`LoRADenoiser`) of the layers that get adapters: OSEDiff's UNet target set (attention
q/k/v/out, feed-forward, proj_in/out, ResBlock and resampling convolutions, output conv) in the UNet and the
ControlNet, plus the ControlNet's input conv, zero convs and middle output. Not adapted: time embeddings, the UNet's
input conv (trained in full by the student) and the YCbCr fusion of the HCD-YC extension."""
UNET_INPUT_CONV = "unet.input_blocks.0.0"
ADAPTER_NAME = "default"


def lora_targets(module: nn.Module) -> list[str]:
    """Names of the Linear / Conv2d layers of ``module`` that :data:`LORA_LAYER_PATTERN` matches."""
    return [name for name, sub in module.named_modules()
            if isinstance(sub, (nn.Linear, nn.Conv2d)) and LORA_LAYER_PATTERN.fullmatch(name)]


class LoRADenoiser(nn.Module):
    """A copy of a ControlLDM's UNet + ControlNet with LoRA adapters of rank ``rank`` (scale ``alpha/rank``);
    ``forward(x (B,4,h,w), t (B,), cond)`` -> eps (or v) float32, as :meth:`ControlLDM.forward`.

    Only the adapters require gradients (and, with ``train_input_conv``, the UNet's input convolution).
    """

    def __init__(self, ldm: ControlLDM, rank: int = 4, alpha: float | None = None, train_input_conv: bool = False):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.unet = copy.deepcopy(ldm.unet)
        self.controlnet = copy.deepcopy(ldm.controlnet)
        self.control_scales = ldm.control_scales
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.requires_grad_(False)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                            target_modules=lora_targets(self), init_lora_weights=True)
        inject_adapter_in_model(config, self, adapter_name=ADAPTER_NAME)
        for name, param in self.named_parameters():
            param.requires_grad_(".lora_" in name or (train_input_conv and name.startswith(UNET_INPUT_CONV + ".")))
        self.train_input_conv = train_input_conv

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        return controlled_denoise(self.unet, self.controlnet, self.control_scales, x, t, cond)

    def train(self, mode: bool = True) -> "LoRADenoiser":
        """Training mode of the adapters only: the copied layers keep eval-mode behaviour (as the frozen model)."""
        super().train(False)
        for name, sub in self.named_modules():
            if ".lora_" in name:
                sub.train(mode)
        return self

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (adapters, and the UNet input conv when trained): the adapter file."""
        return {name: param.detach() for name, param in self.named_parameters() if param.requires_grad}

    def load_adapter_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "adapter file") -> None:
        """Load :meth:`adapter_state_dict` tensors strictly: CheckpointError naming ``source`` for a missing,
        unexpected or mis-shaped key (e.g. another LoRA rank)."""
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{source} does not match the student (rank {self.rank}): {len(missing)} missing "
                                  f"(first: {missing[:2]}), {len(unexpected)} unexpected (first: {unexpected[:2]})")
        for key, value in sd.items():
            if value.shape != own[key].shape:
                raise CheckpointError(f"{source}: '{key}' has shape {tuple(value.shape)}, the student "
                                      f"{tuple(own[key].shape)} (another LoRA rank?)")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for key, value in sd.items():
                params[key].copy_(value)

    def merge_adapters(self) -> "LoRADenoiser":
        """Fold every adapter into its layer's weight (W += scale·B·A; peft's ``merge``): inference then runs the
        plain layers, at the stage-2 model's cost."""
        from peft.tuners.lora import LoraLayer

        for sub in self.modules():
            if isinstance(sub, LoraLayer):
                sub.merge(adapter_names=[ADAPTER_NAME])
        return self


class OneStepStudent(nn.Module):
    """``forward(cond)`` -> x̂0 (B,4,h,w) scaled latent from one evaluation at ``timestep`` of the adapted denoiser,
    whose input and hint are both ``cond["c_img"]`` (the hazy image's latent, :meth:`ControlLDM.prepare_condition`).

    ``denoiser``: the trainable :class:`LoRADenoiser` (adapters + UNet input conv). The stage-2 model's VAE and text
    encoder stay in ``ldm`` (frozen, not registered), as does the schedule ``diffusion``.
    """

    def __init__(self, ldm: ControlLDM, diffusion: Diffusion, timestep: int = 999, rank: int = 4,
                 alpha: float | None = None):
        super().__init__()
        if not 0 <= timestep < diffusion.num_timesteps:
            raise ValueError(f"student timestep must be in [0, {diffusion.num_timesteps - 1}], got {timestep}")
        self.denoiser = LoRADenoiser(ldm, rank, alpha, train_input_conv=True)
        self.timestep = int(timestep)
        object.__setattr__(self, "ldm", ldm)
        object.__setattr__(self, "diffusion", diffusion)

    def forward(self, cond: Mapping[str, Any]) -> torch.Tensor:
        z_hazy = cond["c_img"]
        t = torch.full((z_hazy.shape[0],), self.timestep, dtype=torch.long, device=z_hazy.device)
        return self.diffusion.predict_x0(z_hazy, t, self.denoiser(z_hazy, t, cond))

    def dehaze(self, hazy01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """hazy01 (B,3,H,W) in [0,1], H and W multiples of 8 -> dehazed (B,3,H,W) in ~[-1,1] (not clamped)."""
        return self.ldm.vae_decode(self(self.ldm.prepare_condition(hazy01, prompts)))

    def save_adapters(self, path: str | os.PathLike) -> None:
        """Write the trainable tensors to ``path`` (``.safetensors``) and their settings (rank, alpha, timestep) to
        ``path`` + ``.json``, both atomically."""
        save_state_dict_atomic(self.denoiser.adapter_state_dict(), path)
        meta = {"rank": self.denoiser.rank, "alpha": self.denoiser.alpha, "timestep": self.timestep}
        Path(f"{path}.json").write_text(json.dumps(meta) + "\n")

    def load_adapters(self, sd: Mapping[str, torch.Tensor], source: str = "adapter file") -> None:
        """Load the tensors of :meth:`save_adapters` (strict; CheckpointError naming ``source`` otherwise)."""
        self.denoiser.load_adapter_state_dict(sd, source)
