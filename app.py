"""A local web page to dehaze one photo and tune AccSamp's τ/ω by eye (Gradio).

    pip install -r requirements-app.txt
    python app.py --config configs/inference/stage2_accsamp.yaml [--set inference.device=cuda ...] [--port 7860]

The model is loaded once, before the server starts (a missing weight file exits with status 2 and names it, as the
scripts do). The page offers the modes of ``configs/app/modes.yaml`` (AccSamp, DiffDehaze, DCP, HazeGen, and the
sampler presets whose config keys exist); every run calls the same batch function as the mode's script, so the
downloaded PNG for a seed is byte for byte the script's output file for that seed and settings. Runs are queued one
at a time per model; Cancel stops a run at its next sampling step. Serves on 127.0.0.1 only, with no share link and
Gradio's analytics off.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from utils.optional import require

# Before gradio is imported: no usage reports, no version check against the internet.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
# gradio is the optional app group: without it, one line naming `pip install -r requirements-app.txt` and exit 2.
gr = require("gradio", "app")

from omegaconf import OmegaConf  # noqa: E402

from metrics.iqa import density_map_png, fade_score  # noqa: E402
from pipelines.cli import EXIT_BAD_CONFIG, check_weights, log, setup_logging  # noqa: E402
from pipelines.config_check import check_config_sections  # noqa: E402
from pipelines.modes import SLIDERS, Mode, ModeError, RunnerCache, load_modes  # noqa: E402
from pipelines.settings import InferenceSettings  # noqa: E402
from utils.common import load_config  # noqa: E402
from utils.image_io import IMAGE_EXTS, ImageReadError, list_images, load_rgb01, save_png01  # noqa: E402
from utils.rules import SettingsError  # noqa: E402

ROOT = Path(__file__).resolve().parent
SLIDER_LABELS = {"tau": "τ (estimate at step (1−τ)·N)", "omega": "ω (restart at step (1−ω)·N)",
                 "guidance": "guidance scale", "steps": "steps"}
SLIDER_RANGES = {"tau": (0.02, 0.98, 0.02), "omega": (0.02, 1.0, 0.02), "guidance": (0.0, 2.0, 0.01),
                 "steps": (1, 100, 1)}


class RunCancelled(Exception):
    """Raised from the sampler's step callback when the page's Cancel button was pressed."""


def fade_available() -> bool:
    """FADE needs the optional metrics group (requirements-metrics.txt: fade-python, matplotlib for the maps)."""
    return all(importlib.util.find_spec(name) is not None for name in ("pyfade", "matplotlib"))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Dehazer:
    """The page's back end: modes, loaded models, per-session cancel flags, and one run."""

    def __init__(self, modes: list[Mode], runners: RunnerCache, out_dir: Path, max_pixels: int):
        self.modes = {mode.label: mode for mode in modes}
        self.runners = runners
        self.out_dir = out_dir
        self.max_pixels = max_pixels
        self.cancel_flags: dict[str, threading.Event] = {}

    def flag(self, session: str) -> threading.Event:
        return self.cancel_flags.setdefault(session, threading.Event())

    def run(self, image_path: str, label: str, values: dict[str, Any], session: str,
            progress: Callable[[int, int], None]) -> dict[str, Any]:
        """Run mode ``label`` on the image file with the control ``values``; returns the result file, extra outputs
        ``[(file, caption)]`` (with FADE density maps of input and result when FADE is installed), the seconds taken,
        the FADE scores (input, result) or [] and the settings. Raises ImageReadError / ValueError / RuntimeError /
        RunCancelled with a message for the page."""
        mode = self.modes[label]
        cfg = mode.run_config(values)
        settings = InferenceSettings.from_config(cfg)
        img01 = load_rgb01(image_path, self.max_pixels)
        cancel = self.flag(session)
        cancel.clear()
        total = getattr(mode.script, "NETWORK_STEPS", settings.steps)

        def on_step(info: dict) -> None:
            if cancel.is_set():
                raise RunCancelled(f"cancelled at step {info.get('step', 0) + 1} of {total}")
            progress(int(info.get("step", 0)) + 1, total)

        stem = Path(image_path).stem
        runner, lock = (self.runners.get(cfg, settings, mode.weight_paths.get("adapter_path")) if mode.needs_runner
                        else (None, contextlib.nullcontext()))
        with lock:
            if runner is not None:
                runner.configure(cfg, settings)
            start = time.perf_counter()
            outputs = mode.script.make_process(cfg, settings, runner)([(img01, stem)], callback=on_step)
            seconds = time.perf_counter() - start
        seed = settings.seed if "seed" in mode.sliders else None
        tag = _slug(label) + (f"_seed{seed}" if seed is not None else "")
        run_dir = Path(tempfile.mkdtemp(prefix=f"{stem}_", dir=self.out_dir))
        files = []
        for name, img in outputs.items():
            path = run_dir / f"{Path(name).stem}_{tag}.png"
            save_png01(img, path)
            files.append((str(path), Path(name).stem[len(stem):].strip("_") or "result"))
        scores = []
        if fade_available():
            for which, image in (("input", img01), ("result", next(iter(outputs.values())))):
                score, density = fade_score(image)
                path = run_dir / f"{stem}_fade_{which}.png"
                density_map_png(density, path)
                scores.append(score)
                files.append((str(path), f"FADE density, {which} ({score:.3f})"))
        return {"result": files[0][0], "extras": files[1:], "seconds": seconds, "cfg": cfg, "mode": mode,
                "fade": scores}


