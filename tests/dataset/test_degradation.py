"""RIDCP haze degradation: formula, sampled ranges, branches and reproducibility."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dataset.degradation import (DegradationParams, add_gaussian_noise, degrade, depth_proxy, haze_formula,
                                 jpeg_compress, normalize_depth, transmission)

HAZE_ONLY = DegradationParams(gamma_p=0.0, noise_p=0.0, jpeg_p=0.0)


def constant_image(value: float, height: int = 16, width: int = 20) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.float32)


def column_ramp(height: int = 16, width: int = 20) -> np.ndarray:
    """Raw depth 5..15 across columns: normalises to 0 in column 0 and 1 in the last column."""
    return np.repeat(np.linspace(5.0, 15.0, width)[None, :], height, axis=0)


def test_haze_formula_hand_computed() -> None:
    J = np.full((1, 1, 3), 0.2)
    out = haze_formula(J, np.array([[0.5]]), beta=1.0, A=0.8)
    # t = exp(-(1 - 0.5) * 2 * 1) = exp(-1); I = 0.2 e^-1 + 0.8 (1 - e^-1)
    assert out[0, 0] == pytest.approx([0.57927234] * 3, abs=1e-7)


def test_haze_formula_per_channel_airlight_and_depth_extremes() -> None:
    J = np.full((1, 2, 3), 0.4)
    depth01 = np.array([[1.0, 0.0]])
    A = np.array([0.9, 0.8, 0.7])
    out = haze_formula(J, depth01, beta=0.5, A=A)
    assert out[0, 0] == pytest.approx([0.4, 0.4, 0.4])  # depth 1 (nearest): t = 1
    t_far = math.exp(-1.0)
    assert out[0, 1] == pytest.approx(0.4 * t_far + A * (1 - t_far))
    assert transmission(np.array([1.0, 0.0]), 1.5) == pytest.approx([1.0, math.exp(-3.0)])


def test_normalize_depth_min_max_and_constant_map() -> None:
    np.testing.assert_allclose(normalize_depth(np.array([[2.0, 4.0, 6.0]])), [[0.0, 0.5, 1.0]])
    assert not normalize_depth(np.full((3, 3), 7.0)).any()


def test_degrade_matches_formula_on_constant_image() -> None:
    clean01, depth = constant_image(0.6), column_ramp()
    hazy01, info = degrade(clean01, depth, np.random.default_rng(11), HAZE_ONLY)
    expected = haze_formula(clean01.astype(np.float64), normalize_depth(depth), info["beta"], info["A"])
    assert hazy01.dtype == np.float32 and hazy01.shape == clean01.shape
    np.testing.assert_allclose(hazy01, np.round(np.clip(expected, 0, 1) * 255) / 255, atol=1e-6)
    np.testing.assert_allclose(hazy01[:, -1], 0.6, atol=1e-6)  # depth 1 -> t = 1 -> I = J
    assert info["gamma"] is None and info["noise_sigma"] is None and info["jpeg_quality"] is None


def test_degrade_gamma_darkens_before_haze() -> None:
    params = DegradationParams(gamma_p=1.0, noise_p=0.0, jpeg_p=0.0)
    clean01, depth = constant_image(0.6), column_ramp()
    hazy01, info = degrade(clean01, depth, np.random.default_rng(5), params)
    assert 1.5 <= info["gamma"] <= 3.0
    darkened = np.full_like(clean01, 0.6 ** info["gamma"], dtype=np.float64)
    expected = haze_formula(darkened, normalize_depth(depth), info["beta"], info["A"])
    np.testing.assert_allclose(hazy01, np.round(np.clip(expected, 0, 1) * 255) / 255, atol=1e-6)


def test_degrade_same_seed_same_sample_other_seed_differs() -> None:
    clean01, depth = constant_image(0.5), column_ramp()
    first, info1 = degrade(clean01, depth, np.random.default_rng(42))
    second, info2 = degrade(clean01, depth, np.random.default_rng(42))
    other, info3 = degrade(clean01, depth, np.random.default_rng(43))
    np.testing.assert_array_equal(first, second)
    assert info1["beta"] == info2["beta"] and info1["beta"] != info3["beta"]
    assert not np.array_equal(first, other)


def test_degrade_sampled_ranges_and_branch_rates() -> None:
    clean01, depth = constant_image(0.5, 8, 8), column_ramp(8, 8)
    infos = [degrade(clean01, depth, np.random.default_rng(seed))[1] for seed in range(300)]
    assert all(0.3 <= info["beta"] <= 1.5 for info in infos)
    airlights = np.stack([info["A"] for info in infos])
    assert airlights.min() >= 0.225 and airlights.max() <= 1.025
    assert (airlights.max(axis=1) - airlights.min(axis=1)).max() <= 0.05
    assert airlights.mean() == pytest.approx(0.625, abs=0.05)
    for key, bounds in (("gamma", (1.5, 3.0)), ("noise_sigma", (2 / 255, 25 / 255)), ("jpeg_quality", (30, 95))):
        drawn = [info[key] for info in infos if info[key] is not None]
        assert 0.4 <= len(drawn) / len(infos) <= 0.6, key
        assert bounds[0] <= min(drawn) and max(drawn) <= bounds[1], key
    assert {info["noise_kind"] for info in infos} == {None, "color", "gray", "correlated"}


def _noise_sample(kind: str) -> tuple[np.ndarray, float]:
    clean01 = constant_image(0.5, 96, 96)
    for seed in range(200):
        noisy, sigma, got = add_gaussian_noise(clean01, np.random.default_rng(seed))
        if got == kind:
            return noisy - clean01, sigma
    raise AssertionError(f"no seed gave {kind} noise")


def test_color_noise_is_independent_per_channel_with_std_sigma() -> None:
    noise, sigma = _noise_sample("color")
    stds = noise.reshape(-1, 3).std(axis=0)
    assert stds == pytest.approx([sigma] * 3, rel=0.1)
    assert abs(np.corrcoef(noise.reshape(-1, 3).T)[0, 1]) < 0.1


def test_gray_noise_is_shared_by_channels() -> None:
    noise, sigma = _noise_sample("gray")
    np.testing.assert_allclose(noise[..., 0], noise[..., 2], atol=1e-6)
    assert noise[..., 0].std() == pytest.approx(sigma, rel=0.1)


def test_correlated_noise_is_bounded_by_max_level() -> None:
    noise, sigma = _noise_sample("correlated")
    assert sigma == pytest.approx(25 / 255)
    stds = noise.reshape(-1, 3).std(axis=0)
    assert stds.max() <= sigma * 1.1 and stds.max() > 0


def test_jpeg_compress_is_close_and_8bit() -> None:
    gradient = np.linspace(0, 1, 32 * 32 * 3).reshape(32, 32, 3)
    out = jpeg_compress(gradient, quality=95)
    assert out.dtype == np.float32 and out.shape == gradient.shape
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)
    assert np.abs(out - gradient).mean() < 0.02
    assert np.abs(jpeg_compress(gradient, quality=30) - gradient).mean() > np.abs(out - gradient).mean()


def test_depth_proxy_is_normalised_and_far_at_top() -> None:
    depth01 = depth_proxy(constant_image(0.5, 40, 30))
    assert depth01.shape == (40, 30) and depth01.min() == 0.0 and depth01.max() == pytest.approx(1.0)
    assert np.all(np.diff(depth01.mean(axis=1)) > 0)
    bright_left = constant_image(0.2, 40, 30)
    bright_left[:, :15] = 0.9
    rows = depth_proxy(bright_left)[20]
    assert rows[:5].mean() < rows[-5:].mean()  # bright (sky-like) regions read as farther


def test_degrade_rejects_mismatched_depth() -> None:
    with pytest.raises(ValueError, match="depth shape"):
        degrade(constant_image(0.5), np.zeros((4, 4)), np.random.default_rng(0))
