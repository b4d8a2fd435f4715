"""One distillation iteration (training.distill) on the tiny model: where the gradients go, the two optimisers'
parameter sets, the VSD term through the real networks (zero at init, closed form after the fake score moves), and
which weights each optimiser step changes."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import randomize_adapters_, teacher_and_diffusion
from training.distill import DistillationStep, DistillSettings

SETTINGS = DistillSettings(ssim_scales=2)


@pytest.fixture(scope="module")
def tiny():
    return teacher_and_diffusion()


def batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"condition": torch.rand(2, 3, 64, 64, generator=gen),
            "target": torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1, "prompt": ["remove dense fog"] * 2}


def frozen_parts(teacher) -> dict:
    return {"teacher UNet": teacher.unet, "teacher ControlNet": teacher.controlnet, "VAE decoder": teacher.vae,
            "text encoder": teacher.clip}


def test_optimiser_parameter_sets_are_disjoint_and_exclude_the_teacher(tiny):
    teacher, diffusion = tiny
    step = DistillationStep(teacher, diffusion, SETTINGS)
    student, fake = {id(p) for p in step.student_parameters()}, {id(p) for p in step.fake_parameters()}
    assert student and fake and not student & fake
    assert student | fake == {id(p) for p in step.parameters() if p.requires_grad}
    assert not {id(p) for p in teacher.parameters()} & (student | fake)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_student_loss_reaches_only_the_student_and_the_fake_step_no_student_weight(tiny):
    teacher, diffusion = tiny
    step = DistillationStep(teacher, diffusion, SETTINGS)
    randomize_adapters_(step.fake, 1)  # a fake score that differs from the teacher: VSD is not zero
    loss, z, cond, logs = step.student_loss(batch(), torch.Generator().manual_seed(2))
    loss.backward()
    assert set(logs) == {"mse", "ms_ssim", "data", "vsd", "loss_student"} and logs["vsd"] > 0
    assert all(p.grad is not None for p in step.student_parameters())
    assert step.student.denoiser.unet.input_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in step.fake_parameters())
    for name, part in frozen_parts(teacher).items():
        assert all(p.grad is None for p in part.parameters()), name
    step.zero_grad(set_to_none=True)
    fake_loss, fake_logs = step.fake_score_loss(z, cond, torch.Generator().manual_seed(3))
    fake_loss.backward()
    assert fake_logs["loss_fake"] > 0 and not z.requires_grad
    assert all(p.grad is None for p in step.student_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in step.fake_parameters())
    for name, part in frozen_parts(teacher).items():
        assert all(p.grad is None for p in part.parameters()), name


def test_vsd_through_the_networks_is_zero_at_init_and_its_closed_form_afterwards(tiny):
    teacher, diffusion = tiny
    step = DistillationStep(teacher, diffusion, DistillSettings(ssim_scales=2, mse_weight=0.0, perceptual_weight=0.0))
    with torch.no_grad():
        cond = step.condition(batch())
        z = step.student(cond)
    t, noise = torch.tensor([500, 40]), torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    real, fake = step.score_estimates(z, cond, t, noise)
    assert torch.equal(real, fake)  # the fake score starts as an exact copy of the teacher: VSD gradient exactly 0
    leaf = z.clone().requires_grad_(True)
    from losses.onestep import vsd_loss

    (grad,) = torch.autograd.grad(vsd_loss(leaf, real, fake), leaf)
    assert torch.equal(grad, torch.zeros_like(grad))
    randomize_adapters_(step.fake, 5)
    real, fake = step.score_estimates(z, cond, t, noise)
    (grad,) = torch.autograd.grad(vsd_loss(leaf, real, fake), leaf)
    expected = (fake - real) / (z - real).abs().mean(dim=(1, 2, 3), keepdim=True) / z.numel()
    torch.testing.assert_close(grad, expected)
    assert grad.abs().max() > 0


def test_each_optimiser_step_changes_only_its_own_weights(tiny):
    teacher, diffusion = tiny
    step = DistillationStep(teacher, diffusion, SETTINGS)
    opt_student = torch.optim.AdamW(step.student_parameters(), lr=1e-3)
    opt_fake = torch.optim.AdamW(step.fake_parameters(), lr=1e-3)
    snapshot = lambda module: {k: v.detach().clone() for k, v in module.state_dict().items()}  # noqa: E731
    teacher0, student0, fake0 = snapshot(teacher), snapshot(step.student), snapshot(step.fake)
    loss, z, cond, _ = step.student_loss(batch(), torch.Generator().manual_seed(6))
    loss.backward()
    opt_student.step()
    assert snapshot(step.fake).keys() == fake0.keys()
    assert all(torch.equal(v, fake0[k]) for k, v in snapshot(step.fake).items())
    changed = [k for k, v in snapshot(step.student).items() if not torch.equal(v, student0[k])]
    assert changed and all(".lora_" in k or "unet.input_blocks.0.0." in k for k in changed)
    student1 = snapshot(step.student)
    fake_loss, _ = step.fake_score_loss(z, cond, torch.Generator().manual_seed(7))
    fake_loss.backward()
    opt_fake.step()
    assert all(torch.equal(v, student1[k]) for k, v in snapshot(step.student).items())
    assert any(not torch.equal(v, fake0[k]) for k, v in snapshot(step.fake).items())
    assert all(torch.equal(v, teacher0[k]) for k, v in snapshot(teacher).items())


def test_settings_are_checked():
    with pytest.raises(ValueError, match="vsd_t_min"):
        DistillSettings(vsd_t_min=900, vsd_t_max=100)
    with pytest.raises(ValueError, match="distill.lora_rank must be a positive integer"):
        DistillSettings(lora_rank=0)


def test_lpips_is_the_perceptual_term_when_configured(tiny, tmp_path):
    from losses.lpips import LPIPS
    from tests.losses.test_lpips import write_lin_weights

    teacher, diffusion = tiny
    settings = DistillSettings(perceptual="lpips", lpips_path="lin.pth", vgg_path="vgg.pth")
    lpips = LPIPS(write_lin_weights(tmp_path / "lin.pth"), None, allow_random_init=True)
    with pytest.raises(ValueError, match="pass an LPIPS network exactly when it is lpips"):
        DistillationStep(teacher, diffusion, settings)
    step = DistillationStep(teacher, diffusion, settings, lpips)
    _, _, _, logs = step.student_loss(batch(), torch.Generator().manual_seed(8))
    assert "lpips" in logs and "ms_ssim" not in logs and logs["lpips"] > 0
