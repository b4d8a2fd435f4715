"""Synthetic benchmark, DCP driver, benchmark runner and comparison grids."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metrics.evaluation import evaluate_folders, summarize
from pipelines import dcp as dcp_pipeline
from pipelines.settings import InferenceSettings
from tools import compare_grid, make_benchmark, run_benchmark
from utils.common import load_config
from utils.image_io import load_rgb01, save_png01
from utils.rules import SettingsError

ROOT = Path(__file__).resolve().parents[2]
DCP_CONFIG = ROOT / "configs" / "inference" / "dcp.yaml"



def run_dcp(cfg, skip_existing: bool) -> int:
    """What ``inference_dcp.py`` runs after reading its settings once: the DCP pipeline over the folder."""
    return dcp_pipeline.run(cfg, InferenceSettings.from_config(cfg), SimpleNamespace(skip_existing=skip_existing))

def _colourful(seed: int, h: int = 64, w: int = 80) -> torch.Tensor:
    """Smooth saturated colours whose darkest channel is near 0 everywhere (the dark channel prior
    holds), with some texture: (3,H,W) in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phases = torch.rand(3, generator=g) * 6.28
    img = torch.stack([0.5 + 0.45 * torch.sin(5 * xx + 3 * yy + p) for p in phases])
    img = img + 0.05 * torch.rand(3, h, w, generator=g)
    return (img - 0.95 * img.min(dim=0, keepdim=True).values).clamp(0, 1)


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for i in range(2):
        save_png01(_colourful(i), src / f"img{i}.png")
    return src


def _bench(src: Path, out: Path) -> Path:
    args = ["--out", str(out), "--source", str(src), "--betas", "1.0,2.0", "--airlights", "0.9"]
    assert make_benchmark.main(args) == 0
    return out


def _dcp_cfg(image_folder: Path, result_folder: Path, *extra: str):
    return load_config(DCP_CONFIG, [f"inference.image_folder={image_folder}",
                                    f"inference.result_folder={result_folder}", "inference.device=cpu", *extra])


def test_benchmark_follows_the_haze_model_and_is_deterministic(source: Path, tmp_path: Path) -> None:
    bench = _bench(source, tmp_path / "b1")
    again = _bench(source, tmp_path / "b2")
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["levels"] == [{"k": 0, "beta": 1.0, "airlight": 0.9}, {"k": 1, "beta": 2.0, "airlight": 0.9}]
    assert manifest["depth_proxy"]["kind"] == "vertical_ramp" and len(manifest["pairs"]) == 4
    for rel in ("hazy/img0_0.png", "hazy/img1_1.png", "clean/img0.png"):
        assert (bench / rel).read_bytes() == (again / rel).read_bytes()
    clean = load_rgb01(bench / "clean" / "img0.png").double()
    hazy = load_rgb01(bench / "hazy" / "img0_1.png").double()
    h = clean.shape[1]
    for row, d in ((0, 1.0), (h - 1, 0.1)):  # top row is farthest (d = 1), bottom row d_near = 0.1
        t = math.exp(-2.0 * d)
        expected = torch.round((clean[:, row] * t + 0.9 * (1 - t)) * 255) / 255
        assert torch.allclose(hazy[:, row], expected, atol=1e-9)


def test_dcp_beats_hazy_input_on_generated_benchmark(source: Path, tmp_path: Path) -> None:
    bench = _bench(source, tmp_path / "bench")
    dst = tmp_path / "dcp"
    assert run_dcp(_dcp_cfg(bench / "hazy", dst), False) == 0
    hazy = summarize(evaluate_folders(bench / "hazy", bench / "clean"))
    dcp = summarize(evaluate_folders(dst, bench / "clean"))
    assert dcp["psnr"]["n"] == 4
    assert dcp["psnr"]["mean"] > hazy["psnr"]["mean"] + 1.0
    assert dcp["deltae00"]["mean"] < hazy["deltae00"]["mean"] - 1.0


