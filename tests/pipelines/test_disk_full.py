"""Disk full while an inference script writes its results: the image whose write fails is reported by name, the
others are written, no partial or temporary file is left, and an earlier result of that image stays as it was."""
from __future__ import annotations

import errno
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipelines import dcp as dcp_pipeline
from pipelines import folder as folder_module
from tests.helpers import ROOT
from utils.common import load_config
from utils.image_io import save_png01

pytestmark = pytest.mark.faults


def test_disk_full_fails_one_image_keeps_the_rest_and_the_old_result(tmp_path, monkeypatch, caplog):
    images, out = tmp_path / "in", tmp_path / "out"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"{name}.png")
    out.mkdir()
    (out / "b.png").write_bytes(b"earlier result")

    def full_on_b(img01, path):
        if path.name == "b.png":
            def partial(handle):
                handle.write(b"half a png")
                raise OSError(errno.ENOSPC, "No space left on device")
            from utils.atomic import atomic_write
            atomic_write(path, partial)
        save_png01(img01, path)

    monkeypatch.setattr(folder_module, "save_png01", full_on_b)
    cfg = load_config(ROOT / "configs" / "inference" / "dcp.yaml",
                      [f"inference.image_folder={images}", f"inference.result_folder={out}", "inference.device=cpu"])
    settings = dcp_pipeline.InferenceSettings.from_config(cfg)
    status = dcp_pipeline.run(cfg, settings, SimpleNamespace(skip_existing=False))
    assert status == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]  # no temp file left
    assert (out / "b.png").read_bytes() == b"earlier result"
    assert "1 failed" in caplog.text and "b.png: [Errno 28] No space left on device" in caplog.text
    failures = [r for r in caplog.records if "b.png" in r.getMessage() and r.levelno >= logging.WARNING]
    assert failures
