"""Hierarchical, bidirectional cycle-consistency loss (HCD-YC extension, not in "Learning Hazing to Dehazing").

The paper trains both stages with the plain diffusion noise-prediction loss only. This term is added on top of it,
on the one-step clean estimate x̂0 (``model.gaussian_diffusion.predict_x0``) decoded to pixels by the caller:

* at three levels: pixels (region-weighted L1), VGG-16 feature maps (region-weighted L1, :mod:`losses.vgg`), and a
  global semantic vector (pooled deep VGG features, cosine);
* in the two physical directions of the atmospheric model I = J t + A (1 - t) (:mod:`haze.scattering`):
  forward = dehazing (hazy -> clean, compared in the clean domain), backward = hazing (clean -> hazy, compared in
  the hazy domain), with the same meaning in both stages; every term compares op(prediction) with op(ground truth)
  for one fixed operator op, so the ground truth is always a minimiser (0 at the ground truth, see
  :class:`HierarchicalCycleLoss`);
* with per-region weights (sky / textured structure / smooth, :func:`haze.regions.region_labels`);
* weighted per sample by the timestep (x̂0 is unreliable at high noise) and by haze density.

All images are ``img01``: (B,3,H,W) in [0,1] unless stated otherwise.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from haze.dcp import dark_channel, estimate_airlight
from haze.regions import REGIONS, region_labels
from haze.scattering import fit_transmission, recover, rehaze
from losses.vgg import VGGFeatures


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


def region_weight_map(labels: torch.Tensor, weights: Mapping[str, float]) -> torch.Tensor:
    """Per-pixel weights from region labels: labels (B,1,H,W) int indexing ``haze.regions.REGIONS`` ->
    (B,1,H,W) float32 with ``weights[name]`` on the pixels of region ``name`` (every region must be given)."""
    missing = [name for name in REGIONS if name not in weights]
    if missing:
        raise KeyError(f"region weights missing for {missing}")
    table = torch.tensor([float(weights[name]) for name in REGIONS], device=labels.device)
    return table[labels]


def pixel_cycle_loss(
    pred01: torch.Tensor, target01: torch.Tensor, weight_map: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted L1 per sample: sum(w |pred - target|) / sum(w) over C,H,W -> (B,); 0 iff pred == target
    on the pixels with w > 0.

    weight_map: (B,1,H,W) (e.g. ``region_weight_map``) or None (plain mean L1). Normalising by the
    weight sum keeps the scale of a plain L1 whatever the region fractions; a sample whose weights
    are all 0 gives 0.
    """
    diff = (pred01 - target01).abs()
    if weight_map is None:
        return diff.flatten(1).mean(dim=1)
    w = weight_map.to(diff.dtype).expand_as(diff)
    return (w * diff).flatten(1).sum(dim=1) / w.flatten(1).sum(dim=1).clamp_min(1e-12)


