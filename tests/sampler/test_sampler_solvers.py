"""DDIM and DPM-Solver++ 2M against the exact probability-flow ODE solution for Gaussian data, their empirical orders
of convergence, their relation to the spaced sampler, and the AccSamp speed options (solver choice, guidance on every
k-th step, linear-surrogate pull-back)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.solver_convergence import (MU, SD_ALPHAS_CUMPROD, empirical_order, exact_sample, gaussian_oracle,
                                           log_snr_uniform_schedule, solver_error, x_T_sample)
from haze.dcp import estimate_transmission
from sampler.accsamp import sample_accsamp
from sampler.align import align_op
from sampler.ddim import ddim_sigma, sample_ddim
from sampler.dpm_solver import sample_dpmpp_2m
from sampler.guidance import WeightedMSSSIMGuidance
from sampler.pullback import LinearDecoderPullback
from sampler.registry import make_sampler
from sampler.spaced import half_log_snr, make_spaced_schedule, sample_spaced

SOLVERS = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


# ----------------------------------------------------------------------------- convergence to the exact ODE solution
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_orders_on_log_snr_uniform_grid(parameterization):
    # A grid uniform in λ is a smooth reparametrisation of the ODE's time, where theory applies from few steps on:
    # DDIM is the first-order exponential integrator (order 1), DPM-Solver++ 2M the second-order multistep one.
    # Measured (eps and v): DDIM 1.00-1.01 per doubling from 10 steps, DPM++ 2.01-2.02 from 20 steps; the bands
    # [0.8, 1.3] and [1.6, 2.6] reject the neighbouring integer orders (a first-order DPM++ or a wrong DDIM
    # coefficient that stalls convergence) while leaving room for the pre-asymptotic terms.
    steps = [10, 20, 40, 80]
    errors = {name: [solver_error(fn, log_snr_uniform_schedule(n), log_snr_uniform_schedule(n).alphas_cumprod,
                                  parameterization) for n in steps] for name, fn in SOLVERS.items()}
    assert 0.8 <= empirical_order(errors["ddim"], steps) <= 1.3, errors
    assert 1.6 <= empirical_order(errors["dpmpp_2m"][1:], steps[1:]) <= 2.6, errors
    assert errors["ddim"][-1] < 0.04 and errors["dpmpp_2m"][-1] < 1e-3
    assert all(d < e for d, e in zip(errors["dpmpp_2m"], errors["ddim"]))


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_convergence_on_the_model_schedule(parameterization):
    # The model's own grid (guided-diffusion respacing of the 1000 SD timesteps, both ends always kept) is uniform in
    # t, and λ(t) ≈ −½·log(0.00085·(t+1)) near t = 0, so the last steps stay long in λ until N nears 1000.
    # DDIM still shows order ≈ 1 (measured 0.90-0.97 per doubling); DPM++ 2M converges faster (measured
    # 1.26, 1.46, 1.58, 1.63, 1.68 per doubling from 25 to 800 steps): its order approaches 2 only as the steps
    # near t = 0 shrink, hence the wider band [1.4, 2.6] over 100-800 steps.
    steps = [25, 50, 100, 200, 400, 800]
    errors = {name: [solver_error(fn, make_spaced_schedule(SD_ALPHAS_CUMPROD, n), SD_ALPHAS_CUMPROD,
                                  parameterization) for n in steps] for name, fn in SOLVERS.items()}
    for errs in errors.values():
        assert all(b < a for a, b in zip(errs, errs[1:])), errors
    assert 0.8 <= empirical_order(errors["ddim"], steps) <= 1.3, errors
    assert 1.4 <= empirical_order(errors["dpmpp_2m"][2:], steps[2:]) <= 2.6, errors
    assert errors["dpmpp_2m"][-1] < 0.2 * errors["ddim"][-1]


def test_exact_solution_agrees_with_very_fine_integration():
    # 1000 DPM++ steps uniform in λ: independent of the closed form's derivation, error O(h²) ≈ 1e-6
    n = 1000
    sched = log_snr_uniform_schedule(n)
    x_T = x_T_sample()
    fine = sample_dpmpp_2m(gaussian_oracle(sched.alphas_cumprod), x_T, sched, None)
    torch.testing.assert_close(fine, exact_sample(x_T, sched.alphas_cumprod[-1], sched.alphas_cumprod[0]),
                               rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- single steps and relations
def test_ddim_eta_one_is_the_spaced_ancestral_sampler():
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 20)
    model_fn = gaussian_oracle(SD_ALPHAS_CUMPROD)
    x_T = x_T_sample()
    ddim = sample_ddim(model_fn, x_T, sched, None, eta=1.0, generator=torch.Generator().manual_seed(3))
    spaced = sample_spaced(model_fn, x_T, sched, None, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, spaced, rtol=0, atol=1e-10)
    # the DDIM noise level at η = 1 is the DDPM posterior variance (except the clipped first entry)
    for i in (1, 7, 19):
        var = np.exp(sched.posterior_log_variance_clipped[i])
        assert ddim_sigma(sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i], 1.0) ** 2 == pytest.approx(var)
    assert ddim_sigma(sched.alphas_cumprod[0], 1.0, 1.0) == 0.0


def test_ddim_step_by_hand():
    # one DDIM η=0 step from t = 999 with a constant model output ε = 0.5:
    # x' = sqrt(ᾱ')·(x − sqrt(1−ᾱ)·0.5)/sqrt(ᾱ) + sqrt(1−ᾱ')·0.5
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 10)
    x = torch.full((1, 4, 2, 2), 1.5, dtype=torch.float64)
    out = sample_ddim(lambda x, t, c: torch.full_like(x, 0.5), x, sched, None, end_step=1)
    a, a_prev = sched.alphas_cumprod[9], sched.alphas_cumprod_prev[9]
    expected = np.sqrt(a_prev) * (1.5 - np.sqrt(1 - a) * 0.5) / np.sqrt(a) + np.sqrt(1 - a_prev) * 0.5
    torch.testing.assert_close(out, torch.full_like(x, expected))


def test_dpmpp_first_step_is_ddim_and_second_uses_history():
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 10)
    model_fn = gaussian_oracle(SD_ALPHAS_CUMPROD)
    x_T = x_T_sample()
    torch.testing.assert_close(sample_dpmpp_2m(model_fn, x_T, sched, None, end_step=1),
                               sample_ddim(model_fn, x_T, sched, None, end_step=1))
    seen = []
    sample_dpmpp_2m(model_fn, x_T, sched, None, end_step=2, callback=seen.append)
    x1, d0, d1 = seen[0]["x"], seen[0]["x0"], seen[1]["x0"]
    lam = [half_log_snr(sched.alphas_cumprod[i]) for i in (9, 8, 7)]
    h0, h1 = lam[1] - lam[0], lam[2] - lam[1]
    r = h0 / h1
    d = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    a_s, a_t = sched.alphas_cumprod[8], sched.alphas_cumprod[7]
    expected = np.sqrt((1 - a_t) / (1 - a_s)) * x1 - np.sqrt(a_t) * np.expm1(-h1) * d
    torch.testing.assert_close(seen[1]["x"], expected)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_solvers_apply_classifier_free_guidance(name):
    # uncond + s·(cond − uncond) with two Gaussian oracles equals the sampler run on the blended oracle
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 8)
    cond_fn, uncond_fn = gaussian_oracle(SD_ALPHAS_CUMPROD), gaussian_oracle(SD_ALPHAS_CUMPROD[::-1].copy())

    def model_fn(x, t, c):
        return cond_fn(x, t, c) if c == "cond" else uncond_fn(x, t, c)

    def blended(x, t, c):
        return uncond_fn(x, t, c) + 0.85 * (cond_fn(x, t, c) - uncond_fn(x, t, c))

    x_T = x_T_sample()
    sample = make_sampler(name)
    torch.testing.assert_close(sample(model_fn, x_T, sched, "cond", uncond="uncond", cfg_scale=0.85),
                               sample(blended, x_T, sched, "cond"))


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_solvers_x0_hook_sub_range_and_callback(name):
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 12)
    model_fn = gaussian_oracle(SD_ALPHAS_CUMPROD)
    x_T = x_T_sample()
    seen, hooked = [], []

    def x0_fn(x0, x, i):
        hooked.append(i)
        return torch.full_like(x0, MU)

    out = make_sampler(name)(model_fn, x_T, sched, None, start_step=3, x0_fn=x0_fn,
                             callback=lambda info: seen.append((info["step"], info["index"])))
    assert seen == [(k, 11 - k) for k in range(3, 12)] and hooked == [11 - k for k in range(3, 12)]
    torch.testing.assert_close(out, torch.full_like(out, MU))  # the last step returns the (hooked) x̂0


def test_make_sampler_names_and_errors():
    assert make_sampler("spaced") is sample_spaced and make_sampler("dpmpp_2m") is sample_dpmpp_2m
    assert make_sampler("ddim", eta=0.5).keywords == {"eta": 0.5}
    with pytest.raises(ValueError, match="inference.sampler.*spaced, ddim, dpmpp_2m.*'euler'"):
        make_sampler("euler")


# ----------------------------------------------------------------------------- AccSamp speed options
SIZE = 96


TOY_W = torch.tensor([[0.5, -0.2, 0.1], [0.1, 0.4, -0.3], [-0.2, 0.1, 0.6]], dtype=torch.float64)
TOY_B = 0.05


def upsample_decode(z: torch.Tensor) -> torch.Tensor:
    """Toy decoder, exactly linear: colour map TOY_W of latent channels 0-2 plus TOY_B, nearest ×8 upsampling."""
    cells = torch.einsum("cl,blhw->bchw", TOY_W.to(z.dtype), z[:, :3]) + TOY_B
    return cells.repeat_interleave(8, -2).repeat_interleave(8, -1)


def pool_encode(img_pm1: torch.Tensor) -> torch.Tensor:
    """Toy encoder, a right inverse of :func:`upsample_decode` on 8×8-constant images; the 4th channel (ignored by
    the decoder) is a nonlinear function of the image so that the four channels are not collinear."""
    pooled = F.avg_pool2d(img_pm1, 8)
    z3 = torch.einsum("lc,bchw->blhw", torch.linalg.inv(TOY_W).to(pooled.dtype), pooled - TOY_B)
    return torch.cat([z3, pooled[:, :1] ** 2], dim=1)


def test_linear_pullback_is_exact_for_a_linear_decoder():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 6, 5, generator=gen)
    pull = LinearDecoderPullback.fit(z, upsample_decode(z))
    torch.testing.assert_close(pull.decode(z), upsample_decode(z), rtol=0, atol=1e-5)
    u = torch.randn(2, 3, 48, 40, generator=gen)
    zz = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(upsample_decode(zz), zz, grad_outputs=u)
    torch.testing.assert_close(pull(z, u), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not 8x"):
        LinearDecoderPullback.fit(z, torch.zeros(2, 3, 40, 40))


def _accsamp(name: str, **kw):
    gen = torch.Generator().manual_seed(4)
    hazy01 = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(SIZE, SIZE), mode="bilinear")
    x_T = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=gen)
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 10)  # k_est 1, k_restart 4: phase-2 steps 4..9, all guided
    return sample_accsamp(gaussian_oracle(SD_ALPHAS_CUMPROD), x_T, sched, None, hazy01, tau=0.8,
                          omega=0.6, decode_fn=upsample_decode, encode_fn=pool_encode, align_fn=align_op,
                          transmission_fn=estimate_transmission, generator=torch.Generator().manual_seed(11),
                          sampler=make_sampler(name), **kw)


class CountingGuidance(WeightedMSSSIMGuidance):
    """The published guidance, recording the timesteps it is called at and the pull-back it gets."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, object]] = []

    def __call__(self, x0, t, coef1, decode_fn, decode_vjp_fn=None):
        self.calls.append((t, decode_vjp_fn))
        return super().__call__(x0, t, coef1, decode_fn, decode_vjp_fn)


