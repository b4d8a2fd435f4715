"""Shared training loop of HazeGen (stage 1) and DiffDehaze (stage 2), built on accelerate.

Published behaviour ("Learning Hazing to Dehazing", CVPR 2025): only the ControlNet trains (AdamW; stage 2 at lr 3e-5,
then 1e-5 after 50k steps), the SD-2.1 UNet, VAE and text encoder are frozen, the ControlNet starts from the UNet,
the loss is the eps MSE of :class:`utils.train_losses.TrainingStep`; checkpoints
``<exp_dir>/checkpoints/<step:07d>.pt`` are flat ControlNet state dicts in the release ``stage*.pt`` format.

Added here: exact resume (the training state on disk, the exp_dir lock and the metrics bookkeeping are in
:mod:`utils.train_state`), mixed precision, gradient accumulation, gradient checkpointing, clipping, EMA, TensorBoard logging, a tqdm bar on
the main process, start-up data/weight checks, CPU multi-process (gloo) runs, and the HCD-YC extension losses.

Batch sizes (:class:`BatchPlan`): ``train.batch_size`` is the global batch of one optimizer step, as in the published
scripts (their ``Accelerator(split_batches=True)`` splits the DataLoader batch of 16 over the processes); each process
loads micro-batches of ``batch_size / (num_processes * gradient_accumulation_steps)`` samples. The mutually exclusive
``train.per_process_batch_size`` names the micro-batch of each process instead (global = that x processes x
accumulation). The learning rate is piecewise constant (``train.lr_schedule``), a function of the step count only,
so a resumed run continues exactly across a switch. The sample order depends only on
``train.seed``, the epoch and the global batch index (:class:`GlobalBatchSampler`), and every random draw of a
step comes from a generator seeded by (seed, step, micro-step, process), so a resumed run continues exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from dataset.checks import DataError
from model.cldm import ControlLDM
from model.gaussian_diffusion import Diffusion
from utils.checkpoint import WEIGHTS_HELP, CheckpointError, save_state_dict_atomic
from utils.common import instantiate_from_config, load_config, seed_everything
from utils.distributed import launched_world_size, use_cpu_backend_if_needed
from utils.model_builder import build_model as build_model_from_section
from utils.model_builder import cldm_config, text_processor_on
from utils.train_losses import (
    ALIGN_SKIP_REASON,
    ExtensionSettings,
    TrainingStep,
    build_cycle_loss,
    image_embedder_for,
    trainable_parameters,
)
from utils.train_state import (
    EMA,
    EMA_FILE,
    LOG_WINDOW_FILE,
    METRICS_FILE,
    PROGRESS_FILE,
    STATE_NAME_DIGITS,
    ExpDirLock,
    LogWindow,
    Progress,
    TrainError,
    drop_metrics_after,
    find_resume_state,
    install_state_hooks,
    is_main_rank,
    save_training_state,
)

log = logging.getLogger("hcdyc.train")

MIXED_PRECISION = (None, "no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """The ``train.*`` keys of the loop itself (extension keys: :class:`utils.train_losses.ExtensionSettings`)."""

    sd_path: str
    exp_dir: str
    resume: str | None = None
    learning_rate: float | None = 1e-5
    lr_schedule: list[list[float]] | None = None
    batch_size: int | None = 16
    per_process_batch_size: int | None = None
    num_workers: int = 4
    train_steps: int = 5000
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
    ema_decay: float | None = None
    seed: int = 231
    log_with: str | None = "tensorboard"

    def validate(self) -> None:
        """Raise ValueError naming the ``train.*`` key of the first bad value."""
        for key in ("train_steps", "log_every", "ckpt_every", "sample_steps", "keep_last",
                    "gradient_accumulation_steps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        for one, other in (("batch_size", "per_process_batch_size"), ("learning_rate", "lr_schedule")):
            if (getattr(self, one) is None) == (getattr(self, other) is None):
                raise ValueError(f"set exactly one of train.{one} and train.{other} (the other null), got "
                                 f"{getattr(self, one)} and {getattr(self, other)}")
        for key in ("learning_rate", "batch_size", "per_process_batch_size"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        if self.lr_schedule is not None:
            validate_lr_schedule(self.lr_schedule)
        if self.num_workers < 0 or self.num_preview < 1:
            raise ValueError("train.num_workers must be >= 0 and train.num_preview >= 1")
        if self.image_every is not None and self.image_every < 1:
            raise ValueError(f"train.image_every must be > 0 or null, got {self.image_every}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision must be no/fp16/bf16 or null, got '{self.mixed_precision}'")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0,1) or null, got {self.ema_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"train.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step taken after ``step`` completed steps: ``learning_rate``, or the rate of
        the last ``lr_schedule`` entry whose start is <= step (so [[0, a], [N, b]] trains steps 1..N at a)."""
        if self.lr_schedule is None:
            return float(self.learning_rate)
        return float(next(lr for start, lr in reversed(self.lr_schedule) if step >= start))


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
def split_settings(cfg: DictConfig) -> tuple[TrainSettings, ExtensionSettings]:
    """``cfg.train`` -> (loop settings, extension settings); unknown or missing keys raise TrainError.

    ``ext.use_text_processor`` is true when ``model.cldm.params.text_processor`` switches the processor on (or the
    design document's ``train.use_text_processor`` does)."""
    for section in ("model", "dataset", "train"):
        if section not in cfg:
            raise TrainError(f"config has no '{section}' section")
    train = OmegaConf.to_container(cfg.train, resolve=True)
    loop_keys = {f.name for f in dataclasses.fields(TrainSettings)}
    ext_keys = {f.name for f in dataclasses.fields(ExtensionSettings)}
    unknown = sorted(set(train) - loop_keys - ext_keys)
    if unknown:
        raise TrainError(f"unknown train.* keys {unknown}; known: {sorted(loop_keys | ext_keys)}")
    for key in ("sd_path", "exp_dir"):
        if train.get(key) is None:
            raise TrainError(f"train.{key} is required")
    loop = TrainSettings(**{k: v for k, v in train.items() if k in loop_keys})
    ext = ExtensionSettings(**{k: v for k, v in train.items() if k in ext_keys})
    try:
        loop.validate()
        ext.validate()
        if text_processor_on(cfg.model):
            ext = dataclasses.replace(ext, use_text_processor=True)
    except ValueError as err:
        raise TrainError(str(err)) from None
    return loop, ext


