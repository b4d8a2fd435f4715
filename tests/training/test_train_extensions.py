"""HCD-YC training extensions on tiny models: every loss term trains the ControlNet, the text processor trains,
new modules save and load, and each ablation switch runs under ``accelerate launch --multi_gpu --num_processes 2``."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from haze.prompts import PUBLISHED_PROMPTS
from haze.regions import region_labels
from haze.scattering import rehaze
from losses.alignment import ImageEmbedder
from losses.vgg import VGGFeatures
from model.builder import cldm_config, text_processor_on
from tests.helpers import ROOT, randomize_, tiny_config
from tests.train_helpers import (launch, make_stage1_data, make_stage2_data, single_thread, tiny_train_config,
                                 vgg_init_, write_sd_weights, write_vgg_weights)
from training.settings import ExtensionSettings, resolve_aliases, split_settings
from training.step import TrainingStep, build_cycle_loss, image_embedder_for
from utils.checkpoint import load_state_dict
from utils.common import instantiate_from_config, load_config

S = 32  # image side: 4x4 latents with the tiny VAE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _images(b: int, seed: int, sky: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean01, hazy01 (b,3,S,S), t (b,1,S,S), A (b,3)): smooth random colours with a vertical-gradient haze;
    ``sky``: the top third of the clean image is flat airlight colour (a sky the fog analyser detects)."""
    g = torch.Generator().manual_seed(seed)
    clean = F.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=(S, S), mode="bilinear", align_corners=False)
    clean = (clean + 0.15 * torch.rand(b, 3, S, S, generator=g)).clamp(0, 1)
    airlight = torch.full((b, 3), 0.85)
    if sky:
        clean[:, :, : S // 3] = 0.85
    ramp = torch.linspace(0.2, 0.9, S).view(1, 1, S, 1).expand(b, 1, S, S)
    t = ramp * (0.6 + 0.4 * torch.rand(b, 1, 1, 1, generator=g))
    return clean, rehaze(clean, t, airlight), t, airlight


def make_batch(stage: int, b: int = 2, seed: int = 0, is_cond: list[bool] | None = None, sky: bool = False) -> dict:
    clean, hazy, t, airlight = _images(b, seed, sky)
    mask = torch.tensor(is_cond if is_cond is not None else [True] * b)
    if stage == 1:
        return {"target": hazy * 2 - 1, "condition": clean * mask.view(-1, 1, 1, 1), "is_cond": mask,
                "prompt": [PUBLISHED_PROMPTS[1]] * b, "hazy_ref": hazy, "transmission": t, "airlight": airlight}
    return {"target": clean * 2 - 1, "condition": hazy, "is_cond": mask, "prompt": ["remove fog"] * b,
            "hazy_ref": hazy}


def make_step(stage: int, seed: int = 0, text_processor: bool = False, **ext_keys) -> TrainingStep:
    """TrainingStep on a tiny model whose UNet and ControlNet weights are all random (zero-init layers included);
    ``text_processor``: the model switch ``model.cldm.params.text_processor``."""
    ext = ExtensionSettings(**ext_keys)
    cfg = tiny_config(**{"model.cldm.params.text_processor": text_processor})
    torch.manual_seed(seed)
    ldm = instantiate_from_config(cldm_config(cfg.model))
    randomize_(ldm.unet, seed + 1, std=0.05)
    randomize_(ldm.controlnet, seed + 2, std=0.05)
    diffusion = instantiate_from_config(cfg.model.diffusion)
    torch.manual_seed(seed + 3)
    cycle = build_cycle_loss(ext, allow_random_vgg=True)
    if cycle is not None and cycle.vgg is not None:
        vgg_init_(cycle.vgg, seed + 4)
    return TrainingStep(ldm, diffusion, stage, ext, cycle, image_embedder_for(ldm, ext))


def controlnet_grad_fraction(step: TrainingStep) -> float:
    """Fraction of ControlNet parameter tensors with a non-zero gradient."""
    params = list(step.controlnet.parameters())
    return sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params) / len(params)


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_published_step_is_eps_mse_with_zeroed_unconditional_condition():
    step = make_step(1)
    batch = make_batch(1, b=2, is_cond=[True, False])
    out = step(batch, 0, gen())
    assert set(out["terms"]) == {"diffusion"}

    g = gen()
    cond = step.ldm.prepare_condition(batch["condition"], batch["prompt"])
    assert cond["c_img"][1].abs().sum() > 0  # the black condition encodes to a non-zero latent ...
    cond["c_img"] = cond["c_img"] * torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)  # ... which the step must zero
    z0 = step.ldm.vae_encode(batch["target"], sample=True, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    expected = F.mse_loss(step.ldm(step.diffusion.q_sample(z0, t, noise), t, cond), noise)
    assert torch.allclose(out["loss"], expected, rtol=1e-5, atol=1e-7)

    cond_step, _, _ = step.condition(batch, 0)
    assert cond_step["c_img"][1].abs().sum() == 0 and cond_step["c_img"][0].abs().sum() > 0


LEVELS = {"pixel": "pixel_weight", "feature": "feature_weight", "semantic": "semantic_weight"}


@pytest.mark.parametrize("stage,level,direction", [
    (2, "pixel", "forward"), (2, "pixel", "backward"), (2, "feature", "forward"), (2, "feature", "backward"),
    (2, "semantic", "forward"), (2, "semantic", "backward"), (1, "pixel", "forward"), (1, "feature", "backward"),
])
def test_each_cycle_term_alone_trains_the_controlnet(stage, level, direction):
    keys = {w: (1.0 if name == level else 0.0) for name, w in LEVELS.items()}
    step = make_step(stage, cycle_weight=1.0, forward_weight=float(direction == "forward"),
                     backward_weight=float(direction == "backward"), cycle_timestep_mode="sqrt_alpha", **keys)
    out = step(make_batch(stage), 0, gen())
    assert set(out["terms"]) == {"diffusion", "cycle"}
    assert out["terms"]["cycle"].item() > 0
    out["terms"]["cycle"].backward()
    assert controlnet_grad_fraction(step) == 1.0


def test_stage1_cycle_ignores_unconditional_samples():
    step = make_step(1, cycle_weight=1.0, feature_weight=0.0, semantic_weight=0.0)
    out = step(make_batch(1, b=2, is_cond=[False, False]), 0, gen())
    assert out["terms"]["cycle"].item() == 0.0


def test_stage1_cycle_needs_the_true_haze_parameters():
    step = make_step(1, cycle_weight=1.0, feature_weight=0.0, semantic_weight=0.0)
    batch = make_batch(1)
    del batch["transmission"], batch["airlight"]
    with pytest.raises(ValueError, match="'transmission' and 'airlight'"):
        step(batch, 0, gen())


def test_cycle_crop_and_schedule():
    step = make_step(2, cycle_weight=2.0, feature_weight=0.0, semantic_weight=0.0, cycle_start_step=10,
                     cycle_ramp_steps=10, cycle_crop=2)
    batch = make_batch(2)
    assert "cycle" not in step(batch, 9, gen())["terms"]
    half = step(batch, 15, gen())["terms"]["cycle"]
    full = step(batch, 25, gen())["terms"]["cycle"]
    assert torch.allclose(half * 2, full)  # same generator -> same t/noise/crop; ramp 0.5 vs 1.0


@pytest.mark.parametrize("stage", [1, 2])
def test_alignment_alone_trains_text_processor_and_embedder(stage):
    """Stage 1 aligns each prompt with the prediction (ControlNet gradients); stage 2 with the hazy condition it
    describes (no ControlNet gradient from this term, see TrainingStep.alignment_images)."""
    step = make_step(stage, text_align_weight=1.0, text_align_max_step=0, text_processor=True,
                     text_processor_start=0, use_dynamic_prompt=True)
    batch = make_batch(stage, b=3)
    batch["prompt"] = ["light haze", "dense fog over a city", "remove thick smog"]
    out = step(batch, 0, gen(), random.Random(0))
    assert out["logs"]["align_skipped"].item() == 0.0 and out["logs"]["align_pairs"].item() == 3
    out["terms"]["align"].backward()
    assert controlnet_grad_fraction(step) == (1.0 if stage == 1 else 0.0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in step.image_embedder.parameters())
    grads = [p.grad for p in step.text_processor.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    if stage == 2:  # the embedder sees the hazy condition: the prediction does not enter the term
        assert torch.equal(step.alignment_images(batch, None), batch["condition"])


def test_alignment_skipped_when_all_prompts_identical():
    step = make_step(2, text_align_weight=1.0, text_align_max_step=0)
    out = step(make_batch(2), 0, gen())
    assert out["logs"]["align_skipped"].item() == 1.0 and "align" not in out["terms"]


def test_text_processor_gets_gradients_and_changes_after_a_step():
    step = make_step(2, text_processor=True, text_processor_start=0)
    proc = step.text_processor
    before = {k: v.clone() for k, v in proc.state_dict().items()}
    opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-3)
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) in ids for p in proc.parameters())
    for i in range(2):
        opt.zero_grad()
        step(make_batch(2, seed=i), i, gen(i))["loss"].backward()
        if i == 0:  # zero-initialised output layers get gradients first
            assert proc.enhance[-1].weight.grad.abs().sum() > 0 and proc.modulate[-1].weight.grad.abs().sum() > 0
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proc.parameters())
    assert all(not torch.equal(before[k], v) for k, v in proc.state_dict().items())


