"""The published resize/pad geometry of the inference scripts: an input (3,H,W) in [0,1] is resized so its short side
is at least ``min_short_side`` (torchvision ``Resize``: bicubic, antialiased, long side truncated, the overshoot kept)
and zero-padded right/bottom to multiples of ``pad_multiple``; the output is cropped, clipped and resized back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from utils.image_io import resize01


@dataclass(frozen=True)
class Geometry:
    """orig (H,W) -> resized (short side >= min_short) -> padded (multiples of ``multiple``)."""

    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]


def short_side_resized_hw(h: int, w: int, short: int) -> tuple[int, int]:
    """(H,W) of an (H,W) tensor after torchvision ``Resize(short)``, the published upscale.

    Computed by torchvision itself on a shape-only (meta) tensor, so its rule holds exactly: the short side (the
    width when ``w <= h``, squares included; the height otherwise) becomes ``short`` and the other side
    ``int(short · long / short_side)``, truncated (143×160 -> 512×572, not 573).
    """
    probe = torch.empty(1, h, w, device="meta")
    out = TF.resize(probe, [short], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return int(out.shape[-2]), int(out.shape[-1])


def plan_geometry(h: int, w: int, min_short: int = 512, multiple: int = 64, max_pixels: int | None = None) -> Geometry:
    """Published preprocessing: if the short side is below ``min_short``, upscale as torchvision
    ``Resize(min_short)`` does (:func:`short_side_resized_hw`), then pad right/bottom to multiples of ``multiple``.
    Raises ValueError above ``max_pixels``."""
    rh, rw = short_side_resized_hw(h, w, min_short) if min(h, w) < min_short else (h, w)
    ph, pw = -(-rh // multiple) * multiple, -(-rw // multiple) * multiple
    if max_pixels is not None and ph * pw > max_pixels:
        raise ValueError(f"{w}x{h} image becomes {pw}x{ph} after the published resize/pad, above "
                         f"inference.max_pixels={max_pixels}")
    return Geometry((h, w), (rh, rw), (ph, pw))


def to_model_input(img01: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(3,H,W) in [0,1] -> (1,3,Hp,Wp): resized (bicubic, antialiased) and zero-padded right/bottom.

    As published, the bicubic result is not clamped: its overshoot (e.g. -0.016 or 1.004 next to edges) goes to
    the model, so values may leave [0,1] slightly.
    """
    x = img01[None]
    if geom.resized_hw != geom.orig_hw:
        x = resize01(x, geom.resized_hw)
    ph, pw = geom.padded_hw[0] - geom.resized_hw[0], geom.padded_hw[1] - geom.resized_hw[1]
    return F.pad(x, (0, pw, 0, ph))


def from_model_output(out01: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(1,C,Hp,Wp) in ~[0,1] -> (C,H,W) in [0,1], in the published order: crop the padding, clip to [0,1], resize
    back to the original size (bicubic, antialiased; this can overshoot again).

    The final clamp to [0,1] keeps the range contract; it cannot change the 8-bit result of
    :func:`utils.image_io.save_png01`, which saturates below 0 and above 1 the same way.
    """
    x = out01[..., : geom.resized_hw[0], : geom.resized_hw[1]].float().clamp(0, 1)
    if geom.resized_hw != geom.orig_hw:
        x = resize01(x, geom.orig_hw)
    return x.clamp(0, 1)[0]
