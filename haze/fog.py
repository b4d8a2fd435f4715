"""Deterministic per-image fog analyser (HCD-YC extension, not in the paper).

``analyze_fog(img01)`` estimates, for each hazy image, a haze density ``rho`` in [0,1], a
density level, a haze type, a coarse scene class and a numeric feature vector used by the
prompt builder (haze.prompts) and the text-condition modulation (model.text_processor).
Everything is computed without gradients on a copy downscaled to ``max_side`` pixels, from
the Dark Channel Prior (haze.dcp) plus simple image statistics; all rules are heuristics
documented here and in the function docstrings.

Density (mean-based, so monotone in the scattering coefficient beta of the atmospheric model
I = J t + A (1 - t), t = exp(-beta d), for a fixed scene J and depth d):

    h_t   = clamp((1 - mean t) / omega, 0, 1)        DCP haze opacity, t = coarse DCP transmission
    h_lum = clamp((mean Y - 0.3) / 0.5, 0, 1)         haze brightens the image (BT.601 luma Y)
    h_con = 1 - clamp(std Y / 0.2, 0, 1)              haze removes global contrast
    rho   = 0.6 h_t + 0.2 h_lum + 0.2 h_con
    level = light (rho < 0.52) | moderate (rho < 0.76) | dense     (thresholds set as for the type below)

Haze type, from gradient and texture statistics together with the transmission layout. Haze scales the
local gradients of the scene by t (I = J t + A (1 - t) gives grad I = t grad J where t is smooth), so where the
haze really varies across the image, cells with a higher DCP transmission also carry more gradient energy; where it
does not, the two vary independently (the DCP map then only follows scene content). With the coarse transmission
averaged on a G x G grid T (G = 16), rows indexed by y in [-0.5, 0.5] (top to bottom), a least-squares line r(y) =
a + s y through its row means, and on an 8 x 8 grid the correlation c between the cell means of t and the log
cell-mean Sobel magnitude of the luma (``gradient_agreement``):

    layered      s >= 0.15 (t grows by >= 0.15 from top to bottom: clearer near the camera) and the line explains
                 >= 50 % of the variance of T;
    non-uniform  otherwise, if std(T - r(y)) >= 0.07 (left-right / patchy variation) and c >= 0.2 (the gradients
                 confirm that the variation is haze, not scene content);
    uniform      otherwise.

The thresholds were set on the labelled synthetic set of ``tools/fog_eval.py`` (seed 0) and are reported on a
held-out draw (seed 1) in docs/extensions.md.

Note that depth also changes t, so an outdoor scene whose depth grows towards the horizon can
read as layered: the label describes the visible transmission pattern, not beta alone.

Scene, from the DCP-restored image J = (I - A) / max(t, 0.1) + A (colours and edges that the
haze hides) and from the hazy image's top quarter (the sky and edge masks: haze.regions):

    veg_frac  fraction of J pixels with HSV hue in [65, 170] deg, saturation >= 0.2, value >= 0.1;
    sky_frac  fraction of top-quarter pixels of I that are bright (Y >= 0.55), smooth
              (Sobel magnitude < 0.02 everywhere in their 9x9 neighbourhood) and close to the
              airlight (min_c I_c / A_c >= 0.85);
              in very dense fog (t < ~0.15 everywhere) every smooth region looks like sky;
    edge_den  fraction of J pixels whose Sobel luma magnitude >= 0.05 (a step of 0.1);
    axis_frac fraction of those edge pixels whose gradient is within 15 deg of horizontal or
              vertical (about 1/3 for isotropic texture, higher for buildings / furniture).

    natural  if veg_frac >= 0.2
    indoor   elif sky_frac < 0.1 and axis_frac >= 0.4   (no sky, man-made structure)
    urban    elif axis_frac >= 0.4 and edge_den >= 0.02
    natural  otherwise

Feature vector (``FOG_FEATURE_NAMES``, length ``FOG_FEATURE_DIM``): rho, the transmission
statistics, the gradient agreement, airlight luma, luminance, contrast and the scene statistics
above. All lie in [0,1] except ``vertical_span`` and ``gradient_agreement`` in [-1,1] (positive:
clearer at the bottom; gradients follow t), so they can feed a small MLP without further
normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from haze.dcp import dark_channel, estimate_airlight, transmission
from haze.filters import sobel
from haze.regions import edge_mask, sky_mask
from haze.scattering import recover
from utils.color import rgb_to_ycbcr

DENSITY_LEVELS = ("light", "moderate", "dense")
HAZE_TYPES = ("uniform", "layered", "non-uniform")
SCENES = ("urban", "natural", "indoor")

FOG_FEATURE_NAMES = (
    "density",
    "mean_t",
    "std_t",
    "vertical_span",
    "row_fit_r2",
    "vertical_share",
    "residual_std",
    "gradient_agreement",
    "airlight_luma",
    "luminance",
    "contrast",
    "edge_density",
    "axis_fraction",
    "vegetation_fraction",
    "sky_fraction",
    "saturation",
)
FOG_FEATURE_DIM = len(FOG_FEATURE_NAMES)

_OMEGA = 0.95
_GRID = 16
_LIGHT_MAX, _MODERATE_MAX = 0.52, 0.76
_LAYER_SPAN, _LAYER_SHARE = 0.15, 0.5
_NONUNIFORM_STD, _GRAD_AGREE = 0.07, 0.2
_GRAD_GRID = 8
_AXIS_TOL_DEG = 15.0
_VEG_MIN, _SKY_INDOOR, _AXIS_MIN, _EDGE_URBAN = 0.2, 0.1, 0.4, 0.02


@dataclass(frozen=True, eq=False)
class FogInfo:
    """Analysis of one image. ``features``: (FOG_FEATURE_DIM,) float32 on CPU, see FOG_FEATURE_NAMES."""

    density: float
    level: str
    haze_type: str
    scene: str
    features: torch.Tensor

    def stats(self) -> dict[str, float]:
        """Feature vector as a name -> value dict (for logging)."""
        return dict(zip(FOG_FEATURE_NAMES, self.features.tolist()))


def _hsv(img01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """img01: (B,3,H,W) -> hue in degrees [0,360), saturation [0,1], value [0,1], each (B,1,H,W)."""
    r, g, b = img01[:, 0:1], img01[:, 1:2], img01[:, 2:3]
    value, argmax = img01.max(dim=1, keepdim=True)
    delta = value - img01.amin(dim=1, keepdim=True)
    safe = delta.clamp_min(1e-8)
    hue_r = torch.remainder((g - b) / safe, 6.0)
    hue_g = (b - r) / safe + 2.0
    hue_b = (r - g) / safe + 4.0
    hue = torch.where(argmax == 0, hue_r, torch.where(argmax == 1, hue_g, hue_b)) * 60.0
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    sat = torch.where(value > 0, delta / value.clamp_min(1e-8), torch.zeros_like(value))
    return hue, sat, value


def _downscale(img01: torch.Tensor, max_side: int) -> torch.Tensor:
    """Area-downscale (B,3,H,W) so that max(H,W) <= max_side; smaller images are returned as is."""
    h, w = img01.shape[-2:]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return img01
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(img01, size=size, mode="area")


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def _transmission_layout(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Vertical trend / residual statistics of t: (B,1,H,W), each returned as (B,).

    Rows span y in [-0.5, 0.5], so the fitted slope equals the bottom-minus-top change of t.
    """
    grid = (min(_GRID, t.shape[-2]), min(_GRID, t.shape[-1]))
    cells = F.adaptive_avg_pool2d(t, grid)[:, 0]
    rows = cells.mean(dim=2)
    y = torch.linspace(-0.5, 0.5, grid[0], dtype=t.dtype, device=t.device)
    yc = y - y.mean()
    var_y = (yc**2).mean().clamp_min(1e-12)
    rows_c = rows - rows.mean(dim=1, keepdim=True)
    slope = (rows_c * yc).mean(dim=1) / var_y
    trend = slope[:, None] * yc[None, :]
    row_var = (rows_c**2).mean(dim=1)
    row_r2 = torch.where(row_var > 1e-12, (trend**2).mean(dim=1) / row_var.clamp_min(1e-12), torch.zeros_like(row_var))
    centred = cells - cells.mean(dim=(1, 2), keepdim=True)
    total_var = (centred**2).mean(dim=(1, 2))
    residual = centred - trend[:, :, None]
    share = torch.where(
        total_var > 1e-12, (trend**2).mean(dim=1) / total_var.clamp_min(1e-12), torch.zeros_like(total_var)
    )
    return {
        "vertical_span": slope,
        "row_fit_r2": row_r2.clamp(0.0, 1.0),
        "vertical_share": share.clamp(0.0, 1.0),
        "residual_std": residual.flatten(1).std(dim=1, unbiased=False),
    }


