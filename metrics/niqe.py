"""NIQE, the "completely blind" Natural Image Quality Evaluator (no reference; lower is better).

Mittal, Soundararajan, Bovik, "Making a 'Completely Blind' Image Quality Analyzer",
IEEE Signal Processing Letters 20(3), 2013. Implemented here in numpy/torch from the paper and
the official MATLAB release, with the published pristine-image model (mu, Sigma of the 36-d
features over the pristine corpus, 7x7 Gaussian window) read as data from
``metrics/data/niqe_pris_params.npz`` (see metrics/data/README.md for origin and license).

Settings (those of the official release as re-implemented by BasicSR 1.4.2's calculate_niqe
with its defaults, against which tests/metrics/test_metrics.py checks the numbers):
  * colour: RGB in [0,1] -> MATLAB BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B
    (0..255 scale), rounded to integers;
  * the image is cropped (top-left kept) to whole 96x96 blocks; blocks do not overlap;
  * two scales; the second is MATLAB ``imresize(Y/255, 0.5)*255`` (bicubic, antialiased);
  * MSCN: (Y - mu) / (sigma + 1), mu and sigma from the 7x7 window, replicated borders;
  * per block: AGGD fit (alpha by grid search over 0.2:0.001:10) of the MSCN map -> alpha,
    (beta_l + beta_r)/2, and of the products with its circular shifts by (0,1), (1,0), (1,1),
    (1,-1) -> alpha, mean, beta_l, beta_r (18 features per scale);
  * quality = sqrt((mu_p - mu_d)^T pinv((Sigma_p + Sigma_d)/2) (mu_p - mu_d)), where mu_d is
    the NaN-ignoring mean and Sigma_d the covariance of the NaN-free block features.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PARAMS_PATH = Path(__file__).resolve().parent / "data" / "niqe_pris_params.npz"
BLOCK = 96
SETTINGS = (
    "NIQE (Mittal et al. 2013), published pristine model (niqe_pris_params.npz from BasicSR 1.4.2 = "
    "official MATLAB release); MATLAB BT.601 Y channel rounded, 96x96 blocks, 2 scales "
    "(MATLAB bicubic antialiased imresize 0.5); lower is better"
)
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@lru_cache(maxsize=1)
def load_params(path: str = str(PARAMS_PATH)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu_pris (36,), cov_pris (36,36), gaussian_window (7,7)) float64 from the npz (no pickle)."""
    with np.load(path, allow_pickle=False) as data:
        mu = np.asarray(data["mu_pris_param"], dtype=np.float64).reshape(-1)
        cov = np.asarray(data["cov_pris_param"], dtype=np.float64)
        window = np.asarray(data["gaussian_window"], dtype=np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36) or window.ndim != 2:
        raise ValueError(f"unexpected NIQE parameter shapes in {path}")
    return mu, cov, window


@lru_cache(maxsize=1)
def _alpha_table() -> tuple[np.ndarray, np.ndarray]:
    """Grid alpha = 0.2:0.001:10 and r(alpha) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))."""
    alphas = np.arange(0.2, 10.001, 0.001)
    r = np.array([math.exp(2 * math.lgamma(2 / a) - math.lgamma(1 / a) - math.lgamma(3 / a)) for a in alphas])
    return alphas, r


