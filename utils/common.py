"""Config-driven construction, seeding and device/precision choice shared by every script."""
from __future__ import annotations

import importlib
import os
import random
from typing import Any, Mapping

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.rules import SettingsError, shown_key


def get_obj_from_str(path: str) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"target '{path}' must be a dotted path like 'model.cldm.ControlLDM'")
    return getattr(importlib.import_module(module_name), attr)


def instantiate_from_config(config: Mapping[str, Any] | DictConfig, **overrides: Any) -> Any:
    """Build ``config.target(**config.params, **overrides)`` (DiffBIR-style ``target`` + ``params``)."""
    if "target" not in config:
        raise KeyError(f"config has no 'target' key (keys: {sorted(config.keys())})")
    params = config.get("params", None) or {}
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    return get_obj_from_str(config["target"])(**dict(params), **overrides)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> DictConfig:
    """Load a YAML config and apply OmegaConf dotlist overrides (``["inference.tau=0.7", ...]``).

    A top-level ``base: <path relative to this file>`` is loaded first (recursively) and merged under the file, so
    ablation configs only state what they change; ``base: [a.yaml, b.yaml]`` merges several in order (later ones
    win), e.g. a stage config and a model section of another size. A missing file raises FileNotFoundError, a file
    that is not a YAML mapping or an override that is not ``key=value`` (with a valid key path)
    utils.rules.SettingsError; both one line.
    """
    if not os.path.isfile(path):
        what = "is a folder, not a YAML file" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"config file {what}: {path}")
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, OSError) as err:
        raise SettingsError(f"config file {path} is not valid YAML ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(cfg, DictConfig):
        raise SettingsError(f"config file {path} must hold a mapping of sections, got a list")
    if "base" in cfg:
        bases = cfg.base if isinstance(cfg.base, ListConfig) else [cfg.base]
        merged = []
        for base in bases:
            base_path = os.path.join(os.path.dirname(os.fspath(path)), str(base))
            if not os.path.isfile(base_path):
                raise FileNotFoundError(f"{path}: base config not found: {base_path}")
            merged.append(load_config(base_path))
        cfg = OmegaConf.merge(*merged, {k: v for k, v in cfg.items() if k != "base"})
    if overrides:
        bad = [o for o in overrides if "=" not in o or shown_key(o.split("=", 1)[0]) != o.split("=", 1)[0]]
        if bad:
            raise SettingsError(f"--set expects key=value with a dotted key path (e.g. inference.tau=0.7), got "
                                f"{', '.join(map(repr, bad))}")
        for override in overrides:
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
            except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
                raise SettingsError(f"--set {override!r}: not a valid override "
                                    f"({' '.join(str(err).split()).split(' full_key')[0][:200]})") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise SettingsError(f"{path}: {' '.join(str(err).split()).split(' object_type')[0][:200]}") from None
    return cfg


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def choose_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any explicit torch device string is honoured."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
PRECISIONS = ("auto", *_DTYPES)
"""Names ``inference.precision`` accepts."""


def choose_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Map ``auto|fp32|fp16|bf16`` to a dtype; ``auto`` is fp16 on CUDA and fp32 elsewhere.

    Half precision is refused on CPU (slow and numerically poor there) with a clear error.
    """
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown precision '{name}', expected one of auto/{'/'.join(sorted(_DTYPES))}")
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"precision '{name}' is only supported on CUDA/MPS; use fp32 on CPU")
    return dtype