def describe_run(info: dict[str, Any], device: str) -> str:
    """One status line: mode, the controls' values, time taken."""
    cfg, mode = info["cfg"], info["mode"]
    settings = ", ".join(f"{name} {OmegaConf.select(cfg, key)}" for name, key in mode.sliders.items())
    fade = f" FADE {info['fade'][0]:.3f} → {info['fade'][1]:.3f}." if info["fade"] else ""
    return f"**Done**: {mode.label}" + (f" ({settings})" if settings else "") + \
        f" in {info['seconds']:.2f} s on {device}." + fade


def header_text(mode: Mode) -> str:
    """The page's header for ``mode``: it names only the controls that mode has (no τ/ω for DCP or HazeGen)."""
    named = {"tau": "τ", "omega": "ω", "guidance": "guidance", "steps": "steps", "seed": "seed"}
    controls = [named[name] for name in SLIDERS if name in mode.sliders]
    adjust = f"adjust {', '.join(controls)}, " if controls else ""
    return ("## HCD-YC: dehaze a photo\nUpload a hazy photo (or pick one from `inputs/`), choose a mode, "
            f"{adjust}and run. HazeGen turns a *clean* photo hazy.")


CLEARED = (None, [], None)
"""The result area (before/after, extras, download) after a run that failed or was cancelled: emptied, so no result
of an earlier run stays on screen."""


