"""The fog-aware condition: one function for training (:meth:`training.step.TrainingStep.condition`) and
inference (:meth:`pipelines.runner.DiffusionRunner.condition`).

Published: the given prompts and the condition image (``ControlLDM.prepare_condition``). HCD-YC (not in the paper):
the hazy image is analysed by the fog analyser (:func:`haze.fog.analyze_fog`) when dynamic prompts replace the given
ones (:mod:`haze.prompts`) or when the model's text processor refines the text embedding with the fog features.
"""
from __future__ import annotations

import random
from typing import Any, NamedTuple

import torch

from haze.fog import FogInfo, analyze_fog, fog_features
from haze.prompts import prompts_from_infos
from model.cldm import ControlLDM


class FogCondition(NamedTuple):
    """cond: the ``prepare_condition`` dict; prompts: the B prompts used; infos: the fog analysis or None."""

    cond: dict[str, Any]
    prompts: list[str]
    infos: list[FogInfo] | None


def fog_aware_condition(ldm: ControlLDM, cond01: torch.Tensor, hazy01: torch.Tensor, prompts: list[str], stage: int,
                        dynamic_prompt: bool = False, process_text: bool = True, analyse: bool = False,
                        prompt_rng: random.Random | None = None, c_img: torch.Tensor | None = None,
                        is_cond: torch.Tensor | None = None) -> FogCondition:
    """Condition of B samples.

    cond01: (B,3,H,W) condition images in ~[0,1]; hazy01: (B,3,h,w) in [0,1], the hazy images the prompts and fog
    features describe (stage 2: the input; stage 1: the hazy target in training, a reference photo at inference);
    prompts: the B given prompts; stage: 1 (HazeGen) or 2 (DiffDehaze) prompt templates.
    dynamic_prompt: replace the prompts by ``prompts_from_infos(analysis, stage, prompt_rng)``.
    process_text: run the model's text processor, if it has one, on the fog features (training: from
    ``train.text_processor_start`` on). analyse: analyse even when neither needs it (the cycle loss's density).
    c_img: precomputed condition latent (tiled encoding); is_cond: (B,) bool, False = the unconditional branch
    (``ControlLDM.image_condition``).
    """
    process = process_text and ldm.text_processor is not None
    infos = analyze_fog(hazy01) if dynamic_prompt or process or analyse else None
    prompts = prompts_from_infos(infos, stage, prompt_rng) if dynamic_prompt else list(prompts)
    fog_feats = fog_features(infos, cond01.device) if process else None
    cond = ldm.prepare_condition(cond01, prompts, fog_feats, c_img=c_img, process_text=process, is_cond=is_cond)
    return FogCondition(cond, prompts, infos)
