"""ControlLDM: frozen SD-2.1 (UNet, VAE, OpenCLIP text encoder) + a trainable IRControlNet."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from model.unet import Conv2d, GroupNorm32
from utils.checkpoint import CheckpointError, check_shapes
from utils.common import instantiate_from_config

SD_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip": "cond_stage_model."}
FUSION_PREFIX = "ycbcr."


def controlled_denoise(unet: nn.Module, controlnet: nn.Module, control_scales: list[float] | None,
                       x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
    """The denoiser of a ControlLDM (also of its LoRA copies, ``model.onestep``): the ControlNet's 13 residuals of
    (x_noisy, hint ``cond["c_img"]``, t, ``cond["c_txt"]``, optional ``cond["c_ycbcr"]``), times ``control_scales``
    when given, added to the UNet's skips. Returns eps (or v) (B,4,h,w) float32."""
    control = controlnet(x_noisy, cond["c_img"], t, cond["c_txt"], cond.get("c_ycbcr"))
    if control_scales is not None:
        if len(control_scales) != len(control):
            raise ValueError(f"control_scales has {len(control_scales)} entries, ControlNet gives {len(control)}")
        control = [c * s for c, s in zip(control, control_scales)]
    return unet(x_noisy, t, cond["c_txt"], control)


class ControlLDM(nn.Module):
    """eps = forward(x_noisy (B,4,h,w) scaled latent, t (B,), cond from :meth:`prepare_condition`).

    ``unet``, ``vae`` and ``clip`` are frozen: no gradients, and they stay in eval mode under ``.train()``.
    Only ``controlnet`` (and an optional ``text_processor``) train.
    """

    def __init__(self, unet_cfg: Mapping, vae_cfg: Mapping, clip_cfg: Mapping, controlnet_cfg: Mapping,
                 latent_scale_factor: float = 0.18215, control_scales: list[float] | None = None,
                 text_processor_cfg: Mapping | None = None):
        super().__init__()
        self.unet = instantiate_from_config(unet_cfg)
        self.vae = instantiate_from_config(vae_cfg)
        self.clip = instantiate_from_config(clip_cfg)
        self.controlnet = instantiate_from_config(controlnet_cfg)
        self.text_processor = instantiate_from_config(text_processor_cfg) if text_processor_cfg else None
        self.scale_factor = latent_scale_factor
        self.control_scales = list(control_scales) if control_scales is not None else None
        for module in (self.unet, self.vae, self.clip):
            module.eval()
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "ControlLDM":
        super().train(mode)
        for module in (self.unet, self.vae, self.clip):
            module.eval()
        return self

    # ------------------------------------------------------------------ loading
    def load_pretrained_sd(self, sd: Mapping[str, torch.Tensor]) -> tuple[set[str], set[str]]:
        """Load an LDM state dict into unet/vae/clip. Returns (unused checkpoint keys, missing model keys).

        Missing keys carry their LDM prefix (``model.diffusion_model.*`` etc.); a shape mismatch raises
        :class:`CheckpointError` naming the key and both shapes.
        """
        unused = {k for k in sd if not any(k.startswith(p) for p in SD_PREFIXES.values())}
        missing: set[str] = set()
        for name, prefix in SD_PREFIXES.items():
            module: nn.Module = getattr(self, name)
            part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            check_shapes(module, part, source=f"SD checkpoint ({prefix}*)")
            result = module.load_state_dict(part, strict=False)
            missing |= {prefix + k for k in result.missing_keys}
            unused |= {prefix + k for k in result.unexpected_keys}
        return unused, missing

    def load_controlnet_from_ckpt(self, sd: Mapping[str, torch.Tensor]) -> list[str]:
        """Strictly load a flat ControlNet state dict (published ``stage1.pt``/``stage2.pt`` or ours).

        With YCbCr fusion enabled, a checkpoint without any ``ycbcr.*`` key (a published one) loads into the base
        part and the fusion modules keep their identity init; the skipped keys are returned. Otherwise strict.
        """
        sd = dict(sd)
        processor_sd = {k[len("text_processor."):]: sd.pop(k) for k in list(sd) if k.startswith("text_processor.")}
        check_shapes(self.controlnet, sd, source="ControlNet checkpoint")
        own = set(self.controlnet.state_dict())
        missing = sorted(own - set(sd))
        unexpected = sorted(set(sd) - own)
        published_into_fusion = (not any(k.startswith(FUSION_PREFIX) for k in sd)
                                 and all(k.startswith(FUSION_PREFIX) for k in missing))
        if unexpected or (missing and not published_into_fusion):
            raise CheckpointError(
                f"ControlNet checkpoint does not match the model: {len(missing)} missing "
                f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})"
            )
        self.controlnet.load_state_dict(sd, strict=not missing)
        if processor_sd:
            if self.text_processor is None:
                raise CheckpointError("checkpoint has text_processor.* weights but the config has no text processor")
            self.text_processor.load_state_dict(processor_sd, strict=True)
        return missing

    @torch.no_grad()
    def load_controlnet_from_unet(self) -> tuple[set[str], set[str]]:
        """Initialise the ControlNet from the UNet (its encoder and middle block).

        Every UNet tensor whose name exists in the ControlNet is copied; where only the input-channel dimension is
        larger (first conv: latent + condition latent), the UNet weights fill the first channels and the extra
        channels are zero. Returns (zero-extended keys, keys initialised from scratch).
        """
        unet_sd = self.unet.state_dict()
        init_sd = self.controlnet.state_dict()
        extended, scratch = set(), set()
        for key, target in init_sd.items():
            source = unet_sd.get(key)
            if source is None:
                scratch.add(key)
            elif source.shape == target.shape:
                init_sd[key] = source.clone()
            elif source.ndim == target.ndim and source.shape[0] == target.shape[0] and \
                    source.shape[2:] == target.shape[2:] and source.shape[1] < target.shape[1]:
                grown = torch.zeros_like(target)
                grown[:, : source.shape[1]] = source
                init_sd[key] = grown
                extended.add(key)
            else:
                raise CheckpointError(f"cannot copy UNet '{key}' {tuple(source.shape)} into ControlNet "
                                      f"{tuple(target.shape)}")
        self.controlnet.load_state_dict(init_sd, strict=True)
        return extended, scratch

    def sd_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen modules in the SD checkpoint layout (the inverse of :meth:`load_pretrained_sd`): UNet, VAE and
        text-encoder tensors under their LDM prefixes (:data:`SD_PREFIXES`)."""
        return {prefix + k: v for name, prefix in SD_PREFIXES.items()
                for k, v in getattr(self, name).state_dict().items()}

    def controlnet_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights in the release format: flat ControlNet keys (+ ``text_processor.*`` when enabled)."""
        sd = dict(self.controlnet.state_dict())
        if self.text_processor is not None:
            sd.update({f"text_processor.{k}": v for k, v in self.text_processor.state_dict().items()})
        return sd

    # ------------------------------------------------------------------ VAE / text
    def vae_encode(self, img_pm1: torch.Tensor, sample: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """img_pm1: (B,3,H,W) in [-1,1] -> scaled latent (B,4,H/8,W/8); posterior mode when ``sample`` is False."""
        posterior = self.vae.encode(img_pm1.to(self.vae.quant_conv.weight.dtype))
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: scaled latent (B,4,h,w) -> image (B,3,8h,8w) in ~[-1,1] (not clamped)."""
        return self.vae.decode(z.to(self.vae.post_quant_conv.weight.dtype) / self.scale_factor)

    def encode_text(self, prompts: list[str], fog_feats: torch.Tensor | None = None,
                    process_text: bool = True) -> torch.Tensor:
        """prompts (B strings) -> (B,77,D) text embeddings, refined by the text processor when one is configured and
        ``process_text`` (False: the processor is skipped, e.g. before ``train.text_processor_start``)."""
        with torch.no_grad():
            c_txt = self.clip(prompts)
        if self.text_processor is not None and process_text:
            c_txt = self.text_processor(c_txt, fog_feats)
        return c_txt

    def prepare_condition(self, cond_img01: torch.Tensor, prompts: list[str],
                          fog_feats: torch.Tensor | None = None, c_img: torch.Tensor | None = None,
                          process_text: bool = True, is_cond: torch.Tensor | None = None) -> dict[str, Any]:
        """cond_img01: (B,3,H,W) in [0,1]. Returns ``c_txt`` (B,77,D), ``c_img`` (B,4,H/8,W/8) and, with YCbCr
        fusion, ``c_ycbcr`` (per-level features computed once per image).

        ``c_img`` may be given precomputed (e.g. a tiled VAE encoding of a large image); otherwise it is the
        posterior mode of ``vae_encode(cond_img01*2-1)``. ``process_text``: see :meth:`encode_text`. ``is_cond``:
        (B,) bool; samples with False get the unconditional branch (:meth:`image_condition`).
        """
        cond: dict[str, Any] = {"c_txt": self.encode_text(prompts, fog_feats, process_text)}
        cond.update(self.image_condition(cond_img01, c_img, is_cond))
        return cond

    def image_condition(self, cond_img01: torch.Tensor, c_img: torch.Tensor | None = None,
                        is_cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The image part of the condition: ``c_img`` (B,4,H/8,W/8) and, with YCbCr fusion, ``c_ycbcr``.

        The one rule of the unconditional branch (published: the stage-1 real photos in training and the second
        branch of the stage-1 sampler's blend): for samples whose ``is_cond`` (B,) bool is False the condition image
        is all zero and the condition latent is zero (not the encoding of a black image); the YCbCr features are
        those of the all-zero image. cond_img01: (B,3,H,W) in ~[0,1]; c_img: precomputed latent or None.
        """
        keep = None if is_cond is None else is_cond.to(cond_img01.device).view(-1, 1, 1, 1)
        if keep is not None:
            cond_img01 = torch.where(keep, cond_img01, torch.zeros((), dtype=cond_img01.dtype, device=keep.device))
        if c_img is None:
            with torch.no_grad():
                c_img = self.vae_encode(cond_img01 * 2 - 1, sample=False)
        if keep is not None:
            c_img = c_img * keep.to(device=c_img.device, dtype=c_img.dtype)
        out = {"c_img": c_img}
        if self.controlnet.ycbcr is not None:
            out["c_ycbcr"] = self.controlnet.ycbcr.encode(cond_img01)
        return out

    def unconditional(self, cond: Mapping[str, Any], cond_img01: torch.Tensor) -> dict[str, Any]:
        """The unconditional branch of a :meth:`prepare_condition` result for the condition images cond_img01
        (B,3,H,W): the same text embedding, the image part of :meth:`image_condition` with every ``is_cond`` False."""
        no_image = torch.zeros(cond_img01.shape[0], dtype=torch.bool, device=cond_img01.device)
        return {**cond, **self.image_condition(cond_img01, torch.zeros_like(cond["c_img"]), no_image)}

    # ------------------------------------------------------------------ denoiser
    def forward(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """Predicted eps (or v) (B,4,h,w) float32 for scaled noisy latents at integer timesteps t (B,)."""
        return controlled_denoise(self.unet, self.controlnet, self.control_scales, x_noisy, t, cond)

    def set_channels_last(self, enabled: bool) -> "ControlLDM":
        """Store the UNet and ControlNet conv weights channels-last (NHWC) or back in the default layout.

        Convolutions then produce NHWC activations, which oneDNN / cuDNN run faster, and the transformer blocks'
        (B,C,H,W) <-> (B,H·W,C) reshapes become views instead of copies. Values are unchanged up to float rounding.
        """
        layout = torch.channels_last if enabled else torch.contiguous_format
        for module in (self.unet, self.controlnet):
            module.to(memory_format=layout)
        return self

    def set_weight_packing(self, enabled: bool) -> "ControlLDM":
        """Let the UNet and ControlNet convolutions reuse oneDNN-packed weights in fp32 CPU inference
        (``model.unet.Conv2d``); off frees the packed copies. No effect on CUDA or under autograd."""
        for module in (self.unet, self.controlnet):
            for sub in module.modules():
                if isinstance(sub, Conv2d):
                    sub.set_weight_packing(enabled)
        return self

    def cast_denoiser(self, dtype: torch.dtype) -> "ControlLDM":
        """Run UNet + ControlNet in ``dtype`` (fp16/bf16) with every GroupNorm's parameters kept in float32
        (GroupNorm32 also computes in float32). The VAE and text encoder stay float32."""
        for module in (self.unet, self.controlnet):
            module.to(dtype)
            for sub in module.modules():
                if isinstance(sub, GroupNorm32):
                    sub.float()
        return self
