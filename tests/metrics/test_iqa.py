"""metrics/iqa.py and evaluate.py's no-reference metrics: FADE equals pyfade and behaves like a fog density,
pyiqa metrics equal pyiqa called directly (offline, with parameter files written here), missing files are one
line and do not stop the other metrics, bad inputs are converted and noted."""
from __future__ import annotations

import io
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import evaluate
from haze.dcp import dcp_dehaze
from metrics import evaluation, iqa
from tools import make_benchmark
from utils.image_io import load_rgb01, save_png01

pyfade = pytest.importorskip("pyfade")
pyiqa = pytest.importorskip("pyiqa")

MUSIQ_FILE = "pyiqa/musiq_koniq_ckpt-e95806b9.pth"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic benchmark (4 photos x 3 betas x 2 airlights) at long side 128."""
    out = tmp_path_factory.mktemp("bench")
    assert make_benchmark.main(["--out", str(out), "--max-side", "128"]) == 0
    return out


def _photo(path: Path, h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth colour image with texture, saved as 8-bit RGB PNG; returns its (H,W,3) uint8 array."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + c) * np.cos(4 * y) for c in range(3)], axis=-1)
    arr = np.clip(np.round((base + 0.08 * g.standard_normal((h, w, 3))) * 255), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="RGB").save(path)
    return arr


def test_fade_through_evaluate_equals_pyfade_on_the_same_files(tmp_path: Path) -> None:
    res = tmp_path / "res"
    for seed in range(3):
        _photo(res / f"img{seed}.png", seed=seed)
    report = evaluation.evaluate_folders(res, None, ["fade"])
    assert len(report.rows) == 3
    for row in report.rows:
        assert row["fade"] == pyfade.fade_image(res / row["image"])


def test_fade_input_convention_is_uint8_rgb_0_255(tmp_path: Path) -> None:
    arr = _photo(tmp_path / "a.png", seed=4)
    img01 = load_rgb01(tmp_path / "a.png")
    converted = iqa.to_uint8_hwc(img01)
    assert converted.dtype == np.uint8 and np.array_equal(converted, arr)
    score, density = iqa.fade_score(img01)
    assert score == pyfade.fade_array(arr)
    assert density.shape == (64 // 8, 96 // 8)
    assert score != pyfade.fade_array(np.ascontiguousarray(arr[..., ::-1]))       # BGR would be caught
    assert score != pyfade.fade_array(arr.astype(np.float64) / 255.0 * 254.0)    # a 0-254 float scale too


def test_fade_is_monotone_in_haze_and_dcp_lowers_it(bench: Path) -> None:
    manifest = json.loads((bench / "manifest.json").read_text())
    clean = {p.stem: iqa.fade_score(load_rgb01(p))[0] for p in (bench / "clean").iterdir()}
    hazy = {}
    for pair in manifest["pairs"]:
        img = load_rgb01(bench / pair["hazy"])
        key = (Path(pair["clean"]).stem, pair["airlight"], pair["beta"])
        hazy[key] = iqa.fade_score(img)[0]
        dehazed = dcp_dehaze(img[None])[0][0]
        assert iqa.fade_score(dehazed)[0] < hazy[key], pair["hazy"]
    for (name, airlight, beta), value in hazy.items():
        assert clean[name] < value, (name, airlight, beta)
    for name in clean:
        for airlight in {a for _, a, _ in hazy}:
            chain = [hazy[(name, airlight, b)] for b in (0.8, 1.6, 2.4)]
            assert chain == sorted(chain) and len(set(chain)) == 3, (name, airlight, chain)


def _write_musiq_weights(weights: Path) -> Path:
    """Random-init MUSIQ (pyiqa's architecture, KonIQ head) saved as the file pyiqa looks for."""
    torch.manual_seed(0)
    net = pyiqa.create_metric("musiq", pretrained=False, device="cpu").net
    path = weights / MUSIQ_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def test_pyiqa_metrics_equal_pyiqa_called_directly_offline(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    musiq_path = _write_musiq_weights(weights)
    g = torch.Generator().manual_seed(1)
    sv = torch.randn(40, 36, generator=g, dtype=torch.float64)
    torch.save((torch.randn(40, generator=g, dtype=torch.float64), sv), weights / "pyiqa/brisque_svm_weights.pth")
    a = np.random.default_rng(2).standard_normal((36, 36))
    scipy.io.savemat(weights / "pyiqa/niqe_modelparameters.mat",
                     {"mu_prisparam": np.random.default_rng(3).standard_normal((1, 36)),
                      "cov_prisparam": a @ a.T + 36 * np.eye(36)})
    x = torch.rand(2, 3, 96, 128, generator=g)
    for name, path in (("musiq", musiq_path), ("brisque", weights / "pyiqa/brisque_svm_weights.pth"),
                       ("niqe", weights / "pyiqa/niqe_modelparameters.mat")):
        ours = iqa.build_scorer(name, weights, torch.device("cpu"), batch_size=2)(list(x), ["a.png", "b.png"])
        direct = pyiqa.create_metric(name, device="cpu", pretrained_model_path=str(path))(x).reshape(-1)
        assert [v for v, _ in ours] == pytest.approx(direct.double().tolist(), rel=1e-6, abs=1e-9), name
        assert all(math.isfinite(v) and note == "" for v, note in ours), name


def _tiny_clip(seed: int, vision_layers: object, vision_width: int, patch: object) -> torch.nn.Module:
    """A small random-init CLIP of pyiqa's own class (OpenAI's tokenizer needs the 49408-token vocabulary and
    77-token context; widths are multiples of 64 because pyiqa's builder infers 64-wide heads)."""
    from pyiqa.archs.clip_model import CLIP

    torch.manual_seed(seed)
    return CLIP(embed_dim=32, image_resolution=224, vision_layers=vision_layers, vision_width=vision_width,
                vision_patch_size=patch, context_length=77, vocab_size=49408, transformer_width=64,
                transformer_heads=1, transformer_layers=1)


def _save(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _clip_archive(model: torch.nn.Module, path: Path) -> Path:
    """Save a CLIP as OpenAI ships it: a traced TorchScript archive (pyiqa's loader builds the model from the
    archive's state dict, so a tiny one loads like the real one)."""
    from pyiqa.archs.clip_imports import clip

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():     # tracer and torch.jit deprecation notes
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), (torch.rand(1, 3, 224, 224), clip.tokenize(["a photo"])),
                                 check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def test_clipiqa_equals_pyiqa_with_the_same_clip_file(tmp_path: Path, caplog) -> None:
    rn50 = _clip_archive(_tiny_clip(0, (1, 1, 1, 1), 64, None), tmp_path / "w" / "clip" / "RN50.pt")
    x = torch.rand(2, 3, 160, 192, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING):
        ours = iqa.build_scorer("clipiqa", tmp_path / "w", torch.device("cpu"), batch_size=2)(list(x), ["a", "b"])
    assert any("not OpenAI's published RN50.pt" in r.getMessage() for r in caplog.records)
    direct = pyiqa.create_metric("clipiqa", device="cpu", backbone=str(rn50))(x).reshape(-1)   # pyiqa's path option
    assert [v for v, _ in ours] == pytest.approx(direct.double().tolist(), rel=1e-6, abs=1e-9)
    assert all(0.0 < v < 1.0 and note == "" for v, note in ours)


def test_liqe_equals_pyiqa_and_ignores_a_stale_prompt_cache(tmp_path: Path, monkeypatch) -> None:
    from pyiqa.archs import clip_model, liqe_arch

    weights = tmp_path / "w"
    vit = _clip_archive(_tiny_clip(1, 1, 64, 32), weights / "clip" / "ViT-B-32.pt")
    liqe_ckpt = {"params": {f"clip_model.{k}": v for k, v in _tiny_clip(2, 1, 64, 32).state_dict().items()}}
    ckpt = _save(liqe_ckpt, weights / "pyiqa" / "liqe_koniq.pt")
    stale = _save(torch.randn(5, 32), tmp_path / "user_cache" / "liqe_text_feat.pt")
    monkeypatch.setattr(liqe_arch, "DEFAULT_CACHE_DIR", str(stale.parent))   # pyiqa's own cache, holding a stale file
    x = torch.rand(2, 3, 224, 288, generator=torch.Generator().manual_seed(4))
    ours = iqa.build_scorer("liqe", weights, torch.device("cpu"), batch_size=2)(list(x), ["a", "b"])
    assert sorted(p.name for p in stale.parent.iterdir()) == ["liqe_text_feat.pt"]
    # pyiqa called directly: its download step replaced by the same file, a fresh prompt cache, the same checkpoint
    monkeypatch.setattr(clip_model, "_download", lambda url, root: str(weights / "clip" / Path(url).name))
    monkeypatch.setattr(liqe_arch, "DEFAULT_CACHE_DIR", str(tmp_path / "fresh_cache"))
    (tmp_path / "fresh_cache").mkdir()
    metric = pyiqa.create_metric("liqe", device="cpu", pretrained_model_path=str(ckpt))
    direct = metric(x).reshape(-1)
    assert [v for v, _ in ours] == pytest.approx(direct.double().tolist(), rel=1e-6, abs=1e-9)
    assert all(1.0 <= v <= 5.0 and note == "" for v, note in ours)
    monkeypatch.setattr(metric.net, "text_features", torch.load(stale, weights_only=True))
    assert metric(x).reshape(-1).double().tolist() != pytest.approx([v for v, _ in ours], rel=1e-6)
    assert vit.is_file()


def _fill_hf_cache(cache: Path, model_name: str, seed: int) -> None:
    """Random-init timm ``model_name`` saved where an offline Hugging Face cache keeps its pretrained file
    (``models--<org>--<repo>/refs/main`` naming a snapshot that holds ``model.safetensors``)."""
    import timm
    from safetensors.torch import save_file

    folder = cache / ("models--" + timm.models.get_pretrained_cfg(model_name).hf_hub_id.replace("/", "--"))
    commit = "0" * 40
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    torch.manual_seed(seed)
    state = timm.create_model(model_name, pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / commit / "model.safetensors")


def _hf_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def timm_metrics(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(weights DIR, filled Hugging Face cache) for nima and maniqa at full size (their timm backbones are fixed by
    pyiqa's defaults): random-init backbones in the HF cache, and pyiqa checkpoints in DIR/pyiqa made of the
    networks pyiqa builds on them with every weight then moved (so a score that equals pyiqa's proves the checkpoint
    replaced the whole backbone). Written once per session: ~1.3 GB of files."""
    root = tmp_path_factory.mktemp("timm")
    cache, weights = root / "hf", root / "w"
    _fill_hf_cache(cache, "inception_resnet_v2", 5)
    _fill_hf_cache(cache, "vit_base_patch8_224", 6)
    with pytest.MonkeyPatch.context() as mp:
        _hf_cache(mp, cache)
        for name, wrap in (("nima", True), ("maniqa", False)):
            net = pyiqa.create_metric(name, device="cpu", pretrained=False).net
            g = torch.Generator().manual_seed(7)
            state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in net.state_dict().items()}
            # each in the format of pyiqa's default file: NIMA's under "params", MANIQA's a bare state dict
            _save({"params": state} if wrap else state, weights / iqa.METRICS[name].files[0])
    return weights, cache


@pytest.mark.parametrize("name", ["nima", "maniqa"])
def test_timm_metrics_equal_pyiqa_without_the_imagenet_backbone(name: str, timm_metrics: tuple[Path, Path],
                                                                 tmp_path: Path, monkeypatch) -> None:
    from pyiqa.archs import maniqa_arch

    weights, cache = timm_metrics
    x = torch.rand(1, 3, 232, 256, generator=torch.Generator().manual_seed(8))
    # MANIQA scores 20 crops of 224 px through ViT-B/8 (~1.5 TFLOP an image: both runs took 175 CPU-s here); one
    # crop, the same for both runs, checks the same wiring (weights, preprocessing, head) 20 times faster
    crops = maniqa_arch.uniform_crop
    monkeypatch.setattr(maniqa_arch, "uniform_crop", lambda img, crop_size, crop_num: crops(img, crop_size, 1))
    _hf_cache(monkeypatch, tmp_path / "empty_hf_cache")   # offline: fails if the project reads a backbone file
    ours = iqa.build_scorer(name, weights, torch.device("cpu"), batch_size=1)(list(x), ["a.png"])
    _hf_cache(monkeypatch, cache)                            # pyiqa called directly: backbone from the HF cache
    metric = pyiqa.create_metric(name, device="cpu", pretrained=False)
    metric.load_weights(str(weights / iqa.METRICS[name].files[0]), weight_keys="params" if name == "nima" else None)
    direct = metric(x).reshape(-1)
    assert [v for v, _ in ours] == pytest.approx(direct.double().tolist(), rel=1e-5, abs=1e-7)
    assert all(math.isfinite(v) and note == "" for v, note in ours)


def _tiny_qalign(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A random-init Q-Align of pyiqa's own mPLUG-Owl2 classes (1 LLaMA layer of width 64, a 28-px ViT, 4 abstractor
    queries, a 60-piece SentencePiece vocabulary trained here on the scoring prompt) written into the Hugging Face
    cache layout pyiqa loads ``q-future/one-align`` from."""
    import sentencepiece as spm
    from pyiqa.archs.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from pyiqa.archs.q_align.configuration_mplug_owl2 import MPLUGOwl2Config
    from pyiqa.archs.q_align.modeling_mplug_owl2 import MPLUGOwl2LlamaForCausalLM

    repo = cache / "models--q-future--one-align"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    text = ["USER: How would you rate the quality of this image?", "ASSISTANT: The quality of the image is",
            "excellent", "good", "fair", "poor", "bad"] * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=proto, vocab_size=60, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (snapshot / "tokenizer.model").write_bytes(proto.getvalue())
    (snapshot / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (snapshot / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 28, "width": 28},
         "size": {"shortest_edge": 28}, "do_resize": True, "do_center_crop": True, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3, "do_convert_rgb": True,
         "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}))
    config = MPLUGOwl2Config(
        vocab_size=60, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=128, architectures=["MPLUGOwl2LlamaForCausalLM"],
        visual_config={"visual_model": {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28,
                                        "patch_size": 14},
                       "visual_abstractor": {"num_learnable_queries": 4, "hidden_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "intermediate_size": 64,
                                             "encoder_hidden_size": 32, "grid_size": 2}})
    _hf_cache(monkeypatch, cache)            # the model's constructor loads the tokenizer and processor from there
    torch.manual_seed(9)
    model = MPLUGOwl2LlamaForCausalLM(config)
    with torch.no_grad():       # weights of order 1, so that the image moves the five level logits visibly in fp16
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    model.save_pretrained(str(snapshot))


def test_qalign_equals_pyiqa_on_a_tiny_random_model(tmp_path: Path, monkeypatch) -> None:
    from pyiqa.archs.q_align import visual_encoder

    weights = tmp_path / "w"
    with pytest.MonkeyPatch.context() as mp:
        _tiny_qalign(weights / "huggingface", mp)
    assert iqa.missing_files(iqa.METRICS["qalign"], weights) == []
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(10))
    ours = iqa.build_scorer("qalign", weights, torch.device("cpu"), batch_size=2)(list(x), ["a.png", "b.png"])

    def additive_mask(self: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:   # Transformers 4's helper
        keep = mask.unsqueeze(1) if mask.dim() == 3 else mask.unsqueeze(1).unsqueeze(1)
        return torch.where(keep.bool(), 0.0, torch.finfo(self.dtype).min).to(self.dtype)

    monkeypatch.setattr(visual_encoder.MplugOwlVisualAbstractorModel, "invert_attention_mask", additive_mask)
    _hf_cache(monkeypatch, weights / "huggingface")
    metric = pyiqa.create_metric("qalign", device="cpu")
    direct = [float(metric(x[i:i + 1]).reshape(())) for i in range(2)]   # pyiqa's Q-Align takes one image a call
    assert [v for v, _ in ours] == pytest.approx(direct, rel=1e-6)
    assert all(1.0 <= v <= 5.0 and note == "" for v, note in ours)
    assert ours[0][0] != ours[1][0]                 # the image reaches the score (weights of order 1, see above)


def test_missing_weights_one_line_error_and_other_metrics_complete(tmp_path: Path, caplog, capsys) -> None:
    weights = tmp_path / "weights"
    _write_musiq_weights(weights)
    res = tmp_path / "res"
    _photo(res / "a.png", seed=5)
    out = tmp_path / "eval"
    with caplog.at_level(logging.ERROR):
        rc = evaluate.main(["--results", str(res), "--out", str(out), "--quiet", "--metric-weights", str(weights),
                            "--no-ref-metrics", "fade,musiq,maniqa,liqe,qalign"])
    assert rc == 1
    doc = json.loads((out / "summary.json").read_text())
    row = doc["per_image"][0]
    assert math.isfinite(row["fade"]) and math.isfinite(row["musiq"])
    assert set(doc["unavailable"]) == {"maniqa", "liqe", "qalign"}
    assert "ckpt_koniq10k.pt" in doc["unavailable"]["maniqa"] and "--metric-weights DIR" in doc["unavailable"]["maniqa"]
    assert "liqe_koniq.pt" in doc["unavailable"]["liqe"] and "ViT-B-32.pt" in doc["unavailable"]["liqe"]
    assert "q-future/one-align/config.json" in doc["unavailable"]["qalign"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "Traceback" not in capsys.readouterr().err


def test_unsafe_or_wrong_weight_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / MUSIQ_FILE
    path.parent.mkdir(parents=True)
    torch.save({"params": {"w": torch.zeros(1)}, "meta": Path("x")}, path)
    with pytest.raises(iqa.MetricUnavailable, match="weights_only=True"):
        iqa.build_scorer("musiq", tmp_path, torch.device("cpu"))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "RN50.pt").write_bytes(b"not OpenAI's archive")
    with pytest.raises(iqa.MetricUnavailable, match=r"clip/RN50.pt is not a TorchScript archive like OpenAI.s RN50.pt"):
        iqa.build_scorer("clipiqa", tmp_path, torch.device("cpu"))


def test_small_gray_16bit_and_rgba_inputs_are_reported_and_converted(tmp_path: Path) -> None:
    res = tmp_path / "res"
    res.mkdir()
    rgb = _photo(tmp_path / "src.png", seed=6)
    gray = rgb.mean(axis=-1).round().astype(np.uint8)
    Image.fromarray(gray, mode="L").save(res / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 7, np.uint8)]), mode="RGBA").save(res / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(res / "gray16.png")
    Image.fromarray(rgb[:6, :40]).save(res / "tiny.png")
    report = evaluation.evaluate_folders(res, None, ["fade", "brisque_svr"])
    rows = {r["image"]: r for r in report.rows}
    assert rows["gray.png"]["converted"] == "grayscale->RGB"
    assert rows["rgba.png"]["converted"] == "alpha dropped"
    assert rows["gray16.png"]["converted"] == "16-bit grayscale->RGB (FADE: rounded to 8 bits)"
    assert rows["tiny.png"]["converted"] == ""
    assert rows["gray.png"]["fade"] == pyfade.fade_array(np.repeat(gray[..., None], 3, axis=-1))
    assert rows["gray16.png"]["fade"] == rows["gray.png"]["fade"]
    assert rows["rgba.png"]["fade"] == pyfade.fade_array(rgb)
    assert math.isnan(rows["tiny.png"]["fade"]) and "40x6 (WxH), needs a side of at least 8" in rows["tiny.png"]["note"]
    assert math.isnan(rows["tiny.png"]["brisque_svr"]) and "brisque_svr" in rows["tiny.png"]["note"]
    assert not report.failed


def test_save_maps_writes_colour_density_maps(tmp_path: Path) -> None:
    res, out = tmp_path / "res", tmp_path / "eval"
    _photo(res / "a.png", seed=7)
    assert evaluate.main(["--results", str(res), "--out", str(out), "--quiet", "--no-ref-metrics", "fade",
                          "--save-maps"]) == 0
    with Image.open(out / "fade_maps" / "a_fade.png") as im:
        assert im.size == (96, 64) and im.mode == "RGB"
        arr = np.asarray(im)
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 4   # colour-mapped, not flat


def test_paper_row_has_the_table_columns_in_order() -> None:
    summary = {"fade": {"mean": 2.484, "std": 0.1, "n": 3, "n_nonfinite": 0},
               "musiq": {"mean": 53.768, "std": 1.0, "n": 3, "n_nonfinite": 0}}
    header, rule, row = evaluation.paper_row("hazy", summary).splitlines()
    assert header == "| method | FADE ↓ | Q-Align ↑ | LIQE ↑ | CLIPIQA ↑ | MANIQA ↑ | MUSIQ ↑ | BRISQUE ↓ |"
    assert row == "| hazy | 2.4840 | n/a | n/a | n/a | n/a | 53.7680 | n/a |"
    assert [iqa.METRICS[m].lower_better for m in iqa.PAPER_PRESET] == [True, False, False, False, False, False, True]


def test_compare_methods_table_json_and_one_chart_per_metric(bench: Path, tmp_path: Path) -> None:
    from tools import compare_methods

    dcp_dir = tmp_path / "dcp"
    for path in sorted((bench / "hazy").iterdir())[:6]:
        save_png01(dcp_dehaze(load_rgb01(path)[None])[0][0], dcp_dir / path.name)
    out = tmp_path / "cmp"
    rc = compare_methods.main(["--methods", f"hazy={bench / 'hazy'}", f"dcp={dcp_dir}", "--out", str(out),
                               "--no-ref-metrics", "fade,brisque_svr,musiq", "--metric-weights", str(tmp_path),
                               "--quiet"])
    assert rc == 1                                                   # musiq has no weights here
    doc = json.loads((out / "comparison.json").read_text())
    assert list(doc) == ["hazy", "dcp"] and doc["dcp"]["fade"]["n"] == 6 and doc["hazy"]["fade"]["n"] == 24
    direct = [iqa.fade_score(load_rgb01(p))[0] for p in sorted(dcp_dir.iterdir())]
    assert doc["dcp"]["fade"]["mean"] == pytest.approx(float(np.mean(direct)), rel=1e-12)
    assert doc["dcp"]["fade"]["mean"] < doc["hazy"]["fade"]["mean"]
    assert sorted(p.name for p in (out / "charts").iterdir()) == ["brisque_svr.png", "fade.png"]
    with Image.open(out / "charts" / "fade.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    table = (out / "comparison.md").read_text().splitlines()
    assert table[2].startswith("| method | n | FADE ↓ | BRISQUE-SVR ↓ | MUSIQ ↑ |")
    assert table[4].startswith("| hazy | 24 |") and table[5].startswith("| dcp | 6 |")
    assert table[4].endswith("| n/a |")
