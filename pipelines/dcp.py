"""Classical DCP dehazing (He et al.) of a folder: ``inference.image_folder`` -> ``<stem>.png`` in
``inference.result_folder`` (haze.dcp.dcp_dehaze with the ``dcp`` section of the config).

    python inference_dcp.py --config configs/inference/dcp.yaml [--set dcp.omega=0.9 ...] [--skip-existing]

Unreadable images are skipped and reported; the exit status is 1 if any image failed.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from haze.dcp import DcpSettings, dcp_dehaze
from pipelines.cli import main_wrapper
from pipelines.folder import Batch, Process, run_folder
from pipelines.settings import InferenceSettings
from utils.distributed import process_device

WEIGHT_KEYS: tuple[str, ...] = ()  # no weight files; app.py builds no diffusion model for this script


def dcp_params(cfg: DictConfig) -> dict:
    """The ``dcp`` section as keyword arguments of haze.dcp.dcp_dehaze (:class:`haze.dcp.DcpSettings`: unknown keys
    and bad values refused naming the key)."""
    values = OmegaConf.to_container(cfg.dcp, resolve=True) if cfg.get("dcp") is not None else {}
    return dataclasses.asdict(DcpSettings.from_section(values))


def output_names(inf: InferenceSettings) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces: the result, plus the transmission with save_transmission."""
    with_t = inf.save_transmission
    return lambda stem: [f"{stem}.png"] + ([f"{stem}_transmission.png"] if with_t else [])


def make_process(cfg: DictConfig, inf: InferenceSettings, runner: None = None, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs): ``process(batch, callback)``; DCP has no model
    (``runner`` is unused) and no steps (``callback`` and ``show_steps`` are unused)."""
    params = dcp_params(cfg)
    device, with_t = process_device(inf.device), inf.save_transmission

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for img01, stem in batch:
            j01, t, _ = dcp_dehaze(img01[None].to(device), **params)
            out[f"{stem}.png"] = j01[0].cpu()
            if with_t:
                out[f"{stem}_transmission.png"] = t[0].expand(3, -1, -1).cpu()
        return out

    return process


def run(cfg: DictConfig, inf: InferenceSettings, args: argparse.Namespace) -> int:
    return run_folder(inf, make_process(cfg, inf), output_names(inf), args.skip_existing, "DCP")


def main() -> None:
    """The command line of ``inference_dcp.py``."""
    main_wrapper(run, "Classical Dark Channel Prior dehazing of a folder", "configs/inference/dcp.yaml", "inference_dcp")
