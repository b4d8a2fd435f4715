"""Fog-aware refinement of the frozen CLIP text condition (HCD-YC extension, not in the paper).

``TextConditionProcessor`` maps the text-encoder tokens ``x: (B,77,D)`` to

    out = (x + mlp(x)) * (1 + gamma) + beta,      (gamma, beta) = mod(fog_feat)

* enhancement layer ``mlp``: pre-LayerNorm residual MLP per token, output projection
  zero-initialised;
* modulation layer ``mod``: a small MLP on the per-image fog feature vector
  (``haze.fog.FogInfo.features``, shape (B,F)) producing a per-channel scale and shift
  broadcast over the tokens, output projection zero-initialised.

With both output projections at zero the processor is exactly the identity at
initialisation, so training starts from the pretrained conditioning.
"""

from __future__ import annotations

import torch
from torch import nn


class TextConditionProcessor(nn.Module):
    """Residual token enhancement + FiLM-style modulation by fog statistics.

    Args:
        dim: token width D of the text encoder (1024 for SD 2.1's OpenCLIP ViT-H/14).
        fog_feat_dim: length F of the fog feature vector.
        hidden_mult: hidden width of both MLPs is ``hidden_mult * dim``.
    """

    def __init__(self, dim: int, fog_feat_dim: int, hidden_mult: int = 2) -> None:
        super().__init__()
        if dim <= 0 or fog_feat_dim <= 0 or hidden_mult <= 0:
            raise ValueError(
                f"dim, fog_feat_dim and hidden_mult must be positive, got {dim}, {fog_feat_dim}, {hidden_mult}"
            )
        hidden = hidden_mult * dim
        self.dim = dim
        self.fog_feat_dim = fog_feat_dim
        self.enhance = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
        )
        self.modulate = nn.Sequential(
            nn.Linear(fog_feat_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * dim),
        )
        for out_proj in (self.enhance[-1], self.modulate[-1]):
            nn.init.zeros_(out_proj.weight)
            nn.init.zeros_(out_proj.bias)

    def forward(self, tokens: torch.Tensor, fog_feat: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B,L,D) text-encoder output; fog_feat: (B,F) or None -> (B,L,D).

        ``fog_feat=None`` skips the modulation (gamma = beta = 0), e.g. for a null prompt.
        """
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens must have shape (B,L,{self.dim}), got {tuple(tokens.shape)}")
        out = tokens + self.enhance(tokens)
        if fog_feat is None:
            return out
        if fog_feat.shape != (tokens.shape[0], self.fog_feat_dim):
            raise ValueError(
                f"fog_feat must have shape ({tokens.shape[0]},{self.fog_feat_dim}), got {tuple(fog_feat.shape)}"
            )
        gamma, beta = self.modulate(fog_feat.to(tokens.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return out * (1.0 + gamma) + beta


def pooled(text_tokens: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pool text tokens (B,L,D) to one vector per prompt (B,D) for the alignment loss.

    * ``token_ids`` (B,L) given: EOT pooling as in CLIP -- take the token at the position of the
      largest id (the end-of-text token has the largest id in the CLIP BPE vocabulary).
    * ``token_ids`` None: mean over all L positions (padding included; cheap and needs no ids).
    """
    if text_tokens.dim() != 3:
        raise ValueError(f"text_tokens must have shape (B,L,D), got {tuple(text_tokens.shape)}")
    if token_ids is None:
        return text_tokens.mean(dim=1)
    if token_ids.shape != text_tokens.shape[:2]:
        raise ValueError(
            f"token_ids must have shape {tuple(text_tokens.shape[:2])}, got {tuple(token_ids.shape)}"
        )
    eot = token_ids.argmax(dim=-1)
    return text_tokens[torch.arange(text_tokens.shape[0], device=text_tokens.device), eot]
