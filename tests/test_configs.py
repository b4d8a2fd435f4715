"""The stage configs share one model section (configs/model/), included through ``base:``, so training and
inference build the same network."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import ROOT
from utils.common import load_config

MODEL_FILE = ROOT / "configs" / "model" / "sd21_ircontrolnet.yaml"
STAGE_CONFIGS = ["inference/stage1.yaml", "inference/stage2.yaml", "inference/stage2_accsamp.yaml",
                 "inference/stage2_accsamp_fast.yaml", "train/stage1.yaml", "train/stage2.yaml"]
ABLATIONS = sorted(p.name for p in (ROOT / "configs" / "train" / "ablation").glob("*.yaml"))


def _model(path: Path) -> dict:
    return OmegaConf.to_container(load_config(path).model, resolve=True)


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_every_stage_config_resolves_to_the_one_model_section(name):
    assert _model(ROOT / "configs" / name) == _model(MODEL_FILE)


@pytest.mark.parametrize("name", STAGE_CONFIGS + [f"train/ablation/{n}" for n in ABLATIONS])
def test_no_stage_config_writes_its_own_architecture(name):
    """A copied architecture could drift from the shared one: stage files may only switch extensions on."""
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / name))
    params = raw.get("model", {}).get("cldm", {}).get("params", {})
    assert "diffusion" not in raw.get("model", {})
    assert not {"unet_cfg", "vae_cfg", "clip_cfg", "latent_scale_factor"} & set(params)
    assert set(params.get("controlnet_cfg", {}).get("params", {})) <= {"ycbcr_fusion"}


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_models_differ_from_the_published_one_only_by_their_switches(name):
    model = _model(ROOT / "configs" / "train" / "ablation" / name)
    published = _model(MODEL_FILE)
    fusion = model["cldm"]["params"]["controlnet_cfg"]["params"].pop("ycbcr_fusion", False)
    processor = model["cldm"]["params"].pop("text_processor", False)
    assert model == published
    assert isinstance(fusion, bool) and isinstance(processor, bool)


def test_base_chain_is_merged_under_the_file_and_names_a_missing_base(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {x: 1, y: 2}\ninference: {steps: 50}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ninference: {steps: 10, seed: 3}\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nmodel: {y: 5}\n")
    cfg = load_config(tmp_path / "c.yaml", ["inference.seed=4"])
    assert OmegaConf.to_container(cfg) == {"model": {"x": 1, "y": 5}, "inference": {"steps": 10, "seed": 4}}
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "d.yaml")
