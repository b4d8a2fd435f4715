"""No-reference quality metrics of the dehazing literature: one implementation per metric name.

* ``fade``: FADE (Choi, You & Bovik, IEEE TIP 2015) through the PyPI package ``fade-python`` (``pyfade``), a
  MATLAB-aligned port that ships FADE's natural/foggy model files: runs offline. Input convention of the
  reference: 8-bit RGB, values 0-255 (``img01`` is rounded to that grid here).
* ``qalign``, ``liqe``, ``clipiqa``, ``maniqa``, ``musiq``, ``brisque``, ``niqe``, ``nima``: pyiqa (IQA-PyTorch),
  with pyiqa's metric names and default settings, built by pyiqa's own code from a weights folder ``DIR`` that
  stands in for its caches (see :func:`_pyiqa_reads`): ``DIR/pyiqa/<file>`` is pyiqa's checkpoint cache (each
  metric loads its default file there, the way pyiqa loads a downloaded one), ``DIR/clip/<file>`` the CLIP file
  pyiqa's CLIP loader reads, ``DIR/huggingface`` (when present) the Hugging Face cache Q-Align is loaded from.
  Nothing is downloaded unless the caller allows it: a missing file raises :class:`MetricUnavailable` naming it.
* ``niqe_hcdyc`` (metrics/niqe.py) and ``brisque_svr`` (metrics/brisque.py): our offline implementations with shipped
  parameters; named apart from pyiqa's ``niqe``/``brisque`` because their numbers differ from those.

All scorers take images ``img01`` (3,H,W) float RGB in [0,1] and return one float per image (NaN with a reason
when the image is outside the metric's domain, e.g. smaller than its minimum side).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from metrics import brisque as brisque_mod
from metrics import niqe as niqe_mod
from utils.image_io import save_png01

LOG = logging.getLogger(__name__)
PYIQA_VERSION = "0.1.16"


class MetricUnavailable(RuntimeError):
    """A metric cannot be built here (missing parameter file or package); the message is one line."""


@dataclass(frozen=True)
class HubFile:
    """A file a metric needs from the Hugging Face cache (timm backbones, Q-Align)."""

    repo_id: str
    filename: str


@dataclass(frozen=True)
class MetricSpec:
    """What evaluate.py knows about one no-reference metric name.

    files: parameter files relative to the weights folder (``pyiqa/<file>``: pyiqa's checkpoint cache,
    ``clip/<file>``: the CLIP file pyiqa's loader reads); hub_files: files expected in the Hugging Face cache;
    backbone_in_checkpoint: the metric's timm backbone is replaced in full by its pyiqa checkpoint (strict load),
    so it is built without the ImageNet weights pyiqa would download first; min_side: smallest image side the
    metric accepts (smaller images give NaN and a note).
    """

    name: str
    label: str
    lower_better: bool
    implementation: str
    files: tuple[str, ...] = ()
    hub_files: tuple[HubFile, ...] = ()
    backbone_in_checkpoint: bool = False
    min_side: int = 1
    memory: str = ""


METRICS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec("fade", "FADE ↓", True, "fade-python 1.0.0 (pyfade), shipped natural/foggy models (patch 8)",
               min_side=8),
    MetricSpec("qalign", "Q-Align ↑", False, f"pyiqa {PYIQA_VERSION} `qalign` (mPLUG-Owl2 7B, fp16)",
               hub_files=tuple(HubFile("q-future/one-align", f) for f in ("config.json", "tokenizer.model",
                                                                          "preprocessor_config.json")),
               memory="7B parameters: the fp16 weights alone take 14 GB, so plan for ~16 GB of GPU memory"),
    MetricSpec("liqe", "LIQE ↑", False, f"pyiqa {PYIQA_VERSION} `liqe` (CLIP ViT-B/32, KonIQ weights)",
               files=("pyiqa/liqe_koniq.pt", "clip/ViT-B-32.pt"), min_side=224),
    MetricSpec("clipiqa", "CLIPIQA ↑", False, f"pyiqa {PYIQA_VERSION} `clipiqa` (CLIP RN50, antonym prompts)",
               files=("clip/RN50.pt",), min_side=32),
    MetricSpec("maniqa", "MANIQA ↑", False, f"pyiqa {PYIQA_VERSION} `maniqa` (ViT-B/8, KonIQ weights)",
               files=("pyiqa/ckpt_koniq10k.pt",), backbone_in_checkpoint=True, min_side=224),
    MetricSpec("musiq", "MUSIQ ↑", False, f"pyiqa {PYIQA_VERSION} `musiq` (KonIQ weights)",
               files=("pyiqa/musiq_koniq_ckpt-e95806b9.pth",), min_side=32),
    MetricSpec("brisque", "BRISQUE ↓", True, f"pyiqa {PYIQA_VERSION} `brisque` (MATLAB release SVR)",
               files=("pyiqa/brisque_svm_weights.pth",), min_side=8),
    MetricSpec("niqe", "NIQE ↓", True, f"pyiqa {PYIQA_VERSION} `niqe` (MATLAB pristine model)",
               files=("pyiqa/niqe_modelparameters.mat",), min_side=96),
    MetricSpec("nima", "NIMA ↑", False, f"pyiqa {PYIQA_VERSION} `nima` (Inception-ResNet-v2, AVA weights)",
               files=("pyiqa/NIMA_InceptionV2_ava-b0c77c00.pth",), backbone_in_checkpoint=True, min_side=32),
    MetricSpec("niqe_hcdyc", "NIQE (ours) ↓", True, "metrics/niqe.py, shipped pristine model "
               "(metrics/data/niqe_pris_params.npz); needs two 96×96 blocks"),
    MetricSpec("brisque_svr", "BRISQUE-SVR ↓", True, "metrics/brisque.py, LIVE SVR of the PyPI package brisque "
               "0.2.0 (metrics/data/brisque_svm.txt)", min_side=brisque_mod.MIN_SIDE),
)}
PYIQA_METRICS = ("qalign", "liqe", "clipiqa", "maniqa", "musiq", "brisque", "niqe", "nima")
# OpenAI's published CLIP RN50 (the SHA-256 in its URL). CLIPIQA scores with these weights as they are, so another
# file gives other numbers (a warning says so); LIQE's ViT-B/32 weights are all replaced by liqe_koniq.pt.
CLIP_SHA256 = {"clip/RN50.pt": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"}
PAPER_PRESET = ("fade", "qalign", "liqe", "clipiqa", "maniqa", "musiq", "brisque")
HEAVY = ("qalign",)


def hub_cache(weights_dir: Path) -> Optional[Path]:
    """``weights_dir/huggingface`` (a Hugging Face hub cache: ``models--<org>--<name>/...``) when it exists; None
    means the user's own Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``)."""
    folder = weights_dir / "huggingface"
    return folder if folder.is_dir() else None


def missing_files(spec: MetricSpec, weights_dir: Path) -> list[str]:
    """Paths (as strings) of the files ``spec`` needs that are absent from ``weights_dir`` / the HF cache."""
    missing = [str(weights_dir / f) for f in spec.files if not (weights_dir / f).is_file()]
    if spec.hub_files:
        from huggingface_hub import try_to_load_from_cache

        cache = hub_cache(weights_dir)
        where = f"Hugging Face cache {cache}" if cache else "Hugging Face cache (HF_HOME)"
        absent = [f"{hub.repo_id}/{hub.filename}" for hub in spec.hub_files
                  if not isinstance(try_to_load_from_cache(hub.repo_id, hub.filename, cache_dir=cache), str)]
        if absent:
            missing.append(f"{', '.join(absent)} in the {where}")
    return missing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _has_torchscript_code(path: Path) -> bool:
    """Whether the zip archive ``path`` holds TorchScript code (``<name>/code/...``), as torch.jit.save writes."""
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in entry for entry in archive.namelist())


