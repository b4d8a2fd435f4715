"""YCbCr-assisted ControlNet: identity at init, gradients, checkpoint compatibility, pixel-space input."""
from __future__ import annotations

import pytest
import torch

from model.gaussian_diffusion import Diffusion
from tests.helpers import build_tiny, randomize_, tiny_config
from utils.common import instantiate_from_config, load_config
from tests.helpers import ROOT

FUSION = "model.cldm.params.controlnet_cfg.params.ycbcr_fusion"


def _pair():
    """A plain tiny model and a fusion-enabled one holding the same base weights."""
    base = build_tiny(seed=0)
    randomize_(base.unet, seed=1)
    randomize_(base.controlnet, seed=2)
    fused = build_tiny(seed=3, cfg=tiny_config(**{FUSION: True}))
    fused.unet.load_state_dict(base.unet.state_dict())
    fused.clip.load_state_dict(base.clip.state_dict())
    fused.vae.load_state_dict(base.vae.state_dict())
    skipped = fused.load_controlnet_from_ckpt(base.controlnet_state_dict())
    return base, fused, skipped


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g), torch.tensor([50, 700])


def test_fusion_is_identity_at_init_and_published_ckpt_loads_into_base_part():
    base, fused, skipped = _pair()
    assert skipped and all(k.startswith("ycbcr.") for k in skipped)
    x, cond01, t = _batch()
    with torch.no_grad():
        out_base = base(x, t, base.prepare_condition(cond01, ["a", "b"]))
        cond = fused.prepare_condition(cond01, ["a", "b"])
        out_fused = fused(x, t, cond)
    assert [f.shape[-1] for f in cond["c_ycbcr"]] == [8, 4]
    assert out_base.abs().mean() > 1e-3
    assert torch.equal(out_base, out_fused)


def test_gates_get_gradients_then_branch_and_fusion_train():
    _, fused, _ = _pair()
    x, cond01, t = _batch(1)
    diffusion = Diffusion()
    loss = diffusion.training_outputs(fused, x, t, fused.prepare_condition(cond01, ["a", "b"]))["loss"]
    loss.backward()
    ycbcr = fused.controlnet.ycbcr
    gates = [m.gate for m in list(ycbcr.fusions.values()) + [ycbcr.middle]]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in ycbcr.encoder.parameters())
    fused.zero_grad(set_to_none=True)
    with torch.no_grad():
        for g in gates:
            g.fill_(0.1)
    loss = diffusion.training_outputs(fused, x, t, fused.prepare_condition(cond01, ["a", "b"]))["loss"]
    loss.backward()
    for name, p in ycbcr.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fusion_checkpoint_round_trip_is_strict():
    _, fused, _ = _pair()
    with torch.no_grad():
        fused.controlnet.ycbcr.middle.gate.fill_(0.3)
    sd = fused.controlnet_state_dict()
    other = build_tiny(seed=9, cfg=tiny_config(**{FUSION: True}))
    assert other.load_controlnet_from_ckpt(sd) == []
    assert torch.equal(other.controlnet.ycbcr.middle.gate, fused.controlnet.ycbcr.middle.gate)
    plain = build_tiny(seed=9)
    with pytest.raises(Exception, match="unexpected"):
        plain.load_controlnet_from_ckpt(sd)


def test_branch_refuses_latents():
    _, fused, _ = _pair()
    with pytest.raises(ValueError, match="RGB image"):
        fused.controlnet.ycbcr.encode(torch.zeros(1, 4, 8, 8))


def test_full_size_fusion_keeps_published_keys():
    cfg = load_config(ROOT / "configs" / "inference" / "stage2.yaml", [f"{FUSION}=True"])
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model.cldm)
    keys = set(model.controlnet.state_dict())
    published = {line.split("\t")[0] for line in (ROOT / "tests/data/controlnet_keys.tsv").read_text().splitlines()}
    assert published <= keys
    assert all(k.startswith("ycbcr.") for k in keys - published)
    assert set(model.controlnet.ycbcr.fusions) == {"2", "5", "8", "11"}
