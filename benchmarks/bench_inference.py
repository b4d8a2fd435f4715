"""Benchmark DiffDehaze inference: denoiser step vs guided step, and every sampler row (few-step solvers, the
published AccSamp, its speed levers one at a time and the fast preset) against 50-step spaced sampling.

The model is the FULL-SIZE SD-2.1 + IRControlNet architecture (``model`` section of
``configs/inference/stage2_accsamp.yaml``, identical to ``stage2.yaml``'s; τ, ω and ``guidance`` are read from the
same file) built with random weights (no checkpoint files needed; random init does not change the cost).
Images below the tiling threshold (all default sizes) run untiled, exactly like the inference scripts.

Cases, each in its own subprocess so peak memory belongs to that case alone:
  step     one step of each sampler (spaced, ddim, dpmpp_2m): ControlNet + UNet forward and the update (no grad)
  guided   one AccSamp phase-2 step: the same step plus the fidelity guidance (VAE decode of x0 with grad,
           weighted MS-SSIM, backward through the decoder to the latent); "guidance s" is the guidance part alone
  guided_linear  the same with the linear-surrogate pull-back (decode without grad, MS-SSIM, no decoder backward)
  once     the per-image work outside the steps: condition (text encoding + condition-latent encode), final
           decode, and the AccSamp estimate (decode x0, AlignOp, DCP transmission, encode the estimate)
  rows     every row of ``make_rows`` measured the way a user meets it, in one subprocess (CUDA peak memory per
           row): the inference scripts' own per-image path (``pipelines.folder.run_folder`` with the batch function
           of ``inference_stage2.py`` or ``inference_accsamp.py`` on the loaded model) over a folder holding one
           size×size PNG: reading, resize/pad to the config's geometry (a 256² photo is upscaled to the published
           min_short_side 512), condition encoding, both AccSamp phases with AlignOp and DCP, decoding, cropping
           back and saving the PNG. Model loading is excluded (the model is built once, with random weights, and
           its packed CPU weights are made before timing, as for the second image of a folder). Run with
           --measure-totals (default: on CUDA only: a CPU run takes minutes per image and row)

Totals are also computed from the parts (at size×size, no resize) for every row: condition + n_model·step(sampler)
+ [estimate] + n_guided·guidance(pull-back) + decode, where the counts n_model (denoiser calls) and n_guided
(guidance calls) come from running the row's real sampler code with a zero-cost model and guidance
(``count_calls``).

Peak memory: torch.cuda.max_memory_allocated on CUDA (weights included); on CPU the subprocess's ru_maxrss
(weights included; "above weights" subtracts the high-water mark right after building the model).

Usage: python -m benchmarks.bench_inference [--device auto|cpu|cuda] [--sizes 256 512] [--repeats N]
           [--precision auto|fp32|fp16|bf16] [--measure-totals auto|yes|no] [--threads N] [--quick]
           [--set inference.KEY=VALUE ...]
--quick: only the measured rows (no parts), one warm-up and one timed call each: the whole table on one CUDA GPU
in a few minutes. The closing markdown table has one line per (size, row): seconds per image and the ratio to
50-step spaced sampling of the same size and source.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from omegaconf import DictConfig, OmegaConf

from benchmarks.timing import peak_rss_mb, sync, timed
from haze.dcp import estimate_transmission
from model.builder import cldm_config
from pipelines import accsamp as accsamp_script
from pipelines import onestep as onestep_script
from pipelines import stage2 as stage2_script
from pipelines.folder import run_folder
from pipelines.runner import DiffusionRunner
from pipelines.settings import InferenceSettings
from sampler.accsamp import accsamp_steps, sample_accsamp
from sampler.align import align_op
from sampler.guidance import WeightedMSSSIMGuidance
from sampler.pullback import LinearDecoderPullback
from sampler.registry import SAMPLERS, make_sampler
from sampler.spaced import make_spaced_schedule
from model.onestep import AdapterMeta, LoRADenoiser
from utils.atomic import atomic_write
from utils.common import choose_device, choose_dtype, instantiate_from_config, load_config
from utils.image_io import save_png01

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "inference" / "stage2_accsamp.yaml"
FAST_CONFIG = ROOT / "configs" / "inference" / "stage2_accsamp_fast.yaml"
PROMPT = "remove dense fog"
CASES = ("step", "guided", "guided_linear", "once")
PART_KEYS = ("step_s", "guidance_s", "guidance_linear_s", "condition_s", "decode_s", "align_s", "dcp_s", "encode_s")


@dataclass(frozen=True)
class Row:
    """One sampler configuration of the table: plain sampling, or AccSamp with its speed options."""

    name: str
    sampler: str
    steps: int
    accsamp: bool = False
    every: int = 1
    pullback: str = "autograd"
    spacing: str = "uniform"
    onestep: bool = False

    def config(self, cfg: DictConfig) -> DictConfig:
        """``cfg`` with this row's ``inference.*`` keys: the config a user runs for it."""
        return OmegaConf.merge(cfg, {"inference": {"sampler": self.sampler, "steps": self.steps,
                                                   "spacing": self.spacing, "guidance_every": self.every,
                                                   "guidance_pullback": self.pullback}})


