"""Inference overhead of the HCD-YC YCbCr fusion: one ControlNet+UNet step with fusion off vs on.

Full-size architecture (configs/inference/stage2.yaml model section) with random weights; no checkpoint needed.
Also times the YCbCr branch itself (run once per image, not per step).

    python benchmarks/bench_fusion.py --sizes 256 512 --repeats 2 [--device cuda --precision fp16]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.common import choose_device, choose_dtype, instantiate_from_config, load_config  # noqa: E402

FUSION = "model.cldm.params.controlnet_cfg.params.ycbcr_fusion"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(model, size: int, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(seconds per denoiser step, seconds for prepare_condition's YCbCr branch, peak GB on CUDA else nan)."""
    cond01 = torch.rand(1, 3, size, size, device=device)
    x = torch.randn(1, 4, size // 8, size // 8, device=device)
    t = torch.tensor([500], device=device)
    with torch.no_grad():
        c_txt = model.clip(["remove dense fog"])
        cond = {"c_txt": c_txt, "c_img": torch.randn_like(x)}
        branch = float("nan")
        if model.controlnet.ycbcr is not None:
            start = time.perf_counter()
            cond["c_ycbcr"] = model.controlnet.ycbcr.encode(cond01.to(next(model.controlnet.parameters()).dtype))
            _sync(device)
            branch = time.perf_counter() - start
        model(x, t, cond)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x, t, cond)
        _sync(device)
        per_step = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return per_step, branch, peak


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
    print(f"{'size':>6} {'fusion':>7} {'s/step':>9} {'branch s':>9} {'peak GB':>8} {'overhead':>9}")
    for size in args.sizes:
        base_time = None
        for fusion in (False, True):
            cfg = load_config(Path(__file__).resolve().parents[1] / "configs/inference/stage2.yaml",
                              [f"{FUSION}={fusion}"])
            torch.manual_seed(0)
            model = instantiate_from_config(cfg.model.cldm).eval().to(device)
            if dtype != torch.float32:
                model.cast_denoiser(dtype)
            per_step, branch, peak = time_step(model, size, device, args.repeats)
            base_time = per_step if not fusion else base_time
            overhead = f"{100 * (per_step / base_time - 1):+.1f}%" if fusion else "-"
            print(f"{size:>6} {str(fusion):>7} {per_step:>9.3f} {branch:>9.3f} {peak:>8.2f} {overhead:>9}")
            del model


if __name__ == "__main__":
    main()
