"""CrossDehaze channel transfer: the gamma formula, the estimator on images made with a known gamma, and the
dataset wrapper."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.transfer import ChannelTransfer, apply_gamma, estimate_gamma
from tests.train_helpers import make_stage1_data, make_stage2_data

GAMMA = (1.90, 1.91, 1.91)  # R, G, B: the published script's B, G, R values 1.91 / 1.91 / 1.90


def test_apply_gamma_is_the_per_channel_power():
    img = torch.rand(3, 5, 7)
    out = apply_gamma(img, GAMMA)
    for c, g in enumerate(GAMMA):
        assert torch.allclose(out[c], img[c] ** (1 / g))
    assert torch.equal(apply_gamma(img, (1.0, 1.0, 1.0)), img)


def test_estimator_recovers_the_gamma_that_made_the_reference_set(tmp_path):
    """Reference images are the source images raised to 1/γ_c (16-bit PNGs would be exact; 8-bit ones quantise, so
    the estimate is within 0.01)."""
    rng = np.random.default_rng(0)
    src, ref = tmp_path / "src", tmp_path / "ref"
    src.mkdir(), ref.mkdir()
    for i in range(3):
        img = rng.uniform(0.15, 1.0, (24, 32, 3))
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(src / f"a{i}.png")
        quantised = np.round(img * 255) / 255
        made = quantised ** (1 / np.asarray(GAMMA))
        Image.fromarray(np.round(made * 255).astype(np.uint8)).save(ref / f"b{i}.png")
    estimate = estimate_gamma(src, ref)
    assert estimate == pytest.approx(GAMMA, abs=0.01)
    assert estimate_gamma(src, src) == pytest.approx((1.0, 1.0, 1.0))


def test_wrapper_changes_only_the_hazy_images(tmp_path):
    data = make_stage2_data(tmp_path, n=2, size=24)
    inner = {"target": "dataset.StaticPairedData",
             "params": {"hazy_folder": str(data / "hazy"), "clean_folder": str(data / "clean"), "crop_size": 16,
                        "jpeg_p": 0.0}}
    plain = ChannelTransfer(inner, gamma=(1.0, 1.0, 1.0), seed=3)
    moved = ChannelTransfer(inner, gamma=GAMMA, seed=3)
    a, b = plain[1], moved[1]
    assert torch.equal(a["target"], b["target"])
    assert torch.allclose(b["condition"], apply_gamma(a["condition"], GAMMA))
    assert torch.allclose(b["hazy_ref"], apply_gamma(a["hazy_ref"], GAMMA))
    assert len(moved) == 2
    estimated = ChannelTransfer(inner, source_folder=str(data / "hazy"), reference_folder=str(data / "hazy"), seed=3)
    assert estimated.gamma == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="gamma"):
        ChannelTransfer(inner)


def test_wrapper_maps_the_hazy_target_of_stage1_samples(tmp_path):
    """HybridTrainingData holds the hazy image in ``target`` ([-1,1]) and ``hazy_ref``; clean, t and A stay."""
    syn, _ = make_stage1_data(tmp_path, n_syn=2, n_real=1, size=(24, 28))
    inner = {"target": "dataset.HybridTrainingData",
             "params": {"syn_folder": str(syn), "real_folder": None, "crop_size": 16, "p": 1.0}}
    a, b = ChannelTransfer(inner, gamma=(1.0, 1.0, 1.0), seed=1)[0], ChannelTransfer(inner, gamma=GAMMA, seed=1)[0]
    assert torch.allclose((b["target"] + 1) / 2, apply_gamma((a["target"] + 1) / 2, GAMMA), atol=1e-6)
    assert torch.allclose(b["hazy_ref"], apply_gamma(a["hazy_ref"], GAMMA))
    for key in ("condition", "transmission", "airlight"):
        assert torch.equal(a[key], b[key]), key
