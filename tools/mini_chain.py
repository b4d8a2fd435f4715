"""The whole HazeGen -> DiffDehaze chain trained end to end at mini scale on a CPU, with held-out numbers.

    python -m tools.mini_chain --out runs/mini [--kodak ../shared/data/clean_kodak] [--preset full|quick]

Stages (each runs the project's real entry scripts in subprocesses; a finished stage leaves ``<out>/<stage>.done``
and is skipped on rerun, a killed training stage resumes from its last state):

1. ``data``: the split of :data:`KODAK_HELD_OUT` / :data:`REAL_HELD_OUT` (``manifest.json``): held-in clean photos,
   their RIDCP synthetic set (depth proxy :func:`dataset.degradation.depth_proxy`) and RIDCP stage-2 pairs, the real
   hazy training photos, and the held-out test sets (synthetic pairs by :mod:`tools.make_benchmark`'s homogeneous
   haze on a vertical depth ramp, a synthesis neither training set uses; two real hazy photos).
2. ``prior``: ``train_prior.py`` (VAE, then UNet; beyond the paper) -> ``prior/sd.ckpt`` in the SD-2.1 layout.
3. ``stage1``: ``accelerate launch --num_processes 2 train_stage1.py`` (HazeGen, hybrid training).
4. ``pairs``: ``inference_stage1.py`` on the held-in clean photos -> HazeGen-mini's stage-2 training pairs.
5. ``stage2``: ``train_stage2.py`` for every variant of :func:`variants` (HazeGen pairs and RIDCP pairs, several
   seeds; every HCD-YC extension on), two at a time.
6. ``baselines`` (``Plan.baselines``; on in the full preset): the feed-forward baselines of
   :mod:`tools.mini_baselines` trained on the same data for the same wall-clock budget ``Plan.baseline_seconds``.
7. ``evaluate``: every row of :func:`rows` over the held-out sets (``inference_*.py``, ``evaluate``'s metrics), the
   markdown table ``report.md`` / ``report.json`` and picture grids ``grids/``.

``--break swap_pairs`` (stage-2 targets and conditions exchanged) and ``--break no_latent_scale`` (latent scale factor
1 at inference) make a deliberately broken chain, to check that the learning test catches it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dataset.checks import pair_hazy_with_clean
from dataset.degradation import degrade, depth_proxy
from metrics import evaluation
from metrics.content_kept import affine_fit_psnr, detail_kept
from model.builder import build_model
from tools import mini_baselines
from tools.compare_grid import build_grids
from tools.make_benchmark import build_benchmark
from utils.atomic import atomic_write, write_text_atomic
from utils.checkpoint import save_state_dict_atomic
from utils.common import load_config
from utils.image_io import list_images, load_rgb01, resize01, save_png01

LOG = logging.getLogger("mini_chain")
ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "configs" / "mini"
KODAK_HELD_OUT = ("kodim01", "kodim08", "kodim13", "kodim21")
"""Whole Kodak photos never seen by any stage (outdoor scenes with depth: house, buildings, river, lighthouse)."""
REAL_HELD_OUT = ("real_5", "real_7")
"""Real hazy photos of the published sample inputs kept for the real-photo rows."""
REAL_PREFIX = "real_"
"""The real hazy photos of ``--real`` are its files named ``real_<k>``; other images there (``inputs/`` also holds
synthetic samples made by ``tools.make_inputs``) are not real haze and are left out, listed in the manifest."""
STAGES = ("data", "prior", "stage1", "pairs", "stage2", "baselines", "evaluate")
BREAKS = ("swap_pairs", "no_latent_scale")


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one chain run (a preset of :data:`PRESETS`, or its overrides)."""

    size: int = 128                 # side of every clean photo and short side of the real ones (px)
    held_in: int = 20               # Kodak photos used for training (the rest of the non-held-out ones are unused)
    held_out: int = 4               # of KODAK_HELD_OUT
    prior_vae_steps: int = 1500
    prior_unet_steps: int = 1500
    stage1_steps: int = 1500
    pairs_per_photo: int = 2        # HazeGen-mini (and RIDCP) hazy variants per held-in photo
    stage2_steps: int = 800
    seeds: tuple[int, ...] = (0, 1, 2)
    test_betas: tuple[float, ...] = (0.8, 1.6)
    test_airlight: float = 0.9
    eval_steps: int = 50            # the spaced sampler's steps in the evaluation rows (published 50)
    extras: bool = True             # AccSamp / fast / DPM++ / RIDCP / HCD-YC rows (False: the learning test's subset)
    main_pairs: str = "hazegen"     # training pairs of the main DiffDehaze-mini rows: hazegen | ridcp
    jobs: int = 4                   # processes at once: stage-2 trainings, evaluation runs, pair shards (1 thread each)
    seed: int = 0                   # base seed of the data synthesis, the prior, stage 1 and the stage-2 seeds
    pairs_steps: int = 50           # HazeGen-mini's sampler steps when making the pairs (published 50)
    baselines: bool = True          # stage ``baselines``: the feed-forward baselines' rows (tools.mini_baselines)
    baseline_seconds: float = 300.0  # wall-clock training budget of each baseline (train.max_seconds)
    threads: int = 1                # intra-op threads of a process that runs alone (the prior, a lone stage-2 run)
    real_rows: bool = True          # also dehaze and score the held-out real photos (the learning checks need none)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Extra ``key=value`` config settings per stage (``prior``, ``stage1``, ``pairs``, ``stage2``) of this preset."""

    def __post_init__(self) -> None:
        if self.main_pairs not in ("hazegen", "ridcp"):
            raise ValueError(f"main_pairs must be hazegen or ridcp, got {self.main_pairs!r}")
        if self.extras and self.main_pairs != "hazegen":
            raise ValueError("the extra rows compare RIDCP-trained with HazeGen-trained models: main_pairs hazegen")
        unknown = set(self.overrides) - {"prior", "stage1", "pairs", "stage2"}
        if unknown:
            raise ValueError(f"overrides for unknown stages {sorted(unknown)}: prior, stage1, pairs or stage2")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


