"""BRISQUE, Blind/Referenceless Image Spatial Quality Evaluator (no reference; lower is better).

Mittal, Moorthy, Bovik, "No-Reference Image Quality Assessment in the Spatial Domain",
IEEE TIP 21(12), 2012: natural-scene statistics of mean-subtracted contrast-normalised (MSCN)
coefficients at two scales, mapped to a quality score by an epsilon-SVR with an RBF kernel.

The SVR and its feature ranges are the LIVE-trained model shipped by the PyPI package
``brisque`` 0.2.0 (Apache-2.0), read as data from ``metrics/data/brisque_svm.txt`` (LIBSVM model
file, verbatim) and ``metrics/data/brisque_feature_range.json`` (see metrics/data/README.md). The
features are computed the way that package computes them (its numbers are what the model was
trained on, and tests/metrics/test_metrics.py checks ours against it):
  * grey = 0.2125 R + 0.7154 G + 0.0721 B on RGB in [0,1] (scikit-image rgb2gray);
  * MSCN = (I - mu) / (sigma + 1/255), mu and sigma = sqrt(|mu^2 - E[I^2]|) from a normalised
    7x7 Gaussian (sigma 7/6), zero-padded 'same' convolution;
  * AGGD moment fit (alpha solves Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) = R_hat; left/right
    spread from the negative / non-negative samples) of the MSCN map -> alpha, (s_l^2 + s_r^2)/2,
    and of its horizontal, vertical, main- and secondary-diagonal neighbour products (no
    wrap-around) -> alpha, mean, s_l^2, s_r^2: 18 features;
  * the same on the grey image halved by OpenCV-style bicubic resizing (a = -0.75, half-pixel
    centres, replicated borders, output size rounded half to even): 36 features;
  * features scaled to [-1, 1] with the shipped ranges, score = sum_i c_i exp(-g |x - sv_i|^2) - rho.
Scores are comparable with that package's, not with the MATLAB release's model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent / "data"
SVM_PATH = DATA_DIR / "brisque_svm.txt"
RANGE_PATH = DATA_DIR / "brisque_feature_range.json"
SETTINGS = (
    "BRISQUE (Mittal et al. 2012), LIVE-trained RBF epsilon-SVR shipped by the PyPI package brisque 0.2.0, "
    "features as computed by that package (grey = skimage rgb2gray, 7x7 Gaussian sigma 7/6, 2 scales, "
    "bicubic halving); lower is better"
)
_GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)
MIN_SIDE = 16


@dataclass(frozen=True)
class SVRModel:
    """RBF epsilon-SVR: f(x) = sum_i coef[i] * exp(-gamma * |x - sv[i]|^2) - rho."""

    sv: np.ndarray
    coef: np.ndarray
    gamma: float
    rho: float
    feat_min: np.ndarray
    feat_max: np.ndarray

    def predict(self, scaled: np.ndarray) -> float:
        """scaled: (D,) features already mapped to [-1, 1] -> SVR output."""
        d2 = np.sum((self.sv - scaled[None, :]) ** 2, axis=1)
        return float(self.coef @ np.exp(-self.gamma * d2) - self.rho)

    def scale(self, feats: np.ndarray) -> np.ndarray:
        """(D,) raw features -> (D,) -1 + 2 (f - min) / (max - min)."""
        return -1.0 + 2.0 * (feats - self.feat_min) / (self.feat_max - self.feat_min)


def parse_libsvm_model(text: str, n_features: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Parse a LIBSVM text model of an RBF epsilon-SVR -> (sv (N,D), coef (N,), gamma, rho).

    Sparse ``index:value`` entries (1-based, zeros omitted) are expanded to dense rows of
    ``n_features``. Raises ValueError for any other SVM type/kernel or malformed lines.
    """
    lines = text.splitlines()
    header: dict[str, str] = {}
    pos = 0
    while pos < len(lines) and lines[pos].strip() != "SV":
        key, _, value = lines[pos].strip().partition(" ")
        header[key] = value
        pos += 1
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ValueError(f"expected an RBF epsilon_svr model, got {header.get('svm_type')}/{header.get('kernel_type')}")
    rows = [ln.split() for ln in lines[pos + 1:] if ln.strip()]
    if "total_sv" in header and int(header["total_sv"]) != len(rows):
        raise ValueError(f"model says total_sv={header['total_sv']} but has {len(rows)} vectors")
    sv = np.zeros((len(rows), n_features), dtype=np.float64)
    coef = np.empty(len(rows), dtype=np.float64)
    for i, parts in enumerate(rows):
        coef[i] = float(parts[0])
        for item in parts[1:]:
            idx, _, val = item.partition(":")
            j = int(idx) - 1
            if not 0 <= j < n_features:
                raise ValueError(f"feature index {idx} out of range 1..{n_features} in SV {i}")
            sv[i, j] = float(val)
    return sv, coef, float(header["gamma"]), float(header["rho"])


