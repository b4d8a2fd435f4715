"""Full-reference image metrics: PSNR, SSIM and CIEDE2000 colour difference.

All take RGB images ``x01, y01: (B,3,H,W) in [0,1]`` of equal shape and return per-image (B,)
float64 tensors. PSNR and CIEDE2000 are computed in float64.

  * PSNR = 10 log10(1 / MSE), MSE over all pixels and the three RGB channels (data range 1);
    +inf for identical images.
  * SSIM (Wang et al., TIP 2004) via metrics.ssim.ssim: 11x11 Gaussian window, sigma 1.5,
    K1 = 0.01, K2 = 0.03, data range 1, valid (unpadded) windows, computed per RGB channel and
    averaged over channels and positions.
  * Delta E 2000 (CIE 142-2001; Sharma, Wu, Dalal, Color Res. Appl. 30(1), 2005), kL = kC =
    kH = 1, averaged over pixels. Colours are taken as sRGB (IEC 61966-2-1): the sRGB transfer
    curve is inverted, linear RGB -> XYZ with the sRGB/D65 matrix, XYZ -> CIELAB with the D65
    white point of that matrix (Xn, Yn, Zn) = (0.95047, 1, 1.08883).
"""

from __future__ import annotations

import torch

from metrics.ssim import ssim

SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
D65_WHITE = (0.95047, 1.0, 1.08883)

SETTINGS = {
    "psnr": "PSNR in dB on RGB in [0,1] (data range 1), MSE over all pixels and channels; +inf if identical",
    "ssim": "SSIM (Wang et al. 2004) on RGB in [0,1]: 11x11 Gaussian window sigma 1.5, K1=0.01, K2=0.03, "
            "data range 1, valid windows, mean over channels and positions (metrics.ssim.ssim)",
    "deltae00": "mean CIEDE2000 (kL=kC=kH=1) over pixels in CIELAB D65; sRGB -> linear (IEC 61966-2-1) -> "
                "XYZ (sRGB D65 matrix) -> Lab with white (0.95047, 1, 1.08883)",
}


def check_pair(x01: torch.Tensor, y01: torch.Tensor) -> None:
    """ValueError unless x01 and y01 are (B,3,H,W) images of equal shape."""
    if x01.ndim != 4 or x01.shape[1] != 3 or x01.shape != y01.shape:
        raise ValueError(f"expected two (B,3,H,W) images of equal shape, got {tuple(x01.shape)} and {tuple(y01.shape)}")


