"""One contract for every sampler of ``sampler.registry.SAMPLERS`` (as diffusers' scheduler tests run every
scheduler through the same checks): shapes, determinism per seed, the [start_step, end_step) sub-range, and the x̂0
hook. The model is a fixed smooth function of (x, t, cond), so each property is checked on a non-trivial path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.solver_convergence import MU, S, SD_ALPHAS_CUMPROD, gaussian_oracle, solver_error
from model.gaussian_diffusion import make_scaled_linear_betas
from sampler.registry import FEW_STEP_SOLVERS, SAMPLERS, make_sampler
from sampler.spaced import SPACINGS, half_log_snr, kept_timesteps, make_spaced_schedule, space_timesteps

ALPHAS_CUMPROD = (1.0 - make_scaled_linear_betas(0.00085, 0.012, 1000)).cumprod()
STEPS = 8
STOCHASTIC = {"spaced"}  # ancestral DDPM draws noise at every step; DDIM (eta 0) and DPM++ 2M do not


def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """A fixed ε-prediction: smooth in x, varying with the timestep and the condition."""
    scale = 0.5 + t.float().view(-1, 1, 1, 1) / 2000.0
    return torch.tanh(x * scale + cond["shift"])


def run(name: str, x: torch.Tensor, seed: int = 0, **kwargs) -> torch.Tensor:
    schedule = make_spaced_schedule(ALPHAS_CUMPROD, STEPS)
    generator = torch.Generator().manual_seed(seed)
    return make_sampler(name)(model_fn, x, schedule, {"shift": torch.full((1, 4, 1, 1), 0.1)},
                              parameterization="eps", generator=generator, disable=True, **kwargs)


@pytest.fixture
def x_T() -> torch.Tensor:
    return torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", SAMPLERS)
def test_output_has_the_input_shape_and_dtype_and_is_finite(name, x_T):
    out = run(name, x_T)
    assert out.shape == x_T.shape and out.dtype == x_T.dtype and torch.isfinite(out).all()
    assert not torch.allclose(out, x_T)


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_result_and_other_seed_as_documented(name, x_T):
    assert torch.equal(run(name, x_T, seed=3), run(name, x_T, seed=3))
    other = run(name, x_T, seed=4)
    if name in STOCHASTIC:
        assert not torch.allclose(other, run(name, x_T, seed=3))
    else:
        assert torch.equal(other, run(name, x_T, seed=3))


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_sees_each_step_of_the_sub_range_once(name, x_T):
    seen: list[tuple[int, int]] = []
    schedule = make_spaced_schedule(ALPHAS_CUMPROD, STEPS)
    run(name, x_T, start_step=2, end_step=6, callback=lambda info: seen.append((info["step"], info["t"])))
    assert [step for step, _ in seen] == [2, 3, 4, 5]
    # step k runs at index n-1-k of the schedule: timesteps decrease along the run
    assert [t for _, t in seen] == [int(schedule.timesteps[STEPS - 1 - k]) for k in range(2, 6)]


@pytest.mark.parametrize("name", SAMPLERS)
def test_split_run_equals_whole_run_for_one_step_solvers(name, x_T):
    """[0, k) then [k, n) from the intermediate latent, with the same generator, is the whole run; DPM++ 2M keeps a
    one-step history that a restart drops (documented: AccSamp's phase 2 restarts from a re-noised latent), so its
    split run differs."""
    schedule = make_spaced_schedule(ALPHAS_CUMPROD, STEPS)
    cond = {"shift": torch.full((1, 4, 1, 1), 0.1)}
    sample = make_sampler(name)
    gen = torch.Generator().manual_seed(5)
    half = sample(model_fn, x_T, schedule, cond, parameterization="eps", generator=gen, end_step=3, disable=True)
    split = sample(model_fn, half, schedule, cond, parameterization="eps", generator=gen, start_step=3, disable=True)
    whole = run(name, x_T, seed=5)
    if name == "dpmpp_2m":
        assert not torch.allclose(split, whole)
    else:
        assert torch.allclose(split, whole, atol=1e-6)


@pytest.mark.parametrize("name", SAMPLERS)
def test_x0_hook_sees_every_step_and_its_value_is_used(name, x_T):
    """The hook gets (x̂0, x, schedule index) at every step, and what it returns is the x̂0 the step uses: a hook
    that pins x̂0 to a constant image makes the last step land on it (every solver's final step returns x̂0)."""
    target = torch.full_like(x_T, 0.25)
    calls: list[int] = []
    seen_x0: list[torch.Tensor] = []

    def hook(x0: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        assert x0.shape == x.shape == x_T.shape
        calls.append(i)
        return target

    out = run(name, x_T, x0_fn=hook, callback=lambda info: seen_x0.append(info["x0"]))
    assert calls == list(range(STEPS - 1, -1, -1))
    assert all(torch.equal(x0, target) for x0 in seen_x0)
    assert torch.allclose(out, target, atol=1e-5)


# ----------------------------------------------------------------------------- exact solution, every solver × spacing
# Gaussian data x0 ~ N(0.3, 0.5²·I) on the SD-2.1 schedule (scaled linear 0.00085..0.012, 1000 steps), float64: the
# optimal ε and the probability-flow ODE solution are closed form (benchmarks/solver_convergence.py), so each
# deterministic solver's error is exact. Measured max-abs errors from one (1,4,8,8) x_T; ``python -m
# benchmarks.solver_convergence --spacings`` prints the table. Pinned to 1 % (float64 arithmetic, no randomness).
EXACT_ERRORS = {
    ("ddim", "uniform"): (0.3492, 0.1869), ("dpmpp_2m", "uniform"): (0.3521, 0.2154),
    ("ddim", "logsnr"): (0.2504, 0.1238), ("dpmpp_2m", "logsnr"): (0.03202, 0.009778),
    ("ddim", "karras"): (0.2678, 0.1334), ("dpmpp_2m", "karras"): (0.08348, 0.02269),
}


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", FEW_STEP_SOLVERS)
def test_ode_solvers_meet_the_exact_gaussian_solution_on_every_spacing(name, spacing):
    errors = [solver_error(make_sampler(name), make_spaced_schedule(SD_ALPHAS_CUMPROD, n, spacing),
                           SD_ALPHAS_CUMPROD, "eps") for n in (10, 20, 40)]
    assert errors[0] == pytest.approx(EXACT_ERRORS[name, spacing][0], rel=1e-2)
    assert errors[1] == pytest.approx(EXACT_ERRORS[name, spacing][1], rel=1e-2)
    assert errors[2] < errors[1] < errors[0]


def test_log_snr_spacing_makes_dpm_solver_an_order_of_magnitude_more_accurate():
    # the model grid (uniform in t) leaves the last steps long in log-SNR, where the 2nd-order solver is no better
    # than DDIM; on a log-SNR or Karras grid it is
    uniform, logsnr, karras = (EXACT_ERRORS["dpmpp_2m", s] for s in SPACINGS)
    assert logsnr[0] < 0.1 * uniform[0] and logsnr[1] < 0.05 * uniform[1]
    assert karras[0] < 0.25 * uniform[0] and karras[1] < 0.15 * uniform[1]
    assert uniform[0] > EXACT_ERRORS["ddim", "uniform"][0]  # uniform in t, 10 steps: DPM++ 2M no better than DDIM


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ancestral_sampler_draws_the_gaussian_data_distribution(spacing):
    """The spaced (ancestral) sampler is stochastic: its exact check is the output distribution. With the optimal
    ε its samples have mean MU (measured within 1e-3) and a standard deviation that approaches S from below as the
    steps grow (x̂0 point estimates lose variance; measured 0.35-0.37 at 10 steps, 0.45-0.47 at 50)."""
    x_T = torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stds = []
    for n in (10, 50):
        out = make_sampler("spaced")(gaussian_oracle(SD_ALPHAS_CUMPROD), x_T,
                                     make_spaced_schedule(SD_ALPHAS_CUMPROD, n, spacing), None,
                                     generator=torch.Generator().manual_seed(2))
        assert out.mean().item() == pytest.approx(MU, abs=3e-3)
        stds.append(out.std().item())
    assert stds[0] < stds[1] < S and S - stds[1] < 0.06


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_keeps_n_distinct_timesteps_from_0_to_T_minus_1(spacing):
    for n in (2, 3, 10, 25, 50, 200, 999, 1000):
        kept = kept_timesteps(SD_ALPHAS_CUMPROD, n, spacing)
        assert len(kept) == n and kept[0] == 0 and kept[-1] == 999 and all(b > a for a, b in zip(kept, kept[1:]))
    with pytest.raises(ValueError, match="spacing"):
        kept_timesteps(SD_ALPHAS_CUMPROD, 10, "cosine")


def test_spacings_follow_their_definitions():
    assert kept_timesteps(SD_ALPHAS_CUMPROD, 10, "uniform") == space_timesteps(1000, "10")
    lam = half_log_snr(SD_ALPHAS_CUMPROD)
    sigma = np.sqrt((1 - SD_ALPHAS_CUMPROD) / SD_ALPHAS_CUMPROD)
    ramp = np.linspace(0, 1, 10)
    targets = {"logsnr": np.linspace(lam[-1], lam[0], 10),
               "karras": -np.log((sigma[-1] ** (1 / 7) + ramp * (sigma[0] ** (1 / 7) - sigma[-1] ** (1 / 7))) ** 7)}
    values = {"logsnr": lam, "karras": -np.log(sigma)}
    for spacing in ("logsnr", "karras"):
        # from t = 999 down to t = 0: each kept timestep is the integer one nearest to its target
        kept = kept_timesteps(SD_ALPHAS_CUMPROD, 10, spacing)[::-1]
        for t, target in zip(kept, targets[spacing]):
            assert abs(values[spacing][t] - target) == min(abs(values[spacing] - target))
