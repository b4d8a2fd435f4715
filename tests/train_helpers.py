"""Builders for the training tests: tiny weights, generated data folders, tiny training configs, launching."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from dataset import StaticPairedData
from losses.vgg import VGGFeatures
from model.baselines.deblurgan import PatchCritic
from tests.helpers import ROOT, TINY_MODEL, build_tiny, write_release_checkpoints
from utils.common import load_config

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """(h,w,3) uint8: smooth random colour waves plus mild noise (lossless-friendly test content)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    ph = rng.uniform(0, 6, 3)
    waves = np.stack([np.sin(3 * x + ph[0]), np.cos(4 * y + ph[1]), np.sin(2 * x + 3 * y + ph[2])], axis=-1)
    img = (waves * 0.35 + 0.5 + rng.normal(0, 0.03, (h, w, 3))).clip(0, 1)
    return np.round(img * 255).astype(np.uint8)


def write_sd_weights(folder: Path, seed: int = 11) -> Path:
    """Tiny SD checkpoint (LDM layout): default-initialised UNet whose all-zero tensors (output conv, zero-initialised
    ResBlock/attention outputs, zero biases) get N(0, 0.02²) values, so the UNet is not a constant map."""
    model = build_tiny(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return write_release_checkpoints(model, folder)[0]


def vgg_init_(vgg: VGGFeatures, seed: int = 0) -> VGGFeatures:
    """torchvision's VGG init (Kaiming normal, fan_out, zero bias): deep features keep their scale, unlike
    PyTorch's default conv init, under which relu5_3 barely depends on the input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vgg.body:
            if isinstance(module, torch.nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_out) ** 0.5)
                module.bias.zero_()
    return vgg


def write_vgg_weights(path: Path) -> Path:
    """Random VGG-16 ``features.*`` tensors in torchvision's state-dict layout (tests only)."""
    vgg = vgg_init_(VGGFeatures(None, allow_random_init=True))
    torch.save({f"features.{k}": v for k, v in vgg.body.state_dict().items()}, path)
    return path


def make_stage1_data(root: Path, n_syn: int = 4, n_real: int = 4,
                     size: tuple[int, int] = (40, 48)) -> tuple[Path, Path]:
    """RIDCP layout ``syn/rgb_500/*.png`` + ``syn/depth_500/*.npy`` (vertical depth ramp) and ``real/*.png``."""
    syn, real = root / "syn", root / "real"
    for sub in (syn / "rgb_500", syn / "depth_500", real):
        sub.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n_syn):
        Image.fromarray(smooth_image(h, w, i)).save(syn / "rgb_500" / f"c{i}.png")
        np.save(syn / "depth_500" / f"c{i}.npy", np.tile(np.linspace(0, 1, h, dtype=np.float32)[:, None], (1, w)))
    for i in range(n_real):
        Image.fromarray(smooth_image(h + 4, w - 4, 100 + i)).save(real / f"r{i}.png")
    return syn, real


def make_stage2_data(root: Path, n: int = 4, size: int = 40) -> Path:
    """``clean/<name>.png`` and a hazier ``hazy/<name>_0.png`` for each."""
    (root / "clean").mkdir(parents=True, exist_ok=True)
    (root / "hazy").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        clean = smooth_image(size, size, 200 + i)
        hazy = np.round(clean * 0.5 + 0.45 * 255).astype(np.uint8)
        Image.fromarray(clean).save(root / "clean" / f"s{i}.png")
        Image.fromarray(hazy).save(root / "hazy" / f"s{i}_0.png")
    return root


class RecordingPairs(StaticPairedData):
    """StaticPairedData that appends ``<index>`` to ``<record_dir>/<pid>.txt`` for every sample it loads, so a test
    can count the samples each process of a real run consumed (use with ``train.num_workers: 0``)."""

    def __init__(self, record_dir: str, **params) -> None:
        super().__init__(**params)
        self.record_dir = Path(record_dir)

    def __getitem__(self, index: int) -> dict[str, object]:
        with (self.record_dir / f"{os.getpid()}.txt").open("a") as handle:
            handle.write(f"{index}\n")
        return super().__getitem__(index)


