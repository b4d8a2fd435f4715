"""RIDCP haze synthesis used for the synthetic half of HazeGen's stage-1 data.

Matches the online degradation of RIDCP (Wu et al., CVPR 2023) as reused by
"Learning Hazing to Dehazing" (CVPR 2025) for its synthetic pairs. The order
of operations, checked against RIDCP's and the CVPR 2025 reference data code:

1. depth min-max normalised to [0,1]; RIDCP's depth maps are "larger = nearer",
   so depth01 = 1 is the nearest point and gets t = 1 (no haze);
2. beta ~ U[0.3, 1.5];  t = exp(-(1 - depth01) * 2 * beta);
3. A = a + s with a ~ U[0.25, 1.0] (one scalar) and s ~ U[-0.025, 0.025]^3
   (one shift per channel, applied always: RIDCP's color_p = 1.0);
4. with prob 0.5 darkening J <- J ** g, g ~ U[1.5, 3.0]   (on the clean image);
5. with prob 0.5 Gaussian noise on the (darkened) clean image, level
   ~ U{2..25}/255; colour (prob 0.4), grayscale (prob 0.4) or channel-correlated
   (prob 0.2, covariance |L^2 U^T D U| with L = 25/255 fixed, D = diag(U[0,1]^3),
   U orthonormal); clipped to [0,1];
6. haze I = J * t + A * (1 - t);
7. with prob 0.5 JPEG at quality ~ U{30..95};
8. clipped to [0,1] and quantised to 8 bit (the reference returns uint8).

All randomness comes from the ``numpy.random.Generator`` passed in.
``depth_proxy`` gives a depth map in the same convention when no depth
estimator is available (used by tools/make_synthetic_set.py and tools/make_inputs.py).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from haze.scattering import rehaze


@dataclass(frozen=True)
class DegradationParams:
    """Ranges and probabilities of the RIDCP degradation (defaults = published)."""

    beta_range: tuple[float, float] = (0.3, 1.5)
    a_range: tuple[float, float] = (0.25, 1.0)
    a_shift_range: tuple[float, float] = (-0.025, 0.025)
    gamma_p: float = 0.5
    gamma_range: tuple[float, float] = (1.5, 3.0)
    noise_p: float = 0.5
    noise_levels: tuple[int, int] = (2, 25)
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 95)
    quantize_8bit: bool = True


def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """Min-max normalise a depth map.

    depth: (H,W) any range -> (H,W) float32 in [0,1]. A constant map has no range
    to stretch and maps to all zeros (uniform haze at the farthest distance).
    """
    depth = np.asarray(depth, dtype=np.float64)
    lo, hi = float(depth.min()), float(depth.max())
    if hi <= lo:
        return np.zeros(depth.shape, dtype=np.float32)
    return ((depth - lo) / (hi - lo)).astype(np.float32)


def gaussian_blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge-replicate padding, radius 3*sigma).

    plane: (H,W) float -> (H,W) float32.
    """
    radius = max(1, int(3.0 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets**2 / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    img = torch.from_numpy(np.asarray(plane, dtype=np.float32))[None, None]
    img = F.pad(img, (radius, radius, radius, radius), mode="replicate")
    img = F.conv2d(img, kernel.view(1, 1, 1, -1))
    img = F.conv2d(img, kernel.view(1, 1, -1, 1))
    return img[0, 0].numpy()


def depth_proxy(img01: np.ndarray, ramp_weight: float = 0.6) -> np.ndarray:
    """Depth guess for haze synthesis when no depth estimator is available.

    img01: (H,W,3) in [0,1] -> depth01: (H,W) float32 in [0,1] in RIDCP's convention
    (1 = nearest). Blend of a vertical ramp (top row far = 0, bottom row near = 1,
    a ground-level outdoor view) with the inverted luminance blurred at
    sigma = max(H,W)/32 (bright sky and haze regions read as far), weights
    ramp_weight and 1 - ramp_weight, then min-max normalised.
    """
    height, width = img01.shape[:2]
    ramp = np.repeat(np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None], width, axis=1)
    luminance = img01[..., 0] * 0.299 + img01[..., 1] * 0.587 + img01[..., 2] * 0.114
    inverted = gaussian_blur(1.0 - luminance, max(height, width) / 32.0)
    return normalize_depth(ramp_weight * ramp + (1.0 - ramp_weight) * inverted)


def transmission(depth01: np.ndarray, beta: float) -> np.ndarray:
    """RIDCP transmission t = exp(-(1 - depth01) * 2 * beta).

    depth01: (H,W) in [0,1], 1 = nearest -> t: (H,W) in (0,1].
    """
    return np.exp(-(1.0 - depth01) * 2.0 * beta)


def haze_formula(
    J: np.ndarray, depth01: np.ndarray, beta: float, A: float | np.ndarray
) -> np.ndarray:
    """Atmospheric scattering model I = J * t + A * (1 - t) with RIDCP's t.

    J: (H,W,3) in [0,1]; depth01: (H,W) in [0,1]; A: scalar or (3,) airlight.
    Returns I: (H,W,3), not clipped (A may exceed 1 by the per-channel shift).
    """
    J = np.asarray(J, dtype=np.float64)
    t = torch.from_numpy(np.asarray(transmission(depth01, beta), dtype=np.float64))[None, None]
    airlight = torch.from_numpy(np.broadcast_to(np.asarray(A, dtype=np.float64), (3,)).copy())[None]
    return rehaze(torch.from_numpy(J.transpose(2, 0, 1).copy())[None], t, airlight)[0].numpy().transpose(1, 2, 0)


def jpeg_compress(img01: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip through Pillow (4:2:0, like OpenCV's default).

    img01: (H,W,3) float in [0,1] -> (H,W,3) float32 in [0,1] (8-bit levels).
    """
    img_u8 = to_uint8(img01)
    buffer = io.BytesIO()
    Image.fromarray(img_u8).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0


def to_uint8(img01: np.ndarray) -> np.ndarray:
    """(H,W,C) float in [0,1] (clipped) -> uint8, rounded to nearest level."""
    return np.round(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.uint8)


def add_gaussian_noise(
    img01: np.ndarray, rng: np.random.Generator, levels: tuple[int, int] = (2, 25)
) -> tuple[np.ndarray, float, str]:
    """RIDCP/BSRGAN Gaussian noise, clipped to [0,1].

    img01: (H,W,3) in [0,1]. Returns (noisy01, sigma, kind) with kind one of
    "color" (independent per channel, std sigma = level/255), "gray" (one value
    per pixel added to all channels, std sigma) or "correlated" (per-pixel 3-vector
    with covariance |L^2 U^T D U|, sigma reported as the scale L = levels[1]/255).
    The elementwise |.| of the reference can make that matrix indefinite; as numpy's
    SVD-based multivariate_normal in the reference does, eigenvalues enter as |lambda|.
    """
    level = int(rng.integers(levels[0], levels[1] + 1))
    choice = rng.random()
    h, w = img01.shape[:2]
    if choice > 0.6:
        sigma, kind = level / 255.0, "color"
        noise = rng.normal(0.0, sigma, (h, w, 3))
    elif choice < 0.4:
        sigma, kind = level / 255.0, "gray"
        noise = rng.normal(0.0, sigma, (h, w, 1))
    else:
        sigma, kind = levels[1] / 255.0, "correlated"
        d = np.diag(rng.random(3))
        u = np.linalg.svd(rng.random((3, 3)))[0]
        cov = np.abs(sigma**2 * (u.T @ d @ u))
        eigval, eigvec = np.linalg.eigh(cov)
        mix = eigvec * np.sqrt(np.abs(eigval))
        noise = rng.standard_normal((h, w, 3)) @ mix.T
    return np.clip(img01 + noise, 0.0, 1.0), sigma, kind


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], size: int | None = None) -> Any:
    """One U[bounds) draw (float) or ``size`` draws ((size,) array)."""
    return rng.uniform(bounds[0], bounds[1], size)


def degrade(
    clean01: np.ndarray,
    depth: np.ndarray,
    rng: np.random.Generator,
    params: DegradationParams = DegradationParams(),
) -> tuple[np.ndarray, dict[str, Any]]:
    """Synthesise a hazy image from a clean one and its depth (RIDCP, see module doc).

    clean01: (H,W,3) float in [0,1]; depth: (H,W) any range, larger = nearer
    (min-max normalised here). Returns (hazy01: (H,W,3) float32 in [0,1], info)
    with info keys beta (float), A ((3,) float64), gamma (float | None),
    noise_sigma (float | None), noise_kind (str | None), jpeg_quality (int | None).
    """
    clean01 = np.asarray(clean01, dtype=np.float64)
    if clean01.ndim != 3 or clean01.shape[2] != 3:
        raise ValueError(f"clean01 must be (H,W,3), got {clean01.shape}")
    if depth.shape != clean01.shape[:2]:
        raise ValueError(f"depth shape {depth.shape} != image size {clean01.shape[:2]}")
    depth01 = normalize_depth(depth)

    beta = float(_uniform(rng, params.beta_range))
    airlight = _uniform(rng, params.a_range) + _uniform(rng, params.a_shift_range, 3)
    info: dict[str, Any] = {"beta": beta, "A": airlight, "gamma": None,
                            "noise_sigma": None, "noise_kind": None, "jpeg_quality": None}

    img = clean01
    if rng.random() < params.gamma_p:
        info["gamma"] = float(_uniform(rng, params.gamma_range))
        img = np.power(img, info["gamma"])
    if rng.random() < params.noise_p:
        img, info["noise_sigma"], info["noise_kind"] = add_gaussian_noise(
            img, rng, params.noise_levels)

    img = haze_formula(img, depth01, beta, airlight)

    if rng.random() < params.jpeg_p:
        info["jpeg_quality"] = int(rng.integers(params.jpeg_quality[0], params.jpeg_quality[1] + 1))
        img = jpeg_compress(img, info["jpeg_quality"])

    img = np.clip(img, 0.0, 1.0)
    if params.quantize_8bit:
        img = to_uint8(img) / 255.0
    return img.astype(np.float32), info