def make_rows(fast_config: Path = FAST_CONFIG) -> list[Row]:
    """The benchmark rows; the fast preset and its levers are read from ``fast_config``."""
    fast = InferenceSettings.from_config(load_config(fast_config))
    f_sampler, f_steps, f_every, f_pull = fast.sampler, fast.steps, fast.guidance_every, fast.guidance_pullback
    f_spacing = fast.spacing
    return [
        Row("spaced 50 (published)", "spaced", 50),
        Row("dpmpp_2m 10", "dpmpp_2m", 10),
        Row("dpmpp_2m 20", "dpmpp_2m", 20),
        Row("dpmpp_2m 25", "dpmpp_2m", 25),
        Row("ddim 25", "ddim", 25),
        Row("AccSamp (published)", "spaced", 50, accsamp=True),
        Row(f"AccSamp + {f_sampler} {f_steps}", f_sampler, f_steps, accsamp=True, spacing=f_spacing),
        Row(f"AccSamp + guidance every {f_every}", "spaced", 50, accsamp=True, every=f_every),
        Row(f"AccSamp + {f_pull} pull-back", "spaced", 50, accsamp=True, pullback=f_pull),
        Row("AccSamp fast preset", f_sampler, f_steps, accsamp=True, every=f_every, pullback=f_pull,
            spacing=f_spacing),
        Row("one-step student", "spaced", 50, onestep=True),  # last: its adapters are merged into the model
    ]


