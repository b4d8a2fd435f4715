"""model.builder: the one builder of inference and training, and the model-section text-processor switch."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from haze.fog import FOG_FEATURE_DIM
from model.builder import build_model, cldm_config, text_processor_on
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from tests.helpers import build_tiny, randomize_, tiny_config, write_release_checkpoints
from training.settings import resolve_aliases, split_settings
from training.state import TrainError
from utils.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = build_tiny(seed=3)
    randomize_(model.unet, seed=4, std=0.02)
    randomize_(model.controlnet, seed=5, std=0.02)
    return model, write_release_checkpoints(model, tmp_path_factory.mktemp("w"))


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_builder_loads_sd_and_controlnet_and_is_what_inference_runs(release):
    model, (sd_path, cn_path) = release
    cfg = tiny_config(**{"inference.sd_path": sd_path, "inference.controlnet_path": cn_path,
                         "inference.device": "cpu"})
    ldm, diffusion = build_model(cfg.model, str(sd_path), str(cn_path))
    for name in ("unet", "vae", "clip", "controlnet"):
        assert _equal(getattr(ldm, name), getattr(model, name)), name
    assert diffusion.num_timesteps == 1000 and diffusion.parameterization == "eps"
    runner = DiffusionRunner(cfg, InferenceSettings.from_config(cfg))
    assert _equal(runner.model, ldm)


def test_builder_without_controlnet_checkpoint_starts_from_the_unet(release):
    _, (sd_path, _) = release
    ldm, _ = build_model(tiny_config().model, str(sd_path))
    unet = ldm.unet.state_dict()
    shared = [k for k, v in ldm.controlnet.state_dict().items() if k in unet and unet[k].shape == v.shape]
    assert shared and all(torch.equal(ldm.controlnet.state_dict()[k], unet[k]) for k in shared)


def test_sd_checkpoint_lacking_tensors_names_the_key(tmp_path, release):
    model, _ = release
    sd = {f"model.diffusion_model.{k}": v for k, v in model.unet.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match=r"train\.sd_path .*partial\.ckpt lacks"):
        build_model(tiny_config().model, str(tmp_path / "partial.ckpt"), sd_key="train.sd_path")


def test_text_processor_switch_in_the_model_section():
    cfg = tiny_config(**{"model.cldm.params.text_processor": True})
    assert text_processor_on(cfg.model)
    proc = cldm_config(cfg.model).params.text_processor_cfg
    assert proc.target == "model.text_processor.TextConditionProcessor"
    assert (proc.params.dim, proc.params.fog_feat_dim) == (32, FOG_FEATURE_DIM)
    assert "text_processor" not in cldm_config(cfg.model).params
    assert not text_processor_on(tiny_config().model)
    with pytest.raises(ValueError, match="model.cldm.params.text_processor must be true or false"):
        text_processor_on(tiny_config(**{"model.cldm.params.text_processor": 1}).model)


def test_design_train_key_is_an_alias_of_the_one_model_switch():
    """``train.use_text_processor: true`` (the design document's key) becomes the model switch and leaves ``train``;
    ``false`` changes nothing (the model switch still decides); the extension settings are the same either way."""
    base = tiny_config("configs/train/stage2.yaml")
    on = OmegaConf.merge(base, {"model": {"cldm": {"params": {"text_processor": True}}}})
    alias = resolve_aliases(OmegaConf.merge(base, {"train": {"use_text_processor": True}}))
    assert "use_text_processor" not in alias.train and cldm_config(alias.model) == cldm_config(on.model)
    assert resolve_aliases(on) is on and resolve_aliases(base) is base
    off_over_on = resolve_aliases(OmegaConf.merge(on, {"train": {"use_text_processor": False}}))
    assert text_processor_on(off_over_on.model) and "use_text_processor" not in off_over_on.train
    assert not text_processor_on(resolve_aliases(OmegaConf.merge(base, {"train": {"use_text_processor": False}})).model)
    assert split_settings(OmegaConf.merge(base, {"train": {"use_text_processor": True}})) == split_settings(base)
    with pytest.raises(TrainError, match="train.use_text_processor must be true or false"):
        resolve_aliases(OmegaConf.merge(base, {"train": {"use_text_processor": "yes"}}))
    assert "text_processor_cfg" not in cldm_config(base.model).params
