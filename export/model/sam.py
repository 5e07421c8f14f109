"""Whole models (MCP-MedSAM and LiteMedSAM), one private builder and a registry of variants."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .crop_net import CropNet
from .image_encoder import TinyViT, TinyViTConfig
from .mask_decoder import DecoderOutput, MaskDecoderF4, SamMaskDecoder
from .prompt_encoder import BoxPromptEncoder, PromptEncoder
from .transformer import TwoWayTransformer


@dataclass(frozen=True)
class ModelConfig:
    encoder: TinyViTConfig = field(default_factory=TinyViTConfig)
    embed_dim: int = 256
    image_size: int = 256  # encoder input; boxes live on this grid
    embedding_size: int = 64  # image embedding side; also the crop CNN's crop side
    clip_dim: int = 512
    clip_crop_size: int = 224
    num_modalities: int = 11
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    crop_blocks: int = 3
    category_hidden_dim: int = 64


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # The official MCP-MedSAM / LiteMedSAM layout (../shared/reference/mcp_medsam_state_dict.json).
    "mcp_medsam": ModelConfig(),
    # Same code, small numbers: for fast CPU tests of training, resume and DDP.
    "tiny": ModelConfig(
        encoder=TinyViTConfig(img_size=64, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                              window_sizes=(7, 7, 7, 7), out_chans=32),
        embed_dim=32, image_size=64, embedding_size=16, clip_dim=32, clip_crop_size=32, decoder_depth=1,
        decoder_heads=2, decoder_mlp_dim=64, crop_blocks=1, category_hidden_dim=16,
    ),
}


def variant_name(config: ModelConfig) -> str:
    """The registry name of a model configuration."""
    return next(name for name, cfg in MODEL_CONFIGS.items() if cfg == config)


class _SamLayout(nn.Module):
    """What both models share: segment-anything's three parts (``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``: the state_dict prefixes of the official checkpoints) and their config."""

    def __init__(self, *, image_encoder: TinyViT, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 config: ModelConfig) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config


class MCPMedSAM(_SamLayout):
    """TinyViT encoder + MCP prompt encoder + F4 decoder, one box per prompt."""

    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoderF4

    def decode(self, *, image_embeddings: torch.Tensor, boxes: torch.Tensor, crops: torch.Tensor,
               clip_image_features: torch.Tensor, text_features: torch.Tensor, category_idx: torch.Tensor,
               point_coords: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
               dense: torch.Tensor | None = None) -> DecoderOutput:
        """image_embeddings (B, 256, 64, 64), one per prompt; boxes (B, 4) on the 256 grid;
        crops (B, 3, 64, 64) in [0, 1]; clip_image_features, text_features (B, 512); category_idx (B,).
        Optional clicks: point_coords (B, P, 2) float32 x, y on the 256 grid and point_labels (B, P)
        (1 foreground, 0 background, -1 padding; :meth:`PromptEncoder.point_tokens`). Without points, or
        with padding only, the outputs are the box-only ones. ``dense`` (1 or B, 256, 64, 64): the crop
        CNN's output when the caller already has it (a frozen crop CNN whose output does not depend on
        the crop; ``crops`` is then not read)."""
        pe = self.prompt_encoder
        if dense is None:
            sparse, dense = pe(boxes=boxes, crops=crops, clip_image_features=clip_image_features,
                               text_features=text_features, category_idx=category_idx)
        else:
            sparse = pe.sparse_tokens(boxes=boxes, clip_image_features=clip_image_features,
                                      text_features=text_features, category_idx=category_idx)
            dense = dense.expand(boxes.shape[0], -1, -1, -1)
        bias = None
        if point_coords is not None:
            tokens, point_bias = self.prompt_encoder.point_tokens(point_coords, point_labels)
            sparse = torch.cat([sparse, tokens.to(sparse.dtype)], dim=1)
            bias = torch.cat([point_bias.new_zeros(point_bias.shape[0], 4), point_bias], dim=1)
        return self.mask_decoder(image_embeddings=image_embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse=sparse, dense=dense, sparse_bias=bias)

    def forward(self, *, images: torch.Tensor, boxes: torch.Tensor, crops: torch.Tensor,
                clip_image_features: torch.Tensor, text_features: torch.Tensor,
                category_idx: torch.Tensor) -> DecoderOutput:
        """images (B, 3, 256, 256) float32 in [0, 1], one per prompt; the rest as :meth:`decode`."""
        return self.decode(image_embeddings=self.image_encoder(images), boxes=boxes, crops=crops,
                           clip_image_features=clip_image_features, text_features=text_features,
                           category_idx=category_idx)


class LiteMedSAM(_SamLayout):
    """TinyViT encoder + SAM box prompt encoder + SAM decoder (the teacher and the baseline)."""

    prompt_encoder: BoxPromptEncoder
    mask_decoder: SamMaskDecoder

    def decode(self, *, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> DecoderOutput:
        """image_embeddings (B, 256, 64, 64), boxes (B, 4) on the 256 grid -> (B, 1, 256, 256) logits."""
        pe = self.prompt_encoder
        return self.mask_decoder(image_embeddings=image_embeddings, image_pe=pe.get_dense_pe(),
                                 sparse=pe.box_tokens(boxes), dense=pe.no_mask_dense(boxes.shape[0]))

    def forward(self, *, images: torch.Tensor, boxes: torch.Tensor) -> DecoderOutput:
        return self.decode(image_embeddings=self.image_encoder(images), boxes=boxes)


def _build(cfg: ModelConfig, *, mcp: bool) -> nn.Module:
    encoder = TinyViT(config=cfg.encoder)
    transformer = TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.embed_dim,
                                    num_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp_dim)
    sizes = dict(embed_dim=cfg.embed_dim, image_embedding_size=cfg.embedding_size, input_image_size=cfg.image_size)
    if not mcp:
        return LiteMedSAM(
            image_encoder=encoder,
            prompt_encoder=BoxPromptEncoder(**sizes, with_mask_downscaling=True),
            mask_decoder=SamMaskDecoder(transformer=transformer, transformer_dim=cfg.embed_dim,
                                        iou_head_hidden_dim=cfg.embed_dim),
            config=cfg,
        )
    crop_net = CropNet(channels=cfg.embed_dim, num_blocks=cfg.crop_blocks)
    return MCPMedSAM(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(**sizes, clip_dim=cfg.clip_dim, num_modalities=cfg.num_modalities,
                                     crop_net=crop_net),
        mask_decoder=MaskDecoderF4(transformer=transformer, transformer_dim=cfg.embed_dim,
                                   iou_head_hidden_dim=cfg.embed_dim, num_modalities=cfg.num_modalities,
                                   category_hidden_dim=cfg.category_hidden_dim),
        config=cfg,
    )


def build_mcp_medsam(variant: str = "mcp_medsam") -> MCPMedSAM:
    """A freshly initialised MCP-MedSAM (eval mode is the caller's choice)."""
    return _build(MODEL_CONFIGS[variant], mcp=True)


def build_litemedsam(variant: str = "mcp_medsam") -> LiteMedSAM:
    return _build(MODEL_CONFIGS[variant], mcp=False)
