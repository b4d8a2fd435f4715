"""DehazeFormer (Song, He, Qian, Du, "Vision Transformers for Single Image Dehazing", TIP 2023), written from the
paper's description and its MIT-licensed release's configuration facts.

Five stages, U-shaped (widths 24 / 48 / 96 / 48 / 24, 2x patch merging and PixelShuffle splitting between them,
1x1 skip convolutions fused by SK fusion); each stage stacks blocks of

    x = x + rescale * Attention(RescaleNorm(x)) + rebias      (attention blocks; conv-only blocks skip the norm)
    x = x + MLP(x)

where RescaleNorm normalises over (C,H,W) and hands the removed mean/std back through two 1x1 convs; the token mixer
is a 5x5 depthwise conv on V plus, in the last ``attn_ratio`` share of each stage's blocks, window attention
(window 8, shifted by 4 every other block with reflect padding, relative positions log-scaled and mapped to a bias by
an MLP). The 4-channel head gives K (1 channel) and B (3 channels), and J = K I - B + I, computed on images in
[-1,1]. Sizes: T 687,404, S 1,284,884, B 2,517,612 parameters (the
published 0.687 M / 1.285 M / 2.518 M). Trained with L1.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SIZES: dict[str, dict] = {
    "t": {"depths": (4, 4, 4, 2, 2), "attn_ratio": (0.0, 1 / 2, 1.0, 0.0, 0.0)},
    "s": {"depths": (8, 8, 8, 4, 4), "attn_ratio": (1 / 4, 1 / 2, 3 / 4, 0.0, 0.0)},
    "b": {"depths": (16, 16, 16, 8, 8), "attn_ratio": (1 / 4, 1 / 2, 3 / 4, 0.0, 0.0)},
}
"""The published variants' depths and attention shares (widths, MLP ratios and heads are shared)."""


def _trunc_normal_(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _xavier_std(weight: torch.Tensor, gain: float = 1.0) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return gain * math.sqrt(2.0 / float(fan_in + fan_out))


class RescaleNorm(nn.Module):
    """Normalise x (B,C,H,W) over (C,H,W) -> (normalised * weight + bias, rescale (B,C,1,1), rebias (B,C,1,1)), where
    rescale / rebias are 1x1 convs of the removed std / mean (initial biases 1 and 0, weights ~N(0, 0.02²))."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.meta_std = nn.Conv2d(1, dim, 1)
        self.meta_mean = nn.Conv2d(1, dim, 1)
        _trunc_normal_(self.meta_std.weight, 0.02)
        nn.init.constant_(self.meta_std.bias, 1.0)
        _trunc_normal_(self.meta_mean.weight, 0.02)
        nn.init.constant_(self.meta_mean.bias, 0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = ((x - mean).pow(2).mean(dim=(1, 2, 3), keepdim=True) + self.eps).sqrt()
        out = (x - mean) / std * self.weight + self.bias
        return out, self.meta_std(std), self.meta_mean(mean)


def log_relative_positions(window: int) -> torch.Tensor:
    """(window², window², 2) sign(d) * log(1 + |d|) of the (dy, dx) offsets between the positions of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).float()
    return torch.sign(rel) * torch.log1p(rel.abs())


