"""The ``train.*`` section as two validated objects, read once at the door.

:class:`TrainSettings` holds the keys of the training loop itself, :class:`ExtensionSettings` those of the HCD-YC
extension terms (off = the published recipe); :func:`split_settings` reads ``cfg.train`` into both, refusing unknown
or missing keys with :class:`training.state.TrainError`. The defaults below are the only ones in the code.

Batch sizes (:class:`training.data.BatchPlan`): ``train.batch_size`` is the global batch of one optimizer step, as in
the published scripts (their ``Accelerator(split_batches=True)`` splits the DataLoader batch of 16 over the
processes); the mutually exclusive ``train.per_process_batch_size`` names the micro-batch of each process instead.
The learning rate is piecewise constant (``train.lr_schedule``), a function of the step count only, so a resumed run
continues exactly across a switch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training.state import TrainError
from utils.common import get_obj_from_str
from utils.rules import (Rule, SettingsError, check_section_keys, check_target_block, check_top_level, first_violation,
                         is_int, is_number, optional, unknown_keys_message)

TRAIN_SECTIONS = ("model", "dataset", "train", "run")
"""Top-level keys of a training config (``run``: what the trainer writes into ``<exp_dir>/config.yaml``)."""


@dataclass(frozen=True)
class ExtensionSettings:
    """The ``train.*`` keys of the HCD-YC extensions (all off by default: the published training).

    The text processor itself is switched on in the model section (``model.cldm.params.text_processor``, the one
    switch; :data:`ALIASES`); ``text_processor_start`` is when its training starts."""

    cycle_weight: float = 0.0
    pixel_weight: float = 1.0
    feature_weight: float = 0.1
    semantic_weight: float = 0.05
    forward_weight: float = 0.7
    backward_weight: float = 0.3
    cycle_start_step: int = 0
    cycle_ramp_steps: int = 0
    cycle_max_t: int | None = None
    cycle_timestep_mode: str = "snr"
    cycle_crop: int | None = None
    vgg_path: str | None = None
    region_sky_weight: float = 0.5
    region_texture_weight: float = 2.0
    region_smooth_weight: float = 1.0
    use_dynamic_prompt: bool = False
    dynamic_prompt_start: int = 0
    text_processor_start: int = 2000
    text_align_weight: float = 0.0
    text_align_max_step: int = 0
    text_align_temperature: float = 0.07
    align_embed_width: int = 32

    @property
    def cycle_enabled(self) -> bool:
        return self.cycle_weight > 0

    @property
    def align_enabled(self) -> bool:
        return self.text_align_weight > 0

    @property
    def region_weights(self) -> dict[str, float]:
        """``train.region_*_weight`` keyed by :data:`haze.regions.REGIONS`."""
        return {"sky": self.region_sky_weight, "texture": self.region_texture_weight,
                "smooth": self.region_smooth_weight}

    def has_idle_parameters(self, text_processor: bool) -> bool:
        """Whether some trainable parameters get no gradient on some steps (DDP must look for unused ones): the
        alignment encoder on skipped steps, the text processor (when the model has one, ``text_processor``) before
        ``text_processor_start``."""
        return self.align_enabled or (text_processor and self.text_processor_start > 0)

    def validate(self) -> None:
        """Raise ValueError naming the ``train.*`` key of the first bad value (rules: :data:`EXTENSION_RULES`)."""
        message = first_violation(self, EXTENSION_RULES, "train")
        if message is not None:
            raise ValueError(message)


EXTENSION_RULES: tuple[Rule, ...] = (
    (("cycle_weight", "pixel_weight", "feature_weight", "semantic_weight", "forward_weight", "backward_weight",
      "text_align_weight", "region_sky_weight", "region_texture_weight", "region_smooth_weight"),
     lambda v: is_number(v) and v >= 0, "a number >= 0"),
    (("cycle_start_step", "cycle_ramp_steps", "dynamic_prompt_start", "text_processor_start", "text_align_max_step"),
     lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    (("cycle_max_t",), optional(lambda v: is_int(v) and v >= 0), "an integer >= 0 or null"),
    (("cycle_crop",), optional(lambda v: is_int(v) and v >= 1), "a positive latent size or null"),
    (("text_align_temperature",), lambda v: is_number(v) and v > 0, "a number > 0"),
    (("cycle_timestep_mode",), lambda v: v in ("snr", "sqrt_alpha"), "snr or sqrt_alpha"),
    (("vgg_path",), optional(lambda v: isinstance(v, str)), "a path or null"),
    (("use_dynamic_prompt",), lambda v: isinstance(v, bool), "true or false"),
    (("align_embed_width",), lambda v: is_int(v) and v >= 1, "a positive integer"),
)
"""(keys, test, what a valid value is) of every ``train.*`` key of :class:`ExtensionSettings`."""

MIXED_PRECISION = (None, "no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """The ``train.*`` keys of the loop itself (extension keys: :class:`training.settings.ExtensionSettings`)."""

    sd_path: str | None
    """SD-2.1 weights of the diffusion stages (required there by :func:`split_settings`; the baselines have none)."""
    exp_dir: str
    resume: str | None = None
    learning_rate: float | None = 1e-5
    lr_schedule: list[list[float]] | None = None
    batch_size: int | None = 16
    per_process_batch_size: int | None = None
    num_workers: int = 4
    train_steps: int = 5000
    max_seconds: float | None = None
    """Wall-clock budget of the optimizer-step loop of this process's run (start-up excluded): the run ends after the
    step during which it ran out, with that step's checkpoint and state, as at ``train_steps``; null = no budget."""
    log_every: int = 50
    ckpt_every: int = 1000
    image_every: int | None = 500
    sample_steps: int = 50
    num_preview: int = 4
    keep_last: int = 2
    mixed_precision: str | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    max_grad_norm: float | None = None
    max_nonfinite_steps: int = 10
    max_bad_sample_fraction: float = 0.01
    ema_decay: float | None = None
    seed: int = 231
    log_with: str | None = "tensorboard"

    def validate(self) -> None:
        """Raise ValueError naming the ``train.*`` key of the first bad value (rules: :data:`LOOP_RULES`), or the
        pair of mutually exclusive keys that is not set exactly once."""
        message = first_violation(self, LOOP_RULES, "train")
        if message is not None:
            raise ValueError(message)
        for one, other in (("batch_size", "per_process_batch_size"), ("learning_rate", "lr_schedule")):
            if (getattr(self, one) is None) == (getattr(self, other) is None):
                raise ValueError(f"set exactly one of train.{one} and train.{other} (the other null), got "
                                 f"{getattr(self, one)} and {getattr(self, other)}")
        if self.lr_schedule is not None:
            validate_lr_schedule(self.lr_schedule)

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step taken after ``step`` completed steps: ``learning_rate``, or the rate of
        the last ``lr_schedule`` entry whose start is <= step (so [[0, a], [N, b]] trains steps 1..N at a)."""
        if self.lr_schedule is None:
            return float(self.learning_rate)
        return float(next(lr for start, lr in reversed(self.lr_schedule) if step >= start))


LOOP_RULES: tuple[Rule, ...] = (
    (("exp_dir",), lambda v: isinstance(v, str), "a path"),
    (("sd_path",), optional(lambda v: isinstance(v, str)), "a path or null"),
    (("resume", "log_with"), optional(lambda v: isinstance(v, str)), "a string or null"),
    (("train_steps", "log_every", "ckpt_every", "sample_steps", "keep_last", "gradient_accumulation_steps",
      "num_preview", "max_nonfinite_steps"), lambda v: is_int(v) and v > 0, "a positive integer"),
    (("max_bad_sample_fraction",), lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    (("batch_size", "per_process_batch_size", "image_every"), optional(lambda v: is_int(v) and v > 0),
     "a positive integer or null"),
    (("num_workers",), lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    (("learning_rate", "max_grad_norm"), optional(lambda v: is_number(v) and v > 0), "a number > 0 or null"),
    (("max_seconds",), optional(lambda v: is_number(v) and math.isfinite(v) and v > 0),
     "a number of seconds > 0 or null"),
    (("ema_decay",), optional(lambda v: is_number(v) and 0.0 < v < 1.0), "a number in (0, 1) or null"),
    (("mixed_precision",), lambda v: v in MIXED_PRECISION, "no, fp16, bf16 or null"),
    (("gradient_checkpointing",), lambda v: isinstance(v, bool), "true or false"),
    (("seed",), is_int, "an integer"),
)
"""(keys, test, what a valid value is) of every ``train.*`` key of :class:`TrainSettings` (``lr_schedule``:
:func:`validate_lr_schedule`)."""


def validate_lr_schedule(schedule: Any) -> None:
    """``train.lr_schedule``: [[0, lr0], [s1, lr1], ...] with integer starts beginning at 0, strictly increasing,
    and rates > 0; ValueError naming the key otherwise."""
    form = "train.lr_schedule must be a list of [start_step, learning_rate] pairs, the first starting at 0"
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError(f"{form}, got {schedule}")
    starts = []
    for entry in schedule:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"{form}, got entry {entry}")
        start, lr = entry
        if isinstance(start, bool) or not isinstance(start, int) or not isinstance(lr, (int, float)) or lr <= 0:
            raise ValueError(f"{form} (integer steps, rates > 0), got entry {entry}")
        starts.append(start)
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"{form}, with strictly increasing steps, got starts {starts}")


# ---------------------------------------------------------------------------------------------------------- config
ALIASES: dict[str, str] = {"use_text_processor": "model.cldm.params.text_processor"}
"""``train.*`` keys of the design document accepted as other names of a model switch: ``train.use_text_processor:
true`` is ``model.cldm.params.text_processor: true``, the one text-processor switch."""


def resolve_aliases(cfg: DictConfig) -> DictConfig:
    """``cfg`` with each key of :data:`ALIASES` moved onto the switch it names (``true`` switches it on, ``false``
    leaves the model section as it is) and removed from ``train``; TrainError for a value that is not a boolean.
    The training run reads its config through this once, at the door."""
    present = [key for key in ALIASES if "train" in cfg and key in cfg.train]
    if not present:
        return cfg
    out = cfg.copy()
    for key in present:
        value = out.train.pop(key)
        if not isinstance(value, bool):
            raise TrainError(f"train.{key} must be true or false, got {value!r}")
        if value:
            OmegaConf.update(out, ALIASES[key], True, merge=True)
    return out


def check_sections(cfg: DictConfig, sections: tuple[str, ...] = TRAIN_SECTIONS) -> None:
    """The top level (known ``sections``, did-you-mean), the ``model`` section (``cldm`` with its ``text_processor``
    switch, ``diffusion``) and the ``dataset`` as target blocks (:func:`utils.rules.check_target_block`); TrainError
    naming the key path."""
    try:
        check_top_level(cfg, sections)
        for section in ("model", "dataset", "train"):
            if section not in cfg:
                raise SettingsError(f"config has no '{section}' section")
        check_section_keys(cfg.model, ("cldm", "diffusion"), "model")
        for key in ("cldm", "diffusion"):
            block = OmegaConf.to_container(cfg.model[key], resolve=True) if key in cfg.model else None
            if block is None:
                raise SettingsError(f"model.{key} is required (a target + params block)")
            if key == "cldm" and isinstance(block.get("params"), dict):
                switch = block["params"].pop("text_processor", False)
                if not isinstance(switch, bool):
                    raise SettingsError(f"model.cldm.params.text_processor must be true or false, got {switch!r}")
            check_target_block(block, f"model.{key}", get_obj_from_str)
        check_target_block(OmegaConf.to_container(cfg.dataset, resolve=True), "dataset", get_obj_from_str)
    except SettingsError as err:
        raise TrainError(str(err)) from None


def split_settings(cfg: DictConfig) -> tuple[TrainSettings, ExtensionSettings]:
    """``cfg.train`` -> (loop settings, extension settings), after :func:`check_sections`; unknown (did-you-mean)
    or missing keys raise TrainError. The keys of :data:`ALIASES` are model switches (:func:`resolve_aliases`),
    checked here and not part of either object."""
    check_sections(cfg)
    train = OmegaConf.to_container(resolve_aliases(cfg).train, resolve=True)
    if not isinstance(train, dict):
        raise TrainError(f"the train section must be a mapping of keys, got {train!r}")
    loop_keys = {f.name for f in dataclasses.fields(TrainSettings)}
    ext_keys = {f.name for f in dataclasses.fields(ExtensionSettings)}
    message = unknown_keys_message(train, loop_keys | ext_keys, "train")
    if message is not None:
        raise TrainError(message)
    for key in ("sd_path", "exp_dir"):
        if train.get(key) is None:
            raise TrainError(f"train.{key} is required")
    loop = TrainSettings(**{k: v for k, v in train.items() if k in loop_keys})
    ext = ExtensionSettings(**{k: v for k, v in train.items() if k in ext_keys})
    try:
        loop.validate()
        ext.validate()
    except ValueError as err:
        raise TrainError(str(err)) from None
    return loop, ext
