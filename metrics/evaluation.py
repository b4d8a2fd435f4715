"""Evaluate a folder of results: full-reference PSNR / SSIM / CIEDE2000 against a folder of
references, and/or no-reference metrics (FADE, pyiqa's learned metrics, our offline NIQE/BRISQUE).

    python evaluate.py --results DIR [--references DIR] [--out DIR] [--no-ref-metrics fade,musiq,...]
                       [--preset paper] [--metric-weights DIR] [--save-maps] [--strict-size]

Matching: a result ``<stem>.*`` pairs with the reference of the same stem, else, for HazeGen-style
names ``<name>_<k>`` (k an integer), with the reference ``<name>``. Results without a reference
are listed (not fatal); non-image files and AccSamp intermediates (``*_estimate``,
``*_transmission``) are skipped with a note; unreadable images are reported as failed.
A result whose size differs from its reference is resized to the reference size (bicubic,
antialiased, clamped to [0,1]) and the original size (W x H) is recorded in the CSV; ``--strict-size``
makes that an error instead. No-reference metrics are computed on the result as stored; grayscale,
16-bit and RGBA files are converted to RGB (alpha dropped) and the conversion is noted in the CSV.
No-reference metric names and implementations: metrics/iqa.py. A metric whose parameter files are
missing is reported as unavailable (one line naming the file) while the others run.

Outputs (written atomically to ``--out``, default ``<results>_eval`` next to the results):
per_image.csv, summary.md and summary.json (mean, population std and count per metric, with
the exact metric settings), and with --save-maps fade_maps/<stem>_fade.png. Summary statistics
use finite values only (PSNR of an identical pair is +inf). The summary table is also printed, and
with --preset paper a markdown row in the paper's column order. Exit status: 0, or 1 if an image
failed, a metric was unavailable or nothing could be evaluated, 2 for a size mismatch under
--strict-size or bad arguments.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from metrics import full_reference as fr_metrics
from metrics import iqa
from utils.atomic import write_text_atomic
from utils.image_io import IMAGE_EXTS, ImageReadError, conversion_note, list_images, load_rgb01, resize01

LOG = logging.getLogger("evaluate")
FULL_REFERENCE = ("psnr", "ssim", "deltae00")
NO_REFERENCE = tuple(iqa.METRICS)
DEFAULT_NO_REF = ("fade", "niqe_hcdyc", "brisque_svr")
PRESETS = {"paper": iqa.PAPER_PRESET}
LABELS = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "deltae00": "ΔE00 ↓",
          **{name: spec.label for name, spec in iqa.METRICS.items()}}
INTERMEDIATE_SUFFIXES = ("_estimate", "_transmission")
RESIZE_NOTE = "result resized to the reference size (bicubic, antialiased, clamped to [0,1])"
_K_SUFFIX = re.compile(r"^(?P<name>.+)_(?P<k>\d+)$")


class SizeMismatchError(ValueError):
    """Result and reference sizes differ while strict size checking is on."""


@dataclass
class EvalReport:
    """Per-image rows and everything that was not evaluated, with reasons."""

    metrics: list[str]
    rows: list[dict] = field(default_factory=list)
    missing_reference: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def reference_for(stem: str, references: dict[str, Path]) -> Optional[Path]:
    """Reference path for a result stem: same stem, else ``<name>`` for ``<name>_<k>``; None if absent."""
    if stem in references:
        return references[stem]
    match = _K_SUFFIX.match(stem)
    if match and match.group("name") in references:
        return references[match.group("name")]
    return None


def _reference_index(folder: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in index:
            raise ValueError(f"two references share the stem '{path.stem}': {index[path.stem].name}, {path.name}")
        index[path.stem] = path
    return index


def _result_files(folder: Path, report: EvalReport) -> list[Path]:
    """Image files of the results folder; other files are noted as skipped."""
    if folder.is_file():
        raise NotADirectoryError(f"--results must be a folder of images, got a file: {folder}")
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder does not exist: {folder}")
    images = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_EXTS:
            report.skipped.append((path.name, f"not an image ({', '.join(IMAGE_EXTS)})"))
        elif path.stem.endswith(INTERMEDIATE_SUFFIXES):
            report.skipped.append((path.name, "AccSamp intermediate, not a result"))
        else:
            images.append(path)
    return images


def _matched_pair(result_path: Path, ref_path: Path, strict_size: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Load (result (1,3,H,W), reference (1,3,H,W), resized_from 'WxH' or '')."""
    result = load_rgb01(result_path)
    ref = load_rgb01(ref_path)
    if result.shape == ref.shape:
        return result[None], ref[None], ""
    rh, rw = result.shape[-2:]
    if strict_size:
        raise SizeMismatchError(f"{result_path.name} is {rw}x{rh} but its reference {ref_path.name} is "
                                f"{ref.shape[-1]}x{ref.shape[-2]} (--strict-size)")
    resized = resize01(result[None], ref.shape[-2:]).clamp(0.0, 1.0)
    return resized, ref[None], f"{rw}x{rh}"


