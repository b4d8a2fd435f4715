"""Peak-memory estimate of tiled inference, the check against ``inference.max_memory_gb`` and the GPU budget table.

Model of the peak (bytes), for a padded image of P = H·W pixels run in tiles:

    weights + P · per_pixel[script] + max(tile working sets)

- weights: the parameters and buffers as they are held (denoiser in its dtype, VAE and text encoder fp32);
- per_pixel: the full-resolution tensors the script holds at its worst moment (input, decoded x0 or output,
  AccSamp estimate, the guidance's [0,1] target and gradient, blend-weight sums), taken from the measured growth of
  peak RSS with the pixel count (``benchmarks/bench_large.py``, reduced model, CPU: an upper bound for a GPU, where
  the loaded photo and the saved output stay in host memory);
- tile working sets: one VAE tile decoded without and (AccSamp) with gradients, one denoiser tile, one MS-SSIM
  gradient tile; each is ``coefficient · channels · tile pixels``. The coefficients are the peak live tensor bytes of
  the real code on the FULL-SIZE model, counted on the meta device by ``benchmarks/bench_large.py --calibrate``
  (:class:`LiveTensorBytes`; the denoiser with a fused attention kernel's allocations, as on CUDA). Not counted:
  the CUDA context and kernel workspaces (leave ~1 GB of headroom), allocator rounding.

The estimate is meant to catch configurations that cannot fit before any sampling, not to predict to the MB.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from pipelines.settings import InferenceSettings

if TYPE_CHECKING:
    from pipelines.runner import DiffusionRunner

# full-resolution bytes per padded pixel: the largest of the count from the code (48 / 64) and the measured growth of
# peak RSS (bench_large.py, reduced model, CPU): stage 2 51.5 (1K→4K); AccSamp 55.4 (1K→4K), 68 (1K→8K)
BYTES_PER_PIXEL = {"stage2": 52, "hazegen": 52, "accsamp": 68}
# bytes per (output pixel · base channel) of one VAE decoder tile, without / with the backward pass (fp32); counted
# 24.0 and 184.1 (the encoder's tile, 16.0, is never the largest)
VAE_DECODE_COEF, VAE_VJP_COEF = 24.0, 185.0
# bytes per (latent pixel · base channel · element byte) of one ControlNet + UNet tile step; counted 33.2 (283 if
# SDPA falls back to its math path and materialises the attention matrix, as on the meta device)
DENOISER_COEF = 34.0
# bytes per pixel of one MS-SSIM gradient tile including its 160-px halo (3 channels, fp32, autograd); counted 219.2
MSSSIM_COEF = 220.0
MSSSIM_HALO = 160
# GB a CUDA process needs besides its tensors (context, cuDNN/cuBLAS workspaces): not measured here, assumed
CUDA_HEADROOM_GB = 1.0


@dataclass(frozen=True)
class TileSettings:
    """The tile sizes that set the working memory (pixels for the VAE and MS-SSIM, latent pixels for the denoiser)."""

    vae_tile: int = 512
    latent_tile: int = 64
    guidance_tile: int = 512

    def overrides(self, script: str) -> str:
        """The ``--set`` arguments that select these settings for ``script`` (tiling forced on, so they apply at
        any size; the guidance tile only for accsamp)."""
        guidance = f" guidance.params.tile_size={self.guidance_tile}" if script == "accsamp" else ""
        return (f"inference.tiled=True inference.vae_tile_size={self.vae_tile} "
                f"inference.vae_tile_stride={self.vae_tile * 7 // 8} inference.latent_tile_size={self.latent_tile} "
                f"inference.latent_tile_stride={self.latent_tile // 2}{guidance}")


CANDIDATES = [TileSettings(v, lt, g) for v, lt, g in
              [(512, 64, 512), (384, 64, 384), (256, 64, 256), (256, 48, 256), (192, 32, 192), (128, 32, 128)]]


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs to know about the model: bytes of the weights and the base channel widths."""

    weight_bytes: int
    vae_channels: int
    unet_channels: int
    denoiser_element_bytes: int

    @classmethod
    def from_config(cls, cfg: DictConfig, denoiser_dtype: torch.dtype) -> "ModelSize":
        """Count the parameters of the config's model on the meta device (nothing is allocated)."""
        from model.builder import cldm_config
        from utils.common import instantiate_from_config

        with torch.device("meta"):
            model = instantiate_from_config(cldm_config(cfg.model))
        return cls.from_model(model, cfg, denoiser_dtype)

    @classmethod
    def from_model(cls, model: torch.nn.Module, cfg: DictConfig, denoiser_dtype: torch.dtype) -> "ModelSize":
        size = torch.finfo(denoiser_dtype).bits // 8
        total = 0
        for name, module in model.named_children():
            per = size if name in ("unet", "controlnet") else 4
            total += sum(t.numel() for t in [*module.parameters(), *module.buffers()]) * per
        params = cfg.model.cldm.params
        return cls(total, int(params.vae_cfg.params.ddconfig.ch), int(params.unet_cfg.params.model_channels), size)


