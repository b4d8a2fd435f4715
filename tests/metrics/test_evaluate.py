"""evaluate.py: pairing rule, numbers written to CSV/JSON/Markdown, and bad-input handling."""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from metrics import evaluation
from utils.image_io import save_png01

OFFSET = 25 / 255  # exactly representable in 8 bits


def _ref_image(seed: int, h: int = 24, w: int = 32) -> torch.Tensor:
    """(3,H,W) in [0.2, 0.6] on the 8-bit grid, so +OFFSET stays in range and exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.round((0.2 + 0.4 * torch.rand(3, h, w, generator=g)) * 255) / 255


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["image"]: row for row in csv.DictReader(fh)}


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    refs, res = tmp_path / "refs", tmp_path / "results"
    a, b, d = _ref_image(0), _ref_image(1), _ref_image(2)
    save_png01(a, refs / "a.png")
    save_png01(b, refs / "b.png")
    save_png01(d, refs / "d.png")
    save_png01(a + OFFSET, res / "a.png")                       # PSNR = 20 log10(255 / 25)
    save_png01(b, res / "b_3.png")                              # HazeGen name -> reference b; identical
    save_png01(_ref_image(3), res / "c.png")                    # no reference
    save_png01(d.repeat_interleave(2, 1).repeat_interleave(2, 2), res / "d.png")  # 2x larger than its reference
    save_png01(a, res / "a_estimate.png")                       # AccSamp intermediate
    (res / "notes.txt").write_text("not an image")
    return res, refs


def test_reference_for_matching_rule() -> None:
    refs = {"foo": Path("foo.png"), "bar_2": Path("bar_2.png")}
    assert evaluation.reference_for("foo", refs) == Path("foo.png")
    assert evaluation.reference_for("foo_12", refs) == Path("foo.png")
    assert evaluation.reference_for("bar_2", refs) == Path("bar_2.png")      # exact stem wins
    assert evaluation.reference_for("foo_x", refs) is None
    assert evaluation.reference_for("baz_1", refs) is None


def test_evaluate_writes_numbers_and_notes(folders: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    res, refs = folders
    out = tmp_path / "eval"
    assert evaluate.main(["--results", str(res), "--references", str(refs), "--out", str(out), "--quiet"]) == 0
    rows = _read_csv(out / "per_image.csv")
    assert set(rows) == {"a.png", "b_3.png", "d.png"}
    assert float(rows["a.png"]["psnr"]) == pytest.approx(20 * math.log10(255 / 25), abs=1e-5)
    assert rows["b_3.png"]["reference"] == "b.png"
    assert rows["b_3.png"]["psnr"] == "inf" and float(rows["b_3.png"]["ssim"]) == pytest.approx(1.0, abs=1e-6)
    assert float(rows["b_3.png"]["deltae00"]) == 0.0
    assert rows["d.png"]["resized_from"] == "64x48" and rows["a.png"]["resized_from"] == ""   # W x H

    doc = json.loads((out / "summary.json").read_text())
    assert doc["missing_reference"] == ["c.png"]
    assert {s["file"] for s in doc["skipped"]} == {"notes.txt", "a_estimate.png"}
    assert doc["summary"]["psnr"]["n"] == 2 and doc["summary"]["psnr"]["n_nonfinite"] == 1
    assert doc["summary"]["ssim"]["n"] == 3
    ssims = [float(rows[k]["ssim"]) for k in ("a.png", "b_3.png", "d.png")]
    assert doc["summary"]["ssim"]["mean"] == pytest.approx(sum(ssims) / 3, abs=1e-6)
    assert "11x11 Gaussian window sigma 1.5, K1=0.01, K2=0.03" in doc["settings"]["ssim"]
    assert "bicubic" in doc["settings"]["size_mismatch"]
    md = (out / "summary.md").read_text()
    assert "c.png" in md and "notes.txt" in md and "d.png (was 64x48, W x H)" in md
    assert "| SSIM ↑ |" in capsys.readouterr().out


def test_strict_size_is_an_error(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, refs = folders
    out = tmp_path / "eval"
    assert evaluate.main(["--results", str(res), "--references", str(refs), "--out", str(out),
                          "--strict-size", "--quiet"]) == 2
    with pytest.raises(evaluation.SizeMismatchError, match="d.png is 64x48 but its reference d.png is 32x24"):
        evaluation.evaluate_folders(res, refs, strict_size=True)
    assert not out.exists()


def test_unreadable_image_is_reported_and_fails_the_run(folders: tuple[Path, Path], tmp_path: Path) -> None:
    res, refs = folders
    (res / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    save_png01(_ref_image(4), refs / "e.png")
    out = tmp_path / "eval"
    assert evaluate.main(["--results", str(res), "--references", str(refs), "--out", str(out), "--quiet"]) == 1
    doc = json.loads((out / "summary.json").read_text())
    assert [f["file"] for f in doc["failed"]] == ["e.png"]
    assert len(doc["per_image"]) == 3


def test_no_reference_metrics_and_default_out(tmp_path: Path) -> None:
    """Without references the offline no-reference metrics are computed; a metric undefined for an image
    (NIQE needs two 96x96 blocks) is NaN with a note naming the size as W x H, not a failure."""
    pytest.importorskip("pyfade")
    res = tmp_path / "results"
    g = torch.Generator().manual_seed(5)
    save_png01(torch.rand(3, 96, 192, generator=g), res / "big.png")
    save_png01(torch.rand(3, 40, 48, generator=g), res / "small.png")
    assert evaluate.main(["--results", str(res), "--quiet"]) == 0
    out = tmp_path / "results_eval"
    rows = _read_csv(out / "per_image.csv")
    assert math.isfinite(float(rows["big.png"]["niqe_hcdyc"]))
    assert math.isfinite(float(rows["small.png"]["brisque_svr"])) and math.isfinite(float(rows["small.png"]["fade"]))
    assert rows["small.png"]["niqe_hcdyc"] == "nan" and "image is 48x40 (WxH)" in rows["small.png"]["note"]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["metrics"] == ["fade", "niqe_hcdyc", "brisque_svr"] and doc["summary"]["niqe_hcdyc"]["n"] == 1
    assert "pristine" in doc["settings"]["niqe_hcdyc"] and "brisque 0.2.0" in doc["settings"]["brisque_svr"]


def test_bad_arguments(tmp_path: Path) -> None:
    res = tmp_path / "results"
    res.mkdir()
    assert evaluate.main(["--results", str(res), "--references", str(tmp_path / "nope"), "--quiet"]) == 2
    assert evaluate.main(["--results", str(res), "--references", str(res), "--out", str(res), "--quiet"]) == 2
    with pytest.raises(ValueError, match="unknown no-reference"):
        evaluation.evaluate_folders(res, None, ["piqe"])


def test_size_messages_are_width_by_height(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """d.png is 64 wide and 48 high: the CSV, the summary and the --strict-size error all say 64x48."""
    res, refs = folders
    out = tmp_path / "eval"
    assert evaluate.main(["--results", str(res), "--references", str(refs), "--out", str(out), "--quiet"]) == 0
    assert _read_csv(out / "per_image.csv")["d.png"]["resized_from"] == "64x48"
    with pytest.raises(evaluation.SizeMismatchError, match="d.png is 64x48"):
        evaluation.evaluate_folders(res, refs, strict_size=True)


def test_grayscale_and_alpha_conversions_are_noted_in_the_csv(tmp_path: Path) -> None:
    res, refs = tmp_path / "res", tmp_path / "refs"
    ref = _ref_image(6)
    save_png01(ref, refs / "g.png")
    save_png01(ref, refs / "r.png")
    res.mkdir()
    arr = (ref.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr[..., 0], mode="L").save(res / "g.png")
    Image.fromarray(np.dstack([arr, np.full(arr.shape[:2], 9, np.uint8)]), mode="RGBA").save(res / "r.png")
    out = tmp_path / "eval"
    assert evaluate.main(["--results", str(res), "--references", str(refs), "--out", str(out), "--quiet"]) == 0
    rows = _read_csv(out / "per_image.csv")
    assert rows["g.png"]["converted"] == "grayscale->RGB" and rows["r.png"]["converted"] == "alpha dropped"
    assert rows["r.png"]["psnr"] == "inf"                      # alpha dropped, not composited
    assert "- g.png: grayscale->RGB" in (out / "summary.md").read_text()


def test_empty_folder_warns_why_and_exits_1(tmp_path: Path, caplog) -> None:
    res = tmp_path / "res"
    res.mkdir()
    (res / "readme.txt").write_text("no images here")
    with caplog.at_level(logging.INFO):
        assert evaluate.main(["--results", str(res), "--quiet"]) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no images to evaluate" in warnings[0] and "1 other file(s) skipped" in warnings[0]


def test_results_pointing_at_a_file_says_so(tmp_path: Path, caplog) -> None:
    file = tmp_path / "a.png"
    save_png01(_ref_image(7), file)
    with caplog.at_level(logging.ERROR):
        assert evaluate.main(["--results", str(file), "--out", str(tmp_path / "eval"), "--quiet"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"--results must be a folder of images, got a file: {file}"]


def test_sixteen_bit_pairs_are_compared_at_full_precision(tmp_path: Path) -> None:
    """A 16-bit result that differs from its 16-bit reference by 64/65535 everywhere (below one 8-bit step): PSNR =
    20 log10(65535 / 64) at full precision; read at 8 bits the pair would mostly be identical."""
    import cv2

    ramp = np.round(np.linspace(2000, 60000, 256)).astype(np.uint16)
    ref = np.stack([np.tile(ramp, (24, 1))] * 3, -1)
    res = ref + np.uint16(64)
    (tmp_path / "refs").mkdir()
    (tmp_path / "res").mkdir()
    cv2.imwrite(str(tmp_path / "refs" / "g.png"), ref)
    cv2.imwrite(str(tmp_path / "res" / "g.png"), res)
    out = tmp_path / "eval"
    assert evaluate.main(["--results", str(tmp_path / "res"), "--references", str(tmp_path / "refs"), "--out",
                          str(out), "--quiet"]) == 0
    row = _read_csv(out / "per_image.csv")["g.png"]
    assert float(row["psnr"]) == pytest.approx(20 * math.log10(65535 / 64), abs=1e-3)
    assert row["converted"] == "16-bit RGB (full precision)"
