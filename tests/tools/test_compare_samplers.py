"""tools/compare_samplers.py end to end on the tiny model: runs, timing, memory, agreement with the reference run."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.helpers import ROOT, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory, weights, real_images):  # noqa: F811
    root = tmp_path_factory.mktemp("compare")
    sd, cn = weights
    images = real_images
    common = {"inference.sd_path": sd, "inference.controlnet_path": cn, "inference.device": "cpu",
              "inference.min_short_side": 64, "inference.steps": 6}
    OmegaConf.save(tiny_config("configs/inference/stage2_accsamp.yaml", **common), root / "accsamp.yaml")
    OmegaConf.save(tiny_config("configs/inference/stage2.yaml", **common), root / "stage2.yaml")
    # the fast preset's own inference keys over the tiny published AccSamp config (as its `base:` does)
    fast = OmegaConf.load(ROOT / "configs" / "inference" / "stage2_accsamp_fast.yaml")
    OmegaConf.save({"base": "accsamp.yaml", "inference": {**OmegaConf.to_container(fast.inference), "steps": 4}},
                   root / "fast.yaml")
    return root, images


def test_compare_samplers_end_to_end(setup):
    root, images = setup
    out = root / "out"
    runs = [f"published={root / 'accsamp.yaml'}", f"again={root / 'accsamp.yaml'}", f"fast={root / 'fast.yaml'}",
            f"plain={root / 'stage2.yaml'}:inference.sampler=ddim,inference.steps=4"]
    cmd = [sys.executable, "-m", "tools.compare_samplers", "--image-folder", str(images), "--out", str(out),
           "--no-ref-metrics", "brisque_svr", *[a for r in runs for a in ("--run", r)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "compare.json").read_text())}
    assert list(rows) == ["published", "again", "fast", "plain"]
    for name, row in rows.items():
        assert sorted(p.name for p in (out / name).iterdir()) == ["real_1.png", "real_4.png"]
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"]) and row["peak_mb"] > 0
        assert math.isfinite(row["metrics"]["brisque_svr"])  # evaluate.py's offline BRISQUE of every run's outputs
    assert rows["published"]["reference"] and set(rows["published"]["metrics"]) == {"brisque_svr"}
    # a seeded rerun of the reference config is identical: PSNR +inf, SSIM 1
    assert rows["again"]["metrics"]["psnr"] == float("inf")
    assert rows["again"]["metrics"]["ssim"] == pytest.approx(1.0)
    assert (rows["fast"]["sampler"], rows["fast"]["steps"], rows["fast"]["guidance_every"],
            rows["fast"]["guidance_pullback"]) == ("ddim", 4, 2, "linear")
    assert (rows["plain"]["script"], rows["plain"]["sampler"], rows["plain"]["steps"]) == ("inference_stage2", "ddim", 4)
    for name in ("fast", "plain"):  # other samplers give other images: finite agreement
        assert 0 < rows[name]["metrics"]["psnr"] < 100 and rows[name]["metrics"]["ssim"] < 1
    table = (out / "compare.md").read_text()
    assert "| published (reference) | spaced | 6 | 1 / autograd | 2 |" in table
    assert "| fast | ddim | 4 | 2 / linear | 2 |" in table and "| plain | ddim | 4 | - | 2 |" in table


def test_compare_samplers_rejects_bad_runs_before_work(setup, tmp_path):
    root, images = setup
    base = [sys.executable, "-m", "tools.compare_samplers", "--image-folder", str(images), "--out", str(tmp_path / "o")]
    proc = subprocess.run([*base, "--run", "x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "NAME=CONFIG" in proc.stderr
    proc = subprocess.run([*base, "--run", f"a={root / 'missing.yaml'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
    assert not (tmp_path / "o").exists()
