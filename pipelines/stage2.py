"""DiffDehaze (stage 2): dehaze every image of a folder with the 50-step spaced sampler (or the solver named by
``inference.sampler`` / ``inference.steps``).

    python inference_stage2.py --config configs/inference/stage2.yaml [--set inference.seed=1 ...]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from omegaconf import DictConfig

from pipelines.cli import main_wrapper, run_script
from pipelines.folder import Batch, Process
from pipelines.memory import memory_check
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings


def output_names(inf: InferenceSettings) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces."""
    return lambda stem: [f"{stem}.png"]


def make_process(cfg: DictConfig, inf: InferenceSettings, runner: DiffusionRunner, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs): ``process(batch, callback)``; ``inf`` are the
    settings read from ``cfg`` (the runner's)."""
    seed = inf.seed
    check_memory = memory_check(runner, "stage2")

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        start = runner.start_batch([img01 for img01, _ in batch], stage=2, seed=seed)
        check_memory(start.x_T.shape[-2:], len(batch))
        z = runner.sample(runner.denoiser(start.x_T.shape[-2:]), start.x_T, runner.schedule, start.cond,
                          cfg_scale=1.0, parameterization=runner.parameterization, callback=callback,
                          generator=start.generators, disable=not show_steps)
        return {f"{stem}.png": img for (_, stem), img in zip(batch, runner.finish_batch(z, start.geoms))}

    return process


def run(cfg: DictConfig, inf: InferenceSettings, args: argparse.Namespace) -> int:
    return run_script(cfg, inf, args, make_process, output_names, "DiffDehaze")


def main() -> None:
    """The command line of ``inference_stage2.py``."""
    main_wrapper(run, "DiffDehaze (stage 2) inference with the spaced sampler", "configs/inference/stage2.yaml",
                 "inference_stage2")
