import random

import pytest
import torch
import torch.nn.functional as F

from haze.filters import sobel
from haze.fog import FOG_FEATURE_DIM, FOG_FEATURE_NAMES, analyze_fog, density_level, fog_features
from haze.prompts import PUBLISHED_PROMPTS, build_prompt, prompts_from_infos

S = 96
AIRLIGHT = torch.tensor([0.85, 0.88, 0.92]).view(1, 3, 1, 1)


def colourful_scene(seed: int) -> torch.Tensor:
    """Smooth random colours plus fine texture: (1,3,S,S) in [0,1]; obeys the dark channel prior."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(S, S), mode="bicubic", align_corners=False)
    return (0.05 + 0.8 * low + 0.15 * (torch.rand(1, 1, S, S, generator=g) - 0.5)).clamp(0, 1)


def facade_scene(seed: int, sky: bool) -> torch.Tensor:
    """Axis-aligned blocks with a window grid; optional flat bright sky in the top third."""
    g = torch.Generator().manual_seed(seed)
    cells = F.interpolate(0.2 + 0.5 * torch.rand(1, 1, 6, 6, generator=g), size=(S, S), mode="nearest")
    img = cells * torch.tensor([1.0, 0.9, 0.8]).view(1, 3, 1, 1)
    window = ((torch.arange(S) % 8) < 3).float()
    img = img * (1 - 0.5 * window.view(1, 1, S, 1) * window.view(1, 1, 1, S))
    if sky:
        img[:, :, : S // 3] = torch.tensor([0.8, 0.85, 0.9]).view(1, 3, 1, 1)
    return img


def vegetation_scene(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(1, 1, 6, 6, generator=g), size=(S, S), mode="bicubic", align_corners=False)
    img = torch.cat([0.15 + 0.2 * low, 0.35 + 0.4 * low, 0.1 + 0.1 * low], dim=1)
    img = img + 0.1 * (torch.rand(1, 1, S, S, generator=g) - 0.5)
    img[:, :, : S // 4] = torch.tensor([0.8, 0.85, 0.9]).view(1, 3, 1, 1)
    return img.clamp(0, 1)


def haze(clean01: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Atmospheric scattering model I = J t + A (1 - t)."""
    return clean01 * t + AIRLIGHT * (1 - t)


def const_t(beta: float, depth: float = 1.0) -> torch.Tensor:
    return torch.full((1, 1, S, S), float(torch.exp(torch.tensor(-beta * depth))))


@pytest.mark.parametrize("seed", [0, 1])
def test_density_increases_with_beta(seed):
    clean = colourful_scene(seed)
    betas = [0.0, 0.25, 0.5, 1.0, 1.5, 2.5]
    batch = torch.cat([haze(clean, const_t(b)) for b in betas])
    rho = [info.density for info in analyze_fog(batch)]
    assert all(a < b for a, b in zip(rho, rho[1:])), rho
    assert all(0.0 <= r <= 1.0 for r in rho)
    levels = [density_level(r) for r in rho]
    assert levels[0] == "light" and levels[-1] == "dense"


def test_density_levels_thresholds():
    assert [density_level(r) for r in (0.0, 0.51, 0.52, 0.75, 0.76, 1.0)] == [
        "light", "light", "moderate", "moderate", "dense", "dense"
    ]


def test_haze_type_labels():
    clean = colourful_scene(2)
    y = torch.linspace(0, 1, S).view(1, 1, S, 1).expand(1, 1, S, S)
    x = torch.arange(S).view(1, 1, 1, S).expand(1, 1, S, S)
    t_layered = 0.15 + 0.75 * y
    t_patchy = torch.where(x < S // 2, torch.tensor(0.2), torch.tensor(0.9))
    batch = torch.cat([haze(clean, const_t(1.0)), haze(clean, t_layered), haze(clean, t_patchy)])
    uniform, layered, patchy = analyze_fog(batch)
    assert uniform.haze_type == "uniform"
    assert layered.haze_type == "layered"
    assert layered.stats()["vertical_span"] > 0.35
    assert patchy.haze_type == "non-uniform"


def test_scene_labels():
    t = const_t(0.7)
    batch = torch.cat([
        haze(facade_scene(0, sky=True), t),
        haze(facade_scene(1, sky=False), t),
        haze(vegetation_scene(0), t),
    ])
    assert [info.scene for info in analyze_fog(batch)] == ["urban", "indoor", "natural"]


def test_features_batch_consistent_and_deterministic():
    batch = torch.cat([haze(colourful_scene(3), const_t(0.6)), haze(facade_scene(2, True), const_t(1.2))])
    infos = analyze_fog(batch)
    feats = fog_features(infos)
    assert feats.shape == (2, FOG_FEATURE_DIM) == (2, len(FOG_FEATURE_NAMES))
    assert feats.dtype == torch.float32
    assert torch.equal(feats, fog_features(analyze_fog(batch)))
    single = fog_features(analyze_fog(batch[1:]))
    assert torch.allclose(feats[1:], single, atol=1e-5)
    assert infos[0].stats()["density"] == pytest.approx(infos[0].density)


def test_downscale_keeps_statistics_close():
    img = haze(colourful_scene(4), const_t(0.8))
    big = F.interpolate(img, scale_factor=3, mode="bilinear", align_corners=False)
    small_rho = analyze_fog(img, max_side=S)[0].density
    big_rho = analyze_fog(big, max_side=S)[0].density
    assert big_rho == pytest.approx(small_rho, abs=0.02)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="img01"):
        analyze_fog(torch.rand(3, S, S))
    with pytest.raises(ValueError):
        fog_features([])


