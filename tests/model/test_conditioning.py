"""One fog-aware condition for training and inference, and one rule for the unconditional branch."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from haze.fog import analyze_fog, fog_features
from haze.prompts import prompts_from_infos
from model.conditioning import fog_aware_condition
from tests.helpers import ROOT, build_tiny, randomize_, tiny_config

FUSION = {"model.cldm.params.controlnet_cfg.params.ycbcr_fusion": True}


def _fused_model():
    model = build_tiny(seed=1, cfg=tiny_config(**FUSION, **{"model.cldm.params.text_processor": True}))
    randomize_(model.controlnet, seed=2, std=0.05)
    randomize_(model.text_processor, seed=3, std=0.05)
    return model.eval()


def _images(b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.nn.functional.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")


def test_unconditional_branch_is_zero_latent_and_features_of_a_zero_image():
    model = _fused_model()
    cond01 = _images(3)
    is_cond = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed = model.prepare_condition(cond01, ["a"] * 3, is_cond=is_cond)
        full = model.prepare_condition(cond01, ["a"] * 3)
        zero_feats = model.controlnet.ycbcr.encode(torch.zeros(1, 3, 32, 32))
        uncond = model.unconditional(full, cond01)
    assert torch.equal(mixed["c_img"][1], torch.zeros_like(mixed["c_img"][1]))
    assert torch.equal(mixed["c_img"][[0, 2]], full["c_img"][[0, 2]])
    for level, feats in enumerate(mixed["c_ycbcr"]):
        assert torch.allclose(feats[1], zero_feats[level][0], atol=1e-6)
        assert torch.equal(feats[[0, 2]], full["c_ycbcr"][level][[0, 2]])
        assert torch.allclose(uncond["c_ycbcr"][level], zero_feats[level].expand_as(feats), atol=1e-6)
    assert torch.equal(uncond["c_txt"], full["c_txt"]) and not uncond["c_img"].any()
    assert full["c_img"].abs().sum() > 0  # a black image does not encode to zero: the branch zeroes the latent


def test_fog_aware_condition_is_analysis_prompts_and_processor():
    model = _fused_model()
    cond01, hazy01 = _images(2), _images(2).flip(-1)
    with torch.no_grad():
        out = fog_aware_condition(model, cond01, hazy01, ["x", "y"], stage=2, dynamic_prompt=True,
                                  prompt_rng=random.Random(5))
        infos = analyze_fog(hazy01)
        prompts = prompts_from_infos(infos, 2, random.Random(5))
        expected = model.prepare_condition(cond01, prompts, fog_features(infos))
        plain = fog_aware_condition(model, cond01, hazy01, ["x", "y"], stage=2, process_text=False)
    assert out.prompts == prompts and [i.features.tolist() for i in out.infos] == [i.features.tolist() for i in infos]
    assert torch.equal(out.cond["c_txt"], expected["c_txt"]) and torch.equal(out.cond["c_img"], expected["c_img"])
    assert plain.infos is None and plain.prompts == ["x", "y"]
    assert torch.equal(plain.cond["c_txt"], model.clip(["x", "y"]))


@pytest.mark.slow
def test_networks_do_not_import_the_fog_analyser():
    """The networks of model/ take fog features as tensors; only the builder (the feature length) and the
    conditioning function (analyser + prompts) reach into haze.fog / haze.prompts."""
    code = ("import pkgutil, importlib, sys, model\n"
            "for m in pkgutil.iter_modules(model.__path__):\n"
            "    if m.name not in ('builder', 'conditioning'): importlib.import_module('model.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n in ('haze.fog', 'haze.prompts', 'model.conditioning')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
