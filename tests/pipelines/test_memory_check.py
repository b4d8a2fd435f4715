"""``inference.max_memory_gb`` in every diffusion script (stage 2, AccSamp, HazeGen): an image whose estimated peak
is above the limit is refused before any denoiser call, with tile settings that fit in the message, and a run with
those settings goes through under the same limit."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipelines import accsamp as inference_accsamp
from pipelines import stage1 as inference_stage1
from pipelines import stage2 as inference_stage2
from pipelines.memory import CANDIDATES, ModelSize, estimate_peak_gb, fitting_settings, tile_settings
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from tests.helpers import tiny_config, write_tiny_release_weights

SCRIPTS = {"stage2": (inference_stage2, "configs/inference/stage2.yaml", "photo.png"),
           "accsamp": (inference_accsamp, "configs/inference/stage2_accsamp.yaml", "photo.png"),
           "hazegen": (inference_stage1, "configs/inference/stage1.yaml", "photo_0.png")}
HW = (320, 320)  # larger than the 256-px candidate tiles, so smaller tiles lower the estimate
ARGS = argparse.Namespace(skip_existing=False, show_steps=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(weights folder paths, image folder with one 320×320 photo)."""
    root = tmp_path_factory.mktemp("memcheck")
    weights = write_tiny_release_weights(root / "weights")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*HW, 3), dtype=np.uint8)).save(images / "photo.png")
    return weights, images


def config(script: str, inputs, results, **extra):
    weights, images = inputs
    return tiny_config(SCRIPTS[script][1], **{
        "inference.sd_path": weights[0], "inference.controlnet_path": weights[1], "inference.image_folder": images,
        "inference.result_folder": results, "inference.steps": 4, "inference.device": "cpu",
        "inference.min_short_side": 64, "inference.tiled": True, **extra})


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_too_large_is_refused_before_sampling_and_named_settings_fit(tmp_path, inputs, script, caplog, monkeypatch):
    module, _, output = SCRIPTS[script]
    model_size = ModelSize.from_config(config(script, inputs, tmp_path), torch.float32)
    base = config(script, inputs, tmp_path)
    need = estimate_peak_gb(model_size, HW, script, tile_settings(base, InferenceSettings.from_config(base)))
    smaller = next(est for est in (estimate_peak_gb(model_size, HW, script, t) for t in CANDIDATES) if est < need)
    limit = (need + smaller) / 2  # the configured (default) tiles do not fit, a candidate does
    fits = fitting_settings(model_size, HW, script, limit)
    assert fits is not None and fits.vae_tile < 512

    calls = []
    denoiser = DiffusionRunner.denoiser
    monkeypatch.setattr(DiffusionRunner, "denoiser", lambda self, hw: calls.append(hw) or denoiser(self, hw))
    refused = tmp_path / "refused"
    cfg = config(script, inputs, refused, **{"inference.max_memory_gb": limit})
    assert module.run(cfg, InferenceSettings.from_config(cfg), ARGS) == 1
    assert calls == [] and not (refused / output).exists()
    message = next(r.getMessage() for r in caplog.records if "max_memory_gb" in r.getMessage())
    assert f"failed: photo.png: {script} on a 320x320 (padded) image needs ~" in message
    assert fits.overrides(script) in message

    fitted = tmp_path / "fitted"
    cfg = OmegaConf.merge(config(script, inputs, fitted, **{"inference.max_memory_gb": limit}),
                          OmegaConf.from_dotlist(fits.overrides(script).split()))
    assert module.run(cfg, InferenceSettings.from_config(cfg), ARGS) == 0
    assert calls and (fitted / output).is_file()