def test_dcp_beats_hazy_input_on_skimage_benchmark(tmp_path: Path) -> None:
    pytest.importorskip("skimage", reason="scikit-image (source of the benchmark photos) not installed")
    bench = tmp_path / "bench"
    args = ["--out", str(bench), "--max-side", "96", "--betas", "1.2,2.4", "--airlights", "0.9"]
    assert make_benchmark.main(args) == 0
    assert run_benchmark.main(["--bench", str(bench)]) == 0
    table = json.loads((bench / "runs" / "benchmark.json").read_text())
    assert table["dcp"]["psnr"]["n"] == 8
    assert table["dcp"]["psnr"]["mean"] > table["hazy"]["psnr"]["mean"]
    assert table["dcp"]["deltae00"]["mean"] < table["hazy"]["deltae00"]["mean"]


def test_dcp_driver_bad_input_refusal_and_skip_existing(source: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    images = tmp_path / "in"
    save_png01(_colourful(3), images / "good.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    dst = tmp_path / "out"
    assert run_dcp(_dcp_cfg(images, images), False) == 2
    assert run_dcp(_dcp_cfg(images, dst, "inference.save_transmission=True"), False) == 1
    assert sorted(p.name for p in dst.iterdir()) == ["good.png", "good_transmission.png"]
    assert "broken.jpg" in caplog.text and "1 done, 0 skipped, 1 failed" in caplog.text
    stamp = (dst / "good.png").stat().st_mtime_ns
    caplog.clear()
    run_dcp(_dcp_cfg(images, dst, "inference.save_transmission=True"), True)
    assert "0 done, 1 skipped, 1 failed" in caplog.text and (dst / "good.png").stat().st_mtime_ns == stamp
    with pytest.raises(SettingsError, match=r"unknown dcp\.\* key\(s\) omgea \(did you mean omega\?\)"):
        run_dcp(_dcp_cfg(images, dst, "dcp.omgea=0.9"), False)


def test_run_benchmark_table_with_extra_method(source: Path, tmp_path: Path, capsys) -> None:
    bench = _bench(source, tmp_path / "bench")
    work = tmp_path / "work"
    assert run_benchmark.main(["--bench", str(bench), "--work", str(work), "--methods", "hazy", "dcp",
                               f"again={work / 'dcp'}"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in lines[1:]] == ["hazy", "dcp", "again"]
    table = json.loads((work / "benchmark.json").read_text())
    assert table["again"] == table["dcp"]
    assert (work / "hazy" / "eval" / "per_image.csv").is_file()


def test_compare_grid_layout(source: Path, tmp_path: Path) -> None:
    bench = _bench(source, tmp_path / "bench")
    extra = tmp_path / "accsamp"
    save_png01(torch.full((3, 64, 80), 0.25), extra / "img0_0_estimate.png")
    out = tmp_path / "grids"
    assert compare_grid.main(["--hazy", str(bench / "hazy"), "--methods", f"same={bench / 'hazy'}",
                              "--extra", f"estimate={extra}", "--reference", str(bench / "clean"),
                              "--out", str(out), "--height", "32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img0_0_grid.png", "img0_1_grid.png", "img1_0_grid.png",
                                                     "img1_1_grid.png"]
    grid = load_rgb01(out / "img0_0_grid.png")
    panel_w = 40  # 64x80 image at height 32
    gap, label = compare_grid.GAP, compare_grid.LABEL_HEIGHT
    assert grid.shape == (3, 32 + label, 4 * panel_w + 3 * gap)
    x_est = 2 * (panel_w + gap)
    assert torch.allclose(grid[:, label + 4:, x_est + 4:x_est + panel_w - 4], torch.tensor(0.25), atol=1 / 255)
    assert (grid[:, :label, :panel_w] < 0.5).any()  # label text drawn
    missing = load_rgb01(out / "img1_0_grid.png")[:, label + 4:, x_est + 4:x_est + 28]
    assert torch.allclose(missing, torch.tensor(128 / 255), atol=1e-6)  # no estimate for img1: grey panel
    assert np.isclose(float(load_rgb01(out / "img0_0_grid.png")[:, label:, -panel_w:].mean()),
                      float(load_rgb01(bench / "clean" / "img0.png").mean()), atol=0.02)
