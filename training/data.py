"""Training data: the dataset named by the config, and the sample order of every process.

The sample order depends only on ``train.seed``, the epoch and the global batch index (:class:`GlobalBatchSampler`),
so a resumed run continues exactly. Each process loads micro-batches of
``batch_size / (num_processes * gradient_accumulation_steps)`` samples (:class:`BatchPlan`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Sampler

from dataset.checks import DataError
from training.settings import TrainSettings
from training.state import TrainError
from utils.common import instantiate_from_config
from utils.image_io import ImageReadError

UNREADABLE_KEY = "unreadable"
"""Batch key of :class:`SkipUnreadable`: per sample, the '<file>: <reason>' lines of the samples it replaced."""
UNREADABLE_ERRORS = (ImageReadError, DataError, OSError, EOFError, ValueError)
"""What reading a broken sample file raises (Pillow, numpy's .npy reader, the dataset checks)."""


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


class SkipUnreadable(Dataset):
    """A training dataset whose samples that cannot be read (a file truncated or removed after start-up) are
    replaced by the next readable index, each replaced one reported in ``sample[UNREADABLE_KEY]`` ('' when none;
    the trainer counts, warns and lists them, :class:`training.trainer.Trainer`). ``set_epoch`` is passed on."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        failures = []
        for offset in range(len(self.dataset)):
            try:
                sample = dict(self.dataset[(index + offset) % len(self.dataset)])
            except UNREADABLE_ERRORS as err:
                failures.append(describe_unreadable(err, (index + offset) % len(self.dataset)))
                continue
            sample[UNREADABLE_KEY] = "\n".join(failures)
            return sample
        raise TrainError(f"no training sample can be read any more: {failures[0]}")


def describe_unreadable(err: BaseException, index: int) -> str:
    """'<file>: <reason>' of a sample read failure (the dataset index when the error names no file)."""
    path = getattr(err, "path", None) or getattr(err, "filename", None)
    reason = getattr(err, "reason", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return f"{path}: {reason}" if path else f"sample {index}: {reason}"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Collated batch with its tensors on ``device`` (prompt lists unchanged)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