def working_bytes(model: ModelSize, hw: tuple[int, int], script: str, tiles: TileSettings) -> float:
    """The largest tile working set (bytes) of ``script`` on a padded H×W image (tiles clipped to the image)."""
    vae_px = min(tiles.vae_tile, hw[0]) * min(tiles.vae_tile, hw[1])
    lat = min(tiles.latent_tile, hw[0] // 8) * min(tiles.latent_tile, hw[1] // 8)
    working = [VAE_DECODE_COEF * model.vae_channels * vae_px,
               DENOISER_COEF * model.unet_channels * lat * model.denoiser_element_bytes]
    if script == "accsamp":
        working.append(VAE_VJP_COEF * model.vae_channels * vae_px)
        side = [min(tiles.guidance_tile + MSSSIM_HALO, s) for s in hw]
        working.append(MSSSIM_COEF * side[0] * side[1])
    return max(working)


def estimate_peak_gb(model: ModelSize, hw: tuple[int, int], script: str, tiles: TileSettings,
                     batch: int = 1) -> float:
    """Estimated peak memory (GB) of ``script`` (stage2 | accsamp | hazegen) on ``batch`` padded H×W images, tiled
    (tiles hold one image's crop at a time in this estimate's model; the full-resolution part scales with the batch)."""
    pixels = hw[0] * hw[1] * batch
    return (model.weight_bytes + pixels * BYTES_PER_PIXEL[script] + working_bytes(model, hw, script, tiles)) / 1e9


def largest_pixels(model: ModelSize, script: str, tiles: TileSettings, limit_gb: float, batch: int = 1) -> int:
    """Padded pixels per image of the largest images (at least a tile wide) whose estimate fits ``limit_gb``."""
    full_tiles = working_bytes(model, (1 << 16, 1 << 16), script, tiles)
    room = limit_gb * 1e9 - model.weight_bytes - full_tiles
    return max(int(room // (BYTES_PER_PIXEL[script] * batch)), 0)


def fitting_settings(model: ModelSize, hw: tuple[int, int], script: str, limit_gb: float,
                     batch: int = 1) -> TileSettings | None:
    """The first (largest-tile) candidate settings whose estimate fits ``limit_gb``; None if none does."""
    for tiles in CANDIDATES:
        if estimate_peak_gb(model, hw, script, tiles, batch) <= limit_gb:
            return tiles
    return None


def check_fits(model: ModelSize, hw: tuple[int, int], script: str, tiles: TileSettings, limit_gb: float,
               batch: int = 1) -> None:
    """Raise ValueError naming settings that would fit when the estimate exceeds ``inference.max_memory_gb``."""
    need = estimate_peak_gb(model, hw, script, tiles, batch)
    if need <= limit_gb:
        return
    better = fitting_settings(model, hw, script, limit_gb, batch)
    if better is not None:
        fits = estimate_peak_gb(model, hw, script, better, batch)
        hint = f"settings that fit (~{fits:.1f} GB): --set {better.overrides(script)}"
    else:
        smallest = CANDIDATES[-1]
        side = int(largest_pixels(model, script, smallest, limit_gb, batch) ** 0.5) // 64 * 64
        hint = (f"no tile setting fits; with --set {smallest.overrides(script)} images up to about {side}x{side} "
                f"(inference.max_pixels={side * side}) fit")
    images = f"a {hw[1]}x{hw[0]} (padded) image" if batch == 1 else f"{batch} {hw[1]}x{hw[0]} (padded) images"
    raise ValueError(f"{script} on {images} needs ~{need:.1f} GB, above "
                     f"inference.max_memory_gb={limit_gb:g}; {hint}")


def budget_table(cfg: DictConfig, gpu_gb: float, sizes: dict[str, tuple[int, int]],
                 headroom_gb: float = CUDA_HEADROOM_GB) -> str:
    """Text table: the full-size model of ``cfg`` in fp16 at each size, the estimate with the config's settings
    (``inference.tiled: auto`` leaves images up to ``tile_threshold`` untiled) and, where that does not fit in
    ``gpu_gb`` less ``headroom_gb``, the largest candidate tiles that do."""
    model = ModelSize.from_config(cfg, torch.float16)
    usable = gpu_gb - headroom_gb
    lines = [f"computed budget, full-size model ({model.weight_bytes / 1e9:.2f} GB of weights, denoiser fp16), "
             f"{gpu_gb:g} GB GPU less {headroom_gb:g} GB for the CUDA context (pipelines.memory estimate):",
             f"{'script':>8} {'size':>4} {'H×W':>10} {'config GB':>10}  fits with"]
    inf = InferenceSettings.from_config(cfg)
    default = tile_settings(cfg, inf)
    for script in ("stage2", "accsamp", "hazegen"):
        for name, (h, w) in sizes.items():
            hw = (-(-h // 64) * 64, -(-w // 64) * 64)
            tiled = inf.tiled is True or (inf.tiled == "auto" and max(hw) > inf.tile_threshold)
            need = estimate_peak_gb(model, hw, script, default if tiled else whole_image(hw))
            tiles = fitting_settings(model, hw, script, usable)
            fit = "the config" if need <= usable else (tiles.overrides(script) if tiles else "does not fit")
            lines.append(f"{script:>8} {name:>4} {f'{h}×{w}':>10} {need:>10.1f}  {fit}")
    for script in ("stage2", "accsamp", "hazegen"):
        most = largest_pixels(model, script, default, usable)
        lines.append(f"{script}: largest image with the config's tiles ~{most / 1e6:.0f} MP "
                     f"(inference.max_pixels caps it: 16.8 MP by default)")
    return "\n".join(lines)


def whole_image(hw: tuple[int, int]) -> TileSettings:
    """The settings that describe an untiled run: one tile the size of the padded H×W image."""
    return TileSettings(max(hw), max(hw) // 8, max(hw))


def tile_settings(cfg: DictConfig, inf: InferenceSettings) -> TileSettings:
    """The TileSettings of a run: its inference settings ``inf`` and the config's guidance section."""
    guidance = (cfg.get("guidance") or {}).get("params") or {}
    return replace(TileSettings(), vae_tile=inf.vae_tile_size, latent_tile=inf.latent_tile_size,
                   guidance_tile=int(guidance.get("tile_size", 512)))


def memory_check(runner: "DiffusionRunner", script: str) -> Callable[[tuple[int, int], int], None]:
    """The check a diffusion script (``script``: stage2 | accsamp | hazegen) runs before sampling each batch:
    ``check(latent_hw, batch)`` raises ValueError naming settings that fit when the estimated peak on ``batch``
    images of latent size (h, w) exceeds ``inference.max_memory_gb``; a no-op when that is null. Images the
    runner does not tile are estimated with one tile the size of the image. The settings are the runner's
    (``runner.cfg``, ``runner.settings``)."""
    limit_gb = runner.settings.max_memory_gb
    if limit_gb is None:
        return lambda latent_hw, batch: None
    model_size = ModelSize.from_model(runner.model, runner.cfg, runner.dtype)
    configured = tile_settings(runner.cfg, runner.settings)

    def check(latent_hw: tuple[int, int], batch: int) -> None:
        hw = (int(latent_hw[0]) * 8, int(latent_hw[1]) * 8)
        tiles = configured if runner.use_tiles(hw) else whole_image(hw)
        check_fits(model_size, hw, script, tiles, limit_gb, batch)

    return check


class LiveTensorBytes(TorchDispatchMode):
    """Count the bytes of tensor storages created inside the context while they are alive (``live``) and their
    high-water mark (``peak``): the figure ``torch.cuda.max_memory_allocated`` reports above its starting point,
    without the allocator's rounding or kernel workspaces. Works on the meta device, so the working set of the
    full-size model is counted from the real code without allocating or computing anything. Storages made before
    entering (weights, inputs) are not counted, nor are views and in-place results (an output sharing an input's
    storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self._seen or id(storage) in inputs:  # counted already, or a view / in-place result
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            weakref.finalize(storage, self._release, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out
