import pytest
import torch

from sampler.align import align_op, align_op_reference, patch_grid

SIZES = [(37, 37), (64, 64), (100, 100), (83, 121), (47, 47), (20, 50), (1, 1)]


def _pair(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    ref = torch.rand(2, 3, h, w, generator=g) * 1.2 - 0.4
    return x, ref


def _patch_loop(x: torch.Tensor, ref: torch.Tensor, starts_y: list[int], starts_x: list[int], p: int) -> torch.Tensor:
    """Textbook definition, one patch at a time (float64)."""
    total = torch.zeros_like(x)
    count = torch.zeros_like(x)
    for y0 in starts_y:
        for x0 in starts_x:
            xp = x[..., y0:y0 + p, x0:x0 + p]
            rp = ref[..., y0:y0 + p, x0:x0 + p]
            mx, mr = xp.mean(dim=(-2, -1), keepdim=True), rp.mean(dim=(-2, -1), keepdim=True)
            sx = (xp.var(dim=(-2, -1), unbiased=False, keepdim=True) + 1e-6).sqrt()
            sr = (rp.var(dim=(-2, -1), unbiased=False, keepdim=True) + 1e-6).sqrt()
            total[..., y0:y0 + p, x0:x0 + p] += (xp - mx) / sx * sr + mr
            count[..., y0:y0 + p, x0:x0 + p] += 1
    return total / count.clamp_min(1)


@pytest.mark.parametrize("cover_border", [True, False])
@pytest.mark.parametrize("hw", SIZES)
def test_alignop_fast_equals_patch_loop(hw: tuple[int, int], cover_border: bool) -> None:
    x, ref = _pair(*hw, seed=hw[0] * 1000 + hw[1])
    fast = align_op(x, ref, cover_border=cover_border)
    slow = align_op_reference(x.double(), ref.double(), cover_border=cover_border)
    assert fast.dtype == torch.float32 and fast.shape == x.shape
    assert torch.allclose(fast.double(), slow, atol=1e-5, rtol=0)
    assert torch.allclose(align_op_reference(x, ref, cover_border=cover_border), fast, atol=1e-5, rtol=0)


def test_reference_matches_hand_loop_on_published_grid() -> None:
    x, ref = _pair(64, 83, seed=7)
    # published grid: 0, 10, 20 (rows, 20+37 <= 64) and 0..40 (cols, 40+37 <= 83)
    expected = _patch_loop(x.double(), ref.double(), [0, 10, 20], [0, 10, 20, 30, 40], 37)
    assert torch.allclose(align_op_reference(x.double(), ref.double(), cover_border=False), expected, atol=1e-12)
    # border cover adds the flush patches at 64-37=27 and 83-37=46
    expected_cb = _patch_loop(x.double(), ref.double(), [0, 10, 20, 27], [0, 10, 20, 30, 40, 46], 37)
    assert torch.allclose(align_op(x, ref), expected_cb.float(), atol=1e-5, rtol=0)


def test_uncovered_margin_is_zero_without_border_cover() -> None:
    x, ref = _pair(64, 83, seed=11)
    out = align_op(x, ref, cover_border=False)
    assert torch.equal(out[..., 57:, :], torch.zeros_like(out[..., 57:, :]))
    assert torch.equal(out[..., :, 77:], torch.zeros_like(out[..., :, 77:]))
    assert (out[..., :57, :77] != 0).float().mean() > 0.99
    covered = align_op(x, ref, cover_border=True)
    assert torch.allclose(covered[..., :20, :20], out[..., :20, :20], atol=1e-6)
    assert (covered[..., 57:, :] != 0).float().mean() > 0.99


def test_identity_reference_returns_input() -> None:
    x, _ = _pair(83, 121, seed=5)
    assert torch.allclose(align_op(x, x), x, atol=1e-6)
    assert torch.allclose(align_op_reference(x, x), x, atol=1e-6)


def test_single_patch_gets_reference_statistics() -> None:
    x, ref = _pair(30, 25, seed=3)
    out = align_op(x.double(), ref.double())
    sx = (x.double().var(dim=(-2, -1), unbiased=False, keepdim=True) + 1e-6).sqrt()
    sr = (ref.double().var(dim=(-2, -1), unbiased=False, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(out.mean(dim=(-2, -1)), ref.double().mean(dim=(-2, -1)), atol=1e-12)
    assert torch.allclose(out.std(dim=(-2, -1), unbiased=False, keepdim=True), sr * (sx ** 2 - 1e-6).sqrt() / sx, atol=1e-9)


def test_custom_patch_and_stride() -> None:
    x, ref = _pair(51, 45, seed=9)
    fast = align_op(x, ref, patch=8, stride=3)
    expected = _patch_loop(x.double(), ref.double(), list(range(0, 44, 3)) + [43], list(range(0, 38, 3)) + [37], 8)
    assert torch.allclose(fast.double(), expected, atol=1e-5, rtol=0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        align_op(torch.rand(1, 3, 40, 40), torch.rand(1, 3, 40, 41))
    with pytest.raises(ValueError):
        align_op(torch.rand(1, 3, 40, 40), torch.rand(1, 3, 40, 40), stride=0)


def test_patch_grid_positions() -> None:
    assert patch_grid(64, 37, 10, False) == (37, [0, 10, 20])
    assert patch_grid(64, 37, 10, True) == (37, [0, 10, 20, 27])
    assert patch_grid(67, 37, 10, True) == (37, [0, 10, 20, 30])
    assert patch_grid(20, 37, 10, False) == (20, [0])


def test_rejects_inputs_requiring_grad() -> None:
    x = torch.rand(1, 3, 40, 40, requires_grad=True)
    with pytest.raises(ValueError, match="differentiable"):
        align_op(x, torch.rand(1, 3, 40, 40))
    with torch.no_grad():
        assert align_op(x, torch.rand(1, 3, 40, 40)).shape == (1, 3, 40, 40)
