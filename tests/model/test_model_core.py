"""Core model stack: manifests, release-format loading, ControlNet init, training wiring, schedule, safety."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model.attention import set_attention_backend
from model.gaussian_diffusion import Diffusion
from tests.helpers import ROOT, build_tiny, ldm_state_dict, manifest, randomize_, tiny_config, write_release_checkpoints
from utils.checkpoint import CheckpointError, load_state_dict
from utils.common import instantiate_from_config, load_config


def test_full_size_keys_and_shapes_match_published_manifests():
    cfg = load_config(ROOT / "configs" / "inference" / "stage2.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model.cldm)
    ours = {k: list(v.shape) for k, v in ldm_state_dict(model).items()}
    assert ours == manifest("sd21_keys.tsv")
    control = {k: list(v.shape) for k, v in model.controlnet.state_dict().items()}
    assert control == manifest("controlnet_keys.tsv")


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond_img = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([10, 900])
    return x, cond_img, t


def _outputs(model, x, cond_img, t):
    with torch.no_grad():
        cond = model.prepare_condition(cond_img, ["remove dense fog", "hazy"])
        return {
            "eps": model(x, t, cond),
            "z": model.vae_encode(cond_img * 2 - 1, sample=False),
            "dec": model.vae_decode(x),
            "txt": cond["c_txt"],
        }


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_release_format_round_trip(tmp_path, fmt):
    src = build_tiny(seed=1)
    randomize_(src.unet, seed=2)
    randomize_(src.controlnet, seed=3)
    sd_path, cn_path = write_release_checkpoints(src, tmp_path)
    if fmt == "safetensors":
        cn_st = tmp_path / "controlnet.safetensors"
        save_file({k: v.contiguous() for k, v in torch.load(cn_path, weights_only=True).items()}, str(cn_st))
        cn_path = cn_st
    dst = build_tiny(seed=99)
    unused, missing = dst.load_pretrained_sd(load_state_dict(sd_path))
    assert unused == {"betas", "model_ema.decay"}
    assert missing == set()
    assert dst.load_controlnet_from_ckpt(load_state_dict(cn_path)) == []
    a, b = _outputs(src, *_inputs(src)), _outputs(dst, *_inputs(dst))
    for key in a:
        assert torch.count_nonzero(a[key]) > 0, key
        assert torch.equal(a[key], b[key]), key


def test_load_controlnet_from_unet_copies_and_zero_extends():
    model = build_tiny(seed=3)
    randomize_(model.unet, seed=4)
    extended, scratch = model.load_controlnet_from_unet()
    assert extended == {"input_blocks.0.0.weight"}
    assert all(k.startswith(("zero_convs.", "middle_block_out.")) for k in scratch)
    unet_sd, cn_sd = model.unet.state_dict(), model.controlnet.state_dict()
    for key, value in cn_sd.items():
        if key in unet_sd and key not in extended:
            assert torch.equal(value, unet_sd[key]), key
    w = cn_sd["input_blocks.0.0.weight"]
    assert torch.equal(w[:, :4], unet_sd["input_blocks.0.0.weight"])
    assert torch.count_nonzero(w[:, 4:]) == 0
    x, cond_img, t = _inputs(model)
    with torch.no_grad():
        cond = model.prepare_condition(cond_img, ["a", "b"])
        control = model.controlnet(x, cond["c_img"], t, cond["c_txt"])
        assert len(control) == len(model.controlnet.zero_convs) + 1
        assert all(torch.count_nonzero(c) == 0 for c in control)
        assert torch.equal(model(x, t, cond), model.unet(x, t, cond["c_txt"]))


def test_training_loss_backward_reaches_only_controlnet():
    model = build_tiny(seed=5)
    randomize_(model.unet, seed=6)
    randomize_(model.controlnet, seed=7)
    model.train()
    assert not model.unet.training and not model.vae.training and not model.clip.training
    diffusion = Diffusion()
    x, cond_img, t = _inputs(model)
    cond = model.prepare_condition(cond_img, ["a", "b"])
    loss = diffusion.training_outputs(model, x, t, cond)["loss"]
    loss.backward()
    for name in ("unet", "vae", "clip"):
        assert all(p.grad is None and not p.requires_grad for p in getattr(model, name).parameters()), name
    grads = [p.grad for p in model.controlnet.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_scaled_linear_schedule_matches_formula():
    d = Diffusion(linear_start=0.00085, linear_end=0.012, timesteps=1000)
    for i in (0, 499, 999):
        beta = (np.sqrt(0.00085) + (np.sqrt(0.012) - np.sqrt(0.00085)) * i / 999) ** 2
        assert d.betas_np[i] == pytest.approx(beta, rel=1e-12)
        assert float(d.betas[i]) == pytest.approx(beta, rel=1e-6)
    ac = np.cumprod(1 - d.betas_np)
    assert float(d.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-6)
    assert float(d.alphas_cumprod[999]) == pytest.approx(ac[999], rel=1e-5)
    assert float(d.alphas_cumprod[499]) == pytest.approx(np.prod(1 - d.betas_np[:500]), rel=1e-6)
    x0, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0, 999])
    zt = d.q_sample(x0, t, noise)
    expect = np.sqrt(ac[999]) * x0[1].numpy() + np.sqrt(1 - ac[999]) * noise[1].numpy()
    np.testing.assert_allclose(zt[1].numpy(), expect, rtol=1e-5, atol=1e-6)


def test_v_parameterization_target():
    d = Diffusion(parameterization="v")
    x0, noise, t = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([300])
    out = d.training_outputs(lambda x, tt, c: torch.zeros_like(x), x0, t, {}, noise)
    a, s = d.sqrt_alphas_cumprod[300], d.sqrt_one_minus_alphas_cumprod[300]
    torch.testing.assert_close(out["target"], a * noise - s * x0)
    torch.testing.assert_close(d.predict_x0(out["x_noisy"], t, out["target"]), x0, rtol=1e-4, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('HCDYC_PWNED', '/nonexistent/pwned')}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("HCDYC_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state_dict(path)
    assert not marker.exists()


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    model = build_tiny()
    sd = ldm_state_dict(model)
    sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(32, 768)
    with pytest.raises(CheckpointError, match=r"attn2\.to_k\.weight.*\(32, 768\).*\(32, 32\)"):
        model.load_pretrained_sd(sd)


def test_missing_checkpoint_names_path_and_readme(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt.*README"):
        load_state_dict(tmp_path / "nope.ckpt")


def test_controlnet_strict_load_rejects_wrong_keys():
    model = build_tiny()
    sd = model.controlnet_state_dict()
    sd.pop("middle_block_out.0.bias")
    with pytest.raises(CheckpointError, match="1 missing"):
        model.load_controlnet_from_ckpt(sd)


def test_sdpa_and_math_attention_agree_on_cpu():
    model = build_tiny(seed=7)
    randomize_(model.unet, seed=8)
    randomize_(model.controlnet, seed=9)
    x, cond_img, t = _inputs(model)
    with torch.no_grad():
        cond = model.prepare_condition(cond_img, ["a", "b"])
        try:
            set_attention_backend("math")
            ref = model(x, t, cond)
            set_attention_backend("sdpa")
            out = model(x, t, cond)
        finally:
            set_attention_backend(None)
    assert ref.abs().mean() > 1e-3
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_env_var_selects_backend():
    code = ("import torch; from model.attention import resolve_backend; "
            "print(resolve_backend(torch.device('cpu')))")
    env = dict(os.environ, HCDYC_ATTN_BACKEND="math")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "math"


def test_bf16_denoiser_keeps_groupnorm_fp32():
    model = build_tiny(seed=9)
    randomize_(model.unet, seed=10)
    model.cast_denoiser(torch.bfloat16)
    norm = model.unet.input_blocks[1][0].in_layers[0]
    assert norm.weight.dtype == torch.float32
    assert model.unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    x, cond_img, t = _inputs(model)
    with torch.no_grad():
        eps = model(x, t, model.prepare_condition(cond_img, ["a", "b"]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all() and eps.abs().mean() > 1e-3


def test_tiny_config_builds_from_published_config():
    cfg = tiny_config("configs/inference/stage1.yaml")
    assert cfg.inference.w == 0.85
    assert build_tiny(cfg=cfg).controlnet.input_blocks[0][0].in_channels == 8
