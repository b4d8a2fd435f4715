"""AOD-Net (Li et al., "AOD-Net: All-in-One Dehazing Network", ICCV 2017).

The atmospheric model is rewritten as J = K(x) I - K(x) + b with one learned map K (absorbing t and A) and the
constant b = 1. K comes from five 3-channel convolutions (kernels 1, 3, 5, 7, 3) with the published
concatenations: conv3 reads [conv1, conv2], conv4 reads [conv2, conv3], conv5 reads [conv1, conv2, conv3, conv4].
1,761 parameters. Trained with MSE.
"""
from __future__ import annotations

import torch
from torch import nn


class AODNet(nn.Module):
    """hazy img01 (B,3,H,W) in [0,1] -> J = ReLU(K I - K + b) (B,3,H,W), >= 0 (not clamped above)."""

    size_multiple = 1

    def __init__(self, b: float = 1.0) -> None:
        super().__init__()
        self.b = b
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 3, 5, padding=2)
        self.conv4 = nn.Conv2d(6, 3, 7, padding=3)
        self.conv5 = nn.Conv2d(12, 3, 3, padding=1)

    def estimate_k(self, img01: torch.Tensor) -> torch.Tensor:
        """The K-estimation module: (B,3,H,W) -> K (B,3,H,W), >= 0."""
        x1 = torch.relu(self.conv1(img01))
        x2 = torch.relu(self.conv2(x1))
        x3 = torch.relu(self.conv3(torch.cat([x1, x2], 1)))
        x4 = torch.relu(self.conv4(torch.cat([x2, x3], 1)))
        return torch.relu(self.conv5(torch.cat([x1, x2, x3, x4], 1)))

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        k = self.estimate_k(img01)
        return torch.relu(k * img01 - k + self.b)

    @torch.no_grad()
    def restore(self, img01: torch.Tensor) -> torch.Tensor:
        """Dehazed image (B,3,H,W) in [0,1]."""
        return self(img01).clamp(0.0, 1.0)
