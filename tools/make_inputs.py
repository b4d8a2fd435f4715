"""Make a few sample hazy images for inputs/ from scikit-image's bundled photos.

The photos (astronaut, coffee, chelsea, rocket) ship with scikit-image and are
public domain / freely licensed (see skimage.data). Each is resized so its long
side is --max-side, then hazed deterministically with the atmospheric model
I = J*t + A*(1-t), t = exp(-(1 - depth) * 2 * beta) (RIDCP's form, see
dataset.degradation.haze_formula) on the proxy depth of
dataset.degradation.depth_proxy; fixed beta and A per image, no noise or JPEG.

Needs the optional tool dependency scikit-image (pip install scikit-image).
Usage: python -m tools.make_inputs [--out inputs] [--max-side 384]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from dataset.degradation import depth_proxy, haze_formula
from utils.image_io import resize01, save_png01

LOG = logging.getLogger("make_inputs")

# name in skimage.data -> (beta, airlight RGB)
SAMPLES: dict[str, tuple[float, tuple[float, float, float]]] = {
    "astronaut": (0.9, (0.82, 0.84, 0.86)),
    "coffee": (1.0, (0.86, 0.85, 0.82)),
    "chelsea": (0.8, (0.80, 0.82, 0.85)),
    "rocket": (1.2, (0.84, 0.86, 0.90)),
}


def make_hazy(clean_u8: np.ndarray, max_side: int, beta: float, airlight: tuple[float, ...]) -> torch.Tensor:
    """clean_u8: (H,W,3) uint8 -> hazy (3,h,w) in [0,1] with max(h,w) = max_side."""
    clean01 = torch.from_numpy(clean_u8[..., :3].copy()).permute(2, 0, 1).float() / 255.0
    height, width = clean01.shape[1:]
    scale = max_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    clean01 = resize01(clean01[None], size)[0].clamp(0.0, 1.0)
    clean_hwc = clean01.permute(1, 2, 0).numpy()
    hazy_hwc = np.clip(haze_formula(clean_hwc, depth_proxy(clean_hwc), beta, np.array(airlight)), 0.0, 1.0)
    return torch.from_numpy(hazy_hwc.transpose(2, 0, 1).astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "inputs")
    parser.add_argument("--max-side", type=int, default=384, help="long side of the written images (<= 512)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 1 <= args.max_side <= 512:
        parser.error(f"--max-side must be in [1, 512], got {args.max_side}")
    try:
        import skimage.data
    except ImportError:
        parser.error("scikit-image is needed for its bundled photos: pip install scikit-image")

    for name, (beta, airlight) in SAMPLES.items():
        hazy01 = make_hazy(getattr(skimage.data, name)(), args.max_side, beta, airlight)
        path = args.out / f"{name}.png"
        save_png01(hazy01, path)
        LOG.info("wrote %s (%dx%d, %.0f KB)", path, hazy01.shape[2], hazy01.shape[1], path.stat().st_size / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
