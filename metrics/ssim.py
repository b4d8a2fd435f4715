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


def _ssim_maps(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, c1: float,
               c2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Luminance and contrast-structure maps (B,C,H−k+1,W−k+1) for the 1-D window ``g`` of k taps."""
    mu_x = _blur_valid(x, g)
    mu_y = _blur_valid(y, g)
    var_x = _blur_valid(x * x, g) - mu_x * mu_x
    var_y = _blur_valid(y * y, g) - mu_y * mu_y
    cov = _blur_valid(x * y, g) - mu_x * mu_y
    cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
    lum_map = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return lum_map, cs_map


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, data_range: float, window_size: int,
             sigma: float, k1: float, k2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and mean contrast-structure term, both (B,)."""
    size = min(window_size, x.shape[-2], x.shape[-1])
    g = gaussian_window(size, sigma, dtype=x.dtype, device=x.device)
    lum_map, cs_map = _ssim_maps(x, y, g, (k1 * data_range) ** 2, (k2 * data_range) ** 2)
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


def _owned(start: int, stop: int, size: int, levels: int, window_size: int) -> tuple[list[tuple[int, int]], int]:
    """Along one side of length ``size``: for the tile core [start, stop) (``start`` a multiple of 2^(levels−1);
    ``stop`` too, or ``size``), the map positions it owns at each scale, [a_j, b_j) in scale-j coordinates, and the
    end of the input rows it needs (the core plus the valid-window halo of every scale, at most ``size``)."""
    owned, need = [], start
    for j in range(levels):
        n_j = size >> j
        valid = n_j - window_size + 1
        a = start >> j
        b = valid if stop == size else min(stop >> j, valid)
        owned.append((a, max(a, b)))
        if b > a:
            need = max(need, (b + window_size - 1) << j)
    return owned, min(size, need)


def ms_ssim_grad_tiled(x: torch.Tensor, y: torch.Tensor, tile: int, data_range: float = 1.0,
                       weights: Sequence[float] = MS_SSIM_WEIGHTS, normalize: bool = False,
                       window_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
                       k2: float = 0.03) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ms_ssim` per image (B,) and its gradient ∂ms_ssim/∂x (B,C,H,W), computed over tiles of ``x``.

    x, y: (B,C,H,W), values in a range of width ``data_range``. MS-SSIM is a product of per-scale means of local
    maps, m_j = mean of map_j, so ∂MS/∂x = Σ_j ∂MS/∂m_j · ∂m_j/∂x, and ∂m_j/∂x is a sum over map positions of
    gradients that each depend on one window. Two passes over tiles whose cores (``tile``² pixels, rounded up to a
    multiple of 2^(M−1) = 16 so every tile sees the same pooling grid as the whole image) partition the map
    positions of every scale:
    1. the sums of each scale's map over the positions the tile owns -> the global means m_j, MS and ∂MS/∂m_j;
    2. per tile, autograd of Σ_j ∂MS/∂m_j · (sum of map_j over the owned positions) / count_j on the core plus its
       halo (the rows/columns the owned windows reach: 10·2^j px at scale j, 160 px at the coarsest), added to the
       gradient.
    Every map value is computed from the same pixels with the same operations as in the untiled function, so the
    result equals autograd of :func:`ms_ssim` up to floating-point summation order (the means are accumulated in
    float64). Working memory is that of one tile plus the (B,C,H,W) gradient. Needs every scale's side to be at
    least ``window_size`` (min(H, W) >= window_size·2^(M−1)); smaller images fall back to plain autograd, as do
    images that fit in one tile.
    """
    _check_pair(x, y)
    levels = len(weights)
    if levels < 1 or tile < 1:
        raise ValueError(f"need at least one scale and tile >= 1, got {levels} scales, tile {tile}")
    h, w = x.shape[-2:]
    unit = 1 << (levels - 1)
    core = -(-tile // unit) * unit
    if min(h, w) < window_size * unit or (h <= core and w <= core):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            value = ms_ssim(leaf, y, data_range, weights, normalize, window_size, sigma, k1, k2)
            (grad,) = torch.autograd.grad(value.sum(), leaf)
        return value.detach(), grad
    g = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    rows = [_owned(a, min(a + core, h), h, levels, window_size) for a in range(0, h, core)]
    cols = [_owned(a, min(a + core, w), w, levels, window_size) for a in range(0, w, core)]
    starts_y, starts_x = range(0, h, core), range(0, w, core)

    def owned_sums(xc: torch.Tensor, yc: torch.Tensor, oy: list, ox: list, y0: int, x0: int) -> list:
        """Per scale: sum over the tile's owned positions of the scale's map, (B,) (None where it owns none)."""
        sums = []
        for j in range(levels):
            if j > 0:
                xc, yc = _pool2(xc), _pool2(yc)
            (a_y, b_y), (a_x, b_x) = oy[j], ox[j]
            if b_y <= a_y or b_x <= a_x:
                sums.append(None)
                continue
            lum, cs = _ssim_maps(xc, yc, g, c1, c2)
            m = lum * cs if j == levels - 1 else cs
            sy, sx = a_y - (y0 >> j), a_x - (x0 >> j)
            sums.append(m[..., sy: sy + b_y - a_y, sx: sx + b_x - a_x].sum(dim=(1, 2, 3)))
        return sums

    def tiles():
        """Tiles that own map positions (a core narrower than the window owns none at any scale)."""
        for y0, (oy, ey) in zip(starts_y, rows):
            for x0, (ox, ex) in zip(starts_x, cols):
                if oy[0][1] > oy[0][0] and ox[0][1] > ox[0][0]:
                    yield (slice(y0, ey), slice(x0, ex)), oy, ox, y0, x0

    totals = torch.zeros(levels, x.shape[0], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for (sy, sx), oy, ox, y0, x0 in tiles():
            for j, part in enumerate(owned_sums(x[..., sy, sx], y[..., sy, sx], oy, ox, y0, x0)):
                if part is not None:
                    totals[j] += part.double()
    counts = [x.shape[1] * ((h >> j) - window_size + 1) * ((w >> j) - window_size + 1) for j in range(levels)]
    means = totals / torch.tensor(counts, dtype=torch.float64, device=x.device)[:, None]
    wts = torch.as_tensor(list(weights), dtype=torch.float64, device=x.device)[:, None]
    v = (means + 1.0) / 2.0 if normalize else means
    floored = v.clamp_min(_POW_FLOOR)
    value = floored.pow(wts).prod(dim=0)
    # ∂MS/∂m_j = MS · w_j / v_j · dv/dm (½ when normalised), zero where the floor is active (as clamp_min's gradient)
    d_mean = value * wts / floored * (0.5 if normalize else 1.0) * (v >= _POW_FLOOR)
    coef = (d_mean / torch.tensor(counts, dtype=torch.float64, device=x.device)[:, None]).to(x.dtype)
    grad = torch.zeros_like(x)
    for (sy, sx), oy, ox, y0, x0 in tiles():
        with torch.enable_grad():
            leaf = x[..., sy, sx].detach().requires_grad_(True)
            parts = owned_sums(leaf, y[..., sy, sx], oy, ox, y0, x0)
            objective = sum((coef[j] * part).sum() for j, part in enumerate(parts) if part is not None)
            (tile_grad,) = torch.autograd.grad(objective, leaf)
        grad[..., sy, sx] += tile_grad
    return value.to(x.dtype), grad
