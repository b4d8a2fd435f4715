"""Benchmark AlignOp: fast O(HW) ``align_op`` vs the patch-materialising ``align_op_reference``.

Each (size, method) case runs in its own subprocess so peak memory is not polluted by the
previous case. Peak memory is torch.cuda.max_memory_allocated above the inputs on CUDA, and on
CPU the growth of the process high-water mark (ru_maxrss) during the first call, i.e. the extra
resident memory the operator needs beyond the inputs. "first" is the first call at that size
(includes page faults of fresh allocations), "steady" the median of the following calls.
The reference is skipped when its estimated memory exceeds --mem-limit-gb.

Usage: python -m benchmarks.bench_alignop [--device cpu|cuda] [--sizes 512 2K 4K 8K]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.timing import sync
from sampler.align import align_op, align_op_reference, patch_grid

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"512": (512, 512), "2K": (2048, 2048), "4K": (2160, 3840), "8K": (4320, 7680)}
METHODS = {"fast": align_op, "reference": align_op_reference}
# peak bytes of align_op_reference / bytes of one float32 (B,C,nY,nX,p,p) patch tensor,
# measured on CPU at 512^2 and 1024^2 (about 4); rounded up for safety
REFERENCE_OVERHEAD = 5.0


def reference_bytes(h: int, w: int, batch: int, channels: int, patch: int = 37, stride: int = 10) -> float:
    """Estimated peak memory (bytes) of align_op_reference on float32 input."""
    ph, ys = patch_grid(h, patch, stride, True)
    pw, xs = patch_grid(w, patch, stride, True)
    return REFERENCE_OVERHEAD * len(ys) * len(xs) * ph * pw * batch * channels * 4


def run_case(method: str, h: int, w: int, batch: int, device: torch.device, repeats: int) -> dict:
    """Time and measure one method at one size in this process; returns a result dict."""
    fn = METHODS[method]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x_pm1 = (torch.rand(batch, 3, h, w, generator=gen) * 2 - 1).to(device)
    ref_pm1 = (torch.rand(batch, 3, h, w, generator=gen) * 2 - 1).to(device)
    fn(x_pm1[..., :64, :64].contiguous(), ref_pm1[..., :64, :64].contiguous())
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    fn(x_pm1, ref_pm1)
    sync(device)
    first = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x_pm1, ref_pm1)
        sync(device)
        times.append(time.perf_counter() - start)
    steady = statistics.median(times) if times else float("nan")
    return {"first_s": first, "steady_s": steady, "peak_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first one")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--mem-limit-gb", type=float, default=8.0)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per case")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.worker:
        method, h, w = args.worker[0], int(args.worker[1]), int(args.worker[2])
        print(json.dumps(run_case(method, h, w, args.batch, device, args.repeats)))
        return

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} channels=3 "
          f"patch=37 stride=10 cover_border=True")
    header = f"{'size':>5} {'HxW':>11} {'method':>9} {'first s':>9} {'steady s':>9} {'peak MB':>9}  note"
    print(header)
    print("-" * len(header))
    for name in args.sizes:
        h, w = SIZES[name]
        for method in METHODS:
            label = f"{name:>5} {f'{h}x{w}':>11} {method:>9}"
            if method == "reference":
                est_gb = reference_bytes(h, w, args.batch, 3) / 2**30
                if est_gb > args.mem_limit_gb:
                    print(f"{label} {'-':>9} {'-':>9} {'-':>9}  skipped: estimated {est_gb:.1f} GB "
                          f"> limit {args.mem_limit_gb:g} GB")
                    continue
            cmd = [sys.executable, "-m", "benchmarks.bench_alignop", "--worker", method, str(h), str(w),
                   "--device", args.device, "--batch", str(args.batch), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=ROOT)
            except subprocess.TimeoutExpired:
                print(f"{label} {'-':>9} {'-':>9} {'-':>9}  failed: timeout after {args.timeout_s:g} s")
                continue
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{label} {'-':>9} {'-':>9} {'-':>9}  failed (rc {proc.returncode}): {reason}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{label} {res['first_s']:>9.3f} {res['steady_s']:>9.3f} {res['peak_mb']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
