"""DiffDehaze with AccSamp: AlignOp estimate after phase 1, restart at (1−ω)·N with DCP-weighted MS-SSIM guidance.

    python inference_accsamp.py --config configs/inference/stage2_accsamp.yaml --set inference.tau=0.8 inference.omega=0.6
"""
from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

import torch
from omegaconf import DictConfig

from sampler.accsamp import sample_accsamp
from utils.align import align_op
from utils.common import instantiate_from_config
from utils.dcp import estimate_transmission
from utils.pipeline import Batch, DiffusionRunner, Process, from_model_output, main_wrapper, run_script


def output_names(cfg: DictConfig) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces: the result, plus estimate and transmission with save_intermediates."""
    intermediates = bool(cfg.inference.get("save_intermediates", False))

    def names(stem: str) -> list[str]:
        extra = [f"{stem}_estimate.png", f"{stem}_transmission.png"] if intermediates else []
        return [f"{stem}.png", *extra]

    return names


def make_process(cfg: DictConfig, runner: DiffusionRunner, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs): ``process(batch, callback)``."""
    inf = cfg.inference
    guidance = instantiate_from_config(cfg.guidance) if cfg.get("guidance") else None
    align = partial(align_op, cover_border=bool(inf.get("align_cover_border", True)))
    intermediates = bool(inf.get("save_intermediates", False))

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        hazy, geoms, cond, gens, x_T = runner.start_batch([img01 for img01, _ in batch], stage=2, seed=inf.seed)
        z, extras = sample_accsamp(
            runner.denoiser(x_T.shape[-2:]), x_T, runner.schedule, cond, hazy, tau=float(inf.tau),
            omega=float(inf.omega), guidance=guidance, decode_fn=runner.decode, encode_fn=runner.encode,
            align_fn=align, transmission_fn=estimate_transmission, decode_vjp_fn=runner.guidance_vjp(x_T.shape[-2:]),
            parameterization=runner.parameterization,
            generator=gens, callback=callback, disable=not show_steps)
        out = {}
        for b, ((_, stem), img) in enumerate(zip(batch, runner.finish_batch(z, geoms))):
            out[f"{stem}.png"] = img
            if intermediates:
                estimate, trans = extras["estimate"][b: b + 1], extras["transmission"][b: b + 1]
                out[f"{stem}_estimate.png"] = from_model_output(estimate * 0.5 + 0.5, geoms[b]).cpu()
                out[f"{stem}_transmission.png"] = from_model_output(trans, geoms[b]).expand(3, -1, -1).cpu()
        return out

    return process


def run(cfg: DictConfig, args: argparse.Namespace) -> int:
    return run_script(cfg, args, make_process, output_names, "AccSamp")


if __name__ == "__main__":
    main_wrapper(run, "DiffDehaze inference with AccSamp (tau/omega in YAML)", "configs/inference/stage2_accsamp.yaml")
