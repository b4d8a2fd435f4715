"""inference_onestep: the stage-2 weights with a stage-3 adapter file merged at load give, through the scripts' folder
loop, the student's own output; settings and weight files are checked before any work."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from model.builder import build_model
from model.onestep import OneStepStudent
from pipelines import onestep
from pipelines.folder import run_folder
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings, InferenceSettingsError
from tests.helpers import ROOT, randomize_adapters_, run_script, tiny_config
from utils.image_io import load_rgb01, save_png01


def onestep_config(tmp_path: Path, weights, adapters: Path | None, **extra):
    """configs/inference/stage2_onestep.yaml on the tiny model and weights, images tmp_path/in -> tmp_path/out."""
    values = {"sd_path": weights[0], "controlnet_path": weights[1], "adapter_path": adapters,
              "image_folder": tmp_path / "in", "result_folder": tmp_path / "out", "device": "cpu",
              "min_short_side": 64, **extra}
    return OmegaConf.merge(tiny_config("configs/inference/stage2_onestep.yaml"),
                           {"inference": {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}})


@pytest.fixture
def student_file(tmp_path: Path, weights) -> tuple[Path, OneStepStudent]:
    ldm, diffusion = build_model(tiny_config().model, str(weights[0]), str(weights[1]))
    student = OneStepStudent(ldm.eval(), diffusion, timestep=950)
    randomize_adapters_(student.denoiser, 3)
    path = tmp_path / "adapters.safetensors"
    student.save_adapters(path)
    return path, student


def test_folder_run_with_merged_adapters_equals_the_student(tmp_path: Path, weights, student_file):
    path, student = student_file
    hazy = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    save_png01(hazy, tmp_path / "in" / "a.png")
    cfg = onestep_config(tmp_path, weights, path)
    inf = InferenceSettings.from_config(cfg)
    inf.check_script("inference_onestep")
    runner = DiffusionRunner(cfg, inf, adapter_path=inf.adapter_path)
    assert runner.onestep_timestep == 950
    status = run_folder(inf, onestep.make_process(cfg, inf, runner), onestep.output_names(inf), False, "test",
                        runner.batch_key)
    assert status == 0
    with torch.no_grad():
        expected = (student.dehaze(load_rgb01(tmp_path / "in" / "a.png")[None], ["remove dense fog"])[0] * 0.5
                    + 0.5).clamp(0, 1)
    out = load_rgb01(tmp_path / "out" / "a.png")
    assert out.shape == (3, 64, 64)
    assert (out - expected).abs().max() <= 1.5 / 255  # PNG rounding of the same image


def test_onestep_settings_need_the_adapter_file_and_read_no_sampler_keys(tmp_path: Path, weights):
    cfg = onestep_config(tmp_path, weights, None)
    with pytest.raises(InferenceSettingsError, match=r"inference\.adapter_path is required by inference_onestep"):
        InferenceSettings.from_config(cfg).check_script("inference_onestep")
    stage2 = OmegaConf.merge(cfg, {"inference": {"steps": 20, "adapter_path": "x.safetensors"}})
    assert InferenceSettings.ignored_keys(stage2, "inference_onestep") == ["steps"]
    with pytest.raises(ValueError, match="adapter_path"):
        onestep.make_process(cfg, InferenceSettings.from_config(cfg),
                             DiffusionRunner(cfg, InferenceSettings.from_config(cfg)))


@pytest.mark.slow
def test_script_runs_and_refuses_a_missing_adapter_file(tmp_path: Path, weights, student_file, real_images):
    path, _ = student_file
    cfg = onestep_config(tmp_path, weights, path, image_folder=real_images)
    OmegaConf.save(cfg, tmp_path / "ok.yaml")
    done = run_script("onestep", tmp_path / "ok.yaml")
    assert done.returncode == 0, done.stderr
    for src in real_images.glob("*.png"):
        assert load_rgb01(tmp_path / "out" / src.name).shape == load_rgb01(src).shape[-3:]
    OmegaConf.save(OmegaConf.merge(cfg, {"inference": {"adapter_path": str(tmp_path / "none.safetensors")}}),
                   tmp_path / "bad.yaml")
    missing = run_script("onestep", tmp_path / "bad.yaml")
    assert missing.returncode == 2 and "adapter_path" in missing.stderr and "none.safetensors" in missing.stderr
    assert (ROOT / "inference_onestep.py").is_file()
