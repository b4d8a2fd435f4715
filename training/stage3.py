"""One-step DiffDehaze (stage 3): the distillation of :mod:`training.distill` as a task of the one trainer.

    accelerate launch train_stage3.py --config configs/train/stage3_onestep.yaml [--set train.resume=latest ...]

A config has four sections, all read and checked before a weight file is loaded (:func:`split_stage3_settings`):

* ``model``: the stage-2 model section (``configs/model/sd21_ircontrolnet.yaml``, shared with inference);
* ``dataset``: hazy/clean pairs (``condition`` hazy in [0,1], ``target`` clean in [-1,1], ``prompt``), as stage 2's;
  the shipped config gives them the prompt inference uses;
* ``train``: the loop (:class:`training.settings.TrainSettings`): ``sd_path`` is the SD-2.1 checkpoint,
  ``learning_rate`` / ``lr_schedule`` drive both optimisers, ``max_grad_norm`` clips each parameter set on its own,
  ``ema_decay`` shadows the student's trainable tensors; ``gradient_accumulation_steps`` must be 1 (one batch per
  iteration), ``sample_steps`` does not apply; the HCD-YC extension keys of stages 1-2 are refused;
* ``distill``: :class:`training.distill.DistillSettings` (``controlnet_path`` = the stage-2 ControlNet, t*, rank,
  loss weights, the perceptual term, the VSD timestep range).

The run: the teacher (SD-2.1 + the stage-2 ControlNet, frozen) and two trainable parts built from it,
:class:`training.distill.StudentObjective` and :class:`training.distill.FakeScoreObjective`, each with its own AdamW.
One iteration (:func:`distill_step`) takes one batch and updates the student, then the fake score. A training state
(``<exp_dir>/state/<step>``) holds only the trainable tensors of both parts (adapters, the student's UNet input conv),
both optimisers, the random states, the progress and the EMA; the frozen weights are rebuilt from the weight files.

Release: ``<exp_dir>/checkpoints/<step:07d>.safetensors`` is the adapter file of :mod:`model.onestep` (the student's
adapters and UNet input conv, with the rank, alpha and t* in its metadata), which ``inference_onestep.py`` merges into
the stage-2 model (``inference.adapter_path``); ``<step>_ema.safetensors`` is its EMA copy in the same format.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from losses.lpips import LPIPS, lpips_weight_file
from losses.vgg import vgg_weight_file
from model.builder import build_model, controlnet_weight_file, sd_weight_file
from model.onestep import AdapterMeta, write_adapter_file
from training.data import UNREADABLE_KEY, to_device
from training.distill import DistillationStep, DistillSettings, FakeScoreObjective, StudentObjective
from training.settings import TRAIN_SECTIONS, TrainSettings, check_sections
from training.state import TrainError, find_resume_state
from training.task import Part, TrainTask
from training.trainer import run_config, task_cli, set_gradient_checkpointing, step_seed
from utils.checkpoint import CheckpointError, WeightFile, check_weight_files
from utils.rules import SettingsError, check_section_keys, unknown_keys_message

log = logging.getLogger("hcdyc.train")

STAGE3_SECTIONS = (*TRAIN_SECTIONS, "distill")
"""Top-level keys of a stage-3 config."""
STUDENT_SEED_KEY, FAKE_SEED_KEY = 0, 1
"""The second key of :func:`training.trainer.step_seed` for the student's and the fake score's draws of a step."""


def split_stage3_settings(cfg: DictConfig) -> tuple[TrainSettings, DistillSettings]:
    """``cfg.train`` and ``cfg.distill`` -> validated settings (after the top level, ``model`` and ``dataset``
    checks of :func:`training.settings.check_sections`); TrainError naming the key otherwise."""
    check_sections(cfg, STAGE3_SECTIONS)
    train = OmegaConf.to_container(cfg.train, resolve=True)
    distill = OmegaConf.to_container(cfg.get("distill") or {}, resolve=True)
    if not isinstance(train, dict):
        raise TrainError(f"the train section must be a mapping of keys, got {train!r}")
    message = unknown_keys_message(train, [f.name for f in dataclasses.fields(TrainSettings)], "train")
    if message is not None:
        raise TrainError(message)
    for key in ("sd_path", "exp_dir"):
        if train.get(key) is None:
            raise TrainError(f"train.{key} is required")
    try:
        check_section_keys(distill, [f.name for f in dataclasses.fields(DistillSettings)], "distill")
        loop = TrainSettings(**train)
        loop.validate()
        settings = DistillSettings(**distill)
        settings.validate(OmegaConf.select(cfg, "model.diffusion.params.timesteps", default=None))
    except (SettingsError, ValueError) as err:
        raise TrainError(str(err)) from None
    if loop.gradient_accumulation_steps != 1:
        raise TrainError(f"train.gradient_accumulation_steps must be 1 for stage 3 (one batch per iteration and "
                         f"optimiser), got {loop.gradient_accumulation_steps}; raise train.batch_size instead")
    if settings.controlnet_path is None:
        raise TrainError("distill.controlnet_path is required: the stage-2 ControlNet the teacher, the student and the "
                         "fake score start from (weights/stage2.pt or a stage-2 checkpoints/<step>.pt)")
    return loop, settings


def stage3_weight_files(loop: TrainSettings, settings: DistillSettings, resume_dir: Path | None) -> list[WeightFile]:
    """Every weight file a stage-3 run reads, for the door check: SD-2.1, the stage-2 ControlNet, the LPIPS files
    when the perceptual term is LPIPS, and the student's weights of the state it resumes from."""
    files = [sd_weight_file("train.sd_path", loop.sd_path),
             controlnet_weight_file("distill.controlnet_path", settings.controlnet_path)]
    if settings.perceptual == "lpips":
        files += [lpips_weight_file("distill.lpips_path", settings.lpips_path),
                  vgg_weight_file("distill.vgg_path", settings.vgg_path)]
    if resume_dir is not None:
        files.append(WeightFile("train.resume", str(resume_dir / "model.safetensors"),
                                "the student's trainable tensors of a stage-3 training state (safetensors)"))
    return files


