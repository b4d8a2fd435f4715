"""The non-finite guard of the training loop, for :mod:`training.trainer`.

After each backward the guard looks at the loss terms of every micro-step and, at the optimizer step, at the
(unscaled) gradients of the trainable weights. When any of them holds a NaN or an infinity on any process, every
process skips the optimizer, learning-rate and EMA update of that step (the flags are reduced over the processes, so
no process steps alone), the skip is counted and one WARNING names the step and the offending term. After
``train.max_nonfinite_steps`` consecutive skips the run stops with :class:`TrainingStopped` (exit status
:data:`EXIT_DIVERGED`), leaving the checkpoints written before.

fp16 loss-scale overflow (finite loss terms, infinite scaled gradients) is the gradient scaler's business: it skips
that step and lowers the scale as it always does; the guard only counts it (:attr:`NonFiniteGuard.overflows`).

Checkpoints and training states are written only when every tensor in them is finite (:func:`nonfinite_keys`), and
a resumed state is refused by name when it holds a non-finite tensor.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch

from training.state import TrainError

log = logging.getLogger("hcdyc.train")

EXIT_DIVERGED = 3
"""Exit status of a run stopped after ``train.max_nonfinite_steps`` consecutive non-finite steps."""
GRADIENTS = "gradients"
"""The name the guard gives the gradients in its flags and messages (the other names are loss terms)."""


class TrainingStopped(TrainError):
    """The run stopped on purpose mid-way (divergence, too much unreadable data); ``exit_code`` is its status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` that hold a NaN or an infinity, in their order."""
    return [key for key, value in tensors.items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())]


def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient of ``parameters`` (those that have one) is finite: one fused norm per tensor, whose
    result is finite exactly when the tensor is."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class NonFiniteGuard:
    """Counts and decides the skips of one run (see the module doc).

    limit: ``train.max_nonfinite_steps``; main: whether this process logs (the main process); skipped: steps skipped in all; consecutive: skips since the last step
    taken; overflows: fp16 steps the gradient scaler skipped (not errors).
    """

    def __init__(self, limit: int, main: bool = True) -> None:
        self.limit, self.main = limit, main
        self.skipped = 0
        self.consecutive = 0
        self.overflows = 0
        self._bad_terms: set[str] = set()

    def watch_terms(self, terms: Mapping[str, torch.Tensor]) -> None:
        """Note the loss terms of one micro-step (after its backward) that are not finite."""
        self._bad_terms.update(key for key, value in terms.items() if not bool(torch.isfinite(value.detach()).all()))

    def decide(self, accelerator, term_names: Iterable[str], parameters: Iterable[torch.nn.Parameter],
               check_gradients: bool) -> list[str]:
        """The offending names of this optimizer step over all processes ([] = take the step), resetting the
        micro-step notes. ``term_names`` are the loss terms (the same on every process); the gradients are checked
        only where ``check_gradients`` (not under an fp16 gradient scaler, whose scaled gradients may overflow)."""
        names = sorted(term_names) + [GRADIENTS]
        local = [name in self._bad_terms for name in names[:-1]]
        local.append(check_gradients and not gradients_finite(parameters))
        self._bad_terms = set()
        flags = torch.tensor(local, dtype=torch.float32, device=accelerator.device)
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        return [name for name, flag in zip(names, flags.tolist()) if flag > 0]

    def skip(self, step: int, offending: list[str], lr: float) -> None:
        """Count the skipped ``step`` (1-based), warn once naming it and its ``offending`` terms; TrainingStopped
        after ``limit`` consecutive skips."""
        self.skipped += 1
        self.consecutive += 1
        what = ", ".join("the gradients" if name == GRADIENTS else f"loss term '{name}'" for name in offending)
        if self.main:
            log.warning("step %d skipped (no optimizer, learning-rate or EMA update): %s not finite (%d consecutive, "
                        "%d in all)", step, what, self.consecutive, self.skipped)
        if self.consecutive >= self.limit:
            raise TrainingStopped(
                f"training stopped at step {step}: {self.consecutive} consecutive steps had non-finite loss or "
                f"gradients (train.max_nonfinite_steps={self.limit}; learning rate {lr:g}); the checkpoints written "
                "before are kept, lower the learning rate or resume from an earlier state", EXIT_DIVERGED)

    def took_step(self, overflowed: bool) -> None:
        """A step whose values were finite: reset the consecutive count; count an fp16 scaler overflow."""
        self.consecutive = 0
        self.overflows += int(overflowed)

    def summary(self) -> str | None:
        """The end-of-run line, or None when nothing was skipped."""
        if not (self.skipped or self.overflows):
            return None
        return (f"{self.skipped} step(s) skipped for non-finite loss or gradients, {self.overflows} fp16 loss-scale "
                "overflow step(s) skipped by the gradient scaler")


def refuse_nonfinite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """TrainError naming ``source`` and its first non-finite tensor, if it holds one (a state to resume from)."""
    bad = nonfinite_keys(tensors)
    if bad:
        raise TrainError(f"{source} holds {len(bad)} non-finite tensor(s), e.g. '{bad[0]}'; it cannot be resumed "
                         "from: pick an earlier state (train.resume=<exp_dir>/state/<step>)")


EXIT_BAD_DATA = 4
"""Exit status of a run stopped because more than ``train.max_bad_sample_fraction`` of its samples are unreadable."""


class UnreadableSamples:
    """The training files that could not be read mid-run (:class:`training.data.SkipUnreadable` replaced their
    samples): one WARNING per new file, the list at the end, :class:`TrainingStopped` (exit :data:`EXIT_BAD_DATA`)
    once more than ``max_fraction`` of the ``dataset_size`` samples failed. Every process holds the same list (the
    new names are gathered at each optimizer step, only when some process has one)."""

    def __init__(self, dataset_size: int, max_fraction: float, main: bool = True) -> None:
        self.dataset_size, self.max_fraction, self.main = dataset_size, max_fraction, main
        self.failures: list[str] = []
        self._new: list[str] = []

    def note(self, reports: list[str]) -> None:
        """The batch's per-sample reports ('' or newline-separated '<file>: <reason>' lines)."""
        for report in reports:
            self._new += [line for line in report.splitlines() if line and line not in self.failures]

    def sync(self, accelerator, step: int) -> None:
        """Share this step's new failures between the processes, warn, and stop past the threshold."""
        new = self._new
        self._new = []
        if accelerator.num_processes > 1:
            count = accelerator.reduce(torch.tensor([len(new)], device=accelerator.device), reduction="sum")
            if int(count.item()) == 0:
                return
            from accelerate.utils import gather_object

            new = gather_object([new])
            new = [line for lines in new for line in lines]
        for line in dict.fromkeys(new):
            if line in self.failures:
                continue
            self.failures.append(line)
            if self.main:
                log.warning("step %d: unreadable training sample skipped (replaced by the next one): %s", step, line)
        limit = self.max_fraction * self.dataset_size
        if len(self.failures) > limit:
            raise TrainingStopped(
                f"training stopped at step {step}: {len(self.failures)} of {self.dataset_size} training samples are "
                f"unreadable (more than train.max_bad_sample_fraction={self.max_fraction:g}): "
                f"{'; '.join(self.failures)}", EXIT_BAD_DATA)

    def summary(self) -> str | None:
        """The end-of-run line listing the skipped files, or None."""
        if not self.failures:
            return None
        return f"{len(self.failures)} unreadable training sample(s) skipped: {'; '.join(self.failures)}"
