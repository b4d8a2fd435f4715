"""Shared builders for tests: tiny random-init models, checkpoints written in the release formats, and configs for
running the inference scripts on them (the fixtures that use these are in ``tests/conftest.py``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from model.builder import cldm_config
from model.cldm import SD_PREFIXES, ControlLDM
from model.gaussian_diffusion import Diffusion
from model.onestep import LoRADenoiser
from utils.common import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "configs" / "tiny" / "model.yaml"
REAL_HAZY_SMALL = ROOT / "tests" / "data" / "real_hazy"
SCRIPTS = {
    "stage2": ("inference_stage2.py", "configs/inference/stage2.yaml"),
    "accsamp": ("inference_accsamp.py", "configs/inference/stage2_accsamp.yaml"),
    "stage1": ("inference_stage1.py", "configs/inference/stage1.yaml"),
    "onestep": ("inference_onestep.py", "configs/inference/stage2_onestep.yaml"),
}
"""Entry script and published config of each diffusion inference job the tests run."""


def manifest(name: str) -> dict[str, list[int]]:
    """A key manifest of ``tests/data`` (name, shape, dtype per line) as {tensor name: shape}."""
    out = {}
    for line in (ROOT / "tests" / "data" / name).read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return out


def tiny_config(base: str = "configs/inference/stage2.yaml", **overrides):
    """A published config (its ``base:`` chain resolved) with its ``model`` section replaced by the tiny model;
    dotlist-style overrides."""
    cfg = load_config(ROOT / base)
    cfg.model = OmegaConf.load(TINY_MODEL).model
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    return cfg


def build_tiny(seed: int = 0, cfg=None) -> ControlLDM:
    torch.manual_seed(seed)
    cfg = cfg if cfg is not None else tiny_config()
    return instantiate_from_config(cldm_config(cfg.model))


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Give every parameter non-trivial random values (zero-init layers included) so equalities are meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def ldm_state_dict(model: ControlLDM) -> dict[str, torch.Tensor]:
    """The SD checkpoint layout: prefixed unet/vae/clip tensors."""
    sd = {}
    for name, prefix in SD_PREFIXES.items():
        sd.update({prefix + k: v.clone() for k, v in getattr(model, name).state_dict().items()})
    return sd


def write_release_checkpoints(model: ControlLDM, folder: Path, extra_sd_keys: bool = True) -> tuple[Path, Path]:
    """Write ``sd.ckpt`` as ``{"state_dict": {...}}`` (with LDM extra buffers) and ``controlnet.pt`` (flat)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = ldm_state_dict(model)
    if extra_sd_keys:
        sd["betas"] = torch.linspace(1e-4, 2e-2, 1000)
        sd["model_ema.decay"] = torch.tensor(0.9999)
    sd_path, cn_path = folder / "sd.ckpt", folder / "controlnet.pt"
    torch.save({"state_dict": sd, "global_step": 1}, sd_path)
    torch.save(model.controlnet_state_dict(), cn_path)
    return sd_path, cn_path


def write_tiny_release_weights(folder: Path) -> tuple[Path, Path]:
    """The tiny model with random non-zero UNet/ControlNet weights (seeds 11-13) written in the release formats."""
    model = build_tiny(seed=11)
    randomize_(model.unet, seed=12, std=0.02)
    randomize_(model.controlnet, seed=13, std=0.02)
    return write_release_checkpoints(model, folder)


def make_config(tmp_path: Path, which: str, weights, images: Path, results: Path, **extra) -> Path:
    """The published config of script ``which`` on the tiny model with ``weights`` (sd, controlnet), 10 steps on the
    CPU, short side 64, written to ``tmp_path/<which>.yaml``; ``extra``: dotted overrides."""
    cfg = tiny_config(SCRIPTS[which][1], **{
        "inference.sd_path": weights[0], "inference.controlnet_path": weights[1],
        "inference.image_folder": images, "inference.result_folder": results,
        "inference.steps": 10, "inference.device": "cpu", "inference.min_short_side": 64, **extra})
    path = tmp_path / f"{which}.yaml"
    OmegaConf.save(cfg, path)
    return path


def run_script(which: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    """``python <script of which> --config <config> <args>`` from the repository root, to the end."""
    return subprocess.run([sys.executable, SCRIPTS[which][0], "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def teacher_and_diffusion(seed: int = 0) -> tuple[ControlLDM, Diffusion]:
    """A tiny stage-2 ControlLDM with every weight random and non-zero (zero-init layers included)."""
    ldm = build_tiny(seed)
    randomize_(ldm.unet, seed + 1)
    randomize_(ldm.controlnet, seed + 2)
    return ldm.eval(), instantiate_from_config(tiny_config().model.diffusion)


def randomize_adapters_(denoiser: LoRADenoiser, seed: int) -> None:
    """Add N(0, 0.05²) noise to every trainable tensor of ``denoiser`` (its adapters: B leaves zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def write_png16(path: Path, rgb: np.ndarray) -> Path:
    """(H,W,3) uint16 RGB -> a 16-bit colour PNG (OpenCV writes BGR order)."""
    import cv2

    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return path


def sixteen_bit_gradient(width: int = 1024) -> np.ndarray:
    """(8,width,3) uint16: a horizontal 0..65535 ramp per channel (channels offset), finer than 8-bit steps."""
    ramp = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.stack([np.tile(ramp, (8, 1)), np.tile(ramp[::-1], (8, 1)), np.tile((ramp // 2) + 1000, (8, 1))], -1)
