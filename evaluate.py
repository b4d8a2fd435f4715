"""Evaluate a folder of results: full-reference PSNR / SSIM / CIEDE2000 against a folder of
references, and/or no-reference NIQE / BRISQUE.

    python evaluate.py --results DIR [--references DIR] [--out DIR] [--no-ref-metrics niqe,brisque]
                       [--strict-size]

Matching: a result ``<stem>.*`` pairs with the reference of the same stem, else, for HazeGen-style
names ``<name>_<k>`` (k an integer), with the reference ``<name>``. Results without a reference
are listed (not fatal); non-image files and AccSamp intermediates (``*_estimate``,
``*_transmission``) are skipped with a note; unreadable images are reported as failed.
A result whose size differs from its reference is resized to the reference size (bicubic,
antialiased, clamped to [0,1]) and the original size is recorded in the CSV; ``--strict-size``
makes that an error instead. No-reference metrics are computed on the result as stored.

Outputs (written atomically to ``--out``, default ``<results>_eval`` next to the results):
per_image.csv, summary.md and summary.json (mean, population std and count per metric, with
the exact metric settings). Summary statistics use finite values only (PSNR of an identical
pair is +inf). The summary table is also printed. Exit status: 0, or 1 if an image failed or
nothing could be evaluated, 2 for a size mismatch under --strict-size or bad arguments.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from utils import brisque as brisque_mod
from utils import metrics as fr_metrics
from utils import niqe as niqe_mod
from utils.atomic import write_text_atomic
from utils.image_io import IMAGE_EXTS, ImageReadError, list_images, load_rgb01, resize01

LOG = logging.getLogger("evaluate")
FULL_REFERENCE = ("psnr", "ssim", "deltae00")
NO_REFERENCE: dict[str, Callable[[torch.Tensor], float]] = {"niqe": niqe_mod.niqe, "brisque": brisque_mod.brisque}
NO_REF_SETTINGS = {"niqe": niqe_mod.SETTINGS, "brisque": brisque_mod.SETTINGS}
LABELS = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "deltae00": "ΔE00 ↓",
          "niqe": "NIQE ↓", "brisque": "BRISQUE ↓"}
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
    """Load (result (1,3,H,W), reference (1,3,H,W), resized_from 'HxW' or '')."""
    result = load_rgb01(result_path)
    ref = load_rgb01(ref_path)
    if result.shape == ref.shape:
        return result[None], ref[None], ""
    rh, rw = result.shape[-2:]
    if strict_size:
        raise SizeMismatchError(f"{result_path.name} is {rw}x{rh} but its reference {ref_path.name} is "
                                f"{ref.shape[-1]}x{ref.shape[-2]} (--strict-size)")
    resized = resize01(result[None], ref.shape[-2:]).clamp(0.0, 1.0)
    return resized, ref[None], f"{rh}x{rw}"


def _no_reference_values(img01: torch.Tensor, names: Sequence[str], row: dict) -> dict[str, float]:
    """No-reference scores of img01 (3,H,W); a metric undefined for this image gives NaN and a note in row."""
    values = {}
    for name in names:
        try:
            values[name] = float(NO_REFERENCE[name](img01))
        except ValueError as err:
            values[name] = math.nan
            row["note"] = "; ".join(filter(None, [row["note"], f"{name}: {err}"]))
    return values


def evaluate_folders(results: Path, references: Optional[Path] = None, no_ref: Sequence[str] = (),
                     strict_size: bool = False, progress: bool = False) -> EvalReport:
    """Evaluate every image of ``results`` (see module docstring). Raises SizeMismatchError under strict_size."""
    unknown = [m for m in no_ref if m not in NO_REFERENCE]
    if unknown:
        raise ValueError(f"unknown no-reference metric(s) {unknown}; choose from {sorted(NO_REFERENCE)}")
    metrics = (list(FULL_REFERENCE) if references is not None else []) + list(no_ref)
    if not metrics:
        raise ValueError("nothing to compute: give --references and/or --no-ref-metrics")
    report = EvalReport(metrics=metrics)
    if references is not None:
        report.settings.update({m: fr_metrics.SETTINGS[m] for m in FULL_REFERENCE})
        report.settings["size_mismatch"] = "error (--strict-size)" if strict_size else RESIZE_NOTE
    report.settings.update({m: NO_REF_SETTINGS[m] for m in no_ref})
    ref_index = _reference_index(references) if references is not None else {}
    files = _result_files(results, report)
    if progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc="evaluate", unit="img")
    for path in files:
        ref_path = reference_for(path.stem, ref_index) if references is not None else None
        if references is not None and ref_path is None:
            report.missing_reference.append(path.name)
            if not no_ref:
                continue
        row: dict = {"image": path.name, "reference": ref_path.name if ref_path else "", "resized_from": "", "note": ""}
        try:
            if ref_path is not None:
                x, y, row["resized_from"] = _matched_pair(path, ref_path, strict_size)
                row.update({k: float(v[0]) for k, v in fr_metrics.full_reference_metrics(x, y).items()})
            if no_ref:
                row.update(_no_reference_values(load_rgb01(path), no_ref, row))
        except ImageReadError as err:
            report.failed.append((path.name, str(err)))
            continue
        report.rows.append(row)
    return report


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
    for heading, items in (("Results without a reference", [(n, "") for n in report.missing_reference]),
                           ("Skipped files", report.skipped), ("Failed images", report.failed)):
        if items:
            lines += ["", f"{heading}:", ""] + [f"- {n}{': ' + r if r else ''}" for n, r in items]
    resized = [(r["image"], r["resized_from"]) for r in report.rows if r.get("resized_from")]
    if resized:
        lines += ["", f"Resized to the reference size ({RESIZE_NOTE}):", ""]
        lines += [f"- {n} (was {hw})" for n, hw in resized]
    return "\n".join(lines) + "\n"


def per_image_csv(report: EvalReport) -> str:
    buf = io.StringIO()
    cols = ["image", "reference"] + report.metrics + ["resized_from", "note"]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: EvalReport, out: Path, title: str, inputs: dict[str, str]) -> dict:
    """Write per_image.csv, summary.md, summary.json into ``out``; returns the summary."""
    summary = summarize(report)
    write_text_atomic(out / "per_image.csv", per_image_csv(report))
    write_text_atomic(out / "summary.md", summary_markdown(report, summary, title))
    doc = {"inputs": inputs, "metrics": report.metrics, "summary": summary, "settings": report.settings,
           "missing_reference": report.missing_reference,
           "skipped": [{"file": n, "reason": r} for n, r in report.skipped],
           "failed": [{"file": n, "reason": r} for n, r in report.failed],
           "per_image": report.rows}
    write_text_atomic(out / "summary.json", json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")
    return summary


def _parse_no_ref(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [t.strip().lower() for t in text.split(",") if t.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="PSNR/SSIM/CIEDE2000 against references and NIQE/BRISQUE without")
    parser.add_argument("--results", required=True, type=Path, help="folder of result images")
    parser.add_argument("--references", type=Path, help="folder of reference (clean) images")
    parser.add_argument("--out", type=Path, help="output folder (default: <results>_eval beside the results)")
    parser.add_argument("--no-ref-metrics", type=_parse_no_ref, default=None,
                        help="comma list of niqe,brisque, or none (default: none with --references, else niqe,brisque)")
    parser.add_argument("--strict-size", action="store_true", help="error on result/reference size mismatch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    no_ref = args.no_ref_metrics
    if no_ref is None:
        no_ref = [] if args.references else ["niqe", "brisque"]
    out = args.out or args.results.parent / f"{args.results.name}_eval"
    if args.references is not None and not args.references.is_dir():
        LOG.error("references folder does not exist: %s", args.references)
        return 2
    if out.resolve() in (args.results.resolve(), args.references.resolve() if args.references else None):
        LOG.error("--out must differ from the results and references folders: %s", out)
        return 2
    try:
        report = evaluate_folders(args.results, args.references, no_ref, args.strict_size, progress=not args.quiet)
    except (SizeMismatchError, FileNotFoundError, ValueError) as err:
        LOG.error("%s", err)
        return 2
    inputs = {"results": str(args.results), "references": str(args.references) if args.references else ""}
    summary = write_report(report, out, f"Evaluation of {args.results}", inputs)
    print(summary_markdown(report, summary, f"Evaluation of {args.results}"), end="")
    LOG.info("%d evaluated, %d without reference, %d skipped, %d failed; wrote %s",
             len(report.rows), len(report.missing_reference), len(report.skipped), len(report.failed), out)
    return 1 if report.failed or not report.rows else 0


if __name__ == "__main__":
    sys.exit(main())
