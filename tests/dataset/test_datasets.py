"""Stage-1 HybridTrainingData and stage-2 StaticPairedData: samples, pairing, seeding, start-up errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset import STAGE1_PROMPT, STAGE2_PROMPT, DataError, DegradationParams, HybridTrainingData, StaticPairedData
from dataset.checks import clean_name_for
from haze.scattering import rehaze

H, W, CROP = 80, 96, 64
HAZE_ONLY = DegradationParams(gamma_p=0.0, noise_p=0.0, jpeg_p=0.0)


def noise_u8(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_u8(height: int, width: int, phase: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(3 * x + phase), np.cos(2 * y + phase), np.sin(2 * x + 3 * y)]
    return np.round((np.stack(channels, axis=-1) * 0.4 + 0.5) * 255).astype(np.uint8)


def save(img_u8: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img_u8).save(path)
    return path


@pytest.fixture
def syn_folder(tmp_path: Path) -> Path:
    """rgb_500/img{0,1,2}.png (lossless noise) + depth_500 maps that are 1 (nearest) except one pixel."""
    root = tmp_path / "syn"
    for index in range(3):
        save(noise_u8(index), root / "rgb_500" / f"img{index}.png")
        depth = np.ones((H, W), dtype=np.float32)
        depth[0, 0] = 0.0
        (root / "depth_500").mkdir(parents=True, exist_ok=True)
        np.save(root / "depth_500" / f"img{index}.npy", depth)
    return root


@pytest.fixture
def real_folder(tmp_path: Path) -> Path:
    root = tmp_path / "real"
    for index in range(2):
        save(noise_u8(10 + index), root / f"real{index}.png")
    return root


def find_window(crop01: torch.Tensor, images01: list[torch.Tensor]) -> bool:
    """True if crop01 equals some crop-sized window of one of images01."""
    size = crop01.shape[-1]
    for image in images01:
        for top in range(image.shape[1] - size + 1):
            for left in range(image.shape[2] - size + 1):
                if torch.allclose(image[:, top:top + size, left:left + size], crop01, atol=1e-6):
                    return True
    return False


def to01(img_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img_u8).permute(2, 0, 1).float() / 255.0


def test_hybrid_synthetic_branch(syn_folder: Path, real_folder: Path) -> None:
    data = HybridTrainingData(syn_folder, real_folder, crop_size=CROP, p=1.0, seed=0, degradation=HAZE_ONLY)
    sample = data[1]
    assert set(sample) == {"target", "condition", "is_cond", "prompt", "hazy_ref", "transmission", "airlight"}
    for key in ("target", "condition", "hazy_ref"):
        assert sample[key].shape == (3, CROP, CROP) and sample[key].dtype == torch.float32
    assert sample["target"].min() >= -1 and sample["target"].max() <= 1 and sample["target"].min() < 0
    assert sample["condition"].min() >= 0 and sample["condition"].max() <= 1
    assert sample["is_cond"].dtype == torch.bool and bool(sample["is_cond"])
    assert sample["prompt"] == STAGE1_PROMPT == "hazy, foggy, misty, obscure, smoggy."
    torch.testing.assert_close(sample["hazy_ref"], (sample["target"] + 1) / 2)
    assert find_window(sample["condition"], [to01(noise_u8(1))])
    # depth 1 (nearest) everywhere but one pixel: t = 1, so the hazy crop equals the clean crop
    # there; a misaligned crop window would not.
    diff = (sample["hazy_ref"] - sample["condition"]).abs().amax(dim=0)
    assert (diff > 1e-6).sum() <= 1


def test_hybrid_synthetic_target_is_the_hazed_image(syn_folder: Path, real_folder: Path) -> None:
    for index in range(3):
        depth = np.zeros((H, W), dtype=np.float32)
        depth[0, 0] = 1.0
        np.save(syn_folder / "depth_500" / f"img{index}.npy", depth)
    data = HybridTrainingData(syn_folder, real_folder, crop_size=CROP, p=1.0, seed=0, degradation=HAZE_ONLY)
    for index in range(3):
        sample = data[index]
        assert find_window(sample["condition"], [to01(noise_u8(index))])
        # far everywhere: t = exp(-2 beta) <= exp(-0.6) scales the clean image's contrast
        assert sample["hazy_ref"].std() < 0.56 * sample["condition"].std()
        # the carried t and A are the degradation's: they re-make the target up to clipping and 8-bit rounding
        t, airlight = sample["transmission"], sample["airlight"]
        assert t.shape == (1, CROP, CROP) and airlight.shape == (3,)
        assert 0.049 < float(t.min()) and float(t.max()) <= 0.55
        remade = rehaze(sample["condition"][None], t[None], airlight[None])[0].clamp(0, 1)
        assert (remade - sample["hazy_ref"]).abs().max() <= 0.5 / 255 + 1e-6


def test_hybrid_real_branch(syn_folder: Path, real_folder: Path) -> None:
    data = HybridTrainingData(syn_folder, real_folder, crop_size=CROP, p=0.0, seed=0)
    reals = [to01(noise_u8(10)), to01(noise_u8(11))]
    for index in range(3):
        sample = data[index]
        assert not bool(sample["is_cond"])
        assert sample["condition"].shape == (3, CROP, CROP) and not sample["condition"].any()
        assert torch.equal(sample["transmission"], torch.ones(1, CROP, CROP)) and not sample["airlight"].any()
        assert find_window(sample["hazy_ref"], reals)
        torch.testing.assert_close(sample["target"], sample["hazy_ref"] * 2 - 1)


def test_hybrid_upscales_images_smaller_than_crop(syn_folder: Path, real_folder: Path) -> None:
    for p in (0.0, 1.0):
        sample = HybridTrainingData(syn_folder, real_folder, crop_size=128, p=p, seed=1)[0]
        assert sample["target"].shape == (3, 128, 128)
        assert sample["target"].min() >= -1 and sample["target"].max() <= 1
        assert sample["condition"].min() >= 0 and sample["condition"].max() <= 1


def test_hybrid_length_rule(syn_folder: Path, real_folder: Path) -> None:
    assert len(HybridTrainingData(syn_folder, real_folder, crop_size=CROP)) == 3
    assert len(HybridTrainingData(syn_folder, real_folder, crop_size=CROP, length=10)) == 10
    assert len(HybridTrainingData(None, real_folder, crop_size=CROP, p=0.0)) == 2
    with pytest.raises(ValueError, match="syn_folder"):
        HybridTrainingData(None, real_folder, p=0.3)


def test_hybrid_fixed_seed_reproduces_and_epoch_changes(syn_folder: Path, real_folder: Path) -> None:
    first = HybridTrainingData(syn_folder, real_folder, crop_size=CROP, p=0.5, seed=7, length=8)
    second = HybridTrainingData(syn_folder, real_folder, crop_size=CROP, p=0.5, seed=7, length=8)
    for index in range(8):
        torch.testing.assert_close(first[index]["target"], second[index]["target"])
    second.set_epoch(1)
    assert any(not torch.equal(first[i]["target"], second[i]["target"]) for i in range(8))


def test_hybrid_mixes_branches_near_p(syn_folder: Path, real_folder: Path) -> None:
    data = HybridTrainingData(syn_folder, real_folder, crop_size=16, p=0.3, seed=3, length=200)
    rate = np.mean([bool(data[index]["is_cond"]) for index in range(200)])
    assert 0.18 <= rate <= 0.42


def test_hybrid_unseeded_follows_torch_manual_seed(syn_folder: Path, real_folder: Path) -> None:
    data = HybridTrainingData(syn_folder, real_folder, crop_size=CROP, p=0.5)
    torch.manual_seed(123)
    first = [data[0]["target"] for _ in range(3)]
    torch.manual_seed(123)
    again = [data[0]["target"] for _ in range(3)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)
    assert not all(torch.equal(first[0], other) for other in first[1:])


def test_hybrid_batches_through_dataloader(syn_folder: Path, real_folder: Path) -> None:
    data = HybridTrainingData(syn_folder, real_folder, crop_size=CROP, p=0.5, seed=0, length=4)
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["target"].shape == (4, 3, CROP, CROP)
    assert batch["is_cond"].shape == (4,) and batch["is_cond"].dtype == torch.bool
    assert batch["prompt"] == [STAGE1_PROMPT] * 4


# ---- start-up errors name the offending path ------------------------------------------------------

def assert_names(excinfo: pytest.ExceptionInfo, path: Path) -> None:
    assert excinfo.value.path == path
    assert str(path) in str(excinfo.value)


def test_missing_and_empty_folders_are_named(tmp_path: Path, syn_folder: Path, real_folder: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as excinfo:
        HybridTrainingData(missing, real_folder)
    assert_names(excinfo, missing)
    with pytest.raises(DataError) as excinfo:
        HybridTrainingData(syn_folder, missing)
    assert_names(excinfo, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as excinfo:
        HybridTrainingData(syn_folder, empty)
    assert_names(excinfo, empty)
    with pytest.raises(DataError) as excinfo:
        HybridTrainingData(empty, real_folder)
    assert_names(excinfo, empty / "rgb_500")


def test_clean_image_without_depth_is_named(syn_folder: Path, real_folder: Path) -> None:
    (syn_folder / "depth_500" / "img1.npy").unlink()
    with pytest.raises(DataError) as excinfo:
        HybridTrainingData(syn_folder, real_folder)
    assert_names(excinfo, syn_folder / "depth_500" / "img1.npy")
    assert "img1.png" in str(excinfo.value)


@pytest.mark.parametrize("bad_depth", [np.ones((H, W + 1), np.float32), np.array([{"a": 1}], dtype=object)])
def test_bad_depth_map_is_named(syn_folder: Path, real_folder: Path, bad_depth: np.ndarray) -> None:
    depth_path = syn_folder / "depth_500" / "img2.npy"
    np.save(depth_path, bad_depth, allow_pickle=True)
    with pytest.raises(DataError) as excinfo:
        HybridTrainingData(syn_folder, real_folder)
    assert_names(excinfo, depth_path)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_image_is_named(syn_folder: Path, real_folder: Path, content: object) -> None:
    bad = real_folder / "real1.png"
    data = bad.read_bytes()[:200] if content == "truncated" else content
    bad.write_bytes(data)
    with pytest.raises(DataError) as excinfo:
        HybridTrainingData(syn_folder, real_folder)
    assert_names(excinfo, bad)


# ---- stage 2 ----------------------------------------------------------------------------------------

def test_clean_name_rule() -> None:
    assert clean_name_for(Path("a_0.png")) == "a"
    assert clean_name_for(Path("my_scene_12.png")) == "my_scene"
    assert clean_name_for(Path("solo.png")) == "solo"
    assert clean_name_for(Path("my_scene.png")) == "my_scene"


def make_pairs(tmp_path: Path, clean_scale: int = 1) -> tuple[Path, Path]:
    """Smooth clean PNGs (clean_scale times the hazy size) and hazy '<name>_<k>.png' = 0.5 * clean + 0.25."""
    hazy_dir, clean_dir = tmp_path / "hazy", tmp_path / "clean"
    for phase, name in enumerate(("a", "my_scene", "b")):
        save(smooth_u8(H * clean_scale, W * clean_scale, phase), clean_dir / f"{name}.png")
        hazy = np.round(smooth_u8(H, W, phase) * 0.5 + 64).astype(np.uint8)
        for k in (0, 1):
            save(hazy, hazy_dir / f"{name}_{k}.png")
    return hazy_dir, clean_dir


def test_static_pairs_follow_naming_rule(tmp_path: Path) -> None:
    hazy_dir, clean_dir = tmp_path / "hazy", tmp_path / "clean"
    for name in ("a_0", "a_1", "my_scene_3", "solo"):
        save(noise_u8(0), hazy_dir / f"{name}.png")
    save(noise_u8(1), clean_dir / "a.jpg")
    save(noise_u8(1), clean_dir / "a.png")
    save(noise_u8(2), clean_dir / "my_scene.jpeg")
    save(noise_u8(3), clean_dir / "solo.png")
    data = StaticPairedData(hazy_dir, clean_dir, crop_size=CROP)
    pairs = {hazy.name: clean.name for hazy, clean in data.pairs}
    assert pairs == {"a_0.png": "a.jpg", "a_1.png": "a.jpg", "my_scene_3.png": "my_scene.jpeg",
                     "solo.png": "solo.png"}
    assert len(data) == 4


def test_static_sample_keys_ranges_and_prompt(tmp_path: Path) -> None:
    hazy_dir, clean_dir = make_pairs(tmp_path)
    sample = StaticPairedData(hazy_dir, clean_dir, crop_size=CROP, seed=0)[2]
    assert set(sample) == {"target", "condition", "is_cond", "prompt", "hazy_ref"}
    assert sample["target"].shape == sample["condition"].shape == (3, CROP, CROP)
    assert sample["target"].min() >= -1 and sample["target"].max() <= 1 and sample["target"].min() < 0
    assert sample["condition"].min() >= 0 and sample["condition"].max() <= 1
    assert bool(sample["is_cond"]) and sample["is_cond"].dtype == torch.bool
    torch.testing.assert_close(sample["hazy_ref"], sample["condition"])
    assert sample["prompt"] == STAGE2_PROMPT
    assert STAGE2_PROMPT.startswith("sharp, clear-sky, vivid, well-defined, brightly lit")
    assert STAGE2_PROMPT.endswith("high visual clarity, refreshing openness")


@pytest.mark.parametrize("clean_scale", [1, 2])
def test_static_crop_is_shared_and_sizes_are_matched(tmp_path: Path, clean_scale: int) -> None:
    hazy_dir, clean_dir = make_pairs(tmp_path, clean_scale)
    data = StaticPairedData(hazy_dir, clean_dir, crop_size=CROP, jpeg_p=0.0, seed=4)
    for index in range(len(data)):
        sample = data[index]
        clean01 = (sample["target"] + 1) / 2
        err = (sample["condition"] - (clean01 * 0.5 + 0.25)).abs()
        if clean_scale == 1:  # exact up to 8-bit rounding; a misaligned window gives ~0.03 mean error
            assert err.max() <= 1.0 / 255, (index, err.max())
        else:
            assert err.mean() <= 0.005, (index, err.mean())


def test_static_jpeg_branch_changes_only_the_condition(tmp_path: Path) -> None:
    hazy_dir, clean_dir = make_pairs(tmp_path)
    plain = StaticPairedData(hazy_dir, clean_dir, crop_size=CROP, jpeg_p=0.0, seed=9)[0]
    jpeg = StaticPairedData(hazy_dir, clean_dir, crop_size=CROP, jpeg_p=1.0, seed=9)[0]
    torch.testing.assert_close(plain["target"], jpeg["target"])
    diff = (plain["condition"] - jpeg["condition"]).abs()
    assert 0 < diff.mean() < 0.05
    torch.testing.assert_close(jpeg["condition"] * 255, (jpeg["condition"] * 255).round(), atol=1e-4, rtol=0)


def test_hazy_without_clean_is_named(tmp_path: Path) -> None:
    hazy_dir, clean_dir = make_pairs(tmp_path)
    orphan = save(noise_u8(0), hazy_dir / "zz_0.png")
    with pytest.raises(DataError) as excinfo:
        StaticPairedData(hazy_dir, clean_dir)
    assert_names(excinfo, orphan)


def test_static_missing_empty_and_unreadable_are_named(tmp_path: Path) -> None:
    hazy_dir, clean_dir = make_pairs(tmp_path)
    with pytest.raises(DataError) as excinfo:
        StaticPairedData(hazy_dir, tmp_path / "missing")
    assert_names(excinfo, tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as excinfo:
        StaticPairedData(empty, clean_dir)
    assert_names(excinfo, empty)
    (clean_dir / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as excinfo:
        StaticPairedData(hazy_dir, clean_dir)
    assert_names(excinfo, clean_dir / "b.png")


def test_make_synthetic_set_output_feeds_hybrid_data(tmp_path: Path, real_folder: Path) -> None:
    from tools.make_synthetic_set import main

    clean_in = tmp_path / "clean_in"
    save(smooth_u8(60, 90), clean_in / "wide.png")
    save(smooth_u8(100, 70, 1.0), clean_in / "tall.jpg")
    (clean_in / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "synset"
    assert main(["--input", str(clean_in), "--out", str(out), "--size", "64"]) == 0
    assert sorted(p.name for p in (out / "rgb_500").iterdir()) == ["tall.jpg", "wide.jpg"]
    depth = np.load(out / "depth_500" / "wide.npy", allow_pickle=False)
    assert depth.dtype == np.float32 and depth.shape == (64, 96)
    assert depth.min() == 0.0 and depth.max() == pytest.approx(1.0)
    with Image.open(out / "rgb_500" / "tall.jpg") as img:
        assert img.size == (64, 91)
    sample = HybridTrainingData(out, real_folder, crop_size=48, p=1.0, seed=0)[0]
    assert sample["target"].shape == (3, 48, 48) and bool(sample["is_cond"])
