"""DiffDehaze (stage 2): dehaze every image of a folder with the 50-step spaced sampler.

    python inference_stage2.py --config configs/inference/stage2.yaml [--set inference.seed=1 ...]
"""
from __future__ import annotations

import argparse

import torch
from omegaconf import DictConfig

from sampler.spaced import sample_spaced
from utils.pipeline import Batch, DiffusionRunner, check_weights, main_wrapper, run_folder


def run(cfg: DictConfig, args: argparse.Namespace) -> int:
    inf = cfg.inference
    check_weights({"sd_path": inf.sd_path, "controlnet_path": inf.controlnet_path})
    runner = DiffusionRunner(cfg)

    @torch.no_grad()
    def process(batch: Batch) -> dict[str, torch.Tensor]:
        _, geoms, cond, gens, x_T = runner.start_batch([img01 for img01, _ in batch], stage=2, seed=inf.seed)
        z = sample_spaced(runner.denoiser(x_T.shape[-2:]), x_T, runner.schedule, cond, cfg_scale=1.0,
                          parameterization=runner.parameterization, generator=gens, disable=not args.show_steps)
        return {f"{stem}.png": img for (_, stem), img in zip(batch, runner.finish_batch(z, geoms))}

    return run_folder(cfg, process, lambda stem: [f"{stem}.png"], args.skip_existing, "DiffDehaze", runner.batch_key)


if __name__ == "__main__":
    main_wrapper(run, "DiffDehaze (stage 2) inference with the spaced sampler", "configs/inference/stage2.yaml")
