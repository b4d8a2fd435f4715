"""Run several sampler configurations over one folder with your weights and compare them in one table.

    python -m tools.compare_samplers --image-folder hazy/ --out compare/ \
        [--set inference.sd_path=... inference.controlnet_path=...] \
        [--run NAME=CONFIG[:KEY=VALUE,KEY=VALUE...] ...] [--no-ref-metrics fade,niqe_hcdyc,brisque_svr]
        [--metric-weights DIR]

Each run is one inference config (``inference_accsamp.py`` when the config has ``inference.tau``, else
``inference_stage2.py``; run through their pipelines, ``pipelines.accsamp`` / ``pipelines.stage2``) with optional
overrides; ``--set`` applies to every run. The FIRST run is the reference (default: the published AccSamp). Default
runs:

    accsamp              configs/inference/stage2_accsamp.yaml        (reference)
    accsamp_fast         configs/inference/stage2_accsamp_fast.yaml
    accsamp_dpmpp_2m_20  stage2_accsamp.yaml with inference.sampler=dpmpp_2m, inference.steps=20
    spaced50             configs/inference/stage2.yaml

Every run writes its images to ``<out>/<name>/`` and runs in its own subprocess (``python -m tools.compare_samplers
--worker ...`` in the repository root), so its peak memory is its own: CUDA ``max_memory_allocated`` (weights
included) or the CPU process's ``ru_maxrss``. Seconds per image time the script's per-image work (condition,
sampling, final decode; not model loading or PNG writing), measured by wrapping the script's batch function (its
pipeline's ``make_process``) that ``run_folder`` calls. Agreement with the reference is PSNR / SSIM (and CIEDE2000)
of each run's outputs against the reference run's outputs (``metrics.evaluation.evaluate_folders``); the
no-reference metrics are any of evaluate.py's (default: its offline set FADE, NIQE, BRISQUE; pyiqa's learned metrics
with ``--metric-weights``, never downloading; an unavailable metric shows "-"). Agreement with the published output
is not quality: the table only tells how far a faster sampler moves the result. Writes ``<out>/compare.md`` and
``<out>/compare.json`` atomically and prints the table. Exit status 1 if a run failed (the others are still
reported).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from metrics import iqa
from metrics.evaluation import DEFAULT_NO_REF, LABELS, NO_REFERENCE, evaluate_folders, parse_metric_list, summarize
from pipelines.cli import check_weights
from pipelines.folder import run_folder
from pipelines.registry import pipeline_for
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from utils.atomic import write_text_atomic
from utils.common import load_config

ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("compare_samplers")
DEFAULT_RUNS = (
    "accsamp=configs/inference/stage2_accsamp.yaml",
    "accsamp_fast=configs/inference/stage2_accsamp_fast.yaml",
    "accsamp_dpmpp_2m_20=configs/inference/stage2_accsamp.yaml:inference.sampler=dpmpp_2m,inference.steps=20",
    "spaced50=configs/inference/stage2.yaml",
)


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    """``NAME=CONFIG[:KEY=VALUE,...]`` -> (name, config path, overrides). ValueError naming the spec if malformed."""
    name, sep, rest = spec.partition("=")
    config, _, overrides = rest.partition(":")
    if not sep or not name or not config or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--run expects NAME=CONFIG[:KEY=VALUE,...] with a plain NAME, got '{spec}'")
    extra = [o for o in overrides.split(",") if o]
    bad = [o for o in extra if "=" not in o]
    if bad:
        raise ValueError(f"--run '{name}': overrides must be KEY=VALUE, got {bad}")
    return name, config, extra


def resolve_config(config: str) -> str:
    """A config path as given (absolute or relative to the working directory), else relative to the repository."""
    return config if Path(config).is_file() else str(ROOT / config)


def script_for(cfg) -> str:
    """The inference script that runs this config: AccSamp when it has ``inference.tau``, else plain stage 2."""
    return "inference_accsamp" if "tau" in cfg.inference else "inference_stage2"


def worker(config: str, overrides: list[str]) -> dict:
    """Run one config's inference script (its pipeline module) in this process; seconds per image and peak memory."""
    cfg = load_config(config, overrides)
    module = pipeline_for(script_for(cfg))
    seconds: list[float] = []
    inf = InferenceSettings.from_config(cfg)
    cuda = torch.cuda.is_available() and inf.device in ("auto", "cuda")
    check_weights(inf.weight_paths())
    runner = DiffusionRunner(cfg, inf)
    process = module.make_process(cfg, inf, runner)

    def timed_process(batch, callback=None):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = process(batch, callback)
        if cuda:
            torch.cuda.synchronize()
        seconds.extend([(time.perf_counter() - start) / len(batch)] * len(batch))
        return out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    status = run_folder(inf, timed_process, module.output_names(inf), False, script_for(cfg), runner.batch_key)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    accsamp = script_for(cfg) == "inference_accsamp"
    return {"status": status, "seconds": seconds, "peak_mb": peak_mb, "script": script_for(cfg),
            "sampler": inf.sampler, "steps": inf.steps, "guidance_every": inf.guidance_every,
            "guidance_pullback": inf.guidance_pullback if accsamp else "-"}


