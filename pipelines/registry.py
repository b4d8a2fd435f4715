"""Which pipeline module does the job of which entry script.

Each ``inference_<name>.py`` at the repository root is a few lines that call :func:`main` of its pipeline module; the
pipeline module holds the script's batch function ``make_process(cfg, runner, show_steps)``, its ``output_names``
and ``run``. The page's modes (``configs/app/modes.yaml``), the tools and the benchmarks name a script and get its
pipeline here, so no library code loads an entry script.
"""
from __future__ import annotations

import importlib
from types import ModuleType

SCRIPT_PIPELINES: dict[str, str] = {
    "inference_stage2": "pipelines.stage2",
    "inference_accsamp": "pipelines.accsamp",
    "inference_stage1": "pipelines.stage1",
    "inference_dcp": "pipelines.dcp",
    "inference_baseline": "pipelines.baseline",
    "inference_onestep": "pipelines.onestep",
}


def pipeline_for(script: str) -> ModuleType:
    """The pipeline module of entry script ``script`` (its file name without ``.py``); ValueError for an unknown
    name, listing the known ones."""
    if script not in SCRIPT_PIPELINES:
        raise ValueError(f"unknown inference script '{script}'; known: {sorted(SCRIPT_PIPELINES)}")
    return importlib.import_module(SCRIPT_PIPELINES[script])
