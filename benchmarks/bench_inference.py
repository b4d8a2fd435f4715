"""Benchmark DiffDehaze inference: denoiser step vs guided step, and AccSamp vs 50-step spaced sampling.

The model is the FULL-SIZE SD-2.1 + IRControlNet architecture (``model`` section of
``configs/inference/stage2_accsamp.yaml``, identical to ``stage2.yaml``'s; τ, ω and ``guidance`` are read from the
same file) built with random weights (no checkpoint files needed; random init does not change the cost).
Images below the tiling threshold (all default sizes) run untiled, exactly like the inference scripts.

Cases, each in its own subprocess so peak memory belongs to that case alone:
  step     one spaced sampler step: ControlNet + UNet forward and the posterior update (no grad)
  guided   one AccSamp phase-2 step: the same step plus the fidelity guidance (VAE decode of x0 with grad,
           weighted MS-SSIM, backward through the decoder to the latent); "guidance s" is the guidance part alone
  once     the per-image work outside the steps: condition (text encoding + condition-latent encode), final
           decode, and the AccSamp estimate (decode x0, AlignOp, DCP transmission, encode the estimate)
  spaced50 / accsamp   measured end-to-end sampling of one image (condition + sampling + final decode);
           run with --measure-totals (default: on CUDA only, since a CPU run takes many minutes per image)

Totals are also computed from the parts: spaced = condition + N·step + decode; AccSamp = condition +
(k_est+1)·step + estimate + n_guided·guided + (N−k_restart−n_guided)·step + decode, with k_est, k_restart from
``accsamp_steps(N, τ, ω)`` and n_guided the phase-2 steps inside the guidance window.

Peak memory: torch.cuda.max_memory_allocated on CUDA (weights included); on CPU the subprocess's ru_maxrss
(weights included; "above weights" subtracts the high-water mark right after building the model).

Usage: python benchmarks/bench_inference.py [--device auto|cpu|cuda] [--sizes 256 512] [--repeats N]
           [--precision auto|fp32|fp16|bf16] [--measure-totals auto|yes|no] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sampler.accsamp import accsamp_steps, sample_accsamp  # noqa: E402
from sampler.guidance import WeightedMSSSIMGuidance  # noqa: E402
from sampler.spaced import make_spaced_schedule, sample_spaced  # noqa: E402
from utils.align import align_op  # noqa: E402
from utils.common import choose_device, choose_dtype, instantiate_from_config, load_config  # noqa: E402
from utils.dcp import estimate_transmission  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "inference" / "stage2_accsamp.yaml"
PROMPT = "remove dense fog"
CASES = ("step", "guided", "once")
TOTAL_CASES = ("spaced50", "accsamp")
PART_KEYS = ("step_s", "guided_s", "condition_s", "decode_s", "align_s", "dcp_s", "encode_s")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bench:
    """The model, schedule and random inputs of one (size, device, precision) setting."""

    def __init__(self, cfg, size: int, device: torch.device, dtype: torch.dtype):
        torch.manual_seed(0)
        self.cfg, self.device, self.size = cfg, device, size
        self.model = instantiate_from_config(cfg.model.cldm).eval().to(device)
        if dtype != torch.float32:
            self.model.cast_denoiser(dtype)
        diffusion = instantiate_from_config(cfg.model.diffusion)
        self.parameterization = diffusion.parameterization
        self.schedule = make_spaced_schedule(diffusion.alphas_cumprod_np, cfg.inference.get("steps", 50))
        self.tau, self.omega = float(cfg.inference.tau), float(cfg.inference.omega)
        self.guidance = instantiate_from_config(cfg.guidance)
        gen = torch.Generator().manual_seed(1)
        self.hazy01 = torch.rand(1, 3, size, size, generator=gen).to(device)
        self.latent = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(device)
        self.c_txt = torch.randn(1, 77, cfg.model.cldm.params.unet_cfg.params.context_dim, generator=gen).to(device)
        self.c_img = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(device)

    def condition(self) -> dict:
        with torch.no_grad():
            return self.model.prepare_condition(self.hazy01, [PROMPT])

    def random_condition(self) -> dict:
        """Random text embedding and condition latent: the step cost does not depend on their values."""
        return {"c_txt": self.c_txt, "c_img": self.c_img}

    def encode(self, img_pm1: torch.Tensor) -> torch.Tensor:
        return self.model.vae_encode(img_pm1, sample=False)

    def one_step(self, cond: dict, x0_fn: Callable | None) -> None:
        """Sampling step k_restart (the first phase-2 step, inside the guidance window)."""
        _, k = accsamp_steps(len(self.schedule), self.tau, self.omega)
        with torch.no_grad():
            sample_spaced(self.model, self.latent, self.schedule, cond, parameterization=self.parameterization,
                          start_step=k, end_step=k + 1, x0_fn=x0_fn)

    def guided_x0_fn(self, timer: list[float]) -> Callable:
        """x0_fn applying the published guidance towards a random estimate; appends its own time to ``timer``."""
        gen = torch.Generator().manual_seed(2)
        estimate = (torch.rand(1, 3, self.size, self.size, generator=gen) * 2 - 1).to(self.device)
        self.guidance.set_target(estimate, estimate_transmission(self.hazy01))

        def x0_fn(x0: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
            start = time.perf_counter()
            out = self.guidance(x0, int(self.schedule.timesteps[i]), float(self.schedule.posterior_mean_coef1[i]),
                                self.model.vae_decode)
            _sync(self.device)
            timer.append(time.perf_counter() - start)
            return out

        return x0_fn


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _times(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [_timed(fn, device) for _ in range(repeats)]


def _best_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Best of ``repeats`` timed calls: the least disturbed by other load on the machine."""
    return min(_times(fn, device, warmup, repeats))