PRESETS = {
    "full": Plan(),
    "quick": Plan(size=64, held_in=8, held_out=2, prior_vae_steps=200, prior_unet_steps=200, stage1_steps=40,
                  pairs_per_photo=2, pairs_steps=10, stage2_steps=300, seeds=(0,), test_betas=(1.6,), eval_steps=10,
                  extras=False, main_pairs="ridcp", jobs=2, baselines=False),
    "ci": Plan(size=64, held_in=8, held_out=2, prior_vae_steps=250, prior_unet_steps=120, stage1_steps=40,
               pairs_per_photo=2, pairs_steps=10, stage2_steps=200, seeds=(0,), test_betas=(1.6,), eval_steps=10,
               extras=False, main_pairs="ridcp", jobs=2, baselines=False, threads=2, real_rows=False,
               overrides={"prior": ("prior.vae_crop_size=32",)}),
}


# ------------------------------------------------------------------------------------------------------- processes
def run_logged(cmd: Sequence[str], log_file: Path, threads: int = 1) -> float:
    """Run ``cmd`` from the repository root with ``threads`` intra-op threads per process (1 where the chain runs
    several processes at once: more threads than cores thrash), its output to ``log_file``; returns the peak
    resident memory (MB) of its process tree. CalledProcessError (with the log's tail) on failure."""
    import psutil

    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    peak = 0.0
    with log_file.open("w") as handle:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.5)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise subprocess.CalledProcessError(proc.returncode, cmd, output=tail)
    return peak


def launch_cmd(script: str, processes: int) -> list[str]:
    """``accelerate launch --multi_gpu --num_processes N script`` (plain python for one process)."""
    if processes == 1:
        return [sys.executable, script]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(port),
            script]


def sets(**overrides: object) -> list[str]:
    """``--set k=v ...`` arguments (dotted keys given with ``__`` for ``.``)."""
    return ["--set", *(f"{k.replace('__', '.')}={v}" for k, v in overrides.items())]


# ------------------------------------------------------------------------------------------------------------ data
def _square01(path: Path, size: int) -> torch.Tensor:
    """Photo as (3,size,size) in [0,1]: centre square crop, then bicubic resize."""
    img = load_rgb01(path)
    h, w = img.shape[1:]
    s = min(h, w)
    img = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return resize01(img[None], (size, size))[0].clamp(0, 1)


def _short_side01(path: Path, size: int) -> torch.Tensor:
    """Photo as (3,h,w) in [0,1] with short side ``size`` (aspect kept), RGB (alpha dropped)."""
    img = load_rgb01(path)
    h, w = img.shape[1:]
    scale = size / min(h, w)
    return resize01(img[None], (max(size, round(h * scale)), max(size, round(w * scale))))[0].clamp(0, 1)


