"""Tiled evaluation so memory stays bounded for large images.

One mechanism for the denoiser (latent tiles) and the VAE (pixel tiles for encoding, latent tiles for decoding):
overlapping tiles whose outputs are blended with separable Gaussian-ramp weights, normalised by the weight sum.
Note: GroupNorm statistics are per tile, so tiled and untiled VAE outputs differ slightly (no visible seams thanks
to the overlap blending).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of ``tile`` at ``stride``; the last tile is flush with the end."""
    if tile >= size:
        return [0]
    if not 0 < stride <= tile:
        raise ValueError(f"need 0 < stride <= tile, got stride={stride}, tile={tile}")
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def blend_weights(h: int, w: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1,1,h,w) separable Gaussian weights (σ = size/4, peak 1) that favour tile centres."""
    def ramp(n: int) -> torch.Tensor:
        x = torch.arange(n, device=device, dtype=dtype) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (n / 4)) ** 2)

    return (ramp(h)[:, None] * ramp(w)[None, :])[None, None]


def _slice_cond(cond: Any, y: int, x: int, h: int, w: int, latent_hw: tuple[int, int]) -> Any:
    """Crop every spatial tensor of ``cond`` to the tile; per-level lists (YCbCr features) are cropped per scale."""
    if isinstance(cond, dict):
        return {k: _slice_cond(v, y, x, h, w, latent_hw) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_slice_cond(v, y, x, h, w, latent_hw) for v in cond)
    if torch.is_tensor(cond) and cond.ndim == 4:
        fy, fx = latent_hw[0] / cond.shape[-2], latent_hw[1] / cond.shape[-1]
        return cond[..., int(y / fy): int((y + h) / fy), int(x / fx): int((x + w) / fx)]
    return cond


class TiledDenoiser:
    """Wrap ``model_fn(x, t, cond)`` so latents larger than ``tile`` are processed in overlapping tiles.

    Tile size and stride are in latent pixels (64 latent = 512 image pixels); they should be multiples of the
    ControlNet's total downsampling (8 for SD) so per-level condition features crop exactly.
    """

    def __init__(self, model_fn: Callable, tile: int = 64, stride: int = 32):
        self.model_fn, self.tile, self.stride = model_fn, tile, stride

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h <= self.tile and w <= self.tile:
            return self.model_fn(x, t, cond)
        plan = _TilePlan(h, w, self.tile, self.stride, 1.0, x.device)
        out = torch.zeros_like(x, dtype=torch.float32)
        for (iy, ix), _ in plan.windows:
            tile_cond = _slice_cond(cond, iy.start, ix.start, iy.stop - iy.start, ix.stop - ix.start, (h, w))
            out[..., iy, ix] += self.model_fn(x[..., iy, ix], t, tile_cond).float() * plan.weight
        return out / plan.total


class _TilePlan:
    """Input windows, their output windows (scaled by ``scale``), the blend weight and the weight sum."""

    def __init__(self, h: int, w: int, tile: int, stride: int, scale: float, device: torch.device):
        th, tw = min(tile, h), min(tile, w)
        self.out_hw = (int(h * scale), int(w * scale))
        oth, otw = int(th * scale), int(tw * scale)
        self.weight = blend_weights(oth, otw, device)
        self.total = torch.zeros((1, 1, *self.out_hw), device=device)
        self.windows = []
        for y in tile_starts(h, th, stride):
            for x in tile_starts(w, tw, stride):
                oy, ox = int(y * scale), int(x * scale)
                self.windows.append(((slice(y, y + th), slice(x, x + tw)), (slice(oy, oy + oth), slice(ox, ox + otw))))
                self.total[..., oy:oy + oth, ox:ox + otw] += self.weight


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int,
                scale: float) -> torch.Tensor:
    """Apply a spatial map ``fn`` (output size = input size × ``scale``) over overlapping tiles of ``x``.

    Used for VAE encoding (scale 1/8, tiles in pixels) and decoding (scale 8, tiles in latent pixels).
    Differentiable, but autograd then keeps every tile's graph: use :func:`tiled_vjp` to backpropagate with the
    memory of one tile.
    """
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    plan = _TilePlan(h, w, tile, stride, scale, x.device)
    out = None
    for (iy, ix), (oy, ox) in plan.windows:
        pred = fn(x[..., iy, ix]).float()
        if out is None:
            out = torch.zeros((x.shape[0], pred.shape[1], *plan.out_hw), device=x.device)
        out[..., oy, ox] += pred * plan.weight
    return out.div_(plan.total)


def tiled_vjp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_out: torch.Tensor, tile: int,
              stride: int, scale: float) -> torch.Tensor:
    """Vector-Jacobian product (∂ tiled_apply(fn, x) / ∂x)ᵀ · grad_out, computed one tile at a time.

    Each tile is re-run with gradients, backpropagated with its share (blend weight / weight sum) of ``grad_out`` and
    freed, so memory stays that of one tile whatever the image size (no full-size copy of ``grad_out`` is made).
    Returns a tensor shaped like ``x``.
    """
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(leaf).float(), leaf, grad_outputs=grad_out.float())
        return grad
    plan = _TilePlan(h, w, tile, stride, scale, x.device)
    grad_x = torch.zeros_like(x, dtype=torch.float32)
    for (iy, ix), (oy, ox) in plan.windows:
        share = grad_out[..., oy, ox].float() / plan.total[..., oy, ox] * plan.weight
        with torch.enable_grad():
            leaf = x[..., iy, ix].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(leaf).float(), leaf, grad_outputs=share)
        grad_x[..., iy, ix] += grad
    return grad_x.to(x.dtype)
