"""RGB <-> YCbCr conversion, ITU-R BT.601 full range (JPEG/JFIF convention).

Forward (all channels in [0,1]):
    Y  =  0.299 R  + 0.587 G  + 0.114 B
    Cb = -0.1687 R - 0.3313 G + 0.5 B    + 0.5
    Cr =  0.5 R    - 0.4187 G - 0.0813 B + 0.5

The inverse matrix is the exact float64 inverse of the forward matrix (computed once at
import with ``torch.linalg.inv``), not the rounded textbook constants, so a round trip
is exact up to float32 arithmetic.
"""

from __future__ import annotations

import torch

_FORWARD_F64 = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [-0.1687, -0.3313, 0.5],
        [0.5, -0.4187, -0.0813],
    ],
    dtype=torch.float64,
)
_OFFSET_F64 = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
_INVERSE_F64 = torch.linalg.inv(_FORWARD_F64)


def _check_bchw3(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B,3,H,W), got {tuple(x.shape)}")


def _apply(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 colour matrix over the channel axis of (B,3,H,W)."""
    m = matrix.to(device=x.device, dtype=x.dtype)
    return torch.einsum("oc,bchw->bohw", m, x)


def rgb_to_ycbcr(img01: torch.Tensor) -> torch.Tensor:
    """img01: (B,3,H,W) RGB in [0,1] -> (B,3,H,W) YCbCr, Y in [0,1], Cb/Cr in [0,1] (0.5 = neutral).

    Differentiable; keeps dtype and device of the input (float tensors only).
    """
    _check_bchw3(img01, "img01")
    offset = _OFFSET_F64.to(device=img01.device, dtype=img01.dtype).view(1, 3, 1, 1)
    return _apply(img01, _FORWARD_F64) + offset


def ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    """ycc: (B,3,H,W) YCbCr as produced by :func:`rgb_to_ycbcr` -> (B,3,H,W) RGB (not clamped)."""
    _check_bchw3(ycc, "ycc")
    offset = _OFFSET_F64.to(device=ycc.device, dtype=ycc.dtype).view(1, 3, 1, 1)
    return _apply(ycc - offset, _INVERSE_F64)
