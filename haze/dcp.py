"""Dark Channel Prior (He et al., CVPR 2009 / TPAMI 2011) in batched torch.

All images are ``img01``: (B,3,H,W) float in [0,1]. The functions ``dark_channel``,
``estimate_airlight`` and ``transmission`` follow the published DCP transmission used by the
AccSamp guidance of "Learning Hazing to Dehazing" (CVPR 2025): 15x15 dark channel, airlight
from the top 0.1 % dark-channel pixels, t = 1 - 0.95 * dark(I / A) clamped to [0.05, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from haze.filters import guided_filter, min_filter
from haze.scattering import recover
from utils.rules import Rule, is_int, is_number, optional, read_section

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_MIN_AIRLIGHT = 1e-6


def _check_img(img01: torch.Tensor, name: str = "img01") -> None:
    if img01.ndim != 4 or img01.shape[1] != 3:
        raise ValueError(f"{name} must be (B,3,H,W), got shape {tuple(img01.shape)}")


def dark_channel(img01: torch.Tensor, patch: int = 15) -> torch.Tensor:
    """Dark channel: per-pixel min over RGB, then a patch x patch min filter.

    img01: (B,3,H,W) -> (B,1,H,W), same value range as the input.
    """
    _check_img(img01)
    return min_filter(img01.amin(dim=1, keepdim=True), patch)


AIRLIGHT_TIES = ("all", "topk")


def estimate_airlight(img01: torch.Tensor, dark: torch.Tensor, top: float = 0.001, ties: str = "all") -> torch.Tensor:
    """Atmospheric light per image (He et al.): (B,3) in [0,1].

    img01: (B,3,H,W) in [0,1]; dark: its dark channel (B,1,H,W). Let n = max(1, int(H·W·top)) and c the n-th
    largest dark-channel value. The candidates are the brightest dark-channel pixels, and the airlight is the
    colour of the candidate with the largest R+G+B. On 8-bit images many pixels share the value c, so which of
    them are "the top n" is a matter of tie order; ``ties`` fixes it:

    - ``"all"`` (default): every pixel with dark >= c is a candidate; among equal largest R+G+B the first pixel
      in row-major order wins. The result depends only on the values, so CPU, CUDA and torch versions agree.
    - ``"topk"``: exactly the n pixels ``torch.topk`` returns and the first maximum among them, as the published
      AccSamp code does; with ties at c the choice depends on the device and the torch version.
    """
    _check_img(img01)
    b, _, h, w = img01.shape
    if dark.shape != (b, 1, h, w):
        raise ValueError(f"dark must be {(b, 1, h, w)}, got {tuple(dark.shape)}")
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must be in (0, 1], got {top}")
    if ties not in AIRLIGHT_TIES:
        raise ValueError(f"ties must be one of {AIRLIGHT_TIES}, got '{ties}'")
    n = max(1, int(h * w * top))
    dark_flat = dark.reshape(b, h * w)
    flat = img01.reshape(b, 3, h * w)
    if ties == "topk":
        idx = dark_flat.topk(n, dim=1).indices
        cand = flat.gather(2, idx.unsqueeze(1).expand(b, 3, n))
        best = cand.sum(dim=1).argmax(dim=1)
        return cand[torch.arange(b, device=img01.device), :, best]
    cut = dark_flat.topk(n, dim=1).values[:, -1:]
    brightness = flat[:, 0] + flat[:, 1] + flat[:, 2]  # fixed addition order: identical on every device
    score = torch.where(dark_flat >= cut, brightness, torch.full_like(brightness, float("-inf")))
    first = torch.arange(h * w, device=img01.device).expand(b, -1)
    at_max = score == score.amax(dim=1, keepdim=True)
    best = torch.where(at_max, first, torch.full_like(first, h * w)).amin(dim=1)
    return flat[torch.arange(b, device=img01.device), :, best]


def transmission(
    img01: torch.Tensor,
    airlight: torch.Tensor,
    omega: float = 0.95,
    patch: int = 15,
    t_min: float = 0.05,
) -> torch.Tensor:
    """Coarse DCP transmission t = clamp(1 - omega * dark_channel(I / A), t_min, 1).

    img01: (B,3,H,W) in [0,1]; airlight: (B,3). Returns (B,1,H,W) in [t_min, 1].
    A is floored at 1e-6 per channel so that a black airlight does not divide by zero.
    """
    _check_img(img01)
    if airlight.shape != (img01.shape[0], 3):
        raise ValueError(f"airlight must be ({img01.shape[0]}, 3), got {tuple(airlight.shape)}")
    norm = img01 / airlight.clamp_min(_MIN_AIRLIGHT)[:, :, None, None]
    t = 1.0 - omega * dark_channel(norm, patch)
    return t.clamp(t_min, 1.0)


def estimate_transmission(img01: torch.Tensor, patch: int = 15, omega: float = 0.95, top: float = 0.001,
                          t_min: float = 0.05, ties: str = "all") -> torch.Tensor:
    """Coarse DCP transmission with its own airlight estimate (the AccSamp guidance weight, published settings;
    ``ties`` as in :func:`estimate_airlight`).

    img01: (B,3,H,W) in [0,1] -> (B,1,H,W) in [t_min, 1].
    """
    return transmission(img01, estimate_airlight(img01, dark_channel(img01, patch), top, ties), omega, patch, t_min)


class DCPTransmission:
    """The coarse DCP transmission of :func:`estimate_transmission`, computed for the region it is indexed with.

    The airlight is estimated once from the whole image; ``t[..., rows, cols]`` (slices, step 1) evaluates the
    transmission on that region plus a ``patch // 2`` halo, which gives exactly the values of the full map (the
    minimum filter sees the same pixels). Keeps no full-size map: large images hold only the input.
    img01: (B,3,H,W) in [0,1]; indexing returns (B,1,h,w) in [t_min, 1].
    """

    def __init__(self, img01: torch.Tensor, patch: int = 15, omega: float = 0.95, top: float = 0.001,
                 t_min: float = 0.05, ties: str = "all"):
        _check_img(img01)
        self.img01, self.patch, self.omega, self.t_min = img01, patch, omega, t_min
        self.airlight = estimate_airlight(img01, dark_channel(img01, patch), top, ties)
        self.shape = torch.Size((img01.shape[0], 1, *img01.shape[-2:]))

    def __getitem__(self, index: tuple) -> torch.Tensor:
        if not isinstance(index, tuple) or len(index) != 3 or index[0] is not Ellipsis:
            raise IndexError("index a DCPTransmission as t[..., rows, cols] with two slices")
        h, w = self.shape[-2:]
        (y0, y1, sy), (x0, x1, sx) = index[1].indices(h), index[2].indices(w)
        if sy != 1 or sx != 1:
            raise IndexError("DCPTransmission slices must have step 1")
        r = self.patch // 2
        cy, cx = max(0, y0 - r), max(0, x0 - r)
        crop = self.img01[..., cy: min(h, y1 + r), cx: min(w, x1 + r)]
        t = transmission(crop, self.airlight, self.omega, self.patch, self.t_min)
        return t[..., y0 - cy: y1 - cy, x0 - cx: x1 - cx]


def default_guided_radius(h: int, w: int) -> int:
    """Guided-filter radius for DCP refinement: min(60, max(1, round(0.15 * min(H, W)))).

    He et al. use r = 60 for ~600x400 images, i.e. 15 % of the short side; smaller images
    scale the radius down so the window does not swallow the whole image.
    """
    return min(60, max(1, round(0.15 * min(h, w))))


def dcp_dehaze(
    img01: torch.Tensor,
    patch: int = 15,
    omega: float = 0.95,
    top: float = 0.001,
    radius: Optional[int] = None,
    eps: float = 1e-3,
    t0: float = 0.1,
    t_min: float = 0.05,
    ties: str = "all",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classical DCP dehazing (He et al.) with guided-filter refinement.

    Coarse t from ``transmission`` is refined by a guided filter (guide = BT.601 grey of I,
    radius ``radius`` or ``default_guided_radius``, ``eps``), clamped to [t0, 1], and the
    scene is recovered as J = (I - A) / t + A, clamped to [0,1]. ``ties``: see :func:`estimate_airlight`.
    img01: (B,3,H,W) in [0,1]. Returns (J01 (B,3,H,W) in [0,1], t (B,1,H,W) in [t0,1], A (B,3)).
    """
    _check_img(img01)
    h, w = img01.shape[-2:]
    dark = dark_channel(img01, patch)
    airlight = estimate_airlight(img01, dark, top, ties)
    t_coarse = transmission(img01, airlight, omega=omega, patch=patch, t_min=t_min)
    weights = torch.tensor(_GRAY_WEIGHTS, dtype=img01.dtype, device=img01.device)
    gray = (img01 * weights[None, :, None, None]).sum(dim=1, keepdim=True)
    r = default_guided_radius(h, w) if radius is None else radius
    t = guided_filter(gray, t_coarse, r, eps).clamp(t0, 1.0)
    return recover(img01, t, airlight).clamp(0.0, 1.0), t, airlight


