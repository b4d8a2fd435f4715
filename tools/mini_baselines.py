"""The feed-forward baselines in the mini chain: the optional stage ``baselines`` of :mod:`tools.mini_chain` and the
rows it adds to the chain's table.

Each baseline of :data:`BASELINES` is trained by ``train_baseline.py`` (the one trainer) on the chain's data for the
same wall-clock budget, ``Plan.baseline_seconds`` of optimizer steps (``train.max_seconds``; start-up excluded), with
one thread per process and at most one training per core, from a fresh folder each time (a killed training starts
over, so no baseline gets more than its budget). All share the loop settings of :data:`LOOP`; every baseline but
MSCNN trains on the pairs DiffDehaze-mini trains on (HazeGen-mini's outputs ``data/hazegen_pairs`` with their clean
photos ``data/clean_train``); MSCNN predicts the transmission and needs its true value, which only the RIDCP
synthesis has (``data/ridcp_syn``, the same held-in photos).

DehazeFormer-T + the CrossDehaze recipe spends the same budget in two runs: :data:`CROSSDEHAZE_SSL_SHARE` of it is
the second stage and the rest the supervised first stage (DehazeFormer-T on HazeGen-mini's pairs). The second stage
(``configs/train/baseline_dehazeformer_t_crossdehaze.yaml``) starts from the first one's checkpoint, maps the hazy
inputs by the channel transfer I^(1/γ) with γ estimated between HazeGen-mini's hazy images and the RIDCP pairs'
(:func:`dataset.transfer.estimate_gamma`; written to ``gamma.json``), and adds the self-supervised term, whose β
decays over the steps the first stage reached per second times the second stage's seconds.

The rows (:func:`rows`) dehaze the held-out sets with ``inference_baseline.py`` and the trained network's config;
:func:`row_facts` gives every row of the table its parameter count and training steps. :mod:`tools.mini_chain`
imports this module and hands it its process runner, checkpoint finder and row type (``plan`` below is its
``Plan``: ``size``, ``jobs``, ``seed``, ``baseline_seconds``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from dataset.transfer import estimate_gamma
from model.builder import cldm_config
from utils.atomic import write_text_atomic
from utils.common import instantiate_from_config, load_config

LOG = logging.getLogger("mini_chain")
ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "configs" / "mini"
TRAIN_CONFIGS = ROOT / "configs" / "train"
INFER_CONFIGS = ROOT / "configs" / "inference"
FOLDER = "baselines"
"""The trainings' folder under the chain's ``--out`` (one exp_dir per training)."""
CROSSDEHAZE_SSL_SHARE = 0.3
"""Share of the budget of the CrossDehaze row spent in its second (channel transfer + self-supervised) stage."""
CROP = 64
"""Training crop (px) of every baseline, as DiffDehaze-mini's stage 2 (smaller when the photos are)."""
LOOP = {"batch_size": 8, "learning_rate": 1e-3, "train_steps": 10**9, "ckpt_every": 10**9, "log_every": 25,
        "image_every": None, "log_with": None, "num_workers": 0, "keep_last": 1, "ema_decay": None}
"""``train.*`` of every baseline: the budget ends the run (``train_steps`` only caps it); lr 1e-3, as the mini
diffusion stages (published rates are 1e-4 to 4e-4 for runs of 10^5 steps); one checkpoint, at the end."""


@dataclass(frozen=True)
class Baseline:
    """One row's training: its folder name, table label, training and inference configs, and data (``pairs``:
    HazeGen-mini's pairs; ``ridcp_syn``: the RIDCP synthetic set with its true t)."""

    name: str
    label: str
    train_config: str
    infer_config: str
    data: str = "pairs"
    note: str = ""
    crossdehaze: bool = False   # two stages (module doc); train_config is the second one's