def model_section(cfg: DictConfig, ext: ExtensionSettings) -> DictConfig:
    """``cfg.model`` with the text processor switched on (``model.cldm.params.text_processor``) when
    ``ext.use_text_processor``: the model switch itself, or the design document's ``train.use_text_processor``."""
    if not ext.use_text_processor:
        return cfg.model
    return OmegaConf.merge(cfg.model, {"cldm": {"params": {"text_processor": True}}})


def model_config(cfg: DictConfig, ext: ExtensionSettings) -> DictConfig:
    """The ControlLDM config that :func:`build_model` instantiates (:func:`utils.model_builder.cldm_config`)."""
    return cldm_config(model_section(cfg, ext))


# ------------------------------------------------------------------------------------------------------------ data
class GlobalBatchSampler(Sampler[list[int]]):
    """Micro-batches of one process for one epoch, starting at global batch ``start_batch``.

    Epoch ``e`` orders the samples by ``numpy.random.default_rng([seed, e]).permutation`` (several permutations
    concatenated when the dataset is smaller than one global batch of G = micro * processes * accumulation
    samples). Global batch ``b`` is ``order[b*G:(b+1)*G]``; its accumulation slice ``a`` gives process ``r`` the
    indices ``order[b*G + (a*P + r)*micro :][:micro]``. Incomplete global batches at the end are dropped, so each
    epoch has ``batches_per_epoch`` global batches and the data of a global step does not depend on how it is
    split over processes.
    """

    def __init__(self, length: int, micro_batch: int, num_processes: int, process_index: int, accumulation: int,
                 seed: int, epoch: int = 0, start_batch: int = 0):
        if length < 1:
            raise ValueError("dataset is empty")
        self.length, self.micro, self.procs, self.rank = length, micro_batch, num_processes, process_index
        self.accum, self.seed, self.epoch, self.start_batch = accumulation, seed, epoch, start_batch
        self.global_batch = micro_batch * num_processes * accumulation
        self.batches_per_epoch = max(1, length // self.global_batch)

    def order(self) -> np.ndarray:
        """Sample order of this epoch: (batches_per_epoch * G,) indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        need = self.batches_per_epoch * self.global_batch
        parts, total = [], 0
        while total < need:
            parts.append(rng.permutation(self.length))
            total += self.length
        return np.concatenate(parts)[:need]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for b in range(self.start_batch, self.batches_per_epoch):
            for a in range(self.accum):
                begin = b * self.global_batch + (a * self.procs + self.rank) * self.micro
                yield [int(i) for i in order[begin:begin + self.micro]]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.accum


@dataclass(frozen=True)
class BatchPlan:
    """The samples of one optimizer step: global batch = per_process x processes x accumulation.

    per_process: the DataLoader batch of each process (one micro-step); key: the ``train.*`` key it came from.
    """

    per_process: int
    processes: int
    accumulation: int
    key: str

    @property
    def global_batch(self) -> int:
        return self.per_process * self.processes * self.accumulation

    def describe(self) -> str:
        """The start-up log line, e.g. 'global batch 16 = per-process batch 8 x 2 processes x accumulation 1'."""
        return (f"global batch {self.global_batch} = per-process batch {self.per_process} x {self.processes} "
                f"processes x accumulation {self.accumulation} (from train.{self.key})")

    def as_dict(self) -> dict[str, int]:
        """The ``run`` section of ``<exp_dir>/config.yaml``."""
        return {"num_processes": self.processes, "global_batch_size": self.global_batch,
                "per_process_batch_size": self.per_process, "gradient_accumulation_steps": self.accumulation}


def plan_batches(loop: TrainSettings, num_processes: int, accumulation: int) -> BatchPlan:
    """BatchPlan from ``train.batch_size`` (global; TrainError if processes x accumulation does not divide it) or
    ``train.per_process_batch_size``."""
    if loop.per_process_batch_size is not None:
        return BatchPlan(loop.per_process_batch_size, num_processes, accumulation, "per_process_batch_size")
    if loop.batch_size % (num_processes * accumulation):
        raise TrainError(f"train.batch_size {loop.batch_size} (the global batch) is not divisible by processes x "
                         f"gradient accumulation ({num_processes} x {accumulation}); change it or set "
                         "train.per_process_batch_size instead")
    return BatchPlan(loop.batch_size // (num_processes * accumulation), num_processes, accumulation, "batch_size")


def build_dataset(cfg: DictConfig, seed: int, check_images: bool = True) -> Dataset:
    """The configured dataset; ``dataset.params.seed`` defaults to ``train.seed`` (deterministic samples).

    Bad data (missing/empty folders, missing depth maps, unpaired hazy files, images that do not decode completely)
    raises TrainError naming the first offending path. ``check_images=False`` skips decoding every image (the other
    processes of a run, whose main process decodes them).
    """
    ds_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    params = dict(ds_cfg.get("params") or {})
    params.setdefault("seed", seed)
    if not check_images:
        params["verify"] = False
    try:
        return instantiate_from_config({"target": ds_cfg["target"], "params": params})
    except DataError as err:
        raise TrainError(f"training data error: {err}") from None
    except (TypeError, ValueError) as err:
        raise TrainError(f"dataset config ({ds_cfg.get('target')}): {err}") from None


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


def build_model(cfg: DictConfig, loop: TrainSettings, ext: ExtensionSettings) -> tuple[ControlLDM, Diffusion]:
    """ControlLDM (:func:`utils.model_builder.build_model`) with SD weights from ``train.sd_path``, the ControlNet
    initialised from the UNet and ``train.gradient_checkpointing`` applied."""
    if not Path(loop.sd_path).is_file():
        raise TrainError(f"train.sd_path: weight file not found: {loop.sd_path} ({WEIGHTS_HELP})")
    try:
        ldm, diffusion = build_model_from_section(model_section(cfg, ext), loop.sd_path, sd_key="train.sd_path")
    except CheckpointError as err:
        raise TrainError(str(err)) from None
    set_gradient_checkpointing(ldm, loop.gradient_checkpointing)
    return ldm, diffusion


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Collated batch with its tensors on ``device`` (prompt lists unchanged)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def preview_grid(step_module: TrainingStep, batch: dict[str, Any], step: int, num: int, sample_steps: int,
                 seed: int) -> tuple[torch.Tensor, list[str]]:
    """Image grid (3, 4*H', n*W') in [0,1] (rows = samples (spaced sampling), target, condition, decoded c_img) and
    the prompts the samples were conditioned on."""
    from torchvision.utils import make_grid

    from sampler.spaced import make_spaced_schedule, sample_spaced

    ldm, diffusion = step_module.ldm, step_module.diffusion
    part = {k: v[:num] for k, v in batch.items()}
    device = part["target"].device
    cond, prompts, _ = step_module.condition(part, step, random.Random(seed))
    gen = torch.Generator(device=device).manual_seed(seed)
    schedule = make_spaced_schedule(diffusion.alphas_cumprod_np, sample_steps)
    x_t = torch.randn(cond["c_img"].shape, generator=gen, device=device)
    z = sample_spaced(ldm, x_t, schedule, cond, parameterization=diffusion.parameterization, generator=gen)
    rows = [ldm.vae_decode(z).float() * 0.5 + 0.5, part["target"].float() * 0.5 + 0.5, part["condition"].float(),
            ldm.vae_decode(cond["c_img"]).float() * 0.5 + 0.5]
    return make_grid(torch.cat(rows).clamp(0, 1).cpu(), nrow=rows[0].shape[0], padding=2), list(prompts)


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
    lock = ExpDirLock()
    try:
        return Trainer(cfg, stage, lock).run()
    except TrainError as err:
        if is_main_rank():
            log.error("%s", err)
        return 2
    finally:
        lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Trainer:
    """One training run: start-up checks and set-up in ``__init__``, the optimizer-step loop in :meth:`run`."""

    def __init__(self, cfg: DictConfig, stage: int, lock: ExpDirLock):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import ProjectConfiguration

        self.cfg, self.stage = cfg, stage
        self.loop, self.ext = loop, ext = split_settings(cfg)
        use_cpu_backend_if_needed()
        try:
            cycle_loss = build_cycle_loss(ext)
        except (ValueError, FileNotFoundError) as err:
            raise TrainError(str(err)) from None
        if ext.align_enabled and not ext.use_dynamic_prompt:
            log.warning("train.text_align_weight > 0 without train.use_dynamic_prompt: %s", ALIGN_SKIP_REASON)
        if not Path(loop.sd_path).is_file():
            raise TrainError(f"train.sd_path: weight file not found: {loop.sd_path} ({WEIGHTS_HELP})")
        self.exp_dir = Path(loop.exp_dir)
        self.resume_dir = find_resume_state(loop.exp_dir, loop.resume)

        self.accelerator = acc = Accelerator(
            mixed_precision=loop.mixed_precision,
            gradient_accumulation_steps=loop.gradient_accumulation_steps,
            log_with=loop.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.exp_dir), logging_dir=str(self.exp_dir / "logs")),
            # the alignment encoder (skipped steps) and the text processor (before its start) can get no gradient
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=ext.has_idle_parameters)],
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
            self.dataset = build_dataset(cfg, loop.seed, check_images=acc.is_main_process)
        except TrainError as err:
            error = str(err)
        agree_on_error(acc, error)

        seed_everything(loop.seed)
        self.ldm, diffusion = build_model(cfg, loop, ext)
        self.step_module = TrainingStep(self.ldm, diffusion, stage, ext, cycle_loss, image_embedder_for(self.ldm, ext))
        self.step_module.to_device(acc.device)
        optimizer = torch.optim.AdamW(trainable_parameters(self.step_module), lr=loop.lr_at(0))
        self.model, self.optimizer = acc.prepare(self.step_module, optimizer)
        install_state_hooks(acc)
        self.ema = EMA(self.ldm.controlnet_state_dict(), loop.ema_decay) if loop.ema_decay else None
        self.progress = Progress()
        self.window = LogWindow()
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
        self.progress = Progress.load(state_dir / PROGRESS_FILE)
        if self.ema is not None:
            if not (state_dir / EMA_FILE).is_file():
                raise TrainError(f"train.ema_decay is set but {state_dir} holds no {EMA_FILE}")
            from safetensors.torch import load_file

            self.ema.load_state_dict(load_file(str(state_dir / EMA_FILE)))
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
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(p.epoch)
        sampler = GlobalBatchSampler(len(self.dataset), self.plan.per_process, acc.num_processes, acc.process_index,
                                     self.accum, self.loop.seed, p.epoch, p.batch_in_epoch)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.loop.num_workers,
                            pin_memory=acc.device.type == "cuda")
        return iter(loader), sampler

    def _optimizer_step(self, data_iter: Iterator[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Accumulate ``accum`` micro-batches and step the optimizer at ``train.lr_schedule``'s rate for this step
        -> (last micro-batch, logs per micro-batch)."""
        acc, loop = self.accelerator, self.loop
        for group in self.optimizer.param_groups:
            group["lr"] = loop.lr_at(self.progress.step)
        logs = []
        for a in range(self.accum):
            batch = to_device(next(data_iter), acc.device)
            seed = step_seed(loop.seed, self.progress.step, a, acc.process_index)
            gen = torch.Generator(device=acc.device).manual_seed(seed)
            with acc.accumulate(self.model):
                out = self.model(batch, self.progress.step, gen, random.Random(seed))
                acc.backward(out["loss"])
                if acc.sync_gradients and loop.max_grad_norm is not None:
                    acc.clip_grad_norm_(trainable_parameters(self.step_module), loop.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            logs.append(out["logs"])
        return batch, logs

    def run(self) -> int:
        from tqdm.auto import tqdm

        acc, loop, p = self.accelerator, self.loop, self.progress
        if acc.is_main_process:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
            resolved = OmegaConf.merge(self.cfg, {"model": model_section(self.cfg, self.ext),
                                                  "train": {"use_text_processor": self.ext.use_text_processor},
                                                  "run": self.plan.as_dict()})
            OmegaConf.save(resolved, self.exp_dir / "config.yaml")
            log.info("stage %d: %s; %d samples", self.stage, self.plan.describe(), len(self.dataset))
        if loop.log_with:
            # after a resume, TensorBoard hides the events a killed run wrote after the resumed step
            purge = {"tensorboard": {"purge_step": p.step + 1}} if p.step else {}
            acc.init_trackers(f"stage{self.stage}", config=scalar_config(loop, self.ext, self.stage), init_kwargs=purge)
        bar = tqdm(total=loop.train_steps, initial=p.step, desc=f"stage {self.stage}",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        window = self.window
        warned_align, data_iter = False, None
        self.model.train()
        while p.step < loop.train_steps:
            if data_iter is None:
                data_iter, sampler = self._loader()
            batch, logs = self._optimizer_step(data_iter)
            p.step += 1
            p.batch_in_epoch += 1
            if p.batch_in_epoch == sampler.batches_per_epoch:
                p.epoch, p.batch_in_epoch, data_iter = p.epoch + 1, 0, None
            if self.ema is not None:
                self.ema.update(self.ldm.controlnet_state_dict())
            window.add(logs)
            bar.update(1)
            bar.set_postfix(loss=f"{logs[-1]['loss'].item():.4f}")
            if not warned_align and any(entry.get("align_skipped", 0) > 0 for entry in logs) and acc.is_main_process:
                log.warning("%s", ALIGN_SKIP_REASON)
                warned_align = True
            if p.step % loop.log_every == 0 or p.step == loop.train_steps:
                window.flush(acc, p.step, self.exp_dir / METRICS_FILE, bool(loop.log_with),
                             {"train/lr": loop.lr_at(p.step - 1)})
            if loop.image_every is not None and (p.step == 1 or p.step % loop.image_every == 0):
                self._preview(batch)
            if p.step % loop.ckpt_every == 0 or p.step == loop.train_steps:
                self._save_checkpoint()
                save_training_state(acc, p, self.ema, loop.exp_dir, loop.keep_last, self.plan.global_batch,
                                    window)
        bar.close()
        acc.end_training()
        return 0

    def _preview(self, batch: dict[str, Any]) -> None:
        """Sample grid of the main process's last micro-batch and its prompts (text) to TensorBoard (other trackers:
        scalars only)."""
        acc = self.accelerator
        if acc.is_main_process:
            self.step_module.eval()
            grid, prompts = preview_grid(self.step_module, batch, self.progress.step, self.loop.num_preview,
                                self.loop.sample_steps, step_seed(self.loop.seed, self.progress.step, 2**31))
            self.step_module.train()
            for tracker in acc.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({"preview": grid[None].numpy()}, step=self.progress.step, dataformats="NCHW")
                    tracker.log({"preview_prompts": "\n\n".join(f"{i}: {text}" for i, text in enumerate(prompts))},
                                step=self.progress.step)
        acc.wait_for_everyone()

    def _save_checkpoint(self) -> None:
        """Release-format ControlNet weights (+ EMA copy, + alignment image encoder) at the current step."""
        if not self.accelerator.is_main_process:
            return
        ckpt_dir = self.exp_dir / "checkpoints"
        name = f"{self.progress.step:0{STATE_NAME_DIGITS}d}"
        save_state_dict_atomic(self.ldm.controlnet_state_dict(), ckpt_dir / f"{name}.pt")
        if self.ema is not None:
            save_state_dict_atomic(self.ema.state_dict(), ckpt_dir / f"{name}_ema.pt")
        if self.step_module.image_embedder is not None:
            save_state_dict_atomic(self.step_module.image_embedder.state_dict(), ckpt_dir / f"{name}_image_embedder.pt")


def main(stage: int, default_config: str) -> None:
    """CLI of ``train_stage1.py`` / ``train_stage2.py``: ``--config`` and ``--set key=value ...``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=f"Train stage {stage} ({'HazeGen' if stage == 1 else 'DiffDehaze'})")
    parser.add_argument("--config", default=default_config, help="training YAML (model / dataset / train)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.batch_size=8 train.resume=latest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.set)
    except (FileNotFoundError, ValueError) as err:
        if is_main_rank():
            log.error("%s", err)
        sys.exit(2)
    sys.exit(run_training(cfg, stage))