class TruncatingPairs(StaticPairedData):
    """StaticPairedData that, on its first sample (after the start-up check decoded every file), cuts the file
    ``truncate`` to half its bytes: a training image that breaks while the run goes on."""

    def __init__(self, truncate: str, **params) -> None:
        super().__init__(**params)
        self.truncate = Path(truncate)

    def __getitem__(self, index: int) -> dict[str, object]:
        data = self.truncate.read_bytes()
        if data.endswith(b"IEND\xaeB`\x82"):  # still a whole PNG
            self.truncate.write_bytes(data[:len(data) // 2])
        return super().__getitem__(index)


class NaNCritic(PatchCritic):
    """A PatchCritic whose scores turn NaN at the (1-based) optimizer steps ``nan_steps`` of a GAN run, in one phase
    of the step: ``critic`` (the critic's own updates: its loss is NaN) or ``generator`` (the generator's update,
    critic frozen: the adversarial term is NaN). Gradients stay finite. The step is counted by the generator-phase
    calls (one per step taken), so a ``critic`` skip must be the run's last step (``train.max_nonfinite_steps: 1``)."""

    def __init__(self, phase: str, nan_steps: list[int], **params) -> None:
        super().__init__(**params)
        self.phase, self.nan_steps, self.steps_taken = phase, set(nan_steps), 0

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        scores = super().forward(img01)
        frozen = not any(p.requires_grad for p in self.parameters())
        step = self.steps_taken + 1
        self.steps_taken += int(frozen)
        if ("generator" if frozen else "critic") == self.phase and step in self.nan_steps:
            return scores + float("nan")
        return scores


def tiny_train_config(config: Path, exp_dir: Path, sd_path: Path, dataset: dict | None = None, **train) -> Path:
    """A repository training config with the tiny model merged in (its switches kept), small CPU settings and the
    given ``dataset.params`` / ``train`` keys; written next to ``exp_dir`` and returned."""
    cfg = load_config(config)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(TINY_MODEL).model)
    cfg.dataset.params = OmegaConf.merge(cfg.dataset.params, {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in (dataset or {}).items()})
    base = {"sd_path": str(sd_path), "exp_dir": str(exp_dir), "batch_size": 4, "num_workers": 0, "log_every": 1,
            "image_every": None, "sample_steps": 3, "learning_rate": 1e-2, "lr_schedule": None}
    cfg.train = OmegaConf.merge(cfg.train, {**base, **train})
    path = exp_dir.parent / f"{exp_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(script: str, config: Path, processes: int = 2, *extra: str) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of ``accelerate launch --multi_gpu --num_processes N <script> --config <config>`` (the
    documented command; a free ``--main_process_port`` keeps concurrent test runs apart)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes),
           "--main_process_port", str(free_port()), script, "--config", str(config), *extra]
    return cmd, env


def launch(script: str, config: Path, processes: int = 2, *extra: str) -> subprocess.CompletedProcess:
    """Run :func:`launch_command` to the end."""
    cmd, env = launch_command(script, config, processes, *extra)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def start_launch(script: str, config: Path, log: Path, processes: int = 2) -> subprocess.Popen:
    """Start :func:`launch_command` in the background, its output going to ``log``."""
    cmd, env = launch_command(script, config, processes)
    with log.open("w") as handle:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid`` (children, their children, ...), read from Linux ``/proc``."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        todo += children
    return found


def write_truncated_jpeg(path: Path, seed: int) -> Path:
    """A 40x40 JPEG cut to half its bytes: its header is intact (``PIL.Image.verify`` passes), its data is not."""
    Image.fromarray(smooth_image(40, 40, seed)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def run_python(script: str, config: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python <script> --config <config>`` with one intra-op thread (tiny models; avoids oversubscription)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, "--config", str(config), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def single_thread():
    """torch intra-op threads = 1 for the block: tiny convolutions run many times faster than with
    several threads competing on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
