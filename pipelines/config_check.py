"""The whole inference config checked at the door, before a weight file or an image is read: one schema per section.

* top level: only ``model``, ``inference``, ``guidance``, ``dcp`` (did-you-mean for another key);
* ``inference``: :class:`pipelines.settings.InferenceSettings` and what the script needs
  (:meth:`~pipelines.settings.InferenceSettings.check_script`), and its folders: the input an existing, readable
  folder, the result folder not a file;
* ``model``: ``cldm`` and ``diffusion`` target blocks whose params are their classes' keyword arguments, nested blocks
  alike (:func:`utils.rules.check_target_block`);
* ``guidance``: a target block, its values checked by the guidance's own rules (:data:`sampler.guidance.GUIDANCE_RULES`);
* ``dcp``: :class:`haze.dcp.DcpSettings`.

Every failure is a :class:`utils.rules.SettingsError`, one line naming the key path.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from haze.dcp import DcpSettings
from model.builder import cldm_config
from pipelines.settings import InferenceSettings
from utils.common import get_obj_from_str, instantiate_from_config
from utils.rules import SettingsError, check_section_keys, check_target_block, check_top_level

INFERENCE_SECTIONS = ("model", "network", "inference", "guidance", "dcp")
"""Top-level keys of an inference config (``base`` is merged away by utils.common.load_config)."""


def check_model_section(model: object, section: str = "model") -> None:
    """The ``model`` section: ``cldm`` (with its ``text_processor`` switch) and ``diffusion`` target blocks."""
    check_section_keys(model, ("cldm", "diffusion"), section)
    for key in ("cldm", "diffusion"):
        if key not in model:
            raise SettingsError(f"{section}.{key} is required (a target + params block)")
    try:
        cldm = OmegaConf.to_container(cldm_config(model), resolve=True)
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise SettingsError(f"{section}.cldm: {err}") from None
    check_target_block(cldm, f"{section}.cldm", get_obj_from_str)
    check_target_block(model["diffusion"], f"{section}.diffusion", get_obj_from_str)


def check_folders(settings: InferenceSettings) -> None:
    """The input folder exists, is a folder and can be listed; the result folder is not an existing file."""
    if settings.image_folder is not None:
        src = Path(settings.image_folder)
        if not src.exists():
            raise SettingsError(f"inference.image_folder does not exist: {src}")
        if not src.is_dir():
            raise SettingsError(f"inference.image_folder is a file, not a folder of images: {src}")
        if not os.access(src, os.R_OK | os.X_OK):
            raise SettingsError(f"inference.image_folder cannot be read (permissions): {src}")
    if settings.result_folder is not None and Path(settings.result_folder).is_file():
        raise SettingsError(f"inference.result_folder is a file, not a folder: {settings.result_folder}")


def check_config_sections(cfg: DictConfig) -> InferenceSettings:
    """The sections every inference config may have (top level, inference, model when present, guidance, dcp) ->
    its inference settings; what app.py checks before the page starts. SettingsError for the first problem."""
    check_top_level(cfg, INFERENCE_SECTIONS)
    settings = InferenceSettings.from_config(cfg)
    if cfg.get("model") is not None:
        check_model_section(cfg.model)
    if cfg.get("guidance") is not None:
        guidance = OmegaConf.to_container(cfg.guidance, resolve=True)
        check_target_block(guidance, "guidance", get_obj_from_str)
        try:
            instantiate_from_config(guidance)
        except SettingsError:
            raise
        except (TypeError, ValueError) as err:
            raise SettingsError(f"guidance.params: {err}") from None
    if cfg.get("network") is not None:
        check_target_block(OmegaConf.to_container(cfg.network, resolve=True), "network", get_obj_from_str)
    if cfg.get("dcp") is not None:
        DcpSettings.from_section(OmegaConf.to_container(cfg.dcp, resolve=True))
    return settings


def check_inference_config(cfg: DictConfig, script: str) -> InferenceSettings:
    """Every section of ``cfg`` for ``script`` (a key of pipelines.settings.SCRIPT_KEYS) -> its inference settings:
    :func:`check_config_sections`, what the script needs and its folders. SettingsError (one line naming the key
    path) for the first problem."""
    settings = check_config_sections(cfg)
    settings.check_script(script)
    if script == "inference_baseline":
        if cfg.get("network") is None:
            raise SettingsError("inference_baseline.py needs a network section (target + params of the baseline)")
    elif script != "inference_dcp" and cfg.get("model") is None:
        raise SettingsError(f"{script}.py needs a model section (or base: a config that has one)")
    check_folders(settings)
    return settings
