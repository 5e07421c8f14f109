"""Export wrappers: small trace-friendly modules, one per runtime graph (no Python branching on data).

Graph boundary (docs/ARCHITECTURE.md): per model, the modality tokens of every accepted modality string, the
content token of a model without CLIP tower and the dense positional encoding are constants; per
image or slice the TinyViT embedding; per box the crop CNN, prompt encoder and decoder, batched
over the boxes of a call, with each box reading its image embedding by index (no copies of the
(256, 64, 64) embeddings when many boxes share one image).
"""

from __future__ import annotations

import torch
from torch import nn

from .model import MCPMedSAM

# Fixed input/output names of every graph; the manifest and the runtime read them from here.
GRAPH_IO: dict[str, dict[str, tuple[str, ...]]] = {
    "image_encoder": {"inputs": ("image",), "outputs": ("image_embeddings",)},
    "decoder": {
        "inputs": ("image_embeddings", "embedding_index", "boxes", "crops", "modality_index", "point_coords",
                   "point_labels", "clip_image_features"),
        "outputs": ("low_res_logits", "iou", "category_logits"),
    },
    "clip_image": {"inputs": ("crops_clip",), "outputs": ("clip_image_features",)},
}


class ImageEncoderGraph(nn.Module):
    """image (N, 3, 256, 256) float32 in [0, 1] -> image_embeddings (N, 256, 64, 64) float32."""

    def __init__(self, model: MCPMedSAM) -> None:
        super().__init__()
        self.encoder = model.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class DecoderGraph(nn.Module):
    """Per-box graph: crop CNN + prompt encoder + F4 decoder for B boxes.

    Inputs: image_embeddings (E, 256, 64, 64) float32; embedding_index (B,) int64 into E;
    boxes (B, 4) float32 on the 256 grid; crops (B, 3, 64, 64) float32 in [0, 1];
    modality_index (B,) int64 into the modality token table (one row per accepted modality
    string, baked in); point_coords (B, P, 2) float32 x, y clicks on the 256 grid and point_labels
    (B, P) float32 (1 foreground, 0 background, -1 padding: P >= 1, a box-only prompt passes one
    padding point and gets the box-only outputs); clip_image_features (B, 512) float32 (only when
    ``with_clip``).
    Outputs: low_res_logits (B, 1, 256, 256), iou (B, 1), category_logits (B, 11) float32.
    """

    def __init__(self, model: MCPMedSAM, *, modality_tokens: torch.Tensor, with_clip: bool) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.with_clip = with_clip
        self.register_buffer("modality_tokens", modality_tokens.detach().clone())
        self.register_buffer("dense_pe", model.prompt_encoder.get_dense_pe().detach().clone())
        clip_dim = model.config.clip_dim
        # Without a CLIP tower the CLIP features are zeros, so the content token is a constant.
        self.register_buffer("constant_content", model.prompt_encoder.content_token(torch.zeros(1, clip_dim)).detach())

    def forward(self, image_embeddings: torch.Tensor, embedding_index: torch.Tensor, boxes: torch.Tensor,
                crops: torch.Tensor, modality_index: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor,
                clip_image_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        if self.with_clip:
            content = pe.content_token(clip_image_features)
        else:
            content = self.constant_content.expand(boxes.shape[0], -1)
        points, point_bias = pe.point_tokens(point_coords, point_labels)
        sparse = torch.cat(
            [pe.box_tokens(boxes), content.unsqueeze(1), self.modality_tokens[modality_index].unsqueeze(1), points],
            dim=1,
        )
        bias = torch.cat([torch.zeros_like(point_bias[:, :1]).expand(-1, 4), point_bias], dim=1)
        dense = pe.crop_nets(crops)
        out = self.mask_decoder(image_embeddings=image_embeddings[embedding_index], image_pe=self.dense_pe,
                                sparse=sparse, dense=dense, sparse_bias=bias)
        return out.masks, out.iou, out.category


class ClipImageGraph(nn.Module):
    """crops_clip (B, 3, 224, 224) float32 in [0, 1] -> clip_image_features (B, 512) float32."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, crops_clip: torch.Tensor) -> torch.Tensor:
        return self.tower(crops_clip)
