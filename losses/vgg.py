"""Frozen VGG-16 feature extractor of the feature and semantic cycle levels (:mod:`losses.cycle`).

The weights are torchvision's ImageNet file (``train.vgg_path``), read with ``weights_only=True``; inputs are
``img01`` (B,3,H,W) in [0,1], normalised with the ImageNet mean and std inside.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import nn

from utils.checkpoint import WeightFile

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"
VGG16_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def vgg_weight_file(key: str, path: str) -> WeightFile:
    """The door check (:func:`utils.checkpoint.check_weight_files`) of torchvision's VGG-16 weights."""
    return WeightFile(key, path, f"torchvision's VGG-16 state dict {VGG16_WEIGHTS_FILE} (528 MB, features.* tensors; "
                                 f"{VGG16_WEIGHTS_URL})", ("features.",))

# torchvision vgg16 ``features`` layout (configuration "D"): conv3x3 widths, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def _vgg16_relu_indices() -> dict[str, int]:
    """Map 'reluB_C' names to their index in torchvision's ``vgg16().features`` Sequential."""
    names, block, conv, idx = {}, 1, 0, 0
    for v in _VGG16_CFG:
        if v == "M":
            block, conv, idx = block + 1, 0, idx + 1
        else:
            conv += 1
            names[f"relu{block}_{conv}"] = idx + 1
            idx += 2
    return names


VGG16_RELU_INDEX = _vgg16_relu_indices()


class VGGFeatures(nn.Module):
    """Frozen VGG-16 feature extractor (torchvision ``vgg16().features`` architecture).

    Args:
        weights_path: local torchvision VGG-16 state dict (``vgg16-397923af.pth`` via
            ``torch.load(weights_only=True)``, or a ``.safetensors`` file with the same keys).
            Only the ``features.*`` tensors up to the deepest requested layer are used.
        layers: ReLU outputs for the feature loss, names 'reluB_C' as in torchvision's layout.
        semantic_layer: ReLU output that is pooled for the semantic loss (or None).
        allow_random_init: permit ``weights_path=None`` (random weights; tests only).
    Input ``img01``: (B,3,H,W) in [0,1], cast to the module's dtype and ImageNet-normalised
    internally. Parameters never
    require grad and the module stays in eval mode, but gradients flow to the input.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None,
        layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
        semantic_layer: str | None = "relu5_3",
        allow_random_init: bool = False,
    ) -> None:
        super().__init__()
        wanted = list(layers) + ([semantic_layer] if semantic_layer is not None else [])
        unknown = [name for name in wanted if name not in VGG16_RELU_INDEX]
        if unknown or not wanted:
            raise ValueError(f"unknown VGG-16 layers {unknown or wanted}; choose from {list(VGG16_RELU_INDEX)}")
        if weights_path is None and not allow_random_init:
            raise ValueError(
                "VGGFeatures needs local VGG-16 weights: download torchvision's "
                f"'{VGG16_WEIGHTS_FILE}' ({VGG16_WEIGHTS_URL}) and set its path in the config "
                "(train.vgg_path: weights/vgg16-397923af.pth)"
            )
        self.layers = tuple(layers)
        self.semantic_layer = semantic_layer
        self._taps = {VGG16_RELU_INDEX[name]: name for name in wanted}
        self.body = self._build(max(self._taps))
        if weights_path is not None:
            self._load(os.fspath(weights_path))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _build(last_index: int) -> nn.Sequential:
        modules: list[nn.Module] = []
        channels = 3
        for v in _VGG16_CFG:
            if v == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                modules += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU()]
                channels = int(v)
        return nn.Sequential(*modules[: last_index + 1])

    def _load(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"VGG-16 weights not found: {path} (download torchvision's '{VGG16_WEIGHTS_FILE}' "
                f"from {VGG16_WEIGHTS_URL})"
            )
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a torchvision VGG-16 state dict, got {type(state).__name__}")
        needed = {f"features.{k}": v for k, v in self.body.state_dict().items()}
        missing = [k for k in needed if k not in state]
        if missing:
            raise KeyError(f"{path}: not a torchvision VGG-16 state dict, missing keys {missing[:4]}")
        bad = [k for k, v in needed.items() if tuple(state[k].shape) != tuple(v.shape)]
        if bad:
            raise ValueError(f"{path}: shape mismatch for {bad[:4]} (expected torchvision VGG-16)")
        self.body.load_state_dict({k[len("features."):]: state[k] for k in needed})

    def train(self, mode: bool = True) -> "VGGFeatures":
        """Always stays in eval mode (frozen network)."""
        return super().train(False)

    def forward(self, img01: torch.Tensor) -> dict[str, torch.Tensor]:
        """img01: (B,3,H,W) in [0,1] -> {layer name: (B,C_l,H_l,W_l)} for ``layers`` + semantic layer."""
        x = (img01.to(self.mean.dtype) - self.mean) / self.std
        out: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self.body):
            x = module(x)
            if i in self._taps:
                out[self._taps[i]] = x
        return out