def run_case(case: str, bench: Bench, warmup: int, repeats: int) -> dict[str, float]:
    """Timings (seconds) of one case."""
    dev = bench.device
    if case == "step":
        cond = bench.random_condition()
        return {"step_s": _best_time(lambda: bench.one_step(cond, None), dev, warmup, repeats)}
    if case == "guided":
        cond, guide_times = bench.random_condition(), []
        x0_fn = bench.guided_x0_fn(guide_times)
        totals = _times(lambda: bench.one_step(cond, x0_fn), dev, warmup, repeats)
        best = totals.index(min(totals))
        return {"guided_s": totals[best], "guidance_s": guide_times[warmup + best]}
    if case == "once":
        hazy_pm1 = bench.hazy01 * 2 - 1
        with torch.no_grad():
            parts = {
                "condition_s": lambda: bench.condition(),
                "decode_s": lambda: bench.model.vae_decode(bench.latent),
                "align_s": lambda: align_op(hazy_pm1, hazy_pm1.flip(-1)),
                "dcp_s": lambda: estimate_transmission(bench.hazy01),
                "encode_s": lambda: bench.encode(hazy_pm1),
            }
            return {name: _best_time(fn, dev, warmup, repeats) for name, fn in parts.items()}
    if case == "spaced50":
        def spaced() -> None:
            with torch.no_grad():
                cond = bench.condition()
                z = sample_spaced(bench.model, bench.latent, bench.schedule, cond,
                                  parameterization=bench.parameterization)
                bench.model.vae_decode(z)

        return {"total_s": _best_time(spaced, dev, warmup, repeats)}
    if case == "accsamp":
        def accsamp() -> None:
            with torch.no_grad():
                cond = bench.condition()
            z, _ = sample_accsamp(bench.model, bench.latent, bench.schedule, cond, bench.hazy01, tau=bench.tau,
                                  omega=bench.omega, guidance=bench.guidance, decode_fn=bench.model.vae_decode,
                                  encode_fn=bench.encode, align_fn=align_op, transmission_fn=estimate_transmission,
                                  parameterization=bench.parameterization)
            with torch.no_grad():
                bench.model.vae_decode(z)

        return {"total_s": _best_time(accsamp, dev, warmup, repeats)}
    raise ValueError(f"unknown case '{case}'")


def worker(args: argparse.Namespace) -> None:
    """Run one case in this process and print its result as one JSON line."""
    device = choose_device(args.device)
    dtype = choose_dtype(args.precision, device)
    cfg = load_config(args.config)
    bench = Bench(cfg, args.size, device, dtype)
    _sync(device)
    weights_mb = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = run_case(args.worker, bench, args.warmup, args.repeats)
    if device.type == "cuda":
        peak_mb, above_mb = torch.cuda.max_memory_allocated(device) / 2**20, float("nan")
    else:
        peak_mb = _rss_mb()
        above_mb = peak_mb - weights_mb
    params_m = sum(p.numel() for p in bench.model.parameters()) / 1e6
    print(json.dumps({**result, "peak_mb": peak_mb, "above_mb": above_mb, "params_m": params_m}))


