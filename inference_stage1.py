"""HazeGen (stage 1): turn every clean image of a folder into ``num_samples`` realistic hazy variants.

Blended sampling (published): prompt "hazy, foggy, misty, obscure, smoggy."; the unconditional branch uses the same
text with an all-zero condition latent, mixed as ``uncond + w·(cond − uncond)`` with ``inference.w`` = 0.85.
With YCbCr fusion the unconditional branch also gets the YCbCr features of an all-zero image, as the unconditional
(real-photo) training samples do.
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

from utils.batching import stack_conditions
from utils.image_io import list_images, load_rgb01
from utils.memory import memory_check
from utils.pipeline import EXIT_BAD_CONFIG, Batch, DiffusionRunner, Process, log, main_wrapper, run_script


def fog_references(cfg: DictConfig) -> list[Path]:
    """Hazy reference photos for fog analysis; empty when neither dynamic prompts nor a text processor is on."""
    needs = cfg.inference.get("dynamic_prompt", False) or cfg.model.cldm.params.get("text_processor_cfg")
    if not needs:
        return []
    folder = cfg.inference.get("fog_reference_folder")
    references = list_images(folder) if folder and Path(folder).is_dir() else []
    if not references:
        log.error("stage-1 dynamic prompts / text processor need inference.fog_reference_folder, a folder of hazy "
                  "photos to analyse (training analyses the hazy target); got %s", folder)
        sys.exit(EXIT_BAD_CONFIG)
    return references


def output_names(cfg: DictConfig) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces: ``<stem>_<k>.png`` for k < inference.num_samples."""
    num_samples = int(cfg.inference.get("num_samples", 1))
    return lambda stem: [f"{stem}_{k}.png" for k in range(num_samples)]


def make_process(cfg: DictConfig, runner: DiffusionRunner, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs): ``process(batch, callback)``.
    Exits with status 2 when dynamic prompts / the text processor lack their fog reference photos."""
    inf = cfg.inference
    num_samples = int(inf.get("num_samples", 1))
    references = fog_references(cfg)
    check_memory = memory_check(cfg, runner, "hazegen")

    def conditions(clean: torch.Tensor, img01: torch.Tensor, stem: str, k: int) -> tuple[dict, dict]:
        """(cond, uncond) for the clean input (1,3,Hp,Wp) in [0,1]: its text embedding and condition latent; uncond
        has an all-zero condition latent (and the YCbCr features of an all-zero image). With fog references,
        variant k analyses its reference photo instead of ``img01``."""
        if references:
            img01 = load_rgb01(references[(zlib.crc32(stem.encode()) + k) % len(references)])
        cond = runner.condition(clean, img01, stage=1)
        uncond = {**cond, "c_img": torch.zeros_like(cond["c_img"])}
        if "c_ycbcr" in cond:
            uncond["c_ycbcr"] = runner.model.controlnet.ycbcr.encode(torch.zeros_like(clean))
        return cond, uncond

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        prepared = [runner.prepare(img01) for img01, _ in batch]
        geoms = [geom for _, geom in prepared]
        latent_shape = (1, 4, prepared[0][0].shape[-2] // 8, prepared[0][0].shape[-1] // 8)
        check_memory(latent_shape[-2:], len(batch))
        shared = None if references else [conditions(clean, img01, stem, 0)
                                          for (clean, _), (img01, stem) in zip(prepared, batch)]
        outputs = {}
        for k in range(num_samples):
            conds = shared or [conditions(clean, img01, stem, k) for (clean, _), (img01, stem) in zip(prepared, batch)]
            gens = [runner.generator(int(inf.seed) + k) for _ in batch]
            x_T = torch.cat([runner.initial_noise(latent_shape, gen) for gen in gens])
            z = runner.sample(runner.denoiser(x_T.shape[-2:]), x_T, runner.schedule,
                              stack_conditions([c for c, _ in conds]), uncond=stack_conditions([u for _, u in conds]),
                              cfg_scale=float(inf.w), parameterization=runner.parameterization, callback=callback,
                              generator=gens, disable=not show_steps)
            for (_, stem), img in zip(batch, runner.finish_batch(z, geoms)):
                outputs[f"{stem}_{k}.png"] = img
        return outputs

    return process


def run(cfg: DictConfig, args: argparse.Namespace) -> int:
    fog_references(cfg)
    return run_script(cfg, args, make_process, output_names, "HazeGen")


if __name__ == "__main__":
    main_wrapper(run, "HazeGen (stage 1): realistic hazy images from clean ones", "configs/inference/stage1.yaml")
