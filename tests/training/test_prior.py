"""Mini prior pretraining (training/prior.py): its losses' minimisers, the exact latent rescaling, the checkpoint
layout against the mini manifests, the published schema, settings checks and the resumable two-phase run."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model.builder import build_model, cldm_config
from model.vae import DiagonalGaussian
from tests.helpers import ROOT, manifest
from training.prior import (PriorDiverged, kl_to_standard_normal, read_settings, rescale_latents, save_sd_checkpoint,
                            train_prior, vae_loss)
from utils.checkpoint import load_state_dict
from utils.common import instantiate_from_config, load_config

MINI = ROOT / "configs" / "mini"


def _mini_vae(seed: int = 0):
    torch.manual_seed(seed)
    return instantiate_from_config(load_config(MINI / "model.yaml").model.cldm.params.vae_cfg).eval()


def test_kl_matches_torch_distributions_and_is_zero_only_at_standard_normal():
    gen = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 3, 3, generator=gen)
    post = DiagonalGaussian(moments)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(post.mean, post.std),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    assert torch.allclose(kl_to_standard_normal(post), ref, atol=1e-5)
    assert kl_to_standard_normal(DiagonalGaussian(torch.zeros(2, 8, 3, 3))).item() == 0.0
    assert kl_to_standard_normal(post).item() > 0.1


def test_vae_loss_is_zero_for_a_perfect_autoencoder_with_standard_normal_posterior():
    """The loss's minimiser: decode(encode(x)) = x and a N(0, I) posterior give exactly 0."""

    class Identity(torch.nn.Module):
        def encode(self, x):
            return DiagonalGaussian(torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1))

        def decode(self, z):
            return self.target

    ae, x = Identity(), torch.rand(2, 3, 8, 8) * 2 - 1
    ae.target = x
    loss, logs = vae_loss(ae, x, 1e-3, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and logs["kl"] == 0.0
    ae.target = x + 0.1
    assert vae_loss(ae, x, 1e-3, torch.Generator().manual_seed(0))[0].item() == pytest.approx(0.1, abs=1e-6)


def test_rescale_latents_gives_unit_scaled_std_and_leaves_decoding_unchanged():
    vae = _mini_vae()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial weights so the posterior std is far from the target
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    images = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1
    z = vae.encode(images).mean
    before = vae.decode(z)
    c = rescale_latents(vae, images, 0.18215)
    post = vae.encode(images)
    assert abs(c - 1.0) > 0.05
    assert torch.allclose(post.mean, z * c, rtol=1e-4, atol=1e-5)
    assert (post.mean * 0.18215).std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(vae.decode(post.mean), before, atol=1e-4)


def test_mini_checkpoint_matches_manifests_and_loads_through_the_model_builder(tmp_path):
    cfg = load_config(MINI / "prior.yaml")
    torch.manual_seed(0)
    ldm = instantiate_from_config(cldm_config(cfg.model))
    path = tmp_path / "sd.ckpt"
    save_sd_checkpoint(ldm, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == ["state_dict"]
    assert {k: list(v.shape) for k, v in raw["state_dict"].items()} == manifest("mini_sd_keys.tsv")
    assert {k: list(v.shape) for k, v in ldm.controlnet.state_dict().items()} == manifest("mini_controlnet_keys.tsv")
    loaded, _ = build_model(cfg.model, str(path))  # raises on any missing key
    assert set(load_state_dict(path)) == set(loaded.sd_state_dict())
    for key, value in loaded.sd_state_dict().items():
        assert torch.equal(value, raw["state_dict"][key]), key


def test_mini_model_uses_the_published_schema():
    """Every mini tensor name is a full-size SD-2.1 / IRControlNet name up to block indices: same classes and keys,
    fewer and narrower blocks."""
    def patterns(name):
        return {re.sub(r"\.\d+\.", ".#.", re.sub(r"\.\d+\.", ".#.", k)) for k in manifest(name)}

    assert patterns("mini_sd_keys.tsv") <= patterns("sd21_keys.tsv")
    assert patterns("mini_controlnet_keys.tsv") <= patterns("controlnet_keys.tsv")


@pytest.mark.parametrize("override, key", [("prior.vae_stepz=3", "vae_stepz"), ("prior.crop_size=30", "crop_size"),
                                           ("prior.kl_weight=-1", "kl_weight"), ("prior.out_path=null", "out_path")])
def test_bad_prior_settings_are_refused_naming_the_key(override, key):
    cfg = load_config(MINI / "prior.yaml", ["prior.clean_folder=x", "prior.out_path=y.ckpt", override])
    with pytest.raises(ValueError, match=key):
        read_settings(cfg)


def _clean_folder(folder, n=3, size=48):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        img = np.stack([np.sin(5 * x + i), np.cos(4 * y), np.sin(3 * (x + y))], -1) * 0.4 + 0.5
        Image.fromarray(np.uint8((img + rng.normal(0, 0.02, img.shape)).clip(0, 1) * 255)).save(folder / f"c{i}.png")
    return folder


def test_two_phase_run_writes_a_loadable_prior_and_skips_the_finished_vae_phase(tmp_path):
    clean = _clean_folder(tmp_path / "clean")
    out = tmp_path / "prior" / "sd.ckpt"
    overrides = [f"prior.clean_folder={clean}", f"prior.out_path={out}", "prior.vae_steps=3", "prior.unet_steps=2",
                 "prior.batch_size=2", "prior.vae_batch_size=2"]
    cfg = load_config(MINI / "prior.yaml", overrides)
    torch.set_num_threads(1)
    train_prior(cfg)
    vae_file = out.with_name("sd.ckpt.vae.safetensors")
    first = load_state_dict(out)
    assert vae_file.is_file()
    # the rescaled VAE gives unit-std scaled latents on the training crops' distribution (checked loosely here on
    # a few crops; exactness is the rescale test's job) and is what the checkpoint holds
    vae_sd = load_state_dict(vae_file)
    assert all(torch.equal(first["first_stage_model." + k], v) for k, v in vae_sd.items())
    # rerun: the VAE phase is skipped (same VAE tensors), the UNet phase runs again from the same seed
    train_prior(load_config(MINI / "prior.yaml", overrides))
    second = load_state_dict(out)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cli_refuses_a_missing_clean_folder_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train_prior.py", "--set", f"prior.clean_folder={tmp_path / 'none'}",
                             f"prior.out_path={tmp_path / 'sd.ckpt'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "none" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_diverging_phase_writes_nothing(tmp_path):
    clean = _clean_folder(tmp_path / "clean")
    out = tmp_path / "prior" / "sd.ckpt"
    cfg = load_config(MINI / "prior.yaml", [f"prior.clean_folder={clean}", f"prior.out_path={out}",
                                            "prior.vae_steps=3", "prior.unet_steps=1", "prior.batch_size=2", "prior.vae_batch_size=2",
                                            "prior.vae_lr=1e30"])
    torch.set_num_threads(1)
    with pytest.raises(PriorDiverged, match="VAE phase diverged"):
        train_prior(cfg)
    assert not out.parent.exists() or not any(out.parent.iterdir())
