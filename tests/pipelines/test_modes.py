"""Modes of the dehazing page (pipelines/modes.py, configs/app/modes.yaml): resolved from data, no gradio needed."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipelines.modes import ModeError, load_modes
from tests.helpers import ROOT, tiny_config


@pytest.fixture
def weights(tmp_path) -> dict[str, str]:
    """Two existing (empty) weight files: availability is checked by path, loading is not part of these tests."""
    paths = {"inference.sd_path": tmp_path / "sd.ckpt", "inference.controlnet_path": tmp_path / "cn.pt"}
    for path in paths.values():
        path.write_bytes(b"")
    return {key: str(path) for key, path in paths.items()}


def _modes_file(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "modes.yaml"
    OmegaConf.save(OmegaConf.create({"modes": entries}), path)
    return path


def test_defaults_fill_in_only_what_the_app_config_lacks(tmp_path, weights):
    app_cfg = tiny_config("configs/inference/stage2.yaml", **weights, **{"inference.steps": 7})
    path = _modes_file(tmp_path, [{"label": "A", "script": "inference_accsamp",
                                   "defaults": "configs/inference/stage2_accsamp.yaml"}])
    (mode,) = load_modes(path, app_cfg, ROOT)
    assert mode.cfg.inference.steps == 7 and mode.cfg.inference.tau == 0.8 and mode.cfg.guidance.params.scale == 0.1
    assert mode.cfg.inference.controlnet_path == weights["inference.controlnet_path"]


def test_required_key_hides_a_mode_until_the_key_exists(tmp_path, weights):
    entry = {"label": "DDIM", "script": "inference_stage2", "requires": ["inference.sampler"],
             "set": {"inference.sampler": "ddim", "inference.steps": 25}, "sliders": {"steps": "inference.steps"}}
    path = _modes_file(tmp_path, [entry])
    app_cfg = tiny_config("configs/inference/stage2.yaml", **weights)
    app_cfg.inference.pop("sampler", None)  # a config from before the key existed
    assert load_modes(path, app_cfg, ROOT) == []
    app_cfg.inference.sampler = "spaced"  # what a config that knows the key carries
    (mode,) = load_modes(path, app_cfg, ROOT)
    assert mode.cfg.inference.sampler == "ddim" and mode.cfg.inference.steps == 25
    assert mode.run_config({"steps": 9, "tau": 0.3}).inference.steps == 9
    assert "tau" not in mode.run_config({"steps": 9, "tau": 0.3}).inference  # unmapped control ignored


def test_preset_replaces_settings_but_keeps_model_weights_and_device(tmp_path, weights):
    preset = tmp_path / "fast.yaml"
    OmegaConf.save(OmegaConf.create({
        "model": {"cldm": {"target": "elsewhere.Model"}},
        "inference": {"steps": 12, "tau": 0.5, "controlnet_path": "other.pt", "device": "cuda"},
        "guidance": {"params": {"scale": 0.5}}}), preset)
    app_cfg = tiny_config("configs/inference/stage2_accsamp.yaml", **weights, **{"inference.device": "cpu"})
    path = _modes_file(tmp_path, [{"label": "fast", "script": "inference_accsamp", "preset": str(preset)}])
    (mode,) = load_modes(path, app_cfg, ROOT)
    inf = mode.cfg.inference
    assert (inf.steps, inf.tau, mode.cfg.guidance.params.scale) == (12, 0.5, 0.5)
    assert inf.controlnet_path == weights["inference.controlnet_path"] and inf.device == "cpu"
    assert mode.cfg.model == app_cfg.model


def test_missing_files_hide_a_mode_and_bad_entries_are_refused(tmp_path, weights):
    app_cfg = tiny_config("configs/inference/stage2_accsamp.yaml", **weights)
    entries = [{"label": "no preset", "script": "inference_accsamp", "preset": "configs/inference/absent.yaml"},
               {"label": "no weights", "script": "inference_stage1", "set": {"inference.controlnet_path": "x.pt"}},
               {"label": "DCP", "script": "inference_dcp", "defaults": "configs/inference/dcp.yaml"}]
    assert [m.label for m in load_modes(_modes_file(tmp_path, entries), app_cfg, ROOT)] == ["DCP"]
    with pytest.raises(ModeError, match="unknown sliders \\['sigma'\\]"):
        load_modes(_modes_file(tmp_path, [{"label": "x", "script": "inference_dcp", "sliders": {"sigma": "a.b"}}]),
                   app_cfg, ROOT)
    with pytest.raises(ModeError, match="unknown keys \\['steps'\\]"):
        load_modes(_modes_file(tmp_path, [{"label": "x", "script": "inference_dcp", "steps": 3}]), app_cfg, ROOT)


def test_shipped_modes_resolve_against_the_published_configs(weights):
    app_cfg = tiny_config("configs/inference/stage2_accsamp.yaml", **weights)
    modes = {m.label: m for m in load_modes(ROOT / "configs" / "app" / "modes.yaml", app_cfg, ROOT)}
    assert {"AccSamp", "DiffDehaze (spaced DDPM)", "DCP baseline"} <= set(modes)
    assert modes["AccSamp"].cfg.inference.save_intermediates is True
    assert modes["DCP baseline"].cfg.dcp.patch == 15 and modes["DCP baseline"].weight_paths == {}
    for mode in modes.values():
        assert callable(mode.script.make_process)
        for key in mode.sliders.values():
            assert OmegaConf.select(mode.cfg, key) is not None, (mode.label, key)
