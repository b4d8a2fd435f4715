"""One-step DiffDehaze: the stage-2 ControlLDM's denoiser with LoRA adapters (``peft``), run once at a fixed timestep.

Student (as OSEDiff, arXiv 2406.08177, with DiffDehaze's ControlNet): copies of the stage-2 UNet and IRControlNet with
LoRA adapters on their attention, feed-forward, projection and convolution layers (:data:`LORA_LAYER_PATTERN`), the
UNet's input convolution fully trainable; the hazy image's latent z_h is both the input at timestep t* (default 999)
and the ControlNet hint, and the output is x̂0 = ``model.gaussian_diffusion.predict_x0`` of the prediction:

    x̂0 = predict_x0(z_h, ε_θ(z_h, t*, {c_txt, c_img = z_h}), ᾱ_t*)        (scaled latents, B×4×h×w)

Adapters are created by ``peft.inject_adapter_in_model`` on plain modules (B = 0 at init, so every output equals the
stage-2 model's bit for bit until the first update). The adapted UNet and ControlNet are structural copies that share
the stage-2 model's frozen weights (:func:`shared_copy`): only the adapters and the trained input conv take new
memory, so the teacher, the student and the fake score of the distillation hold one set of UNet + ControlNet weights
between them. The VAE and the text encoder are not copied: the student uses the stage-2 model's frozen ones.
:class:`LoRADenoiser` is also the fake score of the distillation (``training.distill``). The adapter file
(:func:`save_adapter_file`) holds only the trainable tensors (``safetensors``, with the LoRA rank, alpha and t* in
its metadata) and is merged into the stage-2 weights at load (:func:`merge_adapter_file`).
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from model.cldm import ControlLDM, controlled_denoise
from model.gaussian_diffusion import Diffusion
from utils.atomic import atomic_write
from utils.checkpoint import CheckpointError

LORA_LAYER_PATTERN = re.compile(
    r"(unet|controlnet)\..*\.("
    r"attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out"  # transformer blocks
    r"|in_layers\.2|out_layers\.3|skip_connection|op|conv"  # ResBlock, Downsample, Upsample convolutions
    r")|unet\.out\.2|controlnet\.(input_blocks\.0\.0|zero_convs\.\d+\.0|middle_block_out\.0)")
"""Full names (in a :class:`LoRADenoiser`) of the layers that get adapters: OSEDiff's UNet target set (attention
q/k/v/out, feed-forward, proj_in/out, ResBlock and resampling convolutions, output conv) in the UNet and the
ControlNet, plus the ControlNet's input conv, zero convs and middle output. Not adapted: time embeddings, the UNet's
input conv (trained in full by the student) and the YCbCr fusion of the HCD-YC extension."""
FROZEN_PREFIXES = ("controlnet.ycbcr.",)
"""Layers never adapted although their names match: the YCbCr fusion of the HCD-YC extension."""
UNET_INPUT_CONV = "unet.input_blocks.0.0"
ADAPTER_NAME = "default"


def shared_copy(module: nn.Module, own: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``module``'s layers whose parameters and buffers are ``module``'s own tensors, shared rather than
    duplicated, except those whose names start with a prefix in ``own``, which are copied. Adapters injected into
    the copy wrap its layers and leave ``module`` unchanged; the shared tensors must stay frozen (an in-place
    change of one, such as merging an adapter, changes ``module`` too)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    memo = {id(t): t for name, t in tensors if not name.startswith(own)}
    return copy.deepcopy(module, memo)


def lora_targets(module: nn.Module) -> list[str]:
    """Names of the Linear / Conv2d layers of ``module`` that :data:`LORA_LAYER_PATTERN` matches."""
    return [name for name, sub in module.named_modules()
            if isinstance(sub, (nn.Linear, nn.Conv2d)) and LORA_LAYER_PATTERN.fullmatch(name)
            and not name.startswith(FROZEN_PREFIXES)]


class LoRADenoiser(nn.Module):
    """A copy of a ControlLDM's UNet + ControlNet with LoRA adapters of rank ``rank`` (scale ``alpha/rank``);
    ``forward(x (B,4,h,w), t (B,), cond)`` -> eps (or v) float32, as :meth:`ControlLDM.forward`.

    Only the adapters require gradients (and, with ``train_input_conv``, the UNet's input convolution, which is then
    a copy of its own). The UNet and ControlNet are :func:`shared_copy` copies of ``ldm``'s: they share its weights,
    which this freezes, and cannot be merged. ``in_place``: inject the adapters into ``ldm``'s own UNet and
    ControlNet instead (inference, where they are merged at load).
    """

    def __init__(self, ldm: ControlLDM, rank: int = 4, alpha: float | None = None, train_input_conv: bool = False,
                 in_place: bool = False):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        own_conv = (UNET_INPUT_CONV.removeprefix("unet.") + ".",) if train_input_conv else ()
        self.unet = ldm.unet if in_place else shared_copy(ldm.unet, own_conv)
        self.controlnet = ldm.controlnet if in_place else shared_copy(ldm.controlnet)
        self.in_place = in_place
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
        plain layers, at the stage-2 model's cost. Only for ``in_place`` adapters: a copy's layers share the stage-2
        model's weights, which merging would change (RuntimeError)."""
        from peft.tuners.lora import LoraLayer

        if not self.in_place:
            raise RuntimeError("merge_adapters needs adapters injected in place (LoRADenoiser(..., in_place=True)): "
                               "this denoiser shares the stage-2 model's weights, which merging would change")

        for sub in self.modules():
            if isinstance(sub, LoraLayer):
                sub.merge(adapter_names=[ADAPTER_NAME])
        return self


