"""The atmospheric scattering model (Koschmieder; as used by DCP, RIDCP and the HCD-YC cycle losses).

    I = J t + A (1 - t)        hazy image I, scene radiance J, transmission t, airlight A

``rehaze`` applies it, ``recover`` inverts it, ``fit_transmission`` solves it for t given J, I and A. All images are
``img01``: (B,3,H,W) in [0,1] (outputs are not clamped: A may exceed 1 and recovering amplifies noise); t is
(B,1,H,W) (or anything broadcastable to it) in (0,1]; A is (B,3).
"""
from __future__ import annotations

import torch


def _airlight_map(airlight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if airlight.dim() != 2 or airlight.shape != (like.shape[0], 3):
        raise ValueError(f"airlight must be ({like.shape[0]},3), got {tuple(airlight.shape)}")
    return airlight.to(like.dtype)[:, :, None, None]


def rehaze(clean01: torch.Tensor, t: torch.Tensor, airlight: torch.Tensor) -> torch.Tensor:
    """I = J t + A (1 - t). clean01: (B,3,H,W) J in [0,1]; t: (B,1,H,W); airlight: (B,3) -> I (B,3,H,W)."""
    a = _airlight_map(airlight, clean01)
    return clean01 * t + a * (1.0 - t)


def recover(hazy01: torch.Tensor, t: torch.Tensor, airlight: torch.Tensor, t_floor: float = 0.0) -> torch.Tensor:
    """J = (I - A) / max(t, t_floor) + A, the inverse of :func:`rehaze` where t >= t_floor.

    hazy01: (B,3,H,W) I; t: (B,1,H,W) in (0,1]; airlight: (B,3). Not clamped (clamping would stop gradients).
    """
    a = _airlight_map(airlight, hazy01)
    return (hazy01 - a) / (t.clamp_min(t_floor) if t_floor > 0 else t) + a


def fit_transmission(hazy01: torch.Tensor, clean01: torch.Tensor, airlight: torch.Tensor,
                     t_min: float = 0.05, eps: float = 1e-4) -> torch.Tensor:
    """Per-pixel least-squares transmission of a (hazy, clean) pair under a known airlight A.

    I - A = t (J - A) per channel, so t* = sum_c (I_c - A_c)(J_c - A_c) / sum_c (J_c - A_c)^2, clamped to
    [t_min, 1]. Where J is within ``eps`` (squared distance) of A the pixel carries no information about t and gets
    t = 1. Exact (before clamping) on pairs made by :func:`rehaze` with the same A. Returns (B,1,H,W).
    """
    a = _airlight_map(airlight, clean01)
    dj = clean01 - a
    num = ((hazy01 - a) * dj).sum(dim=1, keepdim=True)
    den = (dj * dj).sum(dim=1, keepdim=True)
    t = torch.where(den > eps, num / den.clamp_min(eps), torch.ones_like(den))
    return t.clamp(t_min, 1.0)
