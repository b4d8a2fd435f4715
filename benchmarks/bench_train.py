"""Benchmark one training step (forward + backward + AdamW) of the ControlNet, with and without each extension.

Each case runs in its own subprocess, so peak memory belongs to that case alone: on CUDA
torch.cuda.max_memory_allocated, on CPU the process high-water mark (ru_maxrss, which includes the
Python/torch runtime and the model). Models have random weights (no checkpoint files needed; the VGG
of the feature/semantic cycle levels is random too): timings, not quality. "step" is the median over
--steps steps after --warmup steps. The batch is random smooth images in the stage-2 layout.

Cases: base (published loss), cycle_pixel, cycle (pixel + VGG feature + semantic), text_processor,
dynamic_prompt, align (alignment + the dynamic prompts it needs), ycbcr (YCbCr fusion), all.

    python -m benchmarks.bench_train                          # tiny model, CPU, 64x64 crops
    python -m benchmarks.bench_train --full --size 512 --precision fp16 bf16 --grad-ckpt on off   # GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from benchmarks.timing import peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, dict] = {
    "base": {},
    "cycle_pixel": {"cycle_weight": 1.0, "feature_weight": 0.0, "semantic_weight": 0.0},
    "cycle": {"cycle_weight": 1.0},
    "text_processor": {"text_processor": True, "text_processor_start": 0},
    "dynamic_prompt": {"use_dynamic_prompt": True},
    "align": {"use_dynamic_prompt": True, "text_align_weight": 0.05},
    "ycbcr": {"ycbcr": True},
    "all": {"cycle_weight": 1.0, "text_processor": True, "text_processor_start": 0, "use_dynamic_prompt": True,
            "text_align_weight": 0.05, "ycbcr": True},
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_case(case: str, full: bool, size: int, batch: int, device: torch.device, grad_ckpt: bool, crop: int | None):
    """(TrainingStep, optimizer, batch) for one case, random weights, on ``device``."""
    from model.builder import cldm_config
    from training.settings import ExtensionSettings
    from training.step import TrainingStep, build_cycle_loss, image_embedder_for
    from training.trainer import set_gradient_checkpointing
    from utils.common import instantiate_from_config, load_config

    keys = dict(CASES[case])
    fusion = keys.pop("ycbcr", False)
    text_processor = keys.pop("text_processor", False)
    ext = ExtensionSettings(cycle_crop=crop, **keys)
    cfg = load_config(ROOT / "configs" / "train" / "stage2.yaml")
    if not full:
        cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(ROOT / "configs" / "tiny" / "model.yaml").model)
    cfg.model.cldm.params.controlnet_cfg.params.ycbcr_fusion = fusion
    cfg.model.cldm.params.text_processor = text_processor
    torch.manual_seed(0)
    ldm = instantiate_from_config(cldm_config(cfg.model))
    ldm.load_controlnet_from_unet()
    set_gradient_checkpointing(ldm, grad_ckpt)
    diffusion = instantiate_from_config(cfg.model.diffusion)
    step = TrainingStep(ldm, diffusion, 2, ext, build_cycle_loss(ext, allow_random_vgg=True),
                        image_embedder_for(ldm, ext)).to_device(device)
    opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    clean = F.interpolate(torch.rand(batch, 3, 8, 8, generator=gen), size=(size, size), mode="bilinear",
                          align_corners=False)
    hazy = clean * 0.6 + 0.35
    data = {"target": (clean * 2 - 1).to(device), "condition": hazy.to(device), "hazy_ref": hazy.to(device),
            "is_cond": torch.ones(batch, dtype=torch.bool, device=device), "prompt": ["remove dense fog"] * batch}
    return step, opt, data


def run_case(args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps of one case in this process."""
    import random

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    step, opt, data = build_case(args.case, args.full, args.size, args.batch, device, args.grad_ckpt == "on",
                                 args.cycle_crop)
    dtype = DTYPES[args.precision]
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(i)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = step(data, 10_000, gen, random.Random(i))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = peak_rss_mb()
    return {"step_s": statistics.median(times), "peak_mb": peak_mb, "terms": sorted(out["terms"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--full", action="store_true", help="full-size SD-2.1 model (random weights)")
    parser.add_argument("--size", type=int, default=None, help="crop side in pixels (default 64 tiny, 512 full)")
    parser.add_argument("--batch", type=int, default=None, help="per-process batch (default 4 tiny, 2 full)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="*", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--grad-ckpt", nargs="*", default=["on"], choices=["on", "off"])
    parser.add_argument("--cycle-crop", type=int, default=None, help="latent crop of the cycle decode (default: "
                        "none for tiny, 32 for full)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (512 if args.full else 64)
    args.batch = args.batch or (2 if args.full else 4)
    if args.cycle_crop is None and args.full:
        args.cycle_crop = 32
    if args.worker:
        args.precision, args.grad_ckpt = args.precision[0], args.grad_ckpt[0]
        print(json.dumps(run_case(args)))
        return
    if args.full and not args.device.startswith("cuda"):
        parser.error("--full needs a CUDA device (the full model is far too slow on CPU)")

    model = "full SD-2.1" if args.full else "tiny"
    print(f"training step, {model} model, {args.size}x{args.size}, batch {args.batch}, device {args.device}, "
          f"threads {args.threads or torch.get_num_threads()}, median of {args.steps} steps")
    print(f"{'case':<16}{'precision':<10}{'grad ckpt':<10}{'step (s)':>10}{'peak MB':>10}  terms")
    for precision in args.precision:
        for ckpt in args.grad_ckpt:
            base = None
            for case in args.cases:
                cmd = [sys.executable, "-m", "benchmarks.bench_train", "--worker", "--case", case,
                       "--size", str(args.size), "--batch", str(args.batch), "--device", args.device, "--precision", precision, "--grad-ckpt", ckpt,
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
                if args.full:
                    cmd.append("--full")
                if args.cycle_crop is not None:
                    cmd += ["--cycle-crop", str(args.cycle_crop)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    print(f"{case:<16}{precision:<10}{ckpt:<10}  failed: {proc.stderr.strip().splitlines()[-1]}")
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                base = res["step_s"] if case == "base" else base
                rel = f" ({res['step_s'] / base:.2f}x base)" if base and case != "base" else ""
                print(f"{case:<16}{precision:<10}{ckpt:<10}{res['step_s']:>10.3f}{res['peak_mb']:>10.0f}  "
                      f"{'+'.join(res['terms'])}{rel}")


if __name__ == "__main__":
    main()
