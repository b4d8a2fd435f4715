"""The folder loop and 16-bit inputs: read at full precision, written as 8-bit PNGs, said once per run."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
from PIL import Image

from pipelines import dcp as dcp_pipeline
from tests.helpers import ROOT, sixteen_bit_gradient, write_png16
from utils.common import load_config


def test_sixteen_bit_inputs_are_said_once_and_written_as_8_bit(tmp_path, caplog):
    images, out = tmp_path / "in", tmp_path / "out"
    images.mkdir()
    for name in ("a", "b"):
        write_png16(images / f"{name}.png", sixteen_bit_gradient(64)[:, :, :] // np.uint16(1 if name == "a" else 2))
    cfg = load_config(ROOT / "configs" / "inference" / "dcp.yaml",
                      [f"inference.image_folder={images}", f"inference.result_folder={out}", "inference.device=cpu"])
    caplog.set_level(logging.INFO)
    status = dcp_pipeline.run(cfg, dcp_pipeline.InferenceSettings.from_config(cfg), SimpleNamespace(skip_existing=False))
    assert status == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["2 input(s) have 16 bits per channel (e.g. a.png): they are read at full precision, the "
                        "results are written as 8-bit PNGs"]
    with Image.open(out / "a.png") as img:
        assert img.mode == "RGB" and img.tile[0][3] == "RGB"
