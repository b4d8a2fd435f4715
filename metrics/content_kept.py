"""How much of a clean photo a hazy version keeps: measures of a training pair's content, not of its haze.

A dehazer learns from pairs (hazy, clean); if the hazy image has lost the clean photo's detail or layout (a
generator that blurs or invents), the pair teaches it to invent rather than to restore. Homogeneous haze is, per
colour channel, an affine map of the clean image (``I = t J + (1 - t) A`` with constant ``t``), so:

* :func:`affine_fit_psnr`: the clean image fitted from the hazy one by the per-image least-squares affine colour
  map (3x3 matrix plus offset, over all pixels), clamped to [0,1], scored by PSNR against the clean image. Any
  homogeneous haze is undone exactly (up to clamping and quantisation); what remains is what the map cannot
  explain: depth-varying haze, blur, changed content.
* :func:`detail_kept`: the hazy image's mean gradient magnitude (forward differences over the three RGB channels)
  as a share of the clean image's. Homogeneous haze of transmission ``t`` keeps ``t``; blur lowers it
  further. It is not invariant to the haze's density: read it beside the fit.

Both take ``hazy01, clean01: (B,3,H,W)`` in [0,1] of equal shape and return (B,) float64 tensors.
"""
from __future__ import annotations

import torch

from metrics.full_reference import check_pair, psnr

FIT_RIDGE = 1e-8
"""Tikhonov term of the affine least-squares fit (relative to the mean diagonal of the normal matrix): keeps the
solve defined for flat images."""


def affine_fit(hazy01: torch.Tensor, clean01: torch.Tensor) -> torch.Tensor:
    """The per-image least-squares affine colour map of ``hazy01`` onto ``clean01``, applied and clamped to [0,1]:
    (B,3,H,W) float64."""
    check_pair(hazy01, clean01)
    b = hazy01.shape[0]
    x = hazy01.double().reshape(b, 3, -1).transpose(1, 2)                      # (B, N, 3)
    x = torch.cat([x, torch.ones_like(x[..., :1])], dim=2)                     # (B, N, 4)
    y = clean01.double().reshape(b, 3, -1).transpose(1, 2)                     # (B, N, 3)
    normal = x.transpose(1, 2) @ x                                             # (B, 4, 4)
    ridge = FIT_RIDGE * normal.diagonal(dim1=1, dim2=2).mean(dim=1)
    normal = normal + ridge[:, None, None] * torch.eye(4, dtype=normal.dtype)
    coef = torch.linalg.solve(normal, x.transpose(1, 2) @ y)                  # (B, 4, 3)
    return (x @ coef).clamp(0.0, 1.0).transpose(1, 2).reshape(clean01.shape)


def affine_fit_psnr(hazy01: torch.Tensor, clean01: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, data range 1) of :func:`affine_fit` against ``clean01``: (B,) float64, +inf for an exact fit."""
    return psnr(affine_fit(hazy01, clean01), clean01.double())


def mean_gradient(img01: torch.Tensor) -> torch.Tensor:
    """Mean absolute forward difference over both axes, the three channels and all pixels: (B,) float64."""
    img = img01.double()
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs().flatten(1).mean(dim=1)
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs().flatten(1).mean(dim=1)
    return 0.5 * (dx + dy)


def detail_kept(hazy01: torch.Tensor, clean01: torch.Tensor) -> torch.Tensor:
    """:func:`mean_gradient` of ``hazy01`` over that of ``clean01``: (B,) float64 (nan for a flat clean image)."""
    check_pair(hazy01, clean01)
    ref = mean_gradient(clean01)
    return torch.where(ref > 0, mean_gradient(hazy01) / ref.clamp_min(1e-300), torch.full_like(ref, float("nan")))
