"""Start-up checks for training data folders.

Each check raises ``DataError`` naming the first offending path, so bad data
fails when a dataset is built, not later inside a DataLoader worker. Images are
decoded completely, so a truncated JPEG is caught too.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from utils.image_io import list_images

CLEAN_EXTS = (".jpg", ".png", ".jpeg")
_COPY_SUFFIX = re.compile(r"^(?P<name>.+)_(?P<k>\d+)$")


class DataError(ValueError):
    """Bad or missing training data; ``path`` is the first offending file/folder."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def require_folder(folder: str | Path) -> Path:
    """Return ``folder`` as a Path; DataError if it is missing or not a directory."""
    path = Path(folder)
    if not path.exists():
        raise DataError(path, "folder does not exist")
    if not path.is_dir():
        raise DataError(path, "not a folder")
    return path


def require_images(folder: str | Path) -> list[Path]:
    """Sorted image files (utils.image_io.IMAGE_EXTS) of an existing, non-empty folder."""
    path = require_folder(folder)
    images = list_images(path)
    if not images:
        raise DataError(path, "folder holds no images (.png/.jpg/.jpeg)")
    return images


def verify_image(path: Path) -> tuple[int, int]:
    """Decode the whole image (``Image.load``: a truncated JPEG fails here, unlike ``Image.verify``, which does not
    decode JPEG data); returns (H, W). DataError if it cannot be read completely."""
    try:
        with Image.open(path) as img:
            img.load()
            width, height = img.size
    except Exception as err:  # PIL raises many types for broken files
        raise DataError(path, f"unreadable image ({type(err).__name__}: {err})") from err
    return height, width


def verify_images(paths: list[Path]) -> list[tuple[int, int]]:
    """``verify_image`` on each path (decoded in parallel threads: Pillow's decoders release the GIL); returns their
    (H, W) sizes in order, or raises DataError for the first bad path in that order."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(verify_image, paths))


def depth_path_for(image_path: Path, depth_folder: Path) -> Path:
    """RIDCP layout: rgb_500/<stem>.jpg has its depth in depth_500/<stem>.npy."""
    return depth_folder / f"{image_path.stem}.npy"


def require_depth_maps(
    image_paths: list[Path], depth_folder: Path, sizes: list[tuple[int, int]] | None = None
) -> list[Path]:
    """Depth map path per image; each must exist, load without pickle and be (H,W).

    sizes: optional (H, W) per image; when given, each depth map must match it.
    Only the .npy header is read (memory-mapped), not the data.
    """
    depth_paths = []
    for index, image_path in enumerate(image_paths):
        depth_path = depth_path_for(image_path, depth_folder)
        if not depth_path.is_file():
            raise DataError(depth_path, f"missing depth map for {image_path}")
        try:
            depth = np.load(depth_path, mmap_mode="r", allow_pickle=False)
        except Exception as err:
            raise DataError(depth_path, f"unreadable depth map ({type(err).__name__}: {err})") from err
        shape = tuple(depth.shape)
        if len(shape) == 3 and shape[2] == 1:
            shape = shape[:2]
        if len(shape) != 2:
            raise DataError(depth_path, f"depth map must be (H,W), got shape {tuple(depth.shape)}")
        if sizes is not None and shape != tuple(sizes[index]):
            raise DataError(depth_path, f"depth map shape {shape} != image size {tuple(sizes[index])}"
                                        f" of {image_path}")
        depth_paths.append(depth_path)
    return depth_paths


def clean_name_for(hazy_path: Path) -> str:
    """Clean-image stem for a hazy file: '<name>_<k>' -> '<name>', else the whole stem.

    The reference cut at the first underscore; cutting only a trailing '_<digits>'
    keeps names that contain underscores intact.
    """
    match = _COPY_SUFFIX.match(hazy_path.stem)
    return match.group("name") if match else hazy_path.stem


def pair_hazy_with_clean(hazy_paths: list[Path], clean_folder: Path) -> list[tuple[Path, Path]]:
    """(hazy, clean) pairs: hazy '<name>_<k>.*' with clean '<name>' + first of CLEAN_EXTS found.

    DataError naming the hazy file when no clean file matches.
    """
    pairs = []
    for hazy_path in hazy_paths:
        name = clean_name_for(hazy_path)
        candidates = [clean_folder / f"{name}{ext}" for ext in CLEAN_EXTS]
        found = [path for path in candidates if path.is_file()]
        if not found:
            raise DataError(hazy_path, f"no clean image {name}{{{','.join(CLEAN_EXTS)}}} in {clean_folder}")
        pairs.append((hazy_path, found[0]))
    return pairs
