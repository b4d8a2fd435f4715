"""Modes of the local dehazing page (app.py): which inference script runs with which settings.

A mode names a script; its pipeline (:func:`pipelines.registry.pipeline_for`) holds the batch function
``make_process(cfg, runner, show_steps)`` the script itself runs over a folder, so the page's output for a seed is the script's output file for that seed. The modes and how
their settings derive from the app's config are data (``configs/app/modes.yaml``, documented there); this module
resolves them, checks their files, and keeps one loaded model per distinct weights.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines.cli import log
from pipelines.registry import pipeline_for
from pipelines.runner import DiffusionRunner
from pipelines.settings import WEIGHT_KEYS, InferenceSettings, InferenceSettingsError
from utils.common import load_config

MODE_KEYS = ("label", "script", "defaults", "preset", "set", "requires", "sliders")
SLIDERS = ("tau", "omega", "guidance", "steps", "seed")  # the page's controls, in page order
# What a preset never replaces: the model and where/how it runs come from the app's config.
PRESET_KEEPS = ("sd_path", "controlnet_path", "device", "precision", "image_folder", "result_folder")


class ModeError(ValueError):
    """A modes file entry is malformed (names the file, the entry and the key)."""


@dataclass(frozen=True)
class Mode:
    """One choice on the page: ``script`` (the pipeline module of the named script), its resolved config ``cfg``
    with the settings read from it (``settings``), and the slider -> key map."""

    label: str
    script: ModuleType
    cfg: DictConfig
    settings: InferenceSettings
    sliders: dict[str, str] = field(default_factory=dict)

    @property
    def weight_paths(self) -> dict[str, str]:
        """``inference.*`` weight files this mode loads: pipelines.settings.WEIGHT_KEYS, unless the script
        declares its own ``WEIGHT_KEYS`` (DCP: none, so no model is loaded for it)."""
        keys = getattr(self.script, "WEIGHT_KEYS", WEIGHT_KEYS)
        return self.settings.weight_paths(keys)

    @property
    def needs_runner(self) -> bool:
        """Whether the mode samples with a loaded diffusion model (a :class:`DiffusionRunner` from the cache): not
        for scripts without weights (DCP) or that load their own network (``USES_DIFFUSION_RUNNER = False``)."""
        return bool(self.weight_paths) and getattr(self.script, "USES_DIFFUSION_RUNNER", True)

    def run_config(self, values: dict[str, Any]) -> DictConfig:
        """This mode's settings with the page's control ``values`` (slider name -> value) written to their keys;
        controls the mode does not map are ignored."""
        cfg = self.cfg.copy()
        for name, key in self.sliders.items():
            if name in values and values[name] is not None:
                OmegaConf.update(cfg, key, values[name], merge=False)
        return cfg


def _preset_overrides(path: Path) -> DictConfig:
    """The keys a preset replaces: its whole resolved config minus the model section and PRESET_KEEPS."""
    preset = load_config(path)
    preset.pop("model", None)
    for key in PRESET_KEEPS:
        if "inference" in preset:
            preset.inference.pop(key, None)
    return preset


def resolve_mode(entry: dict, app_cfg: DictConfig, root: Path, where: str) -> Mode | None:
    """Build one mode from a modes-file ``entry``; None (with a log line) when a file, a required key or a weight
    file is missing; ModeError for a malformed entry or invalid ``inference.*`` settings (naming the key).

    Order: ``defaults`` fill in what ``app_cfg`` lacks, then ``preset`` and ``set`` replace keys.
    """
    unknown = sorted(set(entry) - set(MODE_KEYS))
    if unknown or "label" not in entry or "script" not in entry:
        raise ModeError(f"{where}: need 'label' and 'script'; unknown keys {unknown}; allowed: {list(MODE_KEYS)}")
    label = str(entry["label"])
    bad_sliders = sorted(set(entry.get("sliders") or {}) - set(SLIDERS))
    if bad_sliders:
        raise ModeError(f"{where} ({label}): unknown sliders {bad_sliders}; allowed: {list(SLIDERS)}")
    for key in ("defaults", "preset"):
        if entry.get(key) and not (root / entry[key]).is_file():
            log.info("mode '%s' left out: %s file %s does not exist", label, key, entry[key])
            return None
    cfg = app_cfg.copy()
    if entry.get("defaults"):
        cfg = OmegaConf.merge(load_config(root / entry["defaults"]), cfg)
    missing = [key for key in entry.get("requires") or [] if OmegaConf.select(cfg, key) is None]
    if missing:
        log.info("mode '%s' left out: config key(s) %s not present", label, missing)
        return None
    if entry.get("preset"):
        cfg = OmegaConf.merge(cfg, _preset_overrides(root / entry["preset"]))
    for key, value in (entry.get("set") or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    try:
        settings = InferenceSettings.from_config(cfg)
    except InferenceSettingsError as err:
        raise ModeError(f"{where} ({label}): {err}") from None
    mode = Mode(label, pipeline_for(entry["script"]), cfg, settings, dict(entry.get("sliders") or {}))
    try:
        weight_paths = mode.weight_paths
    except InferenceSettingsError as err:  # a weight file not named
        log.warning("mode '%s' left out: %s", label, err)
        return None
    absent = [path for path in weight_paths.values() if not Path(path).is_file()]  # cwd-relative, as scripts
    if absent:
        log.warning("mode '%s' left out: weight file %s not found", label, absent[0])
        return None
    return mode


def load_modes(path: str | Path, app_cfg: DictConfig, root: str | Path = ".") -> list[Mode]:
    """Every available mode of the modes file at ``path`` (relative paths inside resolve against ``root``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"modes file not found: {path}")
    entries = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("modes")
    if not isinstance(entries, list) or not entries:
        raise ModeError(f"{path}: expected a non-empty list under 'modes'")
    modes = [resolve_mode(entry, app_cfg, Path(root), f"{path} entry {i}") for i, entry in enumerate(entries)]
    return [mode for mode in modes if mode is not None]


class RunnerCache:
    """One loaded model per distinct (model section, weights, device, precision), each with its own lock so one
    run at a time uses it; a model is loaded the first time a mode needs it and kept."""

    def __init__(self) -> None:
        self._runners: dict[str, tuple[DiffusionRunner, threading.Lock]] = {}
        self._guard = threading.Lock()

    @staticmethod
    def key(cfg: DictConfig, inf: InferenceSettings, adapter_path: str | None = None) -> str:
        return OmegaConf.to_yaml({"model": cfg.model, "weights": [str(inf.sd_path), str(inf.controlnet_path)],
                                  "adapters": adapter_path, "device": inf.device, "precision": inf.precision})

    def get(self, cfg: DictConfig, inf: InferenceSettings,
            adapter_path: str | None = None) -> tuple[DiffusionRunner, threading.Lock]:
        """The runner (loaded on first use) and its lock for ``cfg``'s model (``inf``: the settings read from
        ``cfg``), with the one-step adapter file ``adapter_path`` merged in when given (a separate model);
        the caller configures it under the lock (``runner.configure(cfg, inf)``)."""
        key = self.key(cfg, inf, adapter_path)
        with self._guard:
            if key not in self._runners:
                self._runners[key] = (DiffusionRunner(cfg, inf, adapter_path=adapter_path), threading.Lock())
            return self._runners[key]