def make_data(out: Path, kodak: Path, real: Path, plan: Plan, broken: str | None) -> dict:
    """Stage 1 (module doc): write ``out/data/*`` and ``out/manifest.json``; returns the manifest."""
    data = out / "data"
    photos = {p.stem: p for p in list_images(kodak)}
    missing = [n for n in KODAK_HELD_OUT if n not in photos]
    images = list_images(real)
    reals = {p.stem: p for p in images if p.stem.startswith(REAL_PREFIX)}
    if missing or any(n not in reals for n in REAL_HELD_OUT):
        raise SystemExit(f"mini_chain: {kodak} must hold {list(KODAK_HELD_OUT)} and {real} {list(REAL_HELD_OUT)}")
    held_out = list(KODAK_HELD_OUT[:plan.held_out])
    held_in = [n for n in sorted(photos) if n not in KODAK_HELD_OUT][:plan.held_in]
    rng = np.random.default_rng([2025, plan.seed])
    for name in held_in:
        clean = _square01(photos[name], plan.size)
        save_png01(clean, data / "clean_train" / f"{name}.png")
        hwc = clean.permute(1, 2, 0).numpy()
        depth = depth_proxy(hwc).astype(np.float32)
        save_png01(clean, data / "ridcp_syn" / "rgb_500" / f"{name}.png")
        atomic_write(data / "ridcp_syn" / "depth_500" / f"{name}.npy", lambda f, d=depth: np.save(f, d))
        for k in range(plan.pairs_per_photo):
            hazy, _ = degrade(hwc, depth, rng)
            save_png01(torch.from_numpy(np.ascontiguousarray(hazy.transpose(2, 0, 1))),
                       data / "ridcp_pairs" / f"{name}_{k}.png")
    real_train = [n for n in sorted(reals) if n not in REAL_HELD_OUT]
    for name in real_train:
        save_png01(_short_side01(reals[name], plan.size), data / "real_train" / f"{name}.png")
    for name in REAL_HELD_OUT:
        save_png01(_short_side01(reals[name], plan.size), data / "test_real" / f"{name}.png")
    bench = build_benchmark([(n, _square01(photos[n], plan.size)) for n in held_out], data / "test_syn",
                            list(plan.test_betas), [plan.test_airlight], max_side=0, source=str(kodak))
    manifest = {
        "plan": asdict(plan),
        "held_in_clean": held_in,
        "held_out_clean": held_out,
        "real_train": real_train,
        "real_held_out": list(REAL_HELD_OUT),
        "real_ignored": sorted(p.stem for p in images if p.stem not in reals),
        "photo_size": f"Kodak: centre square, bicubic to {plan.size}x{plan.size}; real: short side {plan.size}",
        "ridcp": "dataset.degradation.degrade (published RIDCP ranges) with the depth proxy "
                 "dataset.degradation.depth_proxy (brightness/saturation cue plus a vertical ramp), "
                 "numpy seed [2025, plan.seed]",
        "test_synthetic": {k: bench[k] for k in ("model", "depth_proxy", "levels")},
        "broken": broken,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def swap_pairs(hazy: Path, clean: Path, dst: Path) -> tuple[Path, Path]:
    """The deliberately broken stage-2 data: each clean photo saved under its hazy names and hazy variant 0 as the
    clean photo, so training learns clean -> hazy. Returns (hazy folder, clean folder)."""
    (dst / "hazy").mkdir(parents=True, exist_ok=True)
    (dst / "clean").mkdir(parents=True, exist_ok=True)
    for path in list_images(hazy):
        name = path.stem.rsplit("_", 1)[0]
        shutil.copy(clean / f"{name}.png", dst / "hazy" / path.name)
        if path.stem.endswith("_0"):
            shutil.copy(path, dst / "clean" / f"{name}.png")
    return dst / "hazy", dst / "clean"


# -------------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One stage-2 training: its name, config, hazy folder and seed."""

    name: str
    config: str
    pairs: str          # data folder name of the hazy images
    seed: int


def variants(plan: Plan) -> list[Variant]:
    """``plan.main_pairs`` (HazeGen's) pairs per seed; with ``plan.extras`` also RIDCP pairs per seed and every HCD-YC
    extension (seed 0)."""
    out = [Variant(f"{plan.main_pairs}_s{s}", "stage2.yaml", f"{plan.main_pairs}_pairs", plan.seed + s)
           for s in plan.seeds]
    if plan.extras:
        out += [Variant(f"ridcp_s{s}", "stage2.yaml", "ridcp_pairs", plan.seed + s) for s in plan.seeds]
        out.append(Variant("hcdyc_s0", "stage2_hcdyc.yaml", "hazegen_pairs", plan.seed))
    return out


def checkpoint_of(exp_dir: Path) -> Path:
    """The last release-format ControlNet checkpoint a training run wrote."""
    found = sorted(p for p in (exp_dir / "checkpoints").glob("*.pt") if p.stem.isdigit())
    if not found:
        raise FileNotFoundError(f"no checkpoint in {exp_dir / 'checkpoints'}")
    return found[-1]


# ------------------------------------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Row:
    """One row of the table: a label, and per seed the command that dehazes a folder (None: the input itself)."""

    label: str
    script: str | None
    config: str | None
    ckpts: tuple[str, ...] = ()     # ControlNet per seed (variant names)
    overrides: tuple[str, ...] = ()
    note: str = ""
    model_loss: bool = False        # also score the model's held-out diffusion loss (:func:`heldout_eps_mse`)


def rows(plan: Plan) -> list[Row]:
    """The evaluation rows (module doc); ``plan.extras`` False keeps hazy / DCP / control / 50-step spaced."""
    hazegen = tuple(f"{plan.main_pairs}_s{s}" for s in plan.seeds)
    trained_on = "" if plan.main_pairs == "hazegen" else f" (trained on {plan.main_pairs.upper()} pairs)"
    steps = (f"inference.steps={plan.eval_steps}",)
    out = [Row("hazy input", None, None),
           Row("DCP", "inference_dcp.py", str(ROOT / "configs/inference/dcp.yaml")),
           Row("prior + untrained ControlNet (control)", "inference_stage2.py", "infer_stage2.yaml", ("control",),
               steps, model_loss=True),
           Row(f"DiffDehaze-mini, spaced {plan.eval_steps} steps{trained_on}", "inference_stage2.py",
               "infer_stage2.yaml", hazegen, steps, model_loss=True)]
    if plan.extras:
        out += [
            Row("DiffDehaze-mini, published AccSamp", "inference_accsamp.py", "infer_accsamp.yaml", hazegen[:1]),
            Row("DiffDehaze-mini, fast AccSamp preset", "inference_accsamp.py", "infer_accsamp_fast.yaml",
                hazegen[:1]),
            Row("DiffDehaze-mini, DPM++ 2M 10 steps", "inference_stage2.py", "infer_stage2.yaml", hazegen[:1],
                ("inference.sampler=dpmpp_2m", "inference.steps=10")),
            Row("DiffDehaze-mini trained on RIDCP pairs, spaced 50", "inference_stage2.py", "infer_stage2.yaml",
                tuple(f"ridcp_s{s}" for s in plan.seeds), steps, model_loss=True),
            Row("DiffDehaze-mini, every HCD-YC extension, spaced 50", "inference_stage2.py", "infer_stage2_hcdyc.yaml",
                ("hcdyc_s0",), steps,
                "the text-guidance parts need a text encoder that understands words; the mini one does not"),
        ]
    if plan.baselines:
        out += mini_baselines.rows(plan, Row)
    return out


def row_key(label: str) -> str:
    """Folder-safe name of a row label."""
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")[:48]


# ------------------------------------------------------------------------------------------------------------ chain
class Chain:
    """One run of the chain in ``out`` (see the module doc)."""

    def __init__(self, out: Path, kodak: Path, real: Path, plan: Plan, broken: str | None = None,
                 progress: Callable[[str], None] = LOG.info):
        self.out, self.kodak, self.real, self.plan, self.broken = out, kodak, real, plan, broken
        self.data = out / "data"
        self.sd = out / "prior" / "sd.ckpt"
        suffix = f"_{broken}" if broken else ""
        # swapped pairs train their own stage-2 models (the sound chain's are kept); other breaks evaluate the sound ones
        self.stage2_root = out / ("stage2_swap_pairs" if broken == "swap_pairs" else "stage2")
        self.eval_root = out / f"eval{suffix}"
        self.report_name = f"report{suffix}"
        self.suffix = suffix
        self.say = progress
        self.timings_file = out / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}

    # ---------------------------------------------------------------- bookkeeping
    def _marker(self, stage: str) -> Path:
        """``<out>/<stage>.done``; the stages a break changes have their own markers."""
        return self.out / f"{stage}{self.suffix if stage in ('stage2', 'evaluate') else ''}.done"

    def _done(self, stage: str) -> bool:
        return self._marker(stage).is_file()

    def _finish(self, stage: str, seconds: float, peak_mb: float) -> None:
        self.timings[self._marker(stage).stem] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}
        write_text_atomic(self.timings_file, json.dumps(self.timings, indent=2) + "\n")
        write_text_atomic(self._marker(stage), f"{seconds:.1f}\n")

    def run(self, stages: Sequence[str] = STAGES) -> dict:
        """Run the stages not yet done, in order; returns the report (``evaluate``'s) or {}."""
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        report = {}
        for stage in tqdm(stages, desc="mini chain", unit="stage"):
            if stage == "baselines" and not self.plan.baselines:
                continue
            if self._done(stage) and stage != "evaluate":
                self.say(f"{stage}: done before, skipped")
                continue
            self.say(f"{stage}: running (logs in {self.out / 'logs'})")
            start = time.time()
            peak = getattr(self, f"stage_{stage}")()
            if stage == "evaluate":
                report, peak = peak
            self._finish(stage, time.time() - start, peak)
            self.say(f"{stage}: {time.time() - start:.0f} s, peak {peak:.0f} MB")
        return report

    # ---------------------------------------------------------------- stages
    def stage_data(self) -> float:
        make_data(self.out, self.kodak, self.real, self.plan, self.broken)
        return 0.0

    def stage_prior(self) -> float:
        p = self.plan
        if self.sd.is_file():  # written atomically at the very end of train_prior.py: a finished prior
            self.say(f"prior: {self.sd} exists, kept")
            return 0.0
        return run_logged([sys.executable, "train_prior.py", "--config", str(MINI / "prior.yaml"),
                           *sets(prior__clean_folder=self.data / "clean_train", prior__out_path=self.sd,
                                 prior__vae_steps=p.prior_vae_steps, prior__unet_steps=p.prior_unet_steps,
                                 prior__seed=p.seed), *p.overrides.get("prior", ())],
                          self.out / "logs" / "prior.log", p.threads)

    def stage_stage1(self) -> float:
        p = self.plan
        return run_logged([*launch_cmd("train_stage1.py", 2), "--config", str(MINI / "stage1.yaml"),
                           *sets(train__sd_path=self.sd, train__exp_dir=self.out / "stage1",
                                 train__train_steps=p.stage1_steps, train__ckpt_every=p.stage1_steps,
                                 train__seed=p.seed,
                                 dataset__params__syn_folder=self.data / "ridcp_syn",
                                 dataset__params__real_folder=self.data / "real_train"),
                           *p.overrides.get("stage1", ())],
                          self.out / "logs" / "stage1.log")

    def stage_pairs(self) -> float:
        results = self.data / "hazegen_pairs"
        return run_logged([*launch_cmd("inference_stage1.py", self.plan.jobs),
                           "--config", str(MINI / "infer_stage1.yaml"), "--skip-existing",
                           *sets(inference__sd_path=self.sd,
                                 inference__controlnet_path=checkpoint_of(self.out / "stage1"),
                                 inference__image_folder=self.data / "clean_train", inference__result_folder=results,
                                 inference__num_samples=self.plan.pairs_per_photo,
                                 inference__steps=self.plan.pairs_steps,
                                 inference__min_short_side=self.plan.size),
                           *self.plan.overrides.get("pairs", ())],
                          self.out / "logs" / "pairs.log", self.plan.threads if self.plan.jobs == 1 else 1)

    def _train_variant(self, v: Variant, threads: int = 1) -> float:
        hazy, clean = self.data / v.pairs, self.data / "clean_train"
        if self.broken == "swap_pairs":
            hazy, clean = swap_pairs(hazy, clean, self.data / f"swapped_{v.pairs}")
        p = self.plan
        return run_logged([sys.executable, "train_stage2.py", "--config", str(MINI / v.config),
                           *sets(train__sd_path=self.sd, train__exp_dir=self.stage2_root / v.name,
                                 train__seed=v.seed, train__train_steps=p.stage2_steps,
                                 train__ckpt_every=p.stage2_steps,
                                 dataset__params__hazy_folder=hazy, dataset__params__clean_folder=clean),
                           *p.overrides.get("stage2", ())],
                          self.out / "logs" / f"stage2_{v.name}.log", threads)

    def stage_stage2(self) -> float:
        todo = [v for v in variants(self.plan) if not (self.stage2_root / v.name / "done").is_file()]

        threads = self.plan.threads if len(todo) == 1 else 1

        def one(v: Variant) -> float:
            peak = self._train_variant(v, threads)
            write_text_atomic(self.stage2_root / v.name / "done", "")
            return peak

        with ThreadPoolExecutor(max_workers=self.plan.jobs) as pool:
            peaks = list(pool.map(one, todo))
        return sum(sorted(peaks)[-self.plan.jobs:]) if peaks else 0.0

    def stage_baselines(self) -> float:
        return mini_baselines.BaselineTrainer(self.out, self.plan, run_logged, checkpoint_of, self.say).run()

    def _model_overrides(self, ckpt_name: str) -> list[str]:
        """Config overrides of the diffusion evaluations of ``ckpt_name``: the no_latent_scale break, except for the
        control (step 0), the fixed reference that always runs in the sound conventions."""
        if self.broken == "no_latent_scale" and ckpt_name != "control":
            return ["model.cldm.params.latent_scale_factor=1.0"]
        return []

    def _checkpoint(self, name: str) -> Path:
        """The ControlNet of a stage-2 variant, or of the control row (``control``); a baseline's network."""
        if name in mini_baselines.NAMES:
            return checkpoint_of(self.out / mini_baselines.FOLDER / name)
        return self._control_checkpoint() if name == "control" else checkpoint_of(self.stage2_root / name)

    def _trained(self, name: str) -> bool:
        """Whether the stage-2 variant ``name`` (or the control) has a checkpoint to evaluate."""
        if name == "control":
            return True
        try:
            self._checkpoint(name)
        except FileNotFoundError:
            return False
        return True

    def _control_checkpoint(self) -> Path:
        """The control row's ControlNet: initialised from the prior's UNet, never trained."""
        path = self.stage2_root / "control" / "checkpoints" / "0000000.pt"
        if not path.is_file():
            cfg = load_config(MINI / "infer_stage2.yaml")
            ldm, _ = build_model(cfg.model, str(self.sd))
            save_state_dict_atomic(ldm.controlnet_state_dict(), path)
        return path

    def _dehaze(self, row: Row, ckpt_name: str | None, folder: Path, dst: Path) -> float:
        """Run ``row``'s script with the ControlNet of ``ckpt_name`` over ``folder`` into ``dst``; a finished result
        set (every image and its timing) is kept as it is, so a rerun keeps its seconds per image."""
        stamp = dst.with_name(dst.name + "_seconds.json")
        if row.script is not None and stamp.is_file() and all((dst / f"{p.stem}.png").is_file()
                                                              for p in list_images(folder)):
            return 0.0
        if row.script is None:
            dst.mkdir(parents=True, exist_ok=True)
            for path in list_images(folder):
                shutil.copy(path, dst / path.name)
            return 0.0
        config = row.config if Path(row.config).is_absolute() else str(MINI / row.config)
        extra = [f"inference.image_folder={folder}", f"inference.result_folder={dst}", *row.overrides]
        if ckpt_name is not None and row.script == "inference_baseline.py":
            extra.append(f"inference.checkpoint_path={self._checkpoint(ckpt_name)}")
        elif ckpt_name is not None:
            extra += [f"inference.sd_path={self.sd}", f"inference.controlnet_path={self._checkpoint(ckpt_name)}",
                      f"inference.min_short_side={self.plan.size}", *self._model_overrides(ckpt_name)]
        start = time.time()
        peak = run_logged([sys.executable, row.script, "--config", config, "--skip-existing", "--set", *extra],
                          self.out / "logs" / f"eval_{dst.parent.parent.name}_{dst.parent.name}_{dst.name}.log")
        seconds = (time.time() - start) / max(1, len(list_images(folder)))
        write_text_atomic(stamp, json.dumps({"s_per_image": seconds}) + "\n")
        return peak

    def stage_evaluate(self) -> tuple[dict, float]:
        syn, real = self.data / "test_syn", self.data / "test_real"
        trained = {row.label: tuple(n for n in row.ckpts if self._trained(n)) or (() if row.ckpts else (None,))
                   for row in rows(self.plan)}
        runs = [(row, name) for row in rows(self.plan) for name in trained[row.label]]

        def dehaze(run: tuple[Row, str | None]) -> float:
            row, name = run
            dst = self.eval_root / row_key(row.label) / (name or "run")
            peak = self._dehaze(row, name, syn / "hazy", dst / "syn")
            return max(peak, self._dehaze(row, name, real, dst / "real")) if self.plan.real_rows else peak

        with ThreadPoolExecutor(max_workers=self.plan.jobs) as pool:
            peaks = list(pool.map(dehaze, runs))
        results: dict[str, dict] = {}
        for row in rows(self.plan):
            seeds = trained[row.label]
            if not seeds:
                self.say(f"evaluate: {row.label}: no trained checkpoint, reported as not trained")
                results[row.label] = {"seeds": [], "per_seed": [], "note": "not trained in this run", "folder": ""}
                continue
            per_seed = []
            for name in seeds:
                dst = self.eval_root / row_key(row.label) / (name or "run")
                per_seed.append(score_folders(dst / "syn", syn / "clean", dst / "real" if self.plan.real_rows else None))
                per_seed[-1]["s_per_image"] = self._seconds_per_image(dst)
                per_seed[-1].update(mini_baselines.row_facts(row, self._checkpoint(name) if name else None))
                if row.model_loss:
                    per_seed[-1]["heldout_eps_mse"] = heldout_eps_mse(self.sd, self._checkpoint(name), syn,
                                                                      self._model_overrides(name))
            results[row.label] = {"seeds": list(seeds) if row.ckpts else [], "per_seed": per_seed, "note": row.note,
                                  "folder": str(self.eval_root / row_key(row.label) / (seeds[0] or "run"))}
        peak = sum(sorted(peaks)[-self.plan.jobs:])
        report = {"rows": results, "hazegen_fade": self._hazegen_fade(), "agreement": self._agreement(results),
                  "timings": self.timings, "manifest": json.loads((self.out / "manifest.json").read_text())}
        report["checks"] = learning_checks(report)
        write_text_atomic(self.out / f"{self.report_name}.json", json.dumps(report, indent=2) + "\n")
        write_text_atomic(self.out / f"{self.report_name}.md", report_markdown(report))
        self._grids(results)
        return report, peak

    @staticmethod
    def _seconds_per_image(dst: Path) -> float | None:
        """Wall-clock seconds per image of the synthetic set's script run (model loading included)."""
        stamp = dst / "syn_seconds.json"
        return json.loads(stamp.read_text())["s_per_image"] if stamp.is_file() else None

    def _hazegen_fade(self) -> dict:
        """FADE of HazeGen-mini's outputs, of their clean inputs, of the RIDCP pairs and of the real hazy photos."""
        folders = {"hazegen_pairs": self.data / "hazegen_pairs", "clean_train": self.data / "clean_train",
                   "ridcp_pairs": self.data / "ridcp_pairs", "real_hazy": self.data / "real_train"}
        values = {k: fade_values(f) for k, f in folders.items()}
        real = values["real_hazy"] + fade_values(self.data / "test_real")
        values["real_hazy"] = real
        out = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "n": len(v)} for k, v in values.items()}
        for k in ("hazegen_pairs", "ridcp_pairs"):
            out[k]["w1_to_real"] = wasserstein1(values[k], real)
            out[k].update(pair_content(folders[k], folders["clean_train"]))
        return out

    def _agreement(self, results: dict) -> dict:
        """PSNR of the AccSamp rows' outputs against the 50-step spaced output of the same model and image."""
        ref_label = next((label for label in results if label.startswith("DiffDehaze-mini, spaced")), None)
        out = {}
        if ref_label is None:
            return out
        ref = Path(results[ref_label]["folder"]) / "syn"
        for label in results:
            if label.startswith("DiffDehaze-mini,") and label != ref_label and "HCD-YC" not in label \
                    and results[label]["per_seed"]:
                other = Path(results[label]["folder"]) / "syn"
                report = evaluation.evaluate_folders(other, ref)
                out[label] = evaluation.summarize(report)["psnr"]["mean"]
        return out

    def _grids(self, results: dict) -> None:
        methods = [(row_key(label)[:20], Path(r["folder"]) / "syn") for label, r in results.items()
                   if label != "hazy input" and r["per_seed"]]
        build_grids(self.data / "test_syn" / "hazy", methods, self.out / f"grids{self.suffix}",
                    self.data / "test_syn" / "clean", height=128)