def feature_cycle_loss(
    feats_pred: Mapping[str, torch.Tensor],
    feats_target: Mapping[str, torch.Tensor],
    layer_weights: Mapping[str, float],
    weight_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Perceptual loss per sample: sum_l w_l * pixel_cycle_loss(φ_l(pred), φ_l(target), m_l) -> (B,).

    weight_map: (B,1,H,W) per-pixel weights (or None: plain mean), area-averaged to each layer's
    resolution (m_l), so a region weight applies to the feature cells it covers.
    """
    if not layer_weights:
        raise ValueError("layer_weights is empty")
    total = None
    for name, w in layer_weights.items():
        if name not in feats_pred or name not in feats_target:
            raise KeyError(f"feature layer '{name}' missing from the VGG outputs")
        fp, ft = feats_pred[name], feats_target[name]
        m = None if weight_map is None else F.adaptive_avg_pool2d(weight_map.to(fp.dtype), fp.shape[-2:])
        term = w * pixel_cycle_loss(fp, ft, m)
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


@torch.no_grad()
def dcp_airlight(hazy01: torch.Tensor) -> torch.Tensor:
    """DCP airlight of hazy01 (B,3,H,W) in [0,1] (15x15 dark channel, top 0.1 %) -> (B,3), no gradients."""
    img = hazy01.detach().float().clamp(0.0, 1.0)
    return estimate_airlight(img, dark_channel(img)).to(hazy01.dtype)


def haze_density_weights(
    rho: torch.Tensor, lam_pixel: float, lam_feature: float, lam_semantic: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-adaptive level weights, rho: (B,) in [0,1] -> three (B,) tensors:
    λ_pixel (1 - 0.5 ρ), λ_feature (1 + 0.5 ρ), λ_semantic (1 + 0.5 ρ): dense haze leans on
    features / semantics rather than exact pixels."""
    return lam_pixel * (1.0 - 0.5 * rho), lam_feature * (1.0 + 0.5 * rho), lam_semantic * (1.0 + 0.5 * rho)


DEFAULT_REGION_WEIGHTS: dict[str, float] = {"sky": 0.5, "texture": 2.0, "smooth": 1.0}


class HierarchicalCycleLoss(nn.Module):
    """Hierarchical (pixel / feature / semantic), bidirectional cycle-consistency loss.

    Each sample has a clean image J and a hazy image I related by the atmospheric model with a transmission t and an
    airlight A (``haze.scattering``): stage 2 (DiffDehaze, hazy -> clean) predicts x̂ ≈ J from the condition I; stage 1
    (HazeGen, clean -> hazy) predicts ŷ ≈ I from the condition J. With t clamped at ``t_floor``, H = rehaze(·, t, A)
    and D = recover(·, t, A), the two directions are

        forward  (dehazing, hazy -> clean, compared in the clean domain):
            stage 2: L(x̂, J)                   stage 1: L(D(ŷ), D(I))
        backward (hazing, clean -> hazy, compared in the hazy domain):
            stage 2: L(H(x̂), H(J))             stage 1: L(ŷ, I)

    with L(a, b) = λp·pixel(a, b; m) + λf·feature(a, b; m) + λs·semantic(a, b), m the region weight map
    (``region_weights`` on ``haze.regions.region_labels(I, J, A)``), λ density-adapted by ``haze_density_weights`` when
    rho is given. Both sides of every comparison go through the same fixed operator (t, A carry no gradient), so each
    term is >= 0 and exactly 0 at the ground truth (x̂ = J, ŷ = I): the ground truth is a minimiser of every term, for
    any (t, A), also when I is not exactly J t + A (1 - t) (RIDCP's gamma, noise and JPEG). The pixel terms are
    minimised only there: |H(x̂) - H(J)| = t |x̂ - J|, |D(ŷ) - D(I)| = |ŷ - I| / t.

    Where (t, A) come from:
    * stage 1: the true t and A of the synthetic sample (``dataset.HybridTrainingData`` makes them from depth, β and
      A); real hazy photos have no clean image and no (t, A) and are masked out (``sample_mask``);
    * stage 2, when not given: A = DCP airlight of I and t = ``haze.scattering.fit_transmission(I, J, A)``, the per-pixel
      least-squares t* = Σ_c (I_c − A_c)(J_c − A_c) / Σ_c (J_c − A_c)², so that H(J) is the part of the hazy input the
      atmospheric model explains (H(J) = I on exact pairs with the same A). No DCP transmission estimate is involved,
      so its bias cannot move the minimiser (the former DCP-based terms had their optimum at the DCP re-hazing).

        loss_i = w_t(i) · m_i · (forward_weight · forward_i + backward_weight · backward_i)
        total  = mean_i loss_i

    w_t: ``timestep_weight``; m_i: ``sample_mask``. ``vgg`` may be None only if feature_weight and semantic_weight are
    both 0.
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
        region_weights: Mapping[str, float] | None = None,
        semantic_mode: str = "cosine",
        t_floor: float = 0.1,
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
        region_weights = dict(DEFAULT_REGION_WEIGHTS if region_weights is None else region_weights)
        if sorted(region_weights) != sorted(REGIONS) or any(w < 0 for w in region_weights.values()):
            raise ValueError(f"region_weights must give a weight >= 0 to each of {REGIONS}, got {region_weights}")
        if not 0.0 < t_floor <= 1.0:
            raise ValueError(f"t_floor must be in (0,1], got {t_floor}")
        self.layer_weights = dict(layer_weights)
        self.pixel_weight = pixel_weight
        self.feature_weight = feature_weight
        self.semantic_weight = semantic_weight
        self.forward_weight = forward_weight
        self.backward_weight = backward_weight
        self.timestep_mode = timestep_mode
        self.max_t = max_t
        self.region_weights = region_weights
        self.semantic_mode = semantic_mode
        self.t_floor = t_floor

    def haze_parameters(
        self, clean01: torch.Tensor, hazy01: torch.Tensor,
        transmission: torch.Tensor | None, airlight: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B,1,H,W) in [t_floor,1], A (B,3)) of the pairs: the given ones, else fitted (see class docstring)."""
        if (transmission is None) != (airlight is None):
            raise ValueError("give both transmission and airlight, or neither")
        if transmission is None:
            airlight = dcp_airlight(hazy01)
            transmission = fit_transmission(hazy01, clean01, airlight)
        b, _, h, w = clean01.shape
        if transmission.shape != (b, 1, h, w) or airlight.shape != (b, 3):
            raise ValueError(f"transmission must be ({b},1,{h},{w}) and airlight ({b},3), got "
                             f"{tuple(transmission.shape)}, {tuple(airlight.shape)}")
        return transmission.detach().float().clamp(self.t_floor, 1.0), airlight.detach().float()

    def directions(
        self, stage: int, pred01: torch.Tensor, clean01: torch.Tensor, hazy01: torch.Tensor,
        t: torch.Tensor, airlight: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (forward pred, forward target, backward pred, backward target), see the class docstring."""
        if stage == 2:
            return pred01, clean01, rehaze(pred01, t, airlight), rehaze(clean01, t, airlight)
        if stage == 1:
            return recover(pred01, t, airlight), recover(hazy01, t, airlight), pred01, hazy01
        raise ValueError(f"stage must be 1 or 2, got {stage}")

    def _levels(self, preds: torch.Tensor, targets: torch.Tensor, weight_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted per-sample level losses for stacked (2B,3,H,W) pairs -> {level: (2B,)}."""
        out = {"pixel": pixel_cycle_loss(preds, targets, weight_map)}
        zeros = preds.new_zeros(preds.shape[0])
        out["feature"], out["semantic"] = zeros, zeros
        if self.use_vgg:
            fp = self.vgg(preds)
            with torch.no_grad():
                ft = self.vgg(targets)
            if self.feature_weight != 0:
                out["feature"] = feature_cycle_loss(fp, ft, self.layer_weights, weight_map)
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
        transmission: torch.Tensor | None = None,
        airlight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cycle loss for one batch.

        pred01, target01, cond01: (B,3,H,W) in [0,1] (stage 2: x̂, J, I; stage 1: ŷ, I, J);
        alphas_cumprod_t: (B,) ᾱ of the sampled timesteps; rho: (B,) haze density or None
        (constant weights); timesteps: (B,) ints, needed when ``max_t`` is set; sample_mask: (B,)
        bool/float or None; transmission (B,1,H,W) and airlight (B,3): the pairs' haze parameters
        (required in stage 1; fitted when None in stage 2). Returns (total float32 scalar,
        {component: detached scalar} for logging). Images are promoted to float32.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        pred01, target01, cond01 = pred01.float(), target01.float(), cond01.float()
        b = pred01.shape[0]
        if target01.shape != pred01.shape or cond01.shape != pred01.shape:
            raise ValueError(
                f"pred01, target01, cond01 must share a shape, got {tuple(pred01.shape)}, "
                f"{tuple(target01.shape)}, {tuple(cond01.shape)}"
            )
        if stage == 1 and transmission is None:
            raise ValueError("the stage-1 cycle loss needs the true transmission and airlight of the synthetic pairs "
                             "(batch keys 'transmission' and 'airlight' from dataset.HybridTrainingData)")
        clean01, hazy01 = (target01, cond01) if stage == 2 else (cond01, target01)
        t, a = self.haze_parameters(clean01, hazy01, transmission, airlight)
        fwd_pred, fwd_tgt, bwd_pred, bwd_tgt = self.directions(stage, pred01, clean01, hazy01, t, a)
        weight_map = region_weight_map(region_labels(hazy01, clean01, a), self.region_weights)
        levels = self._levels(torch.cat([fwd_pred, bwd_pred]), torch.cat([fwd_tgt, bwd_tgt]).detach(),
                              torch.cat([weight_map, weight_map]))

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
