"""Classical DCP dehazing (He et al.) of a folder: ``inference.image_folder`` -> ``<stem>.png`` in
``inference.result_folder`` (utils.dcp.dcp_dehaze with the ``dcp`` section of the config).

    python inference_dcp.py --config configs/inference/dcp.yaml [--set dcp.omega=0.9 ...] [--skip-existing]

Unreadable images are skipped and reported; the exit status is 1 if any image failed.
"""
from __future__ import annotations

import argparse

import torch
from omegaconf import DictConfig, OmegaConf

from utils.dcp import dcp_dehaze
from utils.distributed import process_device
from utils.pipeline import Batch, main_wrapper, run_folder

DCP_KEYS = ("patch", "omega", "top", "radius", "eps", "t0", "t_min", "ties")


def run(cfg: DictConfig, args: argparse.Namespace) -> int:
    inf = cfg.inference
    params = OmegaConf.to_container(cfg.get("dcp", {}) or {}, resolve=True)
    unknown = sorted(set(params) - set(DCP_KEYS))
    if unknown:
        raise KeyError(f"unknown dcp keys {unknown}; allowed: {list(DCP_KEYS)}")
    device = process_device(inf.get("device", "auto"))
    with_t = bool(inf.get("save_transmission", False))

    def names(stem: str) -> list[str]:
        return [f"{stem}.png"] + ([f"{stem}_transmission.png"] if with_t else [])

    @torch.no_grad()
    def process(batch: Batch) -> dict[str, torch.Tensor]:
        out = {}
        for img01, stem in batch:
            j01, t, _ = dcp_dehaze(img01[None].to(device), **params)
            out[f"{stem}.png"] = j01[0].cpu()
            if with_t:
                out[f"{stem}_transmission.png"] = t[0].expand(3, -1, -1).cpu()
        return out

    return run_folder(cfg, process, names, args.skip_existing, "DCP")


if __name__ == "__main__":
    main_wrapper(run, "Classical Dark Channel Prior dehazing of a folder", "configs/inference/dcp.yaml")
