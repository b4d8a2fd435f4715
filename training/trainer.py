"""The one training loop, built on accelerate: HazeGen (stage 1) and DiffDehaze (stage 2) as :class:`DiffusionTask`,
the feed-forward baselines as :class:`training.baseline.BaselineTask`, the one-step distillation (stage 3) as
:class:`training.stage3.OneStepTask` (the model side of a run: :class:`training.task.TrainTask`; several optimizers,
as a GAN or the distillation needs, through its ``custom_step``).

Published behaviour ("Learning Hazing to Dehazing", CVPR 2025): only the ControlNet trains (AdamW; stage 2 at lr 3e-5,
then 1e-5 after 50k steps), the SD-2.1 UNet, VAE and text encoder are frozen, the ControlNet starts from the UNet,
the loss is the eps MSE of :class:`training.step.TrainingStep`; checkpoints
``<exp_dir>/checkpoints/<step:07d>.pt`` are flat ControlNet state dicts in the release ``stage*.pt`` format.

Added here: exact resume (the training state on disk, the exp_dir lock and the metrics bookkeeping are in
:mod:`training.state`), mixed precision, gradient accumulation, gradient checkpointing, clipping, EMA, TensorBoard
logging, a tqdm bar on the main process, start-up data/weight checks, CPU multi-process (gloo) runs, the HCD-YC
extension losses, and the non-finite guard and mid-run unreadable-sample skip of :mod:`training.guard`. Settings: :mod:`training.settings`; data and sample order: :mod:`training.data`. Every random draw
of a step comes from a generator seeded by (seed, step, micro-step, process), so a resumed run continues exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from losses.vgg import vgg_weight_file
from model.builder import build_model as build_model_from_section
from model.builder import sd_weight_file, text_processor_on
from model.cldm import ControlLDM
from model.gaussian_diffusion import Diffusion
from training.data import UNREADABLE_KEY, GlobalBatchSampler, SkipUnreadable, build_dataset, plan_batches, to_device
from training.guard import NonFiniteGuard, TrainingStopped, UnreadableSamples, nonfinite_keys, refuse_nonfinite
from training.preview import preview_grid
from training.settings import ExtensionSettings, TrainSettings, resolve_aliases, split_settings
from training.state import (EMA, EMA_FILE, LOCK_FILE, LOG_WINDOW_FILE, METRICS_FILE, PROGRESS_FILE, STATE_NAME_DIGITS,
                            ExpDirLock, LogWindow, Progress, TrainError, drop_metrics_after, find_resume_state,
                            install_state_hooks, is_main_rank, lock_holder_alive, part_state_dict,
                            save_training_state)
from training.step import ALIGN_SKIP_REASON, TrainingStep, build_cycle_loss, image_embedder_for, trainable_parameters
from training.task import Part, TrainTask
from utils.checkpoint import CheckpointError, WeightFile, check_weight_files
from utils.common import load_config, seed_everything
from utils.distributed import launched_world_size, report_to_launcher, use_cpu_backend_if_needed

log = logging.getLogger("hcdyc.train")


# ----------------------------------------------------------------------------------------------------------- model
def set_gradient_checkpointing(ldm: ControlLDM, enabled: bool) -> int:
    """Set ``use_checkpoint`` on every UNet/ControlNet block that has it (ResBlock, BasicTransformerBlock, ...).

    Returns the number of blocks switched.
    """
    count = 0
    for module in list(ldm.unet.modules()) + list(ldm.controlnet.modules()):
        if isinstance(getattr(module, "use_checkpoint", None), bool):
            module.use_checkpoint = enabled
            count += 1
    return count


def build_model(cfg: DictConfig, loop: TrainSettings) -> tuple[ControlLDM, Diffusion]:
    """ControlLDM of ``cfg.model`` (:func:`model.builder.build_model`) with SD weights from ``train.sd_path``, the
    ControlNet initialised from the UNet and ``train.gradient_checkpointing`` applied."""
    try:
        check_weight_files([sd_weight_file("train.sd_path", loop.sd_path)])
        ldm, diffusion = build_model_from_section(cfg.model, loop.sd_path, sd_key="train.sd_path")
    except CheckpointError as err:
        raise TrainError(str(err)) from None
    set_gradient_checkpointing(ldm, loop.gradient_checkpointing)
    return ldm, diffusion


def weight_files(loop: TrainSettings, ext: ExtensionSettings, resume_dir: Path | None) -> list[WeightFile]:
    """Every weight file a run reads, for the door check: the SD checkpoint, VGG-16 when the cycle loss uses it, and
    the model weights of the state it resumes from."""
    files = [sd_weight_file("train.sd_path", loop.sd_path)]
    if ext.cycle_enabled and ext.vgg_path is not None and (ext.feature_weight or ext.semantic_weight):
        files.append(vgg_weight_file("train.vgg_path", ext.vgg_path))
    if resume_dir is not None:
        files.append(WeightFile("train.resume", str(resume_dir / "model.safetensors"),
                                "the trainable weights of an accelerate training state (safetensors)"))
    return files


# --------------------------------------------------------------------------------------------------- processes
def agree_on_error(accelerator, error: str | None) -> None:
    """Raise TrainError on every process when any process reports ``error`` (the lowest rank's message first).

    A start-up problem found by one process (the main process's lock and image checks) thus stops all of them at
    the same point, instead of leaving the others waiting in a collective.
    """
    from accelerate.utils import gather_object

    errors = [message for message in gather_object([error]) if message]
    if errors:
        raise TrainError(errors[0])


# --------------------------------------------------------------------------------------------------------- helpers
def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from (seed, keys): independent streams per step / micro-step / process."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def scalar_config(loop: TrainSettings, ext: ExtensionSettings, stage: int) -> dict[str, Any]:
    """Flat hyper-parameters for the tracker (None written as the string 'null')."""
    out: dict[str, Any] = {"stage": stage}
    for key, value in {**dataclasses.asdict(loop), **dataclasses.asdict(ext)}.items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value if value is not None else "null")
    return out


# ------------------------------------------------------------------------------------------------------------ loop
def run_training(cfg: DictConfig, stage: int) -> int:
    """Train one stage from a full config (model / dataset / train). Returns the process exit status: 2 for start-up
    problems, logged as one line by the main process only (every process of the run stops at the same point)."""
    return run_task(lambda: DiffusionTask(cfg, stage))


def run_config(config: str | Path, overrides: list[str] | None,
               make_task: Callable[[DictConfig], TrainTask]) -> int:
    """Load ``config`` with ``--set``-style ``overrides`` and train ``make_task(cfg)`` (:func:`run_task`); a config
    that cannot be read or merged gives exit status 2, logged as one line and reported to the launcher."""
    try:
        cfg = load_config(config, overrides or [])
    except (FileNotFoundError, ValueError) as err:
        if is_main_rank():
            log.error("%s", err)
        report_to_launcher(str(err))
        return 2
    return run_task(lambda: make_task(cfg))


def task_cli(description: str, default_config: str, config_help: str, example: str,
             train: Callable[[str, list[str]], int]) -> None:
    """The ``--config`` / ``--set key=value ...`` command line of a task's entry script; exits with ``train``'s
    status."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help=config_help)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"override config keys, e.g. --set {example}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    sys.exit(train(args.config, args.set))


def run_task(make_task: Callable[[], TrainTask]) -> int:
    """Train the task ``make_task()`` builds (its constructor's start-up errors included). Returns the process exit
    status: 2 for start-up problems, logged as one line by the main process only (every process of the run stops at
    the same point)."""
    lock = ExpDirLock()
    try:
        return Trainer(make_task(), lock).run()
    except TrainError as err:
        if is_main_rank():
            log.error("%s", err)
        report_to_launcher(str(err))
        return err.exit_code if isinstance(err, TrainingStopped) else 2
    finally:
        lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_startup(cfg: DictConfig, processes: int = 1) -> int:
    """``--check``: every start-up check of a run in this one process, without training or building the model:
    settings (all sections), the resume state, the weight files, the exp_dir lock, the batch plan for ``processes``
    processes and the data (every image decoded). Returns 0 (one INFO line) or 2 (one ERROR line)."""
    try:
        cfg = resolve_aliases(cfg)
        loop, ext = split_settings(cfg)
        resume_dir = find_resume_state(loop.exp_dir, loop.resume)
        try:
            check_weight_files(weight_files(loop, ext, resume_dir))
        except CheckpointError as err:
            raise TrainError(str(err)) from None
        if ext.cycle_enabled and ext.vgg_path is None and (ext.feature_weight or ext.semantic_weight):
            build_cycle_loss(ext)  # raises naming train.vgg_path; reads no file
        lock = Path(loop.exp_dir) / LOCK_FILE
        if lock.is_file() and lock_holder_alive(ExpDirLock._holder(lock)):
            raise TrainError(f"train.exp_dir {loop.exp_dir} is in use by another training run (lock {lock})")
        plan = plan_batches(loop, processes, loop.gradient_accumulation_steps)
        dataset = build_dataset(cfg, loop.seed, check_images=True)
    except (TrainError, ValueError) as err:
        log.error("%s", err)
        return 2
    log.info("start-up checks passed: settings, weights, %d samples (every image decoded), %s%s", len(dataset),
             plan.describe(), f", resuming from {resume_dir}" if resume_dir else "")
    return 0


class DiffusionTask(TrainTask):
    """HazeGen (stage 1) or DiffDehaze (stage 2): the ControlNet (+ the enabled extension modules) of a ControlLDM,
    trained with :class:`training.step.TrainingStep` and AdamW; the release is the ControlNet state dict."""

    def __init__(self, cfg: DictConfig, stage: int):
        cfg = resolve_aliases(cfg)
        self.cfg, self.stage = cfg, stage
        self.loop, self.ext = loop, ext = split_settings(cfg)
        self.label, self.run_name = f"stage {stage}", f"stage{stage}"
        try:
            check_weight_files(weight_files(loop, ext, find_resume_state(loop.exp_dir, loop.resume)))
            self.cycle_loss = build_cycle_loss(ext)
        except (ValueError, FileNotFoundError, CheckpointError) as err:
            raise TrainError(str(err)) from None
        if ext.align_enabled and not ext.use_dynamic_prompt:
            log.warning("train.text_align_weight > 0 without train.use_dynamic_prompt: %s", ALIGN_SKIP_REASON)
        # the alignment encoder (skipped steps) and the text processor (before its start) can get no gradient
        self.find_unused_parameters = ext.has_idle_parameters(text_processor_on(cfg.model))

    def build(self, device: torch.device) -> list[Part]:
        self.ldm, diffusion = build_model(self.cfg, self.loop)
        self.step_module = TrainingStep(self.ldm, diffusion, self.stage, self.ext, self.cycle_loss,
                                        image_embedder_for(self.ldm, self.ext))
        self.step_module.to_device(device)
        optimizer = torch.optim.AdamW(trainable_parameters(self.step_module), lr=self.loop.lr_at(0))
        return [Part(self.step_module, optimizer)]

    def released_weights(self) -> dict[str, torch.Tensor]:
        return self.ldm.controlnet_state_dict()

    def checkpoint_files(self, ema: dict[str, torch.Tensor] | None) -> dict[str, dict[str, torch.Tensor]]:
        """Release-format ControlNet weights (+ EMA copy, + alignment image encoder)."""
        files = {"": self.ldm.controlnet_state_dict()}
        if ema is not None:
            files["_ema"] = ema
        if self.step_module.image_embedder is not None:
            files["_image_embedder"] = self.step_module.image_embedder.state_dict()
        return files

    def tracker_config(self) -> dict[str, Any]:
        return scalar_config(self.loop, self.ext, self.stage)

    def preview(self, step_module: nn.Module, batch: dict[str, Any], step: int,
                seed: int) -> tuple[torch.Tensor, list[str] | None]:
        """Sample grid of the batch and the prompts the samples were conditioned on."""
        return preview_grid(step_module, batch, step, self.loop.num_preview, self.loop.sample_steps, seed)

    def warning(self, logs: list[dict[str, torch.Tensor]]) -> str | None:
        return ALIGN_SKIP_REASON if any(entry.get("align_skipped", 0) > 0 for entry in logs) else None


class Trainer:
    """One training run of a :class:`training.task.TrainTask`: start-up checks and set-up in ``__init__``, the
    optimizer-step loop in :meth:`run`."""

    def __init__(self, task: TrainTask, lock: ExpDirLock):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import ProjectConfiguration

        self.task, self.cfg, self.loop = task, task.cfg, task.loop
        loop, cfg = self.loop, self.cfg
        use_cpu_backend_if_needed()
        self.resume_dir = find_resume_state(loop.exp_dir, loop.resume)
        self.exp_dir = Path(loop.exp_dir)

        self.accelerator = acc = Accelerator(
            mixed_precision=loop.mixed_precision,
            gradient_accumulation_steps=loop.gradient_accumulation_steps,
            log_with=loop.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.exp_dir), logging_dir=str(self.exp_dir / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=task.find_unused_parameters)],
        )
        logging.getLogger().setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
        world = launched_world_size()
        if world != acc.num_processes:
            raise TrainError(f"launched {world} processes but accelerate runs {acc.num_processes}; on CPU set "
                             "ACCELERATE_USE_CPU=1 (done automatically when CUDA is unavailable)")
        self.accum = acc.gradient_accumulation_steps
        self.plan = plan_batches(loop, acc.num_processes, self.accum)
        error = None
        try:
            if acc.is_main_process:
                lock.acquire(self.exp_dir)
            self.dataset = SkipUnreadable(build_dataset(cfg, loop.seed, check_images=acc.is_main_process))
        except TrainError as err:
            error = str(err)
        agree_on_error(acc, error)

        seed_everything(loop.seed)
        parts = task.build(acc.device)
        self.step_module = parts[0].module
        prepared = acc.prepare(*[part.module for part in parts], *[part.optimizer for part in parts])
        self.model, self.optimizer = prepared[0], prepared[len(parts)]
        self.extra_parts = [Part(m, o) for m, o in zip(prepared[1:len(parts)], prepared[len(parts) + 1:])]
        install_state_hooks(acc)
        self.ema = EMA(task.released_weights(), loop.ema_decay) if loop.ema_decay else None
        self.progress = Progress()
        self.window = LogWindow()
        self.guard = NonFiniteGuard(loop.max_nonfinite_steps, acc.is_main_process)
        self.unreadable = UnreadableSamples(len(self.dataset), loop.max_bad_sample_fraction, acc.is_main_process)
        if self.resume_dir is not None:
            self._resume(self.resume_dir)

    def _resume(self, state_dir: Path) -> None:
        """Restore weights, optimizer, RNG states, progress, EMA and this process's log window; drop the metrics
        rows a killed run wrote after the state."""
        saved = json.loads((state_dir / PROGRESS_FILE).read_text())
        if saved.get("global_batch") not in (None, self.plan.global_batch):
            raise TrainError(f"{state_dir} was saved with a global batch of {saved['global_batch']}, this run has "
                             f"{self.plan.describe()}; its data position would not match (keep the global batch)")
        self.accelerator.load_state(str(state_dir))
        refuse_nonfinite(self.task.released_weights(), f"training state {state_dir}")
        for part in self.extra_parts:
            refuse_nonfinite(part_state_dict(self.accelerator.unwrap_model(part.module)),
                             f"training state {state_dir}")
        self.progress = Progress.load(state_dir / PROGRESS_FILE)
        if self.ema is not None:
            if not (state_dir / EMA_FILE).is_file():
                raise TrainError(f"train.ema_decay is set but {state_dir} holds no {EMA_FILE}")
            from safetensors.torch import load_file

            ema = load_file(str(state_dir / EMA_FILE))
            refuse_nonfinite(ema, f"training state {state_dir / EMA_FILE}")
            self.ema.load_state_dict(ema)
        window_file = state_dir / LOG_WINDOW_FILE.format(rank=self.accelerator.process_index)
        if window_file.is_file() and saved.get("num_processes") == self.accelerator.num_processes:
            self.window = LogWindow.load(window_file, self.accelerator.device)
        elif self.progress.step % self.loop.log_every and self.accelerator.is_main_process:
            log.warning("%s holds no log window for %d processes: the first logged means after step %d cover only "
                        "the steps after it", state_dir, self.accelerator.num_processes, self.progress.step)
        if self.accelerator.is_main_process:
            dropped = drop_metrics_after(self.exp_dir / METRICS_FILE, self.progress.step)
            if dropped:
                log.info("dropped %d %s rows logged after step %d", dropped, METRICS_FILE, self.progress.step)
        log.info("resumed from %s at step %d", state_dir, self.progress.step)

    def _loader(self) -> tuple[Iterator[dict[str, Any]], GlobalBatchSampler]:
        """Micro-batch iterator of this process from the current data position."""
        acc, p = self.accelerator, self.progress
        self.dataset.set_epoch(p.epoch)
        sampler = GlobalBatchSampler(len(self.dataset), self.plan.per_process, acc.num_processes, acc.process_index,
                                     self.accum, self.loop.seed, p.epoch, p.batch_in_epoch)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.loop.num_workers,
                            pin_memory=acc.device.type == "cuda")
        return iter(loader), sampler

    def _optimizer_step(self, data_iter: Iterator[dict[str, Any]]
                        ) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        """Accumulate ``accum`` micro-batches and step the optimizer at ``train.lr_schedule``'s rate for this step,
        unless a loss term or gradient is not finite on some process (:class:`training.guard.NonFiniteGuard`)
        -> (last micro-batch, logs per micro-batch, the offending names; [] when the step was taken)."""
        acc, loop = self.accelerator, self.loop
        for group in self.optimizer.param_groups:
            group["lr"] = loop.lr_at(self.progress.step)
        logs, offending = [], []
        for a in range(self.accum):
            batch = next(data_iter)
            self.unreadable.note(batch.pop(UNREADABLE_KEY))
            batch = to_device(batch, acc.device)
            seed = step_seed(loop.seed, self.progress.step, a, acc.process_index)
            gen = torch.Generator(device=acc.device).manual_seed(seed)
            with acc.accumulate(self.model):
                out = self.model(batch, self.progress.step, gen, random.Random(seed))
                acc.backward(out["loss"])
                self.guard.watch_terms(out["terms"])
                if acc.sync_gradients:
                    params = trainable_parameters(self.step_module)
                    offending = self.guard.decide(acc, out["terms"], params, check_gradients=acc.scaler is None)
                    if not offending:
                        if loop.max_grad_norm is not None:
                            acc.clip_grad_norm_(params, loop.max_grad_norm)
                        self.optimizer.step()
                        self.guard.took_step(self.optimizer.step_was_skipped)
                self.optimizer.zero_grad(set_to_none=True)
            logs.append(out["logs"])
        return batch, logs, offending

    def run(self) -> int:
        from tqdm.auto import tqdm

        acc, loop, p = self.accelerator, self.loop, self.progress
        if acc.is_main_process:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
            resolved = OmegaConf.merge(self.cfg, {"run": self.plan.as_dict()})
            OmegaConf.save(resolved, self.exp_dir / "config.yaml")
            log.info("%s: %s; %d samples", self.task.label, self.plan.describe(), len(self.dataset))
        if loop.log_with:
            # after a resume, TensorBoard hides the events a killed run wrote after the resumed step
            purge = {"tensorboard": {"purge_step": p.step + 1}} if p.step else {}
            acc.init_trackers(self.task.run_name, config=self.task.tracker_config(), init_kwargs=purge)
        bar = tqdm(total=loop.train_steps, initial=p.step, desc=self.task.label,
                   disable=not acc.is_main_process, dynamic_ncols=True)
        window = self.window
        warned, data_iter = False, None
        deadline = None if loop.max_seconds is None else time.monotonic() + loop.max_seconds
        self.model.train()
        while p.step < loop.train_steps:
            if data_iter is None:
                data_iter, sampler = self._loader()
            if self.task.custom_step is None:
                batch, logs, offending = self._optimizer_step(data_iter)
            else:
                batch, logs, offending = self.task.custom_step(self, data_iter)
            self.unreadable.sync(acc, p.step + 1)
            p.step += 1
            p.batch_in_epoch += 1
            if p.batch_in_epoch == sampler.batches_per_epoch:
                p.epoch, p.batch_in_epoch, data_iter = p.epoch + 1, 0, None
            if offending:
                self.guard.skip(p.step, offending, loop.lr_at(p.step - 1))
            else:
                if self.ema is not None:
                    self.ema.update(self.task.released_weights())
                window.add(logs)
            bar.update(1)
            bar.set_postfix(loss=f"{logs[-1]['loss'].item():.4f}")
            warning = None if warned else self.task.warning(logs)
            if warning is not None and acc.is_main_process:
                log.warning("%s", warning)
                warned = True
            out_of_time = self._out_of_time(deadline)
            last = p.step == loop.train_steps or out_of_time
            if p.step % loop.log_every == 0 or last:
                window.flush(acc, p.step, self.exp_dir / METRICS_FILE, bool(loop.log_with),
                             {"train/lr": loop.lr_at(p.step - 1)})
            if loop.image_every is not None and (p.step == 1 or p.step % loop.image_every == 0):
                self._preview(batch)
            if (p.step % loop.ckpt_every == 0 or last) and self._may_save():
                self._save_checkpoint()
                save_training_state(acc, p, self.ema, loop.exp_dir, loop.keep_last, self.plan.global_batch,
                                    window)
            if out_of_time:
                if acc.is_main_process:
                    log.info("train.max_seconds=%g reached: stopped after step %d of train.train_steps=%d",
                             loop.max_seconds, p.step, loop.train_steps)
                break
        bar.close()
        for line in (self.guard.summary(), self.unreadable.summary()):
            if line and acc.is_main_process:
                log.warning("%s", line)
        acc.end_training()
        return 0

    def _out_of_time(self, deadline: float | None) -> bool:
        """Whether ``train.max_seconds`` has run out (``deadline``: the monotonic clock's end of the budget, None
        without one) on any process: the flags are reduced, so every process stops after the same step."""
        if deadline is None:
            return False
        flag = torch.tensor([float(time.monotonic() >= deadline)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _preview(self, batch: dict[str, Any]) -> None:
        """The task's preview grid of the main process's last micro-batch and its texts to TensorBoard (other
        trackers: scalars only)."""
        acc = self.accelerator
        if acc.is_main_process:
            self.step_module.eval()
            preview = self.task.preview(self.step_module, batch, self.progress.step,
                                        step_seed(self.loop.seed, self.progress.step, 2**31))
            self.step_module.train()
            for tracker in acc.trackers if preview is not None else []:
                if tracker.name == "tensorboard":
                    grid, texts = preview
                    tracker.log_images({"preview": grid[None].numpy()}, step=self.progress.step, dataformats="NCHW")
                    if texts is not None:
                        tracker.log({"preview_prompts": "\n\n".join(f"{i}: {text}" for i, text in enumerate(texts))},
                                    step=self.progress.step)
        acc.wait_for_everyone()

    def _may_save(self) -> bool:
        """Whether this step's checkpoint and state may be written: not while the last steps were skipped as
        non-finite, and only when every weight tensor (released, EMA, the other trained parts) is finite, so
        ``keep_last`` never rotates a good checkpoint out for a bad one. The weights are the same on every process,
        so all decide alike."""
        step, main = self.progress.step, self.accelerator.is_main_process
        if self.guard.consecutive:
            if main:
                log.warning("step %d: no checkpoint written, the last %d step(s) were skipped as non-finite", step,
                            self.guard.consecutive)
            return False
        bad = nonfinite_keys(self.task.released_weights())
        bad += nonfinite_keys(self.ema.state_dict()) if self.ema is not None else []
        for part in self.extra_parts:  # what the training state holds of the other parts (a GAN's critic)
            bad += nonfinite_keys(part_state_dict(self.accelerator.unwrap_model(part.module)))
        if bad:
            if main:
                log.warning("step %d: no checkpoint written, %d weight tensor(s) are not finite (e.g. '%s')", step,
                            len(bad), bad[0])
            return False
        return True

    def _save_checkpoint(self) -> None:
        """The task's checkpoint files (the release, its EMA copy, ...) at the current step."""
        if not self.accelerator.is_main_process:
            return
        ckpt_dir = self.exp_dir / "checkpoints"
        name = f"{self.progress.step:0{STATE_NAME_DIGITS}d}"
        files = self.task.checkpoint_files(self.ema.state_dict() if self.ema is not None else None)
        for suffix, state in files.items():
            self.task.write_checkpoint(state, ckpt_dir / f"{name}{suffix}")


def main(stage: int, default_config: str) -> None:
    """CLI of ``train_stage1.py`` / ``train_stage2.py``: ``--config`` and ``--set key=value ...``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=f"Train stage {stage} ({'HazeGen' if stage == 1 else 'DiffDehaze'})")
    parser.add_argument("--config", default=default_config, help="training YAML (model / dataset / train)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.batch_size=8 train.resume=latest")
    parser.add_argument("--check", action="store_true",
                        help="run every start-up check (settings, weights, data, batch plan) in this one process "
                             "without training; exit 0 or 2")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="with --check: the number of processes the run will be launched with")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.set)
    except (FileNotFoundError, ValueError) as err:
        if is_main_rank():
            log.error("%s", err)
        report_to_launcher(str(err))
        sys.exit(2)
    sys.exit(check_startup(cfg, args.processes) if args.check else run_training(cfg, stage))
