"""The denoiser-speed settings change the memory layout, not the values (``ControlLDM.set_channels_last``)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import build_tiny, randomize_
from utils.pipeline import DiffusionRunner


def test_channels_last_step_equals_default_layout_within_sdpa_tolerance():
    model = build_tiny(seed=41).eval()
    randomize_(model.unet, seed=42)
    randomize_(model.controlnet, seed=43)
    g = torch.Generator().manual_seed(0)
    x, cond_img = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = model.prepare_condition(cond_img, ["a", "b"])
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


@pytest.mark.parametrize("key", ["channels_last", "compile"])
def test_speed_flags_must_be_booleans(key):
    cfg = OmegaConf.create({"inference": {key: "yes"}})
    with pytest.raises(ValueError, match=f"inference.{key} must be true or false"):
        DiffusionRunner(cfg)
