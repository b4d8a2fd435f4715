"""Compare several result folders with evaluate.py's metrics: one table and one chart per metric.

    python -m tools.compare_methods --methods hazy=data/rtts dcp=results/dcp ours=results/ours --preset paper \
        [--references DIR] [--no-ref-metrics ...] [--metric-weights DIR] --out comparison

Each folder is evaluated exactly as ``evaluate.py`` would (same options, per-method reports in OUT/<name>/eval).
OUT/comparison.md and OUT/comparison.json hold the table (mean ± population std and n per metric, methods in the
order given); OUT/charts/<metric>.png is a box plot of the per-image values per method (box = quartiles, whiskers
1.5 IQR, dots = images, diamond = mean), titled with the metric's direction. Exit status: 0; 1 if an image failed
or a metric was unavailable; 2 for bad arguments or a missing matplotlib (the optional metrics group).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from metrics import evaluation, iqa
from utils.atomic import atomic_write, write_text_atomic
from utils.optional import require

LOG = logging.getLogger("compare_methods")


def comparison_table(rows: Sequence[tuple[str, dict]], metrics: Sequence[str]) -> str:
    """Markdown table: one row per (method, summary), mean ± std of each metric, and n (the most images any
    metric had for that method)."""
    lines = ["| method | n | " + " | ".join(evaluation.LABELS[m] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for name, summary in rows:
        n = max((summary[m]["n"] for m in metrics), default=0)
        lines.append(f"| {name} | {n} | " + " | ".join(evaluation.format_value(summary[m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _values(report: evaluation.EvalReport, metric: str) -> np.ndarray:
    return np.array([r[metric] for r in report.rows if metric in r and math.isfinite(r[metric])], dtype=np.float64)


def save_charts(reports: Sequence[tuple[str, evaluation.EvalReport]], metrics: Sequence[str], out: Path) -> list[Path]:
    """One PNG per metric (box plot of per-image values per method) in ``out``; metrics without any finite
    value are left out. Returns the written paths. Needs matplotlib (the optional metrics group)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    for metric in metrics:
        data = [(name, _values(report, metric)) for name, report in reports]
        if not any(v.size for _, v in data):
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(data), 3.6), dpi=120)
        positions = np.arange(1, len(data) + 1)
        ax.boxplot([v if v.size else [np.nan] for _, v in data], positions=positions, widths=0.5,
                   showfliers=False)
        for pos, (_, v) in zip(positions, data):
            if v.size:
                offsets = np.linspace(-0.15, 0.15, v.size) if v.size > 1 else np.zeros(1)
                ax.scatter(pos + offsets, v, s=10, alpha=0.6, color="tab:blue", zorder=3)
                ax.scatter([pos], [v.mean()], marker="D", s=30, color="tab:red", zorder=4)
        ax.set_xticks(positions, [f"{n}\n(n={v.size})" if v.size else f"{n}\n(n/a)" for n, v in data])
        direction = "lower is better" if evaluation.LABELS[metric].endswith("↓") else "higher is better"
        ax.set_title(f"{evaluation.LABELS[metric]}  ({direction})")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"{metric}.png"
        atomic_write(path, lambda handle, fig=fig: fig.savefig(handle, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def parse_method(text: str) -> tuple[str, Path]:
    """'NAME=DIR' -> (NAME, DIR)."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got '{text}'")
    return name, Path(folder)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="One table and one chart per metric for several result folders")
    parser.add_argument("--methods", nargs="+", type=parse_method, required=True, metavar="NAME=DIR")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--references", type=Path, help="folder of reference images (adds PSNR/SSIM/ΔE00)")
    parser.add_argument("--no-ref-metrics", type=evaluation.parse_metric_list, default=None,
                        help="as evaluate.py (default: none with --references, else "
                        f"{','.join(evaluation.DEFAULT_NO_REF)})")
    parser.add_argument("--preset", choices=sorted(evaluation.PRESETS), help="as evaluate.py: paper = the RTTS table")
    parser.add_argument("--metric-weights", type=Path, metavar="DIR", help="as evaluate.py")
    parser.add_argument("--device", default=None, help="torch device for pyiqa metrics (default: cuda if present)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    require("matplotlib", "metrics")  # the charts; checked before any folder is evaluated
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    names = [n for n, _ in args.methods]
    if len(set(names)) != len(names):
        parser.error(f"method names must be unique, got {names}")
    for name, folder in args.methods:
        if not folder.is_dir():
            parser.error(f"method {name}: not a folder: {folder}")
    no_ref = list(evaluation.PRESETS[args.preset]) if args.preset else []
    no_ref = list(dict.fromkeys(no_ref + (args.no_ref_metrics or [])))
    if not no_ref and args.no_ref_metrics is None and args.references is None:
        no_ref = list(evaluation.DEFAULT_NO_REF)
    iqa.offline_environment()
    import torch

    device = torch.device(args.device) if args.device else None
    reports, rows, status = [], [], 0
    for name, folder in args.methods:
        try:
            report = evaluation.evaluate_folders(folder, args.references, no_ref, progress=not args.quiet,
                                               weights_dir=args.metric_weights, device=device,
                                               batch_size=args.batch_size)
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:
            LOG.error("%s: %s", name, err)
            return 2
        summary = evaluation.write_report(report, args.out / name / "eval", f"{name}: {folder}",
                                        {"results": str(folder), "references": str(args.references or "")})
        if report.failed or report.unavailable or not report.rows:
            status = 1
        for message in report.unavailable.values():
            LOG.error("%s: metric unavailable: %s", name, message)
        reports.append((name, report))
        rows.append((name, summary))
    metrics = reports[0][1].metrics
    table = comparison_table(rows, metrics)
    write_text_atomic(args.out / "comparison.md", f"# Comparison\n\n{table}")
    write_text_atomic(args.out / "comparison.json",
                      json.dumps(evaluation.json_safe({n: s for n, s in rows}), indent=2) + "\n")
    charts = save_charts(reports, metrics, args.out / "charts")
    print(table, end="")
    LOG.info("wrote %s, %s and %d chart(s) in %s", args.out / "comparison.md", args.out / "comparison.json",
             len(charts), args.out / "charts")
    return status


if __name__ == "__main__":
    sys.exit(main())
