"""Hierarchical cycle-consistency and text-image alignment losses (HCD-YC extensions).

Not part of "Learning Hazing to Dehazing" (CVPR 2025), which trains both stages with the plain
diffusion noise-prediction loss only. These terms are added on top of it:

* cycle consistency on the one-step clean estimate x̂0 = (z_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ), decoded
  to pixels by the caller, at three levels: pixels (texture-weighted L1), VGG-16 feature maps
  (L1), and a global semantic vector (pooled deep VGG features, cosine);
* in two directions: forward (prediction vs its target) and backward (push the prediction
  through the physical haze model in the opposite direction and compare with the input);
* weighted per sample by the timestep (x̂0 is unreliable at high noise) and by haze density;
* a symmetric InfoNCE loss aligning pooled text conditions with image embeddings.

All images are ``img01``: (B,3,H,W) in [0,1] unless stated otherwise.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.color import rgb_to_ycbcr
from utils.dcp import dcp_dehaze
from utils.fog import sobel

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"
VGG16_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# torchvision vgg16 ``features`` layout (configuration "D"): conv3x3 widths, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def _vgg16_relu_indices() -> dict[str, int]:
    """Map 'reluB_C' names to their index in torchvision's ``vgg16().features`` Sequential."""
    names, block, conv, idx = {}, 1, 0, 0
    for v in _VGG16_CFG:
        if v == "M":
            block, conv, idx = block + 1, 0, idx + 1
        else:
            conv += 1
            names[f"relu{block}_{conv}"] = idx + 1
            idx += 2
    return names


VGG16_RELU_INDEX = _vgg16_relu_indices()