@dataclass(frozen=True)
class DcpSettings:
    """The ``dcp`` section of a config: the keyword arguments of :func:`dcp_dehaze`, with its defaults."""

    patch: int = 15
    omega: float = 0.95
    top: float = 0.001
    radius: Optional[int] = None
    eps: float = 1e-3
    t0: float = 0.1
    t_min: float = 0.05
    ties: str = "all"

    @classmethod
    def from_section(cls, values: Any) -> "DcpSettings":
        """The settings of a ``dcp`` mapping (None: the defaults); utils.rules.SettingsError naming the key of an
        unknown key (did-you-mean) or a bad value."""
        return read_section(cls, values or {}, DCP_RULES, "dcp")


DCP_RULES: tuple[Rule, ...] = (
    (("patch",), lambda v: is_int(v) and v >= 1, "a positive integer (pixels)"),
    (("radius",), optional(lambda v: is_int(v) and v >= 1), "a positive integer or null"),
    (("omega", "top", "t0", "t_min"), lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    (("eps",), lambda v: is_number(v) and v > 0, "a number > 0"),
    (("ties",), lambda v: v in AIRLIGHT_TIES, f"one of {', '.join(AIRLIGHT_TIES)}"),
)
"""(keys, test, what a valid value is) of every ``dcp.*`` key."""