def test_sobel_step_edge():
    y = torch.zeros(1, 1, 5, 6)
    y[..., 3:] = 0.4
    gx, gy = sobel(y)
    assert torch.allclose(gx[0, 0, :, 2], torch.full((5,), 0.2))
    assert torch.allclose(gx[0, 0, :, 3], torch.full((5,), 0.2))
    assert torch.allclose(gx[0, 0, :, 0], torch.zeros(5))
    assert torch.allclose(gy, torch.zeros_like(gy))


def _info(level: str, haze_type: str, scene: str):
    base = analyze_fog(haze(colourful_scene(0), const_t(1.0)))[0]
    return type(base)(density=0.7, level=level, haze_type=haze_type, scene=scene, features=base.features)


def test_build_prompt_first_choice():
    info = _info("dense", "uniform", "urban")
    stage2 = build_prompt(info, stage=2)
    assert stage2 == "remove dense fog, evenly spread haze, clear city street"
    assert stage2.startswith(PUBLISHED_PROMPTS[2])
    stage1 = build_prompt(info, stage=1)
    assert stage1 == "dense fog, evenly spread haze over the city street, hazy, foggy, misty, obscure, smoggy."
    assert stage1.endswith(PUBLISHED_PROMPTS[1])


def test_build_prompt_rng_deterministic_and_varied():
    infos = [_info("light", "layered", "natural"), _info("moderate", "non-uniform", "indoor")] * 10
    a = prompts_from_infos(infos, 1, random.Random(7))
    b = prompts_from_infos(infos, 1, random.Random(7))
    assert a == b
    assert len(set(a)) > 2
    assert prompts_from_infos(infos[:2], 2, None) == [
        "remove light haze, layered haze, clear natural landscape",
        "remove moderate fog, patchy haze, clear indoor room",
    ]


def test_build_prompt_rejects_bad_input():
    with pytest.raises(ValueError, match="stage"):
        build_prompt(_info("dense", "uniform", "urban"), stage=3)
    with pytest.raises(ValueError, match="scene"):
        build_prompt(_info("dense", "uniform", "space"), stage=1)


def test_dynamic_prompts_follow_density():
    clean = colourful_scene(5)
    batch = torch.cat([haze(clean, const_t(0.0)), haze(clean, const_t(2.5))])
    light, dense = prompts_from_infos(analyze_fog(batch), stage=2, rng=None)
    assert light.startswith("remove light haze")
    assert dense.startswith("remove dense fog")


def test_non_uniform_needs_gradients_that_follow_the_transmission():
    """Same left/right transmission step twice: on a scene textured everywhere the gradients follow t (agreement
    near 1, non-uniform); when all texture sits in the hazy half, the clear half's gradients contradict it
    (agreement < 0) and the step is read as scene content (uniform)."""
    x = torch.arange(S).view(1, 1, 1, S).expand(1, 1, S, S)
    t = torch.where(x < S // 2, torch.tensor(0.3), torch.tensor(0.9))
    textured = colourful_scene(6)
    stripes = 0.2 + 0.6 * ((torch.arange(S) // 2) % 2).float().view(1, 1, S, 1).expand(1, 3, S, S)
    half = torch.where(x < S // 2, stripes, torch.full_like(stripes, 0.1))
    agree, disagree = analyze_fog(torch.cat([haze(textured, t), haze(half, t)]))
    assert agree.stats()["gradient_agreement"] > 0.5 and agree.haze_type == "non-uniform"
    assert disagree.stats()["gradient_agreement"] < 0.0 and disagree.stats()["residual_std"] >= 0.07
    assert disagree.haze_type == "uniform"
