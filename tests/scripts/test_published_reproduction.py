"""The three inference scripts against the published pre/post-processing around the same sampler calls.

The reference below is written from the published scripts' description, with torchvision doing the work as there:
``cv2.imread`` to RGB, ``ToTensor``, ``Resize(short)`` (bicubic, antialiased) when a side is below ``short``, zero-pad
right/bottom to multiples of 64; after sampling ``(decode + 1) / 2``, crop, clip to [0,1], ``Resize((h, w))``,
``save_image``. Only the model, the condition and the samplers are shared with the scripts. A tiny random model in
the release checkpoint formats stands in for the weights; ``short`` is 64 (the tiny model's scale of 512).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import InterpolationMode, Resize
from torchvision.transforms.functional import to_tensor
from torchvision.utils import save_image

from haze.dcp import estimate_transmission
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from sampler.accsamp import sample_accsamp
from sampler.align import align_op
from sampler.spaced import sample_spaced
from tests.helpers import ROOT, build_tiny, make_config, randomize_, run_script, write_release_checkpoints
from utils.common import instantiate_from_config

pytestmark = pytest.mark.slow

SHORT = 64
BICUBIC = InterpolationMode.BICUBIC


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = build_tiny(seed=31)
    randomize_(model.unet, seed=32, std=0.02)
    randomize_(model.controlnet, seed=33, std=0.02)
    return write_release_checkpoints(model, tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Crops of real hazy photos whose upscale truncates (64·60/47 = 81.7 -> 81): landscape and portrait."""
    folder = tmp_path_factory.mktemp("inputs")
    with Image.open(ROOT / "tests" / "data" / "real_hazy" / "real_1.png") as im:
        im.convert("RGB").crop((10, 20, 70, 67)).save(folder / "land.png")      # 60 wide, 47 high
    with Image.open(ROOT / "tests" / "data" / "real_hazy" / "real_4.png") as im:
        im.convert("RGB").crop((5, 30, 52, 90)).save(folder / "port.png")       # 47 wide, 60 high
    return folder


def published_input(path: Path) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(1,3,Hp,Wp) padded model input, original (h, w) and resized (h_, w_), as the published scripts make them."""
    image = to_tensor(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))[None]
    h, w = image.shape[-2:]
    if h < SHORT or w < SHORT:
        image = Resize(SHORT, interpolation=BICUBIC, antialias=True)(image)
    h_, w_ = image.shape[-2:]
    return F.pad(image, (0, (-w_) % 64, 0, (-h_) % 64)), (h, w), (h_, w_)


def published_save(decoded_pm1: torch.Tensor, hw: tuple[int, int], hw_: tuple[int, int], path: Path) -> None:
    result = (decoded_pm1 + 1) / 2
    result = result[:, :, : hw_[0], : hw_[1]].clip(0.0, 1.0)
    save_image(Resize(hw, interpolation=BICUBIC, antialias=True)(result).squeeze(0), path)


def psnr_files(a: Path, b: Path) -> float:
    with Image.open(a) as x, Image.open(b) as y:
        assert x.size == y.size
        mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def run_reference(which: str, config: Path, images: Path, out: Path, cover_border: bool = False) -> None:
    """The published procedure around the scripts' sampler calls, writing ``out/<name>.png``."""
    cfg = OmegaConf.load(config)
    inf = cfg.inference
    runner = DiffusionRunner(cfg, InferenceSettings.from_config(cfg))
    out.mkdir()
    for path in sorted(images.glob("*.png")):
        inp, hw, hw_ = published_input(path)
        stage = 1 if which == "stage1" else 2
        cond = runner.condition(inp, inp[0, :, : hw_[0], : hw_[1]], stage=stage)
        gen = runner.generator(int(inf.seed))
        x_T = runner.initial_noise((1, 4, inp.shape[-2] // 8, inp.shape[-1] // 8), gen)
        with torch.no_grad():
            if which == "accsamp":
                z, _ = sample_accsamp(runner.model, x_T, runner.schedule, cond, inp, tau=float(inf.tau),
                                      omega=float(inf.omega), guidance=instantiate_from_config(cfg.guidance),
                                      decode_fn=runner.decode, encode_fn=runner.encode,
                                      align_fn=partial(align_op, cover_border=cover_border),
                                      transmission_fn=estimate_transmission,
                                      parameterization=runner.parameterization, generator=gen)
            else:
                uncond = {**cond, "c_img": torch.zeros_like(cond["c_img"])} if which == "stage1" else None
                z = sample_spaced(runner.model, x_T, runner.schedule, cond, uncond=uncond,
                                  cfg_scale=float(inf.w) if which == "stage1" else 1.0,
                                  parameterization=runner.parameterization, generator=gen)
            name = f"{path.stem}_0.png" if which == "stage1" else path.name
            published_save(runner.model.vae_decode(z), hw, hw_, out / name)


@pytest.mark.parametrize("which", ["stage2", "stage1", "accsamp"])
def test_scripts_equal_published_processing(tmp_path, weights, images, which):
    config = make_config(tmp_path, which, weights, images, tmp_path / "script", **{"inference.steps": 5})
    proc = run_script(which, config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_reference(which, config, images, tmp_path / "published")
    for ref in sorted((tmp_path / "published").iterdir()):
        assert psnr_files(tmp_path / "script" / ref.name, ref) >= (30.0 if which == "accsamp" else 45.0)
    if which == "accsamp":  # the scripts' default AlignOp covers the border; with it, the match is exact again
        run_reference(which, config, images, tmp_path / "covered", cover_border=True)
        for ref in sorted((tmp_path / "covered").iterdir()):
            assert psnr_files(tmp_path / "script" / ref.name, ref) >= 45.0