def _check_file(path: Path, rel: str, name: str) -> None:
    """Refuse files pyiqa would mishandle before it sees them: a CLIP file that is not a TorchScript archive like
    OpenAI's (pyiqa's loader falls back to ``torch.load`` on the file handle its failed ``torch.jit.load`` has
    already read, so a plain ``torch.save`` state dict fails there with EOFError), and pyiqa
    .pth/.pt checkpoints that hold more than tensors (pyiqa unpickles them without weights_only). A CLIP file other
    than OpenAI's published one is accepted with a warning where its weights are used as they are (CLIPIQA)."""
    if rel.startswith("clip/"):
        if not zipfile.is_zipfile(path) or not _has_torchscript_code(path):
            raise MetricUnavailable(f"{name}: {path} is not a TorchScript archive like OpenAI's {Path(rel).name}")
        if rel in CLIP_SHA256 and _sha256(path) != CLIP_SHA256[rel]:
            LOG.warning("%s: %s is not OpenAI's published %s (SHA-256 differs): its scores will not match "
                        "published ones", name, path, Path(rel).name)
        return
    if path.suffix not in (".pth", ".pt"):
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, OSError) as err:
        raise MetricUnavailable(f"{name}: {path} does not load with weights_only=True "
                                f"({type(err).__name__}); refusing to unpickle it") from err


