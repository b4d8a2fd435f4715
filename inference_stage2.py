"""DiffDehaze (stage 2): dehaze every image of a folder with the 50-step spaced sampler (or the solver named by
``inference.sampler`` / ``inference.steps``).

    python inference_stage2.py --config configs/inference/stage2.yaml [--set inference.seed=1 ...]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from omegaconf import DictConfig

from utils.inference_settings import InferenceSettings
from utils.memory import memory_check
from utils.pipeline import Batch, DiffusionRunner, Process, main_wrapper, run_script


def output_names(cfg: DictConfig) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces."""
    return lambda stem: [f"{stem}.png"]


def make_process(cfg: DictConfig, runner: DiffusionRunner, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs): ``process(batch, callback)``."""
    seed = InferenceSettings.from_config(cfg).seed
    check_memory = memory_check(cfg, runner, "stage2")

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        start = runner.start_batch([img01 for img01, _ in batch], stage=2, seed=seed)
        check_memory(start.x_T.shape[-2:], len(batch))
        z = runner.sample(runner.denoiser(start.x_T.shape[-2:]), start.x_T, runner.schedule, start.cond,
                          cfg_scale=1.0, parameterization=runner.parameterization, callback=callback,
                          generator=start.generators, disable=not show_steps)
        return {f"{stem}.png": img for (_, stem), img in zip(batch, runner.finish_batch(z, start.geoms))}

    return process


def run(cfg: DictConfig, args: argparse.Namespace) -> int:
    return run_script(cfg, args, make_process, output_names, "DiffDehaze")


if __name__ == "__main__":
    main_wrapper(run, "DiffDehaze (stage 2) inference with the spaced sampler", "configs/inference/stage2.yaml",
                 "inference_stage2")