def matlab_luma255(img01: torch.Tensor) -> np.ndarray:
    """img01: (3,H,W) RGB in [0,1] -> (H,W) float64 MATLAB rgb2ycbcr Y in [16,235], unrounded."""
    rgb = img01.detach().to("cpu", torch.float64).numpy()
    return 16.0 + 65.481 * rgb[0] + 128.553 * rgb[1] + 24.966 * rgb[2]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (MATLAB imresize 'bicubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


def _matlab_resize_taps(n_in: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices and weights (n_out, P) of MATLAB imresize along one axis (bicubic, antialiased
    when scale < 1, symmetric border). n_out = ceil(n_in * scale)."""
    n_out = math.ceil(n_in * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, n_out + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - idx
    w = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in - 1, -1, -1)])
    idx0 = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    return idx0, w


def matlab_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic, antialiasing on) of a (H,W) float array."""
    rows, wr = _matlab_resize_taps(img.shape[0], scale)
    out = np.einsum("ok,okw->ow", wr, img[rows])
    cols, wc = _matlab_resize_taps(img.shape[1], scale)
    return np.einsum("ok,hok->ho", wc, out[:, cols])


def _mscn(y: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(Y - mu) / (sigma + 1) with mu, sigma from ``window`` and replicated borders: (H,W)."""
    k = torch.from_numpy(window)[None, None]
    pad = (window.shape[1] // 2, window.shape[1] // 2, window.shape[0] // 2, window.shape[0] // 2)
    t = torch.from_numpy(y)[None, None]
    both = F.pad(torch.cat([t, t * t], dim=0), pad, mode="replicate")
    blurred = F.conv2d(both, k)
    mu, mu_sq = blurred[0, 0].numpy(), blurred[1, 0].numpy()
    sigma = np.sqrt(np.abs(mu_sq - mu * mu))
    return (y - mu) / (sigma + 1.0)


def _aggd(x: np.ndarray) -> tuple[float, float, float]:
    """AGGD fit of a block (moment matching, alpha by grid search): (alpha, beta_l, beta_r)."""
    x = x.reshape(-1)
    alphas, r_table = _alpha_table()
    left_std = math.sqrt(np.mean(x[x < 0] ** 2)) if np.any(x < 0) else float("nan")
    right_std = math.sqrt(np.mean(x[x > 0] ** 2)) if np.any(x > 0) else float("nan")
    gamma_hat = left_std / right_std
    r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x ** 2)
    r_norm = r_hat * (gamma_hat ** 3 + 1) * (gamma_hat + 1) / (gamma_hat ** 2 + 1) ** 2
    if not np.isfinite(r_norm):
        return float("nan"), float("nan"), float("nan")
    alpha = float(alphas[np.argmin((r_table - r_norm) ** 2)])
    scale = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return alpha, left_std * scale, right_std * scale


def _block_features(block: np.ndarray) -> list[float]:
    """18 NIQE features of one MSCN block (H,W)."""
    alpha, bl, br = _aggd(block)
    feats = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        a, bl, br = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        mean = (br - bl) * math.gamma(2 / a) / math.gamma(1 / a) if np.isfinite(a) else float("nan")
        feats.extend([a, mean, bl, br])
    return feats


def niqe_luma(y255: np.ndarray) -> float:
    """NIQE of a (H,W) luma image in [0,255] (already rounded as the settings say).

    Needs at least one 96x96 block in each direction and two blocks in all; raises ValueError
    otherwise. Returns NaN for images without texture (e.g. constant), where no AGGD fits.
    """
    h, w = y255.shape
    nh, nw = h // BLOCK, w // BLOCK
    if nh < 1 or nw < 1 or nh * nw < 2:
        raise ValueError(f"NIQE needs at least two {BLOCK}x{BLOCK} blocks, image is {w}x{h} (WxH)")
    mu_p, cov_p, window = load_params()
    img = np.asarray(y255, dtype=np.float64)[: nh * BLOCK, : nw * BLOCK]
    per_scale = []
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for scale in (1, 2):
            mscn = _mscn(img, window)
            b = BLOCK // scale
            per_scale.append(np.array([_block_features(mscn[i * b:(i + 1) * b, j * b:(j + 1) * b])
                                       for j in range(nw) for i in range(nh)]))
            if scale == 1:
                img = matlab_imresize(img / 255.0, 0.5) * 255.0
        feats = np.concatenate(per_scale, axis=1)
        mu_d = np.nanmean(feats, axis=0)
        clean = feats[~np.isnan(feats).any(axis=1)]
        if clean.shape[0] < 2 or np.isnan(mu_d).any():
            return float("nan")
        cov_d = np.cov(clean, rowvar=False)
    diff = mu_p - mu_d
    return float(math.sqrt(max(float(diff @ np.linalg.pinv((cov_p + cov_d) / 2.0) @ diff), 0.0)))


def niqe(img01: torch.Tensor) -> float:
    """NIQE of one RGB image. img01: (3,H,W) in [0,1] -> float (lower is better)."""
    if img01.ndim != 3 or img01.shape[0] != 3:
        raise ValueError(f"expected a (3,H,W) image, got shape {tuple(img01.shape)}")
    return niqe_luma(np.round(matlab_luma255(img01)))