def test_text_processor_is_identity_before_its_start_step():
    step = make_step(2, text_processor=True, text_processor_start=3)
    randomize_(step.text_processor, 9, std=0.05)  # not the identity any more once it acts
    batch = make_batch(2)
    raw = step.ldm.clip(batch["prompt"])
    early, _, infos = step.condition(batch, 2)
    assert torch.equal(early["c_txt"], raw) and infos is None
    late, _, infos = step.condition(batch, 3)
    assert len(infos) == 2 and (late["c_txt"] - raw).abs().max() > 1e-3
    assert ExtensionSettings().text_processor_start == 2000


def test_design_text_guidance_block_is_accepted_as_written():
    """The design document's block, ``train.use_text_processor: true`` included (an alias of the model switch)."""
    cfg = load_config(ROOT / "configs" / "train" / "ablation" / "text_guidance.yaml")
    _, ext = split_settings(cfg)
    assert text_processor_on(resolve_aliases(cfg).model)
    assert (ext.use_dynamic_prompt, ext.dynamic_prompt_start, ext.text_processor_start, ext.text_align_weight,
            ext.text_align_max_step) == (True, 2000, 2000, 0.3, 3000)


@pytest.mark.parametrize("region", ["sky", "texture", "smooth"])
@pytest.mark.parametrize("stage", [1, 2])
def test_each_region_term_alone_trains_the_controlnet(stage, region):
    keys = {f"region_{name}_weight": float(name == region) for name in ("sky", "texture", "smooth")}
    step = make_step(stage, cycle_weight=1.0, semantic_weight=0.0, cycle_timestep_mode="sqrt_alpha", **keys)
    batch = make_batch(stage, sky=True)
    clean, hazy = (batch["condition"], batch["hazy_ref"]) if stage == 1 else ((batch["target"] + 1) / 2,
                                                                             batch["condition"])
    airlight = batch["airlight"] if stage == 1 else step.cycle_loss.haze_parameters(clean, hazy, None, None)[1]
    labels = region_labels(hazy, clean, airlight)
    assert (labels[:, :, : S // 3 - 5] == 0).all()  # the known sky is detected
    assert all((labels == r).any() for r in (1, 2))
    out = step(batch, 0, gen())
    assert out["terms"]["cycle"].item() > 0
    out["terms"]["cycle"].backward()
    assert controlnet_grad_fraction(step) == 1.0


def test_dynamic_prompts_start_at_their_step():
    step = make_step(2, use_dynamic_prompt=True, dynamic_prompt_start=5)
    batch = make_batch(2)
    _, early, infos = step.condition(batch, 4)
    assert early == batch["prompt"] and infos is None
    _, late, infos = step.condition(batch, 5, random.Random(0))
    assert len(infos) == 2 and all(any(w in p for w in ("haze", "fog", "mist", "smog")) for p in late)


def test_missing_vgg_weights_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="vgg16-397923af.pth"):
        build_cycle_loss(ExtensionSettings(cycle_weight=1.0))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_cycle_loss(ExtensionSettings(cycle_weight=1.0, vgg_path=str(tmp_path / "nope.pth")))
    assert build_cycle_loss(ExtensionSettings(cycle_weight=1.0, feature_weight=0.0, semantic_weight=0.0)).vgg is None
    path = write_vgg_weights(tmp_path / "vgg.pth")
    loss = build_cycle_loss(ExtensionSettings(cycle_weight=1.0, vgg_path=str(path)))
    ref = VGGFeatures(None, allow_random_init=True)
    assert not torch.equal(ref.body[0].weight, loss.vgg.body[0].weight)
    ref.body.load_state_dict({k[len("features."):]: v for k, v in torch.load(path, weights_only=True).items()})
    x = torch.rand(1, 3, S, S)
    assert torch.equal(loss.vgg(x)["relu5_3"], ref(x)["relu5_3"])


# ------------------------------------------------------------------------------------ ablation runs, 2 processes
SWITCHES = {  # name -> (config in configs/train/ablation, stage)
    "cycle": ("cycle.yaml", 2),
    "text_processor": ("text_processor.yaml", 2),
    "dynamic_prompt_align": ("text_align.yaml", 2),
    "ycbcr": ("ycbcr.yaml", 2),
    "stage1_all": ("stage1_full.yaml", 1),
}


@pytest.fixture(scope="module")
def ablation_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    syn, real = make_stage1_data(root / "data1", n_syn=2, n_real=2)
    stage2 = make_stage2_data(root / "data2", n=4, size=40)
    return {"root": root, "sd": write_sd_weights(root / "weights"), "vgg": write_vgg_weights(root / "vgg.pth"),
            1: {"syn_folder": syn, "real_folder": real, "p": 0.5, "crop_size": S},
            2: {"hazy_folder": stage2 / "hazy", "clean_folder": stage2 / "clean", "crop_size": S}}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_ablation_switch_trains_under_two_processes(ablation_world, switch):
    w = ablation_world
    config, stage = SWITCHES[switch]
    exp = w["root"] / switch
    cfg = tiny_train_config(ROOT / "configs" / "train" / "ablation" / config, exp, w["sd"], w[stage],
                            train_steps=2, ckpt_every=2, vgg_path=str(w["vgg"]), cycle_start_step=0,
                            cycle_ramp_steps=0, text_align_max_step=0, dynamic_prompt_start=0, cycle_crop=None,
                            text_processor_start=0)
    proc = launch(f"train_stage{stage}.py", cfg, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr

    trained = OmegaConf.load(exp / "config.yaml")
    ldm = instantiate_from_config(cldm_config(trained.model))
    sd = load_state_dict(exp / "checkpoints" / "0000002.pt")
    assert ldm.load_controlnet_from_ckpt(sd) == []  # our checkpoints load strictly, new modules included
    loaded = ldm.controlnet_state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    last = json.loads((exp / "metrics.jsonl").read_text().splitlines()[-1])
    if switch in ("ycbcr", "stage1_all"):  # the zero-initialised fusion gates moved
        assert any(sd[k].abs().sum() > 0 for k in sd if k.startswith("ycbcr.") and k.endswith("gate"))
    if switch in ("text_processor", "stage1_all"):
        assert sd["text_processor.enhance.3.weight"].abs().sum() > 0
    if switch in ("dynamic_prompt_align", "stage1_all"):
        ImageEmbedder(dim=32).load_state_dict(load_state_dict(exp / "checkpoints" / "0000002_image_embedder.pt"))
        assert last["train/align_skipped"] == 0.0 and last["train/loss_align"] > 0
        assert last["train/align_pairs"] == 4  # 2 per process, negatives gathered from both
    if switch in ("cycle", "stage1_all"):
        assert last["train/cycle_fwd_pixel"] > 0 and last["train/cycle_fwd_feature"] > 0
        assert last["train/cycle_bwd_semantic"] > 0
