"""DeblurGAN-style generator and critic (Kupyn et al., "DeblurGAN: Blind Motion Deblurring Using Conditional
Adversarial Networks", CVPR 2018), used here for dehazing.

Generator: 7x7 conv, two strided 3x3 convs, ``n_blocks`` residual blocks (conv-IN-ReLU-dropout 0.5-conv-IN), two
transposed convs, 7x7 conv, tanh, and a global residual: out = clamp(I + G(I), -1, 1) on images in [-1,1]
(published: 64 base channels, 9 blocks, instance norm). Critic: PatchGAN (4x4 convs, strides 2/2/2/1/1, 64 base
channels, 3 strided layers, instance norm, LeakyReLU 0.2, no sigmoid: a WGAN critic). The CPU variant is the same
architecture with fewer channels and blocks (config keys).
"""
from __future__ import annotations

import torch
from torch import nn


class ResnetBlock(nn.Module):
    """x + conv-IN-ReLU-dropout-conv-IN(x), reflect padding; (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """hazy img01 (B,3,H,W) in [0,1] -> dehazed (B,3,H,W) in [0,1]; H and W multiples of 4."""

    size_multiple = 4

    def __init__(self, channels: int = 64, n_blocks: int = 9, dropout: float = 0.5) -> None:
        super().__init__()
        c = channels
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), nn.InstanceNorm2d(c), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(c * mult, c * mult * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(c * mult * 2),
                       nn.ReLU(True)]
        layers += [ResnetBlock(c * 4, dropout) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(c * mult, c * mult // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(c * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        x = img01 * 2.0 - 1.0
        return (x + self.body(x)).clamp(-1.0, 1.0) * 0.5 + 0.5

    @torch.no_grad()
    def restore(self, img01: torch.Tensor) -> torch.Tensor:
        """Dehazed image (B,3,H,W) in [0,1]."""
        return self(img01)


class PatchCritic(nn.Module):
    """PatchGAN WGAN critic: img01 (B,3,H,W) in [0,1] -> scores (B,1,h,w) (unbounded, one per receptive patch)."""

    def __init__(self, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        c = channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 4, stride=2, padding=2), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(c * prev, c * mult, 4, stride=stride, padding=2), nn.InstanceNorm2d(c * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(c * mult, 1, 4, stride=1, padding=2))
        self.body = nn.Sequential(*layers)

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        return self.body(img01 * 2.0 - 1.0)
