"""Build the synthetic dehazing benchmark: hazy/clean pairs anyone can regenerate bit for bit.

Clean images are the public-domain / CC0 photos bundled inside the scikit-image wheel
(``skimage.data``: astronaut, coffee, chelsea, rocket; read from the installed package, no
download), or every image of ``--source DIR``. Each clean image J (RGB in [0,1], sRGB values
used directly, as in RESIDE-style synthesis) is hazed with the atmospheric scattering model

    I = J t + A (1 - t),   t = exp(-beta d)

for every (beta, A) pair of ``--betas`` x ``--airlights`` (grey airlight A in all channels),
with the depth proxy d(y) = d_near + (1 - d_near) (1 - y / (H - 1)): a vertical ramp, farthest
(d = 1) at the top row and d_near at the bottom row (no depth network; a camera looking at a
scene with the ground at the bottom). Outputs (8-bit PNG, atomic writes):

    OUT/clean/<name>.png     OUT/hazy/<name>_<k>.png     OUT/manifest.json

where k indexes the (beta, A) list; the manifest records every pair with beta, A and the proxy.
There is no randomness.

    python -m tools.make_benchmark --out data/bench [--max-side 512] [--betas 0.8,1.6,2.4]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from haze.scattering import rehaze
from utils.atomic import write_text_atomic
from utils.image_io import ImageReadError, list_images, load_rgb01, pil_to_tensor01, resize01, save_png01

LOG = logging.getLogger("make_benchmark")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DEFAULT_BETAS = (0.8, 1.6, 2.4)
DEFAULT_AIRLIGHTS = (0.8, 0.95)
DEFAULT_D_NEAR = 0.1


def depth_ramp(h: int, w: int, d_near: float = DEFAULT_D_NEAR) -> torch.Tensor:
    """Depth proxy (1,1,H,W): d = d_near + (1 - d_near) (1 - y/(H-1)); 1 at the top row, d_near at the bottom."""
    y = torch.linspace(0.0, 1.0, h, dtype=torch.float64) if h > 1 else torch.zeros(1, dtype=torch.float64)
    d = d_near + (1.0 - d_near) * (1.0 - y)
    return d.view(1, 1, h, 1).expand(1, 1, h, w)


def haze(clean01: torch.Tensor, beta: float, airlight: float, depth: torch.Tensor) -> torch.Tensor:
    """Atmospheric model I = J t + A (1 - t), t = exp(-beta d). clean01: (B,3,H,W) in [0,1]; depth (B|1,1,H,W)."""
    t = torch.exp(-beta * depth).to(clean01.dtype)
    return rehaze(clean01, t, clean01.new_full((clean01.shape[0], 3), airlight))


def _limit_size(img01: torch.Tensor, max_side: int) -> torch.Tensor:
    """(3,H,W) -> downscaled (bicubic, antialiased, clamped) so the long side is <= max_side (0: unchanged)."""
    h, w = img01.shape[-2:]
    if max_side <= 0 or max(h, w) <= max_side:
        return img01
    s = max_side / max(h, w)
    return resize01(img01[None], (max(1, round(h * s)), max(1, round(w * s))))[0].clamp(0, 1)


def skimage_photos(names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Bundled scikit-image photos as (name, (3,H,W) in [0,1]). Raises ImportError without scikit-image."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError("scikit-image is needed for the default photos (pip install scikit-image), "
                          "or pass --source DIR with your own clean images") from exc
    from PIL import Image

    out = []
    for name in names:
        if name not in SKIMAGE_PHOTOS:
            raise ValueError(f"unknown photo '{name}'; bundled choices: {', '.join(SKIMAGE_PHOTOS)}")
        out.append((name, pil_to_tensor01(Image.fromarray(np.ascontiguousarray(getattr(data, name)())))))
    return out


def folder_photos(folder: Path) -> list[tuple[str, torch.Tensor]]:
    """Readable images of ``folder`` as (stem, (3,H,W) in [0,1]); unreadable ones are logged and skipped."""
    out = []
    for path in list_images(folder):
        try:
            out.append((path.stem, load_rgb01(path)))
        except ImageReadError as err:
            LOG.warning("skipped %s: %s", path.name, err.reason)
    return out


def build_benchmark(photos: list[tuple[str, torch.Tensor]], out: Path, betas: list[float],
                    airlights: list[float], max_side: int = 512, d_near: float = DEFAULT_D_NEAR,
                    source: str = "skimage.data") -> dict:
    """Write OUT/clean, OUT/hazy and OUT/manifest.json; returns the manifest."""
    if not photos:
        raise ValueError("no clean images to build a benchmark from")
    levels = [(float(b), float(a)) for b in betas for a in airlights]
    (out / "clean").mkdir(parents=True, exist_ok=True)
    (out / "hazy").mkdir(parents=True, exist_ok=True)
    pairs = []
    for name, img01 in photos:
        clean = _limit_size(img01, max_side)
        save_png01(clean, out / "clean" / f"{name}.png")
        # Haze is applied to the 8-bit clean image that is written, so the pair is exactly consistent.
        clean8 = torch.round(clean.double() * 255.0) / 255.0
        depth = depth_ramp(*clean.shape[-2:], d_near=d_near)
        for k, (beta, airlight) in enumerate(levels):
            hazy = haze(clean8[None], beta, airlight, depth)[0]
            save_png01(hazy, out / "hazy" / f"{name}_{k}.png")
            pairs.append({"hazy": f"hazy/{name}_{k}.png", "clean": f"clean/{name}.png", "k": k,
                          "beta": beta, "airlight": airlight, "size_hw": list(clean.shape[-2:])})
    manifest = {
        "model": "I = J*t + A*(1-t), t = exp(-beta*d), on sRGB values in [0,1], 8-bit PNG output",
        "depth_proxy": {"kind": "vertical_ramp", "formula": "d(y) = d_near + (1 - d_near) * (1 - y/(H-1))",
                        "d_near": d_near, "far": "top row (d = 1)"},
        "levels": [{"k": k, "beta": b, "airlight": a} for k, (b, a) in enumerate(levels)],
        "source": source,
        "max_side": max_side,
        "pairs": pairs,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from exc
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="benchmark folder to write")
    parser.add_argument("--source", type=Path, help="folder of clean images (default: scikit-image's bundled photos)")
    parser.add_argument("--images", default=",".join(SKIMAGE_PHOTOS), help="scikit-image photos to use")
    parser.add_argument("--max-side", type=int, default=512, help="downscale so the long side is <= this (0: keep)")
    parser.add_argument("--betas", type=_floats, default=list(DEFAULT_BETAS), help="scattering coefficients")
    parser.add_argument("--airlights", type=_floats, default=list(DEFAULT_AIRLIGHTS), help="grey airlight values")
    parser.add_argument("--d-near", type=float, default=DEFAULT_D_NEAR, help="depth proxy at the bottom row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.source is not None:
        if args.source.resolve() in (args.out.resolve(), (args.out / "clean").resolve(), (args.out / "hazy").resolve()):
            parser.error("--out must not be (or contain as clean/ or hazy/) the --source folder")
        photos, source = folder_photos(args.source), str(args.source)
    else:
        names = [n.strip() for n in args.images.split(",") if n.strip()]
        photos = skimage_photos(names)
        import skimage

        source = f"skimage.data {','.join(names)} (bundled in scikit-image {skimage.__version__})"
    manifest = build_benchmark(photos, args.out, args.betas, args.airlights, args.max_side, args.d_near, source)
    LOG.info("wrote %d hazy/clean pairs from %d images to %s", len(manifest["pairs"]), len(photos), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
