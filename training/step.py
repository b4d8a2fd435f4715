"""One training micro-step of ControlLDM: the published loss plus the HCD-YC extension terms.

Published ("Learning Hazing to Dehazing", CVPR 2025; DiffBIR-style ControlNet training), both stages:

    z0   = vae_encode(target_pm1)                     sampled posterior, frozen VAE
    cond = prepare_condition(condition01, prompts)   unconditional branch where is_cond is False (stage-1 real photos)
    t ~ U{0..T-1},  eps ~ N(0, I),  loss = || eps_theta(z_t, t, cond) - eps ||^2

HCD-YC extensions (issues 6, 10; none are in the paper), computed in the same step, with gradients:

* hierarchical cycle consistency: x̂0 (``model.gaussian_diffusion.predict_x0``, ε or v) from the model's own output,
  decoded by the
  frozen VAE decoder (activation checkpointing, optional random latent crop ``cycle_crop``) and scored by
  :class:`losses.cycle.HierarchicalCycleLoss` in both physical directions (forward = dehazing, compared in the clean
  domain; backward = hazing, compared in the hazy domain), with the true t and A of stage-1 synthetic samples
  (``batch["transmission"]``, ``batch["airlight"]``; stage 1 on conditional samples only) and a t fitted from the pair
  in stage 2, per-region weights ``region_*_weight``, density-adapted by ρ from :func:`haze.fog.analyze_fog` of the
  hazy image, warm-up ``cycle_start_step`` and linear ramp ``cycle_ramp_steps``;
* text processor: from ``text_processor_start`` on (identity before), the fog feature vector of the hazy image is
  passed to ``prepare_condition`` as ``fog_feats``;
* text-image alignment: InfoNCE between EOT-pooled (processed) text tokens and a trainable
  :class:`losses.alignment.ImageEmbedder` of the image each prompt describes (:meth:`TrainingStep.alignment_images`), with
  the negatives of every process (``gather_with_local_grad``), ramped to its weight at ``text_align_max_step``;
  skipped (``logs["align_skipped"]`` = 1) when all prompts of the global micro-batch are identical;
  ``logs["align_pairs"]`` = the number of pairs it ran on;
* dynamic prompts: from ``dynamic_prompt_start`` on, per-sample prompts from :mod:`haze.prompts`.

The hazy image analysed for ρ, fog features and prompts is ``batch["hazy_ref"]``: the condition in stage 2, the
hazy target in stage 1 (both datasets provide it).
"""
from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from losses.alignment import ImageEmbedder, gather_with_local_grad, info_nce
from losses.cycle import HierarchicalCycleLoss
from losses.schedules import alignment_schedule, cycle_schedule
from losses.vgg import VGGFeatures
from model.cldm import ControlLDM
from model.conditioning import FogCondition, fog_aware_condition
from model.gaussian_diffusion import Diffusion
from model.text_processor import pooled
from training.settings import ExtensionSettings

ALIGN_SKIP_REASON = ("text-image alignment loss skipped: all prompts of the micro-batch (all processes) are "
                     "identical, so InfoNCE has no negatives (enable train.use_dynamic_prompt; it starts at "
                     "train.dynamic_prompt_start)")


def build_cycle_loss(ext: ExtensionSettings, allow_random_vgg: bool = False) -> HierarchicalCycleLoss | None:
    """The cycle loss of ``ext`` (None when ``cycle_weight`` is 0).

    VGG-16 (feature: relu1_2/2_2/3_3/4_3, semantic: pooled relu5_3) is only built when its weights are needed;
    ``train.vgg_path`` must then name torchvision's VGG-16 state dict. ``allow_random_vgg`` (tests and benchmarks
    only) permits random weights when ``vgg_path`` is null.
    """
    if not ext.cycle_enabled:
        return None
    vgg = None
    if ext.feature_weight != 0 or ext.semantic_weight != 0:
        if ext.vgg_path is None and not allow_random_vgg:
            raise ValueError("train.cycle_weight > 0 with feature/semantic levels needs train.vgg_path: torchvision's "
                             "VGG-16 weights 'vgg16-397923af.pth' (https://download.pytorch.org/models/"
                             "vgg16-397923af.pth); or set train.feature_weight=0 and train.semantic_weight=0")
        if ext.vgg_path is not None and not Path(ext.vgg_path).is_file():
            raise FileNotFoundError(f"train.vgg_path: VGG-16 weights not found: {ext.vgg_path} (download "
                                    "https://download.pytorch.org/models/vgg16-397923af.pth)")
        layers = ("relu1_2", "relu2_2", "relu3_3", "relu4_3") if ext.feature_weight != 0 else ()
        vgg = VGGFeatures(ext.vgg_path, layers=layers, semantic_layer="relu5_3" if ext.semantic_weight != 0 else None,
                          allow_random_init=ext.vgg_path is None)
    return HierarchicalCycleLoss(
        vgg, pixel_weight=ext.pixel_weight, feature_weight=ext.feature_weight, semantic_weight=ext.semantic_weight,
        forward_weight=ext.forward_weight, backward_weight=ext.backward_weight,
        timestep_mode=ext.cycle_timestep_mode, max_t=ext.cycle_max_t, region_weights=ext.region_weights,
    )


