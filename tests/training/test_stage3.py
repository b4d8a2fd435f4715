"""train_stage3 (training.stage3) on the tiny model through the one trainer: the release is the adapter file that
inference_onestep loads strictly and runs, a resumed run continues bit for bit, the two optimisers hold disjoint
parameter sets, a diverging run is stopped by the non-finite guard with only finite files on disk, and the settings
are refused at the door naming the key."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from model.builder import build_model
from model.onestep import LoRADenoiser, OneStepStudent, read_adapter_file
from pipelines import onestep
from pipelines.folder import run_folder
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from tests.helpers import ROOT, tiny_config, write_tiny_release_weights
from tests.train_helpers import launch, make_stage2_data, single_thread, tiny_train_config
from training.guard import EXIT_DIVERGED, nonfinite_keys
from training.stage3 import OneStepTask, split_stage3_settings, train_stage3
from training.state import TrainError, complete_states
from utils.common import load_config
from utils.image_io import load_rgb01, save_png01

STAGE3 = ROOT / "configs" / "train" / "stage3_onestep.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3")
    sd, controlnet = write_tiny_release_weights(root / "weights")
    data = make_stage2_data(root / "data", n=4)
    return {"root": root, "sd": sd, "controlnet": controlnet,
            "data": {"hazy_folder": data / "hazy", "clean_folder": data / "clean", "crop_size": 32}}


def stage3_config(world, name: str, **train) -> Path:
    """The shipped stage-3 config on the tiny model, weights and data: batch 4, 32² crops, MS-SSIM on 2 scales."""
    keys = {"train_steps": 4, "ckpt_every": 2, "log_with": None, "ema_decay": 0.5, **train}
    path = tiny_train_config(STAGE3, world["root"] / name, world["sd"], world["data"], **keys)
    cfg = OmegaConf.merge(OmegaConf.load(path),
                          {"distill": {"controlnet_path": str(world["controlnet"]), "ssim_scales": 2}})
    OmegaConf.save(cfg, path)
    return path


def metrics(exp: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (exp / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def full_run(world) -> Path:
    """4 iterations in one go, checkpoints and states at steps 2 and 4."""
    assert train_stage3(stage3_config(world, "full")) == 0
    return world["root"] / "full"


def test_release_is_the_adapter_file_inference_onestep_runs(world, full_run, tmp_path):
    release = full_run / "checkpoints" / "0000004.safetensors"
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == [
        "0000002.safetensors", "0000002_ema.safetensors", "0000004.safetensors", "0000004_ema.safetensors"]
    tensors, meta = read_adapter_file(release)
    ldm, diffusion = build_model(tiny_config().model, str(world["sd"]), str(world["controlnet"]))
    expected = LoRADenoiser(ldm, 4, train_input_conv=True).adapter_state_dict()
    assert set(tensors) == set(expected) and (meta.rank, meta.alpha, meta.timestep) == (4, 4.0, 999)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in tensors.items())  # it trained (B starts at 0)
    assert set(read_adapter_file(full_run / "checkpoints" / "0000004_ema.safetensors")[0]) == set(expected)
    # the trained student, loaded strictly, is what the script's folder loop writes
    student = OneStepStudent(ldm.eval(), diffusion)
    student.load_adapters(release)
    save_png01(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)), tmp_path / "in" / "a.png")
    values = {"sd_path": world["sd"], "controlnet_path": world["controlnet"], "adapter_path": release,
              "image_folder": tmp_path / "in", "result_folder": tmp_path / "out", "device": "cpu",
              "min_short_side": 64}
    cfg = OmegaConf.merge(tiny_config("configs/inference/stage2_onestep.yaml"),
                          {"inference": {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}})
    inf = InferenceSettings.from_config(cfg)
    runner = DiffusionRunner(cfg, inf, adapter_path=inf.adapter_path)
    assert run_folder(inf, onestep.make_process(cfg, inf, runner), onestep.output_names(inf), False, "test",
                      runner.batch_key) == 0
    with torch.no_grad():
        want = (student.dehaze(load_rgb01(tmp_path / "in" / "a.png")[None], ["remove dense fog"])[0] * 0.5
                + 0.5).clamp(0, 1)
    assert (load_rgb01(tmp_path / "out" / "a.png") - want).abs().max() <= 1.5 / 255
    rows = metrics(full_run)
    assert sorted(rows) == [1, 2, 3, 4]
    assert set(rows[1]) == {"step", "train/loss", "train/loss_fake", "train/mse", "train/ms_ssim", "train/data",
                            "train/vsd", "train/lr"}
    assert rows[1]["train/vsd"] == 0.0 and rows[4]["train/vsd"] > 0  # fake = teacher at init, then they part


def test_state_holds_only_trainable_tensors_and_resume_is_bit_exact(world, full_run):
    """2 iterations, then a resumed run to 4: adapters, EMA, the fake score's adapters, both optimisers' moments and
    the metrics equal the uninterrupted run's bit for bit."""
    half = stage3_config(world, "half", train_steps=2)
    assert train_stage3(half) == 0
    assert train_stage3(half, ["train.train_steps=4", "train.resume=latest"]) == 0
    for name in ("0000004.safetensors", "0000004_ema.safetensors"):
        a, b = (load_file(str(world["root"] / run / "checkpoints" / name)) for run in ("full", "half"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    states = [complete_states(world["root"] / run / "state")[-1] for run in ("full", "half")]
    assert [s.name for s in states] == ["0000004", "0000004"]
    for part in ("model.safetensors", "model_1.safetensors"):
        a, b = (load_file(str(state / part)) for state in states)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
        assert all(".lora_" in k or ".unet.input_blocks.0.0." in k for k in a), part  # no frozen copy in the state
    for part in ("optimizer.bin", "optimizer_1.bin"):
        a, b = (torch.load(state / part, weights_only=True)["state"] for state in states)
        assert all(torch.equal(a[i][m], b[i][m]) for i in a for m in ("exp_avg", "exp_avg_sq")), part
    assert metrics(world["root"] / "full") == metrics(world["root"] / "half")


def test_optimiser_parameter_sets_are_the_student_and_the_fake_score_disjoint(world):
    task = OneStepTask(load_config(stage3_config(world, "parts")))
    parts = task.build(torch.device("cpu"))
    (student, student_opt), (fake, fake_opt) = [(part.module, part.optimizer) for part in parts]
    ids = [{id(p) for group in opt.param_groups for p in group["params"]} for opt in (student_opt, fake_opt)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] == {id(p) for p in student.parameters() if p.requires_grad} == {
        id(p) for p in task.step.student_parameters()}
    assert ids[1] == {id(p) for p in fake.parameters() if p.requires_grad}
    assert not {id(p) for p in task.step.teacher.parameters()} & (ids[0] | ids[1])
    assert set(task.released_weights()) == set(student.student.denoiser.adapter_state_dict())


@pytest.mark.faults
def test_diverging_run_is_stopped_by_the_guard_and_leaves_only_finite_files(world, caplog):
    """learning_rate 1e12: the first iteration is finite, the next ones are not; after train.max_nonfinite_steps (2)
    skipped iterations the run stops with exit status 3, and every checkpoint and state on disk is finite."""
    cfg = stage3_config(world, "diverge", learning_rate=1e12, train_steps=20, ckpt_every=1, max_nonfinite_steps=2)
    assert train_stage3(cfg) == EXIT_DIVERGED
    assert "skipped (no optimizer, learning-rate or EMA update)" in caplog.text
    assert "training stopped at step" in caplog.text and "train.max_nonfinite_steps=2" in caplog.text
    exp = world["root"] / "diverge"
    files = sorted((exp / "checkpoints").iterdir())
    assert files and all(not nonfinite_keys(load_file(str(f))) for f in files)
    for state in complete_states(exp / "state"):
        for part in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
            assert not nonfinite_keys(load_file(str(state / part))), state / part


@pytest.mark.parametrize("override, message", [
    ({"distill": {"bogus_weight": 1}}, "unknown distill.* key(s) bogus_weight"),
    ({"distill": {"perceptual": "lpips"}}, "distill.perceptual: lpips needs distill.lpips_path"),
    ({"distill": {"perceptual": "l1"}}, "distill.perceptual must be one of ms_ssim, lpips"),
    ({"distill": {"lpips_path": "x.pth"}}, "distill.lpips_path is set but distill.perceptual is ms_ssim"),
    ({"distill": {"timestep": 1000}}, "distill.timestep must be below the model's 1000 timesteps"),
    ({"distill": {"vsd_t_min": 500, "vsd_t_max": 100}}, "distill.vsd_t_min/vsd_t_max"),
    ({"distill": {"controlnet_path": None}}, "distill.controlnet_path is required"),
    ({"train": {"cycle_weight": 0.5}}, "unknown train.* key(s) cycle_weight"),
    ({"train": {"gradient_accumulation_steps": 2}}, "train.gradient_accumulation_steps must be 1 for stage 3"),
    ({"train": {"learning_rate": -1.0}}, "train.learning_rate must be a number > 0"),
    ({"guidance": {}}, "unknown top-level key(s) guidance"),
])
def test_settings_are_refused_at_the_door_naming_the_key(override, message):
    cfg = OmegaConf.merge(load_config(STAGE3), override)
    with pytest.raises(TrainError, match=message.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        split_stage3_settings(cfg)


def test_missing_weight_files_are_named_before_any_model_is_built(world, tmp_path):
    cfg = load_config(stage3_config(world, "missing"))
    cfg.distill.controlnet_path = str(tmp_path / "stage2.pt")
    with pytest.raises(TrainError, match=r"distill.controlnet_path .*stage2.pt: missing"):
        OneStepTask(cfg)
    cfg.distill.controlnet_path = str(world["controlnet"])
    cfg.distill.update({"perceptual": "lpips", "lpips_path": str(tmp_path / "lin.pth"),
                        "vgg_path": str(tmp_path / "vgg16.pth")})
    with pytest.raises(TrainError, match=r"2 weight file\(s\) not usable: distill.lpips_path .* \| distill.vgg_path"):
        OneStepTask(cfg)


def test_shipped_configs_read_as_stage3_settings():
    loop, settings = split_stage3_settings(load_config(STAGE3))
    assert (settings.timestep, settings.lora_rank, settings.perceptual, settings.vsd_t_min, settings.vsd_t_max) == (
        999, 4, "ms_ssim", 20, 980)
    assert loop.gradient_accumulation_steps == 1 and loop.max_grad_norm == 1.0 and math.isclose(loop.lr_at(0), 5e-5)
    mini_loop, mini = split_stage3_settings(load_config(ROOT / "configs" / "mini" / "stage3.yaml"))
    assert mini.controlnet_path.startswith("runs/mini/stage2/") and mini_loop.exp_dir == "runs/mini/stage3"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_stage3_trains_under_two_processes(world):
    """Both parts under DDP (every trainable tensor gets a gradient each iteration, or the second would fail), the
    same global batch as one process: the data term of each step equals the one-process run's."""
    proc = launch("train_stage3.py", stage3_config(world, "two", train_steps=2, ckpt_every=2), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per-process batch 2 x 2 processes" in proc.stderr
    assert (world["root"] / "two" / "checkpoints" / "0000002.safetensors").is_file()
    one, two = metrics(world["root"] / "full"), metrics(world["root"] / "two")
    assert all(math.isclose(two[s]["train/data"], one[s]["train/data"], rel_tol=1e-5) for s in (1, 2))
