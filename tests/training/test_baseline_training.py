"""The feed-forward baselines through the one trainer: shipped configs, real runs of each objective (image data
term, transmission from the synthesis, CrossDehaze's second stage, the two-optimizer GAN), exact resume, and
start-up errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from losses.restoration import ssl_consistency
from model.baselines.mscnn import MSCNN
from tests.helpers import ROOT
from tests.train_helpers import launch, make_stage1_data, make_stage2_data, run_python
from training.baseline import BaselineStep, BaselineTask, ObjectiveSettings, split_baseline_settings, train_baseline
from training.data import build_dataset
from training.state import TrainError, complete_states
from utils.checkpoint import load_state_dict
from utils.common import instantiate_from_config, load_config

CONFIGS = sorted(p for p in (ROOT / "configs" / "train").glob("baseline_*.yaml") if p.name != "baseline_common.yaml")
TINY_MODELS = {
    "aodnet": {"target": "model.baselines.aodnet.AODNet", "params": {}},
    "dehazeformer": {"target": "model.baselines.dehazeformer.DehazeFormer",
                     "params": {"size": "t", "depths": [1, 1, 2, 1, 1]}},
    "gan": {"target": "model.baselines.deblurgan.ResnetGenerator", "params": {"channels": 8, "n_blocks": 1}},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_data")
    pairs = make_stage2_data(root / "pairs", n=4, size=24)
    syn, _ = make_stage1_data(root / "syn", n_syn=4, n_real=1, size=(24, 28))
    return {"hazy": pairs / "hazy", "clean": pairs / "clean", "syn": syn}


def write_config(path: Path, base: str, **sections) -> Path:
    """A shipped baseline config with sections merged in (small CPU settings added)."""
    cfg = load_config(ROOT / "configs" / "train" / base)
    small = {"train": {"batch_size": 2, "num_workers": 0, "log_every": 1, "image_every": None, "log_with": None,
                       "learning_rate": 1e-3, "ckpt_every": 2}}
    cfg = OmegaConf.merge(cfg, small, sections)
    OmegaConf.save(cfg, path)
    return path


def pairs_dataset(data) -> dict:
    return {"target": "dataset.StaticPairedData",
            "params": {"hazy_folder": str(data["hazy"]), "clean_folder": str(data["clean"]), "crop_size": 16}}


def metrics(exp: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (exp / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_baseline_configs_parse_and_build(path):
    cfg = load_config(path)
    loop, obj = split_baseline_settings(cfg)
    net = instantiate_from_config(cfg.model)
    assert hasattr(net, "restore") and loop.exp_dir.startswith("experiments/baseline_")
    if obj.gan:
        instantiate_from_config(obj.critic)
        assert (obj.n_critic, obj.gp_weight, obj.perceptual_weight) == (5, 10.0, 100.0)
    if cfg.dataset.target == "dataset.ChannelTransfer":
        assert obj.ssl_weight == 0.1 and obj.init_weights is not None


def test_aodnet_run_logs_checkpoints_and_resumes_bit_exactly(data, tmp_path):
    """4 steps in one go equal 2 steps, then a resumed run to 4: same weights bit for bit, same metrics rows."""
    sections = {"model": TINY_MODELS["aodnet"], "dataset": pairs_dataset(data)}
    full = write_config(tmp_path / "full.yaml", "baseline_aodnet.yaml", **sections,
                        train={"exp_dir": str(tmp_path / "full"), "train_steps": 4, "ema_decay": 0.5})
    proc = run_python("train_baseline.py", full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline AODNet: global batch 2" in proc.stderr
    half = write_config(tmp_path / "half.yaml", "baseline_aodnet.yaml", **sections,
                        train={"exp_dir": str(tmp_path / "half"), "train_steps": 2, "ema_decay": 0.5})
    assert run_python("train_baseline.py", half).returncode == 0
    resumed = run_python("train_baseline.py", half, "--set", "train.train_steps=4", "train.resume=latest")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    for name in ("0000004.pt", "0000004_ema.pt"):
        a, b = (load_state_dict(tmp_path / run / "checkpoints" / name) for run in ("full", "half"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    start = load_state_dict(tmp_path / "full" / "checkpoints" / "0000002.pt")
    assert any(not torch.equal(start[k], a[k]) for k in a)  # it trained
    m_full, m_half = metrics(tmp_path / "full"), metrics(tmp_path / "half")
    assert sorted(m_full) == sorted(m_half) == [1, 2, 3, 4]
    assert all(m_full[s]["train/loss"] == m_half[s]["train/loss"] for s in m_full)
    assert set(m_full[1]) == {"step", "train/loss", "train/loss_data", "train/lr"}


def test_train_baseline_runs_a_config_with_overrides_from_python(data, tmp_path):
    config = write_config(tmp_path / "aod.yaml", "baseline_aodnet.yaml", model=TINY_MODELS["aodnet"],
                          dataset=pairs_dataset(data), train={"exp_dir": str(tmp_path / "unused")})
    exp = tmp_path / "aod"
    assert train_baseline(config, [f"train.exp_dir={exp}", "train.train_steps=1"]) == 0
    assert (exp / "checkpoints" / "0000001.pt").is_file() and not (tmp_path / "unused").exists()
    assert train_baseline(config, [f"train.exp_dir={exp}", "train.train_steps=1"]) == 2  # holds states, no resume


def test_mscnn_trains_on_the_true_transmission_of_the_synthesis(data, tmp_path):
    cfg = write_config(tmp_path / "mscnn.yaml", "baseline_mscnn.yaml",
                       dataset={"params": {"syn_folder": str(data["syn"]), "crop_size": 16}},
                       train={"exp_dir": str(tmp_path / "mscnn"), "train_steps": 2})
    proc = run_python("train_baseline.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    net = MSCNN()
    net.load_state_dict(load_state_dict(tmp_path / "mscnn" / "checkpoints" / "0000002.pt"))
    loaded = load_config(cfg)
    batch = default_collate([build_dataset(loaded, 0)[i] for i in range(2)])
    step = BaselineStep(MSCNN(), split_baseline_settings(loaded)[1], 2)
    out = step(batch, 0)
    t_pred = step.net((batch["target"] + 1) / 2)
    assert out["terms"]["data"].item() == pytest.approx(((t_pred - batch["transmission"]) ** 2).mean().item(), rel=1e-5)


def test_transmission_objective_refuses_pairs_without_t(data):
    batch = default_collate([build_dataset(OmegaConf.create({"dataset": pairs_dataset(data)}), 0)[0]])
    with pytest.raises(ValueError, match="needs the true t"):
        BaselineStep(MSCNN(), ObjectiveSettings(predict="transmission"), 1)(batch, 0)


def test_crossdehaze_stage_starts_from_the_first_stage_and_adds_the_decaying_ssl_term(data, tmp_path):
    first = write_config(tmp_path / "first.yaml", "baseline_dehazeformer_t.yaml",
                         model=TINY_MODELS["dehazeformer"],
                         dataset={"params": {**pairs_dataset(data)["params"], "crop_size": 32}},
                         train={"exp_dir": str(tmp_path / "first"), "train_steps": 2})
    assert run_python("train_baseline.py", first).returncode == 0
    init = tmp_path / "first" / "checkpoints" / "0000002.pt"
    second = write_config(
        tmp_path / "second.yaml", "baseline_dehazeformer_t_crossdehaze.yaml", model=TINY_MODELS["dehazeformer"],
        dataset={"params": {"dataset": {"params": {**pairs_dataset(data)["params"], "crop_size": 32}},
                            "source_folder": str(data["hazy"]), "reference_folder": str(data["clean"])}},
        train={"exp_dir": str(tmp_path / "second"), "train_steps": 2, "ckpt_every": 1},
        objective={"init_weights": str(init), "ssl_steps": 4})
    cfg = load_config(second)
    task = BaselineTask(cfg)
    task.build(torch.device("cpu"))
    first_weights = load_state_dict(init)
    assert all(torch.equal(task.net.state_dict()[k], first_weights[k]) for k in first_weights)
    dataset = build_dataset(cfg, 0)
    assert dataset.gamma[0] != pytest.approx(1.0, abs=1e-3)  # hazy -> clean statistics: a real transfer
    batch = default_collate([dataset[i] for i in range(2)])
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = task.step_module(batch, 2, gen_a)  # beta(2 of 4) = 0.05
    pred = task.net(batch["condition"])
    assert out["terms"]["ssl"].item() == pytest.approx(0.05 * ssl_consistency(pred, 0.5, (0.5, 2.0), gen_b).item(),
                                                       rel=1e-5)
    assert "ssl" not in task.step_module(batch, 4)["terms"]  # decayed to 0
    grid, texts = task.preview(task.step_module, batch, 0, 0)
    assert texts is None and grid.shape == (3, 3 * 32 + 4 * 2, 2 * 32 + 3 * 2)  # rows restored / clean / hazy
    proc = run_python("train_baseline.py", second)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(tmp_path / "second")[1]["train/loss_ssl"] > 0


def test_gan_trains_critic_and_generator_with_two_optimizers(data, tmp_path):
    cfg = write_config(tmp_path / "gan.yaml", "baseline_deblurgan_cpu.yaml", model=TINY_MODELS["gan"],
                       dataset=pairs_dataset(data), train={"exp_dir": str(tmp_path / "gan"), "train_steps": 2},
                       objective={"critic": {"params": {"channels": 8}}, "n_critic": 2})
    proc = run_python("train_baseline.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = metrics(tmp_path / "gan")[2]
    assert {"train/loss_adversarial", "train/loss_perceptual", "train/loss_critic", "train/critic_gp",
            "train/critic_wasserstein"} <= set(row)
    state = complete_states(tmp_path / "gan" / "state")[-1]
    assert (state / "model_1.safetensors").is_file() and (state / "optimizer_1.bin").is_file()


def _nan_gan_config(data, path: Path, phase: str, nan_steps: list[int], **train) -> Path:
    return write_config(path, "baseline_deblurgan_cpu.yaml", model=TINY_MODELS["gan"], dataset=pairs_dataset(data),
                        train={"exp_dir": str(path.with_suffix("")), "ckpt_every": 1, **train},
                        objective={"n_critic": 2, "critic": {"target": "tests.train_helpers.NaNCritic",
                                                             "params": {"channels": 8, "phase": phase,
                                                                        "nan_steps": nan_steps}}})


def _finite_checkpoints(exp: Path) -> list[str]:
    """Names of the checkpoints of ``exp``, after checking that they and the states' both models are finite."""
    from safetensors.torch import load_file

    from training.guard import nonfinite_keys

    files = sorted((exp / "checkpoints").glob("*.pt"))
    assert all(not nonfinite_keys(load_state_dict(f)) for f in files)
    for state in complete_states(exp / "state"):
        for name in ("model.safetensors", "model_1.safetensors"):
            assert not nonfinite_keys(load_file(str(state / name))), state / name
    return [f.name for f in files]


