"""What every inference script shares: argument parsing, weight checks, model building, the published
resize/pad geometry, the folder loop with skip-and-report, atomic outputs and the summary."""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from omegaconf import DictConfig
from tqdm.auto import tqdm

from sampler.spaced import make_spaced_schedule
from utils.checkpoint import WEIGHTS_HELP, load_state_dict
from utils.common import choose_device, choose_dtype, instantiate_from_config, load_config
from utils.image_io import ImageReadError, list_images, load_rgb01, resize01, save_png01
from utils.tiling import TiledDenoiser, tiled_apply, tiled_vjp

log = logging.getLogger("hcdyc")
EXIT_MISSING_WEIGHTS = 2
EXIT_BAD_CONFIG = 2
WEIGHT_KEYS = ("sd_path", "controlnet_path")  # inference.* weight files of every diffusion script

# A script's per-image function: process(img01 (3,H,W) in [0,1], stem, callback=None) -> {file name: (C,H,W) [0,1]};
# callback(info) receives the sampler's per-step dict ({"step", "index", "t", "x", "x0"}).
Process = Callable[..., dict[str, torch.Tensor]]


def parse_args(description: str, default_config: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config (model + inference sections)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set inference.tau=0.7 inference.seed=1")
    parser.add_argument("--skip-existing", action="store_true", help="skip images whose outputs already exist")
    parser.add_argument("--show-steps", action="store_true", help="also show a progress bar over sampling steps")
    return parser.parse_args()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")


def check_weights(paths: dict[str, str]) -> None:
    """Exit with status 2 and a clear message if a weight file is missing (before any heavy work)."""
    for key, path in paths.items():
        if not Path(path).is_file():
            log.error("weight file for '%s' not found: %s (%s)", key, path, WEIGHTS_HELP)
            sys.exit(EXIT_MISSING_WEIGHTS)


@dataclass(frozen=True)
class Geometry:
    """orig (H,W) -> resized (short side >= min_short) -> padded (multiples of ``multiple``)."""

    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]