def psnr(x01: torch.Tensor, y01: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image. x01, y01: (B,C,H,W) -> (B,) float64 (+inf where MSE = 0)."""
    if x01.shape != y01.shape or x01.ndim != 4:
        raise ValueError(f"expected two (B,C,H,W) images of equal shape, got {tuple(x01.shape)} and {tuple(y01.shape)}")
    mse = (x01.double() - y01.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim_rgb(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """SSIM per image with the settings above. x01, y01: (B,3,H,W) in [0,1] -> (B,) float64.

    Float32 inputs are computed in float32 (agrees with float64 to ~1e-5, 4x faster on CPU);
    float64 inputs in float64."""
    check_pair(x01, y01)
    return ssim(x01, y01, data_range=1.0, window_size=11, sigma=1.5, k1=0.01, k2=0.03).double()


def srgb_to_linear(img01: torch.Tensor) -> torch.Tensor:
    """Inverse sRGB transfer curve (IEC 61966-2-1), elementwise on values in [0,1]."""
    return torch.where(img01 <= 0.04045, img01 / 12.92, ((img01 + 0.055) / 1.055) ** 2.4)


def rgb01_to_lab(img01: torch.Tensor) -> torch.Tensor:
    """sRGB (B,3,H,W) in [0,1] -> CIELAB (B,3,H,W) float64 (L in [0,100]), D65."""
    lin = srgb_to_linear(img01.double().clamp(0.0, 1.0))
    m = torch.tensor(SRGB_TO_XYZ, dtype=torch.float64, device=img01.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    white = torch.tensor(D65_WHITE, dtype=torch.float64, device=img01.device).view(1, 3, 1, 1)
    t = xyz / white
    eps = (6.0 / 29.0) ** 3
    f = torch.where(t > eps, t.clamp_min(eps) ** (1.0 / 3.0), t / (3.0 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor, k_l: float = 1.0, k_c: float = 1.0,
              k_h: float = 1.0) -> torch.Tensor:
    """CIEDE2000 colour difference, following Sharma, Wu, Dalal (2005) eqs. (1)-(16).

    lab1, lab2: (N,3,...) CIELAB with the channel on dim 1 -> (N,...) float64 Delta E00.
    Hue angles are in degrees in [0, 360); the mean hue and hue difference use the paper's
    conventions for achromatic colours (C' = 0).
    """
    if lab1.shape != lab2.shape or lab1.ndim < 2 or lab1.shape[1] != 3:
        raise ValueError(f"expected two (N,3,...) Lab tensors of equal shape, "
                         f"got {tuple(lab1.shape)} and {tuple(lab2.shape)}")
    l1, a1, b1 = lab1.double().unbind(1)
    l2, a2, b2 = lab2.double().unbind(1)
    c_bar = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2.0
    c7 = c_bar ** 7
    g = 0.5 * (1.0 - torch.sqrt(c7 / (c7 + 25.0 ** 7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.rad2deg(torch.atan2(b1, a1p)) % 360.0
    h2p = torch.rad2deg(torch.atan2(b2, a2p)) % 360.0
    h1p = torch.where(c1p == 0, torch.zeros_like(h1p), h1p)
    h2p = torch.where(c2p == 0, torch.zeros_like(h2p), h2p)

    d_lp = l2 - l1
    d_cp = c2p - c1p
    chroma_zero = (c1p * c2p) == 0
    dh = h2p - h1p
    dh = torch.where(dh > 180.0, dh - 360.0, torch.where(dh < -180.0, dh + 360.0, dh))
    dh = torch.where(chroma_zero, torch.zeros_like(dh), dh)
    d_hp = 2.0 * torch.sqrt(c1p * c2p) * torch.sin(torch.deg2rad(dh) / 2.0)

    l_bar = (l1 + l2) / 2.0
    c_bar_p = (c1p + c2p) / 2.0
    h_sum = h1p + h2p
    h_bar = torch.where(
        (h1p - h2p).abs() <= 180.0, h_sum / 2.0,
        torch.where(h_sum < 360.0, (h_sum + 360.0) / 2.0, (h_sum - 360.0) / 2.0))
    h_bar = torch.where(chroma_zero, h_sum, h_bar)

    t = (1.0 - 0.17 * torch.cos(torch.deg2rad(h_bar - 30.0)) + 0.24 * torch.cos(torch.deg2rad(2.0 * h_bar))
         + 0.32 * torch.cos(torch.deg2rad(3.0 * h_bar + 6.0)) - 0.20 * torch.cos(torch.deg2rad(4.0 * h_bar - 63.0)))
    d_theta = 30.0 * torch.exp(-(((h_bar - 275.0) / 25.0) ** 2))
    c_bar_p7 = c_bar_p ** 7
    r_c = 2.0 * torch.sqrt(c_bar_p7 / (c_bar_p7 + 25.0 ** 7))
    s_l = 1.0 + 0.015 * (l_bar - 50.0) ** 2 / torch.sqrt(20.0 + (l_bar - 50.0) ** 2)
    s_c = 1.0 + 0.045 * c_bar_p
    s_h = 1.0 + 0.015 * c_bar_p * t
    r_t = -torch.sin(torch.deg2rad(2.0 * d_theta)) * r_c

    tl = d_lp / (k_l * s_l)
    tc = d_cp / (k_c * s_c)
    th = d_hp / (k_h * s_h)
    return torch.sqrt(tl ** 2 + tc ** 2 + th ** 2 + r_t * tc * th)


def delta_e00(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """Mean CIEDE2000 per image. x01, y01: (B,3,H,W) sRGB in [0,1] -> (B,) float64."""
    check_pair(x01, y01)
    return ciede2000(rgb01_to_lab(x01), rgb01_to_lab(y01)).flatten(1).mean(dim=1)


def full_reference_metrics(x01: torch.Tensor, y01: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"psnr", "ssim", "deltae00"} -> (B,) float64 each, for result x01 against reference y01."""
    return {"psnr": psnr(x01, y01), "ssim": ssim_rgb(x01, y01), "deltae00": delta_e00(x01, y01)}

