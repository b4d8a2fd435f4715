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
                 "inference/stage2_accsamp_fast.yaml", "inference/stage2_onestep.yaml", "train/stage1.yaml",
                 "train/stage2.yaml", "train/stage3_onestep.yaml"]
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


def test_a_list_of_bases_is_merged_in_order(tmp_path):
    (tmp_path / "stage.yaml").write_text("model: {width: 320, depth: 4}\ntrain: {steps: 100}\n")
    (tmp_path / "small.yaml").write_text("model: {width: 64}\n")
    (tmp_path / "run.yaml").write_text("base: [stage.yaml, small.yaml]\ntrain: {steps: 5}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert OmegaConf.to_container(cfg) == {"model": {"width": 64, "depth": 4}, "train": {"steps": 5}}


MINI = ROOT / "configs" / "mini"
MINI_STAGE_CONFIGS = {
    # mini config -> (shipped config, keys outside `model` that the mini one may change: paths, budgets, CPU scale)
    "stage1.yaml": ("train/stage1.yaml", {"dataset.params.syn_folder", "dataset.params.real_folder",
                                          "dataset.params.crop_size", "dataset.params.p", "train.sd_path",
                                          "train.exp_dir", "train.resume", "train.learning_rate", "train.num_workers",
                                          "train.train_steps", "train.log_every", "train.ckpt_every",
                                          "train.image_every", "train.keep_last", "train.gradient_checkpointing",
                                          "train.seed"}),
    "stage2.yaml": ("train/stage2.yaml", {"dataset.params.hazy_folder", "dataset.params.clean_folder",
                                          "dataset.params.crop_size", "train.sd_path", "train.exp_dir",
                                          "train.resume", "train.learning_rate", "train.lr_schedule",
                                          "train.num_workers", "train.train_steps", "train.log_every",
                                          "train.ckpt_every", "train.image_every", "train.keep_last",
                                          "train.gradient_checkpointing", "train.seed"}),
    "stage3.yaml": ("train/stage3_onestep.yaml", {"dataset.params.hazy_folder", "dataset.params.clean_folder",
                                                  "dataset.params.crop_size", "train.sd_path", "train.exp_dir",
                                                  "train.resume", "train.learning_rate", "train.num_workers",
                                                  "train.train_steps", "train.log_every", "train.ckpt_every",
                                                  "train.image_every", "train.keep_last",
                                                  "train.gradient_checkpointing", "train.seed",
                                                  "distill.controlnet_path", "distill.ssim_scales"}),
    **{f"infer_{n}.yaml": (f"inference/{b}.yaml", {"inference.sd_path", "inference.controlnet_path",
                                                   "inference.adapter_path", "inference.result_folder",
                                                   "inference.device", "inference.min_short_side"})
       for n, b in (("stage1", "stage1"), ("stage2", "stage2"), ("accsamp", "stage2_accsamp"),
                    ("accsamp_fast", "stage2_accsamp_fast"), ("onestep", "stage2_onestep"))},
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", sorted(MINI_STAGE_CONFIGS))
def test_mini_configs_are_the_shipped_ones_on_the_mini_model(name):
    """The chain runs the shipped stage configs: only the model section, paths and budgets differ."""
    shipped, allowed = MINI_STAGE_CONFIGS[name]
    mini = OmegaConf.to_container(load_config(MINI / name), resolve=True)
    ref = OmegaConf.to_container(load_config(ROOT / "configs" / shipped), resolve=True)
    assert mini.pop("model") == OmegaConf.to_container(load_config(MINI / "model.yaml").model)
    ref.pop("model")
    mini_flat, ref_flat = _flat(mini), _flat(ref)
    assert set(mini_flat) == set(ref_flat)
    changed = {k for k in ref_flat if mini_flat[k] != ref_flat[k]}
    assert changed <= allowed, changed - allowed
