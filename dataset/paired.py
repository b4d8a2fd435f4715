"""Stage-2 (DiffDehaze) training data: static hazy/clean pairs, plus the seeding and
cropping helpers that the stage-1 dataset shares.

Matches ``StaticPairedData`` of the "Learning Hazing to Dehazing" (CVPR 2025)
reference code: one random crop window shared by both images, then JPEG on the
hazy crop with prob 0.5 at quality ~ U{30..95}; target = clean in [-1,1],
condition = hazy in [0,1], the published long stage-2 prompt.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.checks import pair_hazy_with_clean, require_folder, require_images, verify_images
from dataset.degradation import jpeg_compress
from utils.image_io import load_rgb01, resize01

STAGE2_PROMPT = (
    "sharp, clear-sky, vivid, well-defined, brightly lit, unobstructed, detailed, "
    "balanced composition, neutral-toned, natural contrast, evenly exposed, modern aesthetic, "
    "minimal atmospheric distortion, realistic yet polished look, high visual clarity, "
    "refreshing openness"
)


class SeededData(Dataset):
    """Base for datasets whose every random choice comes from a per-sample generator.

    seed=int: sample ``index`` of epoch ``e`` uses numpy.random.default_rng([seed, e, index]),
    so a fixed seed gives the same sample for the same (epoch, index) in any process or
    worker; call ``set_epoch`` before each epoch for fresh crops (with non-persistent
    DataLoader workers, which copy the dataset when each epoch's iterator starts).
    seed=None: the per-sample seed is drawn from torch's global RNG, which DataLoader
    seeds per worker from its base seed, so ``torch.manual_seed`` makes a run repeatable.
    """

    def __init__(self, seed: int | None) -> None:
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch mixed into per-sample seeds (only matters when seed is set)."""
        self.epoch = int(epoch)

    def sample_rng(self, index: int) -> np.random.Generator:
        """The generator for one sample (see class doc)."""
        if self.seed is None:
            return np.random.default_rng([int(torch.randint(0, 2**62, ()).item()), index])
        return np.random.default_rng([self.seed, self.epoch, index])


def resize_one01(img01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (antialiased when shrinking). img01: (C,H,W) in [0,1] -> (C,h,w) in [0,1]."""
    if tuple(img01.shape[1:]) == tuple(size):
        return img01
    return resize01(img01[None], size)[0].clamp(0.0, 1.0)


def random_crop(img01: torch.Tensor, crop_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Random crop_size x crop_size window, as the reference ``random_crop``.

    img01: (C,H,W) in [0,1], C may stack several aligned images so they share the window.
    If H or W < crop_size the image is first upscaled (bicubic) so its short side is
    crop_size. Returns (C,crop_size,crop_size) in [0,1].
    """
    height, width = img01.shape[1:]
    if min(height, width) < crop_size:
        scale = crop_size / min(height, width)
        height = max(crop_size, round(height * scale))
        width = max(crop_size, round(width * scale))
        img01 = resize_one01(img01, (height, width))
    top = int(rng.integers(0, height - crop_size + 1))
    left = int(rng.integers(0, width - crop_size + 1))
    return img01[:, top:top + crop_size, left:left + crop_size]


def to_hwc(img01: torch.Tensor) -> np.ndarray:
    """(3,H,W) tensor -> (H,W,3) float32 numpy array (same values)."""
    return img01.permute(1, 2, 0).numpy().astype(np.float32)


def to_chw(img01: np.ndarray) -> torch.Tensor:
    """(H,W,3) numpy array -> (3,H,W) float32 tensor (same values)."""
    return torch.from_numpy(np.ascontiguousarray(img01.transpose(2, 0, 1))).float()


class StaticPairedData(SeededData):
    """Stage-2 pairs: hazy '<name>_<k>.*' in hazy_folder with clean '<name>.jpg' in clean_folder.

    Hazy files: any of utils.image_io.IMAGE_EXTS (the reference globbed *.png). Clean
    file: '<name>' + the first of .jpg/.png/.jpeg that exists; a hazy stem without a
    trailing '_<digits>' pairs with the clean file of the same stem. A clean image
    whose size differs from its hazy image is resized (bicubic) to the hazy size.
    Length = number of hazy images. Folders, pairing and image headers are checked
    at construction (``DataError`` names the first bad path).

    Sample: target (3,S,S) clean in [-1,1]; condition (3,S,S) hazy in [0,1] (after
    JPEG); is_cond bool tensor True; prompt str; hazy_ref = condition.
    """

    def __init__(
        self,
        hazy_folder: str | Path,
        clean_folder: str | Path,
        crop_size: int = 512,
        prompt: str = STAGE2_PROMPT,
        jpeg_p: float = 0.5,
        jpeg_quality: tuple[int, int] = (30, 95),
        seed: int | None = None,
        verify: bool = True,
    ) -> None:
        super().__init__(seed)
        hazy_paths = require_images(hazy_folder)
        clean_dir = require_folder(clean_folder)
        self.pairs = pair_hazy_with_clean(hazy_paths, clean_dir)
        if verify:
            verify_images([path for pair in self.pairs for path in pair])
        self.crop_size = crop_size
        self.prompt = prompt
        self.jpeg_p = jpeg_p
        self.jpeg_quality = jpeg_quality

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, object]:
        rng = self.sample_rng(index)
        hazy_path, clean_path = self.pairs[index]
        hazy01 = load_rgb01(hazy_path)
        clean01 = resize_one01(load_rgb01(clean_path), tuple(hazy01.shape[1:]))
        stack = random_crop(torch.cat([clean01, hazy01]), self.crop_size, rng)
        clean01, hazy01 = stack[:3], stack[3:]
        if rng.random() < self.jpeg_p:
            quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
            hazy01 = to_chw(jpeg_compress(to_hwc(hazy01), quality))
        hazy01 = hazy01.clamp(0.0, 1.0).contiguous()
        return {
            "target": (clean01 * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous(),
            "condition": hazy01,
            "is_cond": torch.tensor(True),
            "prompt": self.prompt,
            "hazy_ref": hazy01,
        }

