"""Prompt encoder: SAM's box prompt plus MCP-MedSAM's modality and content prompts."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d, TwoLayerMLP
from .crop_net import CropNet
from .transformer import MASKED


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of [0, 1]^2 coordinates (SAM's).

    (..., 2) float32 in [0, 1] -> (..., 2 * num_pos_feats) float32.
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: int) -> torch.Tensor:
        """Dense encoding of a size x size grid of pixel centres: (C, size, size) float32."""
        ones = torch.ones(size, size, device=self.positional_encoding_gaussian_matrix.device)
        y = (ones.cumsum(0) - 0.5) / size
        x = (ones.cumsum(1) - 0.5) / size
        return self(torch.stack([x, y], dim=-1)).permute(2, 0, 1)


class BoxPromptEncoder(nn.Module):
    """SAM's prompt encoder restricted to what box prompts use (LiteMedSAM's, state_dict-compatible).

    ``with_mask_downscaling`` keeps LiteMedSAM's unused mask-prompt convs so that its checkpoint
    loads strictly; MCP-MedSAM has no mask-prompt path.
    """

    def __init__(self, *, embed_dim: int = 256, image_embedding_size: int = 64, input_image_size: int = 256,
                 with_mask_downscaling: bool = False, mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # SAM's four: 0 background point, 1 foreground point, 2 and 3 the box corners; not_a_point_embed
        # for padded points (:meth:`point_tokens`).
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        if with_mask_downscaling:
            self.mask_downscaling = nn.Sequential(
                nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
                LayerNorm2d(mask_in_chans // 4),
                nn.GELU(),
                nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
                LayerNorm2d(mask_in_chans),
                nn.GELU(),
                nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
            )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, 64, 64) float32 positional encoding of the image embedding grid."""
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)

    def box_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) float32 x0, y0, x1, y1 on the 256 grid -> (B, 2, C) corner tokens."""
        corners = (boxes.reshape(-1, 2, 2) + 0.5) / self.input_image_size
        emb = self.pe_layer(corners)
        return torch.stack(
            [emb[:, 0] + self.point_embeddings[2].weight[0], emb[:, 1] + self.point_embeddings[3].weight[0]], dim=1
        )

    def point_tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's point prompt: positional encoding of the pixel centre plus a learned embedding per label.

        coords (B, P, 2) float32 x, y on the image-size grid (pixel index units: the encoder adds 0.5 for
        the pixel centre, as :meth:`box_tokens`); labels (B, P) float32 or int: 1 foreground, 0
        background, -1 padding. Returns tokens (B, P, C) and their attention key bias (B, P) float32:
        0 for a point, ``transformer.MASKED`` for padding, whose token (``not_a_point_embed``, zero
        positional encoding, as SAM) then takes no part in the decoder.
        """
        labels = labels.to(coords.dtype).unsqueeze(-1)
        pad = labels < -0.5
        fg = labels > 0.5
        emb = self.pe_layer((coords + 0.5) / self.input_image_size)
        emb = torch.where(pad, torch.zeros_like(emb), emb)
        label_emb = torch.where(fg, self.point_embeddings[1].weight[0], self.point_embeddings[0].weight[0])
        emb = emb + torch.where(pad, self.not_a_point_embed.weight[0], label_emb)
        bias = torch.where(pad[..., 0], torch.full_like(coords[..., 0], MASKED), torch.zeros_like(coords[..., 0]))
        return emb, bias

    def no_mask_dense(self, batch: int) -> torch.Tensor:
        """(B, C, 64, 64) dense embedding of "no mask prompt"."""
        s = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, s, s)


class PromptEncoder(BoxPromptEncoder):
    """Encodes one box per prompt into 4 sparse tokens and a dense embedding (MCP-MedSAM).

    Token order (as the official model): box corner 1, box corner 2, content token, modality token;
    point tokens (:meth:`point_tokens`), when given, follow these four.
    The content token comes from frozen CLIP image features of the box crop, the modality token
    from frozen CLIP text features of "<Modality> Image" and a learnable per-modality embedding,
    and the dense embedding from the 64x64 crop through :class:`CropNet` (``no_mask_embed`` is
    unused, kept for checkpoint compatibility).
    """

    def __init__(self, *, embed_dim: int = 256, image_embedding_size: int = 64, input_image_size: int = 256,
                 clip_dim: int = 512, num_modalities: int = 11, crop_net: CropNet) -> None:
        super().__init__(embed_dim=embed_dim, image_embedding_size=image_embedding_size,
                         input_image_size=input_image_size)
        self.crop_nets = crop_net
        self.clip_img_mlp = TwoLayerMLP(clip_dim, embed_dim, embed_dim)
        self.clip_text_mlp = TwoLayerMLP(clip_dim, embed_dim, embed_dim)
        self.mlps = TwoLayerMLP(2 * embed_dim, 2 * embed_dim, embed_dim)
        self.categories = nn.Embedding(num_modalities, embed_dim)

    def content_token(self, clip_image_features: torch.Tensor) -> torch.Tensor:
        """(B, 512) CLIP image features of the 224x224 crop -> (B, C)."""
        return self.clip_img_mlp(clip_image_features)

    def modality_token(self, text_features: torch.Tensor, category_idx: torch.Tensor) -> torch.Tensor:
        """(B, 512) CLIP text features and (B,) int64 modality index -> (B, C)."""
        text = self.clip_text_mlp(text_features)
        return self.mlps(torch.cat([text, self.categories(category_idx)], dim=-1))

    def forward(self, *, boxes: torch.Tensor, crops: torch.Tensor, clip_image_features: torch.Tensor,
                text_features: torch.Tensor, category_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse (B, 4, C) and dense (B, C, 64, 64) float32 embeddings of the box prompt
        (points: :meth:`point_tokens`, appended by the caller).

        boxes (B, 4) on the 256 grid; crops (B, 3, 64, 64) in [0, 1]; clip_image_features and
        text_features (B, 512); category_idx (B,) int64.
        """
        sparse = self.sparse_tokens(boxes=boxes, clip_image_features=clip_image_features,
                                    text_features=text_features, category_idx=category_idx)
        return sparse, self.crop_nets(crops)

    def sparse_tokens(self, *, boxes: torch.Tensor, clip_image_features: torch.Tensor, text_features: torch.Tensor,
                      category_idx: torch.Tensor) -> torch.Tensor:
        """(B, 4, C) float32: box corner 1, box corner 2, content token, modality token."""
        return torch.cat(
            [
                self.box_tokens(boxes),
                self.content_token(clip_image_features).unsqueeze(1),
                self.modality_token(text_features, category_idx).unsqueeze(1),
            ],
            dim=1,
        )
