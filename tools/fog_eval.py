"""Accuracy of the fog analyser (haze.fog.analyze_fog) on a labelled synthetic set made here.

Scenes: scikit-image's bundled photos (grey ones replicated to RGB), centre-cropped and resized to --size square.
Each scene is hazed with the atmospheric model I = J t + A (1 - t), t = exp(-2 β(x) (1 - depth01(x))) (RIDCP's form,
depth01 = 1 nearest, as dataset.degradation.transmission), A ~ U[0.75, 0.95] plus a ±0.03 per-channel shift, in
three haze types:

    uniform      constant β, flat depth (depth01 = 0 everywhere: t constant)
    layered      constant β, vertical depth ramp (top far, depth01 = 0; bottom near, depth01 = 1)
    non-uniform  patchy β(x) = β (0.25 + 1.5 n(x)), n a bicubic-upsampled 4x4 uniform noise field, flat depth

and three densities by β: light β ~ U[0.10, 0.30), medium U[0.30, 0.60), heavy U[0.60, 1.20) (uniform t from
0.82 down to 0.09). Every scene gets every (type, density) once with its own random β and A (numpy seed --seed).
The analyser's density levels light / moderate / dense are scored against light / medium / heavy.

Usage: python -m tools.fog_eval [--seed 0] [--size 256]   (prints markdown tables: per-class accuracy and confusion)
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from haze.fog import HAZE_TYPES, analyze_fog
from haze.scattering import rehaze
from utils.image_io import resize01

SCENES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
          "camera", "brick", "gravel", "grass", "coins", "clock", "moon")
BETA_RANGES = {"light": (0.10, 0.30), "medium": (0.30, 0.60), "heavy": (0.60, 1.20)}
DENSITY_NAMES = {"light": "light", "medium": "moderate", "heavy": "dense"}  # set label -> analyser level


def scene01(name: str, size: int) -> torch.Tensor:
    """skimage.data.<name> -> (1,3,size,size) in [0,1] (centre square crop, grey replicated, alpha dropped)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(img[top:top + side, left:left + side].copy()).permute(2, 0, 1).float() / 255.0
    return resize01(x[None], (size, size)).clamp(0.0, 1.0)


def make_set(seed: int = 0, size: int = 256) -> list[tuple[str, str, str, torch.Tensor]]:
    """-> [(scene, haze type, density class, hazy (1,3,size,size) in [0,1])], deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    ramp = torch.linspace(0.0, 1.0, size).view(1, 1, size, 1).expand(1, 1, size, size)
    flat = torch.zeros(1, 1, size, size)
    out = []
    for name in SCENES:
        clean = scene01(name, size)
        for haze_type in HAZE_TYPES:
            for density, (lo, hi) in BETA_RANGES.items():
                beta = float(rng.uniform(lo, hi))
                airlight = torch.from_numpy(rng.uniform(0.75, 0.95) + rng.uniform(-0.03, 0.03, 3)).float()[None]
                depth01 = ramp if haze_type == "layered" else flat
                beta_map = torch.full_like(flat, beta)
                if haze_type == "non-uniform":
                    noise = torch.from_numpy(rng.uniform(0.0, 1.0, (1, 1, 4, 4))).float()
                    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
                    beta_map = beta * (0.25 + 1.5 * field)
                t = torch.exp(-2.0 * beta_map * (1.0 - depth01))
                out.append((name, haze_type, density, rehaze(clean, t, airlight).clamp(0.0, 1.0)))
    return out


def accuracy_tables(samples: list[tuple[str, str, str, torch.Tensor]]) -> str:
    """Markdown: per-class accuracy of haze type and density, then the two confusion matrices."""
    infos = analyze_fog(torch.cat([s[3] for s in samples]))
    rows = ["| task | class | n | correct | accuracy |", "|---|---|---|---|---|"]
    confusions = []
    for task, classes, truth, guess in (
        ("haze type", HAZE_TYPES, [s[1] for s in samples], [i.haze_type for i in infos]),
        ("density", tuple(BETA_RANGES), [DENSITY_NAMES[s[2]] for s in samples], [i.level for i in infos]),
    ):
        predicted_classes = tuple(DENSITY_NAMES[c] for c in classes) if task == "density" else classes
        total_ok = 0
        for c, label in zip(classes, predicted_classes):
            idx = [k for k, v in enumerate(truth) if v == label]
            ok = sum(guess[k] == label for k in idx)
            total_ok += ok
            rows.append(f"| {task} | {c} | {len(idx)} | {ok} | {ok / len(idx):.0%} |")
        rows.append(f"| {task} | all | {len(truth)} | {total_ok} | {total_ok / len(truth):.0%} |")
        matrix = [f"| {task}: true \\ predicted | " + " | ".join(predicted_classes) + " |",
                  "|---|" + "---|" * len(classes)]
        for c, label in zip(classes, predicted_classes):
            counts = [sum(1 for k, v in enumerate(truth) if v == label and guess[k] == p) for p in predicted_classes]
            matrix.append(f"| {c} | " + " | ".join(map(str, counts)) + " |")
        confusions.append("\n".join(matrix))
    return "\n".join(rows) + "\n\n" + "\n\n".join(confusions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="numpy seed of β, A and the patchy-β fields")
    parser.add_argument("--size", type=int, default=256, help="side of the square scenes")
    args = parser.parse_args(argv)
    samples = make_set(args.seed, args.size)
    print(f"{len(samples)} images: {len(SCENES)} scenes x {len(HAZE_TYPES)} types x {len(BETA_RANGES)} densities, "
          f"seed {args.seed}, {args.size}x{args.size}\n")
    print(accuracy_tables(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
