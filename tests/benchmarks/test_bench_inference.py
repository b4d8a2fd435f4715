"""bench_inference times the inference scripts' whole per-image path (run_folder + the script's batch function on the
loaded model): checked on the tiny model, where it must read the input PNG and write the scripts' output file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.bench_inference import Bench, Row, make_rows
from tests.helpers import tiny_config
from utils.image_io import load_rgb01


@pytest.fixture(scope="module")
def bench() -> Bench:
    cfg = tiny_config("configs/inference/stage2_accsamp.yaml")
    cfg = OmegaConf.merge(cfg, {"inference": {"min_short_side": 64}})
    return Bench(cfg, 64, torch.device("cpu"), "fp32")


@pytest.mark.parametrize("row", [Row("ddim 4 logsnr", "ddim", 4, spacing="logsnr"),
                                 Row("AccSamp fast", "dpmpp_2m", 5, accsamp=True, every=2, pullback="linear")])
def test_script_path_reads_the_input_and_saves_the_scripts_output(bench, row, tmp_path: Path):
    bench.run_script(row, tmp_path)
    out = tmp_path / "output" / "hazy.png"
    assert out.is_file() and load_rgb01(out).shape == (3, 64, 64)
    assert bench.runner.settings.sampler == row.sampler and bench.runner.settings.spacing == row.spacing
    assert len(bench.runner.schedule) == row.steps and bench.runner.settings.guidance_every == row.every


def test_onestep_row_merges_adapters_and_runs_the_onestep_script(tmp_path: Path):
    cfg = OmegaConf.merge(tiny_config("configs/inference/stage2_accsamp.yaml"), {"inference": {"min_short_side": 64}})
    bench = Bench(cfg, 64, torch.device("cpu"), "fp32")
    bench.load_row(make_rows()[-1], tmp_path)  # untimed: the input PNG, the adapter merge, the weights repacked
    assert bench.runner.onestep_timestep == 999
    calls = []
    bench.runner.model.register_forward_hook(lambda *_: calls.append(1))
    bench.run_script(make_rows()[-1], tmp_path)  # timed: the script's per-image path alone
    assert bench.runner.onestep_timestep == 999 and (tmp_path / "adapters.safetensors").is_file()
    assert len(calls) == 1 and load_rgb01(tmp_path / "output" / "hazy.png").shape == (3, 64, 64)


def test_rows_are_the_scripts_configs():
    rows = make_rows()
    assert rows[0] == Row("spaced 50 (published)", "spaced", 50)
    fast = rows[-2].config(OmegaConf.create({}))
    assert OmegaConf.select(fast, "inference.guidance_pullback") == "linear" and rows[-2].accsamp
    assert rows[-1].onestep and not any(row.onestep for row in rows[:-1])
