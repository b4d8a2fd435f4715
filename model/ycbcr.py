"""HCD-YC YCbCr-assisted ControlNet: a YCbCr branch and gated cross-attention fusion.

The condition image (pixels, [0,1]) is converted to YCbCr (BT.601 full range, ``utils.color``) and encoded to one
feature map per ControlNet resolution level (latent size, then each downsampled level, with the ControlNet's channel
widths). The branch depends on neither the timestep nor the noisy latent, so ``encode`` runs once per image and its
features are reused at every sampling step. At the last block of each selected level and at the middle block, the
ControlNet (RGB) features query the YCbCr features; keys/values are average-pooled to at most ``kv_size``² tokens to
bound the cost. Each fusion adds ``gate · attention`` with a per-channel gate initialised to zero, so a ControlNet with
fusion computes exactly the plain ControlNet's output until the gates train.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model.attention import attention
from model.unet import GroupNorm32
from utils.color import rgb_to_ycbcr


class YCbCrEncoder(nn.Module):
    """img01 (B,3,H,W) -> YCbCr -> features [(B,C_l,H/(d·2^l),W/(d·2^l)) for each level l]; d = latent_downscale."""

    def __init__(self, level_channels: Sequence[int], latent_downscale: int = 8, stem_channels: int = 32):
        super().__init__()
        stem: list[nn.Module] = [nn.Conv2d(3, stem_channels, 3, padding=1), nn.SiLU()]
        ch, factor = stem_channels, 1
        while factor < latent_downscale:
            out = level_channels[0] if factor * 2 == latent_downscale else ch
            stem += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.SiLU()]
            ch, factor = out, factor * 2
        self.stem = nn.Sequential(*stem)
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(level_channels[i], level_channels[i + 1], 3, stride=2, padding=1), nn.SiLU())
            for i in range(len(level_channels) - 1)
        )

    def forward(self, img01: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(rgb_to_ycbcr(img01) * 2 - 1)]
        for down in self.down:
            feats.append(down(feats[-1]))
        return feats


class GatedCrossAttention(nn.Module):
    """h + gate ⊙ Attn(q = h, k/v = pooled YCbCr features); ``gate`` (per channel) starts at zero."""

    def __init__(self, channels: int, kv_channels: int, head_dim: int = 64, kv_size: int = 16):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.kv_size = kv_size
        self.norm_q = GroupNorm32(32, channels)
        self.norm_kv = GroupNorm32(32, kv_channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(kv_channels, channels, bias=False)
        self.to_v = nn.Linear(kv_channels, channels, bias=False)
        self.proj_out = nn.Linear(channels, channels)
        self.gate = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        if feat.shape[-2] > self.kv_size or feat.shape[-1] > self.kv_size:
            feat = F.adaptive_avg_pool2d(feat, (min(self.kv_size, feat.shape[-2]), min(self.kv_size, feat.shape[-1])))
        q = self.to_q(rearrange(self.norm_q(h), "b c h w -> b (h w) c"))
        kv = rearrange(self.norm_kv(feat.to(h.dtype)), "b c h w -> b (h w) c")
        k, v = self.to_k(kv), self.to_v(kv)
        q, k, v = (rearrange(x, "b n (m d) -> b m n d", m=self.heads) for x in (q, k, v))
        out = self.proj_out(rearrange(attention(q, k, v), "b m n d -> b n (m d)"))
        out = rearrange(out, "b (h w) c -> b c h w", h=hh, w=ww)
        return h + self.gate.to(h.dtype)[None, :, None, None] * out


class YCbCrFusion(nn.Module):
    """The branch plus one fusion per selected level (after that level's last ResBlock) and one at the middle block.

    skip_channels: widths of the ControlNet input-block outputs; block_levels: level of each input block output;
    fusion_levels: which levels fuse (default all).
    """

    def __init__(self, skip_channels: Sequence[int], mid_channels: int, block_levels: Sequence[int],
                 num_res_blocks: int, fusion_levels: Sequence[int] | None = None, latent_downscale: int = 8,
                 stem_channels: int = 32, head_dim: int = 64, kv_size: int = 16, fuse_middle: bool = True):
        super().__init__()
        num_levels = max(block_levels) + 1
        level_channels = [skip_channels[self._last_block(level, num_res_blocks)] for level in range(num_levels)]
        self.encoder = YCbCrEncoder(level_channels, latent_downscale, stem_channels)
        levels = list(range(num_levels)) if fusion_levels is None else list(fusion_levels)
        self.points = {self._last_block(level, num_res_blocks): level for level in levels}
        self.fusions = nn.ModuleDict({
            str(i): GatedCrossAttention(skip_channels[i], level_channels[level], head_dim, kv_size)
            for i, level in self.points.items()
        })
        self.middle = (GatedCrossAttention(mid_channels, level_channels[-1], head_dim, kv_size)
                       if fuse_middle else None)

    @staticmethod
    def _last_block(level: int, num_res_blocks: int) -> int:
        """Index of the input block holding the last ResBlock of ``level`` (block 0 is the input conv)."""
        return level * (num_res_blocks + 1) + num_res_blocks

    def encode(self, cond01: torch.Tensor) -> list[torch.Tensor]:
        """cond01: (B,3,H,W) in [0,1] (pixels, not latents) -> per-level YCbCr features."""
        if cond01.shape[1] != 3:
            raise ValueError(f"YCbCr branch expects an RGB image (B,3,H,W) in [0,1], got {tuple(cond01.shape)}")
        return self.encoder(cond01)

    def fuse_block(self, index: int, h: torch.Tensor, feats: list[torch.Tensor] | None) -> torch.Tensor:
        if index not in self.points:
            return h
        if feats is None:
            raise ValueError("YCbCr fusion is enabled but the condition has no 'c_ycbcr' features")
        return self.fusions[str(index)](h, feats[self.points[index]])

    def fuse_middle(self, h: torch.Tensor, feats: list[torch.Tensor] | None) -> torch.Tensor:
        if self.middle is None:
            return h
        if feats is None:
            raise ValueError("YCbCr fusion is enabled but the condition has no 'c_ycbcr' features")
        return self.middle(h, feats[-1])
