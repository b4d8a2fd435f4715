"""HazeGen (stage 1): turn every clean image of a folder into ``num_samples`` realistic hazy variants.

Blended sampling (published): prompt "hazy, foggy, misty, obscure, smoggy."; the unconditional branch uses the same
text with an all-zero condition latent, mixed as ``uncond + w·(cond − uncond)`` with ``inference.w`` = 0.85. That
branch is the model's one rule (``ControlLDM.image_condition``), also applied to the unconditional (real-photo)
training samples: with YCbCr fusion it gets the YCbCr features of an all-zero image.
Outputs are ``<stem>_<k>.png`` (k = 0..num_samples−1), the names the stage-2 paired dataset reads.

HCD-YC dynamic prompts / text processor: training analyses the hazy *target*, which inference does not have, so
variant k analyses a hazy reference photo from ``inference.fog_reference_folder`` (chosen by the image stem and k)
and describes the haze to generate like it; without that folder those options are refused at start-up.

    python inference_stage1.py --config configs/inference/stage1.yaml [--set inference.num_samples=4]
"""
from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from model.builder import text_processor_on
from pipelines.cli import EXIT_BAD_CONFIG, log, main_wrapper, run_script
from pipelines.folder import Batch, Process
from pipelines.memory import memory_check
from pipelines.runner import DiffusionRunner, SamplingStart
from pipelines.settings import InferenceSettings
from utils.image_io import list_images, load_rgb01


def fog_references(cfg: DictConfig, inf: InferenceSettings) -> list[Path]:
    """Hazy reference photos for fog analysis; empty when neither dynamic prompts nor a text processor is on."""
    if not (inf.dynamic_prompt or text_processor_on(cfg.model)):
        return []
    folder = inf.fog_reference_folder
    references = list_images(folder) if folder and Path(folder).is_dir() else []
    if not references:
        log.error("stage-1 dynamic prompts / text processor need inference.fog_reference_folder, a folder of hazy "
                  "photos to analyse (training analyses the hazy target); got %s", folder)
        sys.exit(EXIT_BAD_CONFIG)
    return references


def output_names(inf: InferenceSettings) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces: ``<stem>_<k>.png`` for k < inference.num_samples."""
    num_samples = inf.num_samples
    return lambda stem: [f"{stem}_{k}.png" for k in range(num_samples)]


def make_process(cfg: DictConfig, inf: InferenceSettings, runner: DiffusionRunner, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs): ``process(batch, callback)``.
    Exits with status 2 when dynamic prompts / the text processor lack their fog reference photos."""
    references = fog_references(cfg, inf)
    check_memory = memory_check(runner, "hazegen")

    def start(batch: Batch, k: int, first: SamplingStart | None) -> SamplingStart:
        """Variant k of the batch: the condition (with fog references, of variant k's reference photo per image;
        otherwise that of ``first``, variant 0) and the noise of seed + k."""
        if first is not None and not references:
            return runner.reseed(first, inf.seed + k)
        fog01 = ([load_rgb01(references[(zlib.crc32(stem.encode()) + k) % len(references)]) for _, stem in batch]
                 if references else None)
        return runner.start_batch([img01 for img01, _ in batch], stage=1, seed=inf.seed + k, fog01=fog01)

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        outputs, first = {}, None
        for k in range(inf.num_samples):
            variant = start(batch, k, first)
            if first is None:
                check_memory(variant.x_T.shape[-2:], len(batch))
            first = first or variant
            z = runner.sample(runner.denoiser(variant.x_T.shape[-2:]), variant.x_T, runner.schedule, variant.cond,
                              uncond=runner.model.unconditional(variant.cond, variant.inputs), cfg_scale=inf.w,
                              parameterization=runner.parameterization, callback=callback,
                              generator=variant.generators, disable=not show_steps)
            for (_, stem), img in zip(batch, runner.finish_batch(z, variant.geoms)):
                outputs[f"{stem}_{k}.png"] = img
        return outputs

    return process


def run(cfg: DictConfig, inf: InferenceSettings, args: argparse.Namespace) -> int:
    fog_references(cfg, inf)
    return run_script(cfg, inf, args, make_process, output_names, "HazeGen")


def main() -> None:
    """The command line of ``inference_stage1.py``."""
    main_wrapper(run, "HazeGen (stage 1): realistic hazy images from clean ones", "configs/inference/stage1.yaml",
                 "inference_stage1")
