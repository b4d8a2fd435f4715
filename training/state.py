"""Training state on disk and its bookkeeping, for :mod:`training.trainer`.

Resumable state folders ``<exp_dir>/state/<step:07d>`` (full accelerate state, :class:`Progress`, :class:`EMA`, each
process's :class:`LogWindow`), written to ``state/.tmp-<step>`` and renamed when complete; the rows of
``metrics.jsonl`` logged after a resumed step are dropped (:func:`drop_metrics_after`); ``<exp_dir>/train.lock``
(:class:`ExpDirLock`) keeps a second run out of a folder in use.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.atomic import write_text_atomic

log = logging.getLogger("hcdyc.train")

STATE_NAME_DIGITS = 7
PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.safetensors"
LOG_WINDOW_FILE = "log_window_{rank}.json"
LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"
TMP_PREFIX = ".tmp-"


class TrainError(RuntimeError):
    """A start-up problem (config, weights, data, resume state) reported as one clear message."""


@dataclass
class Progress:
    """Optimizer steps done and data position (epoch, global batches of that epoch consumed)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def save(self, path: Path, **extra: Any) -> None:
        path.write_text(json.dumps({**dataclasses.asdict(self), **extra}, indent=1))

    @classmethod
    def load(cls, path: Path) -> "Progress":
        data = json.loads(path.read_text())
        return cls(step=int(data["step"]), epoch=int(data["epoch"]), batch_in_epoch=int(data["batch_in_epoch"]))


class EMA:
    """Exponential moving average of the released weights: shadow <- d * shadow + (1 - d) * current (floats)."""

    def __init__(self, tensors: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in tensors.items()}

    @torch.no_grad()
    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value.detach().float(), 1.0 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if set(sd) != set(self.shadow):
            raise TrainError("EMA state does not match the model (different extensions enabled?)")
        for key, value in sd.items():
            self.shadow[key].copy_(value)


