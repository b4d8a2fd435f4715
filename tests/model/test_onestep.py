"""The one-step student (model.onestep) on the tiny model: adapters at init change nothing, the student's one step
is the teacher's x̂0 at t*, only adapters and the UNet input conv train, the adapter file round-trips, merging
folds the adapters in, and the full-size trainable-parameter count (meta device) against OSEDiff's 8.5 M."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from model.builder import cldm_config
from model.onestep import (UNET_INPUT_CONV, AdapterMeta, LoRADenoiser, OneStepStudent, lora_targets,
                           merge_adapter_file, one_step_x0, read_adapter_file)
from tests.helpers import ROOT, build_tiny, randomize_adapters_, teacher_and_diffusion, tiny_config
from utils.checkpoint import CheckpointError, save_state_dict_atomic
from utils.common import instantiate_from_config, load_config

OSEDIFF_TRAINABLE = 8.5e6  # OSEDiff (arXiv 2406.08177), Table: trainable parameters of its one-step generator


@pytest.fixture(scope="module")
def tiny():
    """(teacher, diffusion), shared: the tests change only the students' copies."""
    return teacher_and_diffusion()


def inputs(ldm, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = ldm.prepare_condition(torch.rand(2, 3, 64, 64, generator=gen), ["remove dense fog"] * 2)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    return x, torch.tensor([999, 411]), cond


def test_adapters_at_init_leave_outputs_bit_identical(tiny):
    teacher, _ = tiny
    denoiser = LoRADenoiser(teacher, rank=4)
    x, t, cond = inputs(teacher)
    with torch.no_grad():
        assert torch.equal(denoiser(x, t, cond), teacher(x, t, cond))
    # an adapter on every target layer: attention, feed-forward, projections and convolutions of both networks
    adapted = {name.rsplit(".lora_", 1)[0] for name in denoiser.adapter_state_dict()}
    assert adapted == set(lora_targets(teacher)) and len(adapted) > 100
    assert any(".attn2.to_k" in n for n in adapted) and any(n.startswith("controlnet.zero_convs") for n in adapted)
    assert not any("time_embed" in n or n.startswith(UNET_INPUT_CONV) for n in adapted)


def test_ycbcr_fusion_of_the_extension_gets_no_adapter():
    ldm = build_tiny(cfg=tiny_config(**{"model.cldm.params.controlnet_cfg.params.ycbcr_fusion": True}))
    names = lora_targets(ldm)
    assert ldm.controlnet.ycbcr is not None and names and not any(".ycbcr." in n for n in names)


def test_student_one_step_at_init_equals_teacher_x0_at_its_timestep(tiny):
    teacher, diffusion = tiny
    student = OneStepStudent(teacher, diffusion, timestep=999)
    _, _, cond = inputs(teacher)
    z_h = cond["c_img"]
    t = torch.full((2,), 999)
    with torch.no_grad():
        assert torch.equal(student(cond), diffusion.predict_x0(z_h, t, teacher(z_h, t, cond)))
        student500 = OneStepStudent(teacher, diffusion, timestep=500)(cond)
        t500 = torch.full((2,), 500)
        assert torch.equal(student500, diffusion.predict_x0(z_h, t500, teacher(z_h, t500, cond)))
    with pytest.raises(ValueError, match="timestep"):
        OneStepStudent(teacher, diffusion, timestep=1000)


def test_only_adapters_and_the_unet_input_conv_train_and_the_teacher_keeps_its_own(tiny):
    teacher, diffusion = tiny
    student = OneStepStudent(teacher, diffusion)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n.startswith(f"denoiser.{UNET_INPUT_CONV}.") for n in trainable)
    assert f"denoiser.{UNET_INPUT_CONV}.weight" in trainable and f"denoiser.{UNET_INPUT_CONV}.bias" in trainable
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters() if p.requires_grad}
    before = teacher.unet.input_blocks[0][0].weight.clone()
    with torch.no_grad():
        student.denoiser.unet.input_blocks[0][0].weight.add_(1.0)
    assert torch.equal(teacher.unet.input_blocks[0][0].weight, before)
    # the VAE and text encoder are the teacher's, not copies
    assert student.ldm is teacher and not any(n.startswith(("vae", "clip")) for n, _ in student.named_parameters())


def test_adapter_file_round_trips_and_refuses_another_rank(tiny, tmp_path: Path):
    teacher, diffusion = tiny
    student = OneStepStudent(teacher, diffusion)
    randomize_adapters_(student.denoiser, 5)
    _, _, cond = inputs(teacher)
    with torch.no_grad():
        trained = student(cond)
    path = tmp_path / "adapters.safetensors"
    student.save_adapters(path)
    sd, meta = read_adapter_file(path)
    assert set(sd) == set(student.denoiser.adapter_state_dict()) and meta == AdapterMeta(4, 4.0, 999)
    fresh = OneStepStudent(teacher, diffusion)
    with torch.no_grad():
        assert not torch.equal(fresh(cond), trained)
        fresh.load_adapters(path)
        assert torch.equal(fresh(cond), trained)
    with pytest.raises(CheckpointError, match="adapters.safetensors.*rank"):
        OneStepStudent(teacher, diffusion, rank=8).load_adapters(path)
    with pytest.raises(CheckpointError, match="timestep 999"):
        OneStepStudent(teacher, diffusion, timestep=800).load_adapters(path)
    plain = tmp_path / "plain.safetensors"
    save_state_dict_atomic(sd, plain)
    with pytest.raises(CheckpointError, match="plain.safetensors is not a one-step adapter file"):
        read_adapter_file(plain)


