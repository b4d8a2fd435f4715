"""Inference overhead of the HCD-YC YCbCr fusion: one ControlNet+UNet step with fusion off vs on.

Full-size architecture (configs/inference/stage2.yaml model section) with random weights; no checkpoint needed.
Also times the YCbCr branch itself (run once per image, not per step).

    python -m benchmarks.bench_fusion --sizes 256 512 --repeats 2 [--device cuda --precision fp16]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import sync
from model.builder import cldm_config
from utils.common import choose_device, choose_dtype, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
FUSION = "model.cldm.params.controlnet_cfg.params.ycbcr_fusion"


def make_inputs(model, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict, float]:
    """Noisy latent, timestep and condition for one image; also the YCbCr branch time (run once per image)."""
    cond01 = torch.rand(1, 3, size, size, device=device)
    x = torch.randn(1, 4, size // 8, size // 8, device=device)
    with torch.no_grad():
        cond = {"c_txt": model.clip(["remove dense fog"]), "c_img": torch.randn_like(x)}
        branch = float("nan")
        if model.controlnet.ycbcr is not None:
            start = time.perf_counter()
            cond["c_ycbcr"] = model.controlnet.ycbcr.encode(cond01)
            sync(device)
            branch = time.perf_counter() - start
    return x, torch.tensor([500], device=device), cond, branch


def step_flops(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> float:
    """GFLOPs of one ControlNet+UNet forward (torch's FlopCounterMode: matmuls, convs, attention)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, cond)
    return counter.get_total_flops() / 1e9


def time_steps(models: dict, inputs: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per step; the variants are interleaved so machine load hits both alike."""
    best = {name: float("inf") for name in models}
    with torch.no_grad():
        for name, model in models.items():
            model(*inputs[name][:3])
        for _ in range(repeats):
            for name, model in models.items():
                sync(device)
                start = time.perf_counter()
                model(*inputs[name][:3])
                sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    device = choose_device(args.device)
    dtype = choose_dtype(args.precision, device)
    print(f"device={device} dtype={dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'size':>6} {'fusion':>7} {'GFLOP':>9} {'s/step':>9} {'branch s':>9} {'peak GB':>8} {'overhead (flop / time)':>24}")
    models = {}
    for fusion in (False, True):
        cfg = load_config(ROOT / "configs/inference/stage2.yaml", [f"{FUSION}={fusion}"])
        torch.manual_seed(0)
        models[fusion] = instantiate_from_config(cldm_config(cfg.model)).eval().to(device)
        if dtype != torch.float32:
            models[fusion].cast_denoiser(dtype)
    for size in args.sizes:
        inputs = {name: make_inputs(model, size, device) for name, model in models.items()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(models, inputs, device, args.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        flops = {name: step_flops(model, *inputs[name][:3]) for name, model in models.items()}
        for fusion in (False, True):
            over = (f"{100 * (flops[True] / flops[False] - 1):+.1f}% / {100 * (times[True] / times[False] - 1):+.1f}%"
                    if fusion else "-")
            print(f"{size:>6} {str(fusion):>7} {flops[fusion]:>9.1f} {times[fusion]:>9.3f} "
                  f"{inputs[fusion][3]:>9.3f} {peak:>8.2f} {over:>24}")


if __name__ == "__main__":
    main()
