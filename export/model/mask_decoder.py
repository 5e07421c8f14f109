"""Mask decoders: SAM's (LiteMedSAM) and MCP-MedSAM's "F4" (both state_dict-compatible).

F4 fuses the image features S (B, 256, 64, 64) from SAM's two-way transformer with the two extra
tokens before SAM's upscaling and hypernetwork head:

    modality path  M = m_conv(S * (1 + w_lin(t_mod)) + b_lin(t_mod))      (FiLM, residual block)
    content path   C = convs(S + t_content + dense)                         (residual block)
    fused          X = c_conv(conv1([M, C]))                                (1x1 conv, residual block)

The official module names are kept as they are, although ``convs`` is the content block and
``c_conv`` the block after the fuse conv: this wiring reproduces the official golden logits to
~5e-5, inside the 1e-4 of tests/test_model_golden.py; the name-suggested wiring does not (0.17 rms).
The modality classifier reads ``w_lin(t) + b_lin(t) + t``, as the official one does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .common import MLP, DecoderResBlock, LayerNorm2d, TwoLayerMLP
from .transformer import TwoWayTransformer


class DecoderOutput(NamedTuple):
    masks: torch.Tensor  # (B, 1, 256, 256) float32 logits of mask token 0
    iou: torch.Tensor  # (B, 1) float32 predicted IoU of that mask
    category: torch.Tensor | None  # (B, num_modalities) float32 logits (F4 only)
    content_vec: torch.Tensor | None  # (B, C) content token before the transformer (F4 only)
    dense_vec: torch.Tensor | None  # (B, C) global average of the dense embedding (F4 only)


class SamMaskDecoder(nn.Module):
    """SAM's mask decoder as LiteMedSAM uses it: only mask token 0 is read (single-mask output)."""

    def __init__(self, *, transformer: TwoWayTransformer, transformer_dim: int = 256,
                 num_multimask_outputs: int = 3, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        c = transformer_dim
        self.transformer_dim = c
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(c, c, c // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(c, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def run_transformer(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                        dense: torch.Tensor, sparse_bias: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens hs (B, 1 + 4 + N, C) and image features (B, C, 64, 64). sparse_bias (B, N) float32:
        the attention key bias of each sparse token (0, or ``transformer.MASKED`` for padded points)."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        bias = None
        if sparse_bias is not None:
            bias = torch.cat([sparse_bias.new_zeros(b, out_tokens.shape[0]), sparse_bias], dim=1)
        src = image_embeddings + dense
        _, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe.expand(b, -1, -1, -1), tokens, bias)
        return hs, keys.transpose(1, 2).reshape(b, c, h, w)

    def mask_head(self, hs: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Upscale (B, C, 64, 64) features and read mask token 0 -> (B, 1, 256, 256), IoU (B, 1)."""
        upscaled = self.output_upscaling(image)
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])
        b, c, h, w = upscaled.shape
        masks = (hyper.unsqueeze(1) @ upscaled.reshape(b, c, h * w)).reshape(b, 1, h, w)
        return masks, self.iou_prediction_head(hs[:, 0])[:, :1]

    def forward(self, *, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor) -> DecoderOutput:
        """image_embeddings (B, C, 64, 64) (one per prompt), image_pe (1, C, 64, 64),
        sparse (B, 2, C) box corner tokens, dense (B, C, 64, 64)."""
        hs, image = self.run_transformer(image_embeddings, image_pe, sparse, dense)
        masks, iou = self.mask_head(hs, image)
        return DecoderOutput(masks, iou, None, None, None)


class MaskDecoderF4(SamMaskDecoder):
    """MCP-MedSAM's decoder: SAM's plus the F4 fusion and the modality classifier (module doc)."""

    def __init__(self, *, transformer: TwoWayTransformer, transformer_dim: int = 256,
                 num_multimask_outputs: int = 3, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256,
                 num_modalities: int = 11, category_hidden_dim: int = 64) -> None:
        super().__init__(transformer=transformer, transformer_dim=transformer_dim,
                         num_multimask_outputs=num_multimask_outputs, iou_head_depth=iou_head_depth,
                         iou_head_hidden_dim=iou_head_hidden_dim)
        c = transformer_dim
        self.convs = DecoderResBlock(c)
        self.conv1 = nn.Conv2d(2 * c, c, kernel_size=1)
        self.c_conv = DecoderResBlock(c)
        self.w_lin = nn.Linear(c, c)
        self.b_lin = nn.Linear(c, c)
        self.m_conv = DecoderResBlock(c)
        self.category_prediction_head = TwoLayerMLP(c, category_hidden_dim, num_modalities)

    def fuse(self, image: torch.Tensor, dense: torch.Tensor, content_token: torch.Tensor,
             modality_token: torch.Tensor) -> torch.Tensor:
        """F4 fusion. image and dense (B, C, H, W), tokens (B, C) -> (B, C, H, W)."""
        w = self.w_lin(modality_token)[:, :, None, None]
        b = self.b_lin(modality_token)[:, :, None, None]
        modality = self.m_conv(image * (1 + w) + b)
        content = self.convs(image + content_token[:, :, None, None] + dense)
        return self.c_conv(self.conv1(torch.cat([modality, content], dim=1)))

    def forward(self, *, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, sparse_bias: torch.Tensor | None = None) -> DecoderOutput:
        """As :meth:`SamMaskDecoder.forward`, with sparse (B, 4 + P, C) [corner, corner, content, modality,
        point tokens...], dense the crop CNN's embedding and sparse_bias (B, 4 + P) the attention key bias
        of the sparse tokens (None: none masked)."""
        hs, image = self.run_transformer(image_embeddings, image_pe, sparse, dense, sparse_bias)
        # Output tokens (iou + mask tokens), then corner, corner, content, modality: fixed places, so
        # that point tokens appended after them leave the box-only wiring as it was.
        first = 1 + self.num_mask_tokens + 2
        content_out, modality_out = hs[:, first], hs[:, first + 1]
        masks, iou = self.mask_head(hs, self.fuse(image, dense, content_out, modality_out))
        m = self.w_lin(modality_out) + self.b_lin(modality_out) + modality_out
        return DecoderOutput(masks, iou, self.category_prediction_head(m), sparse[:, 2], dense.mean(dim=(2, 3)))
