"""Text-image alignment loss (HCD-YC extension, not in the paper): a symmetric InfoNCE between pooled text
conditions and embeddings of the images they describe, with negatives gathered across processes.

Minimised when every text embedding is most similar to its own image's embedding (the diagonal of the similarity
matrix), see :func:`info_nce`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(
    text_emb: torch.Tensor,
    img_emb: torch.Tensor,
    temperature: float = 0.07,
    all_text: torch.Tensor | None = None,
    all_img: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss); row i of ``text_emb`` and ``img_emb`` (B,D) is a positive pair.

    Negatives are the rows of ``all_text`` / ``all_img`` (N,D) (e.g. the batches of every process, see
    :func:`gather_with_local_grad`), in which the local pairs sit at rows ``offset .. offset+B-1``; None = the local
    batch (N = B, offset 0). Embeddings are L2-normalised here. Returns the scalar
    (CE(text_i -> all images) + CE(image_i -> all texts)) / 2 averaged over the B local rows, logits cos / temperature;
    minimised when each text is closer to its own image than to every other one.
    """
    if text_emb.shape != img_emb.shape or text_emb.dim() != 2:
        raise ValueError(
            f"text_emb and img_emb must both be (B,D), got {tuple(text_emb.shape)}, {tuple(img_emb.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    all_text = text_emb if all_text is None else all_text
    all_img = img_emb if all_img is None else all_img
    if all_text.shape != all_img.shape or all_text.shape[1] != text_emb.shape[1]:
        raise ValueError(f"all_text and all_img must both be (N,{text_emb.shape[1]}), got "
                         f"{tuple(all_text.shape)}, {tuple(all_img.shape)}")
    if not 0 <= offset <= all_text.shape[0] - text_emb.shape[0]:
        raise ValueError(f"offset {offset} does not place {text_emb.shape[0]} rows inside {all_text.shape[0]}")
    t, i = F.normalize(text_emb.float(), dim=1), F.normalize(img_emb.float(), dim=1)
    t_all, i_all = F.normalize(all_text.float(), dim=1), F.normalize(all_img.float(), dim=1)
    labels = torch.arange(offset, offset + t.shape[0], device=t.device)
    return 0.5 * (F.cross_entropy(t @ i_all.t() / temperature, labels)
                  + F.cross_entropy(i @ t_all.t() / temperature, labels))


def gather_with_local_grad(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate a (B,...) tensor over all processes (``accelerate.utils.gather``): -> ((P·B,...), offset).

    The rows of this process (at ``offset = process_index · B``) are ``local`` itself, so they keep their autograd
    graph; the other processes' rows are detached copies. Every process must call this with the same B (the training
    sampler drops incomplete global batches). One process: (local, 0).
    """
    from accelerate import PartialState
    from accelerate.utils import gather

    state = PartialState()
    if state.num_processes == 1:
        return local, 0
    everything = gather(local.detach().contiguous())
    b, offset = local.shape[0], state.process_index * local.shape[0]
    return torch.cat([everything[:offset], local, everything[offset + b:]]), offset


class ImageEmbedder(nn.Module):
    """Small trainable image encoder for the alignment loss: img01 (B,3,H,W) in [0,1] -> (B,dim).

    Three stride-2 3x3 conv + SiLU stages (width, 2·width, 4·width channels), global average
    pooling and a linear projection to ``dim`` (the text width, 1024 for SD 2.1).
    """

    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, dim),
        )

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        """img01: (B,3,H,W) in [0,1] -> (B,dim)."""
        return self.net(img01 * 2.0 - 1.0)
