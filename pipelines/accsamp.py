"""DiffDehaze with AccSamp: AlignOp estimate after phase 1, restart at (1−ω)·N with DCP-weighted MS-SSIM guidance.

    python inference_accsamp.py --config configs/inference/stage2_accsamp.yaml --set inference.tau=0.8 inference.omega=0.6
"""
from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

import torch
from omegaconf import DictConfig

from haze.dcp import DCPTransmission
from pipelines.cli import main_wrapper, run_script
from pipelines.folder import Batch, Process
from pipelines.geometry import from_model_output
from pipelines.memory import memory_check
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from sampler.accsamp import sample_accsamp
from sampler.align import align_op
from utils.common import instantiate_from_config


def output_names(inf: InferenceSettings) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces: the result, plus estimate and transmission with save_intermediates."""
    intermediates = inf.save_intermediates

    def names(stem: str) -> list[str]:
        extra = [f"{stem}_estimate.png", f"{stem}_transmission.png"] if intermediates else []
        return [f"{stem}.png", *extra]

    return names


def make_process(cfg: DictConfig, inf: InferenceSettings, runner: DiffusionRunner, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs): ``process(batch, callback)``; ``inf`` are the
    settings read from ``cfg`` (the runner's), ``cfg.guidance`` the phase-2 guidance."""
    check_memory = memory_check(runner, "accsamp")
    guidance = instantiate_from_config(cfg.guidance) if cfg.get("guidance") else None
    align = partial(align_op, cover_border=inf.align_cover_border)
    transmission = partial(DCPTransmission, ties=inf.airlight_ties)
    intermediates = inf.save_intermediates

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        start = runner.start_batch([img01 for img01, _ in batch], stage=2, seed=inf.seed)
        x_T, geoms = start.x_T, start.geoms
        check_memory(x_T.shape[-2:], len(batch))
        z, extras = sample_accsamp(
            runner.denoiser(x_T.shape[-2:]), x_T, runner.schedule, start.cond, start.inputs, tau=inf.tau,
            omega=inf.omega, guidance=guidance, decode_fn=runner.decode, encode_fn=runner.encode,
            align_fn=align, transmission_fn=transmission, decode_vjp_fn=runner.guidance_vjp(x_T.shape[-2:]),
            parameterization=runner.parameterization, generator=start.generators, callback=callback,
            disable=not show_steps, sampler=runner.sample, guidance_every=inf.guidance_every,
            pullback=inf.guidance_pullback)
        out = {}
        transmission_maps = extras["transmission"][..., :, :] if intermediates else None
        for b, ((_, stem), img) in enumerate(zip(batch, runner.finish_batch(z, geoms))):
            out[f"{stem}.png"] = img
            if intermediates:
                estimate, trans = extras["estimate"][b: b + 1], transmission_maps[b: b + 1]
                out[f"{stem}_estimate.png"] = from_model_output(estimate * 0.5 + 0.5, geoms[b]).cpu()
                out[f"{stem}_transmission.png"] = from_model_output(trans, geoms[b]).expand(3, -1, -1).cpu()
        return out

    return process


def run(cfg: DictConfig, inf: InferenceSettings, args: argparse.Namespace) -> int:
    return run_script(cfg, inf, args, make_process, output_names, "AccSamp")


def main() -> None:
    """The command line of ``inference_accsamp.py``."""
    main_wrapper(run, "DiffDehaze inference with AccSamp (tau/omega in YAML)", "configs/inference/stage2_accsamp.yaml",
                 "inference_accsamp")