class WindowAttention(nn.Module):
    """Multi-head attention inside windows: qkv (N, window², 3C) -> (N, window², C), with a relative-position bias
    from an MLP (2 -> 256 -> heads) of the log-scaled offsets."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.scale = (dim // heads) ** -0.5
        self.register_buffer("relative_positions", log_relative_positions(window), persistent=False)
        self.meta = nn.Sequential(nn.Linear(2, 256), nn.ReLU(inplace=True), nn.Linear(256, heads))

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        n, tokens, _ = qkv.shape
        q, k, v = qkv.reshape(n, tokens, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.meta(self.relative_positions).permute(2, 0, 1)[None]
        return (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, tokens, self.dim)


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B,C,H,W) with H, W multiples of ``window`` -> (B * H/window * W/window, window², C)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, c)


def from_windows(windows: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_windows` -> (B,C,H,W)."""
    c = windows.shape[-1]
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class TokenMixer(nn.Module):
    """V = 1x1 conv; out = proj(DWConv5x5(V) [+ window attention of (QK, V)]). x (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, depth_total: int, dim: int, heads: int, window: int, shift: int, use_attn: bool) -> None:
        super().__init__()
        self.dim, self.window, self.shift, self.use_attn = dim, window, shift, use_attn
        self.conv = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, padding_mode="reflect")
        self.V = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        if use_attn:
            self.QK = nn.Conv2d(dim, dim * 2, 1)
            self.attn = WindowAttention(dim, window, heads)
        gain = (8 * depth_total) ** (-1 / 4)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                is_qk = module.weight.shape[0] == dim * 2
                _trunc_normal_(module.weight, _xavier_std(module.weight, 1.0 if is_qk else gain))
                nn.init.zeros_(module.bias)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad to window multiples; a shifted block puts ``shift`` rows/columns before the image."""
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.window, (-w) % self.window
        if self.shift:
            return F.pad(x, (self.shift, (self.window - self.shift + pad_w) % self.window,
                             self.shift, (self.window - self.shift + pad_h) % self.window), mode="reflect")
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.V(x)
        if not self.use_attn:
            return self.proj(self.conv(v))
        b, _, h, w = x.shape
        qkv = self._pad(torch.cat([self.QK(x), v], 1))
        hp, wp = qkv.shape[-2:]
        attn = from_windows(self.attn(to_windows(qkv, self.window)), self.window, b, hp, wp)
        attn = attn[:, :, self.shift:self.shift + h, self.shift:self.shift + w]
        return self.proj(self.conv(v) + attn)


