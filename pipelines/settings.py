"""The ``inference.*`` section as one validated object, read once at the door (as ``TrainSettings`` is for training).

Every inference script, app.py, the tools and the benchmarks read the section through
:meth:`InferenceSettings.from_config`: unknown keys are refused with the list of valid ones (and the closest match),
and every value is checked for type and range before a weight file is looked for or a model is built. The defaults
below are the only ones in the code; the YAML files under ``configs/inference/`` set the published values explicitly.

One key set serves every script, so one config can drive several (the app's modes run DiffDehaze, AccSamp and
HazeGen from one file): a key of another script (``inference.tau`` given to ``inference_stage2.py``) is validated like
any other and then ignored, and the script says so in one INFO line (:meth:`InferenceSettings.ignored_keys`).
:data:`SCRIPT_KEYS` lists the keys each script reads.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from haze.dcp import AIRLIGHT_TIES
from sampler.accsamp import PULLBACKS, accsamp_steps
from sampler.registry import FEW_STEP_SOLVERS, SAMPLERS
from sampler.spaced import SPACINGS
from utils.common import PRECISIONS
from utils.rules import Rule, SettingsError, first_violation, is_int, is_number, unknown_keys_message

WEIGHT_KEYS = ("sd_path", "controlnet_path")
"""inference.* weight files of every diffusion script."""
ONESTEP_WEIGHT_KEYS = (*WEIGHT_KEYS, "adapter_path")
"""inference.* weight files of the one-step student (the stage-2 weights and the adapter file merged into them)."""
PATH_KEYS = (*ONESTEP_WEIGHT_KEYS, "checkpoint_path", "image_folder", "result_folder", "fog_reference_folder")


class InferenceSettingsError(SettingsError):
    """A bad ``inference.*`` key or value; the message is one line naming the key."""


@dataclass(frozen=True)
class InferenceSettings:
    """The ``inference.*`` keys of every script, with their defaults (the published value unless noted)."""

    sd_path: str | None = None
    """SD-2.1 checkpoint (published: weights/v2-1_512-ema-pruned.ckpt); required by the diffusion scripts."""
    controlnet_path: str | None = None
    """ControlNet checkpoint (published: weights/stage1.pt for HazeGen, weights/stage2.pt for DiffDehaze/AccSamp);
    required by the diffusion scripts."""
    checkpoint_path: str | None = None
    """Weights of a feed-forward baseline (a ``checkpoints/<step>.pt`` of train_baseline.py); required by
    inference_baseline.py, whose ``network`` section names the architecture."""
    adapter_path: str | None = None
    """One-step student: the adapter file of a stage-3 distillation (.safetensors), merged into the stage-2 weights at
    load; required by inference_onestep."""
    image_folder: str | None = None
    """Folder of input images (.png/.jpg/.jpeg); required to run a script over a folder."""
    result_folder: str | None = None
    """Folder the outputs are written to (created; must differ from image_folder); required with image_folder."""
    prompt: str | None = None
    """Text condition (published: "hazy, foggy, misty, obscure, smoggy." for HazeGen, "remove dense fog" for
    DiffDehaze); required by the diffusion scripts."""
    steps: int = 50
    """Sampling steps N, an integer in [2, the model's diffusion timesteps (1000)]; published 50. One step is refused:
    the spaced schedule every sampler runs on (``sampler.spaced.make_spaced_schedule``, as published) takes the
    first step's clipped posterior variance from the second step."""
    sampler: str = "spaced"
    """One of sampler.registry.SAMPLERS: spaced (published ancestral DDPM), ddim, dpmpp_2m."""
    spacing: str = "uniform"
    """Which timesteps the N steps keep (sampler.spaced.SPACINGS): uniform (published respacing, uniform in t),
    logsnr (uniform in log-SNR) or karras (Karras et al., ρ = 7); other than uniform only with the few-step solvers
    ddim and dpmpp_2m (the published spaced sampler keeps its respacing)."""
    eta: float = 0.0
    """DDIM noise in [0, 1]: 0 deterministic, 1 ancestral (= spaced); only with sampler ddim."""
    w: float = 0.85
    """HazeGen guidance weight >= 0 in uncond + w·(cond − uncond); published 0.85."""
    tau: float = 0.8
    """AccSamp: the estimate is taken at step (1−τ)·N, 0 < τ < 1 (with at least one phase-1 step); published 0.8."""
    omega: float = 0.6
    """AccSamp: phase 2 restarts at step (1−ω)·N, 0 < ω <= 1; published 0.6."""
    num_samples: int = 1
    """HazeGen variants per clean image (<stem>_<k>.png), >= 1."""
    seed: int = 231
    """Seed of each image's noise generator (HazeGen variant k: seed + k); any integer. Published scripts: unseeded."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu) or a torch device name (cpu, cuda, cuda:1, mps); published: cuda:0."""
    precision: str = "auto"
    """auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16 (half precision only on CUDA/MPS); published fp32."""
    min_short_side: int = 512
    """Inputs whose short side is below this (px, >= 1) are upscaled to it; published 512."""
    pad_multiple: int = 64
    """The resized image is padded to multiples of this (px, a positive multiple of 8); published 64."""
    max_pixels: int | None = 4096 * 4096
    """Largest padded image (pixels) accepted; a bigger one fails alone; null = no limit. Not in the published code."""
    tiled: bool | str = "auto"
    """Tile the VAE and the denoiser: true, false (published: never) or auto (padded long side > tile_threshold)."""
    tile_threshold: int = 1536
    """Padded long side (px, >= 1) above which tiled: auto tiles."""
    latent_tile_size: int = 64
    """Denoiser tile (latent px, >= 1; 64 latent = 512 image px)."""
    latent_tile_stride: int = 32
    """Denoiser tile stride (latent px, 1..latent_tile_size)."""
    vae_tile_size: int = 512
    """VAE tile (image px, a positive multiple of 8)."""
    vae_tile_stride: int = 448
    """VAE tile stride (image px, a positive multiple of 8, <= vae_tile_size)."""
    tile_size: int = 1024
    """Baselines: network tile (image px, >= 16) when tiled; blended like the VAE tiles."""
    tile_stride: int = 896
    """Baselines: network tile stride (image px, 1..tile_size)."""
    dynamic_prompt: bool = False
    """HCD-YC: the prompt comes from the fog analysis of the image (HazeGen: of a fog reference photo)."""
    fog_reference_folder: str | None = None
    """HCD-YC HazeGen: hazy photos analysed for dynamic prompts / the text processor (required by them at stage 1)."""
    save_intermediates: bool = False
    """AccSamp: also write <stem>_estimate.png and <stem>_transmission.png."""
    save_transmission: bool = False
    """DCP baseline: also write <stem>_transmission.png."""
    align_cover_border: bool = True
    """AccSamp AlignOp also covers the right/bottom border the published patch grid leaves at 0 (published: false)."""
    guidance_every: int = 1
    """AccSamp: guide every k-th phase-2 step, k >= 1; published 1 (all)."""
    guidance_pullback: str = "autograd"
    """AccSamp guidance pull-back: autograd (published, decoder backward) or linear (sampler/pullback.py)."""
    airlight_ties: str = "all"
    """AccSamp DCP airlight: all (every pixel tied at the top-0.1% cut, deterministic) or topk (published)."""
    max_memory_gb: float | None = None
    """Stage 2, AccSamp, HazeGen: refuse (naming tile settings that fit) an image whose estimated peak memory
    (pipelines.memory) exceeds this many GB (> 0); null = no check."""
    batch_size: int = 1
    """Images of equal padded size sampled together (>= 1); each keeps its own seeded noise."""
    channels_last: bool = True
    """Store the UNet/ControlNet conv weights NHWC (outputs equal within float rounding)."""
    pack_weights: bool = True
    """fp32 CPU: UNet/ControlNet convolutions reuse oneDNN-packed weights (one more copy of the conv weights in memory;
    outputs equal within float rounding)."""
    compile: bool = False
    """Wrap the UNet/ControlNet in torch.compile (each new latent size compiles first, which takes minutes)."""

    def __post_init__(self) -> None:
        """Validate, then store the numbers of the float keys as floats (``--set inference.eta=0`` gives an int)."""
        self.validate()
        for key in ("eta", "w", "tau", "omega", "max_memory_gb"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, float(getattr(self, key)))

    @classmethod
    def from_config(cls, cfg: DictConfig, num_timesteps: int | None = None) -> InferenceSettings:
        """The settings of ``cfg.inference`` (an absent section gives the defaults), validated.

        ``num_timesteps`` bounds ``steps``; by default it is ``model.diffusion.params.timesteps`` when the config has
        one. Raises InferenceSettingsError (one line naming the key) for an unknown key or a bad value.
        """
        section = cfg["inference"] if "inference" in cfg else None
        values = OmegaConf.to_container(section, resolve=True) if section is not None else {}
        if not isinstance(values, dict):
            raise InferenceSettingsError(f"the inference section must be a mapping of keys, got {values!r}")
        message = unknown_keys_message(values, KEYS, "inference")
        if message is not None:
            raise InferenceSettingsError(message)
        for key in PATH_KEYS:
            if isinstance(values.get(key), os.PathLike):
                values[key] = os.fspath(values[key])
        settings = cls(**values)
        if num_timesteps is None:
            num_timesteps = OmegaConf.select(cfg, "model.diffusion.params.timesteps", default=None)
        if num_timesteps is not None:
            settings.check_timesteps(num_timesteps)
        return settings

    def check_timesteps(self, num_timesteps: int) -> None:
        """InferenceSettingsError unless ``steps`` is at most the model's ``num_timesteps`` diffusion timesteps."""
        if self.steps > num_timesteps:
            raise InferenceSettingsError(f"inference.steps must be at most the model's {num_timesteps} diffusion "
                                         f"timesteps, got steps={self.steps}")

    def validate(self) -> None:
        """Raise InferenceSettingsError naming the ``inference.*`` key of the first bad value (rules: :data:`RULES`)."""
        message = first_violation(self, RULES, "inference")
        if message is not None:
            raise InferenceSettingsError(message)
        if self.spacing != "uniform" and self.sampler not in FEW_STEP_SOLVERS:
            raise InferenceSettingsError(f"inference.spacing={self.spacing} needs a few-step solver (inference.sampler "
                                         f"one of {', '.join(FEW_STEP_SOLVERS)}); the published {self.sampler} "
                                         "sampler runs on the uniform respacing")
        for kind in ("latent_", "vae_", ""):
            size, stride = getattr(self, f"{kind}tile_size"), getattr(self, f"{kind}tile_stride")
            if stride > size:
                raise InferenceSettingsError(f"inference.{kind}tile_stride must be at most inference.{kind}tile_size"
                                             f"={size}, got {kind}tile_stride={stride}")

    def check_script(self, script: str) -> None:
        """What ``script`` (a key of :data:`SCRIPT_KEYS`) needs beyond valid values: its required keys set and, for
        AccSamp, τ and ω that leave a step in each phase of ``steps``. InferenceSettingsError otherwise."""
        required = ["image_folder", "result_folder"]
        if script == "inference_baseline":
            required.append("checkpoint_path")
        elif script == "inference_onestep":
            required += [*ONESTEP_WEIGHT_KEYS, "prompt"]
        elif script != "inference_dcp":
            required += [*WEIGHT_KEYS, "prompt"]
        for key in required:
            if getattr(self, key) is None:
                raise InferenceSettingsError(f"inference.{key} is required by {script}.py")
        if script == "inference_accsamp":
            try:
                accsamp_steps(self.steps, self.tau, self.omega)
            except ValueError as err:
                raise InferenceSettingsError(f"inference.tau/omega/steps: {err}") from None

    def weight_paths(self, keys: tuple[str, ...] = WEIGHT_KEYS) -> dict[str, str]:
        """``{key: path}`` of the weight files ``keys``; InferenceSettingsError for one that is not set."""
        missing = [key for key in keys if getattr(self, key) is None]
        if missing:
            raise InferenceSettingsError(f"inference.{missing[0]} (a weight file) is not set")
        return {key: getattr(self, key) for key in keys}

    @staticmethod
    def ignored_keys(cfg: DictConfig, script: str) -> list[str]:
        """Keys set in ``cfg.inference`` that ``script`` does not read (keys of the other scripts)."""
        section = cfg["inference"] if "inference" in cfg else {}
        return sorted(set(section) - SCRIPT_KEYS[script])


KEYS = tuple(f.name for f in dataclasses.fields(InferenceSettings))
RULES: tuple[Rule, ...] = (
    ((*PATH_KEYS, "prompt"), lambda v: v is None or isinstance(v, str), "a string or null"),
    (("dynamic_prompt", "save_intermediates", "save_transmission", "align_cover_border", "channels_last",
      "pack_weights", "compile"),
     lambda v: isinstance(v, bool), "true or false"),
    (("steps",), lambda v: is_int(v) and v >= 2,
     "an integer >= 2 (the published spaced schedule clips the first posterior variance to the second step's)"),
    (("num_samples", "min_short_side", "tile_threshold", "latent_tile_size", "latent_tile_stride",
      "batch_size", "guidance_every", "tile_stride"), lambda v: is_int(v) and v >= 1, "a positive integer"),
    (("tile_size",), lambda v: is_int(v) and v >= 16, "an integer >= 16"),
    (("pad_multiple", "vae_tile_size", "vae_tile_stride"), lambda v: is_int(v) and v >= 8 and v % 8 == 0,
     "a positive multiple of 8 (the VAE's scale)"),
    (("seed",), lambda v: is_int(v), "an integer"),
    (("max_pixels",), lambda v: v is None or (is_int(v) and v >= 1), "a positive integer or null"),
    (("max_memory_gb",), lambda v: v is None or (is_number(v) and v > 0), "a positive number of GB or null"),
    (("eta",), lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    (("w",), lambda v: is_number(v) and v >= 0, "a number >= 0"),
    (("tau",), lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    (("omega",), lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    (("sampler",), lambda v: v in SAMPLERS, f"one of {', '.join(SAMPLERS)}"),
    (("spacing",), lambda v: v in SPACINGS, f"one of {', '.join(SPACINGS)}"),
    (("guidance_pullback",), lambda v: v in PULLBACKS, f"one of {', '.join(PULLBACKS)}"),
    (("airlight_ties",), lambda v: v in AIRLIGHT_TIES, f"one of {', '.join(AIRLIGHT_TIES)}"),
    (("precision",), lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    (("device",), lambda v: _is_device(v), "auto or a torch device name (cpu, cuda, cuda:1, mps)"),
    (("tiled",), lambda v: isinstance(v, bool) or v == "auto", "true, false or auto"),
)
"""(keys, test, what a valid value is) of every ``inference.*`` key."""
_FOLDER = frozenset({"image_folder", "result_folder", "device"})
_DIFFUSION = _FOLDER | {
    *WEIGHT_KEYS, "prompt", "steps", "sampler", "spacing", "eta", "seed", "precision", "min_short_side", "pad_multiple",
    "max_pixels", "tiled", "tile_threshold", "latent_tile_size", "latent_tile_stride", "vae_tile_size",
    "vae_tile_stride", "dynamic_prompt", "batch_size", "channels_last", "pack_weights", "compile", "max_memory_gb"}
SCRIPT_KEYS: dict[str, frozenset[str]] = {
    "inference_dcp": _FOLDER | {"save_transmission"},
    "inference_baseline": _FOLDER | {"checkpoint_path", "tiled", "tile_threshold", "tile_size", "tile_stride",
                                     "save_transmission"},
    "inference_stage2": _DIFFUSION,
    "inference_stage1": _DIFFUSION | {"w", "num_samples", "fog_reference_folder"},
    "inference_onestep": (_DIFFUSION - {"steps", "sampler", "spacing", "eta"}) | {"adapter_path"},
    "inference_accsamp": _DIFFUSION | {"tau", "omega", "save_intermediates", "align_cover_border", "guidance_every",
                                       "guidance_pullback", "airlight_ties"},
}
"""The ``inference.*`` keys each script reads."""


def _is_device(name: Any) -> bool:
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True