@contextlib.contextmanager
def _swapped(owner: Any, attr: str, value: Any) -> Iterator[None]:
    """Set ``owner.attr = value`` for the duration of the block, then restore it."""
    previous = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, previous)


@contextlib.contextmanager
def _pyiqa_reads(spec: MetricSpec, weights_dir: Path, allow_download: bool) -> Iterator[None]:
    """While building a pyiqa metric, point pyiqa's caches at ``weights_dir`` so that it builds the metric with
    its default settings and its own loading code from local files:

    * pyiqa's checkpoint cache (``pyiqa.utils.download_util.DEFAULT_CACHE_DIR``, fixed when pyiqa is imported)
      -> ``weights_dir/pyiqa``: each metric loads its default checkpoint there by the URL's file name, exactly as
      it loads a file it downloaded (same keys: e.g. MANIQA's default file is a bare state dict, while its
      ``pretrained_model_path`` option expects a ``params`` entry);
    * pyiqa's CLIP loader: the file for a CLIP name is ``weights_dir/clip/<OpenAI's file name>``, read by pyiqa's
      own ``load`` (a TorchScript archive like OpenAI's; the architecture follows its shapes); pyiqa's
      download step, which would re-fetch any file whose SHA-256 differs from OpenAI's, is skipped offline;
    * LIQE's prompt-feature cache -> a fresh temporary folder: pyiqa otherwise reads ``liqe_text_feat.pt`` from
      its cache with ``weights_only=False`` whichever checkpoint made it, so one from other weights would
      silently change every score; the features (5 prompts) are recomputed from the loaded checkpoint;
    * with ``spec.backbone_in_checkpoint``: timm backbones are built without their ImageNet download, since the
      pyiqa checkpoint replaces every one of their weights (strict load; the test checks equality with pyiqa
      built on a filled Hugging Face cache);
    * with ``spec.hub_files`` (Q-Align): the Hugging Face cache is ``weights_dir/huggingface`` when that exists
      (:func:`hub_cache`), and offline unless downloads are allowed.
    """
    from pyiqa.utils import download_util

    with contextlib.ExitStack() as stack:
        stack.enter_context(_swapped(download_util, "DEFAULT_CACHE_DIR", str(weights_dir / "pyiqa")))
        if any(rel.startswith("clip/") for rel in spec.files):   # imported only here: openai-clip needs setuptools<81
            from pyiqa.archs import clip_model, liqe_arch

            fetch = clip_model._download

            def local_clip(url: str, root: str) -> str:
                if allow_download:
                    return fetch(url, str(weights_dir / "clip"))
                path = weights_dir / "clip" / os.path.basename(url)
                if not path.is_file():
                    raise FileNotFoundError(f"missing {path}")
                return str(path)

            stack.enter_context(_swapped(clip_model, "_download", local_clip))
            text_cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="liqe_text_"))
            stack.enter_context(_swapped(liqe_arch, "DEFAULT_CACHE_DIR", text_cache))
        if spec.backbone_in_checkpoint:
            import timm

            create = timm.create_model

            def without_download(*args: Any, **kwargs: Any) -> torch.nn.Module:
                return create(*args, **{**kwargs, "pretrained": False})

            stack.enter_context(_swapped(timm, "create_model", without_download))
        if spec.hub_files:
            import huggingface_hub.constants as hub

            cache = hub_cache(weights_dir)
            if cache is not None:
                stack.enter_context(_swapped(hub, "HF_HUB_CACHE", str(cache)))
            if not allow_download:
                stack.enter_context(_swapped(hub, "HF_HUB_OFFLINE", True))
        yield


