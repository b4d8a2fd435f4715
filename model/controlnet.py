"""IRControlNet: a trainable copy of the UNet encoder + middle block driven by the condition latent.

Its first conv takes ``in_channels + hint_channels`` (4 + 4): the noisy latent concatenated with the VAE latent
of the condition image (DiffBIR's IRControlNet, as used by HazeGen/DiffDehaze). One zero-initialised 1x1 conv per
encoder output (``zero_convs``) and ``middle_block_out`` give 13 residuals for :class:`ControlledUnetModel`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from model.unet import Conv2d, TimestepEmbedSequential, UNetEncoderMixin, zero_module


class ControlNet(nn.Module, UNetEncoderMixin):
    """control = ControlNet(x (B,4,h,w), hint (B,hint_channels,h,w), timesteps (B,), context (B,77,D)).

    With ``ycbcr_fusion`` set, a YCbCr branch and attention fusion (``model.ycbcr``) act on the encoder
    features; the fusion modules live under the ``ycbcr.`` prefix and start as an exact identity.
    """

    def __init__(self, in_channels: int = 4, hint_channels: int = 4, model_channels: int = 320,
                 attention_resolutions: Sequence[int] = (4, 2, 1), num_res_blocks: int = 2,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_heads: int = -1, num_head_channels: int = 64,
                 use_spatial_transformer: bool = True, use_linear_in_transformer: bool = True,
                 transformer_depth: int = 1, context_dim: int = 1024, legacy: bool = False,
                 use_checkpoint: bool = False, dropout: float = 0.0, image_size: int | None = None,
                 use_fp16: bool = False, out_channels: int | None = None, ycbcr_fusion: bool = False,
                 ycbcr_cfg: dict | None = None):
        super().__init__()
        if not (use_spatial_transformer and use_linear_in_transformer) or legacy:
            raise ValueError("only the SD-2.x layout is implemented (spatial transformer, linear proj, legacy False)")
        self.model_channels = model_channels
        skip_channels = self._build_encoder(in_channels + hint_channels, model_channels, attention_resolutions,
                                            num_res_blocks, channel_mult, num_heads, num_head_channels,
                                            transformer_depth, context_dim, dropout, use_checkpoint)
        self.zero_convs = nn.ModuleList(
            [TimestepEmbedSequential(zero_module(Conv2d(ch, ch, 1))) for ch in skip_channels]
        )
        mid_ch = model_channels * channel_mult[-1]
        self.middle_block_out = TimestepEmbedSequential(zero_module(Conv2d(mid_ch, mid_ch, 1)))
        self.ycbcr = None
        if ycbcr_fusion:
            from model.ycbcr import YCbCrFusion

            self.ycbcr = YCbCrFusion(skip_channels=skip_channels, mid_channels=mid_ch,
                                     block_levels=self._block_levels(num_res_blocks, len(channel_mult)),
                                     num_res_blocks=num_res_blocks, **(ycbcr_cfg or {}))

    @staticmethod
    def _block_levels(num_res_blocks: int, num_levels: int) -> list[int]:
        """Resolution level (0 = latent size) of the output of each input block."""
        levels = [0]
        for level in range(num_levels):
            levels += [level] * num_res_blocks
            if level != num_levels - 1:
                levels.append(level + 1)
        return levels

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                ycbcr_feats: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Return 13 control residuals (12 encoder outputs, then the middle block), shapes of the UNet skips.

        ycbcr_feats: per-level YCbCr features from ``self.ycbcr.encode`` (required when fusion is enabled).
        """
        dtype = self.input_blocks[0][0].weight.dtype
        emb = self._embed_time(timesteps, dtype)
        h, context = torch.cat([x, hint], dim=1).to(dtype), context.to(dtype)
        outs = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if self.ycbcr is not None:
                h = self.ycbcr.fuse_block(i, h, ycbcr_feats)
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        if self.ycbcr is not None:
            h = self.ycbcr.fuse_middle(h, ycbcr_feats)
        outs.append(self.middle_block_out(h, emb, context))
        return outs
