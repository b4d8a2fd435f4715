"""Error of DDIM (η = 0) and DPM-Solver++ 2M against the exact probability-flow ODE solution, vs the step count.

Data x0 ~ N(MU, S²·I) has a closed-form optimal ε-predictor and a closed-form probability-flow ODE solution, so the
solvers' error is measured exactly (float64), from one x_T, on two grids: the model's own discrete schedule (the
guided-diffusion respacing of SD's 1000 timesteps that every script uses) and a grid uniform in λ = log(α/σ) between
the same end points. Prints a markdown table (max-abs error and the empirical order per step doubling) for
docs/samplers.md. ``tests/sampler/test_sampler_solvers.py`` asserts the orders from the same functions.

    python -m benchmarks.solver_convergence [--parameterization eps|v] [--spacings]

``--spacings``: the error of both solvers on the timesteps each ``inference.spacing`` keeps (uniform, logsnr,
karras) at 5-40 steps instead (``tests/sampler/test_contract.py`` pins the 10- and 20-step values).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from model.gaussian_diffusion import Diffusion
from sampler.ddim import sample_ddim
from sampler.dpm_solver import sample_dpmpp_2m
from sampler.spaced import SPACINGS, SpacedSchedule, half_log_snr, make_spaced_schedule

SD_ALPHAS_CUMPROD = Diffusion().alphas_cumprod_np
MU, S = 0.3, 0.5  # Gaussian data x0 ~ N(MU, S² I)


def gaussian_oracle(alphas_cumprod: np.ndarray, parameterization: str = "eps"):
    """The exact (Bayes-optimal) model output for x0 ~ N(MU, S²I), timestep t indexing ``alphas_cumprod``.

    x_t ~ N(sqrt(ᾱ)·MU, (ᾱS² + 1 − ᾱ)I), and E[ε | x_t] = sqrt(1 − ᾱ)·(x_t − sqrt(ᾱ)·MU)/(ᾱS² + 1 − ᾱ).
    """
    table = torch.tensor(np.asarray(alphas_cumprod), dtype=torch.float64)

    def model_fn(x, t, cond):
        a = table[t].view(-1, 1, 1, 1).to(x.dtype)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        if parameterization == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return model_fn


def exact_sample(x_T: torch.Tensor, a_T: float, a_0: float) -> torch.Tensor:
    """Closed-form probability-flow ODE solution from x_T (at ᾱ_T) to ᾱ_0, followed by the samplers' common last
    step x̂0(x, ᾱ_0) (their update to ᾱ = 1).

    In x̄ = x/sqrt(ᾱ), σ = sqrt((1 − ᾱ)/ᾱ) the ODE is dx̄/dσ = E[ε|x] = σ(x̄ − MU)/(S² + σ²), solved by
    (x̄ − MU) ∝ sqrt(S² + σ²): the standardised value z = (x − sqrt(ᾱ)MU)/sqrt(ᾱS² + 1 − ᾱ) is constant.
    """
    z = (x_T - np.sqrt(a_T) * MU) / np.sqrt(a_T * S**2 + 1 - a_T)
    x = np.sqrt(a_0) * MU + np.sqrt(a_0 * S**2 + 1 - a_0) * z
    eps = np.sqrt(1 - a_0) * (x - np.sqrt(a_0) * MU) / (a_0 * S**2 + 1 - a_0)
    return (x - np.sqrt(1 - a_0) * eps) / np.sqrt(a_0)


def log_snr_uniform_schedule(n: int) -> SpacedSchedule:
    """n steps uniform in λ between the SD schedule's first and last timestep (a smooth grid; t = 0..n−1 index it)."""
    lam = np.linspace(half_log_snr(SD_ALPHAS_CUMPROD[0]), half_log_snr(SD_ALPHAS_CUMPROD[-1]), n)
    ac = 1.0 / (1.0 + np.exp(-2.0 * lam))
    unused = np.zeros(n)
    return SpacedSchedule(np.arange(n), unused, ac, np.append(1.0, ac[:-1]), unused, unused, unused)


def x_T_sample() -> torch.Tensor:
    """The fixed starting latent x_T (1,4,8,8), float64, seed 0."""
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def solver_error(sampler, schedule: SpacedSchedule, table: np.ndarray, parameterization: str) -> float:
    """max |sampler output − exact solution| from ``x_T_sample()``; ``table`` maps the schedule's t to ᾱ."""
    x_T = x_T_sample()
    out = sampler(gaussian_oracle(table, parameterization), x_T, schedule, None, parameterization=parameterization)
    ref = exact_sample(x_T, schedule.alphas_cumprod[-1], schedule.alphas_cumprod[0])
    return (out - ref).abs().max().item()


def empirical_order(errors: list[float], steps: list[int]) -> float:
    """Least-squares slope of −log(error) against log(steps)."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def error_table(parameterization: str = "eps") -> str:
    """Markdown table of max-abs errors and per-doubling orders on both grids."""
    grids = {"model schedule (spaced)": ([10, 25, 50, 100, 200, 400, 800],
                                         lambda n: (make_spaced_schedule(SD_ALPHAS_CUMPROD, n), SD_ALPHAS_CUMPROD)),
             "uniform in λ": ([5, 10, 20, 40, 80, 160],
                              lambda n: (log_snr_uniform_schedule(n), log_snr_uniform_schedule(n).alphas_cumprod))}
    lines = ["| grid | steps | DDIM (η=0) error | DDIM order | DPM++ 2M error | DPM++ 2M order |",
             "|---|---:|---:|---:|---:|---:|"]
    for grid, (steps, make) in grids.items():
        errs = {name: [solver_error(fn, *make(n), parameterization) for n in steps]
                for name, fn in (("ddim", sample_ddim), ("dpm", sample_dpmpp_2m))}
        for k, n in enumerate(steps):
            orders = {name: "" if k == 0 else f"{np.log(e[k - 1] / e[k]) / np.log(steps[k] / steps[k - 1]):.2f}"
                      for name, e in errs.items()}
            lines.append(f"| {grid} | {n} | {errs['ddim'][k]:.2e} | {orders['ddim']} | {errs['dpm'][k]:.2e} | "
                         f"{orders['dpm']} |")
    return "\n".join(lines)


def spacing_table(parameterization: str = "eps", steps: tuple[int, ...] = (5, 10, 20, 40)) -> str:
    """Markdown table of max-abs errors of both solvers on the model's timesteps kept by each ``inference.spacing``
    (``sampler.spaced.kept_timesteps``): what the scripts run."""
    lines = ["| spacing | steps | DDIM (η=0) error | DPM++ 2M error |", "|---|---:|---:|---:|"]
    for spacing in SPACINGS:
        for n in steps:
            sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, n, spacing)
            errs = [solver_error(fn, sched, SD_ALPHAS_CUMPROD, parameterization) for fn in (sample_ddim,
                                                                                             sample_dpmpp_2m)]
            lines.append(f"| {spacing} | {n} | {errs[0]:.3g} | {errs[1]:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameterization", choices=("eps", "v"), default="eps")
    parser.add_argument("--spacings", action="store_true",
                        help="the error of each solver × inference.spacing instead of the convergence orders")
    args = parser.parse_args()
    print(f"x0 ~ N({MU}, {S}²·I), x_T ~ N(0, I) (1,4,8,8) seed 0, float64, {args.parameterization}-prediction; "
          "error = max |solver output − exact ODE solution followed by the common last step x̂0(·, t=0)|")
    print(spacing_table(args.parameterization) if args.spacings else error_table(args.parameterization))


if __name__ == "__main__":
    main()
