"""The command line of every inference script: argument parsing, the settings read once at the door, the weight-file
check, and the run of a script's batch function over a folder (:func:`run_script`, :func:`main_wrapper`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from omegaconf import DictConfig

from model.builder import controlnet_weight_file, sd_weight_file
from pipelines.config_check import check_inference_config
from pipelines.folder import Process, run_folder
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from utils.checkpoint import CheckpointError, WeightFile, check_weight_files
from utils.common import load_config
from utils.rules import SettingsError
from utils.distributed import init_processes, is_launch_main, report_to_launcher

log = logging.getLogger("hcdyc")
EXIT_MISSING_WEIGHTS = 2
EXIT_BAD_CONFIG = 2


def parse_args(description: str, default_config: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config (model + inference sections)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set inference.tau=0.7 inference.seed=1")
    parser.add_argument("--skip-existing", action="store_true", help="skip images whose outputs already exist")
    parser.add_argument("--show-steps", action="store_true", help="also show a progress bar over sampling steps")
    return parser.parse_args()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")


def check_weights(paths: dict[str, str]) -> None:
    """Exit with status 2 and one line naming every weight file (``{inference key: path}``) that is missing, empty,
    truncated, of the wrong format or of the wrong key set (:func:`utils.checkpoint.check_weight_files`), before any
    heavy work."""
    kinds = {"sd_path": sd_weight_file, "controlnet_path": controlnet_weight_file,
             "checkpoint_path": lambda key, path: WeightFile(key, path, "a baseline checkpoint of train_baseline.py "
                                                                      "(checkpoints/<step>.pt, a flat state dict)"),
             "adapter_path": lambda key, path: WeightFile(key, path, "a stage-3 adapter file (.safetensors)")}
    try:
        check_weight_files([kinds[key](f"inference.{key}", path) for key, path in paths.items()])
    except CheckpointError as err:
        log.error("%s", err)
        sys.exit(EXIT_MISSING_WEIGHTS)


def run_script(cfg: DictConfig, settings: InferenceSettings, args: argparse.Namespace,
               make_process: Callable[..., Process],
               output_names: Callable[[InferenceSettings], Callable[[str], list[str]]], desc: str) -> int:
    """A diffusion script's ``run``: check the weight files, load the model once, run its batch function
    ``make_process(cfg, settings, runner, show_steps)`` over the folder. Returns the exit status."""
    check_weights(settings.weight_paths())
    try:
        runner = DiffusionRunner(cfg, settings)
    except CheckpointError as err:  # the key set fits, the shapes do not (another model variant)
        log.error("%s", err)
        return EXIT_MISSING_WEIGHTS
    return run_folder(settings, make_process(cfg, settings, runner, args.show_steps), output_names(settings),
                      args.skip_existing, desc,
                      runner.batch_key)


def main_wrapper(fn: Callable[[DictConfig, InferenceSettings, argparse.Namespace], int], description: str,
                 default_config: str, script: str) -> None:
    """Parse arguments, load the config, read and check the ``inference.*`` settings once for ``script`` (a key of
    pipelines.settings.SCRIPT_KEYS; every section by :mod:`pipelines.config_check`: a bad one exits 2 with one line
    naming the key, before any weight file is looked for), join the ``accelerate launch`` processes (only the main one
    logs INFO) and exit with the status
    of ``fn(cfg, settings, args)``, which passes the one settings object down."""
    setup_logging()
    args = parse_args(description, default_config)
    try:
        cfg = load_config(args.config, args.set)
        settings = check_inference_config(cfg, script)
    except (FileNotFoundError, SettingsError) as err:
        if is_launch_main():
            log.error("%s", err)
        report_to_launcher(str(err))
        sys.exit(EXIT_BAD_CONFIG)
    if not init_processes().is_main:
        logging.getLogger().setLevel(logging.WARNING)
    ignored = InferenceSettings.ignored_keys(cfg, script)
    if ignored:
        log.info("%s.py does not use inference.%s (keys of the other scripts); ignored", script,
                 ", inference.".join(ignored))
    sys.exit(fn(cfg, settings, args))
