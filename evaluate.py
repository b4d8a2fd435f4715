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
missing is reported as unavailable (one line naming the file) while the others run; so is one whose
package of the optional metrics group (fade-python, pyiqa) is not installed. --save-maps with FADE
needs matplotlib (same group): without it the run stops before any work with one line naming the
install command and exit status 2.

Outputs (written atomically to ``--out``, default ``<results>_eval`` next to the results):
per_image.csv, summary.md and summary.json (mean, population std and count per metric, with
the exact metric settings), and with --save-maps fade_maps/<stem>_fade.png. Summary statistics
use finite values only (PSNR of an identical pair is +inf). The summary table is also printed, and
with --preset paper a markdown row in the paper's column order. Exit status: 0, or 1 if an image
failed, a metric was unavailable or nothing could be evaluated, 2 for a size mismatch under
--strict-size, bad arguments or a missing matplotlib with --save-maps.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

from metrics import iqa
from metrics.evaluation import (DEFAULT_NO_REF, LABELS, PRESETS, SizeMismatchError, evaluate_folders, paper_row,
                                parse_metric_list, summary_markdown, write_report)
from utils.optional import require

LOG = logging.getLogger("evaluate")


def _metric_help() -> str:
    parts = []
    for name, spec in iqa.METRICS.items():
        heavy = f"; heavy, only when asked: {spec.memory}" if spec.memory else ""
        parts.append(f"{name} ({spec.label[-1]}{heavy})")
    return ", ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PSNR/SSIM/CIEDE2000 against references; FADE, pyiqa's learned "
                                     "metrics and offline NIQE/BRISQUE without")
    parser.add_argument("--results", required=True, type=Path, help="folder of result images")
    parser.add_argument("--references", type=Path, help="folder of reference (clean) images")
    parser.add_argument("--out", type=Path, help="output folder (default: <results>_eval beside the results)")
    parser.add_argument("--no-ref-metrics", type=parse_metric_list, default=None,
                        help="comma list of no-reference metrics, or none (default: none with --references, else "
                        f"{','.join(DEFAULT_NO_REF)}). Known: {_metric_help()}")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="paper = " + ", ".join(LABELS[m] for m in iqa.PAPER_PRESET) + " (the RTTS table, in its "
                        "column order; includes Q-Align, see its memory above); also prints a markdown row")
    parser.add_argument("--metric-weights", type=Path, default=None, metavar="DIR",
                        help="folder standing in for pyiqa's caches: DIR/pyiqa/<checkpoint>, DIR/clip/<OpenAI CLIP "
                        "archive>, DIR/huggingface/ (a Hugging Face hub cache holding q-future/one-align for Q-Align; "
                        "without it, the user's HF cache); default: pyiqa's cache root, torch.hub.get_dir()")
    parser.add_argument("--allow-download", action="store_true",
                        help="let pyiqa download missing parameter files (default: offline, missing = unavailable)")
    parser.add_argument("--device", default=None, help="torch device for pyiqa metrics (default: cuda if present)")
    parser.add_argument("--batch-size", type=int, default=4, help="images of one size scored together (default 4)")
    parser.add_argument("--save-maps", action="store_true", help="save FADE density maps as <out>/fade_maps/*.png")
    parser.add_argument("--strict-size", action="store_true", help="error on result/reference size mismatch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    no_ref = args.no_ref_metrics
    if args.preset:
        no_ref = list(dict.fromkeys(list(PRESETS[args.preset]) + (no_ref or [])))
    if no_ref is None:
        no_ref = [] if args.references else list(DEFAULT_NO_REF)
    if args.save_maps and "fade" in no_ref:
        require("matplotlib", "metrics")  # the density maps; a missing pyfade is reported as fade unavailable
    out = args.out or args.results.parent / f"{args.results.name}_eval"
    if args.references is not None and not args.references.is_dir():
        LOG.error("references folder does not exist: %s", args.references)
        return 2
    if out.resolve() in (args.results.resolve(), args.references.resolve() if args.references else None):
        LOG.error("--out must differ from the results and references folders: %s", out)
        return 2
    if args.metric_weights is not None and not args.metric_weights.is_dir():
        LOG.error("--metric-weights folder does not exist: %s", args.metric_weights)
        return 2
    if not args.allow_download:
        iqa.offline_environment()
    try:
        device = torch.device(args.device) if args.device else None
        report = evaluate_folders(args.results, args.references, no_ref, args.strict_size, not args.quiet,
                                  args.metric_weights, device, args.batch_size, args.allow_download,
                                  out / "fade_maps" if args.save_maps and "fade" in no_ref else None)
    except (SizeMismatchError, FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as err:
        LOG.error("%s", err)
        return 2
    for message in report.unavailable.values():
        LOG.error("metric unavailable: %s", message)
    inputs = {"results": str(args.results), "references": str(args.references) if args.references else ""}
    summary = write_report(report, out, f"Evaluation of {args.results}", inputs)
    print(summary_markdown(report, summary, f"Evaluation of {args.results}"), end="")
    if args.preset:
        print("\n" + paper_row(args.results.name, summary, PRESETS[args.preset]), end="")
    LOG.info("%d evaluated, %d without reference, %d skipped, %d failed, %d metric(s) unavailable; wrote %s",
             len(report.rows), len(report.missing_reference), len(report.skipped), len(report.failed),
             len(report.unavailable), out)
    return 1 if report.failed or report.unavailable or not report.rows else 0


if __name__ == "__main__":
    sys.exit(main())
