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

``align_op`` is the O(HW) path (separable float64 window means on the patch grid + difference
arrays over runs of pixels sharing their covering patches);
``align_op_reference`` materialises every patch, like the published unfold/fold code, and is
meant for tests and benchmarks only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_grid(size: int, patch: int, stride: int, cover_border: bool) -> tuple[int, list[int]]:
    """Patch length along one side of length ``size`` (clipped to ``size``) and the patch
    start positions: 0, stride, ... while start + patch <= size, plus size - patch when
    ``cover_border`` and the grid does not already end there."""
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
    ph, ys = patch_grid(h, patch, stride, cover_border)
    pw, xs = patch_grid(w, patch, stride, cover_border)
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


def _window_means_1d(planes: torch.Tensor, starts: list[int], p: int, stride: int, dim: int) -> torch.Tensor:
    """Means of (N,H,W) planes over windows [s, s+p) along ``dim`` (1 or 2) for s in ``starts``.

    The regular grid 0, stride, ... is an average pool; a border-flush window is appended."""
    size = planes.shape[dim]
    n_regular = (size - p) // stride + 1
    kernel = (p, 1) if dim == 1 else (1, p)
    step = (stride, 1) if dim == 1 else (1, stride)
    means = F.avg_pool2d(planes, kernel_size=kernel, stride=step)
    if len(starts) > n_regular:
        means = torch.cat([means, planes.narrow(dim, size - p, p).mean(dim=dim, keepdim=True)], dim=dim)
    return means


class _Segments:
    """Runs of one image side over which the set of covering patches is constant."""

    def __init__(self, size: int, starts: list[int], p: int, device: torch.device) -> None:
        cuts = sorted({0, size, *starts, *(s + p for s in starts)})
        where = {v: k for k, v in enumerate(cuts)}
        self.count = len(cuts) - 1
        self.lengths = torch.tensor([b - a for a, b in zip(cuts, cuts[1:])], device=device)
        self.first = torch.tensor([where[s] for s in starts], device=device)
        self.stop = torch.tensor([where[s + p] for s in starts], device=device)

    def sum_covering(self, coef: torch.Tensor, dim: int) -> torch.Tensor:
        """Per segment, the sum of ``coef`` over the patches covering it, along ``dim``."""
        shape = list(coef.shape)
        shape[dim] = self.count + 1
        diff = coef.new_zeros(shape)
        diff.index_add_(dim, self.first, coef)
        diff.index_add_(dim, self.stop, -coef)
        return diff.cumsum_(dim=dim).narrow(dim, 0, self.count)

    def expand(self, coarse: torch.Tensor, dim: int) -> torch.Tensor:
        """Repeat each segment entry of ``coarse`` along ``dim`` over the pixels of its run."""
        return coarse.repeat_interleave(self.lengths, dim=dim, output_size=int(self.lengths.sum()))


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
    covering a pixel. Patch means of x, x^2, r, r^2 are separable float64 window means on
    the patch grid (no per-patch tensors). The patch borders cut each side into runs over
    which the covering set is constant; sum(a)/n and sum(b)/n are computed per run with
    difference arrays and expanded to pixels, so only a few full-size tensors are made.
    x_pm1: content (B,C,H,W) in [-1,1] (hazy image); ref_pm1: reference (B,C,H,W) in [-1,1]
    (decoded x0 prediction). Returns (B,C,H,W) in x_pm1's dtype; uncovered pixels are 0.
    Not differentiable (AccSamp applies it to detached tensors): raises ValueError when
    autograd is enabled and an input requires grad.
    """
    _check(x_pm1, ref_pm1, patch, stride)
    if torch.is_grad_enabled() and (x_pm1.requires_grad or ref_pm1.requires_grad):
        raise ValueError("align_op is not differentiable; pass detached tensors or use torch.no_grad()")
    b, c, h, w = x_pm1.shape
    dev = x_pm1.device
    ph, ys = patch_grid(h, patch, stride, cover_border)
    pw, xs = patch_grid(w, patch, stride, cover_border)
    seg_y = _Segments(h, ys, ph, dev)
    seg_x = _Segments(w, xs, pw, dev)
    buf = torch.empty(2, h, w, dtype=torch.float64, device=dev)

    def moments(plane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buf[0].copy_(plane)
        torch.mul(buf[0], buf[0], out=buf[1])
        means = _window_means_1d(_window_means_1d(buf, ys, ph, stride, 1), xs, pw, stride, 2)
        mean, mean_sq = means.unbind(0)
        return mean, ((mean_sq - mean * mean).clamp_min(0.0) + eps).sqrt()

    coefs = []
    for bi in range(b):
        for ci in range(c):
            mu_x, sd_x = moments(x_pm1[bi, ci])
            mu_r, sd_r = moments(ref_pm1[bi, ci])
            a = sd_r / sd_x
            coefs.append(torch.stack([a, mu_r - a * mu_x]))
    coef = torch.stack(coefs).flatten(0, 1)
    ones = coef.new_ones(1, *coef.shape[1:])
    sums = seg_x.sum_covering(seg_y.sum_covering(torch.cat([coef, ones]), 1), 2)
    n = sums[-1]
    per_run = (sums[:-1] * torch.where(n > 0, 1.0 / n.clamp_min(1.0), 0.0)).to(x_pm1.dtype)
    per_run = per_run.view(b, c, 2, seg_y.count, seg_x.count)
    out = torch.empty_like(x_pm1)
    for bi in range(b):
        for ci in range(c):
            gain, offset = seg_y.expand(seg_x.expand(per_run[bi, ci], 2), 1).unbind(0)
            torch.addcmul(offset, x_pm1[bi, ci], gain, out=out[bi, ci])
    return out