@lru_cache(maxsize=1)
def load_model(svm_path: str = str(SVM_PATH), range_path: str = str(RANGE_PATH)) -> SVRModel:
    """The shipped SVR and feature ranges (36 features)."""
    ranges = json.loads(Path(range_path).read_text())
    feat_min = np.asarray(ranges["min"], dtype=np.float64)
    feat_max = np.asarray(ranges["max"], dtype=np.float64)
    if feat_min.shape != (36,) or feat_max.shape != (36,):
        raise ValueError(f"{range_path}: expected 36 min/max values")
    sv, coef, gamma, rho = parse_libsvm_model(Path(svm_path).read_text(), n_features=36)
    return SVRModel(sv=sv, coef=coef, gamma=gamma, rho=rho, feat_min=feat_min, feat_max=feat_max)


def _gaussian_7x7() -> torch.Tensor:
    """Normalised 7x7 Gaussian, sigma 7/6, centred on index 3: (1,1,7,7) float64."""
    r = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (7 / 6) ** 2))
    return (g / g.sum())[None, None]


def mscn(grey: np.ndarray) -> np.ndarray:
    """(H,W) grey in [0,1] -> (H,W) MSCN coefficients (zero-padded 7x7 Gaussian statistics)."""
    t = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float64))[None, None]
    stats = F.conv2d(torch.cat([t, t * t], dim=0), _gaussian_7x7(), padding=3)
    mu, mu_sq = stats[0, 0].numpy(), stats[1, 0].numpy()
    sigma = np.sqrt(np.abs(mu * mu - mu_sq))
    return (grey - mu) / (sigma + 1.0 / 255.0)


def _phi(alpha: float) -> float:
    """Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)), increasing in a."""
    return math.exp(2 * math.lgamma(2 / alpha) - math.lgamma(1 / alpha) - math.lgamma(3 / alpha))


def _solve_alpha(target: float, lo: float = 0.05, hi: float = 50.0) -> float:
    """Root of phi(a) = target by bisection on log a (clamped to [lo, hi])."""
    if target <= _phi(lo):
        return lo
    if target >= _phi(hi):
        return hi
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if _phi(mid) < target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric generalised Gaussian moment fit -> (alpha, mean, sigma_l, sigma_r)."""
    x = x.reshape(-1)
    neg, pos = x[x < 0], x[x >= 0]
    sigma_l = math.sqrt(float(np.mean(neg ** 2))) if neg.size else 0.0
    sigma_r = math.sqrt(float(np.mean(pos ** 2))) if pos.size else 0.0
    mean_sq = float(np.mean(x ** 2))
    if sigma_l == 0.0 or sigma_r == 0.0 or mean_sq == 0.0:
        raise ValueError("BRISQUE is undefined for an image without texture (one-sided or constant MSCN)")
    r_hat = float(np.mean(np.abs(x))) ** 2 / mean_sq
    g = sigma_l / sigma_r
    alpha = _solve_alpha(r_hat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2)
    mean = (sigma_r - sigma_l) * math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha)) \
        * math.gamma(2 / alpha) / math.gamma(1 / alpha)
    return alpha, mean, sigma_l, sigma_r


def scale_features(grey: np.ndarray) -> list[float]:
    """18 BRISQUE features of one scale of a (H,W) grey image in [0,1]."""
    m = mscn(grey)
    alpha, _, sl, sr = aggd_fit(m)
    feats = [alpha, (sl ** 2 + sr ** 2) / 2]
    pairs = (m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:])
    for p in pairs:
        alpha, mean, sl, sr = aggd_fit(p)
        feats.extend([alpha, mean, sl ** 2, sr ** 2])
    return feats


def _half_cubic_axis0(x: np.ndarray) -> np.ndarray:
    """Halve axis 0 with OpenCV INTER_CUBIC at fx = 0.5: out[i] taps rows 2i-1..2i+2 (clamped)."""
    n = x.shape[0]
    n_out = max(1, int(np.rint(n * 0.5)))
    base = 2 * np.arange(n_out)
    w = (-0.09375, 0.59375, 0.59375, -0.09375)
    return sum(wk * x[np.clip(base + k - 1, 0, n - 1)] for k, wk in enumerate(w))


def half_bicubic(grey: np.ndarray) -> np.ndarray:
    """(H,W) -> (round(H/2), round(W/2)) OpenCV-style bicubic halving (a = -0.75)."""
    return _half_cubic_axis0(_half_cubic_axis0(grey).T).T


def brisque_features(img01: torch.Tensor) -> np.ndarray:
    """img01: (3,H,W) RGB in [0,1] -> (36,) raw BRISQUE features (full scale, then half scale)."""
    if img01.ndim != 3 or img01.shape[0] != 3:
        raise ValueError(f"expected a (3,H,W) image, got shape {tuple(img01.shape)}")
    h, w = img01.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"BRISQUE needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {w}x{h} (WxH)")
    rgb = img01.detach().to("cpu", torch.float64).numpy()
    grey = sum(wc * rgb[c] for c, wc in enumerate(_GREY_WEIGHTS))
    return np.array(scale_features(grey) + scale_features(half_bicubic(grey)), dtype=np.float64)


def brisque(img01: torch.Tensor) -> float:
    """BRISQUE score of one RGB image. img01: (3,H,W) in [0,1] -> float (lower is better)."""
    model = load_model()
    return model.predict(model.scale(brisque_features(img01)))
