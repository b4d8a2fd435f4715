"""Fixtures shared by the test folders, and the markers of the suite.

Markers (registered in pytest.ini): ``slow`` (end-to-end runs of the scripts, real trainings, full-size metric
networks: seconds to minutes each), ``multiprocess`` (starts several processes with ``accelerate launch``),
``browser`` (drives the system Chromium). ``python -m pytest -m "not slow"`` is the inner loop; CI runs everything.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import REAL_HAZY_SMALL, write_tiny_release_weights


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    """(sd.ckpt, controlnet.pt) of the tiny model with random non-zero weights, in the release formats."""
    return write_tiny_release_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def real_images(tmp_path_factory) -> Path:
    """A folder holding the two downscaled real hazy photos of ``tests/data/real_hazy`` (one RGBA, one RGB)."""
    folder = tmp_path_factory.mktemp("real_hazy")
    for src in sorted(REAL_HAZY_SMALL.glob("*.png")):
        shutil.copy(src, folder / src.name)
    return folder
