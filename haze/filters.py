"""Image filters shared by the DCP (haze.dcp), the fog analyser (haze.fog) and the region labels of the cycle loss
(haze.regions): all take (B,C,H,W) float maps and keep their size."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def min_filter(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Square ``patch``x``patch`` minimum filter of (B,C,H,W), same size output.

    Implemented as -max_pool2d(-x) on an edge-replicated pad of patch//2, so border pixels
    take the minimum over the part of the window inside the image. ``patch`` must be odd.
    """
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch must be a positive odd integer, got {patch}")
    if patch == 1:
        return x
    r = patch // 2
    padded = F.pad(-x, (r, r, r, r), mode="replicate")
    return -F.max_pool2d(padded, kernel_size=patch, stride=1)


def sobel(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives of a single-channel map y: (B,1,H,W) -> (gx, gy), each (B,1,H,W).

    Kernels are divided by 8 so a step of height h gives a magnitude of h/2; replicate padding.
    Differentiable.
    """
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=y.dtype, device=y.device) / 8.0
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)
    g = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernels)
    return g[:, :1], g[:, 1:]


def _box_sum_1d(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Sum over the window [i-r, i+r] ∩ [0, n) along ``dim`` via a float64 cumulative sum."""
    n = x.shape[dim]
    c = torch.cumsum(x.double(), dim=dim)
    c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim=dim)
    i = torch.arange(n, device=x.device)
    hi = (i + r + 1).clamp(max=n)
    lo = (i - r).clamp(min=0)
    return c.index_select(dim, hi) - c.index_select(dim, lo)


def box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 window around each pixel of (B,C,H,W), window clipped at the
    image border (divided by the number of pixels inside). O(HW) for any radius."""
    h, w = x.shape[-2:]
    s = _box_sum_1d(_box_sum_1d(x, r, dim=-2), r, dim=-1)
    ones_h = _box_sum_1d(torch.ones(h, 1, device=x.device), r, dim=0)
    ones_w = _box_sum_1d(torch.ones(1, w, device=x.device), r, dim=1)
    return (s / (ones_h * ones_w)).to(x.dtype)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Guided filter (He et al., ECCV 2010 / TPAMI 2013).

    guide: (B,1,H,W) or (B,3,H,W) (colour guided filter); src: (B,1,H,W).
    Windows are (2*radius+1)^2, clipped at the borders. Returns (B,1,H,W).
    """
    if guide.ndim != 4 or guide.shape[1] not in (1, 3):
        raise ValueError(f"guide must be (B,1,H,W) or (B,3,H,W), got {tuple(guide.shape)}")
    if src.ndim != 4 or src.shape[1] != 1 or src.shape[-2:] != guide.shape[-2:] or src.shape[0] != guide.shape[0]:
        raise ValueError(f"src must be (B,1,H,W) matching guide, got {tuple(src.shape)}")
    if radius < 0 or eps < 0:
        raise ValueError(f"radius and eps must be non-negative, got {radius}, {eps}")
    mean_i = box_mean(guide, radius)
    mean_p = box_mean(src, radius)
    cov_ip = box_mean(guide * src, radius) - mean_i * mean_p
    if guide.shape[1] == 1:
        var_i = box_mean(guide * guide, radius) - mean_i * mean_i
        a = cov_ip / (var_i + eps)
        b = mean_p - a * mean_i
        return box_mean(a, radius) * guide + box_mean(b, radius)
    bsz, _, h, w = guide.shape
    prod = guide.unsqueeze(2) * guide.unsqueeze(1)
    sigma = box_mean(prod.reshape(bsz, 9, h, w), radius).reshape(bsz, 3, 3, h, w)
    sigma = sigma - mean_i.unsqueeze(2) * mean_i.unsqueeze(1)
    eye = torch.eye(3, dtype=guide.dtype, device=guide.device)
    lhs = sigma.permute(0, 3, 4, 1, 2) + eps * eye
    rhs = cov_ip.permute(0, 2, 3, 1).unsqueeze(-1)
    a = torch.linalg.solve(lhs, rhs).squeeze(-1).permute(0, 3, 1, 2)
    b = mean_p - (a * mean_i).sum(dim=1, keepdim=True)
    return (box_mean(a, radius) * guide).sum(dim=1, keepdim=True) + box_mean(b, radius)
