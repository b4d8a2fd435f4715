"""Clean-photo crops for pretraining the mini prior (``training.prior``): random scale, random crop, random flip.

Beyond the paper: SD-2.1 arrives pretrained; the CPU-sized model family of ``configs/mini/`` has no such weights, so its
VAE and UNet are trained here on crops of clean photos (the held-in split of ``tools.mini_chain``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dataset.checks import require_images, verify_images
from dataset.paired import SeededData, random_crop, resize_one01
from utils.image_io import load_rgb01


class CleanCrops(SeededData):
    """Crops of clean photos with scale and flip augmentation.

    folder: clean photos (.png/.jpg/.jpeg), loaded once at construction (small sets only).
    crop_size: side S of the square crops. scale_range: each sample resizes its photo by s ~ U[scale_range] (raised
    where needed so that the short side still covers S), takes a random S x S crop and flips it horizontally with
    probability 0.5. length: samples per epoch (default 64 per photo). seed: see ``SeededData``.

    Sample: ``image`` (3,S,S) in [-1,1].
    """

    def __init__(self, folder: str | Path, crop_size: int = 64, scale_range: tuple[float, float] = (0.25, 1.0),
                 length: int | None = None, seed: int | None = None) -> None:
        super().__init__(seed)
        lo, hi = scale_range
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi <= 1, got {scale_range}")
        paths = require_images(folder)
        verify_images(paths)
        self.photos = [load_rgb01(path) for path in paths]
        self.crop_size, self.scale_range = crop_size, (lo, hi)
        self.length = length if length is not None else 64 * len(self.photos)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.sample_rng(index)
        photo = self.photos[int(rng.integers(len(self.photos)))]
        h, w = photo.shape[1:]
        short = min(h, w)
        lo, hi = self.scale_range
        scale = max(float(rng.uniform(lo, hi)), self.crop_size / short)
        size = (max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale)))
        crop = random_crop(resize_one01(photo, size), self.crop_size, rng)
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        return {"image": (crop * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()}