# --------------------------------------------------------------------------------------------------------- metrics
def fade_values(folder: Path) -> list[float]:
    """FADE (fade-python, through metrics.iqa) of every image of ``folder``."""
    report = evaluation.evaluate_folders(folder, None, ("fade",))
    return [r["fade"] for r in report.rows if math.isfinite(r.get("fade", math.nan))]


def pair_content(hazy: Path, clean: Path) -> dict[str, float]:
    """Mean :func:`metrics.content_kept.affine_fit_psnr` (``fit_psnr``, dB) and
    :func:`metrics.content_kept.detail_kept` (``detail_kept``) of the training pairs ``hazy/<name>_<k>`` against
    ``clean/<name>``: how much of the clean photo a generated hazy image keeps, whatever its haze."""
    fits, details = [], []
    for hazy_path, clean_path in pair_hazy_with_clean(list_images(hazy), clean):
        hazy01 = load_rgb01(hazy_path)[None]
        clean01 = resize01(load_rgb01(clean_path)[None], tuple(hazy01.shape[2:])).clamp(0, 1)
        fits.append(float(affine_fit_psnr(hazy01, clean01)[0]))
        details.append(float(detail_kept(hazy01, clean01)[0]))
    return {"fit_psnr": float(np.mean(fits)), "detail_kept": float(np.mean(details))}


