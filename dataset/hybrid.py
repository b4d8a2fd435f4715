"""Stage-1 (HazeGen) training data: RIDCP synthetic pairs mixed with real hazy photos.

Matches ``HybridTrainingData`` of the "Learning Hazing to Dehazing" (CVPR 2025)
reference code: with probability p a synthetic pair (clean image from
``syn_folder/rgb_500``, its depth from ``syn_folder/depth_500/<stem>.npy``,
hazed by the RIDCP degradation of ``dataset.degradation.degrade`` on the full
image, then both cropped with one window); otherwise a random real hazy photo
(URHI) with an all-zero condition and ``is_cond`` False, which selects the model's unconditional branch
(``ControlLDM.image_condition``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dataset.checks import DataError, require_depth_maps, require_folder, require_images, verify_images
from dataset.degradation import DegradationParams, degrade, normalize_depth, transmission
from dataset.paired import SeededData, random_crop, to_chw, to_hwc
from utils.image_io import load_rgb01

STAGE1_PROMPT = "hazy, foggy, misty, obscure, smoggy."


class HybridTrainingData(SeededData):
    """Stage-1 samples; see the module doc for the two branches.

    syn_folder: holds rgb_500/ (clean images, any of .png/.jpg/.jpeg; the reference
        globbed *.jpg) and depth_500/<stem>.npy (float (H,W), larger = nearer).
        May be None when p == 0.
    real_folder: real hazy photos (.png/.jpg/.jpeg). May be None when p == 1.
    length: epoch length; default = number of synthetic images (the reference's
        length), or the number of real images when p == 0. The synthetic branch
        uses image ``index % n_syn``; the real branch draws a photo at random.
    seed: see ``SeededData`` (per-sample numpy generator).
    degradation: ranges of the RIDCP degradation (defaults = published).
    verify: check every image header (PIL verify) and depth-map header at start-up.

    Sample: target (3,S,S) hazy in [-1,1]; condition (3,S,S) clean in [0,1]
    (synthetic) or zeros (real); is_cond bool tensor; prompt str;
    hazy_ref (3,S,S) the hazy image in [0,1] = (target + 1) / 2;
    transmission (1,S,S) in (0,1] and airlight (3,): the true t and A of the
    degradation (synthetic; the stage-1 cycle loss uses them), or ones and zeros
    (real photos, which have none: is_cond False masks them out).
    """

    def __init__(
        self,
        syn_folder: str | Path | None,
        real_folder: str | Path | None,
        crop_size: int = 512,
        p: float = 0.3,
        prompt: str = STAGE1_PROMPT,
        length: int | None = None,
        seed: int | None = None,
        degradation: DegradationParams = DegradationParams(),
        verify: bool = True,
    ) -> None:
        super().__init__(seed)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0,1], got {p}")
        if p > 0.0 and syn_folder is None:
            raise ValueError("syn_folder is required when p > 0")
        if p < 1.0 and real_folder is None:
            raise ValueError("real_folder is required when p < 1")
        self.syn_paths: list[Path] = []
        self.depth_paths: list[Path] = []
        self.real_paths: list[Path] = []
        if p > 0.0:
            syn_root = require_folder(syn_folder)
            self.syn_paths = require_images(syn_root / "rgb_500")
            depth_folder = require_folder(syn_root / "depth_500")
            sizes = verify_images(self.syn_paths) if verify else None
            self.depth_paths = require_depth_maps(self.syn_paths, depth_folder, sizes)
        if p < 1.0:
            self.real_paths = require_images(real_folder)
            if verify:
                verify_images(self.real_paths)
        self.length = length if length is not None else len(self.syn_paths or self.real_paths)
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        self.crop_size = crop_size
        self.p = p
        self.prompt = prompt
        self.degradation = degradation

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, object]:
        rng = self.sample_rng(index)
        if rng.random() < self.p:
            clean01, hazy01, t, airlight = self._synthetic_pair(index % len(self.syn_paths), rng)
            condition, is_cond = clean01, True
        else:
            real_path = self.real_paths[int(rng.integers(len(self.real_paths)))]
            hazy01 = random_crop(load_rgb01(real_path), self.crop_size, rng)
            condition, is_cond = torch.zeros_like(hazy01), False
            t, airlight = torch.ones_like(hazy01[:1]), torch.zeros(3)
        hazy01 = hazy01.contiguous()
        return {
            "target": (hazy01 * 2.0 - 1.0).clamp(-1.0, 1.0),
            "condition": condition.contiguous(),
            "is_cond": torch.tensor(is_cond),
            "prompt": self.prompt,
            "hazy_ref": hazy01,
            "transmission": t.contiguous(),
            "airlight": airlight,
        }

    def _synthetic_pair(self, syn_index: int, rng: np.random.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Degrade the full clean image, then crop it, the hazy image and t with one window.

        Returns (clean01 (3,S,S), hazy01 (3,S,S) in [0,1], t (1,S,S) in (0,1], A (3,) float32).
        """
        clean_path = self.syn_paths[syn_index]
        depth_path = self.depth_paths[syn_index]
        clean01 = load_rgb01(clean_path)
        depth = np.load(depth_path, allow_pickle=False)
        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[:, :, 0]
        if depth.shape != tuple(clean01.shape[1:]):
            raise DataError(depth_path, f"depth map shape {depth.shape} != image size "
                                        f"{tuple(clean01.shape[1:])} of {clean_path}")
        hazy_hwc, info = degrade(to_hwc(clean01), depth, rng, self.degradation)
        t = torch.from_numpy(transmission(normalize_depth(depth), info["beta"]).astype(np.float32))[None]
        stack = random_crop(torch.cat([clean01, to_chw(hazy_hwc), t]), self.crop_size, rng)
        return stack[:3], stack[3:6], stack[6:], torch.from_numpy(np.asarray(info["A"], dtype=np.float32))
