"""What every inference script shares: argument parsing, weight checks, model building, the published
resize/pad geometry, the folder loop with skip-and-report, atomic outputs and the summary."""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Hashable

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from omegaconf import DictConfig
from tqdm.auto import tqdm

from sampler.registry import make_sampler
from sampler.spaced import make_spaced_schedule
from utils.batching import group_batches, stack_conditions
from utils.checkpoint import WEIGHTS_HELP
from utils.common import choose_dtype, load_config
from utils.conditioning import fog_aware_condition
from utils.distributed import init_processes, process_device
from utils.image_io import ImageReadError, image_hw, list_images, load_rgb01, resize01, save_png01
from utils.inference_settings import InferenceSettings, InferenceSettingsError
from utils.model_builder import build_model
from utils.tiling import TiledDenoiser, tiled_apply, tiled_vjp

log = logging.getLogger("hcdyc")
EXIT_MISSING_WEIGHTS = 2
EXIT_BAD_CONFIG = 2


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
    ``inference.eta``, ``dpmpp_2m``), on the schedule of ``inference.steps`` steps.

    Denoiser speed settings (``benchmarks/bench_step.py`` measures them): ``inference.channels_last`` (default
    true) stores the UNet/ControlNet conv weights NHWC; ``inference.pack_weights`` (default true; fp32 CPU only)
    lets their convolutions reuse oneDNN-packed weights (one more copy of the conv weights in memory);
    ``inference.compile`` (default false) wraps both in ``torch.compile`` (the first step of each new latent size
    compiles, which takes minutes).
    """

    def __init__(self, cfg: DictConfig):
        inf = InferenceSettings.from_config(cfg)
        inf.weight_paths()  # InferenceSettingsError unless both weight files are named
        self.device = process_device(inf.device)
        self.dtype = choose_dtype(inf.precision, self.device)
        self.model, self.diffusion = build_model(cfg.model, inf.sd_path, inf.controlnet_path, "inference.sd_path")
        self.model.eval().to(self.device)
        if self.dtype != torch.float32:
            self.model.cast_denoiser(self.dtype)
        self.model.set_channels_last(inf.channels_last).set_weight_packing(inf.pack_weights)
        if inf.compile:
            self.model.unet.compile()
            self.model.controlnet.compile()
        self.configure(cfg)

    def configure(self, cfg: DictConfig) -> None:
        """Adopt the per-run settings of ``cfg`` (steps, tiling, prompt ...) for the loaded model; app.py calls this
        between runs with another mode's or slider's settings (same model section and weights)."""
        self.cfg = cfg
        self.settings = inf = InferenceSettings.from_config(cfg, len(self.diffusion.alphas_cumprod_np))
        self.sample = make_sampler(inf.sampler, inf.eta)
        self.schedule = make_spaced_schedule(self.diffusion.alphas_cumprod_np, inf.steps)
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


Batch = list[tuple[torch.Tensor, str]]
"""Images of one batch: (img01 (3,H,W) in [0,1], file stem) pairs."""
Process = Callable[..., dict[str, torch.Tensor]]
"""A script's batch function: process(batch, callback=None) -> {file name: (C,H,W) in [0,1]} for every image of the
batch; callback(info) receives the sampler's per-step dict ({"step", "index", "t", "x", "x0"})."""


@dataclass
class FolderReport:
    """Names of the input files done, skipped (outputs existed) and failed (with a one-line reason)."""

    done: list[str]
    skipped: list[str]
    failed: list[tuple[str, str]]


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _fail(report: FolderReport, name: str, err: BaseException) -> None:
    report.failed.append((name, _first_line(err)))
    log.debug("%s", traceback.format_exc())
    log.error("failed: %s: %s", name, report.failed[-1][1])


def _process_batch(paths: list[Path], process: Callable[[Batch], dict[str, torch.Tensor]],
                   output_names: Callable[[str], list[str]], dst: Path, report: FolderReport) -> None:
    """Load, process and save one batch. A batch that fails is retried image by image, so only the images that
    fail alone are reported."""
    loaded: list[tuple[Path, torch.Tensor]] = []
    for path in paths:
        try:
            loaded.append((path, load_rgb01(path)))
        except ImageReadError as err:
            _fail(report, path.name, err)
    try:
        outputs = process([(img01, path.stem) for path, img01 in loaded]) if loaded else {}
    except (ValueError, RuntimeError, OSError) as err:
        if len(loaded) == 1:
            _fail(report, loaded[0][0].name, err)
            return
        log.info("batch of %d failed (%s); retrying its images one by one", len(loaded), _first_line(err))
        for path, _ in loaded:
            _process_batch([path], process, output_names, dst, report)
        return
    for path, _ in loaded:
        try:
            for name in output_names(path.stem):
                save_png01(outputs[name], dst / name)
            report.done.append(path.name)
        except (ValueError, OSError) as err:
            _fail(report, path.name, err)