def _add_note(row: dict, note: str) -> None:
    row["note"] = "; ".join(filter(None, [row["note"], note]))


def build_scorers(no_ref: Sequence[str], report: EvalReport, weights_dir: Optional[Path] = None,
                  device: Optional[torch.device] = None, batch_size: int = 4, allow_download: bool = False,
                  map_dir: Optional[Path] = None) -> dict[str, iqa.Scorer]:
    """Build every requested metric once; unavailable ones go to report.unavailable (one line each)."""
    scorers = {}
    for name in no_ref:
        try:
            scorers[name] = iqa.build_scorer(name, weights_dir, device, batch_size, allow_download, map_dir)
            report.settings[name] = iqa.METRICS[name].implementation
        except iqa.MetricUnavailable as err:
            report.unavailable[name] = str(err)
    return scorers


def _chunks(items: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def evaluate_folders(results: Path, references: Optional[Path] = None, no_ref: Sequence[str] = (),
                     strict_size: bool = False, progress: bool = False, weights_dir: Optional[Path] = None,
                     device: Optional[torch.device] = None, batch_size: int = 4, allow_download: bool = False,
                     map_dir: Optional[Path] = None) -> EvalReport:
    """Evaluate every image of ``results`` (see module docstring). Raises SizeMismatchError under strict_size,
    ValueError for unknown metrics, FileNotFoundError / NotADirectoryError for a bad results path."""
    unknown = [m for m in no_ref if m not in NO_REFERENCE]
    if unknown:
        raise ValueError(f"unknown no-reference metric(s) {unknown}; choose from {sorted(NO_REFERENCE)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    metrics = (list(FULL_REFERENCE) if references is not None else []) + list(no_ref)
    if not metrics:
        raise ValueError("nothing to compute: give --references and/or --no-ref-metrics")
    report = EvalReport(metrics=metrics)
    if references is not None:
        report.settings.update({m: fr_metrics.SETTINGS[m] for m in FULL_REFERENCE})
        report.settings["size_mismatch"] = "error (--strict-size)" if strict_size else RESIZE_NOTE
    ref_index = _reference_index(references) if references is not None else {}
    files = _result_files(results, report)
    if not files:
        LOG.warning("no images to evaluate in %s (%d other file(s) skipped; images end in %s)", results,
                    len(report.skipped), ", ".join(IMAGE_EXTS))
        return report
    scorers = build_scorers(no_ref, report, weights_dir, device, batch_size, allow_download, map_dir)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="evaluate", unit="img")
    for chunk in _chunks(files, batch_size):
        rows, images = [], []
        for path in chunk:
            row = _evaluate_one(path, references, ref_index, strict_size, bool(no_ref), report)
            if row is not None:
                rows.append(row)
                if no_ref:
                    images.append(row.pop("_img01"))
        for name, scorer in scorers.items():
            for row, (value, note) in zip(rows, scorer(images, [r["image"] for r in rows])):
                row[name] = value
                _add_note(row, note)
        report.rows.extend(rows)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return report


def _evaluate_one(path: Path, references: Optional[Path], ref_index: dict[str, Path], strict_size: bool,
                  want_no_ref: bool, report: EvalReport) -> Optional[dict]:
    """Full-reference numbers of one result; with want_no_ref the row carries the loaded image (3,H,W) in
    [0,1] under '_img01'. None (and a note in report) when the image is skipped or failed."""
    ref_path = reference_for(path.stem, ref_index) if references is not None else None
    if references is not None and ref_path is None:
        report.missing_reference.append(path.name)
        if not want_no_ref:
            return None
    row: dict = {"image": path.name, "reference": ref_path.name if ref_path else "", "resized_from": "",
                 "converted": "", "note": ""}
    try:
        row["converted"] = conversion_note(path)
        if ref_path is not None:
            x, y, row["resized_from"] = _matched_pair(path, ref_path, strict_size)
            row.update({k: float(v[0]) for k, v in fr_metrics.full_reference_metrics(x, y).items()})
        if want_no_ref:
            row["_img01"] = load_rgb01(path)
    except ImageReadError as err:
        report.failed.append((path.name, str(err)))
        return None
    if "16-bit" in row["converted"] and "fade" in report.metrics:
        row["converted"] += " (FADE: rounded to 8 bits)"
    return row


def summarize(report: EvalReport) -> dict[str, dict[str, float]]:
    """Per metric: mean, population std (ddof 0) and n over finite values (None without any)."""
    out = {}
    for m in report.metrics:
        vals = np.array([r[m] for r in report.rows if m in r and math.isfinite(r[m])], dtype=np.float64)
        n_nonfinite = sum(1 for r in report.rows if m in r and not math.isfinite(r[m]))
        out[m] = {"mean": float(vals.mean()) if vals.size else None,
                  "std": float(vals.std()) if vals.size else None,
                  "n": int(vals.size), "n_nonfinite": n_nonfinite}
    return out


def format_value(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def summary_markdown(report: EvalReport, summary: dict, title: str) -> str:
    lines = [f"# {title}", "", "| metric | mean ± std | n |", "|---|---|---|"]
    for m in report.metrics:
        s = summary[m]
        extra = f" (+{s['n_nonfinite']} non-finite)" if s["n_nonfinite"] else ""
        lines.append(f"| {LABELS[m]} | {format_value(s)} | {s['n']}{extra} |")
    lines += ["", "Settings:", ""] + [f"- **{k}**: {v}" for k, v in report.settings.items()]
    lines += ["- **std**: population standard deviation (ddof 0) over finite per-image values"]
    for heading, items in (("Unavailable metrics", [(m, "") for m in report.unavailable.values()]),
                           ("Results without a reference", [(n, "") for n in report.missing_reference]),
                           ("Skipped files", report.skipped), ("Failed images", report.failed),
                           ("Converted to RGB", [(r["image"], r["converted"]) for r in report.rows
                                                 if r.get("converted")])):
        if items:
            lines += ["", f"{heading}:", ""] + [f"- {n}{': ' + r if r else ''}" for n, r in items]
    resized = [(r["image"], r["resized_from"]) for r in report.rows if r.get("resized_from")]
    if resized:
        lines += ["", f"Resized to the reference size ({RESIZE_NOTE}):", ""]
        lines += [f"- {n} (was {wh}, W x H)" for n, wh in resized]
    return "\n".join(lines) + "\n"


def per_image_csv(report: EvalReport) -> str:
    buf = io.StringIO()
    cols = ["image", "reference"] + report.metrics + ["resized_from", "converted", "note"]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def json_safe(value):
    """value with non-finite floats (also nested in dicts/lists) replaced by their string ('inf', 'nan')."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: EvalReport, out: Path, title: str, inputs: dict[str, str]) -> dict:
    """Write per_image.csv, summary.md, summary.json into ``out``; returns the summary."""
    summary = summarize(report)
    write_text_atomic(out / "per_image.csv", per_image_csv(report))
    write_text_atomic(out / "summary.md", summary_markdown(report, summary, title))
    doc = {"inputs": inputs, "metrics": report.metrics, "summary": summary, "settings": report.settings,
           "unavailable": report.unavailable, "missing_reference": report.missing_reference,
           "skipped": [{"file": n, "reason": r} for n, r in report.skipped],
           "failed": [{"file": n, "reason": r} for n, r in report.failed],
           "per_image": report.rows}
    write_text_atomic(out / "summary.json", json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    return summary


def paper_row(name: str, summary: dict, metrics: Sequence[str] = iqa.PAPER_PRESET) -> str:
    """Markdown header + one row of means (4 decimals, 'n/a' when not computed) in ``metrics`` order, to paste
    beside a published table."""
    cells = [f"{summary[m]['mean']:.4f}" if m in summary and summary[m]["mean"] is not None else "n/a"
             for m in metrics]
    return ("| method | " + " | ".join(LABELS[m] for m in metrics) + " |\n"
            + "|---" * (len(metrics) + 1) + "|\n"
            + f"| {name} | " + " | ".join(cells) + " |\n")


def parse_metric_list(text: str) -> list[str]:
    """'fade, MUSIQ' -> ['fade', 'musiq']; '' or 'none' -> []."""
    return [] if text.strip().lower() in ("", "none") else [t.strip().lower() for t in text.split(",") if t.strip()]
