"""``inference.sampler`` -> sampling function: one place that maps the YAML name to a sampler of the common
signature ``sample(model_fn, x, schedule, cond, *, uncond, cfg_scale, parameterization, start_step, end_step,
x0_fn, callback, generator, disable) -> latent``."""
from __future__ import annotations

from functools import partial
from typing import Callable

from sampler.ddim import sample_ddim
from sampler.dpm_solver import sample_dpmpp_2m
from sampler.spaced import sample_spaced

SAMPLERS = ("spaced", "ddim", "dpmpp_2m")
FEW_STEP_SOLVERS = ("ddim", "dpmpp_2m")
"""The ODE solvers that take ``inference.spacing`` other than uniform (the published ``spaced`` sampler does not)."""


def make_sampler(name: str = "spaced", eta: float = 0.0) -> Callable:
    """The sampler called ``name``: ``spaced`` (published ancestral DDPM, the default), ``ddim`` (η = ``eta``;
    0 = deterministic) or ``dpmpp_2m`` (DPM-Solver++ 2M). Raises ValueError naming ``inference.sampler`` for
    another name. The values of a config are validated before they get here (``pipelines.settings``)."""
    if name == "spaced":
        return sample_spaced
    if name == "ddim":
        return partial(sample_ddim, eta=float(eta))
    if name == "dpmpp_2m":
        return sample_dpmpp_2m
    raise ValueError(f"inference.sampler must be one of {', '.join(SAMPLERS)}; got '{name}'")