def one_step_x0(denoiser: Callable, diffusion: Diffusion, cond: Mapping[str, Any], timestep: int) -> torch.Tensor:
    """x̂0 (B,4,h,w) of one evaluation of ``denoiser`` at ``timestep`` on the hazy latent ``cond["c_img"]``, which is
    also its hint: the student's output (training and inference)."""
    z_hazy = cond["c_img"]
    t = torch.full((z_hazy.shape[0],), int(timestep), dtype=torch.long, device=z_hazy.device)
    return diffusion.predict_x0(z_hazy, t, denoiser(z_hazy, t, cond))


@dataclass(frozen=True)
class AdapterMeta:
    """What an adapter file records besides its tensors: the LoRA rank and alpha and the student's timestep t*."""

    rank: int
    alpha: float
    timestep: int

    def as_metadata(self) -> dict[str, str]:
        return {"format": "hcdyc-onestep-adapters", "rank": str(self.rank), "alpha": repr(self.alpha),
                "timestep": str(self.timestep)}


def write_adapter_file(tensors: Mapping[str, torch.Tensor], meta: AdapterMeta, path: str | os.PathLike) -> None:
    """Write adapter tensors (:meth:`LoRADenoiser.adapter_state_dict` names, e.g. an EMA copy of them) and ``meta``
    to ``path`` (``.safetensors``), atomically."""
    from safetensors.torch import save

    if Path(path).suffix != ".safetensors":
        raise ValueError(f"adapter files are .safetensors, got {path}")
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda handle: handle.write(save(cpu, metadata=meta.as_metadata())))


def save_adapter_file(denoiser: LoRADenoiser, timestep: int, path: str | os.PathLike) -> None:
    """Write the trainable tensors of ``denoiser`` and their :class:`AdapterMeta` to ``path`` (``.safetensors``),
    atomically."""
    write_adapter_file(denoiser.adapter_state_dict(), AdapterMeta(denoiser.rank, denoiser.alpha, int(timestep)), path)


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """(tensors, meta) of an adapter file; CheckpointError naming the file when it is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(f"adapter file not found or not .safetensors: {path}")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != "hcdyc-onestep-adapters":
        raise CheckpointError(f"{path} is not a one-step adapter file (no 'hcdyc-onestep-adapters' metadata)")
    return load_file(str(path)), AdapterMeta(int(meta["rank"]), float(meta["alpha"]), int(meta["timestep"]))


def merge_adapter_file(ldm: ControlLDM, path: str | os.PathLike) -> int:
    """Turn the stage-2 ``ldm`` into the one-step student of the adapter file at ``path``: its adapters are injected
    into ``ldm``'s own UNet and ControlNet, loaded, and merged into the weights, and the UNet input conv is
    replaced. Returns the student's timestep t*. CheckpointError naming the file when it does not fit the model."""
    sd, meta = read_adapter_file(path)
    denoiser = LoRADenoiser(ldm, meta.rank, meta.alpha, train_input_conv=True, in_place=True)
    denoiser.load_adapter_state_dict(sd, str(path))
    denoiser.merge_adapters().requires_grad_(False)
    return meta.timestep


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
        return one_step_x0(self.denoiser, self.diffusion, cond, self.timestep)

    def dehaze(self, hazy01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """hazy01 (B,3,H,W) in [0,1], H and W multiples of 8 -> dehazed (B,3,H,W) in ~[-1,1] (not clamped)."""
        return self.ldm.vae_decode(self(self.ldm.prepare_condition(hazy01, prompts)))

    def save_adapters(self, path: str | os.PathLike) -> None:
        """Write the adapter file (:func:`save_adapter_file`) of this student."""
        save_adapter_file(self.denoiser, self.timestep, path)

    def load_adapters(self, path: str | os.PathLike) -> None:
        """Load the tensors of an adapter file (strict; CheckpointError naming the file when its rank or
        timestep is not this student's)."""
        sd, meta = read_adapter_file(path)
        if meta.timestep != self.timestep:
            raise CheckpointError(f"{path} was trained at timestep {meta.timestep}, the student runs at "
                                  f"{self.timestep}")
        self.denoiser.load_adapter_state_dict(sd, str(path))
