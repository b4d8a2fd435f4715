import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from tests.helpers import sixteen_bit_gradient, write_png16
from utils.image_io import (
    IMAGE_EXTS,
    ImageReadError,
    conversion_note,
    list_images,
    load_rgb01,
    pil_to_tensor01,
    resize01,
    save_png01,
    sixteen_bit,
    tensor01_to_pil,
)


def _rgb_array(h: int = 6, w: int = 5) -> np.ndarray:
    return (np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3) * 7 % 256).astype(np.uint8)


def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.jpeg", "d.txt", ".hidden.png", "e.bmp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.jpeg"]
    assert IMAGE_EXTS == (".png", ".jpg", ".jpeg")


def test_list_images_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")


def test_rgb_png_roundtrip_exact(tmp_path: Path) -> None:
    arr = _rgb_array()
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = load_rgb01(tmp_path / "x.png")
    assert img.shape == (3, 6, 5) and img.dtype == torch.float32
    assert torch.equal(img, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    save_png01(img, tmp_path / "y.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "y.png")), arr)


def test_sixteen_bit_png_scaled_by_65535(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
    img = load_rgb01(tmp_path / "g16.png")
    expected = torch.from_numpy(arr.astype(np.float32) / 65535.0)
    assert img.shape == (3, 2, 2)
    for c in range(3):
        assert torch.allclose(img[c], expected, atol=1e-7)


def test_sixteen_bit_colour_png_keeps_full_precision(tmp_path: Path) -> None:
    """A 16-bit RGB gradient reads as value / 65535 exactly; Pillow's own decode (what was used before) quantises it
    to 8 bits, an error of up to ~1/510 that this test can measure."""
    rgb = sixteen_bit_gradient()
    path = write_png16(tmp_path / "g16.png", rgb)
    img = load_rgb01(path)
    expected = torch.from_numpy(rgb.astype(np.float32) / 65535.0).permute(2, 0, 1)
    assert img.shape == (3, 8, 1024) and (img - expected).abs().max() < 1e-6
    with Image.open(path) as im:
        eight_bit = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert (eight_bit - expected).abs().max() > 1e-3
    assert sixteen_bit(path) and not sixteen_bit(save_and_return(tmp_path / "e8.png"))
    assert conversion_note(path) == "16-bit RGB (full precision)"


def save_and_return(path: Path) -> Path:
    save_png01(torch.rand(3, 4, 4), path)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_modes_converted_to_rgb(tmp_path: Path, mode: str) -> None:
    src = Image.fromarray(_rgb_array()).convert(mode)
    path = tmp_path / ("m.jpg" if mode == "CMYK" else "m.png")
    src.save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
        expected = pil_to_tensor01(stored.convert("RGB"))
    img = load_rgb01(path)
    assert img.shape == (3, 6, 5)
    assert torch.equal(img, expected)
    if mode != "CMYK":
        assert torch.equal(img, pil_to_tensor01(src.convert("RGB")))


def test_rgba_alpha_dropped_not_composited(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 0
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    img = load_rgb01(tmp_path / "a.png")
    assert torch.allclose(img[0], torch.full((2, 2), 200 / 255))
    assert torch.equal(img[1:], torch.zeros(2, 2, 2))


def test_one_pixel_image(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (255, 0, 51)).save(tmp_path / "p.png")
    img = load_rgb01(tmp_path / "p.png")
    assert torch.allclose(img.flatten(), torch.tensor([1.0, 0.0, 0.2]))


def test_non_image_raises_with_path(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(ImageReadError) as info:
        load_rgb01(bad)
    assert info.value.path == bad and "notes.png" in str(info.value)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        load_rgb01(tmp_path / "missing.jpg")


@pytest.mark.faults
def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "f.jpg", quality=95)
    data = (tmp_path / "f.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageReadError, match="t.jpg"):
        load_rgb01(tmp_path / "t.jpg")


def test_save_clamps_rounds_and_leaves_no_temp(tmp_path: Path) -> None:
    img = torch.tensor([-0.5, 0.5 / 255 + 1e-4, 1.7]).view(3, 1, 1)
    out = tmp_path / "deep" / "o.png"
    save_png01(img, out)
    assert np.asarray(Image.open(out)).reshape(3).tolist() == [0, 1, 255]
    assert os.listdir(out.parent) == ["o.png"]


@pytest.mark.faults
def test_save_failure_keeps_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    save_png01(torch.zeros(3, 2, 2), out)
    before = out.read_bytes()
    with pytest.raises(ValueError):
        save_png01(torch.full((3, 2, 2), float("nan")), out)
    with pytest.raises(ValueError):
        save_png01(torch.zeros(4, 2, 2), out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["o.png"]


def test_tensor01_to_pil_roundtrip() -> None:
    img = torch.from_numpy(_rgb_array()).permute(2, 0, 1).float() / 255
    assert torch.equal(pil_to_tensor01(tensor01_to_pil(img)), img)


def test_resize01_matches_interpolate_and_keeps_constants() -> None:
    x = torch.rand(2, 3, 40, 30)
    y = resize01(x, (17, 23))
    ref = torch.nn.functional.interpolate(x, size=(17, 23), mode="bicubic", antialias=True, align_corners=False)
    assert y.shape == (2, 3, 17, 23) and torch.equal(y, ref)
    const = torch.full((1, 3, 40, 30), 0.3)
    assert torch.allclose(resize01(const, (10, 7)), torch.full((1, 3, 10, 7), 0.3), atol=1e-6)
    with pytest.raises(ValueError):
        resize01(x[0], (10, 10))


def test_resize01_not_clamped() -> None:
    x = torch.zeros(1, 3, 8, 8)
    x[..., 4:] = 1.0
    y = resize01(x, (8, 32))
    assert y.max() > 1.0 and y.min() < 0.0
