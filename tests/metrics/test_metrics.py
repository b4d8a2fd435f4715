"""Metrics against closed forms, the published CIEDE2000 test data and reference packages."""
from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
import torch

from metrics.brisque import brisque, half_bicubic, parse_libsvm_model
from metrics.full_reference import ciede2000, delta_e00, psnr, rgb01_to_lab, ssim_rgb
from metrics.niqe import matlab_imresize, niqe

# Sharma, Wu, Dalal, "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Color Res. Appl. 30(1), 2005, Table 1.
# (L1, a1, b1, L2, a2, b2, Delta E00)
SHARMA_2005 = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]


def test_psnr_of_known_mse() -> None:
    """32 of the 192 channel-pixels are off by 0.1: MSE = 0.01 * 32 / 192."""
    y = torch.full((1, 3, 8, 8), 0.5)
    x = y.clone()
    x[0, 0, :4] += 0.1
    mse = 0.01 * 32 / 192
    assert psnr(x, y).item() == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    assert psnr(y, y).item() == math.inf


def test_psnr_batch_is_per_image() -> None:
    y = torch.zeros(2, 3, 4, 4)
    x = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])
    assert psnr(x, y).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)


def test_ssim_identical_is_one() -> None:
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    assert ssim_rgb(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_ssim_constant_shift_matches_hand_computation() -> None:
    """y = x + d: variances and covariance are unchanged, so cs = 1 and
    SSIM = mean over windows of (2 mu (mu + d) + C1) / (mu^2 + (mu + d)^2 + C1).
    With x constant 0.2 inside every window the mean is a single number."""
    d, mu = 0.1, 0.2
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * mu * (mu + d) + c1) / (mu ** 2 + (mu + d) ** 2 + c1)
    x = torch.full((1, 3, 16, 16), mu, dtype=torch.float64)
    assert ssim_rgb(x + d, x).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.9231, abs=1e-4)


def test_ssim_textured_shift_is_luminance_term_only() -> None:
    """For textured x the structure term stays 1 under a shift; SSIM equals the mean over valid
    11x11 windows of the luminance term computed from hand-made window means."""
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 0.2 * torch.rand(1, 3, 20, 20, generator=g, dtype=torch.float64)
    d = 0.05
    r = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    w2 = torch.outer(w1, w1) / torch.outer(w1, w1).sum()
    c1 = 1e-4
    vals = []
    for c in range(3):
        for i in range(10):
            for j in range(10):
                m = float((x[0, c, i:i + 11, j:j + 11] * w2).sum())
                vals.append((2 * m * (m + d) + c1) / (m * m + (m + d) ** 2 + c1))
    assert ssim_rgb(x + d, x).item() == pytest.approx(float(np.mean(vals)), abs=1e-10)


def test_ciede2000_sharma_table() -> None:
    data = torch.tensor(SHARMA_2005, dtype=torch.float64)
    got = ciede2000(data[:, 0:3], data[:, 3:6])
    assert torch.allclose(got, data[:, 6], atol=1e-4, rtol=0)
    swapped = ciede2000(data[:, 3:6], data[:, 0:3])
    assert torch.allclose(swapped, got, atol=1e-12)


def test_lab_of_reference_colours() -> None:
    """White -> (100,0,0); black -> 0; sRGB red -> (53.2408, 80.0925, 67.2032) (D65, 2 deg)."""
    img = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    lab = rgb01_to_lab(img)[0, :, 0].T
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=1e-3)
    assert lab[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    assert lab[2].tolist() == pytest.approx([53.2408, 80.0925, 67.2032], abs=2e-3)


def test_delta_e00_image_mean() -> None:
    """Half the pixels red vs. white, half equal: mean = Delta E00(red, white) / 2."""
    y = torch.ones(1, 3, 2, 2)
    x = y.clone()
    x[0, 1:, 0, :] = 0.0
    pair = ciede2000(rgb01_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)),
                     rgb01_to_lab(torch.ones(1, 3, 1, 1))).item()
    assert delta_e00(x, y).item() == pytest.approx(pair / 2, abs=1e-12)
    assert delta_e00(y, y).item() == 0.0


def test_matlab_imresize_half_of_constant_and_ramp() -> None:
    """Antialiased bicubic halving keeps constants and (away from borders) linear ramps: output
    pixel i (0-based) sits at input coordinate 2i + 0.5."""
    const = np.full((8, 10), 3.0)
    assert np.allclose(matlab_imresize(const, 0.5), 3.0)
    ramp = np.tile(np.arange(40, dtype=np.float64), (40, 1))
    out = matlab_imresize(ramp, 0.5)
    assert out.shape == (20, 20)
    assert np.allclose(out[:, 3:-3], (2 * np.arange(20) + 0.5)[None, 3:-3])


