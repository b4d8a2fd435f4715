"""CrossDehaze's cross-data channel transfer: a per-channel gamma that maps one dataset's hazy inputs onto another's
colour statistics, as a wrapper around any training dataset (baselines and DiffDehaze alike).

    out_c = I_c ** (1 / γ_c)                       I in [0,1], channel c in R, G, B

Estimator (:func:`estimate_gamma`): if the reference set's pixels are the source set's raised to 1/γ_c, then
ln I_ref,c = ln I_src,c / γ_c, so γ_c = mean(ln I_src,c) / mean(ln I_ref,c) over all pixels of each set (pixel
values clamped to [1/255, 1] before the log): the ratio of the log geometric means, exact for such pairs. The
published CrossDehaze script hard-codes γ = 1.91 / 1.91 / 1.90 in B, G, R order for its own datasets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.checks import require_images
from utils.common import instantiate_from_config
from utils.image_io import load_rgb01

LOG_FLOOR = 1.0 / 255.0


def apply_gamma(img01: torch.Tensor, gamma: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """out_c = img_c ** (1 / γ_c). img01: (3,H,W) or (B,3,H,W) in [0,1]; gamma: 3 values (R, G, B) > 0."""
    g = torch.as_tensor(gamma, dtype=img01.dtype, device=img01.device).view(3, 1, 1)
    return img01.clamp(0.0, 1.0) ** (1.0 / g)


def mean_log(paths: Sequence[Path]) -> np.ndarray:
    """(3,) mean of ln(max(I_c, 1/255)) over every pixel of the images at ``paths`` (R, G, B)."""
    total, count = np.zeros(3), 0
    for path in paths:
        img = load_rgb01(path).clamp_min(LOG_FLOOR).double()
        total += img.log().sum(dim=(1, 2)).numpy()
        count += img.shape[1] * img.shape[2]
    return total / count


def estimate_gamma(source_folder: str | Path, reference_folder: str | Path) -> tuple[float, float, float]:
    """γ (R, G, B) that maps the source folder's images onto the reference folder's statistics (module doc)."""
    src, ref = mean_log(require_images(source_folder)), mean_log(require_images(reference_folder))
    if np.any(ref >= 0) or np.any(src >= 0):
        raise ValueError("channel transfer: a folder is all white in a channel (mean log intensity 0); no gamma fits")
    return tuple(float(v) for v in src / ref)


def hazy_keys(sample: dict[str, Any]) -> dict[str, str]:
    """The hazy images of a training sample and their range: stage-2 pairs (``StaticPairedData``) hold the hazy input
    in ``condition`` ([0,1]); stage-1 samples (``HybridTrainingData``, which carry ``transmission``) in ``target``
    ([-1,1]); both in ``hazy_ref`` ([0,1])."""
    if "transmission" in sample:
        return {"target": "pm1", "hazy_ref": "01"}
    return {"condition": "01", "hazy_ref": "01"}


class ChannelTransfer(Dataset):
    """Wraps a dataset config (``target`` + ``params``) and applies :func:`apply_gamma` to every hazy image of its
    samples (:func:`hazy_keys`); clean images, t and A are untouched.

    gamma: (R, G, B) values, or None to estimate them from ``source_folder`` (this dataset's hazy images) and
    ``reference_folder`` (the other dataset's) with :func:`estimate_gamma`. ``seed`` and ``verify`` are passed on
    to the wrapped dataset (``training.data.build_dataset`` sets them); ``set_epoch`` too.
    """

    def __init__(self, dataset: dict[str, Any], gamma: Sequence[float] | None = None,
                 source_folder: str | None = None, reference_folder: str | None = None,
                 seed: int | None = None, verify: bool = True) -> None:
        if gamma is None:
            if source_folder is None or reference_folder is None:
                raise ValueError("ChannelTransfer needs gamma (R, G, B) or source_folder and reference_folder")
            gamma = estimate_gamma(source_folder, reference_folder)
        if len(gamma) != 3 or any(float(g) <= 0 for g in gamma):
            raise ValueError(f"ChannelTransfer gamma must be 3 positive numbers (R, G, B), got {list(gamma)}")
        self.gamma = tuple(float(g) for g in gamma)
        params = dict(dataset.get("params") or {})
        params.setdefault("seed", seed)
        if not verify:
            params["verify"] = False
        self.inner = instantiate_from_config({"target": dataset["target"], "params": params})

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.inner[index])
        for key, value_range in hazy_keys(sample).items():
            img = sample[key]
            if value_range == "pm1":
                sample[key] = (apply_gamma((img + 1.0) / 2.0, self.gamma) * 2.0 - 1.0).contiguous()
            else:
                sample[key] = apply_gamma(img, self.gamma).contiguous()
        return sample
