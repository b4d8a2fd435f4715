"""Processes started by ``accelerate launch``: backend choice, this process's place, and sharing small results.

One mechanism serves training and inference: ``accelerate launch --multi_gpu --num_processes N`` sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; without CUDA, accelerate must be told to use its CPU (gloo) backend or every
process would run alone (:func:`use_cpu_backend_if_needed`). A plain ``python script.py`` is one process.
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

from utils.common import choose_device

T = TypeVar("T")


def use_cpu_backend_if_needed() -> None:
    """``accelerate launch --multi_gpu`` without CUDA: select accelerate's CPU (gloo) backend.

    Without this, each process would silently run on its own. Must run before accelerate's state is created.
    """
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def launched_world_size() -> int:
    """Number of processes the launcher started (``WORLD_SIZE``; 1 for a plain ``python`` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ProcessInfo:
    """This process's index among ``count`` processes and the device it should use (``cuda:<local rank>``
    when several processes share a machine's GPUs, else None: the config decides)."""

    index: int = 0
    count: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in process order, on every process."""
        if self.count == 1:
            return [obj]
        out: list[Any] = [None] * self.count
        torch.distributed.all_gather_object(out, obj)
        return out

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``count``-th item from position ``index``. Over all processes
        each item is taken exactly once (no remainder dropped); the split depends only on the order of ``items``."""
        return list(items[self.index::self.count])


@functools.cache
def init_processes() -> ProcessInfo:
    """Join the processes started by ``accelerate launch`` (no-op for a single process); evaluated once per
    process, later calls return the same info.

    Raises RuntimeError when accelerate reports another process count than the launcher started (e.g. the CPU
    backend was not selected), so processes never run the whole job independently.
    """
    world = launched_world_size()
    if world == 1:
        return ProcessInfo()
    use_cpu_backend_if_needed()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes != world:
        raise RuntimeError(f"launched {world} processes but accelerate runs {state.num_processes}; on CPU set "
                           "ACCELERATE_USE_CPU=1 (done automatically when CUDA is unavailable)")
    device = state.device if state.device.type == "cuda" else None
    return ProcessInfo(state.process_index, state.num_processes, device)



def process_device(name: str | None) -> torch.device:
    """:func:`utils.common.choose_device` for this process: with several processes on one machine's GPUs, a
    device without an index (``auto``/``cuda``) becomes this process's own GPU (``cuda:<local rank>``)."""
    device = choose_device(name)
    own = init_processes().device
    if own is not None and device.type == "cuda" and device.index is None:
        return own
    return device


def is_launch_main() -> bool:
    """Whether this is the main process of the launch (``RANK`` 0 or unset); usable before any process group."""
    return int(os.environ.get("RANK", "0")) == 0


def report_to_launcher(message: str) -> None:
    """Write ``message`` to torch elastic's error file of this process (``TORCHELASTIC_ERROR_FILE``, set by
    ``accelerate launch`` / ``torchrun``; the JSON layout of torch's ``ErrorHandler.record_exception``, with the one
    line as its call stack), so the launcher's failure report shows that line as the root cause instead of a
    traceback. Nothing outside such a launch."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                          "timestamp": str(int(time.time()))}}}
    with open(path, "w") as handle:
        json.dump(data, handle)
