"""DiffDehaze with AccSamp: AlignOp estimate after phase 1, restart at (1−ω)·N with DCP-weighted MS-SSIM guidance.

    python inference_accsamp.py --config configs/inference/stage2_accsamp.yaml --set inference.tau=0.8 inference.omega=0.6
"""
from __future__ import annotations

import argparse
from functools import partial

import torch
from omegaconf import DictConfig

from sampler.accsamp import check_speed_options, sample_accsamp
from utils.align import align_op
from utils.common import instantiate_from_config
from utils.dcp import estimate_transmission
from utils.pipeline import Batch, DiffusionRunner, check_weights, from_model_output, main_wrapper, run_folder


def run(cfg: DictConfig, args: argparse.Namespace) -> int:
    inf = cfg.inference
    check_weights({"sd_path": inf.sd_path, "controlnet_path": inf.controlnet_path})
    every, pullback = int(inf.get("guidance_every", 1)), str(inf.get("guidance_pullback", "autograd"))
    check_speed_options(every, pullback)
    runner = DiffusionRunner(cfg)
    guidance = instantiate_from_config(cfg.guidance) if cfg.get("guidance") else None
    align = partial(align_op, cover_border=bool(inf.get("align_cover_border", True)))
    intermediates = bool(inf.get("save_intermediates", False))

    def names(stem: str) -> list[str]:
        extra = [f"{stem}_estimate.png", f"{stem}_transmission.png"] if intermediates else []
        return [f"{stem}.png", *extra]

    @torch.no_grad()
    def process(batch: Batch) -> dict[str, torch.Tensor]:
        hazy, geoms, cond, gens, x_T = runner.start_batch([img01 for img01, _ in batch], stage=2, seed=inf.seed)
        z, extras = sample_accsamp(
            runner.denoiser(x_T.shape[-2:]), x_T, runner.schedule, cond, hazy, tau=float(inf.tau),
            omega=float(inf.omega), guidance=guidance, decode_fn=runner.decode, encode_fn=runner.encode,
            align_fn=align, transmission_fn=estimate_transmission, decode_vjp_fn=runner.guidance_vjp(x_T.shape[-2:]),
            parameterization=runner.parameterization, generator=gens, disable=not args.show_steps,
            sampler=runner.sample, guidance_every=every, pullback=pullback)
        out = {}
        for b, ((_, stem), img) in enumerate(zip(batch, runner.finish_batch(z, geoms))):
            out[f"{stem}.png"] = img
            if intermediates:
                estimate, trans = extras["estimate"][b: b + 1], extras["transmission"][b: b + 1]
                out[f"{stem}_estimate.png"] = from_model_output(estimate * 0.5 + 0.5, geoms[b]).cpu()
                out[f"{stem}_transmission.png"] = from_model_output(trans, geoms[b]).expand(3, -1, -1).cpu()
        return out

    return run_folder(cfg, process, names, args.skip_existing, "AccSamp", runner.batch_key)

if __name__ == "__main__":
    main_wrapper(run, "DiffDehaze inference with AccSamp (tau/omega in YAML)", "configs/inference/stage2_accsamp.yaml")
