"""Layers shared by several sub-networks (defined once, imported everywhere)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm2d(nn.Module):
    """Channel LayerNorm for (B, C, H, W) float32 maps (SAM's, eps 1e-6)."""

    def __init__(self, num_channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLP(nn.Module):
    """SAM's MLP: ``num_layers`` linears with ReLU between them (keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class TwoLayerMLP(nn.Module):
    """fc1 -> GELU -> fc2 (keys ``fc1``, ``fc2``): the CLIP, modality and classifier heads.

    (..., input_dim) float32 -> (..., output_dim) float32.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def conv3x3(channels: int, *, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=bias)


class CropResBlock(nn.Module):
    """Residual block of the crop CNN: conv-BN-LeakyReLU(0.1)-conv-BN, + x, LeakyReLU(0.1).

    (B, C, H, W) float32 -> same shape.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, bias=False)
        self.batch_norm1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, bias=False)
        self.batch_norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.batch_norm1(self.conv1(x)), 0.1)
        y = self.batch_norm2(self.conv2(y))
        return F.leaky_relu(x + y, 0.1)


class DecoderResBlock(nn.Module):
    """Residual block of the F4 decoder: x + conv(LeakyReLU(0.1)(BN(conv(x)))).

    No BatchNorm after the second conv and no activation after the sum (unlike
    :class:`CropResBlock`). (B, C, H, W) float32 -> same shape.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, bias=False)
        self.batch_norm1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.batch_norm1(self.conv1(x)), 0.1))
