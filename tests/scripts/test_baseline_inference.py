"""inference_baseline.py: the folder loop with a trained baseline's weights, padding and tiling, MSCNN's map output,
start-up errors, and the page's baseline modes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from model.baselines.aodnet import AODNet
from model.baselines.mscnn import MSCNN
from pipelines import baseline as baseline_pipeline
from pipelines.modes import load_modes
from pipelines.settings import InferenceSettings, InferenceSettingsError
from tests.helpers import ROOT, tiny_config
from utils.checkpoint import save_state_dict_atomic
from utils.common import load_config
from utils.image_io import load_rgb01, save_png01


def images(folder: Path, sizes=((30, 41), (24, 24))) -> Path:
    for i, (h, w) in enumerate(sizes):
        save_png01(torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)), folder / f"img{i}.png")
    return folder


def script(config: Path, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "inference_baseline.py", "--config", str(config), "--set", *sets],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_script_dehazes_a_folder_with_the_trained_weights_and_reports_a_broken_file(tmp_path):
    torch.manual_seed(0)
    net = AODNet()
    ckpt = tmp_path / "aod.pt"
    save_state_dict_atomic(net.state_dict(), ckpt)
    src = images(tmp_path / "in")
    (src / "broken.png").write_bytes(b"not a png")
    proc = script(ROOT / "configs/inference/baseline_aodnet.yaml", f"inference.checkpoint_path={ckpt}",
                  f"inference.image_folder={src}", f"inference.result_folder={tmp_path / 'out'}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "summary: 2 done, 0 skipped, 1 failed" in proc.stderr and "failed broken.png" in proc.stderr
    for i in range(2):
        out = load_rgb01(tmp_path / "out" / f"img{i}.png")
        expected = net.restore(load_rgb01(src / f"img{i}.png")[None])[0]
        assert (out - expected).abs().max() <= 1 / 255 + 1e-6


def test_missing_weights_and_mismatched_network_exit_2_naming_the_key(tmp_path):
    config = ROOT / "configs/inference/baseline_dehazeformer_t.yaml"
    folders = [f"inference.image_folder={images(tmp_path / 'in')}", f"inference.result_folder={tmp_path / 'out'}"]
    proc = script(config, f"inference.checkpoint_path={tmp_path / 'none.pt'}", *folders)
    assert proc.returncode == 2 and "inference.checkpoint_path" in proc.stderr and "missing" in proc.stderr
    ckpt = tmp_path / "aod.pt"
    save_state_dict_atomic(AODNet().state_dict(), ckpt)
    proc = script(config, f"inference.checkpoint_path={ckpt}", *folders)
    assert proc.returncode == 2 and "inference.checkpoint_path / network:" in proc.stderr
    assert not (tmp_path / "out").exists()


class Pointwise(nn.Module):
    """A 1x1 network that needs sides divisible by 4: tiles change nothing, so tiled output = whole output."""

    size_multiple = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        assert img01.shape[-1] % 4 == 0 and img01.shape[-2] % 4 == 0
        return self.conv(img01)


def test_padding_and_tiles_give_the_whole_image_result():
    net = Pointwise()
    img = torch.rand(1, 3, 53, 70)
    whole = baseline_pipeline.run_network(net, img, InferenceSettings(tiled=False))
    tiled = baseline_pipeline.run_network(net, img, InferenceSettings(tiled=True, tile_size=24, tile_stride=16))
    assert whole.shape == tiled.shape == (1, 3, 53, 70)
    assert torch.allclose(whole, net.conv(img), atol=1e-6) and torch.allclose(tiled, whole, atol=1e-5)
    auto = InferenceSettings(tiled="auto", tile_threshold=64, tile_size=24, tile_stride=16)
    assert torch.allclose(baseline_pipeline.run_network(net, img, auto), whole, atol=1e-5)


def test_mscnn_writes_its_transmission_and_dehazes_with_one_airlight(tmp_path):
    torch.manual_seed(0)
    net = MSCNN().eval()
    ckpt = tmp_path / "mscnn.pt"
    save_state_dict_atomic(net.state_dict(), ckpt)
    cfg = load_config(ROOT / "configs/inference/baseline_mscnn.yaml",
                      [f"inference.checkpoint_path={ckpt}", "inference.save_transmission=true",
                       "inference.tiled=true", "inference.tile_size=32", "inference.tile_stride=24"])
    inf = InferenceSettings.from_config(cfg)
    img = torch.rand(3, 40, 50)
    out = baseline_pipeline.make_process(cfg, inf)([(img, "a")])
    assert set(out) == {"a.png", "a_transmission.png"}
    t = baseline_pipeline.run_network(net, img[None], inf)
    assert torch.allclose(out["a_transmission.png"], t[0].expand(3, -1, -1), atol=1e-6)
    assert torch.allclose(out["a.png"], net.dehaze(img[None], t)[0], atol=1e-6)
    cfg.network = OmegaConf.create({"target": "model.baselines.aodnet.AODNet", "params": {}})
    save_state_dict_atomic(AODNet().state_dict(), ckpt)
    with pytest.raises(InferenceSettingsError, match="save_transmission"):
        baseline_pipeline.make_process(cfg, inf)


def test_settings_of_the_baseline_script():
    with pytest.raises(InferenceSettingsError, match="inference.checkpoint_path is required"):
        InferenceSettings(image_folder="a", result_folder="b").check_script("inference_baseline")
    with pytest.raises(InferenceSettingsError, match="inference.tile_stride must be at most inference.tile_size"):
        InferenceSettings(tile_size=32, tile_stride=40)
    with pytest.raises(InferenceSettingsError, match="inference.tile_size must be an integer >= 16"):
        InferenceSettings(tile_size=8, tile_stride=8)


def test_baseline_modes_appear_when_their_weights_exist(tmp_path, monkeypatch):
    sd, cn = tmp_path / "sd.ckpt", tmp_path / "cn.pt"
    sd.write_bytes(b""), cn.write_bytes(b"")
    app_cfg = tiny_config("configs/inference/stage2.yaml", **{"inference.sd_path": str(sd),
                                                              "inference.controlnet_path": str(cn)})
    monkeypatch.chdir(tmp_path)  # the modes' weights/baseline_*.pt resolve against the working directory
    labels = {m.label for m in load_modes(ROOT / "configs/app/modes.yaml", app_cfg, ROOT)}
    assert not any("baseline" in label and "DCP" not in label for label in labels)
    (tmp_path / "weights").mkdir()
    torch.manual_seed(0)
    save_state_dict_atomic(AODNet().state_dict(), tmp_path / "weights" / "baseline_aodnet.pt")
    modes = {m.label: m for m in load_modes(ROOT / "configs/app/modes.yaml", app_cfg, ROOT)}
    mode = modes["AOD-Net baseline"]
    assert not mode.needs_runner and modes["DiffDehaze (spaced DDPM)"].needs_runner
    assert not modes["DCP baseline"].needs_runner
    img = torch.rand(3, 20, 30)
    out = mode.script.make_process(mode.cfg, mode.settings)([(img, "x")])
    assert out["x.png"].shape == (3, 20, 30)


def test_dehaze_folder_runs_the_script_from_python(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "aod.pt"
    save_state_dict_atomic(AODNet().state_dict(), ckpt)
    sets = [f"inference.image_folder={images(tmp_path / 'in')}", f"inference.result_folder={tmp_path / 'out'}",
            "inference.device=cpu"]
    config = str(ROOT / "configs/inference/baseline_aodnet.yaml")
    assert baseline_pipeline.dehaze_folder(config, [f"inference.checkpoint_path={tmp_path / 'none.pt'}", *sets]) == 2
    assert baseline_pipeline.dehaze_folder(config, [f"inference.checkpoint_path={ckpt}", *sets]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png"]