BASELINES: tuple[Baseline, ...] = (
    Baseline("aodnet", "AOD-Net", "baseline_aodnet.yaml", "baseline_aodnet.yaml"),
    Baseline("mscnn", "MSCNN", "baseline_mscnn.yaml", "baseline_mscnn.yaml", data="ridcp_syn",
             note="trained on the true t of the RIDCP synthetic set (data/ridcp_syn: the same held-in photos), "
                  "since HazeGen's pairs carry no transmission"),
    Baseline("dehazeformer_t", "DehazeFormer-T", "baseline_dehazeformer_t.yaml", "baseline_dehazeformer_t.yaml"),
    Baseline("crossdehaze", "DehazeFormer-T + CrossDehaze recipe", "baseline_dehazeformer_t_crossdehaze.yaml",
             "baseline_dehazeformer_t_crossdehaze.yaml", crossdehaze=True,
             note=f"{1 - CROSSDEHAZE_SSL_SHARE:.0%} of the budget supervised on HazeGen-mini's pairs, "
                  f"{CROSSDEHAZE_SSL_SHARE:.0%} with the channel transfer (γ estimated between HazeGen-mini's and "
                  "the RIDCP pairs' hazy images) and the self-supervised term"),
    Baseline("deblurgan_cpu", "DeblurGAN-style GAN (CPU size)", "baseline_deblurgan_cpu.yaml",
             "baseline_deblurgan.yaml", note="16 channels, 3 blocks; no VGG file: L1 in place of the perceptual term"),
)
NAMES = frozenset(b.name for b in BASELINES)
"""The checkpoint names the chain's rows give the baselines (their folders under ``<out>/baselines``)."""


