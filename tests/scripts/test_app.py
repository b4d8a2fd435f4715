"""The local dehazing page (app.py): its back end on the tiny model, and the page itself driven from headless
Chromium — a real hazy photo dehazed with AccSamp must come back as the script's output file, byte for byte.

Needs requirements-app.txt and Chromium + chromedriver (CI installs both; set HCDYC_REQUIRE_BROWSER=1 to fail
instead of skip when they are missing)."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.app_browser import Page, browser_paths, chromium, start_app
from tests.helpers import ROOT, build_tiny, randomize_, tiny_config, write_release_checkpoints

REQUIRED = os.environ.get("HCDYC_REQUIRE_BROWSER") == "1"
# ../shared relative to the repo root (HCDYC_SHARED points elsewhere, e.g. from a git worktree)
REAL_HAZY = Path(os.environ.get("HCDYC_SHARED", ROOT.parent / "shared")) / "data" / "real_hazy"
PHOTO = "real_1.png"


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (HCDYC_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def _require_module(name: str):
    try:
        return __import__(name)
    except ImportError:
        _missing(f"{name} not installed (pip install -r requirements-app.txt)")


@pytest.fixture(scope="module")
def app_config(tmp_path_factory) -> Path:
    """A tiny random-init model in the release formats, and an AccSamp config for it (4 steps, CPU)."""
    folder = tmp_path_factory.mktemp("app")
    model = build_tiny(seed=31)
    randomize_(model.unet, seed=32, std=0.02)
    randomize_(model.controlnet, seed=33, std=0.02)
    sd_path, cn_path = write_release_checkpoints(model, folder / "weights")
    cfg = tiny_config("configs/inference/stage2_accsamp.yaml", **{
        "inference.sd_path": sd_path, "inference.controlnet_path": cn_path, "inference.steps": 4,
        "inference.device": "cpu", "inference.min_short_side": 64, "inference.image_folder": folder / "in",
        "inference.result_folder": folder / "out"})
    path = folder / "accsamp.yaml"
    OmegaConf.save(cfg, path)
    return path


def _script_output(config: Path, photo: Path, work: Path, *sets: str) -> Path:
    """Run inference_accsamp.py on a folder holding only ``photo``; the path of its result for it."""
    images, results = work / "script_in", work / "script_out"
    images.mkdir()
    shutil.copy(photo, images / photo.name)
    proc = subprocess.run([sys.executable, "inference_accsamp.py", "--config", str(config), "--set",
                           f"inference.image_folder={images}", f"inference.result_folder={results}",
                           "inference.save_intermediates=True", *sets],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def dehazer(app_config, tmp_path_factory):
    """app.Dehazer over the modes of configs/app/modes.yaml with the tiny AccSamp config."""
    _require_module("gradio")
    import app
    from pipelines.modes import RunnerCache, load_modes

    cfg = OmegaConf.load(app_config)
    return app.Dehazer(load_modes(ROOT / "configs" / "app" / "modes.yaml", cfg, ROOT), RunnerCache(),
                       tmp_path_factory.mktemp("runs"), max_pixels=2048 * 2048)


def _hazy_photo() -> Path:
    photo = REAL_HAZY / PHOTO
    if not photo.is_file():
        pytest.skip(f"{photo} not found: the shared data folder (../shared relative to the repo root) is missing")
    return photo


@pytest.fixture
def small_photo(tmp_path) -> Path:
    """A 128x96 crop of a real hazy photo (keeps the back-end tests fast; FADE is defined on it)."""
    path = tmp_path / "small.png"
    with Image.open(ROOT / "tests" / "data" / "real_hazy" / "real_4.png") as im:
        im.convert("RGB").crop((0, 0, 128, 96)).save(path)
    return path


def test_header_names_only_the_controls_of_the_mode(dehazer):
    import app

    accsamp, dcp = dehazer.modes["AccSamp"], dehazer.modes["DCP baseline"]
    assert "adjust τ, ω, guidance, steps, seed, and run" in app.header_text(accsamp)
    assert "τ" not in app.header_text(dcp) and "ω" not in app.header_text(dcp)
    assert app.CLEARED == (None, [], None)


@pytest.mark.slow
def test_backend_run_reports_every_step_and_cancel_stops_at_the_next(dehazer, small_photo):
    import app
    from utils.image_io import load_rgb01

    photo = small_photo
    seen = []
    info = dehazer.run(str(photo), "AccSamp", {"steps": 10, "seed": 3}, "s1", lambda k, n: seen.append((k, n)))
    # AccSamp with tau 0.8, omega 0.6 over 10 steps runs steps 1..2 (phase 1) and 5..10 (phase 2), 1-based.
    assert seen == [(k, 10) for k in (1, 2, 5, 6, 7, 8, 9, 10)]
    assert [caption for _, caption in info["extras"]][:2] == ["estimate", "transmission"]
    with Image.open(info["result"]) as out, Image.open(photo) as src:
        assert out.size == src.size
    if app.fade_available():  # FADE of the input and of the PNG the page offers, as evaluate.py computes it
        from metrics.iqa import fade_score

        expected = [fade_score(load_rgb01(photo))[0], fade_score(load_rgb01(info["result"]))[0]]
        assert info["fade"] == expected and all(math.isfinite(v) for v in expected)
        assert [caption for _, caption in info["extras"]][2:] == [f"FADE density, input ({expected[0]:.3f})",
                                                                   f"FADE density, result ({expected[1]:.3f})"]
        for path, _ in info["extras"][2:]:
            with Image.open(path) as density:
                assert density.size[0] == out.size[0] // 8 * 8

    def cancel_after_two(k: int, n: int) -> None:
        if k == 2:
            dehazer.flag("s1").set()

    with pytest.raises(app.RunCancelled, match="step 5 of 10"):
        dehazer.run(str(photo), "AccSamp", {"steps": 10}, "s1", cancel_after_two)
    # the flag is per run: the next run of the session is not cancelled
    again = dehazer.run(str(photo), "AccSamp", {"steps": 2, "tau": 0.5}, "s1", lambda k, n: None)
    assert Path(again["result"]).is_file()


def test_backend_dcp_mode_needs_no_model_and_reports_bad_files(dehazer, small_photo, tmp_path):
    photo = small_photo
    info = dehazer.run(str(photo), "DCP baseline", {"seed": 5}, "s2", lambda k, n: None)
    assert [caption for _, caption in info["extras"]][:1] == ["transmission"]
    assert "_seed" not in Path(info["result"]).name  # DCP has no seed control
    from utils.image_io import ImageReadError

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="not a recognised image format"):
        dehazer.run(str(tmp_path / "notes.png"), "DCP baseline", {}, "s2", lambda k, n: None)
    data = photo.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        dehazer.run(str(tmp_path / "cut.png"), "DCP baseline", {}, "s2", lambda k, n: None)
    dehazer.max_pixels = 1000
    try:
        with pytest.raises(ImageReadError, match="above the limit of 1000 pixels"):
            dehazer.run(str(photo), "DCP baseline", {}, "s2", lambda k, n: None)
    finally:
        dehazer.max_pixels = 2048 * 2048


@pytest.mark.slow
@pytest.mark.browser
def test_page_in_chromium_equals_script_output_and_survives_a_bad_upload(app_config, tmp_path):
    photo = _hazy_photo()
    _require_module("gradio")
    _require_module("selenium")
    if browser_paths() is None:
        _missing("Chromium and chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    proc, url = start_app(app_config, tmp_path / "app.log")
    driver = None
    try:
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        driver = chromium(tmp_path / "profile", downloads)
        page = Page(driver, url)
        bad = tmp_path / "notes.png"
        bad.write_text("this is not an image")
        assert page.upload(bad).startswith("Error: notes.png: not a recognised image format")
        with Image.open(photo) as im:
            assert page.upload(photo) == f"Loaded {PHOTO} ({im.width}x{im.height})."
        page.set_number("seed", 7)
        status = page.run()
        assert status.startswith("Done: AccSamp (tau 0.8, omega 0.6, guidance 0.1, steps 4, seed 7) in "), status
        page.wait_images("#compare", 2)
        page.wait_images("#extras", 2)
        screenshot = tmp_path / "app_after_run.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get("HCDYC_APP_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["HCDYC_APP_SCREENSHOT"])
        downloaded = page.download(downloads)
        page.set_number("seed", 10**20)  # beyond torch's 64-bit seeds: the run fails
        status = page.run()
        assert status.startswith("Error: "), status
        page.wait_images("#compare", 0, most=True)  # the earlier result is cleared, not left on screen
        assert proc.poll() is None, "the server stopped"
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=60)
    results = _script_output(app_config, photo, tmp_path, "inference.seed=7")
    assert downloaded.read_bytes() == (results / PHOTO).read_bytes()
