"""Training on tiny models and generated data: real 2-process runs of both stages, exact resume, the whole
stage-1 -> HazeGen -> stage-2 -> AccSamp loop, start-up errors, data order and state bookkeeping."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from dataset import DataError, StaticPairedData
from tests.helpers import ROOT, tiny_config
from tests.train_helpers import (descendants, launch, make_stage1_data, make_stage2_data, run_python, single_thread,
                                 smooth_image, start_launch, tiny_train_config, write_sd_weights, write_truncated_jpeg)
from training.data import GlobalBatchSampler, build_dataset, plan_batches
from training.settings import split_settings
from training.state import (EMA, LOCK_FILE, ExpDirLock, Progress, TrainError, complete_states, find_resume_state,
                            proc_stat, process_start_time)
from training.step import TrainingStep
from training.trainer import build_model, run_training
from utils.checkpoint import load_state_dict
from utils.common import load_config

S = 32
STAGE1 = ROOT / "configs" / "train" / "stage1.yaml"
STAGE2 = ROOT / "configs" / "train" / "stage2.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    syn, real = make_stage1_data(root / "data1")
    return {"root": root, "sd": write_sd_weights(root / "weights"), "syn": syn, "real": real}


def stage1_config(world, exp: str, **train) -> Path:
    data = {"syn_folder": world["syn"], "real_folder": world["real"], "crop_size": S, "p": 0.5}
    keys = {"train_steps": 12, "ckpt_every": 6, "image_every": 6, "ema_decay": 0.9, "max_grad_norm": 1.0, **train}
    return tiny_train_config(STAGE1, world["root"] / exp, world["sd"], data, **keys)


@pytest.fixture(scope="module")
def stage1_run(world):
    cfg = stage1_config(world, "stage1")
    proc = launch("train_stage1.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, proc


def fixed_batch_loss(config: Path, stage: int, checkpoint: Path | None) -> float:
    """eps-MSE on fixed samples (dataset items 0..3, each at 4 fixed t) with fixed noise; ControlNet = the UNet
    copy (start of training) or ``checkpoint``."""
    cfg = OmegaConf.load(config)
    loop, ext = split_settings(cfg)
    ldm, diffusion = build_model(cfg, loop)
    if checkpoint is not None:
        ldm.load_controlnet_from_ckpt(load_state_dict(checkpoint))
    dataset = build_dataset(cfg, loop.seed)
    batch = default_collate([dataset[i % len(dataset)] for i in range(4)] * 4)
    step = TrainingStep(ldm, diffusion, stage, ext)
    with torch.no_grad():
        cond, _, _ = step.condition(batch, 0)
        z0 = ldm.vae_encode(batch["target"], sample=False)
        t = torch.arange(16) * 40 + 20
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
        return diffusion.training_outputs(ldm, z0, t, cond, noise)["loss"].item()


def metrics(exp: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (exp / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_stage1_two_process_run(world, stage1_run):
    cfg, proc = stage1_run
    exp = world["root"] / "stage1"
    assert "global batch 4 = per-process batch 2 x 2 processes x accumulation 1 (from train.batch_size)" in proc.stderr
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == [
        "0000006.pt", "0000006_ema.pt", "0000012.pt", "0000012_ema.pt"]
    assert [p.name for p in complete_states(exp / "state")] == ["0000006", "0000012"]
    state = exp / "state" / "0000012"
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "progress.json",
            "ema.safetensors"} <= {p.name for p in state.iterdir()}
    assert Progress.load(state / "progress.json").step == 12

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((exp / "logs" / "stage1").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0]), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("preview")] == [1, 6, 12]
    prompts = acc.Tensors("preview_prompts/text_summary")
    assert [e.step for e in prompts] == [1, 6, 12]
    assert prompts[0].tensor_proto.string_val[0].decode().startswith("0: hazy, foggy, misty, obscure, smoggy.")
    assert len(acc.Scalars("train/loss")) == 12

    before = fixed_batch_loss(cfg, 1, None)
    after = fixed_batch_loss(cfg, 1, exp / "checkpoints" / "0000012.pt")
    assert after < 0.95 * before, (before, after)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_continues_exactly_and_ignores_a_killed_save(world, stage1_run):
    cfg, _ = stage1_run
    full, resumed = world["root"] / "stage1", world["root"] / "resumed"
    shutil.copytree(full / "state" / "0000006", resumed / "state" / "0000006")
    killed = resumed / "state" / ".tmp-0000012"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half-written")
    cfg_b = stage1_config(world, "resumed", resume="latest")
    proc = launch("train_stage1.py", cfg_b)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "0000006 at step 6" in proc.stderr

    assert sorted(p.name for p in (resumed / "checkpoints").glob("*.pt")) == ["0000012.pt", "0000012_ema.pt"]
    for name in ("0000012.pt", "0000012_ema.pt"):
        a, b = load_state_dict(full / "checkpoints" / name), load_state_dict(resumed / "checkpoints" / name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    opt_a, opt_b = (torch.load(d / "state" / "0000012" / "optimizer.bin", weights_only=True) for d in (full, resumed))
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key, state in opt_a["state"].items():
        assert state["step"] == opt_b["state"][key]["step"] == 12
        assert torch.allclose(state["exp_avg_sq"], opt_b["state"][key]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    m_full, m_res = metrics(full), metrics(resumed)
    assert sorted(m_res) == list(range(7, 13))
    for step in range(7, 13):
        assert m_res[step]["train/loss"] == pytest.approx(m_full[step]["train/loss"], rel=1e-5)
    assert Progress.load(resumed / "state" / "0000012" / "progress.json") == \
        Progress.load(full / "state" / "0000012" / "progress.json")
    assert not killed.exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_with_another_global_batch_is_refused(world, stage1_run, tmp_path, caplog):
    exp = tmp_path / "exp"
    shutil.copytree(world["root"] / "stage1" / "state" / "0000006", exp / "state" / "0000006")
    data = {"syn_folder": world["syn"], "real_folder": world["real"], "crop_size": S}
    cfg = _config(world, tmp_path, 1, data, resume="latest", batch_size=8)
    assert run_training(cfg, 1) == 2
    assert "saved with a global batch of 4, this run has global batch 8" in caplog.text


@pytest.mark.slow
@pytest.mark.multiprocess
def test_whole_loop_stage1_hazegen_stage2_accsamp(world, stage1_run, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(40, 48, 300 + i)).save(clean / f"view{i}.png")
    hazy = tmp_path / "hazegen"
    inf = tiny_config("configs/inference/stage1.yaml", **{
        "inference.sd_path": world["sd"], "inference.controlnet_path": world["root"] / "stage1/checkpoints/0000012.pt",
        "inference.image_folder": clean, "inference.result_folder": hazy, "inference.steps": 4,
        "inference.device": "cpu", "inference.min_short_side": 32, "inference.num_samples": 2})
    OmegaConf.save(inf, tmp_path / "hazegen.yaml")
    proc = run_python("inference_stage1.py", tmp_path / "hazegen.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in hazy.iterdir()) == ["view0_0.png", "view0_1.png", "view1_0.png", "view1_1.png"]

    exp = tmp_path / "stage2"
    data = {"hazy_folder": hazy, "clean_folder": clean, "crop_size": S}
    cfg = tiny_train_config(STAGE2, exp, world["sd"], data, train_steps=10, ckpt_every=10,
                            gradient_accumulation_steps=2, gradient_checkpointing=False)
    proc = launch("train_stage2.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 4 = per-process batch 1 x 2 processes x accumulation 2 (from train.batch_size); 4 samples" \
        in proc.stderr
    ckpt = exp / "checkpoints" / "0000010.pt"
    assert fixed_batch_loss(cfg, 2, ckpt) < fixed_batch_loss(cfg, 2, None)

    results = tmp_path / "dehazed"
    inf = tiny_config("configs/inference/stage2_accsamp.yaml", **{
        "inference.sd_path": world["sd"], "inference.controlnet_path": ckpt, "inference.image_folder": hazy,
        "inference.result_folder": results, "inference.steps": 4, "inference.device": "cpu",
        "inference.min_short_side": 32})
    OmegaConf.save(inf, tmp_path / "accsamp.yaml")
    proc = run_python("inference_accsamp.py", tmp_path / "accsamp.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("view0_0.png", "view1_1.png"):
        with Image.open(results / name) as out:
            assert out.size == (48, 40)


def _stage2_data(tmp_path: Path) -> dict:
    root = make_stage2_data(tmp_path / "d", n=4)
    return {"hazy_folder": root / "hazy", "clean_folder": root / "clean", "crop_size": S}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("form", ["per_process_batch_size", "batch_size"])
def test_batch_size_forms_count_the_samples_of_each_optimizer_step(world, tmp_path, form):
    """2 processes: per_process_batch_size 2 and (global) batch_size 4 both consume 4 distinct samples per step."""
    record = tmp_path / "record"
    record.mkdir()
    batch = {"batch_size": None, "per_process_batch_size": 2} if form == "per_process_batch_size" else {"batch_size": 4}
    exp = tmp_path / "exp"
    cfg = tiny_train_config(STAGE2, exp, world["sd"], {**_stage2_data(tmp_path), "record_dir": record},
                            train_steps=3, ckpt_every=3, log_with=None, **batch)
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(cfg), {"dataset": {"target": "tests.train_helpers.RecordingPairs"}}),
                   cfg)
    proc = launch("train_stage2.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_process = [[int(i) for i in f.read_text().split()] for f in sorted(record.glob("*.txt"))]
    assert [len(indices) for indices in per_process] == [2 * 3, 2 * 3]  # 2 samples per process and step, 3 steps
    for step in range(3):  # each step: 4 distinct samples = the whole 4-image dataset
        assert sorted(per_process[0][2 * step:2 * step + 2] + per_process[1][2 * step:2 * step + 2]) == [0, 1, 2, 3]
    line = f"global batch 4 = per-process batch 2 x 2 processes x accumulation 1 (from train.{form})"
    assert proc.stderr.count(line) == 1
    assert OmegaConf.to_container(OmegaConf.load(exp / "config.yaml").run) == {
        "num_processes": 2, "global_batch_size": 4, "per_process_batch_size": 2, "gradient_accumulation_steps": 1}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lr_schedule_switches_and_resumes_exactly_across_the_switch(world, tmp_path):
    """[[0, 3e-5], [3, 1e-5]]: steps 1-3 at 3e-5, 4-6 at 1e-5, also in runs resumed from step 2 and step 4."""
    data = _stage2_data(tmp_path)
    keys = {"learning_rate": None, "lr_schedule": [[0, 3.0e-5], [3, 1.0e-5]], "train_steps": 6, "ckpt_every": 2,
            "keep_last": 3, "log_with": None}
    expected = {1: 3e-5, 2: 3e-5, 3: 3e-5, 4: 1e-5, 5: 1e-5, 6: 1e-5}
    full = tmp_path / "full"
    proc = run_python("train_stage2.py", tiny_train_config(STAGE2, full, world["sd"], data, **keys))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m_full = metrics(full)
    assert {step: row["train/lr"] for step, row in m_full.items()} == expected
    for step in (2, 4, 6):
        opt = torch.load(full / "state" / f"{step:07d}" / "optimizer.bin", weights_only=True)
        assert opt["param_groups"][0]["lr"] == expected[step]
    final = load_state_dict(full / "checkpoints" / "0000006.pt")
    for start in (2, 4):  # a state saved before the switch and one saved after it
        exp = tmp_path / f"from{start}"
        shutil.copytree(full / "state" / f"{start:07d}", exp / "state" / f"{start:07d}")
        proc = run_python("train_stage2.py", tiny_train_config(STAGE2, exp, world["sd"], data, resume="latest", **keys))
        assert proc.returncode == 0, proc.stderr[-3000:]
        m_res = metrics(exp)
        assert sorted(m_res) == list(range(start + 1, 7))
        for step, row in m_res.items():
            assert row["train/lr"] == expected[step] and row["train/loss"] == m_full[step]["train/loss"]
        resumed = load_state_dict(exp / "checkpoints" / "0000006.pt")
        assert all(torch.equal(final[k], resumed[k]) for k in final)


# ------------------------------------------------------------------------------------------- start-up errors
def _config(world, tmp_path, stage: int, data: dict, sd: Path | None = None, **train):
    base = STAGE1 if stage == 1 else STAGE2
    return OmegaConf.load(tiny_train_config(base, tmp_path / "exp", sd or world["sd"], data, **train))


@pytest.mark.faults
@pytest.mark.parametrize("case", ["missing_depth", "unpaired_hazy", "unreadable", "missing_folder"])
def test_bad_data_fails_at_start_up_naming_the_path(world, tmp_path, caplog, case):
    if case == "missing_depth":
        syn, real = make_stage1_data(tmp_path / "d", n_syn=2, n_real=1)
        (syn / "depth_500" / "c1.npy").unlink()
        cfg, stage, bad = _config(world, tmp_path, 1, {"syn_folder": syn, "real_folder": real}), 1, "c1.npy"
    elif case == "missing_folder":
        cfg = _config(world, tmp_path, 1, {"syn_folder": tmp_path / "nowhere", "real_folder": world["real"]})
        stage, bad = 1, "nowhere"
    else:
        root = make_stage2_data(tmp_path / "d", n=2)
        if case == "unpaired_hazy":
            Image.fromarray(smooth_image(40, 40, 9)).save(root / "hazy" / "orphan_0.png")
            bad = "orphan_0.png"
        else:
            (root / "clean" / "s1.png").write_bytes(b"not a png")
            bad = "s1.png"
        cfg, stage = _config(world, tmp_path, 2, {"hazy_folder": root / "hazy", "clean_folder": root / "clean"}), 2
    assert run_training(cfg, stage) == 2
    assert "training data error" in caplog.text and bad in caplog.text


@pytest.mark.faults
def test_truncated_jpeg_fails_the_start_up_check_naming_it(tmp_path):
    root = make_stage2_data(tmp_path / "d", n=2)
    (root / "clean" / "s1.png").unlink()
    write_truncated_jpeg(root / "clean" / "s1.jpg", seed=5)
    with pytest.raises(DataError, match=r"s1\.jpg: unreadable image"):
        StaticPairedData(root / "hazy", root / "clean", crop_size=S)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.multiprocess
def test_start_up_error_prints_once_with_exit_status_2(world, tmp_path):
    """A truncated JPEG under ``accelerate launch`` (2 processes) and ``python``: one error line naming the file,
    exit status 2 from every training process (the launcher then reports them and exits 1)."""
    data = _stage2_data(tmp_path)
    write_truncated_jpeg(data["clean_folder"] / "s1.jpg", seed=5)
    (data["clean_folder"] / "s1.png").unlink()
    cfg = tiny_train_config(STAGE2, tmp_path / "exp", world["sd"], data, train_steps=4, log_with=None)
    line = "ERROR training data error: "
    proc = launch("train_stage2.py", cfg)
    assert proc.stderr.count(line) == 1 and "s1.jpg: unreadable image" in proc.stderr, proc.stderr[-3000:]
    # every process exits with 2 by itself; the launcher may SIGTERM (-15) one that is still exiting when the first
    # has gone (torch elastic's race), so it reports 2 or -15 per process and never another status
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert proc.returncode == 1 and len(codes) >= 1 and "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == 1 and "/accelerate\", line" in proc.stderr  # the launcher's own report
    assert "Connection closed" not in proc.stderr and "gloo" not in proc.stderr
    proc = run_python("train_stage2.py", cfg)
    assert proc.returncode == 2 and proc.stderr.count(line) == 1 and "s1.jpg" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "exp" / LOCK_FILE).exists()


def test_exp_dir_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    host, me = socket.gethostname(), os.getpid()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for holder, refused in (({"pid": me, "host": host, "started": process_start_time(me)}, "in use by"),
                            ({"pid": me, "host": "elsewhere", "started": None}, "on host elsewhere"),
                            ({"pid": gone.pid, "host": host, "started": None}, None),
                            ({"pid": me, "host": host, "started": -1}, None)):  # pid reused by a later process
        (exp / LOCK_FILE).write_text(json.dumps(holder))
        lock = ExpDirLock()
        if refused:
            with pytest.raises(TrainError, match=refused):
                lock.acquire(exp)
            assert json.loads((exp / LOCK_FILE).read_text()) == holder
        else:
            lock.acquire(exp)
            assert json.loads((exp / LOCK_FILE).read_text())["pid"] == me
            lock.release()
            assert not (exp / LOCK_FILE).exists()
    assert sorted(p.name for p in exp.iterdir()) == []


def _wait_for(condition, log: Path, alive=lambda: True, timeout: float = 300.0) -> None:
    """Poll ``condition()`` until it holds; fail (showing ``log``) if ``alive()`` turns false first or on timeout."""
    end = time.monotonic() + timeout
    while not condition():
        assert alive() and time.monotonic() < end, log.read_text()[-3000:]
        time.sleep(0.2)


def _gone(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is None or fields[0] == "Z"


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_of_every_process_then_resume_matches_an_uninterrupted_run(world, tmp_path):
    """A real 2-process run: SIGKILL the launcher, and the workers go on training; a second launch on the same
    exp_dir is refused by the lock; then every worker is stopped mid-run and SIGKILLed. ``resume: latest`` continues
    from the newest complete state, and weights, metrics.jsonl and TensorBoard scalars equal those of an
    uninterrupted run (no step logged twice, the first mean after the resume over the same steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _stage2_data(tmp_path)
    keys = {"ckpt_every": 3, "log_every": 4, "log_with": "tensorboard"}
    exp = tmp_path / "killed"
    log = tmp_path / "killed.log"
    run = start_launch("train_stage2.py", tiny_train_config(STAGE2, exp, world["sd"], data, train_steps=10**5,
                                                            **keys), log)
    workers: list[int] = []
    try:
        _wait_for(lambda: (exp / "state" / "0000003").is_dir(), log, alive=lambda: run.poll() is None)
        workers = descendants(run.pid)
        holder = json.loads((exp / LOCK_FILE).read_text())["pid"]
        assert holder in workers
        run.send_signal(signal.SIGKILL)
        run.wait()
        # state 6 and the row of step 8: the workers train on without the launcher (and will log past the state)
        _wait_for(lambda: (exp / "state" / "0000006").is_dir() and 8 in metrics(exp), log,
                  alive=lambda: not _gone(holder))
        for pid in workers:  # frozen mid-step: alive, holding the lock, not training on
            os.kill(pid, signal.SIGSTOP)
        second = launch("train_stage2.py", tiny_train_config(STAGE2, exp, world["sd"], data, train_steps=10**5,
                                                             resume="latest", **keys))
        # one ERROR line from the main process; the launcher's report repeats it as the root cause
        line = f"ERROR train.exp_dir {exp} is in use by another training run"
        assert second.returncode != 0 and second.stderr.count(line) == 1, second.stderr[-3000:]
    finally:  # every process of the run, also when an assertion above failed
        for pid in [run.pid, *workers, *descendants(run.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in workers:
        _wait_for(lambda: _gone(pid), log, timeout=30)
    last = complete_states(exp / "state")[-1]
    end = int(last.name) + 5
    logged_after = [step for step in metrics(exp) if step > int(last.name)]
    resumed = launch("train_stage2.py", tiny_train_config(STAGE2, exp, world["sd"], data, train_steps=end,
                                                          resume="latest", **keys))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last} at step {int(last.name)}" in resumed.stderr
    assert "taking over the stale lock" in resumed.stderr
    assert not logged_after or f"dropped {len(logged_after)} metrics.jsonl rows logged after step" in resumed.stderr
    ref = tmp_path / "uninterrupted"
    proc = launch("train_stage2.py", tiny_train_config(STAGE2, ref, world["sd"], data, train_steps=end, **keys))
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = (load_state_dict(d / "checkpoints" / f"{end:07d}.pt") for d in (exp, ref))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    rows = [json.loads(line)["step"] for line in (exp / "metrics.jsonl").read_text().splitlines()]
    m_exp, m_ref = metrics(exp), metrics(ref)
    assert rows == sorted(m_ref) == sorted(set(list(range(4, end + 1, 4)) + [end]))
    for step, row in m_ref.items():
        assert m_exp[step].keys() == row.keys()
        for key, value in row.items():
            assert m_exp[step][key] == pytest.approx(value, rel=1e-5, abs=1e-9), (step, key)
    events = EventAccumulator(str(exp / "logs" / "stage2"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == rows


@pytest.mark.faults
def test_missing_weights_and_bad_keys_fail_clearly(world, tmp_path, caplog):
    data = {"syn_folder": world["syn"], "real_folder": world["real"]}
    cfg = _config(world, tmp_path, 1, data, sd=tmp_path / "no_sd.ckpt")
    assert run_training(cfg, 1) == 2 and "no_sd.ckpt" in caplog.text
    cfg = _config(world, tmp_path, 1, data, cycle_weight=1.0, vgg_path=None)
    assert run_training(cfg, 1) == 2 and "vgg16-397923af.pth" in caplog.text
    cfg = _config(world, tmp_path, 1, data, learning_rte=1.0)
    with pytest.raises(TrainError, match="learning_rte"):
        split_settings(cfg)
    cfg = _config(world, tmp_path, 1, data, mixed_precision="fp8")
    with pytest.raises(TrainError, match="mixed_precision"):
        split_settings(cfg)
    loop, _ = split_settings(_config(world, tmp_path, 1, data, batch_size=16))
    assert plan_batches(loop, 2, 2).per_process == 4
    with pytest.raises(TrainError, match="not divisible"):
        plan_batches(loop, 3, 1)
    for keys, match in (({"per_process_batch_size": 2}, "batch_size and train.per_process_batch_size"),
                        ({"lr_schedule": [[0, 1e-4]]}, "learning_rate and train.lr_schedule"),
                        ({"learning_rate": None, "lr_schedule": [[5, 1e-4]]}, "first starting at 0"),
                        ({"learning_rate": None, "lr_schedule": [[0, 1e-4], [9, 1e-5], [9, 1e-6]]}, "increasing"),
                        ({"learning_rate": None, "lr_schedule": [[0, -1.0]]}, "rates > 0")):
        with pytest.raises(TrainError, match=match):
            split_settings(_config(world, tmp_path, 1, data, **keys))


def test_shipped_training_configs_parse_and_match_the_inference_model():
    inference_model = load_config(ROOT / "configs" / "inference" / "stage2.yaml").model
    configs = sorted(p for p in (ROOT / "configs" / "train").rglob("*.yaml")
                     if not p.name.startswith(("baseline_", "stage3_")))  # their own tests: baselines, stage 3
    assert len(configs) >= 10
    for path in configs:
        cfg = load_config(path)
        loop, ext = split_settings(cfg)
        model = OmegaConf.to_container(cfg.model)
        model["cldm"]["params"]["controlnet_cfg"]["params"].pop("ycbcr_fusion", None)
        model["cldm"]["params"].pop("text_processor", None)  # the other model switch
        assert model == OmegaConf.to_container(inference_model), path
        assert loop.batch_size == 16 and loop.per_process_batch_size is None and loop.num_workers == 16
        assert ext.forward_weight == 0.7 and ext.backward_weight == 0.3
        assert (loop.log_every, loop.image_every, loop.num_preview, loop.sample_steps) == (100, 1000, 8, 50), path
        stage = 1 if cfg.dataset.target == "dataset.HybridTrainingData" else 2
        if stage == 1:
            assert cfg.dataset.params.p == 0.3 and loop.train_steps == 5000 and loop.ckpt_every == 1000, path
            assert loop.lr_at(0) == loop.lr_at(4999) == 1e-5, path
        else:
            assert loop.train_steps == 100_000 and loop.ckpt_every == 10_000, path
            assert loop.lr_at(0) == loop.lr_at(49_999) == 3e-5 and loop.lr_at(50_000) == loop.lr_at(99_999) == 1e-5


# ------------------------------------------------------------------------------------ bookkeeping units
def test_global_batches_do_not_depend_on_the_process_split():
    def global_batch(procs: int, accum: int, b: int) -> list[int]:
        micro = 8 // (procs * accum)
        out = []
        for a in range(accum):
            for r in range(procs):
                sampler = GlobalBatchSampler(20, micro, procs, r, accum, seed=3, epoch=1, start_batch=b)
                out += list(sampler)[a]
        return out

    order = GlobalBatchSampler(20, 8, 1, 0, 1, seed=3, epoch=1).order()
    assert len(order) == 16 and len(set(order.tolist())) == 16 and order.tolist() != sorted(order.tolist())
    for b in range(2):
        expected = order[b * 8:(b + 1) * 8].tolist()
        assert global_batch(1, 1, b) == expected
        assert sorted(global_batch(2, 1, b)) == sorted(expected) == sorted(global_batch(2, 2, b))
    assert len(GlobalBatchSampler(20, 4, 2, 0, 1, seed=3).order()) == 16  # incomplete last batch dropped
    small = GlobalBatchSampler(3, 4, 2, 1, 1, seed=0)  # fewer samples than one global batch: permutations repeat
    assert small.batches_per_epoch == 1 and np.bincount(small.order(), minlength=3).min() >= 2
    assert not np.array_equal(GlobalBatchSampler(20, 8, 1, 0, 1, seed=3, epoch=2).order(), order)


def test_ema_formula():
    ema = EMA({"w": torch.zeros(3), "n": torch.tensor(1)}, decay=0.9)
    ema.update({"w": torch.full((3,), 2.0), "n": torch.tensor(5)})
    ema.update({"w": torch.full((3,), 2.0), "n": torch.tensor(6)})
    assert torch.allclose(ema.state_dict()["w"], torch.full((3,), 0.9 * 0.2 + 0.1 * 2.0))
    assert ema.state_dict()["n"].item() == 6


def test_resume_state_selection(tmp_path, world):
    data = {"syn_folder": world["syn"], "real_folder": world["real"]}
    root = tmp_path / "exp" / "state"
    for name, complete in (("0000004", True), ("0000010", True), ("0000012", False), (".tmp-0000014", True)):
        (root / name).mkdir(parents=True)
        if complete:
            Progress(step=int(name[-7:])).save(root / name / "progress.json")
    loop, _ = split_settings(_config(world, tmp_path, 1, data, resume="latest"))
    assert find_resume_state(loop.exp_dir, loop.resume) == root / "0000010"
    loop, _ = split_settings(_config(world, tmp_path, 1, data, resume=None))
    with pytest.raises(TrainError, match="already holds training states"):
        find_resume_state(loop.exp_dir, loop.resume)
    loop, _ = split_settings(_config(world, tmp_path, 1, data, resume=str(root / "0000012")))
    with pytest.raises(TrainError, match="not a complete training state"):
        find_resume_state(loop.exp_dir, loop.resume)
