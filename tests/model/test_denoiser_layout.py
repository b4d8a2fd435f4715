"""The denoiser-speed settings change the memory layout, not the values (``ControlLDM.set_channels_last``,
``ControlLDM.set_weight_packing``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from model.attention import set_attention_backend
from model.cldm import ControlLDM
from model.unet import Conv2d
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from tests.helpers import build_tiny, randomize_


def _tiny_step(seed: int) -> tuple[ControlLDM, torch.Tensor, torch.Tensor, dict]:
    """The tiny model with every parameter random (zero-init layers too), a noisy latent (2,4,8,8), timesteps and a
    condition."""
    model = build_tiny(seed=seed).eval()
    randomize_(model.unet, seed=seed + 1)
    randomize_(model.controlnet, seed=seed + 2)
    g = torch.Generator().manual_seed(seed)
    x, cond_img = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        cond = model.prepare_condition(cond_img, ["a", "b"])
    return model, x, torch.tensor([10, 700]), cond


def test_channels_last_step_equals_default_layout_within_sdpa_tolerance():
    model, x, t, cond = _tiny_step(41)
    with torch.no_grad():
        ref = model(x, t, cond)
        model.set_channels_last(True)
        conv = model.unet.input_blocks[0][0]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        assert conv(x).is_contiguous(memory_format=torch.channels_last)
        out = model(x, t, cond)
        model.set_channels_last(False)
        assert conv.weight.is_contiguous()
    assert ref.abs().mean() > 1e-3
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", ["channels_last", "pack_weights", "compile"])
def test_speed_flags_must_be_booleans(key):
    cfg = OmegaConf.create({"inference": {key: "yes"}})
    with pytest.raises(ValueError, match=f"inference.{key} must be true or false"):
        DiffusionRunner(cfg, InferenceSettings.from_config(cfg))


def test_packed_conv_weights_step_equals_baseline_within_sdpa_tolerance():
    """fp32 CPU step with oneDNN-packed conv weights, alone and in the project setting (SDPA + channels-last +
    packing), vs every optimisation off (math attention, NCHW, no packing)."""
    model, x, t, cond = _tiny_step(51)
    conv = model.unet.input_blocks[0][0]
    try:
        with torch.no_grad():
            set_attention_backend("math")
            ref = model(x, t, cond)
            model.set_weight_packing(True)
            packed = model(x, t, cond)
            assert conv._packed is not None and conv._packed[0] == tuple(x.shape)
            set_attention_backend("sdpa")
            model.set_channels_last(True)
            project = model(x, t, cond)
            model.set_weight_packing(False)
            assert conv._packed is None
    finally:
        set_attention_backend(None)
    assert ref.abs().mean() > 1e-3
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(project, ref, rtol=1e-4, atol=1e-5)


def test_packed_conv_follows_weight_updates_and_leaves_autograd_alone():
    conv = Conv2d(8, 16, 3, padding=1)
    conv.set_weight_packing(True)
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = conv(x)
        torch.testing.assert_close(first, F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-6)
        conv.weight.mul_(-2.0)  # in place: the packed copy must be made again
        torch.testing.assert_close(conv(x), -2.0 * (first - conv.bias[:, None, None]) + conv.bias[:, None, None],
                                   rtol=1e-5, atol=1e-5)
        conv.load_state_dict({"weight": torch.ones_like(conv.weight), "bias": torch.zeros_like(conv.bias)})
        torch.testing.assert_close(conv(x), F.conv2d(x, torch.ones_like(conv.weight), padding=1), rtol=1e-5, atol=1e-5)
    conv(x).sum().backward()  # with autograd the plain convolution runs and the weights get their gradient
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
