"""The loaded model of an inference run (:class:`DiffusionRunner`): device, precision, sampler, schedule, the (tiled)
encode/decode/denoise functions and the per-image condition and seeded initial noise (:class:`SamplingStart`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from model.builder import build_model
from model.cldm import ControlLDM
from model.conditioning import fog_aware_condition
from model.gaussian_diffusion import Diffusion
from model.onestep import merge_adapter_file
from model.unet import Conv2d
from pipelines.batching import stack_conditions
from pipelines.geometry import Geometry, from_model_output, plan_geometry, to_model_input
from pipelines.settings import InferenceSettings
from pipelines.tiling import TiledDenoiser, tiled_apply, tiled_vjp
from sampler.registry import make_sampler
from sampler.spaced import make_spaced_schedule
from utils.common import choose_dtype
from utils.distributed import process_device
from utils.image_io import image_hw


@dataclass(frozen=True)
class SamplingStart:
    """What a sampler needs for B images of one padded size Hp×Wp (:meth:`DiffusionRunner.start_batch`).

    inputs: (B,3,Hp,Wp) padded model inputs in ~[0,1] (the bicubic upscale may overshoot slightly), the AccSamp
    hazy image; geoms: B :class:`Geometry` plans, to crop/resize the results back; cond: the condition dict of
    :meth:`model.cldm.ControlLDM.prepare_condition`, tensors stacked along the batch (c_txt (B,77,D), c_img
    (B,4,Hp/8,Wp/8) scaled latent, ...); generators: B generators, image b's noise comes from generator b alone;
    x_T: (B,4,Hp/8,Wp/8) standard normal initial latent, row b drawn from generators[b].
    """

    inputs: torch.Tensor
    geoms: list[Geometry]
    cond: dict
    generators: list[torch.Generator]
    x_T: torch.Tensor


class DiffusionRunner:
    """The model, schedule, sampler, device/precision and (tiled) encode/decode/denoise functions for one config.

    ``sample`` is the sampling function chosen by ``inference.sampler`` (``spaced`` default, ``ddim`` with
    ``inference.eta``, ``dpmpp_2m``), on the schedule of ``inference.steps`` steps spaced by ``inference.spacing``.

    Denoiser speed settings (``benchmarks/bench_step.py`` measures them): ``inference.channels_last`` (default
    true) stores the UNet/ControlNet conv weights NHWC; ``inference.pack_weights`` (default true; fp32 CPU only)
    lets their convolutions reuse oneDNN-packed weights (one more copy of the conv weights in memory);
    ``inference.compile`` (default false) wraps both in ``torch.compile`` (the first step of each new latent size
    compiles, which takes minutes).
    """

    def __init__(self, cfg: DictConfig, settings: InferenceSettings,
                 built: tuple[ControlLDM, Diffusion] | None = None, adapter_path: str | None = None):
        """``built``: the model and schedule already built (the benchmarks pass full-size random weights); None
        (the scripts): built from the weight files ``inference.sd_path`` / ``inference.controlnet_path``.
        ``adapter_path``: a one-step adapter file merged into the model at load (``inference_onestep``), whose
        timestep t* becomes ``onestep_timestep``; None otherwise."""
        inf = settings
        self.device = process_device(inf.device)
        self.dtype = choose_dtype(inf.precision, self.device)
        if built is None:
            inf.weight_paths()  # InferenceSettingsError unless both weight files are named
            built = build_model(cfg.model, inf.sd_path, inf.controlnet_path, "inference.sd_path")
        self.model, self.diffusion = built
        self.onestep_timestep: int | None = None
        if adapter_path is not None:
            self.load_adapters(adapter_path)
        self.model.eval().to(self.device)
        if self.dtype != torch.float32:
            self.model.cast_denoiser(self.dtype)
        self.model.set_channels_last(inf.channels_last).set_weight_packing(inf.pack_weights)
        if inf.compile:
            self.model.unet.compile()
            self.model.controlnet.compile()
        self.configure(cfg, settings)

    def load_adapters(self, path: str) -> None:
        """Merge the one-step adapter file at ``path`` into the model and keep its timestep t* as
        ``onestep_timestep``. Packed CPU conv weights made before are dropped (they hold the unmerged weights)."""
        self.onestep_timestep = merge_adapter_file(self.model, path)
        packing = [m for m in self.model.modules() if isinstance(m, Conv2d) and m.pack_weights]
        for conv in packing:
            conv.set_weight_packing(False)
            conv.set_weight_packing(True)

    def configure(self, cfg: DictConfig, settings: InferenceSettings) -> None:
        """Adopt the per-run settings (steps, tiling, prompt ...; ``settings`` read from ``cfg`` by the caller) for
        the loaded model; app.py calls this between runs with another mode's or slider's settings (same model
        section and weights). InferenceSettingsError when ``inference.steps`` exceeds the model's timesteps."""
        settings.check_timesteps(len(self.diffusion.alphas_cumprod_np))
        self.cfg = cfg
        self.settings = inf = settings
        self.sample = make_sampler(inf.sampler, inf.eta)
        self.schedule = make_spaced_schedule(self.diffusion.alphas_cumprod_np, inf.steps, inf.spacing)
        self.parameterization = self.diffusion.parameterization
        self.tiled = inf.tiled
        self.tile_threshold = inf.tile_threshold
        self.latent_tile = (inf.latent_tile_size, inf.latent_tile_stride)
        self.vae_tile = (inf.vae_tile_size, inf.vae_tile_stride)

    def use_tiles(self, hw: tuple[int, int]) -> bool:
        if self.tiled == "auto":
            return max(hw) > self.tile_threshold
        return bool(self.tiled)

    def encode(self, img_pm1: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> scaled latent (posterior mode), tiled for large images."""
        fn = lambda x: self.model.vae_encode(x, sample=False)  # noqa: E731
        if self.use_tiles(img_pm1.shape[-2:]):
            return tiled_apply(fn, img_pm1, self.vae_tile[0], self.vae_tile[1], 1 / 8)
        return fn(img_pm1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """scaled latent (B,4,h,w) -> image (B,3,8h,8w) in ~[-1,1], tiled for large images."""
        if self.use_tiles((z.shape[-2] * 8, z.shape[-1] * 8)):
            return tiled_apply(self.model.vae_decode, z, self.vae_tile[0] // 8, self.vae_tile[1] // 8, 8)
        return self.model.vae_decode(z)

    def decode_vjp(self, z: torch.Tensor, grad_img: torch.Tensor) -> torch.Tensor:
        """(∂decode/∂z)ᵀ grad_img one VAE tile at a time, so guided steps on large images keep the memory of a tile."""
        return tiled_vjp(self.model.vae_decode, z, grad_img, self.vae_tile[0] // 8, self.vae_tile[1] // 8, 8)

    def guidance_vjp(self, latent_hw: tuple[int, int]) -> Callable | None:
        """The tiled pull-back for images decoded in tiles; None (plain autograd) otherwise."""
        return self.decode_vjp if self.use_tiles((latent_hw[0] * 8, latent_hw[1] * 8)) else None

    def denoiser(self, latent_hw: tuple[int, int]) -> Callable:
        if self.use_tiles((latent_hw[0] * 8, latent_hw[1] * 8)):
            return TiledDenoiser(self.model, *self.latent_tile)
        return self.model

    def condition(self, cond01: torch.Tensor, img01: torch.Tensor, stage: int) -> dict:
        """Text embedding and condition latent, computed once per image (not per step).

        cond01: padded model input (1,3,Hp,Wp) in ~[0,1] (the upscale's overshoot is kept); img01: the original
        image (3,H,W) in [0,1], analysed by the fog analyser for dynamic prompts (``inference.dynamic_prompt``) and
        for the text processor's modulation.
        """
        with torch.no_grad():
            return fog_aware_condition(self.model, cond01, img01[None].to(self.device),
                                       [str(self.settings.prompt)] * cond01.shape[0], stage,
                                       dynamic_prompt=self.settings.dynamic_prompt,
                                       c_img=self.encode(cond01 * 2 - 1)).cond

    def geometry(self, h: int, w: int) -> Geometry:
        """The resize/pad plan of an (h, w) image: ``inference.min_short_side`` (published: 512) and
        ``inference.pad_multiple`` (64) set it."""
        inf = self.settings
        return plan_geometry(h, w, min_short=inf.min_short_side, multiple=inf.pad_multiple, max_pixels=inf.max_pixels)

    def batch_key(self, path: Path) -> tuple[int, int] | None:
        """Padded size of the image file (from its header): images with equal keys can be sampled together."""
        hw = image_hw(path)
        try:
            return None if hw is None else self.geometry(*hw).padded_hw
        except ValueError:
            return None

    def prepare(self, img01: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        """(3,H,W) in [0,1] -> padded model input (1,3,Hp,Wp) on the device, and its geometry."""
        geom = self.geometry(*img01.shape[-2:])
        return to_model_input(img01, geom).to(self.device), geom

    def start(self, img01: torch.Tensor, stage: int, seed: int, fog01: torch.Tensor | None = None) -> SamplingStart:
        """Everything a sampler needs for one image (a :class:`SamplingStart` of batch 1): its padded input,
        geometry, condition, and the initial noise from a generator seeded with ``seed``.

        img01: (3,H,W) in [0,1]; fog01: the image the fog analyser describes for dynamic prompts / the text
        processor, (3,H',W') in [0,1] (default ``img01``; HazeGen passes a hazy reference photo).
        """
        inp, geom = self.prepare(img01)
        cond = self.condition(inp, img01 if fog01 is None else fog01, stage)
        return SamplingStart(inp, [geom], cond, *self._seeded_noise(inp, seed))

    def start_batch(self, images01: list[torch.Tensor], stage: int, seed: int,
                    fog01: list[torch.Tensor] | None = None) -> SamplingStart:
        """:meth:`start` for B images of equal padded size, stacked along the batch; every image gets its own
        generator seeded with ``seed``, so it gets the noise it gets when sampled alone. ``fog01``: one fog image per
        input, or None."""
        starts = [self.start(img01, stage, seed, None if fog01 is None else fog01[b])
                  for b, img01 in enumerate(images01)]
        return SamplingStart(torch.cat([s.inputs for s in starts]), [s.geoms[0] for s in starts],
                             stack_conditions([s.cond for s in starts]), [s.generators[0] for s in starts],
                             torch.cat([s.x_T for s in starts]))

    def reseed(self, start: SamplingStart, seed: int) -> SamplingStart:
        """``start`` with fresh generators, one per image seeded with ``seed``, and the x_T drawn from them
        (HazeGen's variant k reuses the condition of variant 0 with seed + k)."""
        gens, x_T = self._seeded_noise(start.inputs, seed)
        return replace(start, generators=gens, x_T=x_T)

    def _seeded_noise(self, inputs: torch.Tensor, seed: int) -> tuple[list[torch.Generator], torch.Tensor]:
        """For inputs (B,3,Hp,Wp): B generators seeded with ``seed`` and x_T (B,4,Hp/8,Wp/8), row b from generator b."""
        gens = [self.generator(seed) for _ in range(inputs.shape[0])]
        latent_shape = (1, 4, inputs.shape[-2] // 8, inputs.shape[-1] // 8)
        return gens, torch.cat([self.initial_noise(latent_shape, gen) for gen in gens])

    def finish(self, z: torch.Tensor, geom: Geometry) -> torch.Tensor:
        """Final latent (1,4,h,w) -> (3,H,W) image in [0,1] at the original size."""
        with torch.no_grad():
            return from_model_output(self.decode(z) * 0.5 + 0.5, geom).cpu()

    def finish_batch(self, z: torch.Tensor, geoms: list[Geometry]) -> list[torch.Tensor]:
        """Final latents (B,4,h,w) -> B images (3,H,W) in [0,1], decoded one at a time (the VAE decoder's memory
        stays that of one image, and each result equals the unbatched decode)."""
        return [self.finish(z[b: b + 1], geom) for b, geom in enumerate(geoms)]

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def initial_noise(self, latent_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(latent_shape, generator=generator, device=self.device)
