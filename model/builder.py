"""The one model builder of inference (:class:`pipelines.runner.DiffusionRunner`) and training
(:func:`training.trainer.build_model`): a config's ``model`` section -> ControlLDM + diffusion schedule, with the frozen
SD-2.1 weights and the ControlNet loaded or initialised.

Switches of the model section (off = the published model), both read only here:

* ``model.cldm.params.controlnet_cfg.params.ycbcr_fusion: true``: the YCbCr-assisted ControlNet (``model.ycbcr``);
* ``model.cldm.params.text_processor: true``: the fog-aware text-condition processor (``model.text_processor``) with
  the UNet's context width and the fog analyser's feature length (:data:`haze.fog.FOG_FEATURE_DIM`). An explicit
  ``text_processor_cfg`` block (target + params) also switches it on and is used as written.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from haze.fog import FOG_FEATURE_DIM
from model.cldm import ControlLDM
from model.gaussian_diffusion import Diffusion
from utils.checkpoint import CheckpointError, WeightFile, load_state_dict
from utils.common import instantiate_from_config

log = logging.getLogger("hcdyc")

TEXT_PROCESSOR_TARGET = "model.text_processor.TextConditionProcessor"
SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
"""The LDM prefixes of the SD-2.1 checkpoint's UNet, VAE and text encoder (tensors under its ``state_dict``)."""
CONTROLNET_PREFIXES = ("input_blocks.", "middle_block.", "zero_convs.", "middle_block_out.")
"""The release ControlNet format (published ``stage*.pt``, our checkpoints): a flat, unprefixed state dict."""


def sd_weight_file(key: str, path: str) -> WeightFile:
    """The door check (:func:`utils.checkpoint.check_weight_files`) of the SD-2.1 checkpoint named by ``key``."""
    return WeightFile(key, path, "the SD-2.1-base checkpoint v2-1_512-ema-pruned.ckpt (5.2 GB, UNet/VAE/text "
                                 f"encoder under {', '.join(p.rstrip('.') for p in SD_PREFIXES)})", SD_PREFIXES)


def controlnet_weight_file(key: str, path: str) -> WeightFile:
    """The door check of a release-format ControlNet checkpoint (stage1.pt, stage2.pt, a trained one)."""
    return WeightFile(key, path, "a ControlNet checkpoint in the release format (stage1.pt / stage2.pt, a flat state "
                                 "dict with input_blocks.*, zero_convs.*)", CONTROLNET_PREFIXES,
                      refused=("model.diffusion_model.",))


def text_processor_on(model_cfg: Mapping[str, Any] | DictConfig) -> bool:
    """Whether ``model.cldm.params`` switches the text processor on (``text_processor: true`` or an explicit
    ``text_processor_cfg``); ValueError naming the key for a non-boolean switch."""
    params = model_cfg["cldm"].get("params") or {}
    switch = params.get("text_processor", False)
    if not isinstance(switch, bool):
        raise ValueError(f"model.cldm.params.text_processor must be true or false, got {switch!r}")
    return switch or bool(params.get("text_processor_cfg"))


def cldm_config(model_cfg: Mapping[str, Any] | DictConfig) -> DictConfig:
    """``model.cldm`` ready to instantiate: the ``text_processor`` switch becomes its ``text_processor_cfg`` (dim =
    ``unet_cfg.params.context_dim``, fog_feat_dim = FOG_FEATURE_DIM) unless one is given."""
    on = text_processor_on(model_cfg)
    source = model_cfg["cldm"]
    cldm = OmegaConf.create(OmegaConf.to_container(source, resolve=True) if isinstance(source, DictConfig)
                            else dict(source))
    cldm.params.pop("text_processor", None)
    if on and not cldm.params.get("text_processor_cfg"):
        cldm.params.text_processor_cfg = {
            "target": TEXT_PROCESSOR_TARGET,
            "params": {"dim": int(cldm.params.unet_cfg.params.context_dim), "fog_feat_dim": FOG_FEATURE_DIM},
        }
    return cldm


def build_model(model_cfg: Mapping[str, Any] | DictConfig, sd_path: str, controlnet_path: str | None = None,
                sd_key: str = "sd_path") -> tuple[ControlLDM, Diffusion]:
    """The ControlLDM and diffusion schedule of a ``model`` section, on the CPU in float32.

    sd_path: the SD-2.1 checkpoint (UNet, VAE, text encoder; CheckpointError naming ``sd_key`` when it lacks model
    tensors). controlnet_path: a ControlNet checkpoint in the release format (published ``stage*.pt`` or ours;
    a published one loads into the base part of a YCbCr ControlNet, whose fusion keeps its identity init), or None:
    the ControlNet is initialised from the UNet (the start of training).
    """
    ldm: ControlLDM = instantiate_from_config(cldm_config(model_cfg))
    diffusion: Diffusion = instantiate_from_config(model_cfg["diffusion"])
    _, missing = ldm.load_pretrained_sd(load_state_dict(sd_path))
    if missing:
        raise CheckpointError(f"{sd_key} {sd_path} lacks {len(missing)} model tensors, e.g. {sorted(missing)[:3]}")
    if controlnet_path is None:
        ldm.load_controlnet_from_unet()
    else:
        skipped = ldm.load_controlnet_from_ckpt(load_state_dict(controlnet_path))
        if skipped:
            log.info("published ControlNet loaded; %d new extension tensors keep their init", len(skipped))
    return ldm, diffusion
