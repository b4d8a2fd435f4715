"""Batched sampling (``inference.batch_size``) and folder sharding over ``accelerate launch`` processes.

Batches must reproduce the batch-1 images (each image keeps its own seeded generator); N processes must write
exactly the files and bytes of one process; a killed run must resume with ``--skip-existing`` (any N) without
redoing finished images.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from pipelines.batching import group_batches, stack_conditions
from sampler.spaced import randn
from tests.helpers import ROOT
from tests.helpers import SCRIPTS, make_config
from tests.train_helpers import ACCELERATE, free_port
from utils.distributed import ProcessInfo

# 64x64 and 40x48 inputs pad to 64x64; 48x80 becomes 64x106 (short side 64) and pads to 64x128
SIZES = [(64, 64), (48, 80), (64, 64), (40, 48), (48, 80), (64, 64), (64, 64), (48, 80)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight smooth random images of three sizes (two padded sizes), named img0..img7."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate(SIZES):
        coarse = rng.random((h // 8 + 1, w // 8 + 1, 3))
        img = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w]
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(np.int16) for p in sorted(folder.glob("*.png"))}


def launch_cmd(which: str, config: Path, processes: int, *extra: str) -> list[str]:
    """The documented multi-process command (``--multi_gpu`` also starts N processes on a CPU-only machine)."""
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port",
            str(free_port()), SCRIPTS[which][0], "--config", str(config), *extra]


def clean_env() -> dict[str, str]:
    """No inherited accelerate settings; one intra-op thread per process (tiny models, shared CPU)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}, "OMP_NUM_THREADS": "1"}


def run_script(which: str, config: Path, *extra: str) -> subprocess.CompletedProcess:
    """Plain ``python <script> --config <config>``: one process."""
    return subprocess.run([sys.executable, SCRIPTS[which][0], "--config", str(config), *extra], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=900)


# ------------------------------------------------------------------------------------------------ unit level
def test_group_batches_groups_equal_keys_in_order_and_keeps_every_item_once():
    items = list(range(11))
    keys = {i: ("a" if i % 3 else "b") for i in items}
    keys[7] = None
    batches = group_batches(items, keys.__getitem__, 3)
    assert sorted(i for b in batches for i in b) == items
    assert all(len({keys[i] for i in b}) == 1 and len(b) <= 3 for b in batches)
    assert [7] in batches
    assert batches == [[1, 2, 4], [0, 3, 6], [7], [5, 8, 10], [9]]
    assert group_batches(items, keys.__getitem__, 1) == [[i] for i in items]


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_cover_every_item_exactly_once(count):
    items = [f"img{i}.png" for i in range(7)]
    shards = [ProcessInfo(index, count).shard(items) for index in range(count)]
    assert sorted(x for s in shards for x in s) == items
    assert all(set(a).isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1:])
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_per_image_generators_give_batch_one_noise():
    gens = [torch.Generator().manual_seed(s) for s in (3, 3, 9)]
    noise = randn((3, 4, 5, 6), gens, torch.device("cpu"))
    for b, seed in enumerate((3, 3, 9)):
        alone = torch.randn((1, 4, 5, 6), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noise[b: b + 1], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 4), gens[:2], torch.device("cpu"))


def test_stack_conditions_keeps_structure():
    conds = [{"c_txt": torch.full((1, 2, 3), float(i)), "c_ycbcr": [torch.full((1, 1, 4, 4), float(i))]}
             for i in range(3)]
    out = stack_conditions(conds)
    assert out["c_txt"].shape == (3, 2, 3) and out["c_ycbcr"][0].shape == (3, 1, 4, 4)
    assert out["c_ycbcr"][0][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------ batches
@pytest.mark.slow
@pytest.mark.parametrize("which", ["stage1", "accsamp"])
def test_batched_sampling_reproduces_batch_one(tmp_path, weights, images, which):
    extra = {"inference.num_samples": 2} if which == "stage1" else {"inference.save_intermediates": True}
    extra["inference.steps"] = 4
    outs = {}
    for batch in (1, 3):
        results = tmp_path / f"b{batch}"
        cfg = make_config(tmp_path, which, weights, images, results, **extra, **{"inference.batch_size": batch})
        proc = run_script(which, cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[batch] = pngs(results)
    assert sorted(outs[1]) == sorted(outs[3]) and len(outs[1]) == len(SIZES) * (2 if which == "stage1" else 3)
    worst = max(int(np.abs(outs[1][n] - outs[3][n]).max()) for n in outs[1])
    assert worst <= 1, f"batched output differs from batch 1 by {worst}/255"


@pytest.mark.slow
def test_bad_batch_size_is_refused_before_loading(tmp_path, weights, images):
    cfg = make_config(tmp_path, "stage2", weights, images, tmp_path / "r", **{"inference.batch_size": 0})
    proc = run_script("stage2", cfg)
    assert proc.returncode != 0 and "inference.batch_size must be a positive integer" in proc.stderr


# ------------------------------------------------------------------------------------------------ processes
@pytest.fixture(scope="module")
def reference(tmp_path_factory, weights, images):
    """Outputs of a plain one-process ``python inference_stage2.py`` run."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_script("stage2", make_config(tmp, "stage2", weights, images, tmp / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.name: p.read_bytes() for p in sorted((tmp / "out").glob("*.png"))}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_write_the_files_and_bytes_of_one(tmp_path, weights, images, reference):
    results = tmp_path / "out"
    cfg = make_config(tmp_path, "stage2", weights, images, results)
    proc = subprocess.run(launch_cmd("stage2", cfg, 2), cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in sorted(results.iterdir())} == reference
    assert proc.stderr.count("summary:") == 1
    assert f"summary: {len(SIZES)} done, 0 skipped, 0 failed by 2 processes" in proc.stderr
    assert "done: " + ", ".join(f"img{i}.png" for i in range(len(SIZES))) in proc.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_run_resumes_with_one_process_and_redoes_nothing(tmp_path, weights, images, reference):
    results = tmp_path / "out"
    cfg = make_config(tmp_path, "stage2", weights, images, results)
    launcher = subprocess.Popen(launch_cmd("stage2", cfg, 2), cwd=ROOT, env=clean_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(results.glob("*.png")) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.poll() is None, "the run must still be going when it is killed"
    # torch's launcher starts each worker in a session of its own: kill the launcher and every worker
    processes = [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    launcher.wait()
    psutil.wait_procs(processes, timeout=60)
    finished = {p.name: p.stat().st_mtime_ns for p in results.glob("*.png")}
    assert 0 < len(finished) < len(SIZES), "the kill must land while images remain"

    proc = run_script("stage2", cfg, "--skip-existing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in sorted(results.glob("*.png"))} == reference
    assert {n: (results / n).stat().st_mtime_ns for n in finished} == finished
    skipped = re.search(r"skipped: (.*)", proc.stderr).group(1).split(", ")
    done = re.search(r"done: (.*)", proc.stderr).group(1).split(", ")
    assert sorted(skipped) == sorted(finished) and sorted(done + skipped) == sorted(reference)
