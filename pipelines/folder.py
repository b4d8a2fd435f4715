"""The folder loop of every inference script: list the images, shard them over the processes, batch equal padded sizes,
skip-and-report per-image failures, write the outputs atomically, and print one summary.
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import torch
from tqdm.auto import tqdm

from pipelines.batching import group_batches
from pipelines.settings import InferenceSettings
from utils.distributed import init_processes
from utils.image_io import ImageReadError, list_images, load_rgb01, save_png01, sixteen_bit

log = logging.getLogger("hcdyc")


Batch = list[tuple[torch.Tensor, str]]
"""Images of one batch: (img01 (3,H,W) in [0,1], file stem) pairs."""
Process = Callable[..., dict[str, torch.Tensor]]
"""A script's batch function: process(batch, callback=None) -> {file name: (C,H,W) in [0,1]} for every image of the
batch; callback(info) receives the sampler's per-step dict ({"step", "index", "t", "x", "x0"})."""


@dataclass
class FolderReport:
    """Names of the input files done, skipped (outputs existed) and failed (with a one-line reason)."""

    done: list[str]
    skipped: list[str]
    failed: list[tuple[str, str]]


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _fail(report: FolderReport, name: str, err: BaseException) -> None:
    report.failed.append((name, _first_line(err)))
    log.debug("%s", traceback.format_exc())
    log.warning("failed: %s: %s", name, report.failed[-1][1])


def _process_batch(paths: list[Path], process: Callable[[Batch], dict[str, torch.Tensor]],
                   output_names: Callable[[str], list[str]], dst: Path, report: FolderReport) -> None:
    """Load, process and save one batch. A batch that fails is retried image by image, so only the images that
    fail alone are reported."""
    loaded: list[tuple[Path, torch.Tensor]] = []
    for path in paths:
        try:
            loaded.append((path, load_rgb01(path)))
        except ImageReadError as err:
            _fail(report, path.name, err)
    try:
        outputs = process([(img01, path.stem) for path, img01 in loaded]) if loaded else {}
    except (ValueError, RuntimeError, OSError) as err:
        if len(loaded) == 1:
            _fail(report, loaded[0][0].name, err)
            return
        log.info("batch of %d failed (%s); retrying its images one by one", len(loaded), _first_line(err))
        for path, _ in loaded:
            _process_batch([path], process, output_names, dst, report)
        return
    for path, _ in loaded:
        try:
            for name in output_names(path.stem):
                save_png01(outputs[name], dst / name)
            report.done.append(path.name)
        except (ValueError, OSError) as err:
            _fail(report, path.name, err)


def run_folder(inf: InferenceSettings, process: Callable[[Batch], dict[str, torch.Tensor]],
               output_names: Callable[[str], list[str]], skip_existing: bool, desc: str,
               batch_key: Callable[[Path], Hashable | None] | None = None) -> int:
    """Loop over ``inference.image_folder``; ``process([(img01 (3,H,W), stem), ...])`` returns
    ``{file name: (C,H,W) [0,1]}`` for every image of the batch.

    Several processes (``accelerate launch``) split the sorted file list (``ProcessInfo.shard``); each writes only
    its own images' outputs, atomically. With ``inference.batch_size`` > 1, images whose ``batch_key`` (padded
    size) is equal are processed together. Per-image failures are logged by file name and the loop continues; the
    main process prints one summary of all processes. Returns the exit status (1 if any image failed anywhere).
    """
    info = init_processes()
    if inf.image_folder is None or inf.result_folder is None:
        log.error("inference.image_folder and inference.result_folder are required")
        return 2
    batch_size, src, dst = inf.batch_size, Path(inf.image_folder), Path(inf.result_folder)
    if not src.is_dir():
        log.error("inference.image_folder does not exist: %s", src)
        return 2
    if src.resolve() == dst.resolve():
        log.error("inference.result_folder must differ from image_folder (%s): inputs are never overwritten", src)
        return 2
    dst.mkdir(parents=True, exist_ok=True)
    images = list_images(src)
    if not images:
        log.error("no .png/.jpg/.jpeg images in %s", src)
        return 1
    deep = [path.name for path in images if path.suffix.lower() == ".png" and sixteen_bit(path)]
    if deep and info.is_main:
        log.warning("%d input(s) have 16 bits per channel (e.g. %s): they are read at full precision, the results are "
                    "written as 8-bit PNGs", len(deep), deep[0])
    report = FolderReport([], [], [])
    owner: dict[str, str] = {}
    unique = []
    for path in images:
        clash = next((owner[n] for n in output_names(path.stem) if n in owner), None)
        if clash is None:
            owner.update({n: path.name for n in output_names(path.stem)})
            unique.append(path)
        elif info.is_main:
            report.failed.append((path.name, f"its outputs would overwrite those of {clash} (same file stem)"))
    todo = []
    for path in info.shard(unique):
        if skip_existing and all((dst / n).is_file() for n in output_names(path.stem)):
            report.skipped.append(path.name)
        else:
            todo.append(path)
    batches = group_batches(todo, batch_key or (lambda _: None), batch_size if batch_key else 1)
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not info.is_main) as bar:
        for paths in batches:
            bar.set_postfix_str(paths[0].name)
            _process_batch(paths, process, output_names, dst, report)
            bar.update(len(paths))
    reports = info.gather(report)
    done = sorted(n for r in reports for n in r.done)
    skipped = sorted(n for r in reports for n in r.skipped)
    failed = sorted(f for r in reports for f in r.failed)
    if info.is_main:
        processes = f" by {info.count} processes" if info.count > 1 else ""
        level = logging.WARNING if failed else logging.INFO
        log.log(level, "summary: %d done, %d skipped, %d failed%s (results in %s)", len(done), len(skipped),
                len(failed), processes, dst)
        for label, names in (("done", done), ("skipped", skipped)):
            if names:
                log.info("  %s: %s", label, ", ".join(names))
        for name, reason in failed:
            log.warning("  failed %s: %s", name, reason)
    return 1 if failed else 0