def test_adapter_file_merged_into_the_stage2_model_gives_the_students_output(tmp_path: Path):
    teacher, diffusion = teacher_and_diffusion()
    student = OneStepStudent(teacher, diffusion, timestep=900)
    randomize_adapters_(student.denoiser, 7)
    _, _, cond = inputs(teacher)
    with torch.no_grad():
        expected = student(cond)
    path = tmp_path / "adapters.safetensors"
    student.save_adapters(path)
    stage2 = teacher_and_diffusion()[0]  # a second copy of the same stage-2 weights
    n_params = sum(p.numel() for p in stage2.parameters())
    assert merge_adapter_file(stage2, path) == 900
    with torch.no_grad():
        merged = one_step_x0(stage2, diffusion, cond, 900)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # merged in place: the adapters' small tensors are added, no second UNet / ControlNet
    assert sum(p.numel() for p in stage2.parameters()) < n_params * 1.1


def test_merged_adapters_give_the_same_output(tiny):
    teacher, diffusion = tiny
    student = OneStepStudent(teacher, diffusion)
    randomize_adapters_(student.denoiser, 6)
    _, _, cond = inputs(teacher)
    with pytest.raises(RuntimeError, match="in_place"):  # its layers share the teacher's weights
        student.denoiser.merge_adapters()
    own = copy.deepcopy(teacher)
    merged = LoRADenoiser(own, rank=4, train_input_conv=True, in_place=True)
    merged.load_adapter_state_dict(student.denoiser.adapter_state_dict())
    with torch.no_grad():
        before = student(cond)
        merged.merge_adapters()
        after = one_step_x0(merged, diffusion, cond, 999)
    assert not torch.equal(before, student.diffusion.predict_x0(cond["c_img"], torch.full((2,), 999),
                                                                teacher(cond["c_img"], torch.full((2,), 999), cond)))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_adapted_copies_share_the_frozen_weights_and_own_the_trained_ones(tiny):
    teacher, diffusion = tiny
    student, fake = OneStepStudent(teacher, diffusion), LoRADenoiser(teacher, rank=4)
    base = {p.data_ptr() for p in [*teacher.unet.parameters(), *teacher.controlnet.parameters()]}
    conv = {p.data_ptr() for p in teacher.unet.input_blocks[0][0].parameters()}
    for copy_ in (student.denoiser, fake):
        frozen = [p for p in copy_.parameters() if not p.requires_grad]
        assert frozen and {p.data_ptr() for p in frozen} <= base  # no second UNet / ControlNet in memory
        assert not {p.data_ptr() for p in copy_.parameters() if p.requires_grad} & base
    # the student trains its own input conv, equal to the teacher's at init; the teacher's stays frozen
    own_conv = list(student.denoiser.unet.input_blocks[0][0].parameters())
    assert all(p.requires_grad for p in own_conv) and not {p.data_ptr() for p in own_conv} & conv
    assert all(torch.equal(a, b) for a, b in zip(own_conv, teacher.unet.input_blocks[0][0].parameters()))
    assert not any(p.requires_grad for p in [*teacher.unet.parameters(), *teacher.controlnet.parameters()])
    new_memory = sum(p.numel() for p in student.denoiser.parameters() if p.data_ptr() not in base)
    assert new_memory == sum(v.numel() for v in student.denoiser.adapter_state_dict().values())


def lora_count(module: nn.Module, rank: int) -> int:
    """Closed form: r·(in + out) per Linear, r·(in·k_h·k_w + out) per Conv2d (A is a k×k conv to r channels,
    B a 1×1 conv from r)."""
    total = 0
    for name in lora_targets(module):
        layer = module.get_submodule(name)
        if isinstance(layer, nn.Linear):
            total += rank * (layer.in_features + layer.out_features)
        else:
            kh, kw = layer.kernel_size
            total += rank * (layer.in_channels * kh * kw + layer.out_channels)
    return total


def test_full_size_trainable_parameter_count_on_the_meta_device(capsys):
    cfg = load_config(ROOT / "configs" / "inference" / "stage2.yaml")
    with torch.device("meta"):
        ldm = instantiate_from_config(cldm_config(cfg.model))
        plain = LoRADenoiser.__new__(LoRADenoiser)
        nn.Module.__init__(plain)
        plain.unet, plain.controlnet = ldm.unet, ldm.controlnet
        expected = lora_count(plain, 4) + sum(p.numel() for p in ldm.unet.input_blocks[0][0].parameters())
        student = LoRADenoiser(ldm, rank=4, train_input_conv=True)
    count = sum(v.numel() for v in student.adapter_state_dict().values())
    assert count == expected
    with capsys.disabled():
        print(f"\nfull-size one-step student, LoRA rank 4: {count / 1e6:.2f} M trainable parameters "
              f"(OSEDiff: {OSEDIFF_TRAINABLE / 1e6:.1f} M)")
    assert 0.5 * OSEDIFF_TRAINABLE < count < OSEDIFF_TRAINABLE
