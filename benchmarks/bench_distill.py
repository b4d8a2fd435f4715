"""Benchmark one one-step distillation iteration (stage 3): time and peak memory with the three networks resident.

The networks are those ``train_stage3.py`` builds (:class:`training.distill.DistillationStep`): the frozen stage-2
teacher (SD-2.1 UNet + IRControlNet, VAE, text encoder), the student (LoRA adapters + trainable UNet input conv) and
the fake score (LoRA adapters), both on copies that share the teacher's frozen weights, from the model section of
``configs/train/stage3_onestep.yaml`` with random weights (random init does not change the cost). One iteration is
what :func:`training.stage3.distill_step` does on one batch: the student loss (one evaluation at t*, VAE decode, MSE
+ MS-SSIM, the VSD term with the teacher's and the fake score's predictions) and backward, clipping and AdamW step;
then the fake score's ε-MSE on the detached student latent, backward, clipping and AdamW step. The batch is random
images of ``--size``² (hazy condition, clean target). Mixed precision is autocast (bf16 / fp16) as accelerate's
``mixed_precision`` applies it, without the fp16 gradient scaler.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (weights included), on CPU the process high-water mark
(``ru_maxrss``: weights, the Python / torch runtime and activations). "per 1k iterations" is 1000 × the median
iteration time after the warm-up iterations.

    python -m benchmarks.bench_distill --device cuda --size 512 --batch 1 --precision bf16
    python -m benchmarks.bench_distill --device cpu --size 256 --batch 1 --threads 2 --iters 2 --warmup 1
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.timing import peak_rss_mb, timed

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_step(config: Path, device: torch.device, grad_ckpt: bool, tiny: bool):
    """(DistillationStep, student AdamW, fake AdamW, train.max_grad_norm) of ``config``'s model, ``distill`` and
    ``train`` sections, random weights."""
    from omegaconf import OmegaConf

    from model.builder import cldm_config
    from training.distill import DistillationStep, DistillSettings
    from training.trainer import set_gradient_checkpointing
    from utils.common import instantiate_from_config, load_config

    cfg = load_config(config)
    if tiny:
        cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(ROOT / "configs" / "tiny" / "model.yaml").model)
    distill = OmegaConf.to_container(cfg.distill, resolve=True)
    settings = DistillSettings(**{**distill, "perceptual": "ms_ssim", "ssim_scales": min(distill["ssim_scales"], 3)
                                  if tiny else distill["ssim_scales"]})
    torch.manual_seed(0)
    teacher = instantiate_from_config(cldm_config(cfg.model))
    diffusion = instantiate_from_config(cfg.model.diffusion)
    set_gradient_checkpointing(teacher, grad_ckpt)
    step = DistillationStep(teacher.to(device), diffusion.to(device), settings)
    lr = float(cfg.train.learning_rate)
    return (step, torch.optim.AdamW(step.student_parameters(), lr=lr),
            torch.optim.AdamW(step.fake_parameters(), lr=lr), cfg.train.max_grad_norm)


def iteration(step, opt_student, opt_fake, batch: dict, autocast, generator: torch.Generator,
              max_grad_norm: float | None = None) -> None:
    """One iteration as :func:`training.stage3.distill_step` runs it (without the guard and the gradient scaler):
    each part's backward, clipping to ``max_grad_norm`` (None: none) and optimiser step."""
    with autocast():
        loss, z, cond, _ = step.student_loss(batch, generator)
    _update(loss, step.student_parameters(), opt_student, max_grad_norm)
    with autocast():
        fake_loss, _ = step.fake_score_loss(z, cond, generator)
    _update(fake_loss, step.fake_parameters(), opt_fake, max_grad_norm)


def _update(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
            max_grad_norm: float | None) -> None:
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "train" / "stage3_onestep.yaml")
    parser.add_argument("--device", default="auto", help="auto (cuda > cpu), cpu, cuda, ...")
    parser.add_argument("--size", type=int, default=512, help="square crop side (px), a multiple of 8")
    parser.add_argument("--batch", type=int, default=1, help="images per iteration (per GPU)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="autocast dtype (CUDA)")
    parser.add_argument("--grad-ckpt", choices=("on", "off"), default="on",
                        help="gradient checkpointing (the shipped config: on)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the full size")
    args = parser.parse_args(argv)
    if args.size % 8 or args.size < 64:
        parser.error(f"--size must be a multiple of 8 and at least 64, got {args.size}")
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = DTYPES[args.precision]
    if dtype is not None and device.type != "cuda":
        parser.error("--precision fp16/bf16 is for CUDA; the CPU runs fp32")

    start = time.perf_counter()
    step, opt_student, opt_fake, max_grad_norm = build_step(args.config, device, args.grad_ckpt == "on", args.tiny)
    built_s = time.perf_counter() - start
    weights_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    gen = torch.Generator(device=device).manual_seed(1)
    batch = {"condition": torch.rand(args.batch, 3, args.size, args.size, generator=gen, device=device),
             "target": torch.rand(args.batch, 3, args.size, args.size, generator=gen, device=device) * 2 - 1,
             "prompt": ["remove dense fog"] * args.batch}

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    one = partial(iteration, step, opt_student, opt_fake, batch, autocast, gen, max_grad_norm)
    times = [timed(one, device) for _ in range(args.warmup + args.iters)][args.warmup:]
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    trainable = sum(p.numel() for p in step.student_parameters())
    fake = sum(p.numel() for p in step.fake_parameters())
    median = statistics.median(times)
    print(f"device={device} torch={torch.__version__} precision={args.precision} threads={torch.get_num_threads()} "
          f"model={'tiny' if args.tiny else 'full'} size={args.size} batch={args.batch} grad_ckpt={args.grad_ckpt}")
    print(f"trainable: student {trainable / 1e6:.2f} M, fake score {fake / 1e6:.2f} M; built in {built_s:.0f} s")
    print(f"iteration s: median {median:.3f} of {['%.3f' % t for t in times]} (after {args.warmup} warm-up)")
    print(f"per 1k iterations: {median * 1000 / 3600:.2f} h")
    print(f"memory MB: after building {weights_mb:.0f}, peak {peak_mb:.0f}")


if __name__ == "__main__":
    main()
