"""Safe checkpoint loading: no pickled code ever runs (``weights_only=True`` or safetensors)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from utils.atomic import atomic_write

WEIGHTS_HELP = "see README.md, section 'Weights', for where to download it and where to put it"


class CheckpointError(RuntimeError):
    """Raised for a checkpoint that cannot be loaded safely or does not fit the model."""


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.ckpt/.pt/.pth`` (pickle, tensors only) or ``.safetensors``.

    A top-level ``state_dict`` entry (Lightning/LDM format) is unwrapped. Pickles that need arbitrary
    Python objects are refused: ``torch.load(weights_only=True)`` never executes their code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} ({WEIGHTS_HELP})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary Python objects to unpickle, which could run code. "
            "Convert it once in a trusted environment to a plain tensor dict, e.g. "
            "`safetensors.torch.save_file({k: v for k, v in sd.items() if torch.is_tensor(v)}, 'file.safetensors')`. "
            f"Details: {str(err).splitlines()[0]}"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def check_shapes(module: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a ``CheckpointError`` naming the first key whose shape differs from the module's."""
    own = module.state_dict()
    for key, value in sd.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"shape mismatch for '{key}' in {source}: checkpoint {tuple(value.shape)} vs model "
                f"{tuple(own[key].shape)} (wrong model variant, e.g. an SD-1.5 checkpoint for an SD-2.1 config?)"
            )


def save_state_dict_atomic(sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save tensors to ``path`` (``.safetensors`` or torch pickle of plain tensors) atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write(path, lambda handle: handle.write(save(tensors)))
    else:
        atomic_write(path, lambda handle: torch.save(tensors, handle))
