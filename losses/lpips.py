"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018), the VGG
variant of version 0.1, as a loss: the perceptual data term of the one-step student when the user supplies its
weights (``training.distill``; OSEDiff's data term is MSE + 2·LPIPS).

For images x, y in [-1,1], with VGG-16 activations f_l (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) of the
ImageNet-normalised images, unit-normalised along the channels (n(f) = f / (‖f‖₂ + 1e-10) at every pixel), and the
learned non-negative channel weights w_l of the linear layers:

    LPIPS(x, y) = Σ_l mean_{h,w} Σ_c w_{l,c} · (n(f_l(x)) − n(f_l(y)))²_{c,h,w}

It is 0 exactly when the features agree (x = y in particular) and positive otherwise. The published network maps
[-1,1] to VGG's input with a shift and scale that equal the ImageNet mean/std normalisation of (x + 1)/2, which
:class:`losses.vgg.VGGFeatures` applies.

Two weight files: torchvision's VGG-16 (``vgg16-397923af.pth``) and the linear layers of the ``lpips`` package
(``lpips/weights/v0.1/vgg.pth``: ``lin0.model.1.weight`` … ``lin4.model.1.weight``, shapes (1, C_l, 1, 1)).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from losses.vgg import VGGFeatures
from utils.checkpoint import WeightFile

LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_NORM_EPS = 1e-10


def lpips_key(index: int) -> str:
    """Name of the ``index``-th linear layer's weight in the ``lpips`` package's file."""
    return f"lin{index}.model.1.weight"


def lpips_weight_file(key: str, path: str) -> WeightFile:
    """The door check (:func:`utils.checkpoint.check_weight_files`) of the LPIPS linear layers."""
    return WeightFile(key, path, "the LPIPS v0.1 VGG linear layers (the lpips package's weights/v0.1/vgg.pth, "
                                 "lin0.model.1.weight ... lin4.model.1.weight)", ("lin0.", "lin4."))


def unit_channels(features: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) features divided by their L2 norm over the channels at every pixel (+1e-10)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + LPIPS_NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG (module docstring): ``forward(pred_pm1, target_pm1)`` (B,3,H,W) in [-1,1] -> (B,) distances.

    ``lpips_path``: the linear layers' file; ``vgg_path``: torchvision's VGG-16 (None with ``allow_random_init``:
    random VGG weights, tests only). Frozen: no parameter requires gradients, gradients flow to the inputs.
    """

    def __init__(self, lpips_path: str | os.PathLike, vgg_path: str | os.PathLike | None,
                 allow_random_init: bool = False) -> None:
        super().__init__()
        self.vgg = VGGFeatures(vgg_path, layers=LPIPS_LAYERS, semantic_layer=None,
                               allow_random_init=allow_random_init)
        state = torch.load(os.fspath(lpips_path), map_location="cpu", weights_only=True)
        weights = []
        for index, channels in enumerate(LPIPS_CHANNELS):
            key = lpips_key(index)
            value = state.get(key) if isinstance(state, dict) else None
            if value is None or tuple(value.shape) != (1, channels, 1, 1):
                raise ValueError(f"{lpips_path}: not the LPIPS v0.1 VGG linear layers ('{key}' of shape "
                                 f"(1, {channels}, 1, 1) missing or mis-shaped)")
            weights.append(value.reshape(1, channels, 1, 1).float())
        for index, value in enumerate(weights):
            self.register_buffer(f"lin{index}", value)
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPS":
        """Always stays in eval mode (frozen network)."""
        return super().train(False)

    def forward(self, pred_pm1: torch.Tensor, target_pm1: torch.Tensor) -> torch.Tensor:
        a = self.vgg((pred_pm1.float() + 1) / 2)
        b = self.vgg((target_pm1.float() + 1) / 2)
        total = pred_pm1.new_zeros(pred_pm1.shape[0], dtype=torch.float32)
        for index, layer in enumerate(LPIPS_LAYERS):
            squared = (unit_channels(a[layer]) - unit_channels(b[layer])).pow(2)
            total = total + (squared * getattr(self, f"lin{index}")).sum(dim=1).mean(dim=(1, 2))
        return total
