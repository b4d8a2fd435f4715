import numpy as np
import pytest
import torch

from haze.dcp import (dark_channel, dcp_dehaze, default_guided_radius, estimate_airlight, estimate_transmission,
                      transmission)
from haze.filters import box_mean, guided_filter, min_filter

T_TRUE = 0.6
A_TRUE = (0.9, 0.85, 0.8)
SKY_ROWS = 12


def _clean_zero_dark(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1,3,H,W) scene whose every pixel has one zero channel (dark channel exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    img = 0.3 + 0.7 * torch.rand(1, 3, h, w, generator=g)
    block = 8
    zero_ch = torch.randint(0, 3, (h // block + 1, w // block + 1), generator=g)
    zero_ch = zero_ch.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
    for c in range(3):
        img[0, c][zero_ch == c] = 0.0
    return img


def _synthetic_hazy(h: int = 96, w: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Hazy I = J t + A (1 - t) with constant t, plus a sky band (rows < SKY_ROWS) where I = A."""
    clean = _clean_zero_dark(h, w)
    a = torch.tensor(A_TRUE).view(1, 3, 1, 1)
    hazy = clean * T_TRUE + a * (1 - T_TRUE)
    hazy[..., :SKY_ROWS, :] = a
    return hazy, clean


def test_min_filter_matches_direct_loop() -> None:
    x = torch.rand(2, 1, 9, 7)
    out = min_filter(x, 5)
    xn = x.numpy()
    for i in range(9):
        for j in range(7):
            win = xn[:, :, max(0, i - 2): i + 3, max(0, j - 2): j + 3]
            assert np.allclose(out[:, :, i, j].numpy(), win.min(axis=(2, 3)))
    with pytest.raises(ValueError):
        min_filter(x, 4)


def test_dark_channel_and_airlight_and_transmission_recover_truth() -> None:
    hazy, clean = _synthetic_hazy()
    assert dark_channel(clean).abs().max() == 0.0
    dark = dark_channel(hazy)
    a_est = estimate_airlight(hazy, dark)
    assert torch.allclose(a_est, torch.tensor([A_TRUE]), atol=1e-6)
    # dark(I/A) = 1 - t where every 15x15 window avoids the sky band (rows >= SKY_ROWS + 7)
    interior = slice(SKY_ROWS + 7, None)
    t_exact = transmission(hazy, a_est, omega=1.0)
    assert torch.allclose(t_exact[..., interior, :], torch.full_like(t_exact[..., interior, :], T_TRUE), atol=1e-5)
    t_dcp = transmission(hazy, a_est)
    expected = 1 - 0.95 * (1 - T_TRUE)
    assert torch.allclose(t_dcp[..., interior, :], torch.full_like(t_dcp[..., interior, :], expected), atol=1e-5)
    assert torch.allclose(t_dcp[..., : SKY_ROWS - 7, :], torch.full_like(t_dcp[..., : SKY_ROWS - 7, :], 0.05))
    assert torch.equal(estimate_transmission(hazy), t_dcp)


def test_airlight_picks_brightest_sum_among_top_dark() -> None:
    img = torch.zeros(1, 3, 40, 50)
    img[0, :, 3, 4] = torch.tensor([0.9, 0.9, 0.5])   # dark 0.5, sum 2.3
    img[0, :, 20, 30] = torch.tensor([0.6, 0.6, 0.6])  # dark 0.6, sum 1.8
    dark = img.amin(dim=1, keepdim=True)
    # 2000 px * 0.001 = 2 candidates -> larger R+G+B wins even though its dark value is lower
    assert torch.allclose(estimate_airlight(img, dark), torch.tensor([[0.9, 0.9, 0.5]]))
    # a single candidate (at least one pixel) -> the top dark pixel
    assert torch.allclose(estimate_airlight(img, dark, top=1e-9), torch.tensor([[0.6, 0.6, 0.6]]))


def _tied_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """600 pixels share the top dark-channel value 0.5 (40x50 image, top 0.1 % = 2 pixels): the 2-pixel cut falls
    inside the tie. One tied pixel (row 20, col 25) is brighter than the others (R+G+B 2.4 vs 1.8)."""
    img = torch.zeros(1, 3, 40, 50)
    dark = torch.zeros(1, 1, 40, 50)
    dark[..., 10:30, 10:40] = 0.5
    img[..., 10:30, 10:40] = 0.6
    img[0, :, 20, 25] = torch.tensor([0.9, 0.8, 0.7])
    return img, dark


def test_airlight_tie_rule_takes_every_pixel_at_the_cut() -> None:
    img, dark = _tied_scene()
    brightest = torch.tensor([[0.9, 0.8, 0.7]])
    assert torch.equal(estimate_airlight(img, dark), brightest)
    # the tie order cannot matter: the same scene flipped / transposed gives the same colour
    for flip in ((-1,), (-2,), (-2, -1)):
        assert torch.equal(estimate_airlight(img.flip(flip), dark.flip(flip)), brightest)
    assert torch.equal(estimate_airlight(img.transpose(-2, -1), dark.transpose(-2, -1)), brightest)
    assert torch.equal(estimate_transmission(img), transmission(img, brightest))


def test_airlight_equal_brightness_first_in_row_major_order() -> None:
    img = torch.zeros(1, 3, 40, 50)
    dark = torch.zeros(1, 1, 40, 50)
    dark[..., 5, :] = 0.4                               # 50 tied candidates for 2 places
    img[0, :, 5, 30] = torch.tensor([0.5, 0.9, 0.5])    # equal R+G+B, different colours
    img[0, :, 5, 7] = torch.tensor([0.9, 0.5, 0.5])     # first in row-major order
    assert torch.equal(estimate_airlight(img, dark), torch.tensor([[0.9, 0.5, 0.5]]))
    assert torch.equal(estimate_airlight(img.flip(-1), dark.flip(-1)), torch.tensor([[0.5, 0.9, 0.5]]))


def test_airlight_published_topk_rule_stays_reachable() -> None:
    img, dark = _tied_scene()
    n = 2
    idx = dark.reshape(1, -1).topk(n, dim=1).indices[0]
    cand = img.reshape(3, -1)[:, idx]
    expected = cand[:, cand.sum(dim=0).argmax()][None]
    assert torch.equal(estimate_airlight(img, dark, ties="topk"), expected)
    # without ties at the cut both rules agree
    hazy, _ = _synthetic_hazy()
    d = dark_channel(hazy)
    assert torch.equal(estimate_airlight(hazy, d, ties="topk"), estimate_airlight(hazy, d))
    with pytest.raises(ValueError, match="ties"):
        estimate_airlight(img, dark, ties="first")


def _direct_guided_filter(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> np.ndarray:
    h, w = guide.shape

    def box(m: np.ndarray) -> np.ndarray:
        out = np.empty_like(m)
        for i in range(h):
            for j in range(w):
                out[i, j] = m[max(0, i - r): i + r + 1, max(0, j - r): j + r + 1].mean()
        return out

    mi, mp = box(guide), box(src)
    a = (box(guide * src) - mi * mp) / (box(guide * guide) - mi * mi + eps)
    b = mp - a * mi
    return box(a) * guide + box(b)


def test_guided_filter_matches_direct_formula() -> None:
    rng = np.random.default_rng(1)
    guide = rng.random((11, 13))
    src = rng.random((11, 13))
    expected = _direct_guided_filter(guide, src, 2, 1e-2)
    out = guided_filter(torch.from_numpy(guide)[None, None], torch.from_numpy(src)[None, None], 2, 1e-2)
    assert np.allclose(out[0, 0].numpy(), expected, atol=1e-10)


def test_box_mean_large_radius_is_global_mean() -> None:
    x = torch.rand(1, 2, 7, 5, dtype=torch.float64)
    assert torch.allclose(box_mean(x, 10), x.mean(dim=(2, 3), keepdim=True).expand_as(x))


@pytest.mark.parametrize("channels", [1, 3])
def test_guided_filter_preserves_linear_function_of_guide(channels: int) -> None:
    guide = torch.rand(2, channels, 20, 24, dtype=torch.float64)
    coef = torch.tensor([0.3, 0.5, 0.2][:channels], dtype=torch.float64).view(1, channels, 1, 1) * 2
    src = (guide * coef).sum(dim=1, keepdim=True) + 0.1
    out = guided_filter(guide, src, 3, 1e-10)
    assert torch.allclose(out, src, atol=1e-6)


def test_dcp_dehaze_recovers_clean_away_from_sky() -> None:
    hazy, clean = _synthetic_hazy()
    radius = 4
    j01, t, a = dcp_dehaze(hazy, omega=1.0, radius=radius)
    assert torch.allclose(a, torch.tensor([A_TRUE]), atol=1e-6)
    far = slice(SKY_ROWS + 7 + 2 * radius, None)
    assert torch.allclose(t[..., far, :], torch.full_like(t[..., far, :], T_TRUE), atol=1e-4)
    assert torch.allclose(j01[..., far, :], clean[..., far, :], atol=1e-3)
    assert t.min() >= 0.1 and j01.min() >= 0 and j01.max() <= 1


def test_default_radius_scales_for_small_images() -> None:
    assert default_guided_radius(400, 600) == 60
    assert default_guided_radius(2000, 3000) == 60
    assert default_guided_radius(100, 300) == 15
    assert default_guided_radius(2, 2) == 1


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="img01"):
        dark_channel(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="airlight"):
        transmission(torch.rand(2, 3, 8, 8), torch.rand(1, 3))
