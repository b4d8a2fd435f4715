"""Peak-memory estimate of tiled inference and the inference.max_memory_gb check (pipelines.memory)."""
from __future__ import annotations

import re

import pytest
import torch

from pipelines.memory import (BYTES_PER_PIXEL, CANDIDATES, MSSSIM_COEF, MSSSIM_HALO, VAE_VJP_COEF, LiveTensorBytes,
                              ModelSize, TileSettings, check_fits, estimate_peak_gb, fitting_settings, largest_pixels)

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
    with pytest.raises(ValueError, match=r"no tile setting fits; .*inference.max_pixels=(\d+)") as err:
        check_fits(FULL, EIGHT_K, "accsamp", TileSettings(), limit_gb=5.0)
    side = round(int(re.search(r"inference.max_pixels=(\d+)", str(err.value)).group(1)) ** 0.5)
    assert side % 64 == 0 and side >= 1024  # the largest 64-multiple square that fits with the smallest tiles
    assert estimate_peak_gb(FULL, (side, side), "accsamp", CANDIDATES[-1]) <= 5.0
    assert estimate_peak_gb(FULL, (side + 64, side + 64), "accsamp", CANDIDATES[-1]) > 5.0


def test_largest_pixels_is_where_the_estimate_reaches_the_limit():
    tiles = TileSettings()
    most = largest_pixels(FULL, "stage2", tiles, 24.0)
    square = int(most ** 0.5)
    assert estimate_peak_gb(FULL, (square, square), "stage2", tiles) <= 24.0 < estimate_peak_gb(
        FULL, (square + 64, square + 64), "stage2", tiles)


def test_live_tensor_bytes_counts_storages_while_alive():
    meta = torch.device("meta")
    before = torch.empty(10_000, device=meta)  # made outside: not counted
    with LiveTensorBytes() as count:
        a = torch.empty(1000, device=meta)  # 4000 B
        b = torch.empty(500, dtype=torch.float16, device=meta)  # 1000 B
        a[:10].add_(before[:10])  # a view and an in-place op: no new storage
        del b
        c = torch.empty(250, device=meta)  # 1000 B, after b was freed
        assert count.live == 5000
        grad_leaf = torch.empty(100, device=meta).requires_grad_(True)  # 400 B
        (grad_leaf.exp() * 2).sum().backward()  # exp's output is kept for backward until the graph is freed
    held = 4000 + 1000 + 400 + 400 + 400  # a, c, the leaf, exp's output (saved for backward), the product
    assert held <= count.peak <= held + 4 + 2 * 400  # + the sum and at most two gradient temporaries
    assert count.live == 4000 + 1000 + 400 + 400  # a, c, grad_leaf and its .grad
    del a, c
