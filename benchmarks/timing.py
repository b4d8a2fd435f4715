"""Timing helpers shared by the benchmark scripts: CUDA work is synchronised before a clock is read."""
from __future__ import annotations

import resource
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (``ru_maxrss``, MB): weights, runtime and activations."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Seconds one call of ``fn`` takes on ``device``, queued work included.

    ``clock="wall"``: elapsed time. ``clock="cpu"``: CPU time of this process (all its threads), which time spent
    waiting for the CPU while other processes run does not inflate; with one torch thread it is the work itself
    (with several, threads that spin waiting for each other add to it)."""
    now = CLOCKS[clock]
    sync(device)
    start = now()
    fn()
    sync(device)
    return now() - start
