"""OpenCLIP text encoder as used by SD-2.x (``cond_stage_model.model.*``).

Built with ``open_clip``'s own ``CLIP`` class (``pretrained=None``) and tokenizer; the vision tower is removed.
Output: hidden states of the penultimate transformer block passed through ``ln_final`` -> (B, 77, width).
"""
from __future__ import annotations

import math

import open_clip
import torch
from open_clip.model import CLIP
from torch import nn

LAYERS = {"last": 0, "penultimate": 1}


def _init_text_weights(model: CLIP) -> None:
    """Initialise text-tower tensors materialised with ``to_empty`` (open_clip's text init scheme)."""
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    width, layers = model.transformer.width, model.transformer.layers
    nn.init.normal_(model.token_embedding.weight, std=0.02)
    nn.init.normal_(model.positional_embedding, std=0.01)
    for block in model.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=width**-0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=width**-0.5 * (2 * layers) ** -0.5)
    nn.init.normal_(model.text_projection, std=width**-0.5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))


class FrozenOpenCLIPEmbedder(nn.Module):
    """prompts (list[str]) -> text embeddings (B, context_length, width), float32.

    The parameter tree is ``model.*`` so the SD checkpoint's ``cond_stage_model.model.*`` loads strictly.
    """

    def __init__(self, embed_dim: int = 1024, vision_cfg: dict | None = None, text_cfg: dict | None = None,
                 layer: str = "penultimate"):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {list(LAYERS)}, got '{layer}'")
        self.layer_idx = LAYERS[layer]
        target = torch.get_default_device()
        with torch.device("meta"):
            model = CLIP(embed_dim=embed_dim, vision_cfg=dict(vision_cfg or {}), text_cfg=dict(text_cfg or {}))
        del model.visual
        if target.type != "meta":
            model = model.to_empty(device=target)
            _init_text_weights(model)
            model.attn_mask = self._causal_mask(model.context_length, target)
        self.model = model
        self.context_length = model.context_length
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)

    @staticmethod
    def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
        return torch.full((length, length), float("-inf"), device=device).triu_(1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """list of B strings -> token ids (B, context_length) int64, truncated to the context length."""
        return self.tokenizer(list(prompts), context_length=self.context_length)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> hidden states of block ``layers - layer_idx`` after ``ln_final``: (B, L, width)."""
        model = self.model
        x = model.token_embedding(tokens.to(model.positional_embedding.device)) + model.positional_embedding
        mask = self._causal_mask(x.shape[1], x.device).to(x.dtype)
        blocks = model.transformer.resblocks
        for block in blocks[: len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=mask)
        return model.ln_final(x)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(prompts))
