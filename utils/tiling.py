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
        out = torch.zeros_like(x, dtype=torch.float32)
        total = torch.zeros((1, 1, h, w), device=x.device)
        th, tw = min(self.tile, h), min(self.tile, w)
        weight = blend_weights(th, tw, x.device)
        for y in tile_starts(h, th, self.stride):
            for xs in tile_starts(w, tw, self.stride):
                tile_cond = _slice_cond(cond, y, xs, th, tw, (h, w))
                pred = self.model_fn(x[..., y:y + th, xs:xs + tw], t, tile_cond)
                out[..., y:y + th, xs:xs + tw] += pred.float() * weight
                total[..., y:y + th, xs:xs + tw] += weight
        return out / total


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int,
                scale: float) -> torch.Tensor:
    """Apply a spatial map ``fn`` (output size = input size × ``scale``) over overlapping tiles of ``x``.

    Used for VAE encoding (scale 1/8, tiles in pixels) and decoding (scale 8, tiles in latent pixels).
    Differentiable (the AccSamp guidance backpropagates through tiled decoding).
    """
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    th, tw = min(tile, h), min(tile, w)
    oh, ow, oth, otw = int(h * scale), int(w * scale), int(th * scale), int(tw * scale)
    weight = blend_weights(oth, otw, x.device)
    out, total = None, torch.zeros((1, 1, oh, ow), device=x.device)
    for y in tile_starts(h, th, stride):
        for xs in tile_starts(w, tw, stride):
            pred = fn(x[..., y:y + th, xs:xs + tw]).float()
            if out is None:
                out = torch.zeros((x.shape[0], pred.shape[1], oh, ow), device=x.device)
            oy, ox = int(y * scale), int(xs * scale)
            out[..., oy:oy + oth, ox:ox + otw] += pred * weight
            total[..., oy:oy + oth, ox:ox + otw] += weight
    return out / total