class Block(nn.Module):
    """One DehazeFormer block (module docstring); (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, depth_total: int, dim: int, heads: int, mlp_ratio: float, window: int, shift: int,
                 use_attn: bool) -> None:
        super().__init__()
        self.norm = RescaleNorm(dim) if use_attn else None
        self.mixer = TokenMixer(depth_total, dim, heads, window, shift, use_attn)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, dim, 1))
        gain = (8 * depth_total) ** (-1 / 4)
        for module in self.mlp:
            if isinstance(module, nn.Conv2d):
                _trunc_normal_(module.weight, _xavier_std(module.weight, gain))
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            normed, rescale, rebias = self.norm(x)
            x = x + self.mixer(normed) * rescale + rebias
        else:
            x = x + self.mixer(x)
        return x + self.mlp(x)


def stage(depth_total: int, dim: int, depth: int, heads: int, mlp_ratio: float, window: int,
          attn_ratio: float) -> nn.Sequential:
    """``depth`` blocks, the last ``attn_ratio * depth`` with attention, every odd one shifted by window / 2."""
    attn_depth = attn_ratio * depth
    return nn.Sequential(*[Block(depth_total, dim, heads, mlp_ratio, window, 0 if i % 2 == 0 else window // 2,
                                 i >= depth - attn_depth) for i in range(depth)])


class SKFusion(nn.Module):
    """Selective-kernel fusion of two (B,C,H,W) maps: channel weights (softmax over the two) from the pooled sum."""

    def __init__(self, dim: int, height: int = 2, reduction: int = 8) -> None:
        super().__init__()
        self.height = height
        d = max(int(dim / reduction), 4)
        self.mlp = nn.Sequential(nn.Conv2d(dim, d, 1, bias=False), nn.ReLU(), nn.Conv2d(d, dim * height, 1, bias=False))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = feats[0].shape
        stacked = torch.stack(list(feats), dim=1)
        weights = self.mlp(stacked.sum(dim=1).mean(dim=(2, 3), keepdim=True)).view(b, self.height, c, 1, 1)
        return (stacked * weights.softmax(dim=1)).sum(dim=1)


def patch_embed(cin: int, cout: int, patch: int, kernel: int | None = None) -> nn.Conv2d:
    """Strided conv (reflect padding) that divides the size by ``patch``."""
    kernel = kernel or patch
    return nn.Conv2d(cin, cout, kernel, stride=patch, padding=(kernel - patch + 1) // 2, padding_mode="reflect")


def patch_unembed(cin: int, cout: int, patch: int, kernel: int = 1) -> nn.Sequential:
    """Conv to cout * patch² channels, then PixelShuffle: multiplies the size by ``patch``."""
    return nn.Sequential(nn.Conv2d(cin, cout * patch ** 2, kernel, padding=kernel // 2, padding_mode="reflect"),
                         nn.PixelShuffle(patch))


class DehazeFormer(nn.Module):
    """hazy img01 (B,3,H,W) in [0,1] -> dehazed (B,3,H,W) ~[0,1] (not clamped); any H, W (reflect-padded to 4).

    size: "t", "s" or "b" (:data:`SIZES`); ``depths`` / ``attn_ratio`` override them (smaller test networks).
    """

    size_multiple = 1
    patch = 4

    def __init__(self, size: str = "t", depths: Sequence[int] | None = None,
                 attn_ratio: Sequence[float] | None = None, window: int = 8,
                 dims: Sequence[int] = (24, 48, 96, 48, 24), mlp_ratios: Sequence[float] = (2.0, 4.0, 4.0, 2.0, 2.0),
                 heads: Sequence[int] = (2, 4, 6, 1, 1)) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"DehazeFormer size must be one of {sorted(SIZES)}, got {size!r}")
        depths = tuple(depths or SIZES[size]["depths"])
        attn_ratio = tuple(attn_ratio if attn_ratio is not None else SIZES[size]["attn_ratio"])
        if dims[1] != dims[3] or dims[0] != dims[4]:
            raise ValueError(f"DehazeFormer dims must be U-shaped (d0, d1, d2, d1, d0), got {tuple(dims)}")
        total = sum(depths)
        stages = [stage(total, dims[i], depths[i], heads[i], mlp_ratios[i], window, attn_ratio[i]) for i in range(5)]
        self.embed = patch_embed(3, dims[0], 1, kernel=3)
        self.stage1, self.stage2, self.stage3, self.stage4, self.stage5 = stages
        self.merge1 = patch_embed(dims[0], dims[1], 2)
        self.merge2 = patch_embed(dims[1], dims[2], 2)
        self.skip1 = nn.Conv2d(dims[0], dims[0], 1)
        self.skip2 = nn.Conv2d(dims[1], dims[1], 1)
        self.split1 = patch_unembed(dims[2], dims[3], 2)
        self.split2 = patch_unembed(dims[3], dims[4], 2)
        self.fusion1 = SKFusion(dims[3])
        self.fusion2 = SKFusion(dims[4])
        self.head = patch_unembed(dims[4], 4, 1, kernel=3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1], H and W multiples of 4 -> head output (B,4,H,W): K and B."""
        x = self.stage1(self.embed(x))
        skip1 = x
        x = self.stage2(self.merge1(x))
        skip2 = x
        x = self.split1(self.stage3(self.merge2(x)))
        x = self.fusion1([x, self.skip2(skip2)]) + x
        x = self.split2(self.stage4(x))
        x = self.fusion2([x, self.skip1(skip1)]) + x
        return self.head(self.stage5(x))

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        h, w = img01.shape[-2:]
        x = F.pad(img01 * 2.0 - 1.0, (0, (-w) % self.patch, 0, (-h) % self.patch), mode="reflect")
        k, bias = self.features(x).split((1, 3), dim=1)
        j = k * x - bias + x
        return j[:, :, :h, :w] * 0.5 + 0.5

    @torch.no_grad()
    def restore(self, img01: torch.Tensor) -> torch.Tensor:
        """Dehazed image (B,3,H,W) in [0,1]."""
        return self(img01).clamp(0.0, 1.0)
