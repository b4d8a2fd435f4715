"""Score methods on a benchmark made by ``python -m tools.make_benchmark`` and print one table.

Methods (``--methods``, in table order): ``hazy`` (the hazy input itself, i.e. doing nothing), ``dcp`` (DCP with
--dcp-config through ``pipelines.dcp.run``, the pipeline of inference_dcp.py, into WORK/dcp), any number of
``NAME=CONFIG.yaml`` configured models (run over BENCH/hazy into WORK/NAME by inference_accsamp.py when the config
has a ``guidance`` section, else inference_stage2.py, each in a subprocess) and any number of ``NAME=DIR`` result
folders computed elsewhere. Each is evaluated against BENCH/clean with evaluate.py's metrics (``metrics.evaluation``:
PSNR / SSIM / CIEDE2000, results matched by the <name>_<k> -> <name> rule, plus any no-reference metrics of
``--no-ref-metrics`` / ``--preset paper``); per-method reports go to WORK/<method>/eval, the table to
WORK/benchmark.md and WORK/benchmark.json, one box-plot chart per metric to WORK/charts/<metric>.png
(``tools.compare_methods``). The charts need matplotlib, of the optional metrics group: without it the tool stops
before any work with exit status 2 and one line naming the install command.

    python -m tools.run_benchmark --bench data/bench [--methods hazy dcp accsamp=configs/inference/stage2_accsamp.yaml]
                                  [--preset paper] [--metric-weights DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from metrics import iqa
from metrics.evaluation import DEFAULT_NO_REF, PRESETS, evaluate_folders, parse_metric_list, write_report
from pipelines import dcp as dcp_pipeline
from pipelines.settings import InferenceSettings
from tools.compare_methods import comparison_table, save_charts
from utils.atomic import write_text_atomic
from utils.common import load_config
from utils.optional import require

LOG = logging.getLogger("run_benchmark")
ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("hazy", "dcp")


def run_dcp(bench: Path, work: Path, config: Path, overrides: list[str], skip_existing: bool) -> Path:
    """DCP over BENCH/hazy into WORK/dcp; returns the result folder. Raises RuntimeError if images failed."""
    dst = work / "dcp"
    cfg = load_config(config, [*overrides, f"inference.image_folder={bench / 'hazy'}", f"inference.result_folder={dst}",
                               "inference.save_transmission=False"])
    if dcp_pipeline.run(cfg, InferenceSettings.from_config(cfg), SimpleNamespace(skip_existing=skip_existing)) != 0:
        raise RuntimeError(f"DCP failed on some images of {bench / 'hazy'} (see the log)")
    return dst


def run_model(bench: Path, work: Path, name: str, config: Path, skip_existing: bool) -> Path:
    """Run the inference script a model config belongs to over BENCH/hazy into WORK/NAME; returns that folder."""
    dst = work / name
    script = "inference_accsamp.py" if "guidance" in load_config(config) else "inference_stage2.py"
    cmd = [sys.executable, str(ROOT / script), "--config", str(config), "--set",
           f"inference.image_folder={bench / 'hazy'}", f"inference.result_folder={dst}"]
    if subprocess.run(cmd + (["--skip-existing"] if skip_existing else []), cwd=ROOT).returncode != 0:
        raise RuntimeError(f"{script} with {config} failed on some images of {bench / 'hazy'} (see the log)")
    return dst


def parse_method(text: str) -> tuple[str, Path | None]:
    """'hazy' | 'dcp' -> (name, None); 'NAME=DIR' or 'NAME=CONFIG.yaml' -> (NAME, path)."""
    name, sep, folder = text.partition("=")
    if not sep:
        if text not in BUILTIN:
            raise argparse.ArgumentTypeError(f"unknown method '{text}': use {' or '.join(BUILTIN)}, NAME=DIR "
                                             "or NAME=CONFIG.yaml")
        return text, None
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got '{text}'")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate hazy input, DCP and model results on a synthetic benchmark")
    parser.add_argument("--bench", required=True, type=Path, help="folder with hazy/, clean/ (tools.make_benchmark)")
    parser.add_argument("--methods", nargs="+", type=parse_method, default=[("hazy", None), ("dcp", None)],
                        metavar="METHOD", help="hazy, dcp, NAME=CONFIG.yaml (run that model) and/or NAME=DIR "
                        "(existing results over BENCH/hazy)")
    parser.add_argument("--work", type=Path, help="output folder (default: BENCH/runs)")
    parser.add_argument("--dcp-config", type=Path, default=ROOT / "configs" / "inference" / "dcp.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DCP config overrides")
    parser.add_argument("--skip-existing", action="store_true", help="keep DCP/model results that already exist")
    parser.add_argument("--no-ref-metrics", type=parse_metric_list, default=[],
                        help=f"no-reference metrics to add, as evaluate.py (e.g. {','.join(DEFAULT_NO_REF)})")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="add evaluate.py's preset (paper = the RTTS table)")
    parser.add_argument("--metric-weights", type=Path, metavar="DIR", help="as evaluate.py")
    args = parser.parse_args(argv)
    require("matplotlib", "metrics")  # the charts; checked before any method runs
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    hazy, clean = args.bench / "hazy", args.bench / "clean"
    for folder in (hazy, clean):
        if not folder.is_dir():
            parser.error(f"benchmark folder lacks {folder.name}/: {folder}")
    names = [name for name, _ in args.methods]
    if len(set(names)) != len(names):
        parser.error(f"method names must be unique, got {names}")
    work = args.work or args.bench / "runs"
    no_ref = list(dict.fromkeys((list(PRESETS[args.preset]) if args.preset else []) + args.no_ref_metrics))
    iqa.offline_environment()

    folders: list[tuple[str, Path]] = []
    for name, folder in args.methods:
        if folder is None and name == "hazy":
            folder = hazy
        elif folder is None:
            folder = run_dcp(args.bench, work, args.dcp_config, args.set, args.skip_existing)
        elif folder.suffix in (".yaml", ".yml"):
            folder = run_model(args.bench, work, name, folder, args.skip_existing)
        folders.append((name, folder))
    rows, reports, status = [], [], 0
    for name, folder in folders:
        report = evaluate_folders(folder, clean, no_ref, weights_dir=args.metric_weights)
        summary = write_report(report, work / name / "eval", f"{name} on {args.bench}",
                               {"results": str(folder), "references": str(clean)})
        if report.failed or report.missing_reference:
            LOG.warning("%s: %d failed, %d without reference (see %s)", name, len(report.failed),
                        len(report.missing_reference), work / name / "eval" / "summary.md")
            status = 1 if report.failed else status
        for message in report.unavailable.values():
            LOG.error("%s: metric unavailable: %s", name, message)
        status = 1 if report.unavailable else status
        rows.append((name, summary))
        reports.append((name, report))
    table = comparison_table(rows, reports[0][1].metrics)
    save_charts(reports, reports[0][1].metrics, work / "charts")
    write_text_atomic(work / "benchmark.md", f"# Benchmark {args.bench}\n\n{table}")
    write_text_atomic(work / "benchmark.json", json.dumps({name: s for name, s in rows}, indent=2) + "\n")
    print(table, end="")
    return status


if __name__ == "__main__":
    sys.exit(main())