def wasserstein1(a: Sequence[float], b: Sequence[float]) -> float:
    """1-Wasserstein distance between two empirical distributions (area between their CDFs)."""
    xs = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), xs[:-1], side="right") / len(a)
    cb = np.searchsorted(np.sort(b), xs[:-1], side="right") / len(b)
    return float(np.sum(np.abs(ca - cb) * np.diff(xs)))


EPS_TIMESTEPS = (100, 300, 500, 700, 900)
"""Timesteps of the held-out diffusion loss (:func:`heldout_eps_mse`)."""


@torch.no_grad()
def heldout_eps_mse(sd: Path, controlnet: Path, pairs: Path, overrides: Sequence[str] = ()) -> float:
    """The stage-2 training objective on held-out pairs: mean eps MSE of the DiffDehaze model (``sd`` + ``controlnet``,
    built from ``configs/mini/infer_stage2.yaml`` with ``overrides``) over every pair of ``pairs/hazy`` (condition,
    [0,1]) and ``pairs/clean`` (target), at :data:`EPS_TIMESTEPS` with fixed noise — the step-0 / trained comparison
    of the learning test, free of the sampler's randomness."""
    from dataset.paired import STAGE2_PROMPT

    cfg = load_config(MINI / "infer_stage2.yaml", list(overrides))
    ldm, diffusion = build_model(cfg.model, str(sd), str(controlnet))
    ldm.eval()
    refs = {p.stem: p for p in list_images(pairs / "clean")}
    losses = []
    for index, hazy_path in enumerate(list_images(pairs / "hazy")):
        hazy01 = load_rgb01(hazy_path)[None]
        clean01 = load_rgb01(evaluation.reference_for(hazy_path.stem, refs))[None]
        cond = ldm.prepare_condition(hazy01, [STAGE2_PROMPT])
        z0 = ldm.vae_encode(clean01 * 2 - 1, sample=False)
        gen = torch.Generator().manual_seed(index)
        for t in EPS_TIMESTEPS:
            noise = torch.randn(z0.shape, generator=gen)
            out = diffusion.training_outputs(ldm, z0, torch.tensor([t]), cond, noise)
            losses.append(out["loss"].item())
    return float(np.mean(losses))


