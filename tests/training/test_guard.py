"""Training that cannot poison the model: the non-finite guard (skip, count, stop with exit status 3, never write a
non-finite checkpoint, refuse to resume from one) and training files that break mid-run (skip, name, list, stop
past ``train.max_bad_sample_fraction`` with exit status 4)."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tests.helpers import ROOT
from tests.train_helpers import launch, make_stage2_data, run_python, single_thread, tiny_train_config, write_sd_weights
from training.guard import (EXIT_BAD_DATA, EXIT_DIVERGED, NonFiniteGuard, TrainingStopped, UnreadableSamples,
                            gradients_finite, nonfinite_keys)
from training.state import complete_states
from training.trainer import run_training
from utils.checkpoint import load_state_dict

S = 32
STAGE2 = ROOT / "configs" / "train" / "stage2.yaml"
ONE = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
STOP_LINE = "ERROR training stopped at step "

pytestmark = pytest.mark.faults


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    data = make_stage2_data(root / "d", n=4)
    return {"root": root, "sd": write_sd_weights(root / "weights"),
            "data": {"hazy_folder": data / "hazy", "clean_folder": data / "clean", "crop_size": S}}


def _diverging_config(world, name: str, **train) -> Path:
    keys = {"learning_rate": 1e12, "train_steps": 30, "ckpt_every": 1, "keep_last": 2, "log_with": None,
            "ema_decay": 0.9, **train}
    return tiny_train_config(STAGE2, world["root"] / name, world["sd"], world["data"], **keys)


def _assert_every_checkpoint_finite(exp: Path) -> list[Path]:
    files = sorted((exp / "checkpoints").glob("*.pt"))
    for path in files:
        sd = load_state_dict(path)
        assert sd and not nonfinite_keys(sd), path
    for state in complete_states(exp / "state"):
        assert not nonfinite_keys(load_file(str(state / "model.safetensors"))), state
        assert not nonfinite_keys(load_file(str(state / "ema.safetensors"))), state
    return files


# ---------------------------------------------------------------------------------------------------------- units
def test_nonfinite_keys_and_gradient_check():
    sd = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("-inf")]),
          "steps": torch.tensor([3])}
    assert nonfinite_keys(sd) == ["b", "c"]
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    assert gradients_finite([p, q])  # q has no gradient
    q.grad = torch.tensor([float("inf"), 0.0])
    assert not gradients_finite([p, q])


def test_guard_names_the_term_counts_and_stops_after_the_limit(caplog):
    guard = NonFiniteGuard(limit=3)
    finite, bad = torch.tensor(1.0), torch.tensor(float("nan"))
    guard.watch_terms({"diffusion": finite, "cycle": bad})
    assert guard.decide(ONE, ["diffusion", "cycle"], [], check_gradients=True) == ["cycle"]
    guard.skip(5, ["cycle"], 1e-5)
    assert "step 5 skipped" in caplog.text and "loss term 'cycle'" in caplog.text
    guard.watch_terms({"diffusion": finite, "cycle": finite})  # the notes were reset by decide
    assert guard.decide(ONE, ["diffusion", "cycle"], [], check_gradients=True) == []
    guard.took_step(overflowed=True)
    assert (guard.consecutive, guard.skipped, guard.overflows) == (0, 1, 1)
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.tensor([float("nan")])
    assert guard.decide(ONE, ["diffusion"], [p], check_gradients=True) == ["gradients"]
    assert guard.decide(ONE, ["diffusion"], [p], check_gradients=False) == []  # fp16: the scaler's business
    guard.skip(6, ["gradients"], 1e-5)
    guard.skip(7, ["gradients"], 1e-5)
    with pytest.raises(TrainingStopped, match="training stopped at step 8: 3 consecutive") as err:
        guard.skip(8, ["gradients"], 1e-5)
    assert err.value.exit_code == EXIT_DIVERGED == 3


def test_unreadable_samples_warn_once_list_and_stop_past_the_fraction(caplog):
    samples = UnreadableSamples(dataset_size=10, max_fraction=0.2)
    samples.note(["", "a.png: truncated"])
    samples.sync(ONE, 1)
    samples.note(["a.png: truncated", ""])  # seen again: no new warning
    samples.sync(ONE, 2)
    assert caplog.text.count("a.png: truncated") == 1 and samples.failures == ["a.png: truncated"]
    samples.note(["b.png: gone"])
    samples.sync(ONE, 3)  # 2 of 10 = the fraction: still allowed
    assert samples.summary() == "2 unreadable training sample(s) skipped: a.png: truncated; b.png: gone"
    samples.note(["c.png: gone"])
    with pytest.raises(TrainingStopped, match="3 of 10 training samples are unreadable") as err:
        samples.sync(ONE, 4)
    assert err.value.exit_code == EXIT_BAD_DATA == 4 and "c.png" in str(err.value)


# ------------------------------------------------------------------------------------------------- real runs
def test_diverging_run_stops_with_exit_3_and_keeps_only_finite_checkpoints(world):
    """learning_rate 1e12: step 1 is finite, every later step is NaN; the run stops after
    train.max_nonfinite_steps (default 10) skips with one ERROR line and exit status 3."""
    exp = world["root"] / "diverge"
    proc = run_python("train_stage2.py", _diverging_config(world, "diverge"))
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    assert proc.stderr.count("ERROR") == 1 and proc.stderr.count(STOP_LINE) == 1
    assert (f"{STOP_LINE}11: 10 consecutive steps had non-finite loss or gradients "
            "(train.max_nonfinite_steps=10; learning rate 1e+12)") in proc.stderr
    assert "WARNING step 2 skipped" in proc.stderr and "loss term 'diffusion'" in proc.stderr
    assert "Traceback" not in proc.stderr
    files = _assert_every_checkpoint_finite(exp)
    assert [f.name for f in files] == ["0000001.pt", "0000001_ema.pt"]  # the last good one, nothing after it
    assert [s.name for s in complete_states(exp / "state")] == ["0000001"]


def test_resume_refuses_a_state_holding_a_non_finite_tensor(world, caplog):
    cfg = _diverging_config(world, "poisoned", learning_rate=1e-5, train_steps=1)
    assert run_training(OmegaConf.load(cfg), 2) == 0
    state = world["root"] / "poisoned" / "state" / "0000001"
    sd = load_file(str(state / "model.safetensors"))
    key = sorted(sd)[0]
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(state / "model.safetensors"))
    resumed = OmegaConf.merge(OmegaConf.load(cfg), {"train": {"resume": "latest", "train_steps": 2}})
    assert run_training(resumed, 2) == 2
    assert f"training state {state} holds 1 non-finite tensor(s), e.g. '" in caplog.text
    assert not (world["root"] / "poisoned" / "checkpoints" / "0000002.pt").exists()


@pytest.mark.parametrize("fraction, status", [(0.5, 0), (0.0, EXIT_BAD_DATA)])
def test_image_truncated_mid_run_is_skipped_named_and_listed(world, tmp_path, fraction, status):
    """A clean PNG cut in half after the start-up check: skipped with one WARNING naming it and listed at the end
    (1 of 4 samples <= 0.5), or the run stops naming it (> 0.0) with exit status 4; no traceback either way."""
    data = make_stage2_data(tmp_path / "d", n=4)
    bad = data / "clean" / "s2.png"
    cfg = tiny_train_config(STAGE2, tmp_path / "exp", world["sd"],
                            {"hazy_folder": data / "hazy", "clean_folder": data / "clean", "crop_size": S,
                             "truncate": bad},
                            train_steps=3, ckpt_every=3, log_with=None, max_bad_sample_fraction=fraction)
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(cfg), {"dataset": {"target": "tests.train_helpers.TruncatingPairs"}}),
                   cfg)
    proc = run_python("train_stage2.py", cfg)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count(f"unreadable training sample skipped (replaced by the next one): {bad}: ") == 1
    if status == 0:
        assert f"WARNING 1 unreadable training sample(s) skipped: {bad}: " in proc.stderr
        assert (tmp_path / "exp" / "checkpoints" / "0000003.pt").is_file()
    else:
        assert proc.stderr.count("ERROR") == 1
        assert "1 of 4 training samples are unreadable (more than train.max_bad_sample_fraction=0)" in proc.stderr
        assert str(bad) in proc.stderr.split("ERROR")[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_diverging_run_under_accelerate_launch_two_processes(world):
    """The same divergence under ``accelerate launch --num_processes 2``: both processes skip the same steps (the
    flags are reduced), the main one prints the ERROR line once, each exits 3 and the launcher's report names the
    line as the root cause; only finite checkpoints."""
    exp = world["root"] / "diverge2"
    proc = launch("train_stage2.py", _diverging_config(world, "diverge2"))
    assert proc.stderr.count(STOP_LINE) == 1, proc.stderr[-3000:]
    assert f"{STOP_LINE}11: 10 consecutive steps" in proc.stderr
    assert proc.stderr.count("WARNING step 2 skipped") == 1
    # the launcher exits 1; its report gives each process's status and names the line as the root cause. Both
    # processes stopped at the same step (each wrote the line to its error file); the one that has not exited yet
    # when the other one does may be ended by the launcher (SIGTERM, exit code -15) instead of exiting with 3
    codes = set(re.findall(r"exitcode  : (-?\d+)", proc.stderr))
    assert proc.returncode == 1 and "3" in codes and codes <= {"3", "-15"}, proc.stderr[-3000:]
    assert proc.stderr.count(f"traceback : {STOP_LINE[len('ERROR '):]}11: 10 consecutive") == 2, proc.stderr[-3000:]
    files = _assert_every_checkpoint_finite(exp)
    assert [f.name for f in files] == ["0000001.pt", "0000001_ema.pt"]
