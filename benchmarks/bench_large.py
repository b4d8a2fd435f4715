"""Large images end to end: peak memory and seconds of stage 2, AccSamp and HazeGen at 1K-8K (reduced model).

Each (script, size) case runs the real inference script's ``run`` (its pipeline module, ``pipelines.registry``) on one
synthetic image in a FRESH subprocess (``python -m benchmarks.bench_large --worker ...`` in the repository root), with
the reduced random model (``configs/tiny/model.yaml``) written in the release checkpoint formats, tiling forced on
(``inference.tiled: True``) and ``inference.max_pixels`` lifted for 8K. Peak memory: on CPU the subprocess's
``ru_maxrss`` (resident set high-water mark, runtime and weights included); on CUDA ``max_memory_allocated``.

Sizes: 1K = 1024², 2K = 2048², 4K = 2160×3840, 8K = 4320×7680 (padded to multiples of 64 by the scripts).
After the table it prints the AccSamp 4K/1K peak ratio and the computed budget of the FULL-SIZE model in fp16 on a
24 GB GPU (``pipelines.memory.estimate_peak_gb``: which sizes fit and with which tile settings).

Usage: python -m benchmarks.bench_large [--device cpu|cuda] [--sizes 1K 2K 4K 8K] [--cases stage2 accsamp hazegen]
           [--steps 10] [--threads N] [--timeout-s S] [--gpu-gb 24]
       python -m benchmarks.bench_large --calibrate   # count the tile coefficients of pipelines.memory (meta device)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from model.builder import cldm_config
from model.cldm import SD_PREFIXES
from pipelines.memory import budget_table
from pipelines.registry import pipeline_for
from pipelines.settings import InferenceSettings
from utils.common import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (2160, 3840), "8K": (4320, 7680)}
CASES = {"stage2": ("inference_stage2", "configs/inference/stage2.yaml"),
         "accsamp": ("inference_accsamp", "configs/inference/stage2_accsamp.yaml"),
         "hazegen": ("inference_stage1", "configs/inference/stage1.yaml")}
TINY = ROOT / "configs" / "tiny" / "model.yaml"


def write_tiny_weights(folder: Path) -> tuple[Path, Path]:
    """The reduced model of ``configs/tiny/model.yaml`` (built after ``torch.manual_seed(11)``) with random non-zero
    UNet and ControlNet weights (N(0, 0.02²) from generators seeded 12 and 13, zero-initialised layers included),
    written in the release formats: ``sd.ckpt`` as ``{"state_dict": ..., "global_step": 1}`` with the prefixed
    unet/vae/clip tensors of an SD checkpoint plus the LDM buffers ``betas`` and ``model_ema.decay``, and
    ``controlnet.pt`` (flat ControlNet state dict). Returns the two paths."""
    torch.manual_seed(11)
    model = instantiate_from_config(cldm_config(OmegaConf.load(TINY).model))
    with torch.no_grad():
        for module, seed in ((model.unet, 12), (model.controlnet, 13)):
            gen = torch.Generator().manual_seed(seed)
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    sd = {prefix + key: value.clone() for name, prefix in SD_PREFIXES.items()
          for key, value in getattr(model, name).state_dict().items()}
    sd["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    folder.mkdir(parents=True, exist_ok=True)
    sd_path, cn_path = folder / "sd.ckpt", folder / "controlnet.pt"
    torch.save({"state_dict": sd, "global_step": 1}, sd_path)
    torch.save(model.controlnet_state_dict(), cn_path)
    return sd_path, cn_path


def write_inputs(work: Path, sizes: list[str]) -> None:
    """Reduced random model in the release formats (sd.ckpt, controlnet.pt) and one smooth image per size."""
    write_tiny_weights(work / "weights")
    rng = np.random.default_rng(0)
    for name in sizes:
        h, w = SIZES[name]
        folder = work / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 255, (h // 64, w // 64, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(folder / f"{name}.png")


def case_config(case: str, size: str, work: Path, args: argparse.Namespace):
    cfg = load_config(ROOT / CASES[case][1])
    cfg.model = OmegaConf.load(TINY).model
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([
        f"inference.sd_path={work / 'weights' / 'sd.ckpt'}",
        f"inference.controlnet_path={work / 'weights' / 'controlnet.pt'}",
        f"inference.image_folder={work / 'images' / size}", f"inference.result_folder={work / 'out' / case / size}",
        f"inference.steps={args.steps}", f"inference.device={args.device}", "inference.tiled=True",
        "inference.max_pixels=100000000"]))


def worker(args: argparse.Namespace) -> None:
    """Run one case (its script's pipeline module) in this process; print seconds and peak memory as one JSON
    line."""
    device = torch.device(args.device)
    cfg = case_config(args.worker, args.size, Path(args.work), args)
    module = pipeline_for(CASES[args.worker][0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    settings = InferenceSettings.from_config(cfg)
    status = module.run(cfg, settings, argparse.Namespace(skip_existing=False, show_steps=False))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak_mb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(json.dumps({"status": status, "seconds": seconds, "peak_mb": peak_mb}))


def calibrate() -> None:
    """Count the tile working sets of pipelines.memory for the FULL-SIZE model: peak live tensor bytes of the real code
    (VAE encode/decode, the guidance's tiled decoder VJP, one denoiser tile in fp16, one MS-SSIM gradient crop) on the
    meta device (``pipelines.memory.LiveTensorBytes``; nothing is allocated or computed), divided by the units of the
    coefficients. Prints them as one JSON line."""
    from metrics.ssim import ms_ssim
    from pipelines.memory import MSSSIM_HALO, LiveTensorBytes
    from pipelines.tiling import TiledDenoiser, tiled_vjp

    cfg = load_config(ROOT / "configs" / "inference" / "stage2_accsamp.yaml")
    meta = torch.device("meta")
    with meta:
        model = instantiate_from_config(cldm_config(cfg.model)).eval()
    model.cast_denoiser(torch.float16)
    vae_ch = int(cfg.model.cldm.params.vae_cfg.params.ddconfig.ch)
    unet_ch = int(cfg.model.cldm.params.unet_cfg.params.model_channels)

    def peak(fn: Callable[[], object]) -> float:
        with LiveTensorBytes() as count:
            fn()
        return float(count.peak)

    z = torch.randn(1, 4, 64, 64, device=meta)
    img = torch.randn(1, 3, 512, 512, device=meta)
    cond = {"c_txt": torch.randn(1, 77, 1024, device=meta), "c_img": torch.randn(1, 4, 64, 64, device=meta)}
    t = torch.full((1,), 500, device=meta, dtype=torch.long)
    side = 512 + MSSSIM_HALO
    crop = torch.rand(1, 3, side, side, device=meta)

    def msssim() -> None:
        leaf = crop.clone().requires_grad_(True)
        torch.autograd.grad(ms_ssim(leaf, crop, normalize=True).sum(), leaf)

    def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """What a fused CUDA attention kernel (flash / memory-efficient) allocates: the output and the fp32
        log-sum-exp per query, no (Nq, Nk) matrix. On the meta device SDPA itself runs its math decomposition."""
        torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        return torch.empty_like(q)

    with torch.no_grad():
        encode = peak(lambda: model.vae_encode(img, sample=False))
        decode = peak(lambda: model.vae_decode(z))
        denoise_math = peak(lambda: TiledDenoiser(model, 64, 32)(z, t, cond))
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", fused_attention):
            denoise = peak(lambda: TiledDenoiser(model, 64, 32)(z, t, cond))
    vjp = peak(lambda: tiled_vjp(model.vae_decode, z, img, 64, 56, 8))
    unit, latent_unit = vae_ch * 512 ** 2, unet_ch * 64 ** 2 * 2
    print(json.dumps({"VAE_ENCODE_COEF": encode / unit, "VAE_DECODE_COEF": decode / unit, "VAE_VJP_COEF": vjp / unit,
                      "DENOISER_COEF": denoise / latent_unit,
                      "DENOISER_MATH_ATTENTION_COEF": denoise_math / latent_unit,
                      "MSSSIM_COEF": peak(msssim) / side ** 2}))


def spawn(case: str, size: str, work: Path, args: argparse.Namespace) -> dict | str:
    cmd = [sys.executable, "-m", "benchmarks.bench_large", "--worker", case, "--size", size, "--work", str(work),
           "--device", args.device, "--steps", str(args.steps), "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timeout after {args.timeout_s:g} s"
    if proc.returncode != 0:
        return f"rc {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result if result["status"] == 0 else f"script exit {result['status']}: " + proc.stderr[-300:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (AccSamp: τ, ω of the config)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per case")
    parser.add_argument("--gpu-gb", type=float, default=24.0, help="GPU memory for the full-size budget")
    parser.add_argument("--calibrate", action="store_true",
                        help="count the pipelines.memory tile coefficients of the full-size model (meta device) and exit")
    parser.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    if args.calibrate:
        calibrate()
        return
    device = torch.device(args.device)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    mem = "CUDA max_memory_allocated" if device.type == "cuda" else "CPU ru_maxrss of a fresh subprocess"
    print(f"device={device}{gpu} torch={torch.__version__} threads={torch.get_num_threads()} steps={args.steps} "
          f"model=configs/tiny/model.yaml (random, release formats) tiled=True peak={mem}", flush=True)
    header = f"{'case':>8} {'size':>4} {'H×W':>10} {'seconds':>9} {'peak MB':>9}"
    print(header)
    print("-" * len(header))
    peaks: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_large_") as tmp:
        work = Path(tmp)
        write_inputs(work, args.sizes)
        for case in args.cases:
            for size in args.sizes:
                h, w = SIZES[size]
                res = spawn(case, size, work, args)
                label = f"{case:>8} {size:>4} {f'{h}×{w}':>10}"
                if isinstance(res, str):
                    print(f"{label}  failed: {res}", flush=True)
                    continue
                peaks[(case, size)] = res["peak_mb"]
                print(f"{label} {res['seconds']:>9.1f} {res['peak_mb']:>9.0f}", flush=True)
    for case in args.cases:
        if (case, "1K") in peaks and (case, "4K") in peaks:
            print(f"{case}: 4K / 1K peak = {peaks[(case, '4K')] / peaks[(case, '1K')]:.2f}")
    print()
    full = load_config(ROOT / "configs" / "inference" / "stage2_accsamp.yaml")
    print(budget_table(full, args.gpu_gb, {name: SIZES[name] for name in SIZES}))


if __name__ == "__main__":
    main()
