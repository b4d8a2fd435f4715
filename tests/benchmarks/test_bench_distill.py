"""benchmarks/bench_distill.py: its iteration is the trainer's (both parts updated, the teacher untouched)."""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_distill
from tests.helpers import ROOT


def test_iteration_updates_student_and_fake_score_and_leaves_the_teacher():
    step, opt_student, opt_fake, max_grad_norm = bench_distill.build_step(
        ROOT / "configs/train/stage3_onestep.yaml", torch.device("cpu"), False, tiny=True)
    assert max_grad_norm == 1.0  # the shipped config's train.max_grad_norm
    teacher = {k: v.clone() for k, v in step.teacher.state_dict().items()}
    student = [p.detach().clone() for p in step.student_parameters()]
    fake = [p.detach().clone() for p in step.fake_parameters()]
    gen = torch.Generator().manual_seed(0)
    batch = {"condition": torch.rand(1, 3, 64, 64, generator=gen), "target": torch.rand(1, 3, 64, 64) * 2 - 1,
             "prompt": ["remove dense fog"]}
    bench_distill.iteration(step, opt_student, opt_fake, batch, lambda: torch.autocast("cpu", enabled=False), gen,
                            max_grad_norm)
    assert all(torch.equal(v, step.teacher.state_dict()[k]) for k, v in teacher.items())
    assert any(not torch.equal(a, b) for a, b in zip(student, step.student_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fake, step.fake_parameters()))
    assert {id(p) for p in step.student_parameters()}.isdisjoint(id(p) for p in step.fake_parameters())


def test_main_prints_time_and_memory(capsys):
    bench_distill.main(["--tiny", "--device", "cpu", "--size", "64", "--iters", "1", "--warmup", "0",
                        "--threads", "1"])
    out = capsys.readouterr().out
    assert "model=tiny size=64" in out and "iteration s: median" in out and "memory MB" in out


def test_main_refuses_bad_settings_before_building(capsys):
    for argv in (["--size", "100"], ["--iters", "0"], ["--device", "cpu", "--precision", "bf16"]):
        with pytest.raises(SystemExit) as err:
            bench_distill.main(["--tiny", *argv])
        assert err.value.code == 2
    assert "--size must be a multiple of 8" in capsys.readouterr().err
