"""Fog-aware text prompts for both stages (HCD-YC extension).

The paper trains and samples with one fixed prompt per stage (``PUBLISHED_PROMPTS``):
stage 1 (HazeGen, clean -> hazy) "hazy, foggy, misty, obscure, smoggy." and stage 2
(DiffDehaze, hazy -> clean) "remove dense fog". Here the prompt is instead filled from pools
keyed by the analysed haze density level, haze type and scene (``haze.fog.FogInfo``):
stage-1 wording describes the haze to generate, stage-2 wording describes its removal.

Choice is deterministic: with ``rng=None`` the first template and the first phrase of every
pool are used; otherwise ``rng.choice`` draws, in order, template, density, type and scene
phrase, so the same ``random.Random`` state gives the same prompt.
"""

from __future__ import annotations

import random

from haze.fog import DENSITY_LEVELS, HAZE_TYPES, SCENES, FogInfo

PUBLISHED_PROMPTS: dict[int, str] = {
    1: "hazy, foggy, misty, obscure, smoggy.",
    2: "remove dense fog",
}

DENSITY_PHRASES: dict[str, tuple[str, ...]] = {
    "light": ("light haze", "thin mist", "faint haze"),
    "moderate": ("moderate fog", "noticeable haze", "medium mist"),
    "dense": ("dense fog", "thick smog", "heavy haze"),
}

TYPE_PHRASES: dict[str, tuple[str, ...]] = {
    "uniform": ("evenly spread", "uniform", "homogeneous"),
    "layered": ("layered", "stratified", "height-varying"),
    "non-uniform": ("patchy", "non-uniform", "uneven"),
}

SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "urban": ("city street", "urban skyline", "town with buildings"),
    "natural": ("natural landscape", "countryside", "forest and hills"),
    "indoor": ("indoor room", "interior space", "indoor hall"),
}

STAGE_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "{density}, {haze_type} haze over the {scene}, hazy, foggy, misty, obscure, smoggy.",
        "the {scene} covered by {haze_type} {density}, hazy, foggy, misty.",
        "{haze_type} {density} in the {scene}, obscure, smoggy.",
    ),
    2: (
        "remove {density}, {haze_type} haze, clear {scene}",
        "a clear {scene} after removing {haze_type} {density}",
        "dehaze the {scene}, remove {haze_type} {density}",
    ),
}


def _pick(options: tuple[str, ...], rng: random.Random | None) -> str:
    return options[0] if rng is None else rng.choice(options)


def build_prompt(info: FogInfo, stage: int, rng: random.Random | None = None) -> str:
    """Prompt for one analysed image. stage: 1 (HazeGen) or 2 (DiffDehaze); rng None -> first choices."""
    if stage not in STAGE_TEMPLATES:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    for value, allowed, what in (
        (info.level, DENSITY_LEVELS, "density level"),
        (info.haze_type, HAZE_TYPES, "haze type"),
        (info.scene, SCENES, "scene"),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {what} '{value}', expected one of {allowed}")
    template = _pick(STAGE_TEMPLATES[stage], rng)
    return template.format(
        density=_pick(DENSITY_PHRASES[info.level], rng),
        haze_type=_pick(TYPE_PHRASES[info.haze_type], rng),
        scene=_pick(SCENE_PHRASES[info.scene], rng),
    )


def prompts_from_infos(infos: list[FogInfo], stage: int, rng: random.Random | None = None) -> list[str]:
    """One prompt per FogInfo, drawn in order from the same ``rng``."""
    return [build_prompt(info, stage, rng) for info in infos]
