"""Benchmark the denoiser step (ControlNet + UNet forward, no grad) against the same architecture with every
optimisation switched off, interleaved in one process.

The model is the FULL-SIZE SD-2.1 UNet + IRControlNet of ``configs/inference/stage2.yaml`` with random weights
(no checkpoint files; the cost does not depend on the weight values; the zero-initialised layers get random values
too, so outputs can be compared; the unused VAE and text encoder are the tiny test ones), batch 1, square latents,
random text embedding and condition latent. Variants (same weights, switched in place between calls):

  baseline       math attention (explicit softmax), NCHW weights, no weight packing: every optimisation off
  sdpa           torch's fused scaled_dot_product_attention
  channels_last  channels-last (NHWC) conv weights (``ControlLDM.set_channels_last``)
  cl+packed      channels-last + conv weights pre-packed for oneDNN once instead of reordered on every call
                 (``ControlLDM.set_weight_packing``; fp32 CPU only, elsewhere the same as channels_last)
  sdpa+cl        SDPA + channels-last (the project's setting before weight packing)
  project        what the inference scripts run by default: SDPA + channels-last + weight packing
  compiled       project + ``torch.compile`` (only with ``--compile``; the inference key ``inference.compile``);
                 the first call, which compiles, is timed on its own (wall clock) and reported, not counted in the step

Each round times one step of every variant in turn (interleaved, so load changes hit all variants alike); the
median over ``--repeats`` rounds after ``--warmup`` rounds is reported with its ratio to the baseline, and every
variant's output is compared with the baseline's (max |Δ| relative to max |baseline|). ``--variants`` times a
subset (the baseline always runs). ``--clock cpu`` reports the process's CPU time instead of wall-clock time: on a
machine shared with other jobs, time spent waiting for a core then does not count (use it with ``--threads 1``,
where it is the work of the step itself; with more threads, threads waiting for each other add to it).

"image-only work" times, at the project setting, what a step recomputes although it depends only on the image
and prompt, not on the noisy latent: the text K/V projections of every cross-attention layer and the condition
latent's share of the ControlNet's first convolution. (The timestep embedding depends on the step.) Its share of
the step is the most that caching it could save.

``--batches 1 4 8`` adds the project step at those batch sizes: seconds per step, images/s for a 50-step sampler
(batch / (50 · step)), and on CUDA the peak memory (``max_memory_allocated``, weights included).

Usage: python -m benchmarks.bench_step [--device auto|cpu|cuda] [--precision auto|fp32|fp16|bf16]
           [--sizes 256 512] [--repeats 5] [--warmup 1] [--threads N] [--clock wall|cpu] [--variants ...]
           [--compile [--freezing]] [--batches 1 4 8]
           [--config configs/tiny/model.yaml  (a quick smoke run)]
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.timing import CLOCKS, timed
from model.attention import set_attention_backend
from model.builder import cldm_config
from model.cldm import ControlLDM
from model.unet import Conv2d, CrossAttention
from utils.common import choose_device, choose_dtype, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "inference" / "stage2.yaml"
TINY = ROOT / "configs" / "tiny" / "model.yaml"
# name: (attention backend, channels-last weights, packed conv weights); NCHW variants first, then NHWC ones
VARIANTS = {"baseline": ("math", False, False), "sdpa": ("sdpa", False, False), "channels_last": ("math", True, False),
            "cl+packed": ("math", True, True), "sdpa+cl": ("sdpa", True, False), "project": ("sdpa", True, True)}
STEPS_PER_IMAGE = 50


def build(config: str, device: torch.device, dtype: torch.dtype) -> ControlLDM:
    """The config's ControlLDM with random weights, built directly on ``device``; UNet + ControlNet in ``dtype``.

    The VAE and text encoder, which a step does not use, are the tiny test ones (saves 1.7 GB in fp32)."""
    torch.manual_seed(0)
    cldm = cldm_config(load_config(config).model)
    tiny = load_config(TINY).model.cldm.params
    cldm.params.vae_cfg, cldm.params.clip_cfg = tiny.vae_cfg, tiny.clip_cfg
    with torch.device(device):
        model = instantiate_from_config(cldm).eval()
        with torch.no_grad():  # zero-initialised layers (out conv, zero convs) would make every output 0
            for param in model.parameters():
                if not param.any():
                    param.normal_(0.0, 0.02)
    if dtype != torch.float32:
        model.cast_denoiser(dtype)
    return model


def inputs(model: ControlLDM, size: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Noisy latent (B,4,s/8,s/8), timesteps (B,) and a random condition (text (B,77,D), condition latent)."""
    gen = torch.Generator().manual_seed(1)
    latent = (batch, 4, size // 8, size // 8)
    x = torch.randn(latent, generator=gen).to(device)
    c_txt = torch.randn(batch, 77, model.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features,
                        generator=gen).to(device)
    cond = {"c_txt": c_txt, "c_img": torch.randn(latent, generator=gen).to(device)}
    return x, torch.full((batch,), 500, device=device, dtype=torch.long), cond


class Switch:
    """Switches the model between the variants' settings in place.

    Each layout's weight tensors are made once and swapped in (``.data``), so the storage of a layout stays the same
    between rounds and a packed conv weight, made from that storage on the first packed call, is not made again
    (as in inference, which packs once). Packing is switched by each convolution's flag, which keeps the copies."""

    def __init__(self, model: ControlLDM):
        self.model = model
        params = [p for m in (model.unet, model.controlnet) for p in m.parameters() if p.dim() == 4]
        nchw = [p.data for p in params]
        model.set_channels_last(True)
        self.layouts = {False: nchw, True: [p.data for p in params]}
        self.params = params
        self.convs = [m for m in model.modules() if isinstance(m, Conv2d)]

    def __call__(self, attention: str, channels_last: bool, packed: bool) -> None:
        set_attention_backend(attention)
        for param, data in zip(self.params, self.layouts[channels_last]):
            param.data = data
        for conv in self.convs:
            conv.pack_weights = packed


def image_only_work(model: ControlLDM, cond: dict) -> Callable[[], object]:
    """The per-step work that depends only on the condition: cross-attention K/V of the text in every layer and
    the condition-latent channels of the ControlNet's first conv."""
    cross = [m for m in model.modules() if isinstance(m, CrossAttention) and m.to_k.in_features != m.to_q.in_features]
    first = model.controlnet.input_blocks[0][0]
    n_latent = first.in_channels - cond["c_img"].shape[1]
    dtype = first.weight.dtype

    @torch.no_grad()
    def work() -> None:
        context = cond["c_txt"].to(dtype)
        for attn in cross:
            attn.to_k(context), attn.to_v(context)
        F.conv2d(cond["c_img"].to(dtype), first.weight[:, n_latent:], None, padding=1)

    return work


def compare(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def bench_size(model: ControlLDM, configure: Switch, size: int, device: torch.device, args: argparse.Namespace,
               compiled: Callable | None) -> None:
    x, t, cond = inputs(model, size, 1, device)
    variants: dict[str, tuple[str, bool, bool, Callable]] = {k: (*VARIANTS[k], model) for k in args.variants}
    if compiled is not None:
        variants["compiled"] = (*VARIANTS["project"], compiled)
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, torch.Tensor] = {}
    first_call = float("nan")
    loads = [load_average()]
    with torch.no_grad():
        for rnd in range(args.warmup + args.repeats):
            for name, (attention, channels_last, packed, fn) in variants.items():
                configure(attention, channels_last, packed)
                compiling = rnd == 0 and name == "compiled"  # compiler workers are other processes: wall clock
                seconds = timed(lambda: outputs.__setitem__(name, fn(x, t, cond)), device,
                                "wall" if compiling else args.clock)
                if rnd >= args.warmup:
                    times[name].append(seconds)
                elif compiling:
                    first_call = seconds
            loads.append(load_average())
        configure(*VARIANTS["project"])
        extra = [timed(image_only_work(model, cond), device, args.clock) for _ in range(args.repeats)]
    base = statistics.median(times["baseline"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{size:>5} {name:>14} {med:>9.4f} {min(values):>9.4f} {med / base:>7.3f} "
              f"{compare(outputs[name], outputs['baseline']):>11.2e}", flush=True)
    if "project" in times:
        project = statistics.median(times["project"])
        print(f"{size:>5} {'image-only':>14} {statistics.median(extra):>9.4f} {min(extra):>9.4f} "
              f"{statistics.median(extra) / project:>7.3f}  (share of the project step; upper bound of caching it)")
    if compiled is not None:
        print(f"{size:>5} {'compile':>14} {first_call:>9.1f}  (first compiled call, wall clock: compilation + one "
              f"step; not in the step time)")
    print(f"{size:>5} load average (1 min) over the rounds: {min(loads):.1f}–{max(loads):.1f}", flush=True)


def bench_batches(model: ControlLDM, configure: Switch, size: int, device: torch.device,
                  args: argparse.Namespace) -> None:
    configure(*VARIANTS["project"])
    for batch in args.batches:
        x, t, cond = inputs(model, size, batch, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            values = [timed(lambda: model(x, t, cond), device, args.clock)
                      for _ in range(args.warmup + args.repeats)]
        med = statistics.median(values[args.warmup:])
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"{size:>5} {batch:>6} {med:>9.4f} {batch / (STEPS_PER_IMAGE * med):>12.3f} {peak:>9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16, bf16")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (shared machines, with --threads 1)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                        help="variants to time (the baseline always runs)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the project setting")
    parser.add_argument("--freezing", action="store_true",
                        help="compile with inductor's freezing (weights as constants, pre-packed on CPU)")
    parser.add_argument("--config", default=str(CONFIG), help="any config with a model section (tiny: smoke run)")
    parser.add_argument("--batches", nargs="*", type=int, default=[], help="project step at these batch sizes")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0 or any(s % 64 for s in args.sizes):
        parser.error("need --repeats >= 1, --warmup >= 0 and sizes that are multiples of 64")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1 (the first compiled call compiles)")
    if args.freezing and not args.compile:
        parser.error("--freezing needs --compile")
    args.variants = ["baseline"] + [v for v in dict.fromkeys(args.variants) if v != "baseline"]
    device = choose_device(args.device)
    dtype = choose_dtype(args.precision, device)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device={device}{gpu} torch={torch.__version__} dtype={str(dtype).replace('torch.', '')} "
          f"threads={torch.get_num_threads()} clock={args.clock} warmup={args.warmup} repeats={args.repeats} "
          f"load={load_average():.1f}")
    model = build(args.config, device, dtype)
    configure = Switch(model)
    compiled = None
    if args.compile:
        configure(*VARIANTS["project"])
        if args.freezing:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
        compiled = torch.compile(model)
    print(f"{'size':>5} {'variant':>14} {'median s':>9} {'min s':>9} {'ratio':>7} {'max rel Δ':>11}")
    for size in args.sizes:
        bench_size(model, configure, size, device, args, compiled)
    if args.batches:
        print(f"\n{'size':>5} {'batch':>6} {'step s':>9} {'img/s @50':>12} {'peak GB':>9}")
        for size in args.sizes:
            bench_batches(model, configure, size, device, args)
    set_attention_backend(None)


if __name__ == "__main__":
    main()