def predict_x0(z_t: torch.Tensor, eps: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """One-step clean estimate of an ε-prediction model (DDPM, Ho et al. 2020, eq. 15).

    z_t, eps: (B,C,H,W) noisy latent and predicted noise; alphas_cumprod_t: (B,) ᾱ_t per sample.
    Returns x̂0 = (z_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ), same shape as z_t.
    """
    if alphas_cumprod_t.shape != (z_t.shape[0],):
        raise ValueError(f"alphas_cumprod_t must be ({z_t.shape[0]},), got {tuple(alphas_cumprod_t.shape)}")
    a = alphas_cumprod_t.to(z_t.dtype).view(-1, *([1] * (z_t.dim() - 1)))
    return (z_t - (1.0 - a).sqrt() * eps) / a.sqrt()


def timestep_weight(
    alphas_cumprod_t: torch.Tensor,
    mode: str = "snr",
    max_t: int | None = None,
    t: torch.Tensor | None = None,
    snr_gamma: float = 5.0,
) -> torch.Tensor:
    """Per-sample cycle-loss weight in [0,1] from ᾱ_t: (B,) -> (B,).

    * ``"snr"``: w = min(SNR, γ) / γ with SNR = ᾱ / (1 - ᾱ) (Min-SNR-γ style clipping, γ =
      ``snr_gamma``): 1 for nearly clean inputs (SNR >= γ), -> 0 as the noise dominates.
    * ``"sqrt_alpha"``: w = sqrt(ᾱ), the signal scale in z_t (≈ 0.07 at t = 999 for SD).
    If ``max_t`` is given (with the integer timesteps ``t``: (B,)), samples with t > max_t get 0.
    """
    a = alphas_cumprod_t.float()
    if mode == "snr":
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
        snr = a / (1.0 - a).clamp_min(1e-12)
        w = snr.clamp(max=snr_gamma) / snr_gamma
    elif mode == "sqrt_alpha":
        w = a.clamp(0.0, 1.0).sqrt()
    else:
        raise ValueError(f"unknown timestep weight mode '{mode}', expected 'snr' or 'sqrt_alpha'")
    if max_t is not None:
        if t is None or t.shape != a.shape:
            raise ValueError("timestep_weight with max_t needs the timesteps t with the same shape as alphas_cumprod_t")
        w = torch.where(t.to(a.device) > max_t, torch.zeros_like(w), w)
    return w


@torch.no_grad()
def region_weight(img01: torch.Tensor, boost: float = 1.0, ratio: float = 1.5) -> torch.Tensor:
    """Texture emphasis map (B,1,H,W): 1 + boost where the Sobel magnitude of the BT.601 luma
    exceeds ``ratio`` x its per-image mean, else 1. Computed on the target, without gradients."""
    gx, gy = sobel(rgb_to_ycbcr(img01)[:, :1])
    mag = torch.sqrt(gx**2 + gy**2)
    textured = mag > ratio * mag.mean(dim=(1, 2, 3), keepdim=True)
    return 1.0 + boost * textured.to(img01.dtype)


def pixel_cycle_loss(
    pred01: torch.Tensor, target01: torch.Tensor, weight_map: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted L1 per sample: sum(w |pred - target|) / sum(w) over C,H,W -> (B,).

    weight_map: (B,1,H,W) (e.g. ``region_weight``) or None (plain mean L1). Normalising by the
    weight sum keeps the scale of a plain L1 whatever the texture fraction.
    """
    diff = (pred01 - target01).abs()
    if weight_map is None:
        return diff.flatten(1).mean(dim=1)
    w = weight_map.to(diff.dtype).expand_as(diff)
    return (w * diff).flatten(1).sum(dim=1) / w.flatten(1).sum(dim=1).clamp_min(1e-12)


class VGGFeatures(nn.Module):
    """Frozen VGG-16 feature extractor (torchvision ``vgg16().features`` architecture).

    Args:
        weights_path: local torchvision VGG-16 state dict (``vgg16-397923af.pth`` via
            ``torch.load(weights_only=True)``, or a ``.safetensors`` file with the same keys).
            Only the ``features.*`` tensors up to the deepest requested layer are used.
        layers: ReLU outputs for the feature loss, names 'reluB_C' as in torchvision's layout.
        semantic_layer: ReLU output that is pooled for the semantic loss (or None).
        allow_random_init: permit ``weights_path=None`` (random weights; tests only).
    Input ``img01``: (B,3,H,W) in [0,1], cast to the module's dtype and ImageNet-normalised
    internally. Parameters never
    require grad and the module stays in eval mode, but gradients flow to the input.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None,
        layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
        semantic_layer: str | None = "relu5_3",
        allow_random_init: bool = False,
    ) -> None:
        super().__init__()
        wanted = list(layers) + ([semantic_layer] if semantic_layer is not None else [])
        unknown = [name for name in wanted if name not in VGG16_RELU_INDEX]
        if unknown or not wanted:
            raise ValueError(f"unknown VGG-16 layers {unknown or wanted}; choose from {list(VGG16_RELU_INDEX)}")
        if weights_path is None and not allow_random_init:
            raise ValueError(
                "VGGFeatures needs local VGG-16 weights: download torchvision's "
                f"'{VGG16_WEIGHTS_FILE}' ({VGG16_WEIGHTS_URL}) and set its path in the config "
                "(e.g. loss.vgg_weights: weights/vgg16-397923af.pth)"
            )
        self.layers = tuple(layers)
        self.semantic_layer = semantic_layer
        self._taps = {VGG16_RELU_INDEX[name]: name for name in wanted}
        self.body = self._build(max(self._taps))
        if weights_path is not None:
            self._load(os.fspath(weights_path))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _build(last_index: int) -> nn.Sequential:
        modules: list[nn.Module] = []
        channels = 3
        for v in _VGG16_CFG:
            if v == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                modules += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU()]
                channels = int(v)
        return nn.Sequential(*modules[: last_index + 1])

    def _load(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"VGG-16 weights not found: {path} (download torchvision's '{VGG16_WEIGHTS_FILE}' "
                f"from {VGG16_WEIGHTS_URL})"
            )
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a torchvision VGG-16 state dict, got {type(state).__name__}")
        needed = {f"features.{k}": v for k, v in self.body.state_dict().items()}
        missing = [k for k in needed if k not in state]
        if missing:
            raise KeyError(f"{path}: not a torchvision VGG-16 state dict, missing keys {missing[:4]}")
        bad = [k for k, v in needed.items() if tuple(state[k].shape) != tuple(v.shape)]
        if bad:
            raise ValueError(f"{path}: shape mismatch for {bad[:4]} (expected torchvision VGG-16)")
        self.body.load_state_dict({k[len("features."):]: state[k] for k in needed})

    def train(self, mode: bool = True) -> "VGGFeatures":
        """Always stays in eval mode (frozen network)."""
        return super().train(False)

    def forward(self, img01: torch.Tensor) -> dict[str, torch.Tensor]:
        """img01: (B,3,H,W) in [0,1] -> {layer name: (B,C_l,H_l,W_l)} for ``layers`` + semantic layer."""
        x = (img01.to(self.mean.dtype) - self.mean) / self.std
        out: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self.body):
            x = module(x)
            if i in self._taps:
                out[self._taps[i]] = x
        return out


