"""Scaled dot-product attention with selectable backends.

Backends: ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``), ``xformers``
(``memory_efficient_attention``, CUDA only) and ``math`` (explicit softmax, the reference).
``auto`` (default) uses xformers when it is importable and the tensors are on CUDA, SDPA otherwise.
Override with the environment variable ``HCDYC_ATTN_BACKEND`` or :func:`set_attention_backend`.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "xformers", "math")
_override: str | None = None
_HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def set_attention_backend(name: str | None) -> None:
    """Force a backend for the whole process (``None`` returns to env/auto selection)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}', expected one of {BACKENDS}")
    global _override
    _override = name


def resolve_backend(device: torch.device) -> str:
    """The backend used for tensors on ``device``: override, then env var, then auto rule."""
    name = _override or os.environ.get("HCDYC_ATTN_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"HCDYC_ATTN_BACKEND='{name}' is not one of {BACKENDS}")
    if name == "xformers" and not (_HAS_XFORMERS and device.type == "cuda"):
        raise RuntimeError("xformers backend requested but xformers is not installed or tensors are not on CUDA")
    if name == "auto":
        return "xformers" if (_HAS_XFORMERS and device.type == "cuda") else "sdpa"
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v.

    q: (B, heads, Nq, d), k/v: (B, heads, Nk, d) -> (B, heads, Nq, d). No mask (none is needed in the UNet/VAE).
    """
    backend = resolve_backend(q.device)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(
            q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        )
        return out.transpose(1, 2)
    scale = q.shape[-1] ** -0.5
    weights = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)
    return weights @ v