def latent_window(h: int, w: int, crop: int | None, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """Random (top, left, height, width) latent window of side ``crop`` (whole latent when crop is None/too big)."""
    if crop is None or (crop >= h and crop >= w):
        return 0, 0, h, w
    ch, cw = min(crop, h), min(crop, w)
    device = generator.device if generator is not None else None
    top = int(torch.randint(0, h - ch + 1, (1,), generator=generator, device=device))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=generator, device=device))
    return top, left, ch, cw


class TrainingStep(nn.Module):
    """Loss of one micro-batch for a ControlLDM (see module docstring).

    Registered submodules are exactly the trainable parts — ``controlnet`` (with YCbCr fusion when configured),
    ``text_processor`` and ``image_embedder`` when enabled — so ``parameters()``, ``state_dict()``, DDP and the
    optimizer see only them. The frozen ControlLDM, the diffusion schedule and the cycle loss (frozen VGG) are plain
    attributes; :meth:`to_device` moves everything.

    Batch keys (collated dataset samples): ``target`` (B,3,H,W) in [-1,1], ``condition`` (B,3,H,W) in [0,1],
    ``is_cond`` (B,) bool, ``prompt`` list of B str, ``hazy_ref`` (B,3,H,W) in [0,1]; stage 1 with the cycle loss
    also ``transmission`` (B,1,H,W) and ``airlight`` (B,3) (``dataset.HybridTrainingData``).
    """

    def __init__(self, ldm: ControlLDM, diffusion: Diffusion, stage: int, ext: ExtensionSettings,
                 cycle_loss: HierarchicalCycleLoss | None = None, image_embedder: ImageEmbedder | None = None):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if ext.cycle_enabled and cycle_loss is None:
            raise ValueError("cycle_weight > 0 needs a cycle_loss (build_cycle_loss)")
        if ext.align_enabled and image_embedder is None:
            raise ValueError("text_align_weight > 0 needs an image_embedder")
        self.controlnet = ldm.controlnet
        self.text_processor = ldm.text_processor
        self.image_embedder = image_embedder if ext.align_enabled else None
        object.__setattr__(self, "ldm", ldm)
        object.__setattr__(self, "diffusion", diffusion)
        object.__setattr__(self, "cycle_loss", cycle_loss if ext.cycle_enabled else None)
        self.stage = stage
        self.ext = ext
        if ext.cycle_enabled or ext.align_enabled:
            ldm.vae.decoder.use_checkpoint = True

    def to_device(self, device: torch.device | str) -> "TrainingStep":
        """Move the trainable and the frozen parts to ``device``."""
        for part in (self.ldm, self.diffusion, self.cycle_loss):
            if part is not None:
                part.to(device)
        return self.to(device)

    # ------------------------------------------------------------------ conditioning
    def uses_dynamic_prompts(self, step: int) -> bool:
        """Whether per-sample fog-analyser prompts replace the dataset prompt at this step."""
        return self.ext.use_dynamic_prompt and step >= self.ext.dynamic_prompt_start

    def uses_text_processor(self, step: int) -> bool:
        """Whether the text processor refines the text condition at this step (identity before
        ``text_processor_start``)."""
        return self.text_processor is not None and step >= self.ext.text_processor_start

    def condition(self, batch: Mapping[str, Any], step: int, prompt_rng: random.Random | None = None
                  ) -> FogCondition:
        """Text/image condition of a batch (:func:`model.conditioning.fog_aware_condition` of ``hazy_ref``) ->
        (cond, prompts used, fog analysis of ``hazy_ref`` or None).

        Samples with ``is_cond`` False get the model's unconditional branch (published stage-1 real photos).
        """
        return fog_aware_condition(self.ldm, batch["condition"], batch["hazy_ref"], batch["prompt"], self.stage,
                                   dynamic_prompt=self.uses_dynamic_prompts(step),
                                   process_text=self.uses_text_processor(step), analyse=self.ext.cycle_enabled,
                                   prompt_rng=prompt_rng, is_cond=batch["is_cond"])

    def alignment_images(self, batch: Mapping[str, Any], pred01: torch.Tensor | None) -> torch.Tensor:
        """The image each prompt describes, (B,3,H,W) in [0,1], for the InfoNCE alignment.

        Prompts (dataset or :mod:`haze.prompts`) describe the haze of the analysed hazy image ``hazy_ref``:
        * stage 1: the haze to generate. The prompt is aligned with the decoded prediction ``pred01`` (x̂0 of the
          hazy target): the generated haze should be the one the text names, and the loss trains the ControlNet,
          the text processor and the encoder.
        * stage 2: the haze of the input ("remove dense, patchy haze ..."); the prediction is meant to be haze-free,
          so the density and type the prompt names are not visible in it and aligning with it would reward leaving
          haze in. The prompt is aligned with the hazy condition it describes (``batch["condition"]``): the loss
          trains the text processor (and the encoder) to make the conditioning text match that image's haze, which
          the ControlNet then reads through the diffusion loss; it sends no gradient to the ControlNet itself.
        """
        if self.stage == 1:
            if pred01 is None:
                raise ValueError("stage-1 alignment needs the decoded prediction")
            return pred01
        return batch["condition"].float()

    # ------------------------------------------------------------------ loss
    def forward(self, batch: Mapping[str, Any], step: int, generator: torch.Generator | None = None,
                prompt_rng: random.Random | None = None) -> dict[str, Any]:
        """Loss of one micro-batch at optimizer step ``step`` (0-based; drives the schedules).

        ``generator`` draws the VAE posterior sample, t, the noise and the cycle crop; ``prompt_rng`` the dynamic
        prompt wording. Returns ``{"loss": scalar, "terms": {name: weighted scalar with grad}, "logs": {name:
        detached scalar}}``; ``loss`` is the sum of ``terms``.
        """
        target_pm1 = batch["target"]
        cond, prompts, infos = self.condition(batch, step, prompt_rng)
        with torch.no_grad():
            z0 = self.ldm.vae_encode(target_pm1, sample=True, generator=generator).float()
        b = z0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), generator=generator, device=z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        out = self.diffusion.training_outputs(self.ldm, z0, t, cond, noise)
        terms: dict[str, torch.Tensor] = {"diffusion": out["loss"]}
        logs: dict[str, torch.Tensor] = {"loss_diffusion": out["loss"].detach()}

        ext = self.ext
        cycle_factor = ext.cycle_weight * cycle_schedule(step, ext.cycle_start_step, ext.cycle_ramp_steps)
        align_factor = ext.text_align_weight * alignment_schedule(step, ext.text_align_max_step)
        if align_factor > 0:
            codes = torch.tensor([zlib.crc32(p.encode()) for p in prompts], device=z0.device, dtype=torch.int64)
            all_codes, _ = gather_with_local_grad(codes)
            align_skipped = bool((all_codes == all_codes[0]).all())
            logs["align_skipped"] = z0.new_full((), float(align_skipped))
            logs["align_pairs"] = z0.new_full((), 0.0 if align_skipped else float(all_codes.numel()))
            logs["loss_align"] = z0.new_zeros(())
            if align_skipped:
                align_factor = 0.0
        if cycle_factor > 0 or (align_factor > 0 and self.stage == 1):
            a_t = self.diffusion.alphas_cumprod[t]
            x0_hat = self.diffusion.predict_x0(out["x_noisy"].float(), t, out["model_out"].float())
            top, left, h, w = latent_window(*x0_hat.shape[-2:], self.ext.cycle_crop, generator)
            f = self.ldm.vae.downscale
            px = (slice(None), slice(None), slice(top * f, (top + h) * f), slice(left * f, (left + w) * f))
            pred01 = (self.ldm.vae_decode(x0_hat[:, :, top:top + h, left:left + w]).float() + 1.0) / 2.0
        if cycle_factor > 0:
            rho = torch.tensor([info.density for info in infos], device=z0.device)
            known = {}
            if self.stage == 1:  # the loss names the missing keys when a dataset does not provide them
                t_true, a_true = batch.get("transmission"), batch.get("airlight")
                known = {"transmission": None if t_true is None else t_true.float()[px],
                         "airlight": None if a_true is None else a_true.float()}
            cycle, cycle_logs = self.cycle_loss(
                self.stage, pred01, ((target_pm1.float() + 1.0) / 2.0)[px], batch["condition"].float()[px],
                a_t, rho=rho, timesteps=t, sample_mask=batch["is_cond"] if self.stage == 1 else None, **known)
            terms["cycle"] = cycle_factor * cycle
            logs.update(cycle_logs)
        if align_factor > 0:
            tokens = self.ldm.clip.tokenize(prompts).to(z0.device)
            text_emb = pooled(cond["c_txt"].float(), tokens)
            img_emb = self.image_embedder(self.alignment_images(batch, pred01 if self.stage == 1 else None))
            all_text, offset = gather_with_local_grad(text_emb)
            all_img, _ = gather_with_local_grad(img_emb)
            align = info_nce(text_emb, img_emb, self.ext.text_align_temperature, all_text, all_img, offset)
            terms["align"] = align_factor * align
            logs["loss_align"] = align.detach()
        loss = sum(terms.values())
        logs["loss"] = loss.detach()
        return {"loss": loss, "terms": terms, "logs": logs}


def trainable_parameters(step: TrainingStep) -> list[nn.Parameter]:
    """Parameters the optimizer updates: ControlNet (+ fusion), text processor, image embedder."""
    return [p for p in step.parameters() if p.requires_grad]


def image_embedder_for(ldm: ControlLDM, ext: ExtensionSettings) -> ImageEmbedder | None:
    """The trainable alignment image encoder (output width = text token width), or None when alignment is off."""
    if not ext.align_enabled:
        return None
    return ImageEmbedder(dim=int(ldm.clip.model.transformer.width), width=ext.align_embed_width)