def feature_cycle_loss(
    feats_pred: Mapping[str, torch.Tensor],
    feats_target: Mapping[str, torch.Tensor],
    layer_weights: Mapping[str, float],
) -> torch.Tensor:
    """Perceptual loss per sample: sum_l w_l * mean |φ_l(pred) - φ_l(target)| -> (B,)."""
    if not layer_weights:
        raise ValueError("layer_weights is empty")
    total = None
    for name, w in layer_weights.items():
        if name not in feats_pred or name not in feats_target:
            raise KeyError(f"feature layer '{name}' missing from the VGG outputs")
        term = w * (feats_pred[name] - feats_target[name]).abs().flatten(1).mean(dim=1)
        total = term if total is None else total + term
    return total


def semantic_cycle_loss(
    feat_pred: torch.Tensor, feat_target: torch.Tensor, mode: str = "cosine"
) -> torch.Tensor:
    """Global semantic loss on deep features (B,C,h,w), global-average-pooled to (B,C) -> (B,).

    ``"cosine"``: 1 - cos(p, q), clamped at 0 (float rounding can put it a hair below zero for
    parallel vectors), in [0,2]; ``"l2"``: mean squared difference of the pooled vectors. Both are
    minimised (0) by ``feat_pred == feat_target``.
    """
    p = feat_pred.mean(dim=(2, 3))
    q = feat_target.mean(dim=(2, 3))
    if mode == "cosine":
        return (1.0 - F.cosine_similarity(p, q, dim=1, eps=1e-8)).clamp_min(0.0)
    if mode == "l2":
        return ((p - q) ** 2).mean(dim=1)
    raise ValueError(f"unknown semantic loss mode '{mode}', expected 'cosine' or 'l2'")


def rehaze(clean01: torch.Tensor, t: torch.Tensor, airlight: torch.Tensor) -> torch.Tensor:
    """Atmospheric scattering model I = J t + A (1 - t) (Koschmieder; as in DCP).

    clean01: (B,3,H,W) J in [0,1]; t: (B,1,H,W) transmission; airlight: (B,3) A. Returns I (B,3,H,W).
    """
    a = airlight.to(clean01.dtype)[:, :, None, None]
    return clean01 * t + a * (1.0 - t)


@torch.no_grad()
def dcp_estimates(hazy01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DCP transmission (guided-filter refined, >= 0.1) and airlight of hazy01: -> (t (B,1,H,W), A (B,3))."""
    _, t, airlight = dcp_dehaze(hazy01.detach().float().clamp(0.0, 1.0))
    return t.to(hazy01.dtype), airlight.to(hazy01.dtype)


def dehaze_with_dcp(hazy01: torch.Tensor, t_floor: float = 0.1) -> torch.Tensor:
    """Invert the haze model with DCP estimates: J = (I - A) / max(t, t_floor) + A -> (B,3,H,W).

    t and A are estimated from ``hazy01`` without gradients and treated as constants, so the
    result is differentiable w.r.t. ``hazy01``; it is not clamped (clamping would stop gradients).
    """
    t, airlight = dcp_estimates(hazy01)
    a = airlight[:, :, None, None]
    return (hazy01 - a) / t.clamp_min(t_floor) + a


def haze_density_weights(
    rho: torch.Tensor, lam_pixel: float, lam_feature: float, lam_semantic: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-adaptive level weights, rho: (B,) in [0,1] -> three (B,) tensors:
    λ_pixel (1 - 0.5 ρ), λ_feature (1 + 0.5 ρ), λ_semantic (1 + 0.5 ρ): dense haze leans on
    features / semantics rather than exact pixels."""
    return lam_pixel * (1.0 - 0.5 * rho), lam_feature * (1.0 + 0.5 * rho), lam_semantic * (1.0 + 0.5 * rho)


def cycle_schedule(step: int, start_step: int, ramp_steps: int) -> float:
    """Cycle-loss multiplier: 0 before ``start_step`` (warm-up), then linear to 1 over ``ramp_steps``."""
    if step < start_step:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start_step) / ramp_steps)


