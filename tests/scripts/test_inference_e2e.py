"""End-to-end runs of the three inference scripts on tiny random-init models written in the release formats."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from haze.fog import FOG_FEATURE_DIM
from tests.helpers import build_tiny, make_config, randomize_, run_script, tiny_config, write_release_checkpoints

pytestmark = pytest.mark.slow

@pytest.mark.parametrize("which", ["stage2", "accsamp"])
def test_dehazing_scripts_keep_geometry_and_are_seeded(tmp_path, weights, real_images, which):
    outs = []
    for run in range(2):
        results = tmp_path / f"out{run}"
        extra = {"inference.save_intermediates": True} if which == "accsamp" else {}
        proc = run_script(which, make_config(tmp_path, which, weights, real_images, results, **extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(results)
    for src in sorted(real_images.glob("*.png")):
        with Image.open(src) as im:
            size = im.size
        for results in outs:
            with Image.open(results / src.name) as out:
                assert out.size == size and out.mode == "RGB"
        assert (outs[0] / src.name).read_bytes() == (outs[1] / src.name).read_bytes()
        if which == "accsamp":
            for suffix in ("estimate", "transmission"):
                with Image.open(outs[0] / f"{src.stem}_{suffix}.png") as im:
                    assert im.size == size


def test_hazegen_writes_numbered_variants(tmp_path, weights, real_images):
    results = tmp_path / "hazy"
    cfg = make_config(tmp_path, "stage1", weights, real_images, results, **{"inference.num_samples": 2})
    proc = run_script("stage1", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in results.iterdir())
    assert names == ["real_1_0.png", "real_1_1.png", "real_4_0.png", "real_4_1.png"]
    a = np.asarray(Image.open(results / "real_1_0.png"))
    b = np.asarray(Image.open(results / "real_1_1.png"))
    assert not np.array_equal(a, b)
    proc = run_script("stage1", cfg, "--skip-existing")
    assert proc.returncode == 0 and "0 done, 2 skipped" in proc.stderr


def _bad_corpus(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.png").write_text("this is not an image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(folder / "dot.png")
    Image.fromarray(rng.integers(0, 255, (20, 10000, 3), dtype=np.uint8)).save(folder / "strip.png")


@pytest.mark.faults
def test_bad_inputs_are_reported_and_batch_continues(tmp_path, weights):
    images, results = tmp_path / "bad", tmp_path / "res"
    _bad_corpus(images)
    cfg = make_config(tmp_path, "stage2", weights, images, results, **{"inference.max_pixels": 512 * 512})
    proc = run_script("stage2", cfg)
    assert proc.returncode == 1
    assert "becomes 32000x64 after the published resize/pad" in proc.stderr
    for name in ("notes.png", "truncated.jpg", "strip.png"):
        assert f"failed: {name}" in proc.stderr
    assert sorted(p.name for p in results.iterdir()) == ["deep16.png", "dot.png", "whole.png"]
    with Image.open(results / "dot.png") as im:
        assert im.size == (1, 1)
    with Image.open(results / "deep16.png") as im:
        assert im.size == (50, 40)
    assert "3 done, 0 skipped, 3 failed" in proc.stderr


@pytest.mark.faults
def test_missing_weights_exit_2_and_same_folder_refused(tmp_path, weights, real_images):
    cfg = make_config(tmp_path, "stage2", (tmp_path / "none.ckpt", weights[1]), real_images, tmp_path / "r")
    proc = run_script("stage2", cfg)
    assert proc.returncode == 2 and "none.ckpt" in proc.stderr and "README" in proc.stderr
    cfg = make_config(tmp_path, "stage2", weights, real_images, real_images)
    proc = run_script("stage2", cfg)
    assert proc.returncode == 2 and "must differ" in proc.stderr


def test_set_overrides_reach_the_config(tmp_path, weights, real_images):
    cfg = make_config(tmp_path, "accsamp", weights, real_images, tmp_path / "r")
    proc = run_script("accsamp", cfg, "--set", "inference.tau=1.5")
    # refused at start-up (exit 2, issue 13), no longer image by image (exit 1)
    assert proc.returncode == 2 and "tau=1.5" in proc.stderr


def test_extensions_at_inference_dynamic_prompt_fusion_and_text_processor(tmp_path, real_images):
    ext = {"model.cldm.params.controlnet_cfg.params.ycbcr_fusion": True,
           "model.cldm.params.text_processor_cfg.target": "model.text_processor.TextConditionProcessor",
           "model.cldm.params.text_processor_cfg.params.dim": 32,
           "model.cldm.params.text_processor_cfg.params.fog_feat_dim": FOG_FEATURE_DIM}
    model = build_tiny(seed=21, cfg=tiny_config(**ext))
    randomize_(model.unet, seed=22, std=0.02)
    randomize_(model.controlnet, seed=23, std=0.02)
    randomize_(model.text_processor, seed=24, std=0.02)
    sd_path, cn_path = write_release_checkpoints(model, tmp_path / "w")
    assert any(k.startswith("text_processor.") for k in torch.load(cn_path, weights_only=True))
    cfg = make_config(tmp_path, "stage2", (sd_path, cn_path), real_images, tmp_path / "r",
                      **{"inference.dynamic_prompt": True, **ext})
    proc = run_script("stage2", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "r").glob("*.png"))) == 2


def test_tiled_path_runs_end_to_end_and_keeps_geometry(tmp_path, weights, real_images):
    tiles = {"inference.tiled": True, "inference.latent_tile_size": 8, "inference.latent_tile_stride": 4,
             "inference.vae_tile_size": 64, "inference.vae_tile_stride": 48, "inference.steps": 5}
    results = tmp_path / "tiled"
    proc = run_script("accsamp", make_config(tmp_path, "accsamp", weights, real_images, results, **tiles))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for src in sorted(real_images.glob("*.png")):
        with Image.open(src) as im, Image.open(results / src.name) as out:
            assert out.size == im.size
            assert np.asarray(out).std() > 0


def test_run_benchmark_runs_a_configured_model(tmp_path, weights):
    from tools import make_benchmark, run_benchmark

    src = tmp_path / "src"
    save = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    src.mkdir()
    Image.fromarray(save).save(src / "scene.png")
    bench = tmp_path / "bench"
    assert make_benchmark.main(["--out", str(bench), "--source", str(src), "--betas", "1.0", "--airlights", "0.9"]) == 0
    cfg = make_config(tmp_path, "stage2", weights, tmp_path / "unused", tmp_path / "unused_out")
    work = tmp_path / "work"
    assert run_benchmark.main(["--bench", str(bench), "--work", str(work), "--methods", "hazy", f"tiny={cfg}"]) == 0
    table = (work / "benchmark.md").read_text()
    assert "| tiny | 1 |" in table
    assert (work / "tiny" / "scene_0.png").is_file()


def test_hazegen_fog_reference_drives_dynamic_prompts(tmp_path, weights, real_images):
    results = tmp_path / "hazy"
    cfg = make_config(tmp_path, "stage1", weights, real_images, results,
                      **{"inference.num_samples": 2, "inference.dynamic_prompt": True})
    proc = run_script("stage1", cfg)
    assert proc.returncode == 2 and "fog_reference_folder" in proc.stderr
    assert not results.exists()
    proc = run_script("stage1", cfg, "--set", f"inference.fog_reference_folder={real_images}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(results.glob("*_[01].png"))) == 4


def test_hazegen_with_fusion_loads_published_format_and_runs(tmp_path, weights, real_images):
    results = tmp_path / "hazy"
    cfg = make_config(tmp_path, "stage1", weights, real_images, results,
                      **{"model.cldm.params.controlnet_cfg.params.ycbcr_fusion": True})
    proc = run_script("stage1", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "new extension tensors keep their init" in proc.stderr
    assert sorted(p.name for p in results.iterdir()) == ["real_1_0.png", "real_4_0.png"]
