"""Image file I/O and resizing for HCD-YC.

All tensors use the ``img01`` convention: float32, RGB, values in [0, 1].
Reading relies on Pillow with ``ImageFile.LOAD_TRUNCATED_IMAGES`` left at its default
(False), so truncated files raise :class:`ImageReadError` instead of being silently padded.
EXIF orientation is not applied: pixels are returned as stored, so hazy/clean pairs keep
matching sizes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from utils.atomic import atomic_write

PathLike = Union[str, os.PathLike]

IMAGE_EXTS = (".png", ".jpg", ".jpeg")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIXTEEN_BIT_COLOUR_RAWMODES = ("RGB;16B", "RGBA;16B")
"""Pillow's raw modes of 16-bit colour PNGs, which it would decode to 8 bits; read by torchvision instead."""


class ImageReadError(Exception):
    """An image file could not be decoded; carries the offending ``path`` and a ``reason``."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def list_images(folder: PathLike) -> list[Path]:
    """Files directly inside ``folder`` whose suffix is in IMAGE_EXTS (case-insensitive).

    Hidden files (leading '.') are skipped; the result is sorted by file name.
    Raises FileNotFoundError / NotADirectoryError naming ``folder``.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    files = [
        p for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS
    ]
    return sorted(files, key=lambda p: p.name)


def pil_to_tensor01(img: Image.Image) -> torch.Tensor:
    """PIL image of any common mode -> (3,H,W) float32 in [0,1].

    16-bit greyscale modes ('I;16*', 'I') are divided by 65535 and clipped; palette, L, LA,
    RGBA, CMYK, 1-bit, ... are converted to RGB by Pillow (alpha is dropped, not composited).
    Raises ValueError for modes with no defined [0,1] scaling (e.g. float 'F').
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        gray = torch.from_numpy(np.clip(arr, 0.0, 1.0))
        return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
    if img.mode == "F":
        raise ValueError("float image mode 'F' has no defined value range")
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor01_to_pil(img01: torch.Tensor) -> Image.Image:
    """(3,H,W) tensor in ~[0,1] -> 8-bit RGB PIL image.

    The conversion is torchvision ``save_image``'s (the published scripts' writer): ``x·255 + 0.5`` clamped to
    [0,255] and truncated, i.e. round-half-up with values outside [0,1] saturating at 0 / 255.
    """
    if img01.ndim != 3 or img01.shape[0] != 3:
        raise ValueError(f"expected a (3,H,W) tensor, got shape {tuple(img01.shape)}")
    if not torch.isfinite(img01).all():
        raise ValueError("image tensor contains NaN or Inf")
    arr = (img01.detach().float().cpu() * 255.0 + 0.5).clamp(0.0, 255.0).to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())


def conversion_note(path: PathLike) -> str:
    """How load_rgb01 turns this file into 8-bit-range RGB, read from the header only ('' for plain RGB).

    E.g. 'grayscale->RGB', 'alpha dropped', '16-bit grayscale->RGB', '16-bit RGB (full precision)'. Raises
    ImageReadError like load_rgb01.
    """
    p = Path(path)
    try:
        with Image.open(p) as img:
            mode, has_transparency, deep = img.mode, "transparency" in img.info, is_sixteen_bit_colour(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(p, f"corrupt, truncated or unsupported image ({exc})") from exc
    notes = ["16-bit RGB (full precision)"] if deep else []
    if mode in _SIXTEEN_BIT_MODES:
        notes.append("16-bit grayscale->RGB")
    elif mode in ("L", "LA", "1", "La"):
        notes.append("grayscale->RGB")
    elif mode in ("P", "PA"):
        notes.append("palette->RGB")
    elif mode not in ("RGB", "RGBA", "RGBa"):
        notes.append(f"{mode}->RGB")
    if "A" in mode or "a" in mode or has_transparency:
        notes.append("alpha dropped")
    return ", ".join(notes)


def is_sixteen_bit_colour(img: Image.Image) -> bool:
    """Whether an opened (not yet loaded) image is a 16-bit-per-channel RGB(A) PNG."""
    return img.format == "PNG" and bool(img.tile) and img.tile[0][3] in _SIXTEEN_BIT_COLOUR_RAWMODES


def sixteen_bit(path: PathLike) -> bool:
    """Whether ``path`` holds 16 bits per channel (16-bit grey or colour PNG), read from the header only."""
    try:
        with Image.open(path) as img:
            return img.mode in _SIXTEEN_BIT_MODES or is_sixteen_bit_colour(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _decode_png16(path: Path) -> torch.Tensor:
    """A 16-bit colour PNG at full precision (torchvision's libpng decoder): (3,H,W) float32 = value / 65535, alpha
    dropped."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    try:
        raw = decode_png(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise ImageReadError(path, f"corrupt or truncated 16-bit PNG ({(str(exc).splitlines() or [''])[0]})") from exc
    return raw.to(torch.int32).float().div_(65535.0)


def load_rgb01(path: PathLike, max_pixels: int | None = None) -> torch.Tensor:
    """Read an image file -> (3,H,W) float32 in [0,1].

    Raises ImageReadError(path, reason) for missing, non-image, truncated or unsupported files, and
    for images of more than ``max_pixels`` pixels (checked from the header, before decoding).
    16-bit PNGs (grey and colour) keep full precision (value / 65535); 8-bit files give multiples of 1/255.
    """
    p = Path(path)
    try:
        with Image.open(p) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageReadError(p, f"{img.width}x{img.height} image is above the limit of {max_pixels} pixels")
            if is_sixteen_bit_colour(img):
                return _decode_png16(p)
            img.load()
            return pil_to_tensor01(img)
    except FileNotFoundError as exc:
        raise ImageReadError(p, "file not found") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(p, "not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(p, f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(p, f"corrupt, truncated or unsupported image ({exc})") from exc


def image_hw(path: PathLike) -> tuple[int, int] | None:
    """(height, width) from the file header without decoding the pixels; None when the header is unreadable."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def save_png01(img01: torch.Tensor, path: PathLike) -> None:
    """Write ``img01`` (3,H,W) in [0,1] as an 8-bit RGB PNG, atomically.

    Values are converted as torchvision ``save_image`` does (see :func:`tensor01_to_pil`) and Pillow encodes
    the PNG with its defaults, as there, so the bytes equal ``save_image``'s for the same tensor. The PNG is
    written to a temporary file in the destination folder and moved into place with os.replace, so readers
    never see a partial file. Parent folders are created. Raises ValueError for a wrong shape or non-finite
    values.
    """
    dst = Path(path)
    pil = tensor01_to_pil(img01)
    atomic_write(dst, lambda handle: pil.save(handle, format="PNG"))


def resize01(img01: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """Bicubic, antialiased resize of (B,C,H,W) -> (B,C,h,w) with (h, w) = ``size_hw``.

    Uses F.interpolate(mode="bicubic", antialias=True, align_corners=False). The result is
    NOT clamped: bicubic overshoot may leave [0,1]; callers clamp when needed.
    """
    if img01.ndim != 4:
        raise ValueError(f"expected a (B,C,H,W) tensor, got shape {tuple(img01.shape)}")
    h, w = (int(s) for s in size_hw)
    if h < 1 or w < 1:
        raise ValueError(f"target size must be positive, got {(h, w)}")
    if not img01.is_floating_point():
        raise TypeError(f"expected a floating point tensor, got {img01.dtype}")
    return F.interpolate(img01, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