def alignment_schedule(step: int, max_step: int) -> float:
    """Alignment-loss multiplier: linear ramp from 0 at step 0 to 1 at ``max_step``, then 1."""
    if max_step <= 0:
        return 1.0
    return min(1.0, max(0.0, step / max_step))


class HierarchicalCycleLoss(nn.Module):
    """Hierarchical (pixel / feature / semantic), bidirectional cycle-consistency loss.

    Per sample, with L(a, b) = λp·pixel(a, b; region_weight(b)) + λf·feature(a, b) + λs·semantic(a, b)
    (λ density-adapted by ``haze_density_weights`` when rho is given):

        stage 2 (DiffDehaze): pred = dehazed x̂, target = clean, cond = hazy input
            forward  = L(x̂, clean)
            backward = L(rehaze(x̂, t_dcp(hazy), A_dcp(hazy)), hazy)
        stage 1 (HazeGen): pred = generated hazy, target = hazy target, cond = clean condition
            forward  = L(pred, hazy target)
            backward = L(dehaze_with_dcp(pred), clean condition)

        loss_i = w_t(i) · m_i · (forward_weight · forward_i + backward_weight · backward_i)
        total  = mean_i loss_i

    w_t: ``timestep_weight``; m_i: ``sample_mask`` (e.g. 0 where stage 1 dropped the condition).
    ``vgg`` may be None only if feature_weight and semantic_weight are both 0.
    """

    def __init__(
        self,
        vgg: VGGFeatures | None,
        pixel_weight: float = 1.0,
        feature_weight: float = 0.1,
        semantic_weight: float = 0.05,
        forward_weight: float = 0.7,
        backward_weight: float = 0.3,
        layer_weights: Mapping[str, float] | None = None,
        timestep_mode: str = "snr",
        max_t: int | None = None,
        region_boost: float = 1.0,
        semantic_mode: str = "cosine",
    ) -> None:
        super().__init__()
        self.use_vgg = feature_weight != 0 or semantic_weight != 0
        if self.use_vgg and vgg is None:
            raise ValueError("HierarchicalCycleLoss: feature/semantic weights are non-zero but vgg is None")
        self.vgg = vgg
        if layer_weights is None:
            layers = vgg.layers if vgg is not None else ()
            layer_weights = {name: 1.0 / len(layers) for name in layers}
        if self.use_vgg:
            missing = [name for name in layer_weights if name not in vgg.layers]
            if missing:
                raise ValueError(f"layer_weights name layers the VGG does not output: {missing}")
            if semantic_weight != 0 and vgg.semantic_layer is None:
                raise ValueError("semantic_weight is non-zero but the VGG has no semantic_layer")
        self.layer_weights = dict(layer_weights)
        self.pixel_weight = pixel_weight
        self.feature_weight = feature_weight
        self.semantic_weight = semantic_weight
        self.forward_weight = forward_weight
        self.backward_weight = backward_weight
        self.timestep_mode = timestep_mode
        self.max_t = max_t
        self.region_boost = region_boost
        self.semantic_mode = semantic_mode

    def _directions(
        self, stage: int, pred01: torch.Tensor, target01: torch.Tensor, cond01: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (forward pred, forward target, backward pred, backward target)."""
        if stage == 2:
            t, airlight = dcp_estimates(cond01)
            return pred01, target01, rehaze(pred01, t, airlight), cond01
        if stage == 1:
            return pred01, target01, dehaze_with_dcp(pred01), cond01
        raise ValueError(f"stage must be 1 or 2, got {stage}")

    def _levels(self, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted per-sample level losses for stacked (2B,3,H,W) pairs -> {level: (2B,)}."""
        out = {"pixel": pixel_cycle_loss(preds, targets, region_weight(targets, self.region_boost))}
        zeros = preds.new_zeros(preds.shape[0])
        out["feature"], out["semantic"] = zeros, zeros
        if self.use_vgg:
            fp = self.vgg(preds)
            with torch.no_grad():
                ft = self.vgg(targets)
            if self.feature_weight != 0:
                out["feature"] = feature_cycle_loss(fp, ft, self.layer_weights)
            if self.semantic_weight != 0:
                sl = self.vgg.semantic_layer
                out["semantic"] = semantic_cycle_loss(fp[sl], ft[sl], self.semantic_mode)
        return out

    def forward(
        self,
        stage: int,
        pred01: torch.Tensor,
        target01: torch.Tensor,
        cond01: torch.Tensor,
        alphas_cumprod_t: torch.Tensor,
        rho: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        sample_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cycle loss for one batch.

        pred01, target01, cond01: (B,3,H,W) in [0,1] (roles per stage, see class docstring);
        alphas_cumprod_t: (B,) ᾱ of the sampled timesteps; rho: (B,) haze density or None
        (constant weights); timesteps: (B,) ints, needed when ``max_t`` is set; sample_mask: (B,)
        bool/float or None. Returns (total float32 scalar, {component: detached scalar} for logging).
        Images are promoted to float32 (the losses sum over many pixels).
        """
        pred01, target01, cond01 = pred01.float(), target01.float(), cond01.float()
        b = pred01.shape[0]
        if target01.shape != pred01.shape or cond01.shape != pred01.shape:
            raise ValueError(
                f"pred01, target01, cond01 must share a shape, got {tuple(pred01.shape)}, "
                f"{tuple(target01.shape)}, {tuple(cond01.shape)}"
            )
        fwd_pred, fwd_tgt, bwd_pred, bwd_tgt = self._directions(stage, pred01, target01, cond01)
        levels = self._levels(torch.cat([fwd_pred, bwd_pred]), torch.cat([fwd_tgt, bwd_tgt]).detach())

        if rho is None:
            lam = {name: pred01.new_full((b,), w) for name, w in (
                ("pixel", self.pixel_weight), ("feature", self.feature_weight), ("semantic", self.semantic_weight))}
        else:
            lam = dict(zip(("pixel", "feature", "semantic"), haze_density_weights(
                rho.to(pred01), self.pixel_weight, self.feature_weight, self.semantic_weight)))
        per_direction = {}
        for d, sl in (("forward", slice(0, b)), ("backward", slice(b, 2 * b))):
            per_direction[d] = sum(lam[name] * levels[name][sl] for name in lam)

        w_t = timestep_weight(alphas_cumprod_t, self.timestep_mode, self.max_t, timesteps).to(pred01)
        if sample_mask is not None:
            w_t = w_t * sample_mask.to(w_t)
        per_sample = w_t * (self.forward_weight * per_direction["forward"]
                            + self.backward_weight * per_direction["backward"])
        total = per_sample.mean()

        logs = {"cycle_total": total.detach(), "cycle_timestep_weight": w_t.detach().mean()}
        for d, sl in (("fwd", slice(0, b)), ("bwd", slice(b, 2 * b))):
            for name in ("pixel", "feature", "semantic"):
                logs[f"cycle_{d}_{name}"] = levels[name][sl].detach().mean()
        return total, logs


def info_nce(text_emb: torch.Tensor, img_emb: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss) with in-batch negatives.

    text_emb, img_emb: (B,D), row i of each is a positive pair; both are L2-normalised here.
    Returns the scalar (CE(text->image) + CE(image->text)) / 2 of logits cos / temperature.
    """
    if text_emb.shape != img_emb.shape or text_emb.dim() != 2:
        raise ValueError(
            f"text_emb and img_emb must both be (B,D), got {tuple(text_emb.shape)}, {tuple(img_emb.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    t = F.normalize(text_emb.float(), dim=1)
    i = F.normalize(img_emb.float(), dim=1)
    logits = t @ i.t() / temperature
    labels = torch.arange(t.shape[0], device=t.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class ImageEmbedder(nn.Module):
    """Small trainable image encoder for the alignment loss: img01 (B,3,H,W) in [0,1] -> (B,dim).

    Three stride-2 3x3 conv + SiLU stages (width, 2·width, 4·width channels), global average
    pooling and a linear projection to ``dim`` (the text width, 1024 for SD 2.1).
    """

    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, dim),
        )

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        """img01: (B,3,H,W) in [0,1] -> (B,dim)."""
        return self.net(img01 * 2.0 - 1.0)
