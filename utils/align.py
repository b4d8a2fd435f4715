"""AlignOp of "Learning Hazing to Dehazing" (CVPR 2025): patch-wise statistics transfer.

For every patch (37x37, stride 10) and channel, the content patch x is whitened and given the
reference statistics, (x - mu_x) / sigma_x * sigma_r + mu_r with sigma = sqrt(biased var + 1e-6);
overlapping patch results are averaged per pixel.

Patch grid. The published operator places patches at 0, stride, 2*stride, ... while
pos + patch <= size, so a bottom/right margin not covered by any full patch is 0 in its output.
``cover_border=False`` reproduces that. ``cover_border=True`` (our default) adds a patch flush
with the bottom/right border (at size - patch) when the grid does not end there, so every
pixel is covered. Along a side shorter than the patch, the patch is clipped to that side
(a single patch spanning the image), for both settings.

``align_op`` is the O(HW) path (integral images + difference arrays, float64 accumulation);
``align_op_reference`` materialises every patch, like the published unfold/fold code, and is
meant for tests and benchmarks only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _grid(size: int, patch: int, stride: int, cover_border: bool) -> tuple[int, list[int]]:
    """Effective patch length along one side and the patch start positions."""
    p = min(patch, size)
    starts = list(range(0, size - p + 1, stride))
    if cover_border and starts[-1] != size - p:
        starts.append(size - p)
    return p, starts


def _check(x_pm1: torch.Tensor, ref_pm1: torch.Tensor, patch: int, stride: int) -> None:
    if x_pm1.ndim != 4 or x_pm1.shape != ref_pm1.shape:
        raise ValueError(
            f"x_pm1 and ref_pm1 must be (B,C,H,W) of equal shape, got {tuple(x_pm1.shape)} and {tuple(ref_pm1.shape)}"
        )
    if not x_pm1.is_floating_point() or not ref_pm1.is_floating_point():
        raise TypeError(f"x_pm1 and ref_pm1 must be floating point, got {x_pm1.dtype} and {ref_pm1.dtype}")
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1, got {patch} and {stride}")


def align_op_reference(
    x_pm1: torch.Tensor,
    ref_pm1: torch.Tensor,
    patch: int = 37,
    stride: int = 10,
    cover_border: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Direct AlignOp: gathers all patches (B,C,nY,nX,p,p), aligns each, scatter-averages.

    x_pm1: content (B,C,H,W) in [-1,1]; ref_pm1: reference (B,C,H,W) in [-1,1].
    Returns (B,C,H,W) in x_pm1's dtype; pixels covered by no patch are 0. Memory grows with
    (patch/stride)^2 * H * W, so use it for tests and benchmarks only.
    """
    _check(x_pm1, ref_pm1, patch, stride)
    b, c, h, w = x_pm1.shape
    dev = x_pm1.device
    ph, ys = _grid(h, patch, stride, cover_border)
    pw, xs = _grid(w, patch, stride, cover_border)
    iy = (torch.tensor(ys, device=dev)[:, None] + torch.arange(ph, device=dev))[:, None, :, None]
    ix = (torch.tensor(xs, device=dev)[:, None] + torch.arange(pw, device=dev))[None, :, None, :]
    xp = x_pm1[:, :, iy, ix]
    rp = ref_pm1.to(x_pm1.dtype)[:, :, iy, ix]
    mu_x = xp.mean(dim=(-2, -1), keepdim=True)
    mu_r = rp.mean(dim=(-2, -1), keepdim=True)
    sd_x = ((xp - mu_x) ** 2).mean(dim=(-2, -1), keepdim=True).add(eps).sqrt()
    sd_r = ((rp - mu_r) ** 2).mean(dim=(-2, -1), keepdim=True).add(eps).sqrt()
    aligned = (xp - mu_x) / sd_x * sd_r + mu_r
    iy_full, ix_full = torch.broadcast_tensors(iy, ix)
    total = torch.zeros(h, w, b, c, dtype=x_pm1.dtype, device=dev)
    total.index_put_((iy_full, ix_full), aligned.permute(2, 3, 4, 5, 0, 1), accumulate=True)
    count = torch.zeros(h, w, dtype=x_pm1.dtype, device=dev)
    count.index_put_((iy_full, ix_full), torch.ones_like(iy_full, dtype=x_pm1.dtype), accumulate=True)
    return (total / count.clamp_min(1.0)[:, :, None, None]).permute(2, 3, 0, 1).contiguous()


