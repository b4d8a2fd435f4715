"""utils.model_builder: the one builder of inference and training, and the model-section text-processor switch."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import build_tiny, randomize_, tiny_config, write_release_checkpoints
from utils.checkpoint import CheckpointError
from utils.fog import FOG_FEATURE_DIM
from utils.model_builder import build_model, cldm_config, text_processor_on
from utils.pipeline import DiffusionRunner
from utils.train_losses import ExtensionSettings
from utils.trainer import model_config, split_settings


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
    runner = DiffusionRunner(cfg)
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


def test_training_reads_the_model_switch_and_the_design_train_key():
    """The model switch sets ext.use_text_processor; the design document's train key switches the model on."""
    base = tiny_config("configs/train/stage2.yaml")
    on = OmegaConf.merge(base, {"model": {"cldm": {"params": {"text_processor": True}}}})
    assert split_settings(on)[1].use_text_processor and not split_settings(base)[1].use_text_processor
    legacy = OmegaConf.merge(base, {"train": {"use_text_processor": True}})
    ext = split_settings(legacy)[1]
    assert ext.use_text_processor
    assert model_config(legacy, ext) == cldm_config(on.model)
    assert "text_processor_cfg" not in model_config(base, ExtensionSettings()).params
