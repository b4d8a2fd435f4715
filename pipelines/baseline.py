"""Feed-forward baseline dehazing (:mod:`model.baselines`) of a folder: ``inference.image_folder`` -> ``<stem>.png`` in
``inference.result_folder``, through the folder loop, sharding and skip-and-report of every script.

    python inference_baseline.py --config configs/inference/baseline_aodnet.yaml [--set inference.tiled=true ...]

The ``network`` section is the training config's ``model`` section (``target`` + ``params``); its weights are
``inference.checkpoint_path`` (a ``checkpoints/<step>.pt`` of train_baseline.py). Each image is padded by reflection
to the network's ``size_multiple``; above ``inference.tile_threshold`` (``inference.tiled: auto``) the network runs on
overlapping ``tile_size`` tiles at ``tile_stride``, blended (:func:`pipelines.tiling.tiled_apply`); a network that
predicts a map (MSCNN's t) turns the whole map into the image afterwards (one airlight per image).
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pipelines.cli import EXIT_BAD_CONFIG, check_weights, log, main_wrapper
from pipelines.config_check import check_inference_config
from pipelines.folder import Batch, Process, run_folder
from pipelines.settings import InferenceSettings, InferenceSettingsError
from pipelines.tiling import tiled_apply
from utils.checkpoint import check_shapes, load_state_dict
from utils.common import instantiate_from_config, load_config
from utils.distributed import process_device
from utils.rules import SettingsError

WEIGHT_KEYS: tuple[str, ...] = ("checkpoint_path",)
USES_DIFFUSION_RUNNER = False  # app.py: this script loads its own network in make_process


def load_network(cfg: DictConfig, inf: InferenceSettings, device: torch.device) -> nn.Module:
    """The ``network`` section's module with the weights of ``inference.checkpoint_path``, in eval mode on
    ``device``; InferenceSettingsError (one line naming the key) when the section or the weights do not fit."""
    if "network" not in cfg or "target" not in cfg.network:
        raise InferenceSettingsError("the config needs a 'network' section (target + params: the training config's "
                                     "model section)")
    try:
        net = instantiate_from_config(cfg.network)
        state = load_state_dict(inf.checkpoint_path)
        check_shapes(net, state, inf.checkpoint_path)
        net.load_state_dict(state, strict=True)
    except (ImportError, AttributeError, TypeError, ValueError, KeyError, RuntimeError) as err:
        raise InferenceSettingsError(f"inference.checkpoint_path / network: {str(err).splitlines()[0]}") from None
    return net.eval().to(device)


def run_network(net: nn.Module, img01: torch.Tensor, inf: InferenceSettings) -> torch.Tensor:
    """The network's output for one image (1,3,H,W) in [0,1]: padded by reflection to its ``size_multiple`` and run
    whole or in tiles (``inference.tiled``), cropped back to (1,C,H,W)."""
    h, w = img01.shape[-2:]
    multiple = int(getattr(net, "size_multiple", 1))
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    x = F.pad(img01, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else img01
    tiled = inf.tiled if isinstance(inf.tiled, bool) else max(x.shape[-2:]) > inf.tile_threshold
    if tiled:
        tile = max(multiple, inf.tile_size // multiple * multiple)
        out = tiled_apply(net, x, tile, min(inf.tile_stride, tile), 1.0)
    else:
        out = net(x)
    return out[..., :h, :w]


def output_names(inf: InferenceSettings) -> Callable[[str], list[str]]:
    """File names one input ``<stem>`` produces: the result, plus the predicted map for a map-predicting network
    with ``inference.save_transmission``."""
    with_t = inf.save_transmission
    return lambda stem: [f"{stem}.png"] + ([f"{stem}_transmission.png"] if with_t else [])


def make_process(cfg: DictConfig, inf: InferenceSettings, runner: None = None, show_steps: bool = False) -> Process:
    """The batch function of this script (also what app.py runs): loads the network once; ``runner`` (no diffusion
    model), ``callback`` and ``show_steps`` (no steps) are unused."""
    device = process_device(inf.device)
    net = load_network(cfg, inf, device)
    maps = hasattr(net, "dehaze")
    if inf.save_transmission and not maps:
        raise InferenceSettingsError(f"inference.save_transmission: {cfg.network.target} predicts the image, not a "
                                     "transmission map")

    @torch.no_grad()
    def process(batch: Batch, callback: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for img01, stem in batch:
            x = img01[None].to(device)
            pred = run_network(net, x, inf)
            out[f"{stem}.png"] = (net.dehaze(x, pred) if maps else pred.clamp(0.0, 1.0))[0].cpu()
            if inf.save_transmission:
                out[f"{stem}_transmission.png"] = pred[0].clamp(0.0, 1.0).expand(3, -1, -1).cpu()
        return out

    return process


def run(cfg: DictConfig, inf: InferenceSettings, args: argparse.Namespace) -> int:
    check_weights(inf.weight_paths(WEIGHT_KEYS))
    try:
        process = make_process(cfg, inf)
    except InferenceSettingsError as err:
        log.error("%s", err)
        return EXIT_BAD_CONFIG
    return run_folder(inf, process, output_names(inf), args.skip_existing, str(cfg.network.target).rsplit(".", 1)[-1])


def dehaze_folder(config: str, overrides: list[str] | None = None, skip_existing: bool = False) -> int:
    """What ``inference_baseline.py --config config --set overrides...`` does, from Python (e.g. a driver that
    evaluates several baselines): returns the exit status (2: bad settings or missing weights, logged as one line;
    1: some image failed)."""
    try:
        cfg = load_config(config, overrides)
        inf = check_inference_config(cfg, "inference_baseline")
    except (SettingsError, FileNotFoundError) as err:
        log.error("%s", err)
        return EXIT_BAD_CONFIG
    try:
        return run(cfg, inf, argparse.Namespace(skip_existing=skip_existing))
    except SystemExit as stop:  # run()'s weight-file door check exits with its status after its one line
        return int(stop.code)


def main() -> None:
    """The command line of ``inference_baseline.py``."""
    main_wrapper(run, "Feed-forward baseline dehazing of a folder", "configs/inference/baseline_aodnet.yaml",
                 "inference_baseline")
