"""Pretraining of the prior that SD-2.1 normally provides, for the CPU-sized model family (beyond the paper).

The published method starts both stages from the released SD-2.1-base weights. Those cannot be had offline, and the
mini model of ``configs/mini/model.yaml`` has none, so :func:`train_prior` makes them from clean photos, in two phases:

1. **VAE**: the KL autoencoder trained as in LDM minus its downloaded parts: L1 reconstruction of clean crops in
   [-1,1] (``vae_crop_size``: the VAE is convolutional, so small crops train it at a fraction of the cost) plus
   ``kl_weight`` x the KL of the posterior to N(0, I) (no LPIPS network, no discriminator). The trained VAE is then
   *rescaled* (:func:`rescale_latents`) so that its posterior means, multiplied by the model's fixed
   ``latent_scale_factor`` (SD's 0.18215), have unit standard deviation on the training crops: the encoder's mean
   output is multiplied by c and the decoder's first 1x1 conv divided by c (the log-variance shifted by 2 ln c),
   which leaves every decoded image unchanged.
2. **UNet**: a latent diffusion model on the scaled clean latents with the model's own schedule and parameterisation
   (:class:`model.gaussian_diffusion.Diffusion`: t ~ U{0..T-1}, the eps MSE), conditioned on the frozen text encoder's
   embedding of ``prior.prompt`` (the text encoder stays at its random initialisation: it does not understand words).

The result is written in the layout of ``v2-1_512-ema-pruned.ckpt`` (``{"state_dict": {model.diffusion_model.*,
first_stage_model.*, cond_stage_model.*}}``) and loads through :func:`model.builder.build_model` like the real file.
Phase 1's weights are kept as ``<out>.vae.safetensors`` so a rerun skips the finished phase.

    python train_prior.py --config configs/mini/prior.yaml --set prior.clean_folder=... prior.out_path=...
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from dataset.checks import DataError
from dataset.clean import CleanCrops
from model.builder import cldm_config
from model.cldm import ControlLDM
from model.gaussian_diffusion import Diffusion
from model.vae import AutoencoderKL, DiagonalGaussian
from training.guard import EXIT_DIVERGED, nonfinite_keys
from utils.atomic import atomic_write
from utils.common import instantiate_from_config, load_config, seed_everything
from utils.rules import Rule, first_violation, is_int, is_number

log = logging.getLogger("hcdyc.prior")


@dataclass(frozen=True)
class PriorSettings:
    """The ``prior.*`` keys (defaults: the mini chain's)."""

    clean_folder: str
    out_path: str
    crop_size: int = 64
    vae_crop_size: int = 32
    scale_range: tuple[float, float] = (0.25, 1.0)
    batch_size: int = 16
    vae_batch_size: int = 8
    vae_steps: int = 1000
    vae_lr: float = 5e-4
    kl_weight: float = 1e-6
    unet_steps: int = 1200
    unet_lr: float = 5e-4
    prompt: str = ""
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming the ``prior.*`` key of the first bad value."""
        message = first_violation(self, PRIOR_RULES, "prior")
        if message is not None:
            raise ValueError(message)


PRIOR_RULES: tuple[Rule, ...] = (
    (("clean_folder", "out_path", "prompt"), lambda v: isinstance(v, str), "a string"),
    (("crop_size", "vae_crop_size"), lambda v: is_int(v) and v >= 8 and v % 8 == 0, "a multiple of 8"),
    (("batch_size", "vae_batch_size"), lambda v: is_int(v) and v > 0, "a positive integer"),
    (("vae_steps", "unet_steps"), lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    (("vae_lr", "unet_lr"), lambda v: is_number(v) and v > 0, "a number > 0"),
    (("kl_weight",), lambda v: is_number(v) and v >= 0, "a number >= 0"),
    (("scale_range",), lambda v: len(v) == 2 and all(is_number(x) for x in v) and 0 < v[0] <= v[1] <= 1,
     "[lo, hi] with 0 < lo <= hi <= 1"),
    (("seed",), is_int, "an integer"),
)


def read_settings(cfg: DictConfig) -> PriorSettings:
    """``cfg.prior`` -> validated :class:`PriorSettings`; ValueError naming an unknown, missing or bad key."""
    if "prior" not in cfg or "model" not in cfg:
        raise ValueError("a prior config needs a 'model' and a 'prior' section")
    section = OmegaConf.to_container(cfg.prior, resolve=True)
    known = {f.name for f in dataclasses.fields(PriorSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown prior.* keys {unknown}; known: {sorted(known)}")
    for key in ("clean_folder", "out_path"):
        if section.get(key) is None:
            raise ValueError(f"prior.{key} is required")
    if "scale_range" in section:
        section["scale_range"] = tuple(section["scale_range"])
    settings = PriorSettings(**section)
    settings.validate()
    return settings


# -------------------------------------------------------------------------------------------------------- losses
def kl_to_standard_normal(posterior: DiagonalGaussian) -> torch.Tensor:
    """Mean over the batch of KL(N(mean, var) || N(0, I)), summed over latent elements (LDM's convention). Zero
    exactly when mean = 0 and var = 1."""
    kl = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar)
    return kl.flatten(1).sum(1).mean()


def vae_loss(vae: AutoencoderKL, img_pm1: torch.Tensor, kl_weight: float,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """L1(decode(sample of encode(x)), x) + kl_weight * KL; img_pm1: (B,3,H,W) in [-1,1]. A perfect autoencoder with
    a standard-normal posterior has zero loss."""
    posterior = vae.encode(img_pm1)
    recon = vae.decode(posterior.sample(generator))
    rec = F.l1_loss(recon, img_pm1)
    kl = kl_to_standard_normal(posterior)
    return rec + kl_weight * kl, {"l1": rec.item(), "kl": kl.item()}


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, images_pm1: torch.Tensor, scale_factor: float) -> float:
    """Rescale ``vae`` in place so that ``scale_factor * posterior mean`` has unit std on ``images_pm1`` (B,3,H,W)
    in [-1,1]; decoded images are unchanged. Returns the factor c applied to the latent."""
    std = vae.encode(images_pm1).mean.std().item()
    c = 1.0 / (scale_factor * std)
    embed = vae.post_quant_conv.in_channels
    vae.quant_conv.weight[:embed] *= c
    vae.quant_conv.bias[:embed] *= c
    vae.quant_conv.bias[embed:] += 2.0 * math.log(c)
    vae.post_quant_conv.weight /= c
    return c


# ---------------------------------------------------------------------------------------------------------- loops
def _batches(data: CleanCrops, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of crops (B,3,S,S) in [-1,1]; epoch e reshuffles with seed (seed, e)."""
    epoch = 0
    while True:
        data.set_epoch(epoch)
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for batch in loader:
            yield batch["image"]
        epoch += 1


def cosine_lr(lr: float, step: int, total: int) -> float:
    """Half-cosine decay from ``lr`` at step 0 to 10 % of it at step ``total``."""
    return lr * (0.55 + 0.45 * math.cos(math.pi * step / max(1, total)))


def train_vae(vae: AutoencoderKL, data: CleanCrops, s: PriorSettings) -> None:
    """Phase 1 (module doc) for ``s.vae_steps`` AdamW steps."""
    from tqdm.auto import tqdm

    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed)
    batches = _batches(data, s.vae_batch_size, s.seed)
    bar = tqdm(range(s.vae_steps), desc="prior: VAE", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(s.vae_lr, step, s.vae_steps)
        loss, logs = vae_loss(vae, next(batches), s.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(l1=f"{logs['l1']:.4f}")
    vae.eval().requires_grad_(False)


def train_unet(ldm: ControlLDM, diffusion: Diffusion, data: CleanCrops, s: PriorSettings) -> None:
    """Phase 2 (module doc) for ``s.unet_steps`` AdamW steps on scaled clean latents."""
    from tqdm.auto import tqdm

    unet = ldm.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 1)
    batches = _batches(data, s.batch_size, s.seed + 1)
    with torch.no_grad():
        context = ldm.clip([s.prompt])
    bar = tqdm(range(s.unet_steps), desc="prior: UNet", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(s.unet_lr, step, s.unet_steps)
        with torch.no_grad():
            z0 = ldm.vae_encode(next(batches), sample=True, generator=gen)
        t = torch.randint(0, diffusion.num_timesteps, (z0.shape[0],), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        out = diffusion.training_outputs(lambda x, tt, c: unet(x, tt, c), z0, t,
                                         context.expand(z0.shape[0], -1, -1), noise)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        bar.set_postfix(loss=f"{out['loss'].item():.4f}")
    unet.eval().requires_grad_(False)


class PriorDiverged(RuntimeError):
    """A phase ended with non-finite weights; nothing of it was written."""


def require_finite(tensors: dict[str, torch.Tensor], phase: str) -> None:
    """PriorDiverged naming ``phase`` and a tensor when any of ``tensors`` holds a NaN or an infinity."""
    bad = nonfinite_keys(tensors)
    if bad:
        raise PriorDiverged(f"prior: the {phase} phase diverged ({len(bad)} tensors not finite, e.g. '{bad[0]}'); "
                            f"nothing of it was written, lower prior.{phase.lower()}_lr")


def save_sd_checkpoint(ldm: ControlLDM, path: str | Path) -> None:
    """``ldm``'s UNet / VAE / text encoder in the ``v2-1_512-ema-pruned.ckpt`` layout, written atomically."""
    state = {"state_dict": {k: v.detach().contiguous() for k, v in ldm.sd_state_dict().items()}}
    atomic_write(path, lambda handle: torch.save(state, handle))


def train_prior(cfg: DictConfig) -> Path:
    """Both phases (module doc) for the ``model`` and ``prior`` sections of ``cfg``; returns the checkpoint path."""
    from safetensors.torch import load_file, save_file

    s = read_settings(cfg)
    seed_everything(s.seed)
    ldm: ControlLDM = instantiate_from_config(cldm_config(cfg.model))
    diffusion: Diffusion = instantiate_from_config(cfg.model.diffusion)
    data = CleanCrops(s.clean_folder, s.crop_size, s.scale_range, seed=s.seed)
    vae_data = CleanCrops(s.clean_folder, s.vae_crop_size, s.scale_range, seed=s.seed)
    out = Path(s.out_path)
    vae_file = out.with_name(out.name + ".vae.safetensors")
    if vae_file.is_file():
        ldm.vae.load_state_dict(load_file(str(vae_file)))
        log.info("VAE phase already done: %s", vae_file)
    else:
        train_vae(ldm.vae, vae_data, s)
        probe = torch.stack([data[i]["image"] for i in range(min(len(data), 256))])
        require_finite(ldm.vae.state_dict(), "VAE")
        c = rescale_latents(ldm.vae, probe, ldm.scale_factor)
        log.info("VAE latents rescaled by %.4f (scaled latent std 1 at latent_scale_factor %g)", c, ldm.scale_factor)
        vae_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = vae_file.with_name("." + vae_file.name + ".tmp")
        save_file({k: v.contiguous() for k, v in ldm.vae.state_dict().items()}, str(tmp))
        tmp.replace(vae_file)
    ldm.vae.eval().requires_grad_(False)
    train_unet(ldm, diffusion, data, s)
    require_finite(ldm.unet.state_dict(), "UNet")
    save_sd_checkpoint(ldm, out)
    log.info("prior written: %s", out)
    return out


def main(default_config: str = "configs/mini/prior.yaml") -> None:
    """CLI of ``train_prior.py``: ``--config`` and ``--set prior.key=value ...``; exit 2 with one line for a bad
    config or data folder, 3 when a phase diverged (no non-finite weights are ever written)."""
    import argparse

    parser = argparse.ArgumentParser(description="Pretrain the mini prior (VAE, then UNet) on clean photos")
    parser.add_argument("--config", default=default_config, help="YAML with model and prior sections")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.set)
        read_settings(cfg)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        sys.exit(2)
    try:
        train_prior(cfg)
    except DataError as err:
        log.error("%s", err)
        sys.exit(2)
    except PriorDiverged as err:
        log.error("%s", err)
        sys.exit(EXIT_DIVERGED)