def _gradient_agreement(t: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    """Correlation over an 8x8 grid between the cell means of t (B,1,H,W) and the log cell means of the Sobel
    magnitude of luma (B,1,H,W) -> (B,) in [-1,1] (0 when either map is constant)."""
    gx, gy = sobel(luma)
    grid = (min(_GRAD_GRID, t.shape[-2]), min(_GRAD_GRID, t.shape[-1]))
    t_cells = F.adaptive_avg_pool2d(t, grid).flatten(1)
    g_cells = torch.log(F.adaptive_avg_pool2d(torch.sqrt(gx**2 + gy**2), grid).flatten(1) + 1e-3)
    a = t_cells - t_cells.mean(dim=1, keepdim=True)
    b = g_cells - g_cells.mean(dim=1, keepdim=True)
    den = torch.sqrt((a**2).mean(dim=1) * (b**2).mean(dim=1))
    return torch.where(den > 1e-12, (a * b).mean(dim=1) / den.clamp_min(1e-12), torch.zeros_like(den)).clamp(-1, 1)


def _scene_stats(hazy01: torch.Tensor, t: torch.Tensor, airlight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Colour / edge statistics for the scene rule (see module docstring), each (B,)."""
    restored = recover(hazy01, t, airlight, t_floor=0.1).clamp(0.0, 1.0)
    hue, sat, value = _hsv(restored)
    veg = (hue >= 65.0) & (hue <= 170.0) & (sat >= 0.2) & (value >= 0.1)

    edges, gx, gy = edge_mask(restored)
    angle = torch.rad2deg(torch.atan2(gy.abs(), gx.abs()))
    axis = edges & ((angle <= _AXIS_TOL_DEG) | (angle >= 90.0 - _AXIS_TOL_DEG))
    n_edges = _mean(edges.float())
    axis_frac = torch.where(n_edges > 0, _mean(axis.float()) / n_edges.clamp_min(1e-12), torch.zeros_like(n_edges))

    top = max(1, hazy01.shape[-2] // 4)
    sky = sky_mask(hazy01, airlight)[:, :, :top]
    return {
        "edge_density": n_edges,
        "axis_fraction": axis_frac,
        "vegetation_fraction": _mean(veg.float()),
        "sky_fraction": _mean(sky.float()),
        "saturation": _mean(sat),
    }


def density_level(rho: float) -> str:
    """rho in [0,1] -> 'light' (< 0.52), 'moderate' (< 0.76) or 'dense'."""
    if rho < _LIGHT_MAX:
        return "light"
    return "moderate" if rho < _MODERATE_MAX else "dense"


def _haze_type(span: float, share: float, residual_std: float, agreement: float) -> str:
    if span >= _LAYER_SPAN and share >= _LAYER_SHARE:
        return "layered"
    return "non-uniform" if residual_std >= _NONUNIFORM_STD and agreement >= _GRAD_AGREE else "uniform"


def _scene(veg: float, sky: float, axis: float, edges: float) -> str:
    if veg >= _VEG_MIN:
        return "natural"
    if sky < _SKY_INDOOR and axis >= _AXIS_MIN:
        return "indoor"
    if axis >= _AXIS_MIN and edges >= _EDGE_URBAN:
        return "urban"
    return "natural"


@torch.no_grad()
def analyze_fog(img01: torch.Tensor, patch: int = 15, max_side: int = 256) -> list[FogInfo]:
    """Analyse a batch of hazy images. img01: (B,3,H,W) in [0,1] -> one FogInfo per image.

    Deterministic; images are first downscaled (area) so that the long side is <= ``max_side``;
    ``patch`` is the DCP dark-channel patch size (odd) at that resolution.
    """
    if img01.dim() != 4 or img01.shape[1] != 3:
        raise ValueError(f"img01 must have shape (B,3,H,W), got {tuple(img01.shape)}")
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    img = _downscale(img01.float().clamp(0.0, 1.0), max_side)
    dark = dark_channel(img, patch)
    airlight = estimate_airlight(img, dark)
    t = transmission(img, airlight, omega=_OMEGA, patch=patch, t_min=0.05)
    luma = rgb_to_ycbcr(img)[:, :1]

    mean_t = _mean(t)
    luminance = _mean(luma)
    contrast = luma.flatten(1).std(dim=1, unbiased=False)
    h_t = ((1.0 - mean_t) / _OMEGA).clamp(0.0, 1.0)
    h_lum = ((luminance - 0.3) / 0.5).clamp(0.0, 1.0)
    h_con = 1.0 - (contrast / 0.2).clamp(0.0, 1.0)
    rho = 0.6 * h_t + 0.2 * h_lum + 0.2 * h_con

    stats = {
        "density": rho,
        "mean_t": mean_t,
        "std_t": t.flatten(1).std(dim=1, unbiased=False),
        "airlight_luma": rgb_to_ycbcr(airlight[:, :, None, None])[:, 0, 0, 0],
        "luminance": luminance,
        "contrast": contrast,
    }
    stats.update(_transmission_layout(t))
    stats["gradient_agreement"] = _gradient_agreement(t, luma)
    stats.update(_scene_stats(img, t, airlight))
    features = torch.stack([stats[name] for name in FOG_FEATURE_NAMES], dim=1).float().cpu()

    infos = []
    for i in range(img.shape[0]):
        f = dict(zip(FOG_FEATURE_NAMES, features[i].tolist()))
        if not all(math.isfinite(v) for v in f.values()):
            raise ValueError(f"fog analysis produced non-finite statistics for image {i}: {f}")
        infos.append(
            FogInfo(
                density=f["density"],
                level=density_level(f["density"]),
                haze_type=_haze_type(f["vertical_span"], f["vertical_share"], f["residual_std"],
                                     f["gradient_agreement"]),
                scene=_scene(f["vegetation_fraction"], f["sky_fraction"], f["axis_fraction"], f["edge_density"]),
                features=features[i].clone(),
            )
        )
    return infos


def fog_features(infos: list[FogInfo], device: torch.device | str | None = None) -> torch.Tensor:
    """Stack the per-image feature vectors: -> (B, FOG_FEATURE_DIM) float32."""
    if not infos:
        raise ValueError("fog_features needs at least one FogInfo")
    return torch.stack([info.features for info in infos]).to(device)