class Bench:
    """The model, schedule and random inputs of one (size, device, precision) setting.

    The model is loaded as the scripts load it (:class:`pipelines.runner.DiffusionRunner`: device, precision,
    channels-last and packed-weight settings of the config), with random weights instead of the weight files."""

    def __init__(self, cfg: DictConfig, size: int, device: torch.device, precision: str):
        torch.manual_seed(0)
        self.cfg = cfg = OmegaConf.merge(cfg, {"inference": {"device": str(device), "precision": precision}})
        self.device, self.size = device, size
        diffusion = instantiate_from_config(cfg.model.diffusion)
        inf = InferenceSettings.from_config(cfg)
        self.runner = DiffusionRunner(cfg, inf, built=(instantiate_from_config(cldm_config(cfg.model)), diffusion))
        self.model = self.runner.model
        self.parameterization = diffusion.parameterization
        self.alphas_cumprod = diffusion.alphas_cumprod_np
        self.schedule = make_spaced_schedule(self.alphas_cumprod, inf.steps)
        self.tau, self.omega = inf.tau, inf.omega
        self.guidance = instantiate_from_config(cfg.guidance)
        gen = torch.Generator().manual_seed(1)
        self.hazy01 = torch.rand(1, 3, size, size, generator=gen).to(device)
        self.latent = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(device)
        self.c_txt = torch.randn(1, 77, cfg.model.cldm.params.unet_cfg.params.context_dim, generator=gen).to(device)
        self.c_img = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(device)
        self.prepare_weights((size // 8, size // 8))

    def prepare_weights(self, latent_hw: tuple[int, int]) -> None:
        """One untimed denoiser call at ``latent_hw``: it makes the packed fp32 CPU conv weights of that size
        (``inference.pack_weights``), a one-off cost that every later step and image of the size reuses."""
        latent = torch.zeros(1, 4, *latent_hw, device=self.device)
        with torch.no_grad():
            self.runner.denoiser(latent_hw)(latent, torch.zeros(1, dtype=torch.long, device=self.device),
                                            {"c_txt": self.c_txt, "c_img": latent})

    def condition(self) -> dict:
        with torch.no_grad():
            return self.model.prepare_condition(self.hazy01, [PROMPT])

    def random_condition(self) -> dict:
        """Random text embedding and condition latent: the step cost does not depend on their values."""
        return {"c_txt": self.c_txt, "c_img": self.c_img}

    def encode(self, img_pm1: torch.Tensor) -> torch.Tensor:
        return self.model.vae_encode(img_pm1, sample=False)

    def one_step(self, cond: dict, x0_fn: Callable | None, sampler: str = "spaced") -> None:
        """Sampling step k_restart (the first phase-2 step, inside the guidance window) of ``sampler``."""
        _, k = accsamp_steps(len(self.schedule), self.tau, self.omega)
        with torch.no_grad():
            make_sampler(sampler)(self.model, self.latent, self.schedule, cond,
                                  parameterization=self.parameterization, start_step=k, end_step=k + 1, x0_fn=x0_fn)

    def guided_x0_fn(self, timer: list[float], pullback: str = "autograd") -> Callable:
        """x0_fn applying the published guidance towards a random estimate with the given pull-back (the linear
        surrogate is fitted once, untimed, as AccSamp does after phase 1); appends its own time to ``timer``."""
        gen = torch.Generator().manual_seed(2)
        estimate = (torch.rand(1, 3, self.size, self.size, generator=gen) * 2 - 1).to(self.device)
        self.guidance.set_target(estimate, estimate_transmission(self.hazy01))
        vjp = None
        if pullback == "linear":
            with torch.no_grad():
                vjp = LinearDecoderPullback.fit(self.encode(estimate), estimate)

        def x0_fn(x0: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
            start = time.perf_counter()
            out = self.guidance(x0, int(self.schedule.timesteps[i]), float(self.schedule.posterior_mean_coef1[i]),
                                self.model.vae_decode, vjp)
            sync(self.device)
            timer.append(time.perf_counter() - start)
            return out

        return x0_fn

    def script_folder(self, root: Path) -> Path:
        """A folder under ``root`` holding one random size×size PNG (the scripts' input), created once; before the
        first timed run the denoiser runs once at the scripts' latent size (:meth:`prepare_weights`)."""
        folder = root / "input"
        if not folder.is_dir():
            save_png01(torch.rand(3, self.size, self.size, generator=torch.Generator().manual_seed(3)),
                       folder / "hazy.png")
            hh, ww = self.runner.geometry(self.size, self.size).padded_hw
            self.prepare_weights((hh // 8, ww // 8))
        return folder

    def load_row(self, row: Row, root: Path) -> None:
        """Model loading for ``row``, untimed like the scripts' own: the one-step student's adapters merged into
        the model (random adapters of the shipped rank), then the packed weights remade by one denoiser call."""
        self.script_folder(root)
        if row.onestep and self.runner.onestep_timestep is None:
            self.runner.load_adapters(str(write_random_adapters(self.cfg, root / "adapters.safetensors")))
            hh, ww = self.runner.geometry(self.size, self.size).padded_hw
            self.prepare_weights((hh // 8, ww // 8))

    def run_script(self, row: Row, root: Path) -> None:
        """One image through the scripts' per-image path (``run_folder`` + the script's batch function, on the
        model loaded by :meth:`load_row` and reconfigured with the row's settings): read, resize/pad, condition,
        sample (AccSamp: both phases, AlignOp, DCP, guidance), decode, crop back, save. RuntimeError when the
        image fails."""
        cfg = OmegaConf.merge(row.config(self.cfg), {"inference": {
            "image_folder": str(self.script_folder(root)), "result_folder": str(root / "output")}})
        inf = InferenceSettings.from_config(cfg)
        script = onestep_script if row.onestep else accsamp_script if row.accsamp else stage2_script
        self.runner.configure(cfg, inf)
        status = run_folder(inf, script.make_process(cfg, inf, self.runner), script.output_names(inf), False,
                            row.name, self.runner.batch_key)
        if status != 0:
            raise RuntimeError(f"row '{row.name}': the script path failed (status {status})")


def write_random_adapters(cfg: DictConfig, path: Path, rank: int = 4, timestep: int = 999) -> Path:
    """A one-step adapter file of rank ``rank`` for ``cfg``'s model with small random tensors (shapes taken from the
    model built on the meta device): merged into random weights it costs what a trained student costs."""
    from safetensors.torch import save

    with torch.device("meta"):
        ldm = instantiate_from_config(cldm_config(cfg.model))
        denoiser = LoRADenoiser(ldm, rank, train_input_conv=True, in_place=True)
        shapes = {k: v.shape for k, v in denoiser.adapter_state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    tensors = {k: torch.randn(shape, generator=gen) * 0.01 for k, shape in shapes.items()}
    meta = AdapterMeta(rank, float(rank), timestep).as_metadata()
    atomic_write(path, lambda handle: handle.write(save(tensors, metadata=meta)))
    return path


def run_row(row: Row, model_fn: Callable, latent: torch.Tensor, hazy01: torch.Tensor, alphas_cumprod: np.ndarray,
            parameterization: str, tau: float, omega: float, guidance: WeightedMSSSIMGuidance,
            decode_fn: Callable, encode_fn: Callable, condition_fn: Callable) -> None:
    """Condition + the row's sampler (or AccSamp with its options) + final decode on the given functions: the
    sampling code of the row, which :func:`count_calls` runs with a zero-cost model to count its calls."""
    schedule = make_spaced_schedule(alphas_cumprod, row.steps, row.spacing)
    sampler = make_sampler(row.sampler)
    with torch.no_grad():
        cond = condition_fn()
    if row.accsamp:
        z, _ = sample_accsamp(model_fn, latent, schedule, cond, hazy01, tau=tau, omega=omega, guidance=guidance,
                              decode_fn=decode_fn, encode_fn=encode_fn, align_fn=align_op,
                              transmission_fn=estimate_transmission, parameterization=parameterization,
                              sampler=sampler, guidance_every=row.every, pullback=row.pullback)
    else:
        with torch.no_grad():
            z = sampler(model_fn, latent, schedule, cond, parameterization=parameterization)
    with torch.no_grad():
        decode_fn(z)


class _CountingGuidance(WeightedMSSSIMGuidance):
    """The configured guidance window and schedule, at zero cost: counts the active calls and returns x0."""

    def __init__(self, base: WeightedMSSSIMGuidance):
        super().__init__(base.scale, base.t_start, base.t_stop, "rgb", base.repeat)
        self.count = 0

    def __call__(self, x0, t, coef1, decode_fn, decode_vjp_fn=None):
        if self.active(t):
            self.count += self.repeat
        return x0


def count_calls(row: Row, cfg) -> tuple[int, int]:
    """(denoiser calls, guidance applications) of one image of ``row``, counted by running the row's real sampler
    code on a tiny latent with a zero model, identity decoder/encoder and a counting guidance (the one-step
    student: one call, by construction)."""
    if row.onestep:
        return 1, 0
    diffusion = instantiate_from_config(cfg.model.diffusion)
    guidance = _CountingGuidance(instantiate_from_config(cfg.guidance))
    calls = [0]

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        calls[0] += 1
        return torch.zeros_like(x)

    def decode_fn(z: torch.Tensor) -> torch.Tensor:
        return z[:, :3].repeat_interleave(8, -2).repeat_interleave(8, -1)

    def encode_fn(img: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(img, 8)
        return torch.cat([pooled, pooled[:, :1] ** 2], 1)

    inf = InferenceSettings.from_config(cfg)
    run_row(row, model_fn, torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64), diffusion.alphas_cumprod_np,
            diffusion.parameterization, inf.tau, inf.omega, guidance, decode_fn, encode_fn, lambda: None)
    return calls[0], guidance.count


def _times(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(repeats)]


def _best_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Best of ``repeats`` timed calls: the least disturbed by other load on the machine."""
    return min(_times(fn, device, warmup, repeats))


def select_rows(indices: list[int] | None) -> list[Row]:
    """The rows with these indices into ``make_rows()`` (all when None); row 0, the 50-step reference, always."""
    rows = make_rows()
    if indices is None:
        return rows
    bad = [i for i in indices if not 0 <= i < len(rows)]
    if bad:
        raise ValueError(f"--rows: indices must be in 0..{len(rows) - 1}, got {bad}")
    return [rows[i] for i in sorted({0, *indices})]


def run_case(case: str, bench: Bench, warmup: int, repeats: int, rows: list[Row] | None = None) -> dict:
    """Timings (seconds) of one case; ``rows`` also returns per-row CUDA peak memory (MB)."""
    dev = bench.device
    if case == "step":
        cond = bench.random_condition()
        times = {name: _best_time(partial(bench.one_step, cond, None, name), dev, warmup, repeats)
                 for name in SAMPLERS}
        return {"step_s": times["spaced"], **{f"step_{name}_s": t for name, t in times.items()}}
    if case in ("guided", "guided_linear"):
        pullback = "linear" if case == "guided_linear" else "autograd"
        suffix = "_linear" if case == "guided_linear" else ""
        cond, guide_times = bench.random_condition(), []
        x0_fn = bench.guided_x0_fn(guide_times, pullback)
        totals = _times(lambda: bench.one_step(cond, x0_fn), dev, warmup, repeats)
        best = totals.index(min(totals))
        return {f"guided{suffix}_s": totals[best], f"guidance{suffix}_s": guide_times[warmup + best]}
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
    if case == "rows":
        out = {"script_hw": list(bench.runner.geometry(bench.size, bench.size).padded_hw)}
        with tempfile.TemporaryDirectory(prefix="bench_inference_") as root:
            for k, row in enumerate(rows or make_rows()):
                bench.load_row(row, Path(root))
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                out[f"row{k}_s"] = _best_time(partial(bench.run_script, row, Path(root)), dev, warmup, repeats)
                if dev.type == "cuda":
                    out[f"row{k}_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        return out
    raise ValueError(f"unknown case '{case}'")


def worker(args: argparse.Namespace) -> None:
    """Run one case in this process and print its result as one JSON line."""
    device = choose_device(args.device)
    cfg = load_config(args.config, args.set)
    bench = Bench(cfg, args.size, device, args.precision)
    sync(device)
    weights_mb = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = run_case(args.worker, bench, args.warmup, args.repeats, select_rows(args.rows))
    if device.type == "cuda":
        peak_mb, above_mb = torch.cuda.max_memory_allocated(device) / 2**20, float("nan")
    else:
        peak_mb = peak_rss_mb()
        above_mb = peak_mb - weights_mb
    params_m = sum(p.numel() for p in bench.model.parameters()) / 1e6
    print(json.dumps({**result, "peak_mb": peak_mb, "above_mb": above_mb, "params_m": params_m}))


def spawn(case: str, size: int, args: argparse.Namespace) -> dict | str:
    """Run a case in a subprocess (``python -m benchmarks.bench_inference --worker ...`` in the repository root, the
    config path made absolute); returns its result dict or a one-line failure reason."""
    cmd = [sys.executable, "-m", "benchmarks.bench_inference", "--worker", case, "--size", str(size),
           "--device", args.device, "--precision", args.precision, "--config", str(Path(args.config).resolve()),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.rows is not None:
        cmd += ["--rows", *map(str, args.rows)]
    if args.set:
        cmd += ["--set", *args.set]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timeout after {args.timeout_s:g} s"
    if proc.returncode != 0:
        return f"rc {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def computed_total(parts: dict[str, float], row: Row, counts: tuple[int, int]) -> float:
    """Seconds per image of ``row`` from the measured parts and its (denoiser, guidance) call counts."""
    n_model, n_guided = counts
    total = parts["condition_s"] + n_model * parts[f"step_{row.sampler}_s"] + parts["decode_s"]
    if row.accsamp:
        total += parts["decode_s"] + parts["align_s"] + parts["dcp_s"] + parts["encode_s"]
        total += n_guided * parts["guidance_linear_s" if row.pullback == "linear" else "guidance_s"]
    return total


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
    parser.add_argument("--rows", nargs="+", type=int, default=None,
                        help="row indices to run (0 = spaced 50, always included; see make_rows; default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="measured rows only (no parts; default warm-up 1, repeats 1): the CUDA table in minutes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, as the scripts take them (e.g. inference.min_short_side=256)")
    parser.add_argument("--worker", choices=CASES + ("rows",), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    on_cuda = device.type == "cuda"
    args.repeats = args.repeats if args.repeats is not None else (3 if on_cuda and not args.quick else 1)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cuda or args.quick else 0)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    bad = [s for s in args.sizes if s < 64 or s % 64]
    if bad:
        parser.error(f"sizes must be multiples of 64 (the inference padding), got {bad}")
    if args.worker:
        worker(args)
        return

    cfg = load_config(args.config, args.set)
    dtype = choose_dtype(args.precision, device)
    measure = args.quick or args.measure_totals == "yes" or (args.measure_totals == "auto" and on_cuda)
    try:
        rows = select_rows(args.rows)
    except ValueError as err:
        parser.error(str(err))
    counts = [count_calls(row, cfg) for row in rows]
    gpu = f" ({torch.cuda.get_device_name(device)})" if on_cuda else ""
    print(f"device={device}{gpu} torch={torch.__version__} dtype={str(dtype).replace('torch.', '')} "
          f"threads={torch.get_num_threads()} warmup={args.warmup} repeats={args.repeats} config={args.config}")
    print("model: the config's model section (default: full-size SD-2.1 UNet + IRControlNet + VAE + OpenCLIP text), "
          "random weights, batch 1, untiled")
    header = f"{'size':>5} {'latent':>7} {'case':>13} {'time s':>9} {'peak MB':>9} {'above MB':>9}  detail"
    print(header)
    print("-" * len(header))
    table, params_m = [], None
    for size in args.sizes:
        parts: dict[str, float] = {}
        for case in (() if args.quick else CASES) + (("rows",) if measure else ()):
            res = spawn(case, size, args)
            label = f"{size:>5} {f'{size // 8}²':>7} {case:>13}"
            if isinstance(res, str):
                print(f"{label} {'-':>9} {'-':>9} {'-':>9}  failed: {res}", flush=True)
                continue
            mem = f"{_fmt(res['peak_mb'], 0):>9} {_fmt(res['above_mb'], 0):>9}"
            if case == "step":
                detail = ", ".join(f"{name} {res[f'step_{name}_s']:.3f}" for name in SAMPLERS)
                line = f"{res['step_s']:>9.3f} {mem}  ControlNet + UNet forward + update; per sampler (s): {detail}"
            elif case == "guided":
                line = (f"{res['guided_s']:>9.3f} {mem}  step + guidance; of which guidance {res['guidance_s']:.3f} s "
                        f"(decode w/ grad + MS-SSIM + backward)")
            elif case == "guided_linear":
                line = (f"{res['guided_linear_s']:>9.3f} {mem}  step + guidance with the linear pull-back; of which "
                        f"guidance {res['guidance_linear_s']:.3f} s (decode + MS-SSIM + surrogate adjoint)")
            elif case == "once":
                detail = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in res.items() if k.endswith("_s"))
                line = f"{'':>9} {mem}  per image (s): {detail}"
            else:
                hw = "×".join(map(str, res["script_hw"]))
                line = (f"{'':>9} {mem}  {len(rows)} rows measured through the scripts' per-image path "
                        f"(read, resize/pad to {hw}, condition, sampling, decode, save)")
            params_m = res["params_m"]
            parts.update({k: v for k, v in res.items() if k.endswith("_s") or k.endswith("_peak_mb")})
            print(f"{label} {line}", flush=True)
        sources = []
        if all(k in parts for k in PART_KEYS) and all(f"step_{r.sampler}_s" in parts for r in rows):
            sources.append(("computed from parts", [computed_total(parts, r, c) for r, c in zip(rows, counts)]))
        if all(f"row{k}_s" in parts for k in range(len(rows))):
            sources.append(("measured", [parts[f"row{k}_s"] for k in range(len(rows))]))
        for source, totals in sources:
            for k, (row, (n_model, n_guided), total) in enumerate(zip(rows, counts, totals)):
                peak = parts.get(f"row{k}_peak_mb") if source == "measured" else None
                table.append((size, row, n_model, n_guided, total, total / totals[0], peak, source))

    if params_m is not None:
        print(f"model parameters: {params_m:.0f} M")
    print()
    print("| size | sampler | model evals | guided steps | s / image | × spaced 50 | peak MB | source |")
    print("|-----:|---------|------------:|-------------:|----------:|------------:|--------:|--------|")
    for size, row, n_model, n_guided, total, ratio, peak, source in table:
        print(f"| {size}² | {row.name} | {n_model} | {n_guided} | {total:.2f} | {ratio:.2f} | {_fmt(peak, 0)} | "
              f"{source} |")
    print("\nmeasured = the inference scripts' per-image path on one size² PNG (resized/padded as the config "
          "says); computed from parts, at size² without resizing:\ncomputed = condition + n_model·step(sampler) + [AccSamp estimate: decode + align + dcp + encode] + "
          "n_guided·guidance(pull-back) + decode; counts from the rows' real sampler code (count_calls)")


if __name__ == "__main__":
    main()
