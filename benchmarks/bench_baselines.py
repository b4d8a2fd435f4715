"""Inference cost of the feed-forward baselines: seconds per image and peak memory at 256², 1K and 4K.

    python -m benchmarks.bench_baselines                                   # every model, 256 1k 4k, CPU
    python -m benchmarks.bench_baselines --models aodnet mscnn --sizes 256 1k --threads 2 --repeats 3

Full-size networks (the ``network`` sections of ``configs/inference/baseline_*.yaml``) with random weights (the cost
does not depend on the values), fp32, batch 1, through the inference pipeline's own function
(:func:`pipelines.baseline.run_network` + MSCNN's dehazing), with that config's tiling settings (tiled above a
2048 px long side: 1024 px tiles at stride 896). Each (model, size) runs in its own subprocess: ``time s`` is the best
of ``--repeats`` calls after ``--warmup`` untimed ones (``--clock cpu``: the process's CPU time, which other load on a
shared machine does not inflate), ``peak MB`` the subprocess's ``ru_maxrss`` (CPU; weights and
runtime included) or CUDA ``max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from benchmarks.timing import timed
from pipelines.baseline import run_network
from pipelines.settings import InferenceSettings
from utils.common import choose_device, instantiate_from_config, load_config

MODELS = {
    "aodnet": "configs/inference/baseline_aodnet.yaml",
    "mscnn": "configs/inference/baseline_mscnn.yaml",
    "dehazeformer_t": "configs/inference/baseline_dehazeformer_t.yaml",
    "dehazeformer_s": "configs/inference/baseline_dehazeformer_t.yaml:s",
    "dehazeformer_b": "configs/inference/baseline_dehazeformer_t.yaml:b",
    "deblurgan": "configs/inference/baseline_deblurgan.yaml",
}
"""Model name -> inference config (``:size`` sets DehazeFormer's size)."""
SIZES = {"256": (256, 256), "1k": (1024, 1024), "4k": (2160, 3840)}
"""Size name -> (H, W)."""


def build(name: str) -> tuple[torch.nn.Module, InferenceSettings]:
    """The model ``name`` with random weights and its config's inference settings."""
    path, _, size = MODELS[name].partition(":")
    cfg = load_config(path)
    if size:
        cfg.network.params.size = size
    torch.manual_seed(0)
    return instantiate_from_config(cfg.network).eval(), InferenceSettings.from_config(cfg)


def worker(args: argparse.Namespace) -> None:
    """One (model, size) case in this process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    net, inf = build(args.models[0])
    net.to(device)
    h, w = SIZES[args.sizes[0]]
    img = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def call() -> None:
        out = run_network(net, img, inf)
        if hasattr(net, "dehaze"):
            net.dehaze(img, out)

    for _ in range(args.warmup):
        call()
    seconds = min(timed(call, device, args.clock) for _ in range(args.repeats))
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    tiled = inf.tiled if isinstance(inf.tiled, bool) else max(h, w) > inf.tile_threshold
    print(json.dumps({"model": args.models[0], "size": args.sizes[0], "seconds": seconds, "peak_mb": peak,
                      "params": sum(p.numel() for p in net.parameters()), "tiled": bool(tiled)}))


def spawn(model: str, size: str, args: argparse.Namespace) -> dict | str:
    """Run one case in a subprocess: its JSON result, or a short reason it gave none."""
    cmd = [sys.executable, "-m", "benchmarks.bench_baselines", "--worker", "--models", model, "--sizes", size,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--device", args.device, "--clock", args.clock]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return f"> {args.timeout_s} s"
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1][:60]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall clock, or this process's CPU time (not inflated by other load; use 1 thread)")
    parser.add_argument("--timeout-s", type=int, default=1800)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"device {args.device}, fp32, batch 1, {args.threads} threads, {args.clock} clock, best of {args.repeats} "
          f"(warm-up {args.warmup}), random weights; {time.strftime('%H:%M:%S')}", flush=True)
    rows = []
    for model in args.models:
        for size in args.sizes:
            result = spawn(model, size, args)
            rows.append((model, size, result))
            print(f"  {model} {size}: {result}", flush=True)
    print("\n| model | params | size | time s | peak MB | tiled |\n|---|---:|---|---:|---:|---|")
    for model, size, r in rows:
        h, w = SIZES[size]
        if isinstance(r, dict):
            print(f"| {model} | {r['params']:,} | {w}x{h} | {r['seconds']:.3f} | {r['peak_mb']:.0f} | "
                  f"{'yes' if r['tiled'] else 'no'} |")
        else:
            print(f"| {model} | | {w}x{h} | {r} | | |")


if __name__ == "__main__":
    main()
