"""Spaced sampler, AccSamp step bookkeeping and MS-SSIM guidance against formulas and hand computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haze.dcp import DCPTransmission, estimate_transmission
from metrics.ssim import ms_ssim
from model.gaussian_diffusion import Diffusion
from pipelines.tiling import tiled_vjp
from sampler.accsamp import accsamp_steps, sample_accsamp
from sampler.align import align_op
from sampler.guidance import GRADIENT_GAIN, WeightedMSSSIMGuidance
from sampler.spaced import (guided_model_output, make_spaced_schedule, posterior_step, predict_x0, sample_spaced,
                            space_timesteps)

SD_ALPHAS_CUMPROD = Diffusion().alphas_cumprod_np
SIZE = 96  # toy image side (latent 12)


# ----------------------------------------------------------------------------- respacing
def test_space_timesteps_50_follows_guided_diffusion_rule():
    kept = space_timesteps(1000, "50")
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
    # stride (1000 - 1) / (50 - 1) = 20.3878; i * stride rounded, by hand:
    # 1 -> 20.39 -> 20, 2 -> 40.78 -> 41, 10 -> 203.88 -> 204, 25 -> 509.69 -> 510, 29 -> 591.24 -> 591,
    # 48 -> 978.61 -> 979
    for i, expected in {1: 20, 2: 41, 10: 204, 25: 510, 29: 591, 48: 979}.items():
        assert kept[i] == expected
    assert kept == [round(i * 999 / 49) for i in range(50)]


def test_space_timesteps_sections_and_ddim():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # two sections of 500: strides 499/9 = 55.44 and 499/14 = 35.64
    kept = space_timesteps(1000, "10,15")
    assert kept[:10] == [0, 55, 111, 166, 222, 277, 333, 388, 444, 499]
    assert kept[10:13] == [500, 536, 571] and kept[-1] == 999 and len(kept) == 25
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim400")


def test_respaced_schedule_matches_direct_formulas():
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 50)
    kept = space_timesteps(1000, "50")
    ac_full = np.asarray(SD_ALPHAS_CUMPROD, dtype=np.float64)
    assert list(sched.timesteps) == kept and len(sched) == 50
    for i in (0, 1, 2, 17, 29, 49):
        ac = ac_full[kept[i]]
        ac_prev = 1.0 if i == 0 else ac_full[kept[i - 1]]
        beta = 1.0 - ac / ac_prev
        assert sched.betas[i] == pytest.approx(beta, rel=1e-12, abs=1e-15)
        assert sched.alphas_cumprod[i] == pytest.approx(ac, rel=1e-12)
        assert sched.posterior_mean_coef1[i] == pytest.approx(beta * np.sqrt(ac_prev) / (1 - ac), rel=1e-10)
        assert sched.posterior_mean_coef2[i] == pytest.approx((1 - ac_prev) * np.sqrt(1 - beta) / (1 - ac),
                                                              rel=1e-10, abs=1e-15)
        if i > 0:
            var = beta * (1 - ac_prev) / (1 - ac)
            assert sched.posterior_log_variance_clipped[i] == pytest.approx(np.log(var), rel=1e-10)
    # first entry clipped to the second value (the true first variance is 0)
    assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]
    # the kept alphas_cumprod are the cumulative product of the respaced betas
    np.testing.assert_allclose(np.cumprod(1 - sched.betas), sched.alphas_cumprod, rtol=1e-12)


def test_respaced_first_step_by_hand():
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 50)
    # timestep 0 is kept: beta'_0 = beta_0 = 0.00085; posterior of step 0 is x0 itself (coef1 1, coef2 0)
    assert sched.betas[0] == pytest.approx(0.00085, rel=1e-12)
    assert sched.posterior_mean_coef1[0] == pytest.approx(1.0, rel=1e-12)
    assert sched.posterior_mean_coef2[0] == 0.0


def test_posterior_mean_of_noise_free_latent_is_previous_marginal_mean():
    # coef1 + coef2·sqrt(ᾱ_i) = sqrt(ᾱ_{i-1}) for the Gaussian posterior of any valid chain
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 50)
    lhs = sched.posterior_mean_coef1 + sched.posterior_mean_coef2 * np.sqrt(sched.alphas_cumprod)
    np.testing.assert_allclose(lhs, np.sqrt(sched.alphas_cumprod_prev), rtol=1e-12)


# ----------------------------------------------------------------------------- single-step pieces
def test_predict_x0_inverts_eps_and_v():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    a = 0.37
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    torch.testing.assert_close(predict_x0(x_t, eps, a, "eps"), x0)
    torch.testing.assert_close(predict_x0(x_t, v, a, "v"), x0)


def test_posterior_step_noise_only_above_index_zero():
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 50)
    x_t = torch.full((1, 4, 3, 3), 0.5, dtype=torch.float64)
    x0 = torch.full((1, 4, 3, 3), -0.25, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    out0 = posterior_step(x_t, x0, sched, 0, gen)
    torch.testing.assert_close(out0, x0)  # coef1 = 1, coef2 = 0 and no noise
    # no random draw was consumed at index 0
    torch.testing.assert_close(torch.randn(4, generator=gen), torch.randn(4, generator=torch.Generator().manual_seed(3)))
    i = 17
    out = posterior_step(x_t, x0, sched, i, torch.Generator().manual_seed(5))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean = sched.posterior_mean_coef1[i] * -0.25 + sched.posterior_mean_coef2[i] * 0.5
    expected = mean + np.exp(0.5 * sched.posterior_log_variance_clipped[i]) * noise
    torch.testing.assert_close(out, expected)


def test_classifier_free_guidance_formula():
    calls = []

    def model_fn(x, t, c):
        calls.append(c)
        return x * c

    x, t = torch.ones(1, 4, 2, 2), torch.zeros(1, dtype=torch.long)
    # uncond + s·(cond − uncond) = 0.5x + 3·(2x − 0.5x) = 5x
    torch.testing.assert_close(guided_model_output(model_fn, x, t, 2.0, 0.5, 3.0), 5 * x)
    calls.clear()
    torch.testing.assert_close(guided_model_output(model_fn, x, t, 2.0, 0.5, 1.0), 2 * x)
    assert calls == [2.0]  # s == 1: the unconditional branch is not evaluated
    torch.testing.assert_close(guided_model_output(model_fn, x, t, 2.0, None, 3.0), 2 * x)


# ----------------------------------------------------------------------------- whole chain
def point_mass_oracle(x0_star: torch.Tensor, parameterization: str = "eps"):
    """Exact model output when the data distribution is the point mass at x0_star."""
    ac_full = torch.tensor(SD_ALPHAS_CUMPROD, dtype=torch.float64)

    def model_fn(x, t, cond):
        a = ac_full[t].view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * x0_star) / (1 - a).sqrt()
        return eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0_star

    return model_fn


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_chain_with_exact_oracle_keeps_marginals_and_ends_at_data(parameterization):
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 50)
    x0_star = 0.7
    gen = torch.Generator().manual_seed(0)
    a_T = sched.alphas_cumprod[-1]
    x_T = np.sqrt(a_T) * x0_star + np.sqrt(1 - a_T) * torch.randn(1, 4, 64, 64, generator=gen, dtype=torch.float64)
    seen = {}

    def callback(info):
        seen[info["step"]] = info

    out = sample_spaced(point_mass_oracle(torch.tensor(x0_star, dtype=torch.float64), parameterization), x_T, sched,
                        None, parameterization=parameterization, callback=callback, generator=gen)
    assert sorted(seen) == list(range(50))
    torch.testing.assert_close(out, torch.full_like(out, x0_star))
    # ancestral sampling with the exact x0 keeps q(x_t) = N(sqrt(ᾱ)·x0*, 1−ᾱ) at every kept step
    for k in (5, 20, 40, 48):
        info = seen[k]
        assert info["index"] == 49 - k and info["t"] == sched.timesteps[49 - k]
        a_prev = sched.alphas_cumprod_prev[info["index"]]
        x = info["x"]
        std = np.sqrt(1 - a_prev)
        assert abs(x.mean().item() - np.sqrt(a_prev) * x0_star) < 4 * std / 128
        assert abs(x.std().item() - std) < 4 * std / 90
        torch.testing.assert_close(info["x0"], torch.full_like(x, x0_star))


def test_chain_seeded_repeatability_and_sub_range():
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 20)
    model_fn = point_mass_oracle(torch.tensor(0.3))
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(seed, **kw):
        return sample_spaced(model_fn, x_T, sched, None, generator=torch.Generator().manual_seed(seed), **kw)

    torch.testing.assert_close(run(7, end_step=12), run(7, end_step=12), rtol=0, atol=0)
    assert not torch.equal(run(7, end_step=12), run(8, end_step=12))
    steps = []
    run(7, start_step=4, end_step=9, callback=lambda info: steps.append((info["step"], info["index"])))
    assert steps == [(k, 19 - k) for k in range(4, 9)]


# ----------------------------------------------------------------------------- AccSamp
def test_accsamp_steps_published_values_and_errors():
    assert accsamp_steps(50, 0.8, 0.6) == (9, 20)
    assert accsamp_steps(50, 0.5, 1.0) == (24, 0)
    for tau, omega in [(0.0, 0.6), (1.0, 0.6), (0.8, 0.0), (0.8, 1.2), (-0.1, 0.5), (0.995, 0.6)]:
        with pytest.raises(ValueError):
            accsamp_steps(50, tau, omega)


def upsample_decode(z: torch.Tensor) -> torch.Tensor:
    """Toy differentiable decoder: first 3 latent channels, nearest ×8 upsampling -> (B,3,8h,8w)."""
    return torch.tanh(z[:, :3]).repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)


def pool_encode(img_pm1: torch.Tensor) -> torch.Tensor:
    """Toy encoder matching :func:`upsample_decode`: 8×8 mean, atanh, a zero fourth channel."""
    z = torch.atanh(F.avg_pool2d(img_pm1, 8).clamp(-0.999, 0.999))
    return torch.cat([z, torch.zeros_like(z[:, :1])], dim=1)


def _guidance_setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    target = F.interpolate(torch.rand(1, 3, 6, 6, generator=gen) * 2 - 1, size=(96, 96), mode="bilinear",
                           align_corners=False)
    x0 = torch.randn(1, 4, 12, 12, generator=gen) * 0.5
    return target, x0


def test_guidance_window():
    g = WeightedMSSSIMGuidance()  # published (t_start 601, t_stop -1): t + 1 in (−1, 601)
    assert g.active(0) and g.active(599) and not g.active(600) and not g.active(999)
    g = WeightedMSSSIMGuidance(t_start=500, t_stop=100)
    assert g.active(100) and not g.active(99) and g.active(498) and not g.active(499)
    with pytest.raises(ValueError):
        WeightedMSSSIMGuidance(space="latent")
    with pytest.raises(ValueError):
        WeightedMSSSIMGuidance(repeat=0)
    with pytest.raises(RuntimeError):
        WeightedMSSSIMGuidance()(torch.zeros(1, 4, 2, 2), 10, 1.0, upsample_decode)


def test_guidance_update_formula_and_descent():
    target, x0 = _guidance_setup()
    gen = torch.Generator().manual_seed(9)
    weight = 0.05 + 0.95 * torch.rand(1, 1, SIZE, SIZE, generator=gen)
    g = WeightedMSSSIMGuidance(scale=0.1)
    g.set_target(target, weight)
    coef1 = 0.25
    out = g(x0, 300, coef1, upsample_decode)
    # hand formula: pixel gradient of −MS-SSIM (values mapped (v+1)/2), times weight·scale·3000, pulled back
    # through tanh∘nearest-×8 (adjoint: 8×8 block sums times tanh'), divided by coef1
    img = upsample_decode(x0).requires_grad_(True)
    loss = -ms_ssim(img * 0.5 + 0.5, target * 0.5 + 0.5, data_range=1.0, normalize=True).sum()
    (g_img,) = torch.autograd.grad(loss, img)
    pix = -g_img * weight * 0.1 * GRADIENT_GAIN
    dz = F.avg_pool2d(pix, 8) * 64 * (1 - torch.tanh(x0[:, :3]) ** 2)
    expected = x0.clone()
    expected[:, :3] += dz / coef1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(out[:, 3], x0[:, 3])
    tiled = g(x0, 300, coef1, upsample_decode,
              lambda z, v: tiled_vjp(upsample_decode, z, v, tile=5, stride=4, scale=8))
    torch.testing.assert_close(tiled, out, rtol=1e-4, atol=1e-6)

    def score(z):
        return ms_ssim(upsample_decode(z) * 0.5 + 0.5, target * 0.5 + 0.5, normalize=True).item()

    small = WeightedMSSSIMGuidance(scale=0.002)
    small.set_target(target, torch.ones(1, 1, SIZE, SIZE))
    assert score(small(x0, 300, 1.0, upsample_decode)) > score(x0)


def test_tiled_guidance_update_equals_untiled_on_many_tiles():
    # 208x240 image, 32-px gradient tiles (7x8 tiles with 160-px halos) and the transmission read per tile:
    # the pixel update equals the untiled autograd one up to float32 summation order (tolerance as in test_ssim)
    gen = torch.Generator().manual_seed(6)
    hazy01 = F.interpolate(torch.rand(1, 3, 13, 15, generator=gen), size=(208, 240), mode="bilinear")
    target = (hazy01 * 2 - 1).flip(-1)
    decoded = target.roll(5, dims=-1) + 0.1 * torch.randn(1, 3, 208, 240, generator=gen)
    untiled = WeightedMSSSIMGuidance(tile_size=32)
    untiled.set_target(target, estimate_transmission(hazy01))
    expected = untiled.pixel_update(decoded)
    lazy = DCPTransmission(hazy01)
    assert torch.equal(lazy[..., :, :], estimate_transmission(hazy01))
    assert torch.equal(lazy[..., 37:90, 100:240], estimate_transmission(hazy01)[..., 37:90, 100:240])
    tiled = WeightedMSSSIMGuidance(tile_size=32)
    tiled.set_target(target, lazy)
    got = tiled.pixel_update_tiled(decoded.clone())
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(untiled.pixel_update(decoded), expected)  # the published path is untouched by the tiled one


def test_guidance_inactive_and_weight_scaling():
    target, x0 = _guidance_setup(1)
    g = WeightedMSSSIMGuidance(scale=0.1)
    g.set_target(target, torch.zeros(1, 1, SIZE, SIZE))
    assert torch.equal(g(x0, 300, 0.5, upsample_decode), x0)  # zero transmission: no change
    g.set_target(target, torch.full((1, 1, SIZE, SIZE), 0.5))
    assert torch.equal(g(x0, 600, 0.5, upsample_decode), x0)  # outside the window
    half = g(x0, 300, 0.5, upsample_decode) - x0
    g.set_target(target, torch.ones(1, 1, SIZE, SIZE))
    full = g(x0, 300, 0.5, upsample_decode) - x0
    assert full.abs().max() > 0
    torch.testing.assert_close(full, 2 * half, rtol=1e-4, atol=1e-6)


def _accsamp_inputs(seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    hazy01 = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(SIZE, SIZE), mode="bilinear")
    x_T = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=gen)
    return hazy01, x_T


def _run_accsamp(sched, hazy01, x_T, guidance, callback=None):
    return sample_accsamp(point_mass_oracle(torch.tensor(0.2)), x_T, sched, None, hazy01, tau=0.8, omega=0.6,
                          guidance=guidance, decode_fn=upsample_decode, encode_fn=pool_encode, align_fn=align_op,
                          transmission_fn=estimate_transmission, generator=torch.Generator().manual_seed(11), callback=callback)


def test_accsamp_step_order_estimate_and_seeded_draw_order():
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 50)
    hazy01, x_T = _accsamp_inputs()
    steps = []
    z, extras = _run_accsamp(sched, hazy01, x_T, None, callback=lambda info: steps.append((info["step"], info["t"])))
    assert [s for s, _ in steps] == list(range(10)) + list(range(20, 50))
    assert steps[10][1] == sched.timesteps[29] == 591  # phase 2 starts at k = (1 − ω)·50 = 20
    assert extras["estimate"].shape == (1, 3, SIZE, SIZE) and extras["estimate"].abs().max() <= 1
    trans = extras["transmission"]
    assert trans.shape == (1, 1, SIZE, SIZE) and trans.min() >= 0.05 - 1e-6 and trans.max() <= 1 + 1e-6

    # reproducible by hand: phase-1 steps 0..9, estimate from step 9's x0, q_sample noise drawn just before
    # step 20's own noise, then steps 20..49 (ending at the oracle's x0 without guidance)
    model_fn = point_mass_oracle(torch.tensor(0.2))
    gen = torch.Generator().manual_seed(11)
    last = {}
    sample_spaced(model_fn, x_T, sched, None, end_step=10, generator=gen, callback=last.update)
    estimate = align_op(hazy01 * 2 - 1, upsample_decode(last["x0"])).clamp(-1, 1)
    torch.testing.assert_close(extras["estimate"], estimate)
    z_est = pool_encode(estimate)
    a = sched.alphas_cumprod[29]
    x = np.sqrt(a) * z_est + np.sqrt(1 - a) * torch.randn(z_est.shape, generator=gen)
    expected = sample_spaced(model_fn, x, sched, None, start_step=20, generator=gen)
    torch.testing.assert_close(z, expected, rtol=0, atol=0)
    torch.testing.assert_close(z, torch.full_like(z, 0.2))


def test_accsamp_applies_guidance_towards_estimate():
    sched = make_spaced_schedule(SD_ALPHAS_CUMPROD, 10)  # k_est 1, k_restart 4: 6 guided steps (t <= 555)
    hazy01, x_T = _accsamp_inputs(5)
    guidance = WeightedMSSSIMGuidance()
    steps = []
    z, extras = _run_accsamp(sched, hazy01, x_T, guidance, callback=lambda info: steps.append(info["step"]))
    assert steps == [0, 1, 4, 5, 6, 7, 8, 9]
    assert torch.equal(guidance.target_pm1, extras["estimate"]) and torch.equal(guidance.weight, extras["transmission"])
    z_plain, _ = _run_accsamp(sched, hazy01, x_T, None)
    assert torch.isfinite(z).all() and (z - z_plain).abs().max() > 1e-3