def _window_sums(planes: torch.Tensor, ys: torch.Tensor, ph: int, xs: torch.Tensor, pw: int) -> torch.Tensor:
    """Sums of (N,H,W) float64 planes over the ph x pw windows starting at ys x xs -> (N,nY,nX)."""
    cy = F.pad(planes, (0, 0, 1, 0)).cumsum_(dim=1)
    rows = cy.index_select(1, ys + ph) - cy.index_select(1, ys)
    cx = F.pad(rows, (1, 0)).cumsum_(dim=2)
    return cx.index_select(2, xs + pw) - cx.index_select(2, xs)


def _spread(coef: torch.Tensor, ys: torch.Tensor, ph: int, h: int, xs: torch.Tensor, pw: int, w: int) -> torch.Tensor:
    """Per pixel, the sum of (N,nY,nX) patch coefficients over all patches covering it -> (N,H,W).

    Separable difference arrays: +coef at a window start, -coef one past its end, then cumsum.
    """
    n, _, nx = coef.shape
    dy = coef.new_zeros(n, h + 1, nx)
    dy.index_add_(1, ys, coef)
    dy.index_add_(1, ys + ph, -coef)
    rows = dy.cumsum_(dim=1)[:, :h]
    dx = coef.new_zeros(n, h, w + 1)
    dx.index_add_(2, xs, rows)
    dx.index_add_(2, xs + pw, -rows)
    return dx.cumsum_(dim=2)[:, :, :w]


def _cover_count(size: int, starts: torch.Tensor, p: int) -> torch.Tensor:
    """Number of windows [s, s+p) covering each index of a side of length ``size`` -> (size,)."""
    d = torch.zeros(size + 1, dtype=torch.float64, device=starts.device)
    ones = torch.ones(starts.numel(), dtype=torch.float64, device=starts.device)
    d.index_add_(0, starts, ones)
    d.index_add_(0, starts + p, -ones)
    return d.cumsum_(dim=0)[:size]


def align_op(
    x_pm1: torch.Tensor,
    ref_pm1: torch.Tensor,
    patch: int = 37,
    stride: int = 10,
    cover_border: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """AlignOp in O(HW) time and memory, equal to ``align_op_reference`` up to rounding.

    Per patch the alignment is affine, x -> a x + b with a = sigma_r / sigma_x and
    b = mu_r - a mu_x, so the averaged output is x * sum(a) / n + sum(b) / n over the n patches
    covering a pixel. Patch means/variances come from float64 integral images; the sums of a
    and b are spread with difference arrays, one (batch, channel) plane at a time.
    x_pm1: content (B,C,H,W) in [-1,1] (hazy image); ref_pm1: reference (B,C,H,W) in [-1,1]
    (decoded x0 prediction). Returns (B,C,H,W) in x_pm1's dtype; uncovered pixels are 0.
    """
    _check(x_pm1, ref_pm1, patch, stride)
    b, c, h, w = x_pm1.shape
    dev = x_pm1.device
    ph, ys_list = _grid(h, patch, stride, cover_border)
    pw, xs_list = _grid(w, patch, stride, cover_border)
    ys = torch.tensor(ys_list, device=dev)
    xs = torch.tensor(xs_list, device=dev)
    area = float(ph * pw)
    count = _cover_count(h, ys, ph)[:, None] * _cover_count(w, xs, pw)[None, :]
    inv_count = 1.0 / count.clamp_min(1.0)
    out = torch.empty_like(x_pm1)
    for bi in range(b):
        for ci in range(c):
            xd = x_pm1[bi, ci].double()
            rd = ref_pm1[bi, ci].double()
            mu_x, ex2 = (_window_sums(torch.stack([xd, xd * xd]), ys, ph, xs, pw) / area).unbind(0)
            mu_r, er2 = (_window_sums(torch.stack([rd, rd * rd]), ys, ph, xs, pw) / area).unbind(0)
            del rd
            sd_x = ((ex2 - mu_x * mu_x).clamp_min(0.0) + eps).sqrt()
            sd_r = ((er2 - mu_r * mu_r).clamp_min(0.0) + eps).sqrt()
            a = sd_r / sd_x
            sum_a, sum_b = _spread(torch.stack([a, mu_r - a * mu_x]), ys, ph, h, xs, pw, w).unbind(0)
            out[bi, ci] = (xd.mul_(sum_a).add_(sum_b).mul_(inv_count)).to(x_pm1.dtype)
    return out