def spawn(config: str, overrides: list[str], timeout_s: float) -> dict | str:
    """One run in a subprocess (this tool's ``--worker``, from the repository root); its result dict, or a one-line
    failure reason."""
    cmd = [sys.executable, "-m", "tools.compare_samplers", "--worker", config, "--worker-set", *overrides]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout_s:g} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return f"rc {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(lines[-1])


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def markdown_table(rows: list[dict], no_ref: list[str]) -> str:
    head = ["run", "sampler", "steps", "guidance every / pull-back", "images", "s / image", "peak MB",
            "PSNR vs ref (dB)", "SSIM vs ref", *[LABELS[m] for m in no_ref]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        mean_s = sum(r["seconds"]) / len(r["seconds"]) if r["seconds"] else None
        guide = f"{r['guidance_every']} / {r['guidance_pullback']}" if r["guidance_pullback"] != "-" else "-"
        cells = [r["name"] + (" (reference)" if r.get("reference") else ""), r["sampler"], str(r["steps"]), guide,
                 str(len(r["seconds"])), _fmt(mean_s, 2), _fmt(r["peak_mb"], 0),
                 _fmt(r["metrics"].get("psnr"), 2), _fmt(r["metrics"].get("ssim"), 4),
                 *[_fmt(r["metrics"].get(m), 3) for m in no_ref]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(image_folder: Path, out: Path, runs: list[tuple[str, str, list[str]]], common: list[str],
            no_ref: list[str], timeout_s: float, metric_weights: Path | None = None) -> tuple[list[dict], int]:
    """Run every config, evaluate against the first, write compare.md/json; (rows, exit status)."""
    rows, status = [], 0
    reference_dir = out / runs[0][0]
    for k, (name, config, overrides) in enumerate(runs):
        overrides = [*common, *overrides, f"inference.image_folder={image_folder}",
                     f"inference.result_folder={out / name}"]
        LOG.info("run %s: %s %s", name, config, " ".join(overrides))
        res = spawn(config, overrides, timeout_s)
        if isinstance(res, str) or res["status"] != 0:
            reason = res if isinstance(res, str) else f"inference exit status {res['status']} (see its log)"
            LOG.error("run %s failed: %s", name, reason)
            rows.append({"name": name, "config": config, "error": reason})
            status = 1
            if isinstance(res, str):
                continue
        row = {"name": name, "config": config, "overrides": overrides, "reference": k == 0, **res}
        metrics: dict[str, float | None] = {}
        if k > 0 and reference_dir.is_dir():
            summary = summarize(evaluate_folders(out / name, reference_dir))
            metrics.update({m: summary[m]["mean"] if summary[m]["n"] else (math.inf if summary[m]["n_nonfinite"]
                                                                              else None) for m in ("psnr", "ssim")})
        if no_ref:
            summary = summarize(evaluate_folders(out / name, None, no_ref, weights_dir=metric_weights))
            metrics.update({m: summary[m]["mean"] for m in no_ref})
        row["metrics"] = metrics
        rows.append(row)
    table = markdown_table(rows, no_ref)
    write_text_atomic(out / "compare.md", f"# Sampler comparison on {image_folder}\n\nReference: {runs[0][0]} "
                      f"(PSNR/SSIM are agreement with its outputs, not quality)\n\n{table}")
    write_text_atomic(out / "compare.json", json.dumps(rows, indent=2, default=str))
    print(table, end="")
    return rows, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-folder", type=Path, help="folder of hazy images")
    parser.add_argument("--out", type=Path, help="output folder (one subfolder per run, compare.md/json)")
    parser.add_argument("--run", action="append", default=None, metavar="NAME=CONFIG[:KEY=VALUE,...]",
                        help="a sampler configuration (repeatable; the first is the reference)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--no-ref-metrics", default=",".join(DEFAULT_NO_REF),
                        help=f"comma list of evaluate.py's ({', '.join(NO_REFERENCE)}), or none")
    parser.add_argument("--metric-weights", type=Path, default=None, metavar="DIR",
                        help="pyiqa parameter files as in evaluate.py --metric-weights (nothing is downloaded)")
    parser.add_argument("--timeout-s", type=float, default=24 * 3600.0, help="per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-set", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.worker:
        print(json.dumps(worker(args.worker, args.worker_set)))
        return 0
    if args.image_folder is None or args.out is None:
        parser.error("--image-folder and --out are required")
    if not args.image_folder.is_dir():
        parser.error(f"--image-folder does not exist: {args.image_folder}")
    no_ref = parse_metric_list(args.no_ref_metrics)
    try:
        runs = [parse_run(spec) for spec in (args.run or DEFAULT_RUNS)]
        names = [name for name, _, _ in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"run names must be unique, got {names}")
        runs = [(name, resolve_config(config), overrides) for name, config, overrides in runs]
        for name, config, overrides in runs:  # every config loads before any heavy work
            load_config(config, [*args.set, *overrides])
        unknown = [m for m in no_ref if m not in NO_REFERENCE]
        if unknown:
            raise ValueError(f"--no-ref-metrics: unknown {unknown}; choose from {', '.join(NO_REFERENCE)}")
        if args.metric_weights is not None and not args.metric_weights.is_dir():
            raise ValueError(f"--metric-weights folder does not exist: {args.metric_weights}")
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.out.resolve() == args.image_folder.resolve():
        parser.error("--out must differ from --image-folder (inputs are never overwritten)")
    iqa.offline_environment()
    _, status = compare(args.image_folder.resolve(), args.out.resolve(), runs, args.set, no_ref, args.timeout_s,
                        args.metric_weights)
    return status


if __name__ == "__main__":
    sys.exit(main())
