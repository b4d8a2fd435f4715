"""Side-by-side comparison grids: hazy | each method | extra panels | reference, one PNG per image.

    python -m tools.compare_grid --hazy BENCH/hazy --methods dcp=BENCH/runs/dcp accsamp=results/accsamp \
        [--reference BENCH/clean] [--extra estimate=results/accsamp transmission=results/accsamp] \
        --out grids/ [--height 256]

For each hazy image ``<stem>``, a method folder must hold ``<stem>.<ext>``; an extra panel
``LABEL=DIR`` is ``DIR/<stem>_<LABEL>.<ext>``, else ``DIR/<stem>.<ext>`` (so ``estimate=`` and
``transmission=`` pick up the AccSamp intermediates ``<stem>_estimate.png`` /
``<stem>_transmission.png`` of inference_accsamp.py with inference.save_intermediates=True).
The reference is found by the evaluate.py rule (``<stem>``, or ``<name>`` for ``<name>_<k>``).
Missing panels are drawn grey and labelled "missing". Every panel is scaled
(bicubic, antialiased) to ``--height`` pixels, labelled above with PIL's default font, and the grid
is written atomically to OUT/<stem>_grid.png. Unreadable hazy images are skipped and reported.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw, ImageFont

from metrics.evaluation import reference_for
from utils.image_io import (IMAGE_EXTS, ImageReadError, list_images, load_rgb01, pil_to_tensor01,
                            resize01, save_png01, tensor01_to_pil)

LOG = logging.getLogger("compare_grid")
LABEL_HEIGHT = 16
GAP = 4


def find_panel(folder: Path, stem: str, suffixes: tuple[str, ...] = ("",)) -> Optional[Path]:
    """First existing ``folder/<stem><suffix><ext>`` over suffixes x IMAGE_EXTS (either case), else None."""
    for suffix in suffixes:
        for ext in IMAGE_EXTS:
            for cand in (folder / f"{stem}{suffix}{ext}", folder / f"{stem}{suffix}{ext.upper()}"):
                if cand.is_file():
                    return cand
    return None


def _panel(img01: Optional[torch.Tensor], label: str, height: int) -> Image.Image:
    """Label strip above the image scaled to ``height`` (grey placeholder when img01 is None)."""
    if img01 is None:
        body = Image.new("RGB", (height, height), (128, 128, 128))
    else:
        h, w = img01.shape[-2:]
        new_w = max(1, round(w * height / h))
        body = tensor01_to_pil(resize01(img01[None], (height, new_w))[0].clamp(0, 1))
    canvas = Image.new("RGB", (body.width, height + LABEL_HEIGHT), (255, 255, 255))
    canvas.paste(body, (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 2), label, fill=(0, 0, 0), font=ImageFont.load_default())
    return canvas


def make_grid(panels: list[tuple[str, Optional[torch.Tensor]]], height: int) -> torch.Tensor:
    """Labelled panels in one row -> (3, height + label strip, total width) in [0,1]."""
    images = [_panel(img, label, height) for label, img in panels]
    width = sum(im.width for im in images) + GAP * (len(images) - 1)
    grid = Image.new("RGB", (width, height + LABEL_HEIGHT), (255, 255, 255))
    x = 0
    for im in images:
        grid.paste(im, (x, 0))
        x += im.width + GAP
    return pil_to_tensor01(grid)


def _load_or_none(path: Optional[Path], what: str, failures: list[str]) -> Optional[torch.Tensor]:
    if path is None:
        return None
    try:
        return load_rgb01(path)
    except ImageReadError as err:
        failures.append(f"{what}: {err}")
        return None


def build_grids(hazy: Path, methods: list[tuple[str, Path]], out: Path, reference: Optional[Path] = None,
                extras: tuple[tuple[str, Path], ...] = (), height: int = 256) -> tuple[list[Path], list[str]]:
    """Write one grid per hazy image; returns (written paths, problems as text)."""
    if height < 8:
        raise ValueError(f"--height must be at least 8, got {height}")
    refs = {p.stem: p for p in list_images(reference)} if reference is not None else {}
    written, problems = [], []
    for path in list_images(hazy):
        try:
            panels: list[tuple[str, Optional[torch.Tensor]]] = [("hazy", load_rgb01(path))]
        except ImageReadError as err:
            problems.append(str(err))
            continue
        for label, folder, suffixes in [*((lb, f, ("",)) for lb, f in methods),
                                        *((lb, f, (f"_{lb}", "")) for lb, f in extras)]:
            img = _load_or_none(find_panel(folder, path.stem, suffixes), label, problems)
            panels.append((label if img is not None else f"{label} (missing)", img))
        if reference is not None:
            img = _load_or_none(reference_for(path.stem, refs), "reference", problems)
            panels.append(("reference" if img is not None else "reference (missing)", img))
        dst = out / f"{path.stem}_grid.png"
        save_png01(make_grid(panels, height), dst)
        written.append(dst)
    return written, problems


def _named_folder(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got '{text}'")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hazy | methods | extras | reference grids, one PNG per image")
    parser.add_argument("--hazy", required=True, type=Path, help="folder of hazy inputs (defines the images)")
    parser.add_argument("--methods", nargs="*", type=_named_folder, default=[], metavar="LABEL=DIR",
                        help="method result folders (<stem>.png)")
    parser.add_argument("--extra", nargs="*", type=_named_folder, default=[], metavar="LABEL=DIR",
                        help="extra panel folders: <stem>_<LABEL>.png, else <stem>.png")
    parser.add_argument("--reference", type=Path, help="folder of clean references (optional)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <stem>_grid.png")
    parser.add_argument("--height", type=int, default=256, help="panel height in pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    inputs = [args.hazy, *(f for _, f in args.methods), *(f for _, f in args.extra)]
    if args.reference is not None:
        inputs.append(args.reference)
    missing = [str(p) for p in inputs if not p.is_dir()]
    if missing:
        parser.error(f"folder(s) not found: {', '.join(missing)}")
    if args.out.resolve() in {p.resolve() for p in inputs}:
        parser.error("--out must differ from every input folder")
    try:
        written, problems = build_grids(args.hazy, args.methods, args.out, args.reference, tuple(args.extra),
                                        args.height)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        LOG.error("%s", err)
        return 2
    for msg in problems:
        LOG.warning("%s", msg)
    LOG.info("wrote %d grids to %s (%d problems)", len(written), args.out, len(problems))
    return 1 if problems and not written else 0


if __name__ == "__main__":
    sys.exit(main())
