"""AutoencoderKL of Stable Diffusion (``first_stage_model.*`` names): images in [-1,1] <-> 4-channel latents."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import attention


def vae_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv x2 with a 1x1 ``nin_shortcut`` when widths differ (no timestep input in the VAE)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = vae_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = vae_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (conv(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then 3x3 stride-2 conv without padding (LDM convention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """(B,3,H,W) in [-1,1] -> moments (B, 2·z_channels, H/2^(L-1), W/2^(L-1))."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, in_channels: int, z_channels: int,
                 double_z: bool = True, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 resolution: int = 256, out_ch: int = 3):
        super().__init__()
        if attn_resolutions:
            raise ValueError("SD's VAE has no attention in down/up levels (attn_resolutions must be [])")
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _mid(block_in, dropout)
        self.norm_out = vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B,z_channels,h,w) -> image (B,out_ch,h·2^(L-1),w·2^(L-1)) in roughly [-1,1].

    ``use_checkpoint`` applies activation checkpointing per up-level (used by the cycle losses, which
    backpropagate through the frozen decoder).
    """

    def __init__(self, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resolution: int = 256,
                 in_channels: int = 3, double_z: bool = True):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.use_checkpoint = False
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        up_stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout))
                block_in = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            up_stages.insert(0, stage)
        self.up = nn.ModuleList(up_stages)
        self.norm_out = vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    @staticmethod
    def _run_stage(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
        for block in stage.block:
            h = block(h)
        return stage.upsample(h) if hasattr(stage, "upsample") else h

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            if self.use_checkpoint and torch.is_grad_enabled() and h.requires_grad:
                h = checkpoint(self._run_stage, stage, h, use_reentrant=False)
            else:
                h = self._run_stage(stage, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from encoder moments (B, 2C, h, w); logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """SD's KL autoencoder; ``encode`` returns the posterior, ``decode`` the image (unscaled latents)."""

    def __init__(self, ddconfig: dict, embed_dim: int):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.downscale = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, img_pm1: torch.Tensor) -> DiagonalGaussian:
        """img_pm1: (B,3,H,W) in [-1,1] -> posterior over (B,embed_dim,H/f,W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(img_pm1)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B,embed_dim,h,w) unscaled latent -> (B,3,h·f,w·f) in ~[-1,1]."""
        return self.decoder(self.post_quant_conv(z))