def short_side_resized_hw(h: int, w: int, short: int) -> tuple[int, int]:
    """(H,W) of an (H,W) tensor after torchvision ``Resize(short)``, the published upscale.

    Computed by torchvision itself on a shape-only (meta) tensor, so its rule holds exactly: the short side (the
    width when ``w <= h``, squares included; the height otherwise) becomes ``short`` and the other side
    ``int(short · long / short_side)``, truncated (143×160 -> 512×572, not 573).
    """
    probe = torch.empty(1, h, w, device="meta")
    out = TF.resize(probe, [short], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return int(out.shape[-2]), int(out.shape[-1])


def plan_geometry(h: int, w: int, min_short: int = 512, multiple: int = 64, max_pixels: int | None = None) -> Geometry:
    """Published preprocessing: if the short side is below ``min_short``, upscale as torchvision
    ``Resize(min_short)`` does (:func:`short_side_resized_hw`), then pad right/bottom to multiples of ``multiple``.
    Raises ValueError above ``max_pixels``."""
    rh, rw = short_side_resized_hw(h, w, min_short) if min(h, w) < min_short else (h, w)
    ph, pw = -(-rh // multiple) * multiple, -(-rw // multiple) * multiple
    if max_pixels is not None and ph * pw > max_pixels:
        raise ValueError(f"{w}x{h} image becomes {pw}x{ph} after the published resize/pad, above "
                         f"inference.max_pixels={max_pixels}")
    return Geometry((h, w), (rh, rw), (ph, pw))


def to_model_input(img01: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(3,H,W) in [0,1] -> (1,3,Hp,Wp): resized (bicubic, antialiased) and zero-padded right/bottom.

    As published, the bicubic result is not clamped: its overshoot (e.g. -0.016 or 1.004 next to edges) goes to
    the model, so values may leave [0,1] slightly.
    """
    x = img01[None]
    if geom.resized_hw != geom.orig_hw:
        x = resize01(x, geom.resized_hw)
    ph, pw = geom.padded_hw[0] - geom.resized_hw[0], geom.padded_hw[1] - geom.resized_hw[1]
    return F.pad(x, (0, pw, 0, ph))


def from_model_output(out01: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(1,C,Hp,Wp) in ~[0,1] -> (C,H,W) in [0,1], in the published order: crop the padding, clip to [0,1], resize
    back to the original size (bicubic, antialiased; this can overshoot again).

    The final clamp to [0,1] keeps the range contract; it cannot change the 8-bit result of
    :func:`utils.image_io.save_png01`, which saturates below 0 and above 1 the same way.
    """
    x = out01[..., : geom.resized_hw[0], : geom.resized_hw[1]].float().clamp(0, 1)
    if geom.resized_hw != geom.orig_hw:
        x = resize01(x, geom.orig_hw)
    return x.clamp(0, 1)[0]


class DiffusionRunner:
    """The model, schedule, device/precision and (tiled) encode/decode/denoise functions for one config."""

    def __init__(self, cfg: DictConfig, controlnet_key: str = "controlnet_path"):
        inf = cfg.inference
        self.device = choose_device(inf.get("device", "auto"))
        self.dtype = choose_dtype(inf.get("precision", "auto"), self.device)
        self.model = instantiate_from_config(cfg.model.cldm)
        self.diffusion = instantiate_from_config(cfg.model.diffusion)
        unused, missing = self.model.load_pretrained_sd(load_state_dict(inf.sd_path))
        if missing:
            raise RuntimeError(f"{inf.sd_path} lacks {len(missing)} model tensors, e.g. {sorted(missing)[:3]}")
        skipped = self.model.load_controlnet_from_ckpt(load_state_dict(inf[controlnet_key]))
        if skipped:
            log.info("published ControlNet loaded; %d new extension tensors keep their init", len(skipped))
        self.model.eval().to(self.device)
        if self.dtype != torch.float32:
            self.model.cast_denoiser(self.dtype)
        self.configure(cfg)

    def configure(self, cfg: DictConfig) -> None:
        """Adopt the per-run settings of ``cfg`` (steps, tiling, prompt ...) for the loaded model; app.py calls this
        between runs with another mode's or slider's settings (same model section and weights)."""
        self.cfg = cfg
        inf = cfg.inference
        self.schedule = make_spaced_schedule(self.diffusion.alphas_cumprod_np, inf.get("steps", 50))
        self.parameterization = self.diffusion.parameterization
        self.tiled = inf.get("tiled", "auto")
        self.tile_threshold = int(inf.get("tile_threshold", 1536))
        self.latent_tile = (int(inf.get("latent_tile_size", 64)), int(inf.get("latent_tile_stride", 32)))
        self.vae_tile = (int(inf.get("vae_tile_size", 512)), int(inf.get("vae_tile_stride", 448)))

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
        infos = None
        if self.cfg.inference.get("dynamic_prompt", False) or self.model.text_processor is not None:
            from utils.fog import analyze_fog

            infos = analyze_fog(img01[None].to(self.device))
        if self.cfg.inference.get("dynamic_prompt", False):
            from utils.prompts import prompts_from_infos

            prompt = prompts_from_infos(infos, stage, None)[0]
        else:
            prompt = str(self.cfg.inference.prompt)
        fog_feats = None
        if self.model.text_processor is not None:
            from utils.fog import fog_features

            fog_feats = fog_features(infos, device=self.device)
        with torch.no_grad():
            return self.model.prepare_condition(cond01, [prompt] * cond01.shape[0], fog_feats,
                                                c_img=self.encode(cond01 * 2 - 1))

    def prepare(self, img01: torch.Tensor, inf: DictConfig) -> tuple[torch.Tensor, Geometry]:
        """(3,H,W) in [0,1] -> padded model input (1,3,Hp,Wp) on the device, and its geometry.

        ``inference.min_short_side`` (published: 512) and ``inference.pad_multiple`` (64) set the geometry.
        """
        geom = plan_geometry(*img01.shape[-2:], min_short=int(inf.get("min_short_side", 512)),
                             multiple=int(inf.get("pad_multiple", 64)), max_pixels=inf.get("max_pixels"))
        return to_model_input(img01, geom).to(self.device), geom

    def start(self, img01: torch.Tensor, stage: int, seed: int) -> tuple[torch.Tensor, Geometry, dict,
                                                                    torch.Generator, torch.Tensor]:
        """Everything a sampler needs for one image: padded input (1,3,Hp,Wp) in ~[0,1], geometry, condition,
        a generator seeded with ``seed`` and the initial noise x_T (1,4,Hp/8,Wp/8) drawn from it."""
        inp, geom = self.prepare(img01, self.cfg.inference)
        cond = self.condition(inp, img01, stage)
        gen = self.generator(seed)
        return inp, geom, cond, gen, self.initial_noise((1, 4, inp.shape[-2] // 8, inp.shape[-1] // 8), gen)

    def finish(self, z: torch.Tensor, geom: Geometry) -> torch.Tensor:
        """Final latent -> (3,H,W) image in [0,1] at the original size."""
        with torch.no_grad():
            return from_model_output(self.decode(z) * 0.5 + 0.5, geom).cpu()

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def initial_noise(self, latent_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(latent_shape, generator=generator, device=self.device)


def run_folder(cfg: DictConfig, process: Process,
               output_names: Callable[[str], list[str]], skip_existing: bool, desc: str) -> int:
    """Loop over ``inference.image_folder``; ``process(img01 (3,H,W), stem)`` returns ``{file name: (C,H,W) [0,1]}``.

    Per-image failures are logged by file name and the loop continues. Returns the exit status (1 if any failed).
    """
    src, dst = Path(cfg.inference.image_folder), Path(cfg.inference.result_folder)
    if not src.is_dir():
        log.error("inference.image_folder does not exist: %s", src)
        return 2
    if src.resolve() == dst.resolve():
        log.error("inference.result_folder must differ from image_folder (%s): inputs are never overwritten", src)
        return 2
    dst.mkdir(parents=True, exist_ok=True)
    images = list_images(src)
    if not images:
        log.error("no .png/.jpg/.jpeg images in %s", src)
        return 1
    done, skipped, failed = [], [], []
    bar = tqdm(images, desc=desc, unit="img")
    for path in bar:
        names = output_names(path.stem)
        if skip_existing and all((dst / n).is_file() for n in names):
            skipped.append(path.name)
            continue
        bar.set_postfix_str(path.name)
        try:
            outputs = process(load_rgb01(path), path.stem)
            for name, img in outputs.items():
                save_png01(img, dst / name)
            done.append(path.name)
        except (ImageReadError, ValueError, RuntimeError, OSError) as err:
            failed.append((path.name, str(err).splitlines()[0] if str(err) else type(err).__name__))
            log.debug("%s", traceback.format_exc())
            log.error("failed: %s: %s", path.name, failed[-1][1])
    log.info("summary: %d done, %d skipped, %d failed (results in %s)", len(done), len(skipped), len(failed), dst)
    for name, reason in failed:
        log.info("  failed %s: %s", name, reason)
    return 1 if failed else 0


def run_script(cfg: DictConfig, args: argparse.Namespace, make_process: Callable[..., Process],
               output_names: Callable[[DictConfig], Callable[[str], list[str]]], desc: str) -> int:
    """A diffusion script's ``run``: check the weight files, load the model once, run its per-image function
    ``make_process(cfg, runner, show_steps)`` over the folder. Returns the exit status."""
    check_weights({key: cfg.inference[key] for key in WEIGHT_KEYS})
    runner = DiffusionRunner(cfg)
    return run_folder(cfg, make_process(cfg, runner, args.show_steps), output_names(cfg), args.skip_existing, desc)


def main_wrapper(fn: Callable[[DictConfig, argparse.Namespace], int], description: str, default_config: str) -> None:
    setup_logging()
    args = parse_args(description, default_config)
    cfg = load_config(args.config, args.set)
    sys.exit(fn(cfg, args))