class OneStepTask(TrainTask):
    """The one-step distillation (module docstring): two parts with an AdamW each, the custom step
    :func:`distill_step`, the release written as an adapter file."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.loop, self.settings = loop, settings = split_stage3_settings(cfg)
        self.label, self.run_name = "stage 3 (one-step)", "stage3"
        try:
            check_weight_files(stage3_weight_files(loop, settings, find_resume_state(loop.exp_dir, loop.resume)))
        except CheckpointError as err:
            raise TrainError(str(err)) from None
        self.custom_step = distill_step

    def build(self, device: torch.device) -> list[Part]:
        s = self.settings
        try:
            teacher, diffusion = build_model(self.cfg.model, self.loop.sd_path, s.controlnet_path,
                                             sd_key="train.sd_path")
        except CheckpointError as err:
            raise TrainError(str(err)) from None
        set_gradient_checkpointing(teacher, self.loop.gradient_checkpointing)
        teacher.to(device)
        lpips = LPIPS(s.lpips_path, s.vgg_path).to(device) if s.perceptual == "lpips" else None
        self.step = DistillationStep(teacher, diffusion.to(device), s, lpips)
        return [Part(StudentObjective(self.step), self._adamw(self.step.student_parameters())),
                Part(FakeScoreObjective(self.step), self._adamw(self.step.fake_parameters()))]

    def _adamw(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.loop.lr_at(0))

    def released_weights(self) -> dict[str, torch.Tensor]:
        """The student's adapters and UNet input conv (the adapter file's tensors)."""
        return self.step.student.denoiser.adapter_state_dict()

    def checkpoint_files(self, ema: dict[str, torch.Tensor] | None) -> dict[str, dict[str, torch.Tensor]]:
        """The adapter file (+ its EMA copy)."""
        return {"": self.released_weights(), **({"_ema": ema} if ema is not None else {})}

    def write_checkpoint(self, state: dict[str, torch.Tensor], stem: Path) -> None:
        """``<stem>.safetensors`` in the adapter-file format of :mod:`model.onestep`."""
        denoiser = self.step.student.denoiser
        write_adapter_file(state, AdapterMeta(denoiser.rank, denoiser.alpha, self.settings.timestep),
                           stem.with_name(stem.name + ".safetensors"))

    def tracker_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": 3}
        for key, value in {**dataclasses.asdict(self.loop), **dataclasses.asdict(self.settings)}.items():
            out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        return out

    @torch.no_grad()
    def preview(self, step_module: nn.Module, batch: dict[str, Any], step: int,
                seed: int) -> tuple[torch.Tensor, list[str]]:
        """Rows: the student's output, the clean target, the hazy input, for the first ``train.num_preview`` samples;
        the texts are their prompts."""
        from torchvision.utils import make_grid

        n = self.loop.num_preview
        hazy, prompts = batch["condition"][:n].float(), list(batch["prompt"])[:n]
        rows = [self.step.student.dehaze(hazy, prompts).float() * 0.5 + 0.5, batch["target"][:n].float() * 0.5 + 0.5,
                hazy]
        return make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=hazy.shape[0], padding=2), prompts


def _step_part(trainer, params: list[nn.Parameter], optimizer) -> bool:
    """Clip ``params`` to ``train.max_grad_norm`` (unscaled first under fp16) and step ``optimizer``; whether the
    gradient scaler skipped it for an fp16 overflow."""
    if trainer.loop.max_grad_norm is not None:
        trainer.accelerator.clip_grad_norm_(params, trainer.loop.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return bool(optimizer.step_was_skipped)


def distill_step(trainer, data_iter: Iterator[dict[str, Any]]
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """One distillation iteration on one batch: the student's update, then the fake score's.

    1. Student: loss (data + VSD) and backward; the guard decides on its terms and gradients. Anything not finite
       skips the iteration (neither network is updated). Else clip and step the student's optimiser.
    2. Fake score: its diffusion loss on the detached student latent of step 1 and backward; the guard decides on
       it. Not finite: the fake score is not updated and the iteration counts as skipped (the student's update of
       step 1 stands; a finite student loss with a non-finite fake loss needs non-finite fake adapters, which the
       guard never lets in).

    Each backward is followed by its own optimiser step, as accelerate's one gradient scaler needs under fp16. The
    draws (VSD and fake-score timesteps and noise) come from generators seeded by (seed, step, part, process).
    """
    acc, loop, guard = trainer.accelerator, trainer.loop, trainer.guard
    step_module: StudentObjective = trainer.step_module
    fake_part = trainer.extra_parts[0]
    step = trainer.progress.step
    for optimizer in (trainer.optimizer, fake_part.optimizer):
        for group in optimizer.param_groups:
            group["lr"] = loop.lr_at(step)
    batch = next(data_iter)
    trainer.unreadable.note(batch.pop(UNREADABLE_KEY))
    batch = to_device(batch, acc.device)

    def generator(key: int) -> torch.Generator:
        return torch.Generator(device=acc.device).manual_seed(step_seed(loop.seed, step, key, acc.process_index))

    check_gradients = acc.scaler is None
    student_params, fake_params = step_module.step.student_parameters(), step_module.step.fake_parameters()
    out = trainer.model(batch, generator(STUDENT_SEED_KEY))
    acc.backward(out["loss"])
    guard.watch_terms(out["terms"])
    logs = dict(out["logs"])
    logs["loss"] = logs.pop("loss_student")
    offending = guard.decide(acc, out["terms"], student_params, check_gradients)
    if offending:
        trainer.optimizer.zero_grad(set_to_none=True)
        return batch, [logs], offending
    overflowed = _step_part(trainer, student_params, trainer.optimizer)

    fake = fake_part.module(out["latent"], out["cond"], generator(FAKE_SEED_KEY))
    acc.backward(fake["loss"])
    guard.watch_terms(fake["terms"])
    logs.update(fake["logs"])
    offending = guard.decide(acc, fake["terms"], fake_params, check_gradients)
    if offending:
        fake_part.optimizer.zero_grad(set_to_none=True)
        return batch, [logs], offending
    overflowed |= _step_part(trainer, fake_params, fake_part.optimizer)
    guard.took_step(overflowed)
    return batch, [logs], []


# ------------------------------------------------------------------------------------------------------------- CLI
def train_stage3(config: str | Path, overrides: list[str] | None = None) -> int:
    """Run the stage-3 config ``config`` with ``--set``-style overrides (``["train.train_steps=100", ...]``) in this
    process; returns the exit status (2: start-up problem, logged as one line; 3/4: stopped by the guards)."""
    return run_config(config, overrides, OneStepTask)


def main(default_config: str = "configs/train/stage3_onestep.yaml") -> None:
    """CLI of ``train_stage3.py``: ``--config`` and ``--set key=value ...``."""
    task_cli("Train stage 3: distil DiffDehaze into a one-step student", default_config,
             "stage-3 YAML (model / dataset / train / distill)", "train.batch_size=8 train.resume=latest",
             train_stage3)
