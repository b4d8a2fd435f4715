"""Grouping a folder's images into batches of equal padded size, and stacking per-image conditions.

A batch is sampled as one tensor, but each image keeps its own seeded generator (see ``sampler.spaced.randn``), so
batching changes only float rounding inside the batched network calls, never the random draws.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch

T = TypeVar("T")


def group_batches(items: Sequence[T], key: Callable[[T], Hashable | None], batch_size: int) -> list[list[T]]:
    """Split ``items`` into batches of at most ``batch_size`` items with equal ``key``.

    Items are taken in order; a batch is emitted when it is full, the unfilled ones at the end in order of their
    first item. ``key`` returning None (e.g. an unreadable header) puts the item in a batch of its own.
    Deterministic: depends only on the order of ``items`` and their keys.
    """
    if batch_size == 1:
        return [[item] for item in items]
    batches: list[list[T]] = []
    open_batches: dict[Hashable, list[T]] = {}
    first_index: dict[Hashable, int] = {}
    for i, item in enumerate(items):
        k = key(item)
        if k is None:
            batches.append([item])
            continue
        group = open_batches.setdefault(k, [])
        first_index.setdefault(k, i)
        group.append(item)
        if len(group) == batch_size:
            batches.append(open_batches.pop(k))
            first_index.pop(k)
    batches += [open_batches[k] for k in sorted(open_batches, key=first_index.__getitem__)]
    return batches


def stack_conditions(conds: Sequence[Any]) -> Any:
    """Concatenate per-image conditions along the batch dimension.

    Each condition is a tensor (1,...) or a dict / list / tuple of them (e.g. ``{"c_txt": (1,77,D), "c_img":
    (1,4,h,w), "c_ycbcr": [per-level (1,C,h_l,w_l)]}``); the result has the same structure with batch len(conds).
    """
    first = conds[0]
    if torch.is_tensor(first):
        return torch.cat(list(conds), dim=0)
    if isinstance(first, dict):
        return {k: stack_conditions([c[k] for c in conds]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(stack_conditions(parts) for parts in zip(*conds))
    raise TypeError(f"cannot batch a condition of type {type(first).__name__}")