def spawn(case: str, size: int, args: argparse.Namespace) -> dict | str:
    """Run a case in a subprocess; returns its result dict or a one-line failure reason."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--size", str(size),
           "--device", args.device, "--precision", args.precision, "--config", str(args.config),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return f"timeout after {args.timeout_s:g} s"
    if proc.returncode != 0:
        return f"rc {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def computed_totals(parts: dict[str, float], cfg) -> tuple[float, float, str]:
    """(spaced total, AccSamp total, formula) from per-part costs, using the config's N, τ, ω and guidance."""
    diffusion = instantiate_from_config(cfg.model.diffusion)
    schedule = make_spaced_schedule(diffusion.alphas_cumprod_np, cfg.inference.get("steps", 50))
    n = len(schedule)
    k_est, k_restart = accsamp_steps(n, float(cfg.inference.tau), float(cfg.inference.omega))
    guidance: WeightedMSSSIMGuidance = instantiate_from_config(cfg.guidance)
    n_guided = sum(guidance.active(int(schedule.timesteps[n - 1 - k])) for k in range(k_restart, n))
    n_plain = (k_est + 1) + (n - k_restart - n_guided)
    estimate = parts["decode_s"] + parts["align_s"] + parts["dcp_s"] + parts["encode_s"]
    spaced = parts["condition_s"] + n * parts["step_s"] + parts["decode_s"]
    acc = parts["condition_s"] + n_plain * parts["step_s"] + estimate + n_guided * parts["guided_s"] + parts["decode_s"]
    formula = (f"spaced = cond + {n}·step + decode; AccSamp = cond + {n_plain}·step + estimate(decode+align+dcp+"
               f"encode) + {n_guided}·guided + decode  (N={n}, k_est={k_est}, k_restart={k_restart})")
    return spaced, acc, formula


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    parser.add_argument("--precision", default="auto", help="auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16, bf16")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512], help="square image sizes (pixels)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per part, the best is reported (default: 3 CUDA, 1 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 1 CUDA, 0 CPU)")
    parser.add_argument("--measure-totals", choices=("auto", "yes", "no"), default="auto",
                        help="also run full spaced/AccSamp sampling (auto: only on CUDA)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config with model/inference/guidance sections")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per case")
    parser.add_argument("--worker", choices=CASES + TOTAL_CASES, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    on_cuda = device.type == "cuda"
    args.repeats = args.repeats if args.repeats is not None else (3 if on_cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cuda else 0)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    bad = [s for s in args.sizes if s < 64 or s % 64]
    if bad:
        parser.error(f"sizes must be multiples of 64 (the inference padding), got {bad}")
    if args.worker:
        worker(args)
        return

    cfg = load_config(args.config)
    dtype = choose_dtype(args.precision, device)
    measure = args.measure_totals == "yes" or (args.measure_totals == "auto" and on_cuda)
    gpu = f" ({torch.cuda.get_device_name(device)})" if on_cuda else ""
    print(f"device={device}{gpu} torch={torch.__version__} dtype={str(dtype).replace('torch.', '')} "
          f"threads={torch.get_num_threads()} warmup={args.warmup} repeats={args.repeats} config={args.config}")
    print("model: the config's model section (default: full-size SD-2.1 UNet + IRControlNet + VAE + OpenCLIP text), "
          "random weights, batch 1, untiled")
    header = f"{'size':>5} {'latent':>7} {'case':>9} {'time s':>9} {'peak MB':>9} {'above MB':>9}  detail"
    print(header)
    print("-" * len(header))
    summary, params_m = [], None
    for size in args.sizes:
        parts: dict[str, float] = {}
        for case in CASES + (TOTAL_CASES if measure else ()):
            res = spawn(case, size, args)
            label = f"{size:>5} {f'{size // 8}²':>7} {case:>9}"
            if isinstance(res, str):
                print(f"{label} {'-':>9} {'-':>9} {'-':>9}  failed: {res}", flush=True)
                continue
            mem = f"{_fmt(res['peak_mb'], 0):>9} {_fmt(res['above_mb'], 0):>9}"
            if case == "step":
                line = f"{res['step_s']:>9.3f} {mem}  ControlNet + UNet forward + posterior update"
            elif case == "guided":
                line = (f"{res['guided_s']:>9.3f} {mem}  step + guidance; of which guidance {res['guidance_s']:.3f} s "
                        f"(decode w/ grad + MS-SSIM + backward)")
            elif case == "once":
                detail = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in res.items() if k.endswith("_s"))
                line = f"{'':>9} {mem}  per image (s): {detail}"
            else:
                line = f"{res['total_s']:>9.3f} {mem}  measured end-to-end (condition + sampling + decode)"
            params_m = res["params_m"]
            parts.update({k: v for k, v in res.items() if k.endswith("_s")})
            if case in TOTAL_CASES:
                parts[f"{case}_total_s"] = res["total_s"]
            print(f"{label} {line}", flush=True)
        summary.append((size, parts))

    if params_m is not None:
        print(f"model parameters: {params_m:.0f} M")
    print()
    print(f"{'size':>5} {'spaced50 s':>11} {'AccSamp s':>11} {'speed-up':>9}  source")
    formula = ""
    for size, parts in summary:
        if all(k in parts for k in PART_KEYS):
            spaced, acc, formula = computed_totals(parts, cfg)
            print(f"{size:>5} {spaced:>11.2f} {acc:>11.2f} {spaced / acc:>8.2f}x  computed from parts")
        if "spaced50_total_s" in parts and "accsamp_total_s" in parts:
            spaced, acc = parts["spaced50_total_s"], parts["accsamp_total_s"]
            print(f"{size:>5} {spaced:>11.2f} {acc:>11.2f} {spaced / acc:>8.2f}x  measured")
    if formula:
        print(f"computed: {formula}")


if __name__ == "__main__":
    main()
