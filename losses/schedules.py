"""Step schedules of the extension losses: multipliers in [0, 1] as functions of the optimizer step."""
from __future__ import annotations


def cycle_schedule(step: int, start_step: int, ramp_steps: int) -> float:
    """Cycle-loss multiplier: 0 before ``start_step`` (warm-up), then linear to 1 over ``ramp_steps``."""
    if step < start_step:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start_step) / ramp_steps)


def alignment_schedule(step: int, max_step: int) -> float:
    """Alignment-loss multiplier: linear ramp from 0 at step 0 to 1 at ``max_step``, then 1."""
    if max_step <= 0:
        return 1.0
    return min(1.0, max(0.0, step / max_step))