def _restore_invert_attention_mask() -> None:
    """pyiqa 0.1.16's Q-Align code (its vendored mPLUG-Owl2 visual abstractor) calls
    ``PreTrainedModel.invert_attention_mask``, which Transformers 5 removed (pyiqa re-adds ``get_head_mask`` the same
    way, but not this one): without it Q-Align fails on its first image. Re-add it with Transformers 4's meaning:
    mask (B,L) or (B,L,L) with 1 = attend -> additive mask (B,1,1,L) / (B,1,L,L), 0 where attended and the dtype's
    most negative value elsewhere."""
    from pyiqa.archs.q_align.visual_encoder import MplugOwlVisualAbstractorModel as abstractor

    if hasattr(abstractor, "invert_attention_mask"):
        return

    def invert_attention_mask(self: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
        extended = (mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]).to(self.dtype)
        return (1.0 - extended) * torch.finfo(self.dtype).min

    abstractor.invert_attention_mask = invert_attention_mask


class Scorer:
    """One metric, built once. ``__call__(images, names) -> list[(score, note)]`` with images a list of (3,H,W)
    in [0,1] and names their file names; images of one size are scored as one batch of at most ``batch_size``;
    a NaN score comes with a note saying why. ``fn(batch (B,3,H,W), names) -> (B,) or (B,1) scores``."""

    def __init__(self, spec: MetricSpec, fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
                 batch_size: int) -> None:
        self.spec = spec
        self._fn = fn
        self.batch_size = max(1, batch_size)

    def __call__(self, images: Sequence[torch.Tensor], names: Sequence[str]) -> list[tuple[float, str]]:
        out: list[tuple[float, str]] = [(math.nan, "")] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            if min(h, w) < self.spec.min_side:
                out[i] = (math.nan, f"{self.spec.name}: image is {w}x{h} (WxH), needs a side of at least "
                                    f"{self.spec.min_side} px")
            else:
                groups.setdefault(tuple(img.shape), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                for i, value in zip(chunk, self._score_chunk([images[i] for i in chunk], [names[i] for i in chunk])):
                    out[i] = value
        return out

    def _score_chunk(self, imgs: list[torch.Tensor], names: list[str]) -> list[tuple[float, str]]:
        try:
            with torch.no_grad():
                values = self._fn(torch.stack(imgs), names).reshape(-1).double().cpu().tolist()
        except (RuntimeError, ValueError, AssertionError, IndexError, ZeroDivisionError) as err:
            if len(imgs) > 1:
                return [v for img, n in zip(imgs, names) for v in self._score_chunk([img], [n])]
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return [(math.nan, f"{self.spec.name}: {reason}")]
        return [(v, "") if math.isfinite(v) else (v, f"{self.spec.name}: undefined ({v})") for v in values]


def to_uint8_hwc(img01: torch.Tensor) -> np.ndarray:
    """(3,H,W) RGB in [0,1] -> (H,W,3) uint8 RGB 0-255 (round half up, as MATLAB's im2uint8)."""
    arr = torch.floor(img01.detach().float().cpu().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return arr.permute(1, 2, 0).contiguous().numpy()


def fade_score(img01: torch.Tensor) -> tuple[float, np.ndarray]:
    """FADE of one image through pyfade. img01: (3,H,W) RGB in [0,1], at least 8x8 -> (score, density map
    (H//8, W//8) float64, NaN where a patch has no defined density). Lower is less foggy."""
    import pyfade

    score, density = pyfade.fade_array(to_uint8_hwc(img01), return_map=True)
    return float(score), np.asarray(density, dtype=np.float64)


def density_map_png(density: np.ndarray, path: Path) -> None:
    """Save a FADE density map (h, w) as a colour-mapped PNG, each patch drawn 8x8 (the image's patch grid);
    colours span the map's own finite min..max (matplotlib 'magma': dark = clear, bright = foggy); NaN patches
    grey. Written atomically."""
    from matplotlib import colormaps

    finite = np.isfinite(density)
    lo, hi = (float(density[finite].min()), float(density[finite].max())) if finite.any() else (0.0, 1.0)
    norm = np.where(finite, (density - lo) / max(hi - lo, 1e-12), 0.0)
    rgb = (colormaps["magma"](norm)[..., :3] * 255.0 + 0.5).astype(np.uint8)
    rgb[~finite] = 128
    img01 = torch.from_numpy(np.repeat(np.repeat(rgb, 8, axis=0), 8, axis=1)).permute(2, 0, 1).float() / 255.0
    save_png01(img01, path)


def _per_image(fn: Callable[[torch.Tensor], float]) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    return lambda batch, names: torch.tensor([fn(img) for img in batch], dtype=torch.float64)


def _fade_fn(map_dir: Optional[Path]) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    def score(batch: torch.Tensor, names: list[str]) -> torch.Tensor:
        values = []
        for img, name in zip(batch, names):
            value, density = fade_score(img)
            if map_dir is not None:
                density_map_png(density, map_dir / f"{Path(name).stem}_fade.png")
            values.append(value)
        return torch.tensor(values, dtype=torch.float64)
    return score


def _pyiqa_fn(spec: MetricSpec, weights_dir: Path, device: torch.device,
              allow_download: bool) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """Build pyiqa's metric ``spec.name`` with its defaults; parameter files from ``weights_dir``."""
    if not allow_download:
        missing = missing_files(spec, weights_dir)
        if missing:
            raise MetricUnavailable(f"{spec.name}: missing {', '.join(missing)}; copy the file(s) from a machine "
                                    "where pyiqa downloaded them and pass --metric-weights DIR (DIR/pyiqa/<file>, "
                                    "DIR/clip/<file>, DIR/huggingface/<hub cache>), or run once with "
                                    "--allow-download")
        for rel in spec.files:
            _check_file(weights_dir / rel, rel, spec.name)
    try:
        import pyiqa
    except ImportError as err:
        raise MetricUnavailable(f"{spec.name}: pyiqa is not installed (pip install -r requirements-metrics.txt "
                                f"&& pip install --no-deps pyiqa=={PYIQA_VERSION})") from err
    try:
        if spec.name == "qalign":
            _restore_invert_attention_mask()
        with _pyiqa_reads(spec, weights_dir, allow_download):
            metric = pyiqa.create_metric(spec.name, device=device)
    except (OSError, RuntimeError, ValueError, KeyError, ImportError, pickle.UnpicklingError) as err:
        raise MetricUnavailable(f"{spec.name}: pyiqa could not build it from {weights_dir} "
                                f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
                                ) from err
    metric.eval()
    return lambda batch, names: metric(batch.to(device))


def build_scorer(name: str, weights_dir: Optional[Path] = None, device: Optional[torch.device] = None,
                 batch_size: int = 4, allow_download: bool = False, map_dir: Optional[Path] = None) -> Scorer:
    """Scorer for metric ``name`` (a key of METRICS). weights_dir defaults to pyiqa's cache root
    (torch.hub.get_dir()); device defaults to CUDA when present; map_dir (FADE only): write each image's
    density map there as ``<stem>_fade.png``. Raises MetricUnavailable (one-line message)."""
    spec = METRICS[name]
    if name == "fade":
        if importlib.util.find_spec("pyfade") is None:
            raise MetricUnavailable("fade: fade-python is not installed (pip install -r requirements-metrics.txt)")
        return Scorer(spec, _fade_fn(map_dir), batch_size)
    if name == "niqe_hcdyc":
        return Scorer(spec, _per_image(niqe_mod.niqe), batch_size)
    if name == "brisque_svr":
        return Scorer(spec, _per_image(brisque_mod.brisque), batch_size)
    weights = Path(weights_dir) if weights_dir is not None else Path(torch.hub.get_dir())
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Scorer(spec, _pyiqa_fn(spec, weights, dev, allow_download), batch_size)


def offline_environment() -> None:
    """Forbid Hugging Face downloads in this process unless the user set the variables (call before importing
    pyiqa / huggingface_hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
