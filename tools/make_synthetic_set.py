"""Build a small RIDCP-style synthetic set from a folder of clean images.

Writes OUT/rgb_500/<stem>.jpg (short side resized to --size, JPEG quality 95) and
OUT/depth_500/<stem>.npy (float32 (H,W) in [0,1], RIDCP convention: 1 = nearest,
since t = exp(-(1 - depth) * 2 * beta) is 1 at depth 1). No depth network is used:
depth comes from ``dataset.degradation.depth_proxy`` (vertical ramp blended with
blurred inverted luminance). Unreadable inputs are skipped and reported; writes are
atomic; the input folder is never written to.

Usage: python -m tools.make_synthetic_set --input DIR --out DIR [--size 512]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from dataset.degradation import depth_proxy
from utils.atomic import atomic_write
from utils.image_io import ImageReadError, list_images, load_rgb01, resize01, tensor01_to_pil

LOG = logging.getLogger("make_synthetic_set")


def make_pair(image_path: Path, rgb_dir: Path, depth_dir: Path, size: int) -> None:
    """Write the resized clean JPEG and its proxy depth map for one input image."""
    img01 = load_rgb01(image_path)
    height, width = img01.shape[1:]
    scale = size / min(height, width)
    new_size = (max(1, round(height * scale)), max(1, round(width * scale)))
    img01 = resize01(img01[None], new_size)[0].clamp(0.0, 1.0)
    depth01 = depth_proxy(img01.permute(1, 2, 0).numpy()).astype(np.float32)
    pil = tensor01_to_pil(img01)
    atomic_write(rgb_dir / f"{image_path.stem}.jpg", lambda f: pil.save(f, format="JPEG", quality=95))
    atomic_write(depth_dir / f"{image_path.stem}.npy", lambda f: np.save(f, depth01, allow_pickle=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="folder of clean images")
    parser.add_argument("--out", required=True, type=Path, help="output folder (gets rgb_500/, depth_500/)")
    parser.add_argument("--size", type=int, default=512, help="short side of the written images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.size < 1:
        parser.error(f"--size must be positive, got {args.size}")
    if not args.input.is_dir():
        parser.error(f"--input is not a folder: {args.input}")
    rgb_dir, depth_dir = args.out / "rgb_500", args.out / "depth_500"
    input_dir = args.input.resolve()
    if input_dir in (rgb_dir.resolve(), depth_dir.resolve()):
        parser.error(f"output folder {rgb_dir} or {depth_dir} is the input folder; refusing to overwrite inputs")
    images = list_images(args.input)
    if not images:
        parser.error(f"no .png/.jpg/.jpeg images in {args.input}")
    rgb_dir.mkdir(parents=True, exist_ok=True)
    depth_dir.mkdir(parents=True, exist_ok=True)

    written, skipped, stems = 0, [], set()
    for image_path in images:
        if image_path.stem in stems:
            skipped.append(f"{image_path}: another input has the same stem '{image_path.stem}'")
            continue
        try:
            make_pair(image_path, rgb_dir, depth_dir, args.size)
        except ImageReadError as err:
            skipped.append(str(err))
            continue
        stems.add(image_path.stem)
        written += 1
    LOG.info("wrote %d pairs to %s", written, args.out)
    for reason in skipped:
        LOG.warning("skipped %s", reason)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
