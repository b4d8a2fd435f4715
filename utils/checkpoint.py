"""Safe checkpoint loading: no pickled code ever runs (``weights_only=True`` or safetensors)."""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from utils.atomic import atomic_write

WEIGHTS_HELP = "see weights/README.md for where to download each file and where to put it"


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


# ------------------------------------------------------------------------------------------------ the door check
@dataclass(frozen=True)
class WeightFile:
    """A weight file a run reads, checked before anything heavy (:func:`check_weight_files`).

    key: the config key that names it (``inference.sd_path``); path: the file; expected: what it should be, for the
    message (``the SD-2.1 checkpoint v2-1_512-ema-pruned.ckpt``); prefixes: key prefixes its state dict must all
    contain (one tensor each, at least); refused: key prefixes it must not contain (a file of another kind)."""

    key: str
    path: str
    expected: str
    prefixes: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()


def _safetensors_keys(path: Path, size: int) -> list[str]:
    """Tensor names from a safetensors header; ValueError when the header or the data is cut short."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("truncated: no safetensors header")
        length = struct.unpack("<Q", head)[0]
        if length > size - 8:
            raise ValueError("truncated: the safetensors header runs past the end of the file")
        header = json.loads(handle.read(length))
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ValueError(f"truncated: the tensors need {8 + length + end} bytes")
    return [name for name in header if name != "__metadata__"]


def _torch_keys(path: Path) -> list[str]:
    """Tensor names of a torch checkpoint, without reading the tensor data (zip format: memory-mapped); ValueError
    for a file that is not a complete torch checkpoint of tensors."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise ValueError("truncated or corrupt: a torch zip archive without its end (central directory)")
    if magic[:1] != b"\x80" and magic != b"PK\x03\x04":
        raise ValueError("not a PyTorch checkpoint (zip or pickle) or a .safetensors file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=magic == b"PK\x03\x04")
    except pickle.UnpicklingError as err:
        raise ValueError(f"needs arbitrary Python objects to unpickle ({str(err).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        reason = (str(err).split(". ")[0].splitlines() or [type(err).__name__])[0]
        raise ValueError(f"truncated or corrupt ({reason})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
    return [key for key, value in obj.items() if torch.is_tensor(value)]


def weight_file_problem(spec: WeightFile) -> str | None:
    """Why ``spec.path`` cannot be the file it should be (missing, empty, truncated, wrong format, wrong key set),
    or None. Reads the header / the pickled index only, never the tensor data."""
    path = Path(spec.path)
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    try:
        keys = _safetensors_keys(path, size) if path.suffix == ".safetensors" else _torch_keys(path)
    except (ValueError, OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return f"{size} bytes, {err}"
    missing = [prefix for prefix in spec.prefixes if not any(key.startswith(prefix) for key in keys)]
    wrong = [prefix for prefix in spec.refused if any(key.startswith(prefix) for key in keys)]
    if missing or wrong or not keys:
        found = sorted({key.split(".")[0] for key in keys})[:6]
        return (f"{size} bytes, wrong key set: {len(keys)} tensors under {found}"
                + (f", none under {missing}" if missing else "") + (f", has {wrong}" if wrong else ""))
    return None


def check_weight_files(specs: list[WeightFile]) -> None:
    """CheckpointError, one line naming every bad file of ``specs`` (all missing ones at once) with its problem and
    what was expected; nothing when all look right."""
    problems = []
    for spec in specs:
        problem = weight_file_problem(spec)
        if problem is not None:
            problems.append(f"{spec.key} {spec.path}: {problem}; expected {spec.expected}")
    if problems:
        raise CheckpointError(f"{len(problems)} weight file(s) not usable: {' | '.join(problems)} ({WEIGHTS_HELP}, "
                              "with sizes and checksums)")
