"""The crop CNN of the content prompt: a 64x64 box crop -> the dense prompt embedding."""

from __future__ import annotations

import torch
from torch import nn

from .common import CropResBlock


class CropNet(nn.Module):
    """conv 3x3 (3 -> C) -> three :class:`CropResBlock` -> conv 5x5 (C -> C).

    (B, 3, 64, 64) float32 crop in [0, 1] -> (B, C, 64, 64) float32 dense embedding, which the
    decoder adds to the image embedding (resolution is kept: every conv is stride 1, "same" padding).
    """

    def __init__(self, *, in_chans: int = 3, channels: int = 256, num_blocks: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, channels, kernel_size=3, padding=1)
        for i in range(num_blocks):
            self.add_module(f"conv{i + 1}", CropResBlock(channels))
        self.num_blocks = num_blocks
        self.add_module(f"conv{num_blocks + 1}", nn.Conv2d(channels, channels, kernel_size=5, padding=2))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.conv(crops)
        for i in range(1, self.num_blocks + 2):
            x = getattr(self, f"conv{i}")(x)
        return x