def score_folders(syn: Path, clean: Path, real: Path | None) -> dict:
    """Means over one result set: PSNR / SSIM / ΔE00 / FADE on the synthetic pairs, FADE / NIQE / BRISQUE on the
    real photos (``evaluation.DEFAULT_NO_REF``; none when ``real`` is None)."""
    syn_report = evaluation.evaluate_folders(syn, clean, ("fade",))
    out = {f"syn_{m}": s["mean"] for m, s in evaluation.summarize(syn_report).items()}
    if real is not None:
        real_report = evaluation.evaluate_folders(real, None, evaluation.DEFAULT_NO_REF)
        out.update({f"real_{m}": s["mean"] for m, s in evaluation.summarize(real_report).items()})
    out["syn_mse"] = float(np.mean([10 ** (-r["psnr"] / 10) for r in syn_report.rows]))
    return out


COLUMNS = (("syn_psnr", "PSNR ↑", 2), ("syn_ssim", "SSIM ↑", 3), ("syn_deltae00", "ΔE00 ↓", 2),
           ("syn_fade", "FADE ↓", 3), ("real_fade", "real FADE ↓", 3), ("real_niqe_hcdyc", "real NIQE ↓", 2),
           ("real_brisque_svr", "real BRISQUE ↓", 1), ("heldout_eps_mse", "held-out ε-MSE ↓", 4),
           ("s_per_image", "s / image", 2), ("parameters", "parameters", 0), ("train_steps", "train steps", 0))