# ---------------------------------------------------------------------------------------------------------- train
def cores() -> int:
    """Cores this process may run on (one training per core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def data_overrides(kind: str, data: Path, crop: int, prefix: str = "dataset.params.") -> list[str]:
    """``--set`` keys pointing a training config's dataset at the chain's data (``kind`` of :class:`Baseline`)."""
    if kind == "ridcp_syn":
        return [f"{prefix}syn_folder={data / 'ridcp_syn'}", f"{prefix}crop_size={crop}"]
    return [f"{prefix}hazy_folder={data / 'hazegen_pairs'}", f"{prefix}clean_folder={data / 'clean_train'}",
            f"{prefix}crop_size={crop}"]


def loop_overrides(exp_dir: Path, seconds: float, seed: int) -> list[str]:
    """``--set`` keys of :data:`LOOP`, the budget, the folder and the seed."""
    values = {**LOOP, "max_seconds": round(seconds, 3), "exp_dir": exp_dir, "seed": seed}
    return [f"train.{k}={'null' if v is None else v}" for k, v in values.items()]


class BaselineTrainer:
    """The stage ``baselines`` of one chain run: ``out`` (the chain's folder, data under ``out/data``), its plan, the
    chain's process runner (``run(cmd, log_file) -> peak MB``, CalledProcessError on failure), its checkpoint finder
    (``exp_dir -> last checkpoint``) and a progress callback; :meth:`run` trains what is not done and returns the peak
    memory (MB) of the trainings running at once."""

    def __init__(self, out: Path, plan: Any, run: Callable[[Sequence[str], Path], float],
                 find_checkpoint: Callable[[Path], Path], say: Callable[[str], None] = LOG.info) -> None:
        self.out, self.plan, self.say = out, plan, say
        self.run_logged, self.find_checkpoint = run, find_checkpoint
        self.data, self.root = out / "data", out / FOLDER
        self.crop = min(CROP, plan.size)

    def run(self) -> float:
        todo = [b for b in BASELINES if not (self.root / b.name / "done").is_file()]
        jobs = max(1, min(self.plan.jobs, cores()))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            peaks = list(pool.map(self.train, todo))
        return sum(sorted(peaks)[-jobs:]) if peaks else 0.0

    def train(self, b: Baseline) -> float:
        """Train ``b`` (both stages of the CrossDehaze row) and mark it done; a run that diverged (exit 3) is marked
        done without a checkpoint, so its row reads 'not trained'."""
        budget = self.plan.baseline_seconds
        try:
            if not b.crossdehaze:
                peak = self._train_run(b.name, b.train_config, budget, data_overrides(b.data, self.data, self.crop))
            else:
                peak = self._train_crossdehaze(b, budget)
            status = "trained"
        except subprocess.CalledProcessError as err:
            if err.returncode != 3:
                raise
            self.say(f"baselines: {b.label} diverged (exit 3): reported as not trained; log in {self.out / 'logs'}")
            peak, status = 0.0, "diverged"
        write_text_atomic(self.root / b.name / "done", status + "\n")
        return peak

    def _train_run(self, name: str, config: str, seconds: float, extra: Sequence[str]) -> float:
        """One ``train_baseline.py`` run into ``<out>/baselines/<name>``, started afresh."""
        exp = self.root / name
        if exp.exists():
            shutil.rmtree(exp)
        self.say(f"baselines: training {name} for {seconds:g} s")
        cmd = [sys.executable, "train_baseline.py", "--config", str(TRAIN_CONFIGS / config), "--set",
               *loop_overrides(exp, seconds, self.plan.seed), *extra]
        return self.run_logged(cmd, self.out / "logs" / f"baseline_{name}.log")

    def _train_crossdehaze(self, b: Baseline, budget: float) -> float:
        first = f"{b.name}_supervised"
        first_seconds, second_seconds = budget * (1 - CROSSDEHAZE_SSL_SHARE), budget * CROSSDEHAZE_SSL_SHARE
        peak = 0.0
        if not (self.root / first / "done").is_file():
            peak = self._train_run(first, "baseline_dehazeformer_t.yaml", first_seconds,
                                   data_overrides("pairs", self.data, self.crop))
            write_text_atomic(self.root / first / "done", "trained\n")
        init = self.find_checkpoint(self.root / first)
        ssl_steps = max(1, round(int(init.stem) * second_seconds / first_seconds))
        gamma = estimate_gamma(self.data / "hazegen_pairs", self.data / "ridcp_pairs")
        extra = [*data_overrides("pairs", self.data, self.crop, "dataset.params.dataset.params."),
                 f"dataset.params.gamma=[{', '.join(f'{g:.6f}' for g in gamma)}]",
                 f"dataset.params.source_folder={self.data / 'hazegen_pairs'}",
                 f"dataset.params.reference_folder={self.data / 'ridcp_pairs'}",
                 f"objective.init_weights={init}", f"objective.ssl_steps={ssl_steps}"]
        peak = max(peak, self._train_run(b.name, b.train_config, second_seconds, extra))
        write_text_atomic(self.root / b.name / "gamma.json",
                          json.dumps({"gamma_rgb": list(gamma), "source": "data/hazegen_pairs",
                                      "reference": "data/ridcp_pairs", "ssl_steps": ssl_steps}) + "\n")
        return peak


# ----------------------------------------------------------------------------------------------------------- rows
def network_overrides(b: Baseline) -> tuple[str, ...]:
    """``--set`` keys that make the inference config's ``network`` the trained one (the training config's model)."""
    model = load_config(TRAIN_CONFIGS / b.train_config).model
    out = [f"network.target={model.target}"]
    for key, value in (model.get("params") or {}).items():
        out.append(f"network.params.{key}={value if isinstance(value, str) else json.dumps(value)}")
    return tuple(out)


R = TypeVar("R")


def rows(plan: Any, make_row: Callable[..., R]) -> list[R]:
    """The chain's rows of :data:`BASELINES`, made by ``make_row(label, script, config, ckpts, overrides, note)``
    (the chain's ``Row``; checkpoint name = the baseline's name, its folder ``<out>/baselines/<name>``)."""
    budget = f"{plan.baseline_seconds:g} s of training"
    return [make_row(b.label, "inference_baseline.py", str(INFER_CONFIGS / b.infer_config), (b.name,),
                     network_overrides(b), f"{budget}; {b.note}" if b.note else budget) for b in BASELINES]


def row_facts(row: Any, ckpt: Path | None) -> dict:
    """``parameters`` of the model a row runs (all of them: for the diffusion rows the ControlLDM's UNet,
    ControlNet, VAE and text encoder; 0 for DCP; None for the input itself) and ``train_steps`` of its checkpoint
    (:func:`trained_steps`; None without one)."""
    return {"parameters": _parameters(row.script, row.config, row.overrides), "train_steps": trained_steps(ckpt)}


def trained_steps(ckpt: Path | None) -> int | None:
    """The optimizer steps behind a checkpoint ``<exp_dir>/checkpoints/<step>.pt``: its step, plus those of the
    checkpoint its run started from (``objective.init_weights`` in ``<exp_dir>/config.yaml``: the CrossDehaze
    second stage); None for a checkpoint without a step in its name."""
    if ckpt is None or not ckpt.stem.isdigit():
        return None
    steps = int(ckpt.stem)
    config = ckpt.parent.parent / "config.yaml"
    init = load_config(config).get("objective", {}).get("init_weights") if config.is_file() else None
    return steps + (trained_steps(Path(init)) or 0) if init else steps


@lru_cache(maxsize=None)
def _parameters(script: str | None, config: str | None, overrides: tuple[str, ...]) -> int | None:
    if script is None:
        return None
    if script == "inference_dcp.py":
        return 0
    path = config if Path(config).is_absolute() else str(MINI / config)
    cfg = load_config(path, [o for o in overrides if o.startswith(("network.", "model."))])
    module = instantiate_from_config(cfg.network if "network" in cfg else cldm_config(cfg.model))
    return sum(p.numel() for p in module.parameters())
