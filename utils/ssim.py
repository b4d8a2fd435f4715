"""SSIM (Wang et al., TIP 2004) and MS-SSIM (Wang et al., Asilomar 2003), differentiable.

Inputs are (B,C,H,W) float tensors with values in a range of width ``data_range``;
outputs are per-image (B,) values. Conventions of the standard implementations:
11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, "valid" convolution (no padding),
statistics averaged over channels and positions.

Small images: when the image is smaller than the window (also after MS-SSIM downscaling)
the window becomes a square of side min(window, H, W) with the same sigma (renormalised),
so any size >= 1x1 works. MS-SSIM average-pools by 2 between scales; a side of length 1 is
not pooled.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_POW_FLOOR = 1e-8


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps centred on the middle: (size,), sums to 1.

    The 2-D SSIM window is its outer product with itself.
    """
    if size < 1 or sigma <= 0:
        raise ValueError(f"need size >= 1 and sigma > 0, got {size}, {sigma}")
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(f"x and y must be (B,C,H,W) of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not x.is_floating_point() or x.dtype != y.dtype:
        raise TypeError(f"x and y must share a floating dtype, got {x.dtype} and {y.dtype}")


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid (unpadded) convolution of (B,C,H,W) with the outer product g g^T."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, data_range: float, window_size: int,
             sigma: float, k1: float, k2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and mean contrast-structure term, both (B,)."""
    size = min(window_size, x.shape[-2], x.shape[-1])
    g = gaussian_window(size, sigma, dtype=x.dtype, device=x.device)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_x = _blur_valid(x, g)
    mu_y = _blur_valid(y, g)
    var_x = _blur_valid(x * x, g) - mu_x * mu_x
    var_y = _blur_valid(y * y, g) - mu_y * mu_y
    cov = _blur_valid(x * y, g) - mu_x * mu_y
    cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
    lum_map = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return (lum_map * cs_map).flatten(1).mean(dim=1), cs_map.flatten(1).mean(dim=1)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image. x, y: (B,C,H,W) with value range width ``data_range`` -> (B,)."""
    _check_pair(x, y)
    return _ssim_cs(x, y, data_range, window_size, sigma, k1, k2)[0]


def _pool2(x: torch.Tensor) -> torch.Tensor:
    kh = 2 if x.shape[-2] >= 2 else 1
    kw = 2 if x.shape[-1] >= 2 else 1
    return F.avg_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw))


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
            weights: Sequence[float] = MS_SSIM_WEIGHTS, normalize: bool = False,
            window_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
            k2: float = 0.03) -> torch.Tensor:
    """Multi-scale SSIM per image. x, y: (B,C,H,W) -> (B,).

    With M = len(weights) scales (2x average pooling in between), the result is
    prod_{j<M} cs_j ** w_j * ssim_M ** w_M (contrast-structure at scales 1..M-1, full SSIM
    at the coarsest). ``normalize=False`` is the textbook definition; ``normalize=True`` maps
    every per-scale value v -> (v + 1) / 2 before the product, as the published AccSamp
    guidance of "Learning Hazing to Dehazing" does. Per-scale values are floored at 1e-8
    before the fractional power, so the result and its gradient stay finite.
    """
    _check_pair(x, y)
    if len(weights) < 1:
        raise ValueError("weights must not be empty")
    w = torch.as_tensor(list(weights), dtype=x.dtype, device=x.device)
    values = []
    for scale in range(len(weights)):
        if scale > 0:
            x, y = _pool2(x), _pool2(y)
        s, cs = _ssim_cs(x, y, data_range, window_size, sigma, k1, k2)
        values.append(s if scale == len(weights) - 1 else cs)
    v = torch.stack(values, dim=1)
    if normalize:
        v = (v + 1.0) / 2.0
    return v.clamp_min(_POW_FLOOR).pow(w).prod(dim=1)
