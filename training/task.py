"""What the one trainer (:class:`training.trainer.Trainer`) trains: the :class:`TrainTask` interface.

The trainer owns everything a run shares — accelerate, the exp_dir lock, the data order, exact resume, EMA, the
optimizer-step loop, metrics, checkpoints on disk — and asks its task for the parts that depend on the model: the
settings, the start-up checks, the trainable modules with their optimizers, the weights it releases, previews and,
for models with several optimizers (a GAN, the one-step distillation), the optimizer step itself. Tasks: the ControlLDM
stages (:class:`training.trainer.DiffusionTask`), the feed-forward baselines (:class:`training.baseline.BaselineTask`)
and the one-step distillation (:class:`training.stage3.OneStepTask`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from training.settings import TrainSettings
from utils.checkpoint import save_state_dict_atomic


@dataclass
class Part:
    """One trainable module and its optimizer. The first part of a task is its step module: ``forward(batch, step,
    generator, rng) -> {"loss", "terms", "logs"}`` (the trainer's default optimizer step calls it)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer


class TrainTask(ABC):
    """The model side of a training run (module docstring).

    Attributes set by the constructor: ``cfg`` (the full config, as the run saves it), ``loop`` (the ``train.*``
    settings), ``label`` (start-up log and progress bar, "stage 2"), ``run_name`` (tracker run under
    ``<exp_dir>/logs``), ``find_unused_parameters`` (DDP: some trainable parameters can miss a gradient).
    The constructor does the start-up checks that need no Accelerator (weight files, settings) and raises
    :class:`training.state.TrainError` with one line.
    """

    cfg: DictConfig
    loop: TrainSettings
    label: str
    run_name: str
    find_unused_parameters: bool = False

    @abstractmethod
    def build(self, device: torch.device) -> list[Part]:
        """The trainable parts on ``device`` (called after the global seed is set), the step module first."""

    @abstractmethod
    def released_weights(self) -> dict[str, torch.Tensor]:
        """The weights the run releases (the EMA shadows exactly these)."""

    @abstractmethod
    def checkpoint_files(self, ema: dict[str, torch.Tensor] | None) -> dict[str, dict[str, torch.Tensor]]:
        """``{file suffix: state dict}`` written by :meth:`write_checkpoint` as ``checkpoints/<step:07d><suffix>``
        plus the task's extension (suffix "" = the release)."""

    def write_checkpoint(self, state: dict[str, torch.Tensor], stem: Path) -> None:
        """Write one of :meth:`checkpoint_files` to ``<stem>.pt`` (a flat state dict), atomically; a task whose release
        has another format (the one-step adapter file) writes it here."""
        save_state_dict_atomic(state, stem.with_name(stem.name + ".pt"))

    def tracker_config(self) -> dict[str, Any]:
        """Flat hyper-parameters for the tracker."""
        return {}

    def preview(self, step_module: nn.Module, batch: dict[str, Any], step: int,
                seed: int) -> tuple[torch.Tensor, list[str] | None] | None:
        """An image grid (3,H,W) in [0,1] and its texts for TensorBoard, or None."""
        return None

    def warning(self, logs: list[dict[str, torch.Tensor]]) -> str | None:
        """A message to log once when these micro-step logs show a problem, or None."""
        return None

    custom_step: Callable[[Any, Iterator[dict[str, Any]]],
                          tuple[dict[str, Any], list[dict[str, Any]], list[str]]] | None = None
    """For tasks with several optimizers: ``custom_step(trainer, data_iter) -> (last batch, logs per micro-step,
    offending names)`` replaces the trainer's one-optimizer step. Like that step it asks ``trainer.guard``
    (:class:`training.guard.NonFiniteGuard`) before each optimizer update and returns the offending loss terms /
    gradients of an update it did not take ([] when every update was taken); the trainer then counts the skip, leaves
    out the EMA update and the checkpoint, and stops the run after ``train.max_nonfinite_steps`` of them."""