# ------------------------------------------------------------------------------------------- processes and lock
def is_main_rank() -> bool:
    """Whether this is the main process of the launch (``RANK`` 0 or unset); usable before the Accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


def proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first, start time at index 19); None where the
    process or /proc does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot, None where unavailable."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


def lock_holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote a lock may still run: on another host it cannot be checked (True); on this
    host it must exist, not be a zombie and, where known, have started when the lock says (else its pid was reused).
    """
    if holder.get("host") != socket.gethostname():
        return True
    pid, started = int(holder["pid"]), holder.get("started")
    fields = proc_stat(pid)
    if fields is not None:
        return fields[0] != "Z" and (started is None or int(fields[19]) == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ExpDirLock:
    """``<exp_dir>/train.lock``, held by the main process of a run: JSON {"pid", "host", "started"}.

    Written to a temp file and hard-linked into place, so the lock appears complete or not at all. A lock whose
    process is gone is stale and taken over (with a warning); one held by a live process, or written on another
    host, refuses the run with a TrainError naming the holder.
    """

    def __init__(self) -> None:
        self.path: Path | None = None

    def acquire(self, exp_dir: Path) -> None:
        path = exp_dir / LOCK_FILE
        exp_dir.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": process_start_time(os.getpid())}
        tmp = exp_dir / f"{TMP_PREFIX}{LOCK_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(mine))
        try:
            for _ in range(2):
                try:
                    os.link(tmp, path)
                    self.path = path
                    return
                except FileExistsError:
                    holder = self._holder(path)
                    if lock_holder_alive(holder):
                        raise TrainError(
                            f"train.exp_dir {exp_dir} is in use by another training run (pid {holder.get('pid')} on "
                            f"host {holder.get('host')}, lock {path}); wait for it or stop it, or choose another "
                            "train.exp_dir (delete the lock only if that run is gone)") from None
                    log.warning("%s: taking over the stale lock of pid %s (that process is gone)", path,
                                holder.get("pid"))
                    path.unlink(missing_ok=True)
            raise TrainError(f"could not take the lock {path}: another run is starting in {exp_dir}")
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _holder(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise TrainError(f"unreadable training lock {path} ({err}); delete it if no run uses this exp_dir") from None

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def drop_metrics_after(metrics_path: Path, step: int) -> int:
    """Rewrite ``metrics.jsonl`` (atomically) without the rows logged after ``step`` (and any half-written last
    line), so a resumed run logs those steps once. Returns the number of rows dropped."""
    if not metrics_path.is_file():
        return 0
    kept, dropped = [], 0
    for line in metrics_path.read_text().splitlines():
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            row_step = None
        if row_step is not None and row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(metrics_path, "".join(f"{line}\n" for line in kept))
    return dropped


# ----------------------------------------------------------------------------------------------------------- state
def state_root(exp_dir: str | Path) -> Path:
    return Path(exp_dir) / "state"


def complete_states(root: Path) -> list[Path]:
    """Finished state dirs ``<root>/<step:07d>`` (with progress.json), oldest first; temp dirs are ignored."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and len(p.name) == STATE_NAME_DIGITS
             and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def find_resume_state(exp_dir: str | Path, resume: str | None) -> Path | None:
    """The state dir to resume from: ``train.resume`` = null (fresh start), "latest" or a state dir path."""
    states = complete_states(state_root(exp_dir))
    if resume is None:
        if states:
            raise TrainError(f"{exp_dir} already holds training states ({states[-1]}); set train.resume=latest "
                             "to continue that run or choose a new train.exp_dir")
        return None
    if resume == "latest":
        return states[-1] if states else None
    path = Path(resume)
    if not (path / PROGRESS_FILE).is_file():
        raise TrainError(f"train.resume: {path} is not a complete training state (no {PROGRESS_FILE}); pick a "
                         f"<exp_dir>/state/<step> folder or 'latest'")
    return path


def save_training_state(accelerator, progress: Progress, ema: EMA | None, exp_dir: str | Path, keep_last: int,
                        global_batch: int, window: "LogWindow") -> Path:
    """Full accelerate state + progress (+ EMA, + each process's unlogged ``window`` sums) into ``state/.tmp-<step>``,
    renamed to ``state/<step>`` when done.

    A run killed while saving leaves only the temp dir, which resume ignores; the last ``keep_last`` states stay.
    """
    root = state_root(exp_dir)
    name = f"{progress.step:0{STATE_NAME_DIGITS}d}"
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    window.save(tmp / LOG_WINDOW_FILE.format(rank=accelerator.process_index))
    if accelerator.is_main_process:
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, str(tmp / EMA_FILE))
        progress.save(tmp / PROGRESS_FILE, num_processes=accelerator.num_processes, global_batch=global_batch)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_states(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def part_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a training state holds of one trainable part: its ``trainable_state_dict()`` where the part defines one (a
    part whose frozen weights are rebuilt from the weight files at every start, such as the adapted copies of the
    one-step distillation, :class:`training.distill.AdaptedPart`), else its whole state dict."""
    own = getattr(module, "trainable_state_dict", None)
    return own() if callable(own) else module.state_dict()


def load_part_state_dict(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load :func:`part_state_dict` tensors back, strictly (TrainError naming ``source`` for another key set)."""
    own = getattr(module, "load_trainable_state_dict", None)
    try:
        if callable(own):
            own(sd, source)
        else:
            module.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as err:
        raise TrainError(f"{source}: {str(err).splitlines()[0]}") from None


def install_state_hooks(accelerator) -> None:
    """Save/load the trainable weights unwrapped (no ``module.`` prefix) so states move between process counts, each
    part as :func:`part_state_dict` gives it."""
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        weights[:] = [part_state_dict(accelerator.unwrap_model(m)) for m in models]

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            sd = load_file(str(path), device="cpu")
            load_part_state_dict(accelerator.unwrap_model(model), sd, str(path))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class LogWindow:
    """Running sums of the per-micro-batch logs since the last flush.

    The logged keys depend only on the config and the step, so every process reduces the same list.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def save(self, path: Path) -> None:
        """This process's sums and counts as JSON (float32 sums are exact as JSON numbers)."""
        path.write_text(json.dumps({"sums": {k: float(v) for k, v in self.sums.items()}, "counts": self.counts}))

    @classmethod
    def load(cls, path: Path, device: torch.device) -> "LogWindow":
        data = json.loads(path.read_text())
        window = cls()
        window.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in data["sums"].items()}
        window.counts = {k: int(v) for k, v in data["counts"].items()}
        return window

    def add(self, logs: list[dict[str, torch.Tensor]]) -> None:
        for entry in logs:
            for key, value in entry.items():
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
                self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, accelerator, step: int, metrics_path: Path, to_trackers: bool,
              current: dict[str, float]) -> None:
        """Log the means (averaged over processes) and the ``current`` values (e.g. the learning rate of the last
        step) to the trackers and ``metrics.jsonl``; reset."""
        keys = sorted(self.sums)
        if keys:
            local = torch.stack([torch.as_tensor(self.sums[k], device=accelerator.device).float() / self.counts[k]
                                 for k in keys])
            mean = accelerator.reduce(local, reduction="mean")
            values = {**{f"train/{k}": float(v) for k, v in zip(keys, mean.tolist())}, **current}
            if to_trackers:
                accelerator.log(values, step=step)
            if accelerator.is_main_process:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps({"step": step, **values}) + "\n")
        self.sums, self.counts = {}, {}