def test_half_bicubic_keys_weights() -> None:
    """OpenCV-style halving: out[i] = -3/32 x[2i-1] + 19/32 x[2i] + 19/32 x[2i+1] - 3/32 x[2i+2]."""
    x = np.arange(12, dtype=np.float64) ** 2
    col = half_bicubic(np.tile(x[:, None], (1, 4)))[:, 0]
    i = 2
    assert col[i] == pytest.approx((-3 * x[3] + 19 * x[4] + 19 * x[5] - 3 * x[6]) / 32)
    assert col.shape == (6,)


def test_parse_libsvm_model_sparse_entries() -> None:
    text = ("svm_type epsilon_svr\nkernel_type rbf\ngamma 0.5\nnr_class 2\ntotal_sv 2\nrho -1.5\n"
            "SV\n2 1:0.5 3:-1\n-1 2:2\n")
    sv, coef, gamma, rho = parse_libsvm_model(text, n_features=3)
    assert sv.tolist() == [[0.5, 0.0, -1.0], [0.0, 2.0, 0.0]]
    assert coef.tolist() == [2.0, -1.0] and gamma == 0.5 and rho == -1.5
    with pytest.raises(ValueError, match="epsilon_svr"):
        parse_libsvm_model(text.replace("epsilon_svr", "c_svc"), n_features=3)


def test_noref_metrics_reject_tiny_and_flat_images() -> None:
    with pytest.raises(ValueError, match="96x96"):
        niqe(torch.rand(3, 64, 300))
    with pytest.raises(ValueError, match="texture"):
        brisque(torch.full((3, 64, 64), 0.5))
    assert math.isnan(niqe(torch.full((3, 96, 192), 0.5)))


def _natural_images() -> list[tuple[str, torch.Tensor, np.ndarray]]:
    data = _reference("skimage.data", "ships the test photos")
    out = []
    for name in ("coffee", "chelsea", "rocket"):
        rgb = np.ascontiguousarray(getattr(data, name)())
        out.append((name, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0, rgb))
    return out


def _reference(module: str, why: str):
    """Import a test-only reference package, or skip with the reason it is unavailable."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # missing, or broken against this environment's versions
        pytest.skip(f"{module} ({why}) not importable: {type(err).__name__}: {err}")


def _import_basicsr_niqe():
    """basicsr 1.4.2 imports torchvision.transforms.functional_tensor, which torchvision >= 0.17
    renamed to _functional_tensor; alias it (a known compatibility shim) before importing."""
    try:
        import torchvision.transforms._functional_tensor as ft
        sys.modules.setdefault("torchvision.transforms.functional_tensor", ft)
    except ImportError:
        pass
    return _reference("basicsr.metrics.niqe", "NIQE reference implementation").calculate_niqe


def test_niqe_matches_basicsr_within_1_percent() -> None:
    """basicsr computes in float32 (Y channel and resized image), we in float64; on these
    photos the scores agree to < 0.1 % (astronaut: 1.1 %, from float32 rounding alone)."""
    calculate_niqe = _import_basicsr_niqe()
    for name, img01, rgb in _natural_images():
        ref = calculate_niqe(rgb[..., ::-1].astype(np.float64), crop_border=0, input_order="HWC", convert_to="y")
        assert niqe(img01) == pytest.approx(ref, rel=0.01), name


def test_brisque_matches_brisque_package_within_1_percent() -> None:
    """Reference: the PyPI package ``brisque`` (0.2.0), its own feature code and LIBSVM predictor.
    Its BRISQUE.score() breaks under NumPy >= 2.x (float() of 1-element arrays), so the same
    steps as score() are called here with the features converted element by element."""
    brisque_pkg = _reference("brisque", "BRISQUE reference implementation")
    cv2 = _reference("cv2", "OpenCV, used by brisque")
    skimage_color = _reference("skimage.color", "scikit-image, used by brisque")

    ref_model = brisque_pkg.BRISQUE(url=False)
    for name, img01, rgb in _natural_images():
        grey = skimage_color.rgb2gray(rgb)
        small = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        feats = np.concatenate([ref_model.calculate_brisque_features(g, kernel_size=7, sigma=7 / 6)
                                for g in (grey, small)])
        ref = ref_model.calculate_image_quality_score(np.array([np.asarray(f, dtype=np.float64).item() for f in feats]))
        assert brisque(img01) == pytest.approx(ref, rel=0.01), name