def test_gan_critic_loss_turning_nan_stops_the_run_at_that_step_with_exit_3(data, tmp_path):
    """The critic's loss is NaN at step 3: its update is not taken, the step is skipped with the trainer's WARNING, and
    with train.max_nonfinite_steps 1 the run stops there with the trainer's ERROR line and exit status 3, keeping only
    the finite checkpoints of steps 1 and 2."""
    cfg = _nan_gan_config(data, tmp_path / "critic_nan.yaml", "critic", [3], train_steps=6, max_nonfinite_steps=1)
    proc = run_python("train_baseline.py", cfg)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert ("WARNING step 3 skipped (no optimizer, learning-rate or EMA update): loss term 'critic' not finite"
            in proc.stderr)
    assert proc.stderr.count("ERROR") == 1 and "Traceback" not in proc.stderr
    assert ("ERROR training stopped at step 3: 1 consecutive steps had non-finite loss or gradients "
            "(train.max_nonfinite_steps=1; learning rate 0.001)") in proc.stderr
    assert _finite_checkpoints(tmp_path / "critic_nan") == ["0000001.pt", "0000002.pt"]
    assert [s.name for s in complete_states(tmp_path / "critic_nan" / "state")] == ["0000001", "0000002"]


def test_gan_generator_loss_nan_at_one_step_skips_it_and_its_checkpoint(data, tmp_path):
    """The adversarial term is NaN at step 2 only: the generator update of that step is not taken, the step is skipped
    (named, counted, no checkpoint), and the run goes on to its end with finite checkpoints (exit 0)."""
    cfg = _nan_gan_config(data, tmp_path / "gen_nan.yaml", "generator", [2], train_steps=4, keep_last=4)
    proc = run_python("train_baseline.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING step 2 skipped" in proc.stderr and "loss term 'adversarial' not finite" in proc.stderr
    assert "step 2: no checkpoint written, the last 1 step(s) were skipped as non-finite" in proc.stderr
    assert "1 step(s) skipped for non-finite loss or gradients" in proc.stderr
    assert _finite_checkpoints(tmp_path / "gen_nan") == ["0000001.pt", "0000003.pt", "0000004.pt"]


def test_max_seconds_ends_the_run_after_the_step_it_runs_out_in(data, tmp_path):
    """train.max_seconds: a run of a million steps stops after about 2 s of steps, writing that step's checkpoint,
    state and metrics row as at train_steps, with one INFO line; a budget of 0 is refused at the door."""
    exp = tmp_path / "timed"
    cfg = write_config(tmp_path / "timed.yaml", "baseline_aodnet.yaml", model=TINY_MODELS["aodnet"],
                       dataset=pairs_dataset(data),
                       train={"exp_dir": str(exp), "train_steps": 10**6, "ckpt_every": 10**6, "log_every": 10**6,
                              "max_seconds": 2})
    start = time.time()
    proc = run_python("train_baseline.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - start < 60
    steps = int(proc.stderr.split("train.max_seconds=2 reached: stopped after step ")[1].split()[0])
    assert steps > 1 and "of train.train_steps=1000000" in proc.stderr
    assert [p.name for p in (exp / "checkpoints").glob("*.pt")] == [f"{steps:07d}.pt"]
    assert [s.name for s in complete_states(exp / "state")] == [f"{steps:07d}"]
    assert sorted(metrics(exp)) == [steps]
    bad = run_python("train_baseline.py", cfg, "--set", "train.max_seconds=0", f"train.exp_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2
    assert "train.max_seconds must be a number of seconds > 0 or null, got max_seconds=0" in bad.stderr


def test_baseline_start_up_errors_name_the_key(data, tmp_path):
    base = {"model": TINY_MODELS["aodnet"], "dataset": pairs_dataset(data), "train": {"exp_dir": str(tmp_path / "x")}}
    for objective, message in (({"data_loss": "huber"}, "objective.data_loss must be"),
                               ({"init_weights": str(tmp_path / "none.pt")}, "objective.init_weights: file not found"),
                               ({"bogus": 1}, "unknown objective.* keys ['bogus']"),
                               ({"gan": True}, "objective.critic must be a model config")):
        cfg = OmegaConf.merge(load_config(ROOT / "configs/train/baseline_aodnet.yaml"), base, {"objective": objective})
        with pytest.raises(TrainError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
            BaselineTask(cfg)
    bad = write_config(tmp_path / "bad.yaml", "baseline_aodnet.yaml", **base, objective={"predict": "depth"})
    proc = run_python("train_baseline.py", bad)
    assert proc.returncode == 2 and proc.stderr.count("objective.predict must be image or transmission") == 1


@pytest.mark.slow
def test_gan_resume_after_a_real_kill_is_bit_exact(data, tmp_path):
    """SIGKILL a GAN run after its step-4 state, resume with ``resume: latest`` to step 8: generator, critic and both
    optimizers continue exactly (the final generator equals an uninterrupted run's bit for bit)."""
    sections = {"model": TINY_MODELS["gan"], "dataset": pairs_dataset(data),
                "objective": {"critic": {"params": {"channels": 8}}, "n_critic": 2}}
    killed = write_config(tmp_path / "killed.yaml", "baseline_deblurgan_cpu.yaml", **sections,
                          train={"exp_dir": str(tmp_path / "killed"), "train_steps": 10**5, "ckpt_every": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "killed.log").open("w") as handle:
        run = subprocess.Popen([sys.executable, "train_baseline.py", "--config", str(killed)], cwd=ROOT, env=env,
                               stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "killed" / "state" / "0000004").is_dir():
            assert run.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    last = int(complete_states(tmp_path / "killed" / "state")[-1].name)
    end = last + 4
    resumed = run_python("train_baseline.py", killed, "--set", f"train.train_steps={end}", "train.resume=latest")
    assert resumed.returncode == 0 and "taking over the stale lock" in resumed.stderr, resumed.stderr[-3000:]
    ref = write_config(tmp_path / "ref.yaml", "baseline_deblurgan_cpu.yaml", **sections,
                       train={"exp_dir": str(tmp_path / "ref"), "train_steps": end, "ckpt_every": 4})
    assert run_python("train_baseline.py", ref).returncode == 0
    a, b = (load_state_dict(tmp_path / run / "checkpoints" / f"{end:07d}.pt") for run in ("killed", "ref"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    states = [complete_states(tmp_path / run / "state")[-1] for run in ("killed", "ref")]
    from safetensors.torch import load_file

    critics = [load_file(str(state / "model_1.safetensors")) for state in states]
    assert all(torch.equal(critics[0][k], critics[1][k]) for k in critics[0])
    m_killed, m_ref = metrics(tmp_path / "killed"), metrics(tmp_path / "ref")
    assert sorted(m_killed) == sorted(m_ref) and all(m_killed[s] == m_ref[s] for s in m_ref)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gan_trains_under_two_processes(data, tmp_path):
    """The two-optimizer step (critic with the gradient penalty's double backward, then the generator) under DDP."""
    cfg = write_config(tmp_path / "gan2.yaml", "baseline_deblurgan_cpu.yaml", model=TINY_MODELS["gan"],
                       dataset=pairs_dataset(data),
                       train={"exp_dir": str(tmp_path / "gan2"), "train_steps": 2, "batch_size": 4},
                       objective={"critic": {"params": {"channels": 8}}, "n_critic": 2})
    proc = launch("train_baseline.py", cfg, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per-process batch 2 x 2 processes" in proc.stderr
    assert (tmp_path / "gan2" / "checkpoints" / "0000002.pt").is_file()
    assert (complete_states(tmp_path / "gan2" / "state")[-1] / "optimizer_1.bin").is_file()
