"""TinyViT image encoder at 256x256 input, as LiteMedSAM ships it (state_dict keys included).

This variant keeps full resolution through the stem (two 1x1 Conv-BN, not the stride-4 patch
embedding of the original TinyViT): stage 0 (MBConv) runs at 256x256, stage 1 at 128x128,
stages 2 and 3 at 64x64, and a neck maps to the (B, 256, 64, 64) SAM image embedding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm2d


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys ``c`` and ``bn``)."""

    def __init__(self, cin: int, cout: int, *, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, C0, H, W): ConvBN 1x1 -> GELU -> ConvBN 1x1."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual (expand 1x1, depthwise 3x3, project 1x1), (B, C, H, W) -> same."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel=3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """(B, C, H, W) or (B, H*W, C) -> (B, H'*W', C_out) tokens; stride 1 or 2 in the depthwise conv."""

    def __init__(self, *, resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            b = x.shape[0]
            x = x.view(b, self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """Multi-head attention inside a window with a learned relative-offset bias.

    (N_windows, w*w, C) -> same shape. ``attention_biases`` (heads, #offsets) is expanded to
    (heads, w*w, w*w) with a fixed index table (a non-persistent buffer).
    """

    def __init__(self, dim: int, *, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p in points:
            for q in points:
                off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class TokenMLP(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2 on (B, L, C) tokens (keys ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention + depthwise 3x3 ConvBN + MLP on (B, H*W, C) tokens at a fixed resolution."""

    def __init__(self, dim: int, *, resolution: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, num_heads=num_heads, window=window)
        self.mlp = TokenMLP(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, kernel=3, groups=dim)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # n = resolution**2 tokens
        h = w = self.resolution
        ws = self.window
        if h == ws and w == ws:
            return self.attn(x)
        x = x.view(b, h, w, c)
        pad = (ws - h % ws) % ws
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        ph = h + pad
        nw = ph // ws
        x = x.view(b, nw, ws, nw, ws, c).transpose(2, 3).reshape(b * nw * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nw, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, ph, c)
        if pad:
            x = x[:, :h, :w].contiguous()
        return x.view(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x = x + self._windows(x)
        x = x.transpose(1, 2).reshape(b, c, self.resolution, self.resolution)
        x = self.local_conv(x)
        x = x.view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class Stage(nn.Module):
    """One TinyViT stage: its blocks, then an optional PatchMerging (every stage but the last).

    Stage 0: MBConv blocks on (B, C, H, W), merged to tokens (B, N, C'); stages 1-3: TinyViT blocks
    on tokens (B, N, C).
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


@dataclass(frozen=True)
class TinyViTConfig:
    img_size: int = 256
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    out_chans: int = 256
    # The last merge keeps the resolution so that the embedding is img_size / 4.
    merge_strides: tuple[int, ...] = (2, 2, 1)


class TinyViT(nn.Module):
    """(B, 3, 256, 256) float32 in [0, 1] -> (B, 256, 64, 64) float32 image embedding."""

    def __init__(self, *, config: TinyViTConfig) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        dims = cfg.embed_dims
        self.patch_embed = PatchEmbed(cfg.in_chans, dims[0])
        res = cfg.img_size
        layers: list[nn.Module] = []
        for i, depth in enumerate(cfg.depths):
            last = i == len(cfg.depths) - 1
            down = None
            if not last:
                down = PatchMerging(resolution=res, dim=dims[i], out_dim=dims[i + 1], stride=cfg.merge_strides[i])
            if i == 0:
                blocks = [MBConv(dims[0], cfg.mbconv_expand_ratio) for _ in range(depth)]
                layers.append(Stage(blocks, down))
            else:
                blocks = [
                    TinyViTBlock(dims[i], resolution=res, num_heads=cfg.num_heads[i],
                                 window=cfg.window_sizes[i], mlp_ratio=cfg.mlp_ratio)
                    for _ in range(depth)
                ]
                layers.append(Stage(blocks, down))
            if not last:
                res //= cfg.merge_strides[i]
        self.layers = nn.ModuleList(layers)
        self.embed_res = res
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.embed_res, self.embed_res, c).permute(0, 3, 1, 2)
        return self.neck(x)