def build_ui(dehazer: Dehazer, examples: list[Path], device: str):
    """The Gradio page: input (upload or pick from inputs/), mode, controls, before/after, extras, download."""
    labels = list(dehazer.modes)
    first = dehazer.modes[labels[0]]

    def control_updates(label: str) -> list:
        """Show the controls mode ``label`` maps, set to its configured values; hide the others; the header names
        only those controls."""
        mode = dehazer.modes[label]
        return [gr.update(value=header_text(mode))] + [
            gr.update(visible=True, value=OmegaConf.select(mode.cfg, mode.sliders[name]))
            if name in mode.sliders else gr.update(visible=False) for name in SLIDERS]

    def on_upload(file_path: str | None):
        """Check an uploaded file; the upload box is emptied either way (the preview shows what was loaded)."""
        if not file_path:
            return None, None, None, ""
        try:
            img01 = load_rgb01(file_path, dehazer.max_pixels)
        except ImageReadError as err:
            return None, None, None, f"**Error**: {Path(file_path).name}: {err.reason}"
        height, width = img01.shape[-2:]
        return None, file_path, file_path, f"Loaded {Path(file_path).name} ({width}x{height})."

    def on_example(name: str | None):
        if not name:
            return None, None, ""
        return on_upload(str(ROOT / "inputs" / name))[1:]

    def on_run(image_path, label, tau, omega, guidance, steps, seed, request: gr.Request,
               progress=gr.Progress()):
        if not image_path:
            return *CLEARED, "**Error**: upload an image or pick one from inputs/ first."
        values = {"tau": tau, "omega": omega, "guidance": guidance,
                  "steps": int(steps) if steps is not None else None, "seed": int(seed) if seed is not None else None}
        try:
            info = dehazer.run(image_path, label, values, request.session_hash,
                               lambda k, n: progress((k, n), desc="sampling", unit="steps"))
        except RunCancelled as err:
            return *CLEARED, f"**Cancelled**: {err}"
        except (ImageReadError, ValueError, RuntimeError, OSError, KeyError) as err:
            log.warning("run failed: %s", err)
            return *CLEARED, f"**Error**: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        return ((image_path, info["result"]), [(path, caption) for path, caption in info["extras"]], info["result"],
                describe_run(info, device))

    def on_cancel(request: gr.Request) -> None:
        dehazer.flag(request.session_hash).set()

    with gr.Blocks(title="HCD-YC dehazing", analytics_enabled=False) as page:
        header = gr.Markdown(header_text(first), elem_id="header")
        image_path = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload an image", file_types=list(IMAGE_EXTS), type="filepath",
                                 elem_id="upload")
                example = gr.Dropdown(choices=[p.name for p in examples], value=None, label="…or pick from inputs/",
                                      elem_id="example")
                preview = gr.Image(label="Input", type="filepath", interactive=False, elem_id="preview")
                mode = gr.Dropdown(choices=labels, value=labels[0], label="Mode", elem_id="mode")
                controls = {}
                for name in SLIDERS:
                    key = first.sliders.get(name)
                    value = OmegaConf.select(first.cfg, key) if key else None
                    if name == "seed":
                        controls[name] = gr.Number(value=value, precision=0, label="seed", visible=key is not None,
                                                   elem_id="seed")
                    else:
                        low, high, step = SLIDER_RANGES[name]
                        controls[name] = gr.Slider(low, high, value=value, step=step, label=SLIDER_LABELS[name],
                                                   visible=key is not None, elem_id=name)
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="run")
                    cancel_button = gr.Button("Cancel", elem_id="cancel")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                compare = gr.ImageSlider(label="Before / after", type="filepath", format="png", elem_id="compare")
                extras = gr.Gallery(label="AccSamp estimate and transmission (DCP: transmission); FADE density maps",
                                    columns=2,
                                    height=260, elem_id="extras")
                download = gr.DownloadButton("Download full-resolution PNG", value=None, elem_id="download")

        upload.upload(on_upload, upload, [upload, image_path, preview, status])
        example.change(on_example, example, [image_path, preview, status])
        mode.change(control_updates, mode, [header, *[controls[n] for n in SLIDERS]])
        run_button.click(on_run, [image_path, mode, *[controls[n] for n in SLIDERS]],
                         [compare, extras, download, status], concurrency_limit=1, concurrency_id="model")
        cancel_button.click(on_cancel, None, None, concurrency_limit=None)
    return page


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Local dehazing page (Gradio) for HCD-YC")
    parser.add_argument("--config", default="configs/inference/stage2_accsamp.yaml",
                        help="inference config: model, weights, device and default settings")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--modes", default=str(ROOT / "configs" / "app" / "modes.yaml"), help="modes file")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest upload (width x height)")
    parser.add_argument("--max-file-size", default="100mb", help="largest upload file (Gradio size string)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        settings = check_config_sections(cfg)
        if settings.sd_path is not None:
            check_weights(settings.weight_paths())
        modes = load_modes(args.modes, cfg, ROOT)
    except (FileNotFoundError, SettingsError, ModeError) as err:
        log.error("%s", err)
        return EXIT_BAD_CONFIG
    if not modes:
        log.error("no mode of %s is available with %s", args.modes, args.config)
        return 2
    runners = RunnerCache()
    device = "cpu"
    if settings.sd_path is not None:
        device = str(runners.get(cfg, settings)[0].device)  # the app config's model, loaded before the server starts
    with tempfile.TemporaryDirectory(prefix="hcdyc-app-") as out_dir:
        dehazer = Dehazer(modes, runners, Path(out_dir), args.max_pixels)
        examples = list_images(ROOT / "inputs") if (ROOT / "inputs").is_dir() else []
        page = build_ui(dehazer, examples, device)
        page.queue(default_concurrency_limit=1)
        # Local fonts only: the default theme would make the browser fetch web fonts from the internet.
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])
        # quiet: Gradio's start-up text suggests share=True, a public link a local model should not get
        log.info("serving on http://%s:%d (this machine only; no share link)", args.host, args.port)
        page.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=args.max_file_size,
                    allowed_paths=[str(ROOT / "inputs")], show_error=True, ssr_mode=False, theme=theme, quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