def _cell(values: list[float | None], digits: int) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    if len(set(vals)) == 1:
        return f"{vals[0]:,.{digits}f}"
    return f"{np.mean(vals):,.{digits}f} ± {np.std(vals, ddof=1):,.{digits}f}"


def report_markdown(report: dict) -> str:
    """The chain's table (held-out synthetic pairs and real photos), FADE of the generated haze, agreement of the
    faster samplers with the 50-step output, and the wall-clock per stage."""
    lines = ["# Mini chain: held-out results", "",
             "| row | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for label, r in report["rows"].items():
        cells = [_cell([s.get(key) for s in r["per_seed"]], d) for key, _, d in COLUMNS]
        lines.append(f"| {label} | {len(r['seeds']) or '-'} | " + " | ".join(cells) + " |")
    notes = [f"- {label}: {r['note']}" for label, r in report["rows"].items() if r["note"]]
    lines += ["", "Mean ± sd over training seeds where several; synthetic: held-out Kodak photos hazed by "
              "tools.make_benchmark's model; real: held-out real hazy photos.", *notes, "",
              "## Generated haze (FADE, higher = hazier)", "",
              "Content kept by the training pairs: the clean photo fitted from the hazy one by a per-image affine "
              "colour map (which undoes homogeneous haze), PSNR against the clean photo; detail kept: mean gradient "
              "of the hazy image over the clean one's (metrics.content_kept).", "",
              "| set | mean | sd | n | W1 to real hazy | content kept (fit PSNR, dB) | detail kept |",
              "|---|---|---|---|---|---|---|"]
    for k, v in report["hazegen_fade"].items():
        extra = [f"{v[c]:.{d}f}" if c in v else "" for c, d in (("w1_to_real", 3), ("fit_psnr", 2),
                                                                   ("detail_kept", 2))]
        lines.append(f"| {k} | {v['mean']:.3f} | {v['sd']:.3f} | {v['n']} | " + " | ".join(extra) + " |")
    if report["agreement"]:
        lines += ["", "## Agreement with the 50-step spaced output (PSNR, dB)", ""]
        lines += [f"- {label}: {value:.2f}" for label, value in report["agreement"].items()]
    lines += ["", "## Learning checks", ""]
    lines += [f"- {name}: {c['value']:.3f} vs {c['baseline']:.3f} (margin {c['margin']}): "
              f"{'ok' if c['ok'] else 'FAILED'}" for name, c in report.get("checks", {}).items()]
    lines += ["", "## Wall-clock per stage", "", "| stage | seconds | peak RSS (MB) |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']} | {v['peak_rss_mb']} |" for k, v in report["timings"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- checks
LEARNING_MARGIN_STEP0_DB = 0.5
"""How far (PSNR, dB, held-out synthetic pairs) the trained DiffDehaze-mini's output must beat step 0's: the same
sampler with the untrained ControlNet (the control row, always in the sound conventions)."""
LEARNING_MARGIN_HAZY_DB = 1.0
"""How far (PSNR, dB, held-out synthetic pairs) the trained DiffDehaze-mini's output must beat the hazy input."""
DEHAZE_MARGIN_FADE = 0.03
"""How much less hazy (mean FADE, held-out synthetic pairs) the trained DiffDehaze-mini's output must be than the
hazy input: PSNR alone passes a flat image of about the right colour, which FADE scores as fog."""
HAZE_MARGIN_FADE = 0.05
"""How much hazier (mean FADE) HazeGen-mini's outputs must be than their clean inputs."""
LOSS_MARGIN = 0.2
"""How far (relative) the trained model's held-out diffusion loss may rise above step 0's: scored through the
inference config, a convention that training and inference disagree on (the latent scale, the channel order, the
value range) multiplies it."""


def learning_checks(report: dict) -> dict[str, dict]:
    """The learning test's criteria on a report (first training seed): the held-out error of the sampled output
    (PSNR on the synthetic pairs) after stage-2 training is lower than at step 0 by :data:`LEARNING_MARGIN_STEP0_DB`
    and lower than the hazy input's by :data:`LEARNING_MARGIN_HAZY_DB`; the output is less hazy than the input (mean
    FADE lower by :data:`DEHAZE_MARGIN_FADE`); HazeGen-mini adds haze (mean FADE above its clean inputs by
    :data:`HAZE_MARGIN_FADE`); the held-out diffusion loss (:func:`heldout_eps_mse`, the table's ε-MSE column) stays
    within :data:`LOSS_MARGIN` of step 0's. Each entry: the two numbers compared, the margin and ``ok``."""
    by_label = {label: r["per_seed"][0] for label, r in report["rows"].items() if r["per_seed"]}
    trained = next((v for k, v in by_label.items() if k.startswith("DiffDehaze-mini, spaced")), None)
    control = next(v for k, v in by_label.items() if "(control)" in k)
    if trained is None:
        return {"trained_model_evaluated": {"value": math.nan, "baseline": math.nan, "margin": 0.0, "ok": False}}
    fade = report["hazegen_fade"]
    hazy = by_label["hazy input"]
    psnr, psnr0, psnr_hazy = trained["syn_psnr"], control["syn_psnr"], hazy["syn_psnr"]
    fade_out, fade_in = fade["hazegen_pairs"]["mean"], fade["clean_train"]["mean"]
    checks = {
        "beats_step0": (psnr, psnr0, LEARNING_MARGIN_STEP0_DB, psnr >= psnr0 + LEARNING_MARGIN_STEP0_DB),
        "beats_hazy_input": (psnr, psnr_hazy, LEARNING_MARGIN_HAZY_DB, psnr >= psnr_hazy + LEARNING_MARGIN_HAZY_DB),
        "removes_haze": (trained["syn_fade"], hazy["syn_fade"], DEHAZE_MARGIN_FADE,
                         trained["syn_fade"] <= hazy["syn_fade"] - DEHAZE_MARGIN_FADE),
        "hazegen_adds_haze": (fade_out, fade_in, HAZE_MARGIN_FADE, fade_out >= fade_in + HAZE_MARGIN_FADE),
        "loss_consistent": (trained["heldout_eps_mse"], control["heldout_eps_mse"], LOSS_MARGIN,
                            trained["heldout_eps_mse"] <= control["heldout_eps_mse"] * (1 + LOSS_MARGIN)),
    }
    return {name: {"value": a, "baseline": b, "margin": m, "ok": bool(ok)} for name, (a, b, m, ok) in checks.items()}


# ------------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train and evaluate the HazeGen -> DiffDehaze chain at mini scale")
    parser.add_argument("--out", type=Path, default=Path("runs/mini"), help="run folder (rerun to resume)")
    parser.add_argument("--kodak", type=Path, default=ROOT.parent / "shared" / "data" / "clean_kodak",
                        help="the 24 Kodak photos (kodim01..24)")
    parser.add_argument("--real", type=Path, default=ROOT / "inputs",
                        help="folder holding the real hazy photos real_<k> (default: inputs/; other images there are "
                             "not used)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0, help="base seed of data, prior, stage 1 and stage 2")
    parser.add_argument("--break", dest="broken", choices=BREAKS, default=None,
                        help="deliberately broken chain (for checking the learning test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    for folder in (args.kodak, args.real):
        if not folder.is_dir():
            parser.error(f"not a folder: {folder}")
    try:
        plan = replace(PRESETS[args.preset], seed=args.seed)
        report = Chain(args.out, args.kodak, args.real, plan, args.broken).run(stages)
    except subprocess.CalledProcessError as err:
        LOG.error("%s failed (exit %d); last lines:\n%s", " ".join(map(str, err.cmd[:3])), err.returncode, err.output)
        return 1
    if report:
        print(report_markdown(report))
        failed = [name for name, c in report["checks"].items() if not c["ok"]]
        if failed:
            LOG.warning("learning checks failed: %s", ", ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