def run_folder(cfg: DictConfig, process: Callable[[Batch], dict[str, torch.Tensor]],
               output_names: Callable[[str], list[str]], skip_existing: bool, desc: str,
               batch_key: Callable[[Path], Hashable | None] | None = None) -> int:
    """Loop over ``inference.image_folder``; ``process([(img01 (3,H,W), stem), ...])`` returns
    ``{file name: (C,H,W) [0,1]}`` for every image of the batch.

    Several processes (``accelerate launch``) split the sorted file list (``ProcessInfo.shard``); each writes only
    its own images' outputs, atomically. With ``inference.batch_size`` > 1, images whose ``batch_key`` (padded
    size) is equal are processed together. Per-image failures are logged by file name and the loop continues; the
    main process prints one summary of all processes. Returns the exit status (1 if any image failed anywhere).
    """
    info = init_processes()
    inf = InferenceSettings.from_config(cfg)
    if inf.image_folder is None or inf.result_folder is None:
        log.error("inference.image_folder and inference.result_folder are required")
        return 2
    batch_size, src, dst = inf.batch_size, Path(inf.image_folder), Path(inf.result_folder)
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
    report = FolderReport([], [], [])
    owner: dict[str, str] = {}
    unique = []
    for path in images:
        clash = next((owner[n] for n in output_names(path.stem) if n in owner), None)
        if clash is None:
            owner.update({n: path.name for n in output_names(path.stem)})
            unique.append(path)
        elif info.is_main:
            report.failed.append((path.name, f"its outputs would overwrite those of {clash} (same file stem)"))
    todo = []
    for path in info.shard(unique):
        if skip_existing and all((dst / n).is_file() for n in output_names(path.stem)):
            report.skipped.append(path.name)
        else:
            todo.append(path)
    batches = group_batches(todo, batch_key or (lambda _: None), batch_size if batch_key else 1)
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not info.is_main) as bar:
        for paths in batches:
            bar.set_postfix_str(paths[0].name)
            _process_batch(paths, process, output_names, dst, report)
            bar.update(len(paths))
    reports = info.gather(report)
    done = sorted(n for r in reports for n in r.done)
    skipped = sorted(n for r in reports for n in r.skipped)
    failed = sorted(f for r in reports for f in r.failed)
    if info.is_main:
        processes = f" by {info.count} processes" if info.count > 1 else ""
        log.info("summary: %d done, %d skipped, %d failed%s (results in %s)", len(done), len(skipped), len(failed),
                 processes, dst)
        for label, names in (("done", done), ("skipped", skipped)):
            if names:
                log.info("  %s: %s", label, ", ".join(names))
        for name, reason in failed:
            log.info("  failed %s: %s", name, reason)
    return 1 if failed else 0


def run_script(cfg: DictConfig, args: argparse.Namespace, make_process: Callable[..., Process],
               output_names: Callable[[DictConfig], Callable[[str], list[str]]], desc: str) -> int:
    """A diffusion script's ``run``: check the weight files, load the model once, run its batch function
    ``make_process(cfg, runner, show_steps)`` over the folder. Returns the exit status."""
    check_weights(InferenceSettings.from_config(cfg).weight_paths())
    runner = DiffusionRunner(cfg)
    return run_folder(cfg, make_process(cfg, runner, args.show_steps), output_names(cfg), args.skip_existing, desc,
                      runner.batch_key)


def main_wrapper(fn: Callable[[DictConfig, argparse.Namespace], int], description: str, default_config: str,
                 script: str) -> None:
    """Parse arguments, load the config, check the ``inference.*`` settings for ``script`` (a key of
    utils.inference_settings.SCRIPT_KEYS; a bad one exits 2 with one line naming the key, before any weight file
    is looked for), join the ``accelerate launch`` processes (only the main one logs INFO) and exit with ``fn``'s
    status."""
    setup_logging()
    args = parse_args(description, default_config)
    cfg = load_config(args.config, args.set)
    try:
        InferenceSettings.from_config(cfg).check_script(script)
    except InferenceSettingsError as err:
        log.error("%s", err)
        sys.exit(EXIT_BAD_CONFIG)
    if not init_processes().is_main:
        logging.getLogger().setLevel(logging.WARNING)
    ignored = InferenceSettings.ignored_keys(cfg, script)
    if ignored:
        log.info("%s.py does not use inference.%s (keys of the other scripts); ignored", script,
                 ", inference.".join(ignored))
    sys.exit(fn(cfg, args))
