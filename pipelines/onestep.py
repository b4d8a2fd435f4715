"""One-step DiffDehaze: the stage-2 model with a stage-3 adapter file merged in (``model.onestep``), one network
evaluation per image: x̂0 of the hazy latent at the student's timestep t*, decoded. Same folder loop, geometry,
tiling, batching, sharding and settings validation as the other scripts.

    python inference_onestep.py --config configs/inference/stage2_onestep.yaml [--set inference.adapter_path=...]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from omegaconf import DictConfig

from model.onestep import one_step_x0
from pipelines.cli import check_weights, main_wrapper
from pipelines.folder import Batch, Process, run_folder
from pipelines.memory import memory_check
from pipelines.runner import DiffusionRunner
from pipelines.settings import ONESTEP_WEIGHT_KEYS, InferenceSettings

WEIGHT_KEYS = ONESTEP_WEIGHT_KEYS
"""The weight files this script loads (the page's modes read it): stage-2 weights and the adapter file."""
NETWORK_STEPS = 1
"""Denoiser evaluations per image (the page's progress bar counts them instead of ``inference.steps``)."""


def output_names(inf: InferenceSettings) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces."""
    return lambda stem: [f"{stem}.png"]


def make_process(cfg: DictConfig, inf: InferenceSettings, runner: DiffusionRunner, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs) on a runner loaded with an adapter file
    (``runner.onestep_timestep`` set); ``show_steps`` is accepted for the common signature (there is one step)."""
    if runner.onestep_timestep is None:
        raise ValueError("inference_onestep needs a runner loaded with inference.adapter_path")
    check_memory = memory_check(runner, "stage2")

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        start = runner.start_batch([img01 for img01, _ in batch], stage=2, seed=inf.seed)
        check_memory(start.x_T.shape[-2:], len(batch))
        z = one_step_x0(runner.denoiser(start.x_T.shape[-2:]), runner.diffusion, start.cond,
                        runner.onestep_timestep)
        if callback is not None:
            callback({"step": 0, "index": 0, "t": runner.onestep_timestep, "x": z, "x0": z})
        return {f"{stem}.png": img for (_, stem), img in zip(batch, runner.finish_batch(z, start.geoms))}

    return process


def run(cfg: DictConfig, inf: InferenceSettings, args: argparse.Namespace) -> int:
    check_weights(inf.weight_paths(WEIGHT_KEYS))
    runner = DiffusionRunner(cfg, inf, adapter_path=inf.adapter_path)
    return run_folder(inf, make_process(cfg, inf, runner, args.show_steps), output_names(inf), args.skip_existing,
                      "DiffDehaze one-step", runner.batch_key)


def main() -> None:
    """The command line of ``inference_onestep.py``."""
    main_wrapper(run, "One-step DiffDehaze (stage-2 weights + stage-3 adapters)",
                 "configs/inference/stage2_onestep.yaml", "inference_onestep")
