"""Sky / edge masks of a hazy image and the per-pixel regions of the region-aware cycle loss (HCD-YC extension).

The sky and edge rules are those of the fog analyser (haze.fog, whose scene statistics use them); the cycle loss
(losses.cycle) weights its pixel and feature terms by :func:`region_labels`. Thresholds:

    edge  Sobel magnitude of the BT.601 luma >= 0.05 (a step of 0.1);
    sky   bright (Y >= 0.55), smooth (Sobel luma magnitude < 0.02 everywhere in the 9x9 neighbourhood) and close to
          the airlight (min_c I_c / A_c >= 0.85).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from haze.filters import sobel
from utils.color import rgb_to_ycbcr

_EDGE_MAG = 0.05
_SKY_SMOOTH = 0.02
_SKY_WINDOW = 9
_SKY_NEAR_A = 0.85
_REGION_WINDOW, _REGION_EDGE_DENSITY = 9, 0.1


def sky_mask(hazy01: torch.Tensor, airlight: torch.Tensor) -> torch.Tensor:
    """Sky pixels (module docstring; the fog analyser's scene rule): bright (Y >= 0.55), smooth (Sobel luma magnitude < 0.02
    everywhere in the 9x9 neighbourhood) and close to the airlight (min_c I_c / A_c >= 0.85).

    hazy01: (B,3,H,W) in [0,1]; airlight: (B,3). Returns (B,1,H,W) bool over the whole image (the scene rule uses
    its top quarter only).
    """
    luma = rgb_to_ycbcr(hazy01)[:, :1]
    gx, gy = sobel(luma)
    local_max = F.max_pool2d(torch.sqrt(gx**2 + gy**2), _SKY_WINDOW, stride=1, padding=_SKY_WINDOW // 2)
    near_airlight = (hazy01 / airlight[:, :, None, None].clamp_min(1e-6)).amin(dim=1, keepdim=True) >= _SKY_NEAR_A
    return (luma >= 0.55) & (local_max < _SKY_SMOOTH) & near_airlight


def edge_mask(img01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edge pixels (Sobel luma magnitude >= 0.05, i.e. a step of 0.1) of img01: (B,3,H,W) in [0,1].

    Returns (edges (B,1,H,W) bool, gx, gy (B,1,H,W) Sobel derivatives of the BT.601 luma).
    """
    gx, gy = sobel(rgb_to_ycbcr(img01)[:, :1])
    return torch.sqrt(gx**2 + gy**2) >= _EDGE_MAG, gx, gy


REGIONS = ("sky", "texture", "smooth")


@torch.no_grad()
def region_labels(hazy01: torch.Tensor, clean01: torch.Tensor, airlight: torch.Tensor,
                  window: int = _REGION_WINDOW, min_edge_density: float = _REGION_EDGE_DENSITY) -> torch.Tensor:
    """Per-pixel regions for the region-aware cycle loss: 0 sky, 1 textured structure, 2 smooth non-sky.

    sky: :func:`sky_mask` of the hazy image (the analyser's rule, whole image); textured: not sky and the fraction of
    :func:`edge_mask` pixels of the clean image in the ``window`` x ``window`` neighbourhood >= ``min_edge_density``
    (edges of buildings, foliage, text); smooth: the rest (walls, road, water, haze-free flat areas).
    hazy01, clean01: (B,3,H,W) in [0,1]; airlight: (B,3). Returns (B,1,H,W) int64 indexing ``REGIONS``.
    """
    sky = sky_mask(hazy01.float(), airlight.float())
    edges = edge_mask(clean01.float())[0].float()
    density = F.avg_pool2d(edges, window, stride=1, padding=window // 2, count_include_pad=False)
    labels = torch.full_like(sky, 2, dtype=torch.long)
    labels[density >= min_edge_density] = 1
    labels[sky] = 0
    return labels
