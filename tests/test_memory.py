"""Peak-memory estimate of tiled inference and the inference.max_memory_gb check (utils.memory)."""
from __future__ import annotations

import pytest

from utils.memory import (BYTES_PER_PIXEL, MSSSIM_COEF, MSSSIM_HALO, VAE_VJP_COEF, ModelSize, TileSettings,
                          check_fits, estimate_peak_gb, fitting_settings)

FULL = ModelSize(weight_bytes=4_000_000_000, vae_channels=128, unet_channels=320, denoiser_element_bytes=2)
EIGHT_K = (4352, 7680)


def test_estimate_is_weights_plus_pixels_plus_largest_tile():
    tiles = TileSettings()
    need = estimate_peak_gb(FULL, EIGHT_K, "accsamp", tiles)
    by_hand = 4e9 + EIGHT_K[0] * EIGHT_K[1] * BYTES_PER_PIXEL["accsamp"] + VAE_VJP_COEF * 128 * 512 * 512
    assert need == pytest.approx(by_hand / 1e9)
    assert VAE_VJP_COEF * 128 * 512 * 512 > MSSSIM_COEF * (512 + MSSSIM_HALO) ** 2  # the decoder tile dominates
    # full-resolution part grows with the pixels, the tile part does not
    grow = estimate_peak_gb(FULL, (2 * 4352, 7680), "accsamp", tiles) - need
    assert grow == pytest.approx(4352 * 7680 * BYTES_PER_PIXEL["accsamp"] / 1e9)
    assert estimate_peak_gb(FULL, EIGHT_K, "stage2", tiles) < need  # no decoder backward without guidance


def test_check_names_settings_that_fit():
    check_fits(FULL, EIGHT_K, "accsamp", TileSettings(), limit_gb=24.0)  # fits: no error
    better = fitting_settings(FULL, EIGHT_K, "accsamp", 8.0)
    assert better is not None and better.vae_tile < 512
    assert estimate_peak_gb(FULL, EIGHT_K, "accsamp", better) <= 8.0
    with pytest.raises(ValueError) as err:
        check_fits(FULL, EIGHT_K, "accsamp", TileSettings(), limit_gb=8.0)
    msg = str(err.value)
    assert "inference.max_memory_gb=8" in msg and "7680x4352" in msg and better.overrides("accsamp") in msg
    with pytest.raises(ValueError, match=r"no tile setting fits; .*inference.max_pixels=\d+"):
        check_fits(FULL, EIGHT_K, "accsamp", TileSettings(), limit_gb=5.0)
