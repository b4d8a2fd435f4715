"""Tiled denoising and tiled VAE-style maps: coverage, exactness for local maps, condition cropping, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.tiling import TiledDenoiser, blend_weights, tile_starts, tiled_apply, tiled_vjp
from tests.helpers import build_tiny, randomize_


@pytest.mark.parametrize("size,tile,stride", [(100, 32, 16), (64, 64, 32), (65, 64, 32), (200, 64, 48),
                                              (17, 5, 5), (96, 16, 8)])
def test_tile_starts_cover_range_and_end_flush(size, tile, stride):
    starts = tile_starts(size, tile, stride)
    assert starts == sorted(set(starts)) and starts[0] == 0 and starts[-1] == size - tile
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    covered = set()
    for s in starts:
        covered.update(range(s, s + tile))
    assert covered == set(range(size))


def test_tile_starts_by_hand_and_errors():
    assert tile_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert tile_starts(30, 64, 32) == [0]
    with pytest.raises(ValueError):
        tile_starts(100, 32, 0)
    with pytest.raises(ValueError):
        tile_starts(100, 32, 33)


def test_blend_weights_peak_and_symmetry():
    w = blend_weights(9, 13, torch.device("cpu"))
    assert w.shape == (1, 1, 9, 13) and (w > 0).all()
    assert w[0, 0, 4, 6] == pytest.approx(1.0)
    torch.testing.assert_close(w, w.flip(-1))
    torch.testing.assert_close(w, w.flip(-2))
    # separable Gaussian with σ = n/4: edge of a 9-long side is exp(−0.5·(4/2.25)²)
    assert w[0, 0, 0, 6].item() == pytest.approx(torch.exp(torch.tensor(-0.5 * (4 / 2.25) ** 2)).item(), rel=1e-6)


def _pointwise_model(calls: list):
    """eps = 2x + c_img + per-level features upsampled to the latent grid; c_txt must arrive uncropped."""
    def model_fn(x, t, cond):
        calls.append(tuple(x.shape[-2:]))
        assert cond["c_txt"].shape == (1, 77, 8)
        assert cond["c_img"].shape[-2:] == x.shape[-2:]
        out = 2 * x + cond["c_img"] + cond["c_txt"].mean()
        for level, feat in enumerate(cond["c_ycbcr"]):
            assert feat.shape[-2:] == (x.shape[-2] >> level, x.shape[-1] >> level)
            out = out + F.interpolate(feat[:, :4], scale_factor=2 ** level, mode="nearest")
        return out

    return model_fn


def _conditions(h: int, w: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "c_txt": torch.randn(1, 77, 8, generator=gen),
        "c_img": torch.randn(1, 4, h, w, generator=gen),
        "c_ycbcr": [torch.randn(1, 6, h >> lvl, w >> lvl, generator=gen) for lvl in range(4)],
    }


def test_tiled_denoiser_equals_untiled_for_pointwise_model_and_crops_conditions():
    h, w = 40, 56
    cond = _conditions(h, w)
    x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    full_calls, tile_calls = [], []
    expected = _pointwise_model(full_calls)(x, t, cond)
    out = TiledDenoiser(_pointwise_model(tile_calls), tile=16, stride=8)(x, t, cond)
    assert full_calls == [(40, 56)]
    assert tile_calls == [(16, 16)] * (len(tile_starts(40, 16, 8)) * len(tile_starts(56, 16, 8))) == [(16, 16)] * 24
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_tiled_denoiser_small_input_is_one_call():
    calls = []
    cond = _conditions(16, 8)
    x = torch.randn(1, 4, 16, 8)
    out = TiledDenoiser(_pointwise_model(calls), tile=16, stride=8)(x, torch.tensor([1]), cond)
    assert calls == [(16, 8)]
    torch.testing.assert_close(out, _pointwise_model([])(x, torch.tensor([1]), cond))


def _block_encoder(img: torch.Tensor) -> torch.Tensor:
    """VAE-encoder-like local map: 8×8 mean pooling then a pointwise nonlinearity (scale 1/8)."""
    return torch.tanh(F.avg_pool2d(img, 8) * 3)


def _block_decoder(z: torch.Tensor) -> torch.Tensor:
    """VAE-decoder-like local map: pointwise nonlinearity then nearest ×8 upsampling (scale 8)."""
    return F.interpolate(torch.sin(z[:, :3] * 2), scale_factor=8, mode="nearest")


def test_tiled_apply_equals_untiled_for_local_maps():
    gen = torch.Generator().manual_seed(2)
    img = torch.rand(1, 3, 200, 136, generator=gen)
    torch.testing.assert_close(tiled_apply(_block_encoder, img, 64, 48, 1 / 8), _block_encoder(img),
                               rtol=1e-5, atol=1e-6)
    z = torch.randn(1, 4, 25, 17, generator=gen)
    torch.testing.assert_close(tiled_apply(_block_decoder, z, 8, 6, 8), _block_decoder(z), rtol=1e-5, atol=1e-6)


def test_tiled_apply_is_differentiable_with_untiled_gradient():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 25, 17, generator=gen, requires_grad=True)
    v = torch.randn(1, 3, 200, 136, generator=gen)
    (g_tiled,) = torch.autograd.grad((tiled_apply(_block_decoder, z, 8, 6, 8) * v).sum(), z)
    (g_full,) = torch.autograd.grad((_block_decoder(z) * v).sum(), z)
    assert g_full.abs().max() > 0
    torch.testing.assert_close(g_tiled, g_full, rtol=1e-4, atol=1e-5)


def test_tiled_tiny_controlldm_stays_close_to_untiled():
    torch.manual_seed(0)
    model = build_tiny(seed=0)
    randomize_(model.unet, seed=1)
    randomize_(model.controlnet, seed=2)
    model.eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 24, 32, generator=gen)
    cond = {"c_txt": torch.randn(1, 77, 32, generator=gen), "c_img": torch.randn(1, 4, 24, 32, generator=gen)}
    t = torch.tensor([400])
    with torch.no_grad():
        full = model(x, t, cond)
        tiled = TiledDenoiser(model, tile=16, stride=8)(x, t, cond)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    rel = ((tiled - full).norm() / full.norm()).item()
    assert 0 < rel < 0.2  # attention and GroupNorm see only the tile, so close but not exact


def test_tiled_vjp_equals_autograd_through_tiled_apply():
    conv = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.Tanh())
    x = torch.randn(1, 3, 20, 26)
    v = torch.randn(1, 2, 40, 52)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(tiled_apply(conv, leaf, 8, 6, 2.0), leaf, grad_outputs=v)
    got = tiled_vjp(conv, x, v, 8, 6, 2.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    small = torch.randn(1, 3, 6, 6)
    leaf = small.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(conv(leaf), leaf, grad_outputs=v[..., :12, :12])
    torch.testing.assert_close(tiled_vjp(conv, small, v[..., :12, :12], 8, 6, 2.0), expected)
