"""Training on tiny models and generated data: real 2-process runs of both stages, exact resume, the whole
stage-1 -> HazeGen -> stage-2 -> AccSamp loop, start-up errors, data order and state bookkeeping."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from tests.helpers import ROOT, tiny_config
from tests.train_helpers import (
    launch,
    make_stage1_data,
    make_stage2_data,
    run_python,
    single_thread,
    smooth_image,
    tiny_train_config,
    write_sd_weights,
)
from utils.checkpoint import load_state_dict
from utils.train_losses import TrainingStep
from utils.common import load_config
from utils.trainer import (
    EMA,
    GlobalBatchSampler,
    Progress,
    TrainError,
    build_dataset,
    build_model,
    complete_states,
    find_resume_state,
    micro_batch_size,
    run_training,
    split_settings,
)

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
    ldm, diffusion = build_model(cfg, loop, ext)
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
        return diffusion.p_losses(ldm, z0, t, cond, noise).item()


def metrics(exp: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (exp / "metrics.jsonl").read_text().splitlines())}


def test_stage1_two_process_run(world, stage1_run):
    cfg, proc = stage1_run
    exp = world["root"] / "stage1"
    assert "2 processes, micro-batch 2" in proc.stderr
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
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [e.step for e in acc.Images("preview")] == [1, 6, 12]
    assert len(acc.Scalars("train/loss")) == 12

    before = fixed_batch_loss(cfg, 1, None)
    after = fixed_batch_loss(cfg, 1, exp / "checkpoints" / "0000012.pt")
    assert after < 0.95 * before, (before, after)


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
    assert "micro-batch 1, accumulation 2, global batch 4, 4 samples" in proc.stderr
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


# ------------------------------------------------------------------------------------------- start-up errors
def _config(world, tmp_path, stage: int, data: dict, sd: Path | None = None, **train):
    base = STAGE1 if stage == 1 else STAGE2
    return OmegaConf.load(tiny_train_config(base, tmp_path / "exp", sd or world["sd"], data, **train))


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
    assert micro_batch_size(16, 2, 2) == 4
    with pytest.raises(TrainError, match="not divisible"):
        micro_batch_size(16, 3, 1)


def test_shipped_training_configs_parse_and_match_the_inference_model():
    inference_model = OmegaConf.load(ROOT / "configs" / "inference" / "stage2.yaml").model
    configs = sorted((ROOT / "configs" / "train").rglob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        cfg = load_config(path)
        loop, ext = split_settings(cfg)
        model = OmegaConf.to_container(cfg.model)
        model["cldm"]["params"]["controlnet_cfg"]["params"].pop("ycbcr_fusion", None)
        assert model == OmegaConf.to_container(inference_model), path
        assert loop.batch_size == 16 and ext.forward_weight == 0.7 and ext.backward_weight == 0.3
        stage = 1 if cfg.dataset.target == "dataset.HybridTrainingData" else 2
        assert loop.learning_rate == {1: 1e-5, 2: 3e-5}[stage], path
        assert stage == 2 or (cfg.dataset.params.p == 0.3 and loop.train_steps == 5000)


# ------------------------------------------------------------------------------------ bookkeeping units
def test_global_batches_do_not_depend_on_the_process_split():
    def global_batch(procs: int, accum: int, b: int) -> list[int]:
        micro = micro_batch_size(8, procs, accum)
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
    assert find_resume_state(loop) == root / "0000010"
    loop, _ = split_settings(_config(world, tmp_path, 1, data, resume=None))
    with pytest.raises(TrainError, match="already holds training states"):
        find_resume_state(loop)
    loop, _ = split_settings(_config(world, tmp_path, 1, data, resume=str(root / "0000012")))
    with pytest.raises(TrainError, match="not a complete training state"):
        find_resume_state(loop)
