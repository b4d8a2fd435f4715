"""MSCNN (Ren et al., "Single Image Dehazing via Multi-Scale Convolutional Neural Networks", ECCV 2016).

A coarse-scale net (convolutions 11x11 / 9x9 / 7x7 with 5 / 5 / 10 maps, each followed by ReLU, 2x2 max-pooling and
2x nearest upsampling, then a linear combination and a sigmoid) predicts a holistic transmission map; a fine-scale
net (7x7 / 5x5 / 3x3 with 4 / 5 / 10 maps, the coarse map concatenated to its first block's 4 maps) refines it. The
network is trained with MSE on the transmission t of synthetic haze (``dataset.HybridTrainingData`` knows it).

Dehazing (:meth:`MSCNN.restore`) inverts the atmospheric model with :func:`haze.scattering.recover`; the airlight is
the paper's rule: among the 0.1 % of pixels with the lowest predicted t, the brightest pixel of the hazy input
(channel mean) gives A.
"""
from __future__ import annotations

import torch
from torch import nn

from haze.scattering import recover


def _block(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """conv (same padding) -> ReLU -> 2x2 max-pool -> 2x nearest upsampling: spatial size kept for even sides."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2), nn.Upsample(scale_factor=2, mode="nearest"))


def airlight_from_transmission(img01: torch.Tensor, t: torch.Tensor, fraction: float = 0.001) -> torch.Tensor:
    """MSCNN's airlight: the hazy pixel of highest intensity (channel mean) among the ``fraction`` of pixels with the
    lowest t (at least one pixel). img01: (B,3,H,W) in [0,1]; t: (B,1,H,W) -> A (B,3)."""
    b = img01.shape[0]
    flat_t = t.reshape(b, -1)
    count = max(1, int(round(fraction * flat_t.shape[1])))
    lowest = flat_t.topk(count, dim=1, largest=False).indices  # (B,count)
    pixels = img01.reshape(b, 3, -1)
    candidates = pixels.gather(2, lowest[:, None, :].expand(b, 3, count))  # (B,3,count)
    brightest = candidates.mean(dim=1).argmax(dim=1)  # (B,)
    return candidates[torch.arange(b), :, brightest]


class MSCNN(nn.Module):
    """hazy img01 (B,3,H,W) in [0,1] -> transmission t (B,1,H,W) in (0,1) (``forward``); H and W even."""

    size_multiple = 2

    def __init__(self, t_floor: float = 0.1, airlight_fraction: float = 0.001) -> None:
        super().__init__()
        self.t_floor, self.airlight_fraction = t_floor, airlight_fraction
        self.coarse = nn.Sequential(_block(3, 5, 11), _block(5, 5, 9), _block(5, 10, 7), nn.Conv2d(10, 1, 1))
        self.fine_first = _block(3, 4, 7)
        self.fine = nn.Sequential(_block(5, 5, 5), _block(5, 10, 3), nn.Conv2d(10, 1, 1))

    def coarse_transmission(self, img01: torch.Tensor) -> torch.Tensor:
        """The coarse-scale net's t (B,1,H,W) in (0,1)."""
        return torch.sigmoid(self.coarse(img01))

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        coarse = self.coarse_transmission(img01)
        return torch.sigmoid(self.fine(torch.cat([self.fine_first(img01), coarse], 1)))

    def dehaze(self, img01: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """J = (I - A) / max(t, t_floor) + A for a transmission ``t`` (B,1,H,W) (this network's output, computed
        whole or in tiles) and the paper's airlight from it, clamped to [0,1]."""
        airlight = airlight_from_transmission(img01, t, self.airlight_fraction)
        return recover(img01, t, airlight, t_floor=self.t_floor).clamp(0.0, 1.0)

    @torch.no_grad()
    def restore(self, img01: torch.Tensor) -> torch.Tensor:
        """Dehazed image (B,3,H,W) in [0,1]: :meth:`dehaze` with the predicted t."""
        return self.dehaze(img01, self(img01))

