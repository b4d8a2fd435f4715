"""SD-2.x UNet ("openaimodel" layout) and the ControlNet-controlled variant.

Parameter names follow the LDM checkpoints exactly (``input_blocks.N.M.*``, ``middle_block.*``,
``output_blocks.N.M.*``, ``out.*``) so ``model.diffusion_model.*`` of ``v2-1_512-ema-pruned.ckpt`` loads
strictly. Latents are (B, 4, H/8, W/8); ``context`` is the text embedding (B, 77, context_dim).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import attention


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 (weights kept fp32 too), returning the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that can reuse a copy of its weight pre-packed in oneDNN's blocked layout (CPU inference).

    An eager fp32 CPU convolution reorders the dense weight into oneDNN's layout on every call. For the UNet's
    wide, low-resolution convolutions (1280 channels on 4²–16² latent pixels) that reorder costs more than the
    convolution itself. With ``pack_weights`` set (``ControlLDM.set_weight_packing``), calls on fp32 CPU tensors
    that record no gradient run oneDNN's convolution on one packed copy, made on the first call for an input shape
    and made again when the shape or the weight changes (new storage, or an in-place update of the weight). Same
    kernel and values up to float rounding; the price is one more copy of the conv weights in memory. Any other
    call (autograd, CUDA, other dtypes, ``torch.compile`` tracing) is the plain ``nn.Conv2d`` forward.
    """

    pack_weights = False
    _packed: tuple[tuple[int, ...], torch.Tensor, int, torch.Tensor] | None = None  # shape, source, version, packed

    def _packable(self, x: torch.Tensor) -> bool:
        return (self.pack_weights and not torch.compiler.is_compiling() and x.device.type == "cpu"
                and x.dtype == self.weight.dtype == torch.float32 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and torch.backends.mkldnn.is_available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packable(x):
            return super().forward(x)
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        weight = self.weight.detach()
        cached = self._packed
        # the cached source keeps its storage alive, so an equal data pointer means the same storage
        if (cached is None or cached[0] != tuple(x.shape) or cached[1].data_ptr() != weight.data_ptr()
                or cached[2] != weight._version):
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), *geometry,
                                                                list(x.shape))
            cached = self._packed = (tuple(x.shape), weight, weight._version, packed)
        return torch.ops.mkldnn._convolution_pointwise(x, cached[3], self.bias, *geometry, "none", [], "")

    def set_weight_packing(self, enabled: bool) -> None:
        """Switch the packed path on or off; off also frees the packed copy."""
        self.pack_weights = enabled
        if not enabled:
            self._packed = None


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) float32, [cos | sin] order as in the LDM code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def maybe_checkpoint(fn, enabled: bool, *args):
    """Run ``fn(*args)`` under activation checkpointing when enabled and gradients are being recorded."""
    if enabled and torch.is_grad_enabled() and any(a.requires_grad for a in args if torch.is_tensor(a)):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TimestepBlock(nn.Module):
    """Marker for blocks whose forward takes the timestep embedding."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes ``emb`` to timestep blocks and ``context`` to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(TimestepBlock):
    """GN-SiLU-conv, + projected timestep embedding, GN-SiLU-dropout-zero conv, residual (1x1 conv if widths differ)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, self.use_checkpoint, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context.to(x.dtype)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        return self.to_out(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, self.use_checkpoint, x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, linear ``proj_in``, transformer blocks over H·W tokens, zero-init linear ``proj_out``, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_checkpoint: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm32(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, use_checkpoint) for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)


def _heads(ch: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
    """(heads, dim_head) following the LDM rule: fixed head width when ``num_head_channels`` is set."""
    if num_head_channels > 0:
        return ch // num_head_channels, num_head_channels
    return num_heads, ch // num_heads


class UNetEncoderMixin:
    """Builds ``time_embed``, ``input_blocks`` and ``middle_block`` (shared by UNet and ControlNet)."""

    def _build_encoder(self, in_channels: int, model_channels: int, attention_resolutions: Sequence[int],
                       num_res_blocks: int, channel_mult: Sequence[int], num_heads: int, num_head_channels: int,
                       transformer_depth: int, context_dim: int, dropout: float, use_checkpoint: bool) -> list[int]:
        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_dim, mult * model_channels, dropout, use_checkpoint)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    heads, dim_head = _heads(ch, num_heads, num_head_channels)
                    layers.append(SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim, use_checkpoint))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        heads, dim_head = _heads(ch, num_heads, num_head_channels)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim, ch, dropout, use_checkpoint),
            SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim, use_checkpoint),
            ResBlock(ch, time_dim, ch, dropout, use_checkpoint),
        )
        self._ds = ds
        return skip_channels

    def _embed_time(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))


class UNetModel(nn.Module, UNetEncoderMixin):
    """SD-2.x denoiser: eps (or v) = UNet(x (B,C,h,w), timesteps (B,), context (B,77,D))."""

    def __init__(self, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 attention_resolutions: Sequence[int] = (4, 2, 1), num_res_blocks: int = 2,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_heads: int = -1, num_head_channels: int = 64,
                 use_spatial_transformer: bool = True, use_linear_in_transformer: bool = True,
                 transformer_depth: int = 1, context_dim: int = 1024, legacy: bool = False,
                 use_checkpoint: bool = False, dropout: float = 0.0, image_size: int | None = None,
                 use_fp16: bool = False):
        super().__init__()
        if not (use_spatial_transformer and use_linear_in_transformer) or legacy:
            raise ValueError("only the SD-2.x layout is implemented (spatial transformer, linear proj, legacy False)")
        self.model_channels = model_channels
        skip_channels = self._build_encoder(in_channels, model_channels, attention_resolutions, num_res_blocks,
                                            channel_mult, num_heads, num_head_channels, transformer_depth,
                                            context_dim, dropout, use_checkpoint)
        time_dim = model_channels * 4
        ch, ds = model_channels * channel_mult[-1], self._ds
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(ch + skip_channels.pop(), time_dim, model_channels * mult, dropout, use_checkpoint)
                ]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    heads, dim_head = _heads(ch, num_heads, num_head_channels)
                    layers.append(SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim, use_checkpoint))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B,C,h,w) noisy latent; control: optional 13 residuals (12 skips then middle, ControlNet order).

        Returns the float32 prediction (B,out_channels,h,w).
        """
        dtype = self.input_blocks[0][0].weight.dtype
        emb = self._embed_time(timesteps, dtype)
        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        control = list(control) if control is not None else None
        if control is not None:
            h = h + control.pop().to(dtype)
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None:
                skip = skip + control.pop().to(dtype)
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).float()


class ControlledUnetModel(UNetModel):
    """The UNet used with a ControlNet: its 12 skips and middle output receive the 13 control residuals.

    Same parameters and forward as :class:`UNetModel` (whose ``control`` argument does the adding); the separate
    name mirrors the published configs' ``target``.
    """
