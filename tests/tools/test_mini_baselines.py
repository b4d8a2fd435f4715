"""The mini chain's stage ``baselines`` (tools/mini_baselines.py): each feed-forward baseline trained on the chain's
data for the plan's wall-clock budget, and its row of the chain's table; the CrossDehaze row's two stages with the
channel transfer estimated between the two hazy folders."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dataset.transfer import estimate_gamma
from tools import mini_baselines, mini_chain
from utils.checkpoint import load_state_dict
from utils.image_io import list_images, load_rgb01, save_png01

SIZE = 32
BUDGET = 1.0


def _photo(path: Path, seed: int, hw=(48, 48)) -> None:
    """Smooth colour waves (a photo-like image the networks can fit) with mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:hw[0], 0:hw[1]] / max(hw)
    phase = rng.uniform(0, 6, 3)
    img = np.stack([np.sin(3 * x + phase[0]), np.cos(4 * y + phase[1]), np.sin(2 * x + 3 * y + phase[2])], -1)
    img = (img * 0.35 + 0.5 + rng.normal(0, 0.03, (*hw, 3))).clip(0, 1)
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)


def _ckpt(chain, name: str) -> Path:
    """The last checkpoint of the training ``name`` under ``<out>/baselines``."""
    return mini_chain.checkpoint_of(chain.out / mini_baselines.FOLDER / name)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A chain folder with tiny data (mini_chain.make_data on generated photos; HazeGen's pairs stood in for by a
    veiled copy of the RIDCP pairs) after the stage ``baselines`` at a 1-second budget."""
    root = tmp_path_factory.mktemp("mini_baselines")
    kodak, real = root / "kodak", root / "real"
    kodak.mkdir(), real.mkdir()
    for i in range(1, 25):
        _photo(kodak / f"kodim{i:02d}.png", i)
    for name in ("real_1", "real_2", "real_5", "real_7"):
        _photo(real / f"{name}.png", 100 + int(name[-1]), (40, 56))
    plan = replace(mini_chain.PRESETS["full"], size=SIZE, held_in=4, held_out=1, pairs_per_photo=1,
                   test_betas=(1.6,), jobs=2, baseline_seconds=BUDGET)
    out = root / "run"
    mini_chain.make_data(out, kodak, real, plan, None)
    (out / "data" / "hazegen_pairs").mkdir()
    for path in list_images(out / "data" / "ridcp_pairs"):
        save_png01(0.6 * load_rgb01(path) + 0.3, out / "data" / "hazegen_pairs" / path.name)
    run = mini_chain.Chain(out, kodak, real, plan, progress=lambda _: None)
    run.run(["baselines"])
    return run


def test_quick_preset_has_no_baselines_and_the_full_one_adds_their_rows():
    assert mini_chain.PRESETS["full"].baselines and not mini_chain.PRESETS["quick"].baselines
    labels = [row.label for row in mini_chain.rows(mini_chain.PRESETS["full"])]
    assert labels[-5:] == ["AOD-Net", "MSCNN", "DehazeFormer-T", "DehazeFormer-T + CrossDehaze recipe",
                           "DeblurGAN-style GAN (CPU size)"]
    assert not {b.label for b in mini_baselines.BASELINES} & {r.label for r in mini_chain.rows(
        mini_chain.PRESETS["quick"])}
    gan = next(r for r in mini_baselines.rows(mini_chain.PRESETS["full"], mini_chain.Row) if "GAN" in r.label)
    assert {"network.params.channels=16", "network.params.n_blocks=3"} <= set(gan.overrides)
    mscnn = next(r for r in mini_baselines.rows(mini_chain.PRESETS["full"], mini_chain.Row) if r.label == "MSCNN")
    budget = mini_chain.PRESETS["full"].baseline_seconds
    assert "data/ridcp_syn" in mscnn.note and mscnn.note.startswith(f"{budget:.0f} s of training")


@pytest.mark.slow
def test_each_baseline_trains_within_the_budget_on_the_chain_data(chain):
    root = chain.out / mini_baselines.FOLDER
    assert chain.timings["baselines"]["seconds"] > 0 and (chain.out / "baselines.done").is_file()
    shares = {"crossdehaze_supervised": 1 - mini_baselines.CROSSDEHAZE_SSL_SHARE,
              "crossdehaze": mini_baselines.CROSSDEHAZE_SSL_SHARE}
    for name in [*(b.name for b in mini_baselines.BASELINES), "crossdehaze_supervised"]:
        assert (root / name / "done").read_text() == "trained\n", name
        cfg = OmegaConf.load(root / name / "config.yaml")
        assert cfg.train.max_seconds == pytest.approx(BUDGET * shares.get(name, 1.0), abs=1e-3)
        assert cfg.train.batch_size == mini_baselines.LOOP["batch_size"] and cfg.train.seed == chain.plan.seed
        steps = int(_ckpt(chain, name).stem)
        assert 1 <= steps < cfg.train.train_steps
        data = cfg.dataset.params.get("dataset", {}).get("params", cfg.dataset.params)
        assert data.crop_size == SIZE
        if name == "mscnn":
            assert data.syn_folder == str(chain.data / "ridcp_syn") and cfg.objective.predict == "transmission"
        else:
            assert (data.hazy_folder, data.clean_folder) == (str(chain.data / "hazegen_pairs"),
                                                             str(chain.data / "clean_train"))


@pytest.mark.slow
def test_crossdehaze_row_transfers_with_the_estimated_gamma_then_the_ssl_stage(chain):
    root = chain.out / mini_baselines.FOLDER
    cfg = OmegaConf.load(root / "crossdehaze" / "config.yaml")
    gamma = estimate_gamma(chain.data / "hazegen_pairs", chain.data / "ridcp_pairs")
    assert cfg.dataset.target == "dataset.ChannelTransfer"
    assert list(cfg.dataset.params.gamma) == pytest.approx(gamma, abs=1e-5)
    assert all(abs(g - 1) > 0.05 for g in gamma)  # the veil of the stand-in pairs: a real transfer
    assert json.loads((root / "crossdehaze" / "gamma.json").read_text())["gamma_rgb"] == pytest.approx(gamma)
    first = _ckpt(chain, "crossdehaze_supervised")
    assert cfg.objective.init_weights == str(first) and cfg.objective.ssl_weight == 0.1
    assert cfg.objective.ssl_steps >= 1
    rows = [json.loads(line) for line in (root / "crossdehaze" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/loss_ssl"] > 0
    start, end = load_state_dict(first), load_state_dict(_ckpt(chain, "crossdehaze"))
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the second stage trained from the first


@pytest.mark.slow
def test_each_baseline_row_dehazes_the_held_out_set_and_gets_its_numbers(chain):
    """Each row through the chain's own runner (``inference_baseline.py`` with the trained checkpoint, two at a time):
    every held-out synthetic image dehazed, PSNR / SSIM computed, parameters and steps beside them."""
    syn = chain.data / "test_syn"
    counts = {"AOD-Net": 1761, "MSCNN": 8014, "DehazeFormer-T": 687404, "DehazeFormer-T + CrossDehaze recipe": 687404}
    rows = mini_baselines.rows(chain.plan, mini_chain.Row)
    assert all(chain._trained(row.ckpts[0]) for row in rows)
    dsts = [chain.eval_root / mini_chain.row_key(row.label) / row.ckpts[0] for row in rows]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda rd: chain._dehaze(rd[0], rd[0].ckpts[0], syn / "hazy", rd[1] / "syn"), zip(rows, dsts)))
    for row, dst in zip(rows, dsts):
        assert sorted(p.name for p in list_images(dst / "syn")) == sorted(p.name for p in list_images(syn / "hazy"))
        scores = mini_chain.evaluation.summarize(mini_chain.evaluation.evaluate_folders(dst / "syn", syn / "clean"))
        assert np.isfinite(scores["psnr"]["mean"]) and 0 < scores["ssim"]["mean"] <= 1, row.label
        facts = mini_baselines.row_facts(row, chain._checkpoint(row.ckpts[0]))
        first = int(_ckpt(chain, "crossdehaze_supervised").stem) if "CrossDehaze" in row.label else 0
        assert facts["train_steps"] == int(chain._checkpoint(row.ckpts[0]).stem) + first
        assert facts["parameters"] == counts.get(row.label, facts["parameters"]) > 0
        assert chain._seconds_per_image(dst) > 0
    assert mini_baselines.row_facts(mini_chain.rows(chain.plan)[1], None) == {"parameters": 0, "train_steps": None}


def test_a_baseline_that_diverges_is_reported_not_trained(tmp_path):
    """Exit status 3 of a training (the trainer's non-finite guard) marks the baseline done without a checkpoint, so
    its row reads 'not trained in this run' instead of failing the chain; any other failure stops the stage."""
    def diverged(cmd, log_file):
        raise subprocess.CalledProcessError(3, cmd, output="training stopped at step 2")

    plan = replace(mini_chain.PRESETS["full"], size=SIZE)
    run = mini_chain.Chain(tmp_path, tmp_path, tmp_path, plan, progress=lambda _: None)
    said = []
    trainer = mini_baselines.BaselineTrainer(tmp_path, plan, diverged, mini_chain.checkpoint_of, said.append)
    assert trainer.train(mini_baselines.BASELINES[0]) == 0.0
    assert (tmp_path / "baselines" / "aodnet" / "done").read_text() == "diverged\n"
    assert not run._trained("aodnet") and "AOD-Net diverged (exit 3)" in said[-1]
    trainer.run_logged = lambda cmd, log_file: (_ for _ in ()).throw(subprocess.CalledProcessError(2, cmd))
    with pytest.raises(subprocess.CalledProcessError):
        trainer.train(mini_baselines.BASELINES[1])