@pytest.mark.parametrize("name", ["spaced", "ddim", "dpmpp_2m"])
def test_accsamp_runs_on_every_solver_with_proportional_phases(name):
    steps = []
    guidance = CountingGuidance()
    z, extras = _accsamp(name, guidance=guidance, callback=lambda info: steps.append(info["step"]))
    assert steps == [0, 1, 4, 5, 6, 7, 8, 9] and torch.isfinite(z).all()
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 10)
    assert [t for t, _ in guidance.calls] == [int(sched.timesteps[9 - k]) for k in range(4, 10)]
    z_plain, _ = _accsamp(name, guidance=None)
    assert (z - z_plain).abs().max() > 1e-3


def test_accsamp_guidance_every_kth_step_and_linear_pullback():
    every = CountingGuidance()
    _accsamp("dpmpp_2m", guidance=every, guidance_every=2)
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 10)
    assert [t for t, _ in every.calls] == [int(sched.timesteps[9 - k]) for k in (4, 6, 8)]
    assert all(vjp is None for _, vjp in every.calls)
    linear, exact = CountingGuidance(), CountingGuidance()
    z_linear, _ = _accsamp("ddim", guidance=linear, pullback="linear")
    z_exact, _ = _accsamp("ddim", guidance=exact)
    assert all(isinstance(vjp, LinearDecoderPullback) for _, vjp in linear.calls) and len(linear.calls) == 6
    # the toy decoder is linear and the encoder its right inverse, so the fitted surrogate is the decoder itself:
    # the two agree up to float32 rounding, amplified by the guidance gain (measured 3e-4 on an effect of 3.1)
    z_plain, _ = _accsamp("ddim", guidance=None)
    effect = (z_exact - z_plain).abs().max()
    assert effect > 1.0 and (z_linear - z_exact).abs().max() < 1e-3 * effect


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_solvers_batch_with_one_generator_per_image_equals_single_runs(name):
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 8)
    model_fn = gaussian_oracle(SD_ALPHAS_CUMPROD)
    sample = make_sampler(name, eta=0.5) if name == "ddim" else make_sampler(name)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batched = sample(model_fn, x_T, sched, None,
                     generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    for b, seed in enumerate((1, 2)):
        alone = sample(model_fn, x_T[b: b + 1], sched, None, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(batched[b: b + 1], alone, rtol=0, atol=1e-12)
